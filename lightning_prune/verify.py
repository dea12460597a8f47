"""Check that an exported model computes what the masked model computes.

>>> import torch
>>> from torch import nn
>>> a = nn.Linear(4, 2)
>>> report = verify_equivalence(a, a, torch.randn(3, 4))
>>> report.passed, report.max_relative_error
(True, 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_prune.trace import call_model


@dataclass
class TensorError:
    """Errors of one output tensor: relative ``||a - b|| / ||b||`` (``b`` the reference) and max absolute."""

    path: str
    relative: float
    max_abs: float


@dataclass
class EquivalenceReport:
    """Per-output errors of a candidate against a reference, and whether all are within ``rtol``."""

    rtol: float
    outputs: list[TensorError] = field(default_factory=list)
    problem: str = ""

    @property
    def passed(self) -> bool:
        return not self.problem and all(o.relative <= self.rtol for o in self.outputs)

    @property
    def max_relative_error(self) -> float:
        return max((o.relative for o in self.outputs), default=math.inf if self.problem else 0.0)

    def __str__(self) -> str:
        lines = [f"{'PASS' if self.passed else 'FAIL'} (rtol={self.rtol:g})"] + [
            f"  {o.path}: relative {o.relative:.3e}, max abs {o.max_abs:.3e}" for o in self.outputs
        ]
        return "\n".join(lines + ([f"  {self.problem}"] if self.problem else []))


@torch.no_grad()
def verify_equivalence(reference: nn.Module, candidate: nn.Module, example_input: Any, rtol: float = 1e-5) -> EquivalenceReport:
    """Run both models in eval mode on ``example_input`` and compare every output tensor."""
    outputs = []
    for model in (reference, candidate):
        was_training = model.training
        model.eval()
        try:
            outputs.append(call_model(model, example_input))
        finally:
            model.train(was_training)
    return compare_outputs(outputs[0], outputs[1], rtol)


def compare_outputs(reference: Any, candidate: Any, rtol: float = 1e-5) -> EquivalenceReport:
    """Compare two (nested) model outputs tensor by tensor."""
    report = EquivalenceReport(rtol)
    ref_leaves, ref_spec = tree_flatten(reference)
    cand_leaves, cand_spec = tree_flatten(candidate)
    if ref_spec != cand_spec:
        report.problem = f"output structure differs: {ref_spec} vs {cand_spec}"
        return report
    for index, (ref, cand) in enumerate(zip(ref_leaves, cand_leaves)):
        if not isinstance(ref, Tensor):
            continue
        if ref.shape != cand.shape:
            report.problem = f"output {index}: shape {tuple(cand.shape)} instead of {tuple(ref.shape)}"
            return report
        diff = (cand.double() - ref.double())
        norm = float(ref.double().norm())
        err = float(diff.norm())
        relative = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
        report.outputs.append(TensorError(f"output[{index}]", relative, float(diff.abs().max()) if diff.numel() else 0.0))
    return report
