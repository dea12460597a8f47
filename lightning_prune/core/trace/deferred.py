"""What the tracer decides once the pass is over: the views and blocks it deferred until the attention ops had
named the heads (a split of channels that belongs to heads is not coupled across them)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_prune.core.trace.bookkeeping import Bookkeeping
from lightning_prune.core.trace.records import components


def resolve_deferred(t: Bookkeeping) -> None:
    """Decide what the pass's :class:`~lightning_prune.core.trace.records.Deferred` items left open, now that
    the attention ops have named the heads.

    A split whose labels all belong to heads is not coupled across heads (the heads dim is the
    one that shrinks, and export updates the module's head count); any other split gets
    :func:`movement`'s guess. Then a ``"within"`` or ``"fixed_part"`` block is dropped where
    it only concerns positions inside whole heads (or, for a per-head parameter, where each
    index along its axis is a whole head: it is sliced with them), and applied otherwise.
    """
    trace = t.trace
    # a label coupled with a head's channels goes with that head (an interleaved rotary embedding
    # makes its own labels for half of them): in heads by group, before any split is guessed
    before = torch.from_numpy(components(trace.num_labels, trace.edges))
    in_head = torch.zeros(trace.num_labels, dtype=torch.bool)
    for units in trace.head_units:
        in_head[before[units[units >= 0]]] = True

    def all_in_heads(labels: Tensor) -> bool:
        labels = labels[labels >= 0]
        return bool(in_head[before[labels]].all())

    for item in trace.deferred:
        if item.kind == "split" and not all_in_heads(item.labels):
            couple_split(t, item.labels, item.reason)
    root = torch.from_numpy(components(trace.num_labels, trace.edges))
    for item in trace.deferred:
        labels = item.labels
        if item.kind == "within":
            fine = all_in_heads(labels) and all(_constant_along(root, labels, axis) for axis in item.axes)
            if not fine and item.per_head and all_in_heads(labels):  # one value per whole head: sliced
                others = [axis for axis in range(labels.ndim) if axis not in item.axes]
                fine = all(_constant_along(root, labels, axis) for axis in others)
                trace.axes.extend(item.per_head if fine else ())
        elif item.kind == "in_heads":
            fine = all_in_heads(labels)
        elif item.kind == "fixed_part":
            live = labels[labels >= 0]
            fine = all_in_heads(live) and bool(torch.isin(root[live], root[item.survivors]).all())
        else:
            continue
        if not fine:
            t.block(labels, item.reason)


def couple_split(t: Bookkeeping, labels: Tensor, reason: str) -> None:
    """A view spread channels over several dims (``labels`` is at least 2-D): couple them along every
    dim but the one the model's code will shrink, taken to be the largest (the model recomputes one
    factor of the view from the tensor size: ShuffleNet's ``view(b, groups, c // groups, ...)``, a
    stack of a few tensors)."""
    sizes = list(labels.shape)
    shrinking = len(sizes) - 1 - sizes[::-1].index(max(sizes))
    for axis in range(labels.ndim):
        if axis != shrinking:
            t.couple(labels, labels.narrow(axis, 0, 1).expand_as(labels), reason)


def _constant_along(root: Tensor, labels: Tensor, axis: int) -> bool:
    """Whether, along ``axis`` of ``labels``, every label lies in one coupled group."""
    groups = root[labels.clamp(min=0)]
    return bool((groups == groups.narrow(axis, 0, 1)).all())


__all__ = ["couple_split", "resolve_deferred"]
