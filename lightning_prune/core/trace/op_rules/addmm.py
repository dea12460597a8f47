"""The rule for ``addmm(bias, x, weight)``: a linear layer whose weight is stored ``(in, out)``.

Hugging Face's ``Conv1D`` (GPT-2, GPT, CTRL's projections) computes ``torch.addmm(self.bias,
x.view(-1, nx), self.weight)`` with a ``(nx, nf)`` weight: the transpose of ``nn.Linear``'s. Where
``weight`` is a parameter the call is a producer: its columns are the output channels (with the
bias), its rows read the input channels. Any other ``addmm`` (a product of two activations, a
computed weight) that touches channels keeps them.

Each rule is ``rule(tracer, call) -> None``; see :mod:`lightning_prune.core.trace.op_rules`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lightning_prune.core.trace.op_rules.layers import COMPUTED_WEIGHT, consumer_constants, register_producer
from lightning_prune.core.trace.records import Consumer, OpCall, Rep

if TYPE_CHECKING:
    from lightning_prune.core.trace.bookkeeping import Bookkeeping

KIND = "addmm"
"""The :class:`~lightning_prune.core.trace.records.Consumer` kind: a linear layer with its weight stored ``(in, out)``."""


def addmm(t: Bookkeeping, call: OpCall) -> None:
    """``addmm(bias, x, weight)`` with a ``(in, out)`` parameter ``weight``: a producer of ``out`` channels
    (``weight`` columns and ``bias`` sliced with them) and a consumer of ``x``'s ``in`` channels."""

    bias, data, weight, out = call.arg(0, "input"), call.arg(1, "mat1"), call.arg(2, "mat2"), call.out
    if not all(isinstance(x, Tensor) and x.ndim == 2 for x in (data, weight)):
        return t.give_up(call, "multiplies tensors that are not matrices")
    if t.param_name(weight) is None:
        return t.give_up(call, COMPUTED_WEIGHT)
    per_column = isinstance(bias, Tensor) and bias.numel() > 1
    if t.rep(bias) is not None or (per_column and (t.param_name(bias) is None or bias.shape != out.shape[-1:])):
        return t.give_up(call, "adds a term that is not a per-column parameter, which export cannot slice")
    produced = register_producer(t, OpCall(call.op, call.name, call.func, (data, weight), {}, out), 1, out.shape[1])
    if produced is None:
        return None
    module, in_labels, out_labels = produced
    t.add_axis(weight, 0, in_labels)
    t.add_axis(weight, 1, out_labels)
    if per_column:
        t.add_axis(bias, 0, out_labels)
    t.trace.consumers.append(
        Consumer(module, KIND, in_labels, consumer_constants(t, data, 1, in_labels), foldable=True)
    )
    t.set_rep(out, Rep((1,), out_labels))
    return None


__all__ = ["KIND", "addmm"]
