"""The export's self-check: the exported model run on the example input against what the trace recorded.

Export calls :func:`self_check` after every shrink. It costs one forward pass of the exported model at
batch 1, under ``torch.inference_mode()``, against row 0 of the masked model's output that the trace
recorded on the whole example (no forward of the masked model). Row 0 is the masked model's output on
the first sample only where the model treats each sample alone in eval mode; where it does not
(statistics over the batch, a batch dim other than dim 0, a model that needs several samples), the
batch-1 comparison fails, and a failure at batch 1 is never final: the whole example decides it,
against the whole recorded output, as before, and the retries work from that failure. What passes
is checked on one sample instead of every sample of the example: the exported layers compute each
sample alike, so a wrong size or slice shows on any one. The contracts stay where they were: the
callback's verification on real batches and :func:`~lightning_prune.core.verify.equivalence.verify_equivalence`.

>>> import torch
>>> layer = torch.nn.Linear(4, 2)
>>> x = torch.randn(3, 4)
>>> with torch.no_grad():
...     expected = layer(x)
>>> self_check(layer, x, expected) is None
True
>>> first_sample(x, expected)[0].shape, first_sample(x[:1], expected[:1])
(torch.Size([1, 4]), None)
"""

from __future__ import annotations

import traceback
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from lightning_prune.core.modules import evaluating, running_modules
from lightning_prune.core.trace.records import call_model
from lightning_prune.core.verify.equivalence import compare_outputs


class Failure(NamedTuple):
    """Why a check failed."""

    module: str | None
    """The innermost of the model's modules that raised (``""``: the model itself); ``None`` for a
    numerical difference."""
    what: str
    where: tuple[str, int] | None = None
    """The file and line of the innermost Python frame that raised."""


def self_check(model: nn.Module, example_input: Any, expected: Any, rtol: float = 1e-4) -> Failure | None:
    """``None`` if ``model`` reproduces ``expected`` (the masked model's output on ``example_input``),
    else the :class:`Failure`. Checked on the first sample where the input and output can be cut to
    it (see :func:`first_sample`), and on the whole example where that fails or cannot be done."""
    one = first_sample(example_input, expected)
    if one is not None and _failure(model, *one, rtol) is None:
        return None
    return _failure(model, example_input, expected, rtol)


def first_sample(example_input: Any, output: Any) -> tuple[Any, Any] | None:
    """``(example_input, output)`` cut to their first sample along dim 0, or ``None`` where there is no
    batch to cut: the first tensor of the input has one row, or an output tensor does not have the
    input's batch along dim 0 (a loss, a sequence-first layout). Input tensors with another leading
    size (position ids broadcast over the batch) are passed whole."""
    inputs = [t for t in tree_leaves(example_input) if isinstance(t, Tensor) and t.ndim]
    outputs = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
    batch = inputs[0].shape[0] if inputs else 1
    if batch <= 1 or not outputs or any(t.ndim == 0 or t.shape[0] != batch for t in outputs):
        return None

    def cut(value: Any) -> Any:
        return value[:1] if isinstance(value, Tensor) and value.ndim and value.shape[0] == batch else value

    return tree_map(cut, example_input), tree_map(cut, output)


def _failure(model: nn.Module, example_input: Any, expected: Any, rtol: float) -> Failure | None:
    try:
        with running_modules(model) as running, torch.inference_mode(), evaluating(model):
            report = compare_outputs(expected, call_model(model, example_input), rtol=rtol)
    except Exception as err:  # a view the exported sizes no longer fit
        return Failure(running[-1] if running else "", f"{type(err).__name__}: {err}", raised_at(err))
    finally:
        normal_tensors(model)
    return None if report.passed else Failure(None, f"relative error {report.max_relative_error:.2e}")


def raised_at(err: BaseException) -> tuple[str, int] | None:
    """The file and line of the innermost Python frame ``err`` went through."""
    frames = traceback.extract_tb(err.__traceback__)
    return (frames[-1].filename, frames[-1].lineno or 0) if frames else None


def normal_tensors(model: nn.Module) -> None:
    """A forward may leave tensors it made on the model (a buffer it replaced, a table it caches); made
    under inference mode they could never be trained through, so they become ordinary copies."""
    for module in model.modules():
        for held in (module._buffers, module.__dict__):
            for name, value in list(held.items()):
                if isinstance(value, Tensor) and value.is_inference():
                    held[name] = value.clone()


__all__ = ["Failure", "first_sample", "normal_tensors", "raised_at", "self_check"]
