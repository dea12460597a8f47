"""Rules for ops that move elements: views, permutes, indexing, cat/stack, split/chunk/unbind.

Each rule is ``rule(tracer, call) -> None``; see :mod:`lightning_prune.core.trace.op_rules`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from lightning_prune.core.trace.records import Deferred, Rep, leaves

if TYPE_CHECKING:
    from lightning_prune.core.trace.bookkeeping import Bookkeeping
    from lightning_prune.core.trace.records import OpCall


def movement(t: Bookkeeping, call: OpCall) -> None:
    """Rearranges elements (view, permute, cat, getitem, ...): the op is run again on the input's labels
    and the labels follow the elements. Channels a view spreads over several dims are coupled but
    one (see :func:`_compress`); a fixed part of them is blocked."""
    if _join(t, call):
        return
    op, args, kwargs = call.op, call.args, call.kwargs
    if args:
        data = args[0]
    else:  # called with keywords only: torch.cat(tensors=...), torch.flatten(input=...)
        name = next(k for k in ("tensors", "input", "self") if k in kwargs)
        data = kwargs[name]
    if isinstance(data, (list, tuple)):
        sources = [tensor for tensor in data if isinstance(tensor, Tensor)]
        substituted = type(data)(t.full_labels(x) if isinstance(x, Tensor) else x for x in data)
    else:
        sources = [data]
        substituted = t.full_labels(data, materialize=False)  # a view of the labels, most ops keep it one
    try:
        result = call.func(substituted, *args[1:], **kwargs) if args else call.func(**{**kwargs, name: substituted})
    except RuntimeError:  # a view the expanded labels' strides do not allow
        substituted = t.full_labels(data)
        result = call.func(substituted, *args[1:], **kwargs) if args else call.func(**{**kwargs, name: substituted})
    outs, _ = tree_flatten(call.out)
    results, _ = tree_flatten(result)
    seen = []
    split_ = all(len(t.rep(s).dims) == 1 for s in sources if t.rep(s) is not None)
    for tensor, labels in zip(outs, results, strict=False):
        if isinstance(tensor, Tensor) and isinstance(labels, Tensor):
            rep = _compress(t, labels, split_)
            if rep is not None and len(sources) == 1 and tensor.ndim != sources[0].ndim:
                rep.from_view = True
            t.set_rep(tensor, rep)
            if rep is not None:
                seen.append(rep.labels.flatten())
    before = [t.rep(s).labels.flatten() for s in sources if t.rep(s) is not None]
    if not before:
        return
    before = torch.cat(before)
    after = torch.cat(seen) if seen else torch.empty(0, dtype=torch.long)
    if not bool(torch.isin(before[before >= 0], after).all()):
        # a fixed slice of the channels must stay where it is, unless it is a fixed part of whole
        # heads (rotary embeddings slice head_dim): decided once attention has named the heads
        reason = f"op '{op}' keeps a fixed part of them (a view it cannot shrink)"
        t.trace.deferred.append(Deferred("fixed_part", before, reason, survivors=after[after >= 0]))


def _compress(t: Bookkeeping, full: Tensor, split: bool) -> Rep | None:
    """The :class:`~lightning_prune.core.trace.records.Rep` of a full label tensor.

    When ``split`` (a view or stack just spread single-dim channels over several dims), the
    labels are coupled along every dim but one when the pass ends
    (:func:`~lightning_prune.core.trace.tracer.couple_split`), unless attention finds that the split
    made heads (``view(b, n, heads, head_dim)``): then whole heads go. Export checks the guess
    and keeps these channels if the exported model disagrees.
    """
    if full.numel() == 0:
        return None
    if 0 in full.stride():  # still a view of the expanded labels: labels vary exactly where strides do not vanish
        varying = [d for d in range(full.ndim) if full.shape[d] > 1 and full.stride(d) != 0]
    else:
        varying = [d for d in range(full.ndim) if full.shape[d] > 1 and not bool((full == full.narrow(d, 0, 1)).all())]
    index = tuple(slice(None) if d in varying else 0 for d in range(full.ndim))
    labels = full[index]
    if int(labels.max()) < 0:
        return None
    if split and labels.ndim > 1:  # coupled when the pass ends, unless attention finds heads here
        reason = f"op '{t.op}' spreads them over several dims, one of them fixed"
        t.trace.deferred.append(Deferred("split", labels, reason))
        t.size_guess(labels.flatten())
    return Rep(tuple(varying), labels)


def _join(t: Bookkeeping, call: OpCall) -> bool:
    """``cat``/``stack`` of tensors whose channels lie along the same dims.

    Along the channel dim, ``cat`` joins the label vectors (DenseNet, Inception). Along any
    other dim (a batch of left and right images, a stack of feature maps), position ``i`` of
    every piece lands at one position of the result: the pieces' channels there are coupled.
    """
    op, args, kwargs, out = call.op, call.args, call.kwargs, call.out
    if op not in ("cat", "concat", "concatenate", "stack") or not isinstance(out, Tensor):
        return False
    tensors = kwargs["tensors"] if "tensors" in kwargs else (args[0] if args else None)
    dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else 0))
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return False
    if not all(isinstance(tensor, Tensor) for tensor in tensors):
        return False
    if op != "stack":  # an empty piece adds nothing (a key/value cache's first update: cat([empty, k]))
        tensors = [tensor for tensor in tensors if tensor.numel() or t.rep(tensor) is not None]
    reps = [t.rep(tensor) for tensor in tensors]
    known = [r for r in reps if r is not None]
    dims = known[0].dims
    if any(r.dims != dims for r in known):
        return False
    dim %= out.ndim
    if op != "stack" and dims == (dim,):
        pieces = [
            r.labels if r is not None else torch.full((tensor.shape[dim],), -1, dtype=torch.long)
            for r, tensor in zip(reps, tensors, strict=False)
        ]
        t.set_rep(out, Rep(dims, torch.cat(pieces)))
        return True
    if dim in dims and op != "stack":
        return False
    shape = known[0].labels.shape
    if any(r.labels.shape != shape for r in known):
        return False
    first = known[0].labels
    for rep, tensor in zip(reps, tensors, strict=True):
        if rep is None and len(dims) == 1 and t.slice_parameter(tensor, dims[0], first):
            continue  # a class token joined to the patch tokens: the parameter is sliced with them
        labels = rep.labels if rep is not None else torch.full(tuple(shape), -1, dtype=torch.long)
        t.couple(
            labels, first, f"op '{op}' joins them, along another dim, with values that belong to no prunable channel"
        )
    t.set_rep(out, Rep(tuple(d + (d >= dim) for d in dims) if op == "stack" else dims, first))
    return True


def gather(t: Bookkeeping, call: OpCall) -> None:
    """``torch.gather(x, dim, index)`` along a dim without channels (DeBERTa's relative positions picked
    per query): each output element comes from the same channel position, so the labels pass,
    where the index spans the channel dims whole; an index that picks along the channels keeps them."""
    data, dim, index = call.arg(0, "input"), call.arg(1, "dim"), call.arg(2, "index")
    rep = t.rep(data)
    if not isinstance(index, Tensor) or t.rep(index) is not None or not isinstance(dim, int):
        return t.give_up(call, "gathers by an index the tracer cannot read")
    dim %= data.ndim
    if dim in rep.dims or any(index.shape[d] != data.shape[d] for d in rep.dims):
        return t.give_up(call, "gathers along their dim")
    t.set_rep(call.out, rep)


def split(t: Bookkeeping, call: OpCall) -> None:
    """``chunk``/``split``/``unbind``: along another dim every piece keeps the labels; equal chunks
    along the channel dim are coupled (they must lose the same channels); other splits of the
    channel dim block them."""
    op, args, kwargs = call.op, call.args, call.kwargs
    data = args[0] if args else kwargs.get("input", kwargs.get("self"))
    rep = t.rep(data)
    # torch.unbind(x, dim) and x.unbind(dim) both arrive as (x, dim); split/chunk take (x, size, dim)
    dim = call.arg(1, "dim", 0) if op == "unbind" else call.arg(2, "dim", 0)
    dim %= data.ndim
    outs = [tensor for tensor in leaves(call.out) if isinstance(tensor, Tensor)]
    if dim not in rep.dims:
        for tensor in outs:
            dims = tuple(d - (op == "unbind" and d > dim) for d in rep.dims)
            t.set_rep(tensor, Rep(dims, rep.labels))
        return
    axis = rep.dims.index(dim)
    if op == "unbind":
        if len(rep.dims) == 1:
            return t.give_up(call, "makes one tensor of each of them")
        # (3, heads, head_dim) -> q, k, v: each piece keeps its labels along the other dims
        dims = tuple(d - (d > dim) for d in rep.dims if d != dim)
        for tensor, labels in zip(outs, rep.labels.unbind(axis), strict=False):
            t.set_rep(tensor, Rep(dims, labels))
        return
    sizes = {tensor.shape[dim] for tensor in outs}
    if len(rep.dims) > 1 and sizes == {1} and axis < len(rep.dims) - 1:
        # one piece per head (StableLM's per-head norms): exact where whole heads go, once the module
        # applying them keeps the kept heads' own (its updater); export checks the pieces' count
        t.trace.deferred.append(Deferred("in_heads", rep.labels, f"op '{op}' splits them into one piece each"))
        t.size_guess(rep.labels.flatten())
        for index, tensor in enumerate(outs):
            t.set_rep(tensor, Rep(rep.dims, rep.labels.narrow(axis, index, 1)))
        return
    if len(rep.dims) > 1 and (op != "chunk" or len(sizes) != 1):
        # pieces of fixed sizes along head_dim (LeViT's q, k, v): exact where whole heads go
        reason = f"op '{op}' splits them into pieces of fixed sizes"
        t.trace.deferred.append(Deferred("within", rep.labels, reason, axes=(axis,)))
        start = 0
        for tensor in outs:
            t.set_rep(tensor, Rep(rep.dims, rep.labels.narrow(axis, start, tensor.shape[dim])))
            start += tensor.shape[dim]
        return
    if op not in ("chunk", "split") or len(sizes) != 1:
        return t.give_up(call, "splits them into pieces of fixed sizes")
    pieces = rep.labels.split(sizes.pop(), axis)
    for tensor, labels in zip(outs, pieces, strict=False):
        t.couple(labels, pieces[0])  # equal pieces must lose the same channels
        t.set_rep(tensor, Rep(rep.dims, labels))
    if op == "split":  # the code gave the piece size: export checks it still fits
        t.size_guess(rep.labels.flatten())
