"""Rules for fresh tensors and writes: factories, fills, ``setitem``, ``copy_``, ``index_put_``.

Assignment moves labels too: a cost volume built as ``cost = f.new_empty(...).fill_(0.)`` then
``cost[:, :c, i, :, i:] = torch.abs(a - b)`` per disparity gets ``f``'s channels on its channel
dim, so the 3D convs that read it shrink with the features (see :func:`write_into`).

Each rule is ``rule(tracer, call) -> None``; see :mod:`lightning_prune.core.trace.op_rules`. The tracer runs
these on every call, labelled or not, since a fresh tensor carries no labels until written.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_prune.core.trace.records import Rep, leaves, region, storage_key

if TYPE_CHECKING:
    from lightning_prune.core.trace.bookkeeping import Bookkeeping
    from lightning_prune.core.trace.records import OpCall


def factory(t: Bookkeeping, call: OpCall) -> None:
    """Ops that read only a tensor's metadata. A ``*_like`` result has its input's shape, so its
    positions follow the input's channels (values: a constant or noise). A sized factory
    (``new_empty(b, c, ...)``, ``torch.zeros(x.shape)``) is *fresh*: a constant whose size the
    model's code computes; what is written into it gives it channels (see :func:`write_into`)."""
    out = call.out
    if not isinstance(out, Tensor):
        return
    if call.op.endswith("_like"):
        source = call.args[0] if call.args else call.kwargs.get("input")
        rep = t.rep(source) if isinstance(source, Tensor) else None
        t.set_rep(out, Rep(rep.dims, rep.labels) if rep is not None else None)
        if rep is None and (origin := t.parameter_origin(source)) is not None:  # sized as the parameter is
            t.derived[id(out)] = (out, *origin)
        return
    t.set_rep(out, None)
    if out.numel() and (key := storage_key(out)) is not None:
        t.fresh[key] = (out, None)


def fill(t: Bookkeeping, call: OpCall) -> None:
    """In-place constant fill (``fill_``, ``zero_``): positions keep their channels, values are
    constants; ``torch.fill(x, v)`` is a new constant of ``x``'s shape."""
    args, out = call.args, call.out
    if not call.name.endswith("_"):  # torch.fill(x, v): a new constant of x's shape
        if isinstance(out, Tensor):
            rep = t.rep(args[0])
            t.set_rep(out, Rep(rep.dims, rep.labels) if rep is not None else None)
        return
    value = call.arg(1, "value", 0.0) if call.op == "fill" else 0.0
    write_into(t, args[0], None, value, call.op, put=False)


def write(t: Bookkeeping, call: OpCall) -> None:
    """Assignment (``dst[index] = src``, ``dst.copy_(src)``, ``index_put``): see :func:`write_into`."""
    op, args, out = call.op, call.args, call.out
    put = op == "index_put"
    if op == "setitem":
        dst, index, src = args[0], args[1], args[2]
    elif op == "copy":
        dst, index, src = args[0], None, call.arg(1, "src")
    else:
        dst, index, src = args[0], tuple(call.arg(1, "indices")), call.arg(2, "values")
    if put and not call.name.endswith("_"):  # out-of-place index_put: a new tensor like dst
        if not isinstance(out, Tensor):
            return
        rep = t.rep(dst)
        t.set_rep(out, Rep(rep.dims, rep.labels) if rep is not None else None)
        dst = out
    write_into(t, dst, index, src, op, put)


def write_into(t: Bookkeeping, dst: Any, index: Any, src: Any, op: str, put: bool) -> None:
    """Write ``src`` into ``dst`` (``dst[index] = src``, ``dst.copy_(src)``, ``dst.fill_(v)``,
    ``dst.index_put_(index, src)``) and update the labels of every tensor on that memory.

    Labels are followed through a copy of the memory: each element has a label (a channel),
    ``-1`` (a value that belongs to no channel: its position always exists) or is *fresh* (a
    constant a factory put there; its position exists as the model's code sizes it). Written
    data takes a fresh position over; over a labelled position it couples the two labels (the
    position exists as the old channel says, and now carries the new one); a label meeting
    ``-1`` is blocked; a constant written anywhere changes no label. Each tensor's labels are
    then projected on its channel dims (its own, and the dims the source's channels land on):
    channels met at one position there are coupled, fresh positions go with their channel
    (they stay constant). Export checks by running the exported model that the code sizes
    the written tensor as the channels say, and keeps them otherwise.
    """
    if not isinstance(dst, Tensor) or dst.numel() == 0:
        return
    what = f"op '{op}'"
    src_rep = t.rep(src) if isinstance(src, Tensor) else None
    for tensor in leaves(index):
        if isinstance(tensor, Tensor) and (rep := t.rep(tensor)) is not None:
            whole = tensor.dtype == torch.bool and tensor.shape == dst.shape and (index is tensor or index == (tensor,))
            if whole:  # x[x < 0] = 0: the mask's positions are dst's, channel for channel
                why = f"{what} masks a tensor whose positions carry no channel with them"
                t.couple(t.full_labels(tensor), t.full_labels(dst), why)
            else:
                t.block(rep.labels, f"{what} uses them as an index")
    key = storage_key(dst)
    base = dst._base
    if src_rep is None and key not in t.fresh and t.rep(dst) is None and (base is None or t.rep(base) is None):
        return  # nothing with channels is written or overwritten
    aliases = _aliases(t, dst, key)
    if (
        key is None
        or any(a.layout != torch.strided or a.element_size() != dst.element_size() for a in aliases)
        or (isinstance(src, Tensor) and src.layout != torch.strided)
    ):
        for tensor in aliases + ([src] if isinstance(src, Tensor) else []):
            if (rep := t.rep(tensor)) is not None:
                t.block(rep.labels, f"{what} writes memory the tracer cannot follow")
        for tensor in aliases:
            t.set_rep(tensor, None)
        t.fresh.pop(key, None)
        return
    n = dst.untyped_storage().nbytes() // dst.element_size()
    entry = t.fresh.get(key)
    labels, fresh = _memory(t, aliases, n, entry, what)
    src_labels, src_fresh = _source(t, src)
    cpu_index = (
        tuple(i.cpu() if isinstance(i, Tensor) else i for i in index)
        if isinstance(index, tuple)
        else (index.cpu() if isinstance(index, Tensor) else index)
    )

    def write_(flat: Tensor, value: Tensor) -> None:
        view = region(flat, dst)
        if index is None:
            view.copy_(value)
        elif put:
            value = value.to(flat.dtype)
            view.index_put_(cpu_index, value.expand_as(view[cpu_index]) if value.ndim == 0 else value)
        else:
            view[cpu_index] = value

    written = torch.zeros(n, dtype=torch.bool)
    write_(written, torch.tensor(True))
    new_labels = torch.full((n,), -1, dtype=torch.long)
    write_(new_labels, src_labels)
    new_fresh = torch.zeros(n, dtype=torch.bool)
    write_(new_fresh, src_fresh)
    if index is not None and src_rep is not None:  # an index list or tensor may repeat a position
        selection = tuple(slice(None) if i is None else i for i in cpu_index) if put else cpu_index
        if int(written.sum()) < region(labels, dst)[selection].numel():
            t.block(src_rep.labels, f"{what} writes several of them to one position")
    old, old_fresh = labels[written], fresh[written]
    new, constant = new_labels[written], new_fresh[written]
    takes = ~constant & old_fresh  # data written over a fresh position
    meets = ~constant & ~old_fresh  # data written over a position that exists as a channel or always
    both = meets & (old >= 0) & (new >= 0)
    t.trace.edges.append((old[both], new[both]))
    lost = meets & ((old >= 0) ^ (new >= 0))
    if bool(lost.any()):
        t.block(
            torch.where(old >= 0, old, new)[lost],
            f"{what} writes values that belong to no prunable channel over them, or them over such values",
        )
    labels[written] = torch.where(takes, new, old)
    fresh[written] = old_fresh & constant
    probes = []  # where each channel dim of the source lands in memory
    if src_rep is not None:
        for d in src_rep.dims:
            shape = [1] * src.ndim
            shape[d] = src.shape[d]
            probe = torch.full((n,), -1, dtype=torch.long)
            write_(probe, torch.arange(src.shape[d]).reshape(shape).expand(tuple(src.shape)))
            probes.append(probe)
    for tensor in aliases:
        rep = t.rep(tensor)
        dims = set(rep.dims) if rep is not None else set()
        for probe in probes:
            dims |= _varying_dims(region(probe, tensor))
        new_rep = _project(t, region(labels, tensor), region(fresh, tensor), sorted(dims), what)
        t.set_rep(tensor, new_rep)
        if new_rep is not None and tensor is dst and (src_rep is not None or index is not None):
            # the code must size the tensor so, and its index must mean the same positions
            t.size_guess(new_rep.labels.flatten())
    if bool(fresh.any()):
        t.fresh[key] = (entry[0] if entry is not None else dst, fresh)
    else:
        t.fresh.pop(key, None)


def _memory(t: Bookkeeping, aliases: list[Tensor], n: int, entry: Any, what: str) -> tuple[Tensor, Tensor]:
    """Per element of the ``n``-element memory: its label as the labelled views see it, and whether
    it is fresh. Views that label one element differently are coupled or blocked."""
    labels = torch.full((n,), -1, dtype=torch.long)
    fresh = torch.zeros(n, dtype=torch.bool)
    if entry is not None:
        fresh = torch.ones(n, dtype=torch.bool) if entry[1] is None else entry[1].clone()
    seeded = False
    for tensor in sorted(aliases, key=lambda a: -a.numel()):  # the memory as the labelled views see it
        rep = t.rep(tensor)
        if rep is None or any(s == 0 and n_ > 1 for s, n_ in zip(tensor.stride(), tensor.shape, strict=False)):
            continue
        view = region(labels, tensor)
        full, current = t.full_labels(tensor), view.clone()
        both = (current >= 0) & (full >= 0)
        t.trace.edges.append((current[both], full[both]))
        claim = (full >= 0) & (current < 0) & ~region(fresh, tensor)
        if seeded and bool(claim.any()):
            t.block(full[claim], f"{what} writes memory that two views label differently")
        seeded = True
        stale = (current >= 0) & (full < 0)
        if bool(stale.any()):
            t.block(current[stale], f"{what} writes memory that two views label differently")
        view.copy_(torch.where(full >= 0, full, current))
    fresh &= labels < 0
    return labels, fresh


def _aliases(t: Bookkeeping, dst: Tensor, key: Any) -> list[Tensor]:
    """``dst``, the tensor it is a view of, and every labelled tensor on the same memory."""
    found = {id(dst): dst}
    if dst._base is not None:
        found.setdefault(id(dst._base), dst._base)
    if key in t.fresh:
        found.setdefault(id(t.fresh[key][0]), t.fresh[key][0])
    for tensor in t.labelled_tensors():
        if id(tensor) not in found and storage_key(tensor) == key:
            found[id(tensor)] = tensor
    return list(found.values())


def _source(t: Bookkeeping, src: Any) -> tuple[Tensor, Tensor]:
    """Labels and fresh-mask of what is written: a number is a constant (fresh everywhere)."""
    if not isinstance(src, Tensor):
        return torch.tensor(-1), torch.tensor(True)
    entry = t.fresh.get(storage_key(src))
    if entry is None:
        fresh = torch.tensor(False)
    else:
        fresh = torch.tensor(True) if entry[1] is None else region(entry[1], src).clone()
    return t.full_labels(src), fresh


def _project(t: Bookkeeping, labels: Tensor, fresh: Tensor, dims: list[int], what: str) -> Rep | None:
    """The :class:`Rep` of a written tensor on ``dims``: per index there, the labels of its
    non-fresh elements are coupled (or blocked if some element belongs to no channel)."""
    if labels.numel() == 0:
        return None
    other = [d for d in range(labels.ndim) if d not in dims]
    sizes = [labels.shape[d] for d in dims]
    rows = math.prod(sizes)
    values = labels.permute(dims + other).reshape(rows, -1)
    live = ~fresh.permute(dims + other).reshape(rows, -1)
    top = torch.where(live, values, torch.full_like(values, -2)).amax(1)
    low = torch.where(live, values, torch.full_like(values, torch.iinfo(torch.long).max)).amin(1)
    fixed = (live & (values < 0)).any(1)
    mixed = fixed & (top >= 0)
    if bool(mixed.any()):
        chosen = values[mixed]
        t.block(
            chosen[live[mixed] & (chosen >= 0)],
            f"{what} leaves them at a channel position that also holds values of no prunable channel",
        )
    several = ~fixed & (top >= 0) & (low != top)
    if bool(several.any()):
        chosen, keep = values[several], live[several]
        t.trace.edges.append((chosen[keep], top[several].unsqueeze(1).expand_as(chosen)[keep]))
    result = torch.where(fixed | (top < 0), torch.full_like(top, -1), top)
    if not bool((result >= 0).any()):
        return None
    return Rep(tuple(dims), result.reshape(sizes))


def _varying_dims(probe: Tensor) -> set[int]:
    """Dims along which the written (>= 0) entries of ``probe`` take more than one value."""
    written = probe >= 0
    dims = set()
    for d in range(probe.ndim):
        if probe.shape[d] < 2:
            continue
        high = torch.where(written, probe, torch.full_like(probe, -1)).amax(d)
        low = torch.where(written, probe, torch.full_like(probe, torch.iinfo(torch.long).max)).amin(d)
        if bool((written.any(d) & (high > low)).any()):
            dims.add(d)
    return dims
