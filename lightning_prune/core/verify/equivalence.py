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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_prune.core.errors import VerificationError
from lightning_prune.core.modules import evaluating
from lightning_prune.core.trace.records import call_model


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
def verify_equivalence(
    reference: nn.Module, candidate: nn.Module, example_input: Any, rtol: float = 1e-5
) -> EquivalenceReport:
    """Run both models in eval mode on ``example_input`` and compare every output tensor."""
    with evaluating(reference, candidate):
        return compare_outputs(call_model(reference, example_input), call_model(candidate, example_input), rtol)


@torch.no_grad()
def verify_on_batches(
    reference: nn.Module, candidate: nn.Module, batches: Iterable[tuple[Any, Any]], rtol: float = 1e-5
) -> dict[str, float]:
    """Compare ``candidate`` with ``reference`` on ``(inputs, target or None)`` batches, in eval mode.

    Returns the worst relative error over every output tensor and, for classifier logits (a 2D
    output), top-1 agreement and each model's accuracy where targets are given (torchmetrics).
    Raises :class:`~lightning_prune.core.errors.VerificationError` naming the batch that differs.

    >>> import torch
    >>> layer = torch.nn.Linear(4, 3)
    >>> report = verify_on_batches(layer, layer, [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))])
    >>> report["max_relative_error"], report["top1_agreement"]
    (0.0, 1.0)
    """
    from torchmetrics.classification import MulticlassAccuracy  # one process: no cross-rank sync

    def accuracy(classes: int, device: torch.device) -> MulticlassAccuracy:
        return MulticlassAccuracy(classes, average="micro", sync_on_compute=False).to(device)

    worst, count, metrics = 0.0, 0, {}
    with evaluating(reference, candidate):
        for index, (inputs, target) in enumerate(batches):
            expected, got = call_model(reference, inputs), call_model(candidate, inputs)
            comparison = compare_outputs(expected, got, rtol)
            worst, count = max(worst, comparison.max_relative_error), count + 1
            if not comparison.passed:
                raise VerificationError(
                    f"The exported model differs from the masked model on batch {index}: "
                    f"max relative error {comparison.max_relative_error:.2e} > rtol {rtol:g}. {comparison.problem}".rstrip()
                )
            if not (isinstance(expected, Tensor) and expected.ndim == 2 and expected.is_floating_point()):
                continue
            classes, device = expected.shape[1], expected.device
            metrics.setdefault("top1_agreement", accuracy(classes, device)).update(got, expected.argmax(1))
            if isinstance(target, Tensor) and target.shape == expected.shape[:1] and not target.is_floating_point():
                target = target.to(device)
                metrics.setdefault("accuracy_masked", accuracy(classes, device)).update(expected, target)
                metrics.setdefault("accuracy_exported", accuracy(classes, device)).update(got, target)
    report = {"max_relative_error": worst, "verified_batches": count}
    report.update({name: float(metric.compute()) for name, metric in metrics.items()})
    if report.get("top1_agreement", 1.0) < 1.0:
        raise VerificationError(
            f"Exported and masked models disagree on top-1 for {1 - report['top1_agreement']:.2%} of samples."
        )
    return report


def compare_outputs(reference: Any, candidate: Any, rtol: float = 1e-5) -> EquivalenceReport:
    """Compare two (nested) model outputs tensor by tensor."""
    report = EquivalenceReport(rtol)
    ref_leaves, ref_spec = tree_flatten(reference)
    cand_leaves, cand_spec = tree_flatten(candidate)
    if ref_spec != cand_spec:
        report.problem = f"output structure differs: {ref_spec} vs {cand_spec}"
        return report
    for index, (ref, cand) in enumerate(zip(ref_leaves, cand_leaves, strict=True)):
        if not isinstance(ref, Tensor):
            continue
        if ref.shape != cand.shape:
            report.problem = f"output {index}: shape {tuple(cand.shape)} instead of {tuple(ref.shape)}"
            return report
        diff = cand.double() - ref.double()
        norm = float(ref.double().norm())
        err = float(diff.norm())
        relative = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
        report.outputs.append(
            TensorError(f"output[{index}]", relative, float(diff.abs().max()) if diff.numel() else 0.0)
        )
    return report
