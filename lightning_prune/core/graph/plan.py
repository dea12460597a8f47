"""Planning: from a channel graph and masks to what each layer keeps, folds and reports.

:func:`plan` is a function of the graph (which carries the user's overrides), the masks and the
masked model; it changes none of them, so planning twice gives the same plan.

>>> import torch
>>> from torch import nn
>>> from lightning_prune import ChannelGraph, apply_masks
>>> masks = {"0": torch.arange(8) < 3}
>>> masked = apply_masks(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)), masks)
>>> graph = ChannelGraph.from_model(masked, torch.randn(1, 3, 8, 8))
>>> plan(graph, masks, masked).kept_channels
{'0': 3, '3': 4}
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import torch
from torch import Tensor, nn

from lightning_prune.core.errors import PrunedToZeroError
from lightning_prune.core.graph.changes import HeadCounts, LayerChange, NormConstants, Note, Plan
from lightning_prune.core.graph.channel_graph import ChannelGraph, initial_keep, reason_code, shared_weight_masks
from lightning_prune.core.graph.masks import Masks
from lightning_prune.core.trace.constants import kernel_sums
from lightning_prune.core.trace.records import Consumer
from lightning_prune.core.weights import Loading

_NORMS = ("layer_norm", "rms_norm")
"""Consumers whose statistics span their channels: a pruned channel is counted, never folded."""


def plan(graph: ChannelGraph, masks: Masks, model: nn.Module, *, round_to: int = 1) -> Plan:
    """Decide which channels go, which stay (and why), and how each layer changes.

    ``model`` is the masked model that was traced (its weights give the bias folds). Every
    channel a mask prunes that the plan keeps gets a note: the notes of action ``"kept"`` for
    a layer add up to the number of its masked channels kept, one note per reason. With
    ``round_to > 1`` every pruned layer keeps a multiple of ``round_to`` output channels (or all
    of them): pruned channels are added back, which is always exact. A grouped conv whose groups
    admit no multiple of ``round_to`` below its full width keeps its grouped-conv count instead.
    """
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"round_to must be an int >= 1; got {round_to!r}.")
    notes: list[Note] = []
    masks = shared_weight_masks(graph, masks, notes)
    reasons = list(graph.reasons)  # the graph's, then the plan's own, in the order first given
    keep, why = initial_keep(graph, masks, reasons, notes)
    calls = Counter(c.module for c in graph.trace.consumers)
    changed = True
    while changed:
        changed = _widen_groups(graph, keep, why, reasons) | _keep_unfoldable(graph, keep, why, reasons, calls)
        changed |= round_to > 1 and _round_up(graph, keep, why, reasons, round_to)
    kept_channels = {}
    for layer, labels in graph.producers.items():
        kept = int(keep[graph.root[labels.numpy()]].sum())
        if kept == 0:
            raise PrunedToZeroError(
                f"Layer '{layer}' would keep none of its {labels.numel()} output channels. "
                "Keep at least one channel in its mask, or drop the mask for this layer."
            )
        kept_channels[layer] = kept
    notes += _kept_notes(graph, masks, keep, why, reasons)
    heads = _heads(graph, keep, notes)
    return Plan(_changes(graph, keep, model, notes), kept_channels, notes, heads)


def _heads(graph: ChannelGraph, keep: np.ndarray, notes: list[Note]) -> dict[str, HeadCounts]:
    """Per attention module whose heads shrink, its counts before and after (a note each)."""
    result = {}
    for module, heads in graph.trace.heads.items():
        # unique labels: key/value heads repeated for their query heads (repeat_kv) count once
        query, key_value = (heads.query.unique(), heads.key_value.unique())
        before = (query.numel(), key_value.numel())
        kept = np.flatnonzero(graph.kept(keep, query))  # unique labels are sorted: the heads in order
        query, key_value = len(kept), int(graph.kept(keep, key_value).sum())
        if (query, key_value) == before:
            continue
        result[module] = HeadCounts(query, key_value, heads.head_dim, *before, kept=tuple(kept.tolist()))
        why = f"{query} of {before[0]} query heads and {key_value} of {before[1]} key/value heads kept"
        notes.append(Note(module, before[0] - query, "removed", why, unit="head(s)"))
    return result


def grouped_conv_rows(graph: ChannelGraph) -> list[tuple[str, np.ndarray]]:
    """The grouped-conv rule, in one place: a grouped conv keeps the same number of channels in each
    of its groups, on its input side and on its output side.

    For each side of each grouped conv: ``(layer, labels)`` with ``labels`` shaped ``(groups,
    channels per group)`` (``-1``: a channel of no producer); every row must keep an equal count.
    :func:`plan` widens the mask to the largest row; :func:`~lightning_prune.group_masks` picks
    the same count in each row so that nothing needs widening.
    """
    return [(layer, labels.numpy().reshape(groups, -1)) for layer, labels, groups in graph.trace.even_groups]


def rounding_step(width: int, round_to: int) -> int:
    """How many units ``width`` channels wide make a multiple of ``round_to`` channels.

    One rule for every unit rounding meets: a plain channel (``width`` 1: ``round_to`` of them), an
    attention head (64 channels: any count) and a grouped conv's ``G`` groups (its per-group count
    steps by ``round_to / gcd(G, round_to)``).

    >>> rounding_step(1, 8), rounding_step(64, 8), rounding_step(12, 8)
    (8, 1, 2)
    """
    return round_to // math.gcd(width, round_to)


def _kept_notes(graph: ChannelGraph, masks: Masks, keep: np.ndarray, why: np.ndarray, reasons: list[str]) -> list[Note]:
    """One note per (layer, reason) for the channels a layer's mask prunes that are kept."""
    notes = []
    for layer, layer_keep in masks.items():
        labels = graph.producers.get(layer)
        if labels is None:
            continue
        roots = graph.root[labels.numpy()]
        against = ~layer_keep.numpy() & keep[roots]
        for code, count in sorted(Counter(why[roots[against]].tolist()).items()):
            reason = reasons[code] if code >= 0 else "kept by the plan without a recorded reason"
            notes.append(Note(layer, count, "kept", reason))
    return notes


def _pruned_inputs(
    graph: ChannelGraph, keep: np.ndarray, consumer: Consumer
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A consumer's pruned input positions, those among them not exactly zero (NaN, not constant,
    counts as live), and the traced constants."""
    pruned = ~graph.kept(keep, consumer.labels)
    values = consumer.constants.numpy()
    return pruned, pruned & (values != 0), values


def _keep_groups(
    graph: ChannelGraph, keep: np.ndarray, why: np.ndarray, reasons: list[str], labels: np.ndarray, reason: str
) -> None:
    roots = graph.root[labels[labels >= 0]]
    fresh = roots[~keep[roots]]
    keep[fresh] = True
    why[fresh] = reason_code(reasons, reason)


def _widen_groups(graph: ChannelGraph, keep: np.ndarray, why: np.ndarray, reasons: list[str]) -> bool:
    """A grouped conv needs the same number of channels kept in every group: widen to the largest."""
    changed = False
    for layer, rows in grouped_conv_rows(graph):
        kept = graph.kept(keep, rows)
        counts = kept.sum(axis=1)
        if counts.min() == counts.max():
            continue
        groups, per_group = kept.shape
        extra = [np.flatnonzero(~kept[g])[: int(counts.max() - counts[g])] + g * per_group for g in range(groups)]
        reason = f"'{layer}' is a grouped conv whose {groups} groups must keep equal channel counts (mask widened)"
        _keep_groups(graph, keep, why, reasons, rows.ravel()[np.concatenate(extra)], reason)
        changed = True
    return changed


def _round_up(graph: ChannelGraph, keep: np.ndarray, why: np.ndarray, reasons: list[str], round_to: int) -> bool:
    """Add pruned channels back (lowest index first) until each layer keeps a multiple of ``round_to``.

    A layer whose channels a grouped conv splits into ``G`` groups of ``per`` channels, where no
    multiple of ``lcm(G, round_to)`` lies below ``G * per`` (RegNet's 13 groups of 8 with
    ``round_to=8``), keeps the grouped-conv rule's count, as :func:`~lightning_prune.group_masks`
    leaves it: rounding it up could only keep the whole layer."""
    exempt: set[int] = set()
    for _, rows in grouped_conv_rows(graph):
        groups, per = rows.shape
        if rounding_step(groups, round_to) >= per:
            exempt.update(graph.root[rows[rows >= 0]].tolist())
    changed = False
    for layer, labels in graph.producers.items():
        labels = labels.numpy()
        kept = keep[graph.root[labels]]
        missing = -int(kept.sum()) % round_to
        if kept.all() or missing == 0 or not exempt.isdisjoint(graph.root[labels].tolist()):
            continue
        reason = f"'{layer}' keeps a multiple of {round_to} channels (round_to={round_to})"
        _keep_groups(graph, keep, why, reasons, labels[~kept][:missing], reason)
        changed = True
    return changed


def _keep_unfoldable(
    graph: ChannelGraph, keep: np.ndarray, why: np.ndarray, reasons: list[str], calls: Counter
) -> bool:
    """Keep pruned channels whose constant value a consumer cannot absorb exactly."""
    changed = False
    for consumer in graph.trace.consumers:
        pruned, live, values = _pruned_inputs(graph, keep, consumer)
        if not live.any():
            continue
        tainted = graph.tainted[graph.root[consumer.labels.numpy()[live]]].any()
        reason = _why_not_absorbed(consumer, values[live], tainted, calls)
        if reason is None:
            continue
        labels = consumer.labels.numpy()[live]
        _keep_groups(graph, keep, why, reasons, labels, f"they reach '{consumer.module}' {reason}")
        changed = True
    return changed


def _changes(graph: ChannelGraph, keep: np.ndarray, model: nn.Module, notes: list[Note]) -> dict[str, LayerChange]:
    changes: dict[str, LayerChange] = defaultdict(LayerChange)
    for axis in graph.axes:
        kept = graph.kept(keep, axis.labels)
        if kept.all():
            continue
        if not kept.any():
            raise PrunedToZeroError(
                f"Layer '{axis.module}' would keep none of the {kept.size} channels of its '{axis.param}' "
                f"(dim {axis.dim}). Keep at least one channel in the masks of the layers feeding it."
            )
        changes[axis.module].keep[(axis.param, axis.dim)] = (torch.from_numpy(np.flatnonzero(kept)), axis.groups)
        changes[axis.module].original_sizes[(axis.param, axis.dim)] = kept.size // axis.groups
    for (module, param), (owner, owner_param) in graph.trace.shared.items():  # sliced as the tensor's first name
        source = changes.get(owner, LayerChange())
        for (name, dim), value in source.keep.items():
            if name == owner_param:
                changes[module].keep[(param, dim)] = value
                changes[module].original_sizes[(param, dim)] = source.original_sizes[(name, dim)]
    for consumer in graph.trace.consumers:
        pruned, live, values = _pruned_inputs(graph, keep, consumer)
        if not (live.any() or (pruned.any() and consumer.kind in _NORMS)):
            continue
        constants = torch.from_numpy(np.where(live, values, 0.0))
        if consumer.kind == "rms_norm":  # its constants are the squares whose mean the norm takes
            changes[consumer.module].norm = NormConstants(
                len(values), int(pruned.sum()), 0.0, float(constants.sum()), kind="rms_norm"
            )
            why_counted = "RMS norm statistics span the pruned channels; the exported norm's eps and scale keep them"
            notes.append(Note(consumer.module, int(pruned.sum()), "counted in the norm", why_counted))
        elif consumer.kind == "layer_norm":
            changes[consumer.module].channel_dim = graph.trace.norm_channel_dim.get(consumer.module, -1)
            changes[consumer.module].norm = NormConstants(
                channels=len(values),
                pruned=int(pruned.sum()),
                sum=float(constants.sum()),
                sum_sq=float((constants**2).sum()),
            )
            why_counted = "LayerNorm statistics span the pruned channels; the exported norm keeps the original divisor"
            notes.append(Note(consumer.module, int(pruned.sum()), "counted in the norm", why_counted))
        else:
            weight, zero_rows = _fold_weight(model, consumer.module)
            weight = weight.t() if consumer.kind == "addmm" else weight  # Conv1D stores it (in, out)
            delta = _fold(consumer, weight, constants)
            if zero_rows is not None:  # rows the masked layer holds at zero: a kept one (round_to) stays zero
                delta[zero_rows.to(delta.device)] = 0
            changes[consumer.module].bias_delta = delta
            why_folded = "pruned channels carry a constant (BN shift, bias or f(0) != 0)"
            notes.append(Note(consumer.module, int(live.sum()), "folded into bias", why_folded))
    return dict(changes)


def _why_not_absorbed(consumer: Consumer, values: np.ndarray, tainted: bool, calls: Counter) -> str | None:
    """Why pruned channels that reach ``consumer`` nonzero cannot go, or None where a fold is exact."""
    if np.isnan(values).any():
        return "not constant (zero padding, pooling or data in between), so they cannot be dropped or folded"
    if tainted:
        return "scaled by input-dependent values, so their constant cannot be folded"
    if calls[consumer.module] > 1:
        return "carrying a constant, and the layer is called more than once, so it cannot be folded per call"
    if consumer.kind in _NORMS or consumer.foldable:
        return None
    if consumer.kind == "conv_transpose":
        return "carrying a constant, which a transposed conv cannot absorb exactly"
    return "carrying a constant, and the conv zero-pads, so it cannot be folded into the bias exactly"


def _fold_weight(model: nn.Module | Loading, name: str) -> tuple[Tensor, Tensor | None]:
    """Layer ``name``'s weight for a bias fold: the masked model's, or, where the source of a :class:`Loading`
    only zeroes the layer's output rows (``output_cut``), its own and those rows (no zeroed copy is made)."""
    if isinstance(model, Loading) and (zero_rows := model.source.output_cut(name)) is not None:
        return model.model.get_submodule(name).weight.detach(), zero_rows
    return model.get_submodule(name).weight.detach(), None


def _fold(consumer: Consumer, weight: Tensor, constants: Tensor) -> Tensor:
    """The bias change that accounts for constant input channels removed from a conv or linear."""
    live = constants.nonzero().flatten()
    rows, cols = weight.shape[:2]  # (out, in / groups, *kernel)
    groups = consumer.groups if consumer.kind == "conv" else 1
    columns = kernel_sums(weight, live % cols)  # only the columns that fold
    values = constants[live].to(weight.device, torch.float64)
    if groups == 1:
        return (columns @ values).to(weight.dtype)
    row_group = torch.arange(rows, device=weight.device) // (rows // groups)
    same_group = row_group[:, None] == (live // cols).to(weight.device)[None, :]  # a row reads its group's columns
    return (columns * values * same_group).sum(1).to(weight.dtype)


__all__ = ["grouped_conv_rows", "plan", "rounding_step"]
