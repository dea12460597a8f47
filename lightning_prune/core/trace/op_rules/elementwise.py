"""Rules for ops that keep every element where it is: per-element math, copies, pooling, reductions.

Each rule is ``rule(tracer, call) -> None``; see :mod:`lightning_prune.core.trace.op_rules`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lightning_prune.core.trace.records import Deferred, ParamAxis, Rep, leaves

if TYPE_CHECKING:
    from lightning_prune.core.trace.bookkeeping import Bookkeeping
    from lightning_prune.core.trace.records import OpCall

MULTIPLICATIVE = frozenset({"mul", "multiply", "div", "divide", "true_divide", "truediv"})


def ignore(t: Bookkeeping, call: OpCall) -> None:
    """No effect on channels (metadata, in-place RNG)."""


def identity(t: Bookkeeping, call: OpCall) -> None:
    """Same layout out as in (dtype and device moves, copies): outputs of the input's shape take its labels."""
    rep = t.rep(call.args[0])
    for tensor in leaves(call.out):
        if isinstance(tensor, Tensor) and tensor.shape == call.args[0].shape:
            t.set_rep(tensor, rep)


def elementwise(t: Bookkeeping, call: OpCall) -> None:
    """Per element, with broadcasting: labelled operands' channels are coupled; the last one names the result.

    An unlabelled operand broadcast over the channels is fine if it is input-independent (a
    scalar, a parameter, a fresh constant); a data-dependent factor taints the channels (their
    constant may not fold); anything else added across them blocks them. A per-channel parameter
    is sliced with them, and so is a per-head one (a gate ``[heads, 1, 1]`` times an attention's
    output before its heads are merged) where the pass shows whole heads along its axis.
    """
    op, args, out = call.op, call.args, call.out
    outs = [tensor for tensor in leaves(out) if isinstance(tensor, Tensor)]
    shape = outs[0].shape
    operands = [tensor for tensor in leaves(call.inputs) if isinstance(tensor, Tensor)]
    labeled, plain = [], []
    for tensor in operands:
        (labeled if t.rep(tensor) is not None else plain).append(tensor)
    aligned = []
    for tensor in labeled:
        rep = t.rep(tensor)
        shift = len(shape) - tensor.ndim
        if any(tensor.shape[d] != shape[d + shift] for d in rep.dims):
            return t.give_up(call, "broadcasts them across a dim of another operand")
        aligned.append((tuple(d + shift for d in rep.dims), rep.labels))
    # the last labelled operand with the most channel dims names the result (seed: `out += residual`)
    dims, result = max(reversed(aligned), key=lambda entry: len(entry[0]))
    for other_dims, labels in aligned:
        if labels is result:
            continue
        if not set(other_dims) <= set(dims):
            return t.give_up(call, "combines operands whose channels lie along different dims")
        # broadcast along the result's other channel dims (a per-head factor times its head's channels)
        view = [labels.shape[other_dims.index(d)] if d in other_dims else 1 for d in dims]
        order = sorted(range(len(other_dims)), key=lambda i: dims.index(other_dims[i]))
        try:
            spread = labels.permute(order).reshape(view).expand(result.shape)
        except RuntimeError:
            return t.give_up(call, "combines operands whose channels lie along different dims")
        t.couple(spread, result)
    for tensor in plain:
        shift = len(shape) - tensor.ndim
        spans = [d for d in dims if d >= shift and tensor.shape[d - shift] > 1]
        is_param = t.from_parameters(tensor)  # a parameter, a view or index of one, a cat of those
        if not spans:
            if tensor.numel() == 1 or is_param or t.is_fresh(tensor):  # input-independent constants
                continue
            # data-dependent factor broadcast over channels: a pruned channel stays zero
            # (times anything) but its constant may not be input-independent any more
            if op in MULTIPLICATIVE and not (op.endswith("div") and tensor is args[0]):
                t.trace.tainted.append(result.flatten())
            else:  # harmless to whole heads (a causal mask added to the scores): decided at the end
                why = f"op '{op}' adds input-dependent values that belong to no channel across them"
                t.trace.deferred.append(Deferred("in_heads", result, why))
        elif is_param and len(dims) == 1 and spans == list(dims) and t.slice_parameter(tensor, dims[0] - shift, result):
            continue  # a per-channel parameter (or a view of one: a table gathered per head) is sliced with them
        elif is_param and len(spans) > 1 and _per_head(t, tensor, dims, spans, shift, result, op):
            continue  # a (heads, head_dim) parameter (Cohere's query/key norm weight): sliced by whole heads
        elif t.is_fresh(tensor):  # a constant sized by the model's code (torch.zeros(x.shape)): checked at export
            t.size_guess(result.flatten())
        else:
            why = f"op '{op}' combines them position by position with a tensor that belongs to no prunable channel"
            # fine if it only varies inside heads (rotary embeddings, a norm's weight), or if it is a
            # parameter with one value per head (a gate [heads, 1, 1]): decided at the end
            if len(dims) > 1:
                axes = tuple(dims.index(d) for d in spans)
                per_head = _per_head_slice(t, tensor, result, axes, shift, dims) if is_param else ()
                t.trace.deferred.append(Deferred("within", result, why, axes=axes, per_head=per_head))
            else:
                t.block(result, why)
    for tensor in outs:
        t.set_rep(tensor, Rep(dims, result) if tensor.shape == shape else None)


def _per_head(
    t: Bookkeeping, tensor: Tensor, dims: tuple[int, ...], spans: list[int], shift: int, result: Tensor, op: str
) -> bool:
    """A parameter spanning several channel dims (heads and ``head_dim``): sliced along the first dim
    it follows one to one (the heads), exact where whole heads go, so the labels must stay inside
    one head along the other dims it spans (decided at the end of the pass)."""
    for axis, dim in enumerate(dims):
        if dim not in spans:
            continue
        line = result.movedim(axis, 0).reshape(result.shape[axis], -1)[:, 0]
        if t.slice_parameter(tensor, dim - shift, line):
            others = tuple(dims.index(d) for d in spans if d != dim)
            why = (
                f"op '{op}' combines them position by position with a per-head parameter it cannot slice inside a head"
            )
            t.trace.deferred.append(Deferred("within", result, why, axes=others))
            return True
    return False


def _per_head_slice(
    t: Bookkeeping, tensor: Tensor, labels: Tensor, axes: tuple[int, ...], shift: int, dims: tuple[int, ...]
) -> tuple[ParamAxis, ...]:
    """How to slice a parameter that varies along one axis of ``labels`` alone (a per-head gate or
    scale), should each index along that axis turn out to be one whole head: the axes
    :meth:`~lightning_prune.core.trace.bookkeeping.Bookkeeping.slice_parameter` would record, not
    recorded yet (``()`` where it cannot)."""
    if len(axes) != 1:
        return ()
    line = labels.movedim(axes[0], 0).reshape(labels.shape[axes[0]], -1)[:, 0]
    recorded = len(t.trace.axes)
    if not t.slice_parameter(tensor, dims[axes[0]] - shift, line):
        return ()
    sliced = tuple(t.trace.axes[recorded:])
    del t.trace.axes[recorded:]
    return sliced


def spatial(t: Bookkeeping, call: OpCall) -> None:
    """Acts on trailing spatial dims only (pooling, interpolation, padding): channels pass unless they lie there."""
    op, args, data = call.op, call.args, call.args[0]
    rep = t.rep(data)
    if op == "pad":  # (left, right) pairs from the last dim backwards; a (0, 0) pair leaves its dim alone
        pad = list(call.kwargs.get("pad", args[1] if len(args) > 1 else ()))
        padded = {data.ndim - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
        if padded & set(rep.dims):
            return t.give_up(call, "pools, pads or resizes along their dim")
        trailing = 0
    elif op in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
        trailing = data.ndim - 2
    else:
        trailing = int(op.split("pool")[1][0])
    if any(d >= data.ndim - trailing for d in rep.dims):
        return t.give_up(call, "pools, pads or resizes along their dim")
    for tensor in leaves(call.out):
        if isinstance(tensor, Tensor):
            t.set_rep(tensor, rep)


def reduce(t: Bookkeeping, call: OpCall) -> None:
    """A reduction over given dims: channels pass (their dims renumbered) unless reduced over."""
    op, args, kwargs = call.op, call.args, call.kwargs
    if op in ("max", "min") and len(args) > 1 and isinstance(args[1], Tensor):
        return elementwise(t, call)
    data = args[0]
    rep = t.rep(data)
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
    if isinstance(dim, int):
        dim = (dim,)
    if not isinstance(dim, (tuple, list)) or not all(isinstance(d, int) for d in dim):
        return t.give_up(call, "reduces over every dim, theirs included")
    reduced = {d % data.ndim for d in dim}
    labels, kept_dims = rep.labels, rep.dims
    if reduced & set(rep.dims):
        if reduced >= set(rep.dims):
            return t.give_up(call, "reduces over their dim")
        # over head_dim (an RMSNorm of queries): exact where whole heads go, decided at the end
        axes = tuple(i for i, d in enumerate(rep.dims) if d in reduced)
        why = f"op '{call.op}' reduces over them together with channels it cannot prune with them"
        t.trace.deferred.append(Deferred("within", rep.labels, why, axes=axes))
        labels = rep.labels[tuple(0 if i in axes else slice(None) for i in range(len(rep.dims)))]
        kept_dims = tuple(d for d in rep.dims if d not in reduced)
    dims = kept_dims if keepdim else tuple(d - sum(q < d for q in reduced) for d in kept_dims)
    for tensor in leaves(call.out):
        if isinstance(tensor, Tensor):
            t.set_rep(tensor, Rep(dims, labels))


def softmax(t: Bookkeeping, call: OpCall) -> None:
    """Normalises along one dim (``softmax(x, dim)``, ``normalize(x, p, dim)``): channels pass unless
    it is theirs; inside whole heads (a norm over ``head_dim``) that is decided at the end of the pass."""
    data = call.args[0]
    rep = t.rep(data)
    dim = call.arg(2, "dim", 1) if call.op == "normalize" else call.arg(1, "dim")
    if dim is None:
        return t.give_up(call, "normalises along their dim")
    dim %= data.ndim
    if dim in rep.dims:
        if len(rep.dims) == 1:
            return t.give_up(call, "normalises along their dim")
        why = f"op '{call.op}' normalises them together with channels it cannot prune with them"
        t.trace.deferred.append(Deferred("within", rep.labels, why, axes=(rep.dims.index(dim),)))
    t.set_rep(call.out, rep)
