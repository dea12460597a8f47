"""The traced channel graph: coupled groups of channels, and which of them must be kept.

A :class:`ChannelGraph` is built once from a :class:`~lightning_prune.core.trace.records.ChannelTrace` and the
overrides that restrict it (labels to keep, each with the reason the notes report: a user's
``inplace_dict``, a size guess export found wrong), and never changes afterwards. A further
restriction gives a new graph (:meth:`ChannelGraph.with_blocked`); planning
(:func:`lightning_prune.core.graph.plan.plan`) only reads it.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> graph = ChannelGraph.from_model(model, torch.randn(1, 3, 8, 8))
>>> len(graph.groups), len(graph.with_blocked([(graph.producers["0"][:2], "kept by hand")]).groups)
(8, 6)
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_prune.core.graph.changes import Note
from lightning_prune.core.graph.masks import Masks
from lightning_prune.core.trace.records import ChannelTrace, ParamAxis, components
from lightning_prune.core.trace.tracer import trace_channels

Override = tuple[Tensor | np.ndarray, str]
"""Labels to keep whatever the masks say, and why (the reason the export notes give)."""


class ChannelGraph:
    """Channels of a traced model, grouped into coupled groups that share one keep decision.

    Immutable: its attributes cannot be set and its arrays are read-only; :meth:`with_blocked`
    returns a new graph. Per label: ``root`` (the smallest label of its group), ``owner``
    (an index into ``owner_names``: the producer, ``None`` for the network input) and
    ``owner_channel``. Per group root: ``blocked`` (must be kept), ``block_reason`` (an index
    into ``reasons``, the first reason given) and ``tainted`` (scaled by input-dependent values).
    """

    trace: ChannelTrace
    overrides: tuple[Override, ...]
    axes: tuple[ParamAxis, ...]
    root: np.ndarray
    owner: np.ndarray
    owner_channel: np.ndarray
    owner_names: tuple[str | None, ...]
    blocked: np.ndarray
    block_reason: np.ndarray
    reasons: tuple[str, ...]
    tainted: np.ndarray

    def __init__(self, trace: ChannelTrace, overrides: Iterable[Override] = ()) -> None:
        overrides = tuple(overrides)
        edges = list(trace.edges)
        by_param: dict[tuple[str, str, int], list[ParamAxis]] = defaultdict(list)
        for axis in trace.axes:
            by_param[(axis.module, axis.param, axis.dim)].append(axis)
        axes = []
        extra_blocked: list[Override] = []
        for calls in by_param.values():  # a reused layer: every call slices the same weights
            for other in calls[1:]:
                if other.labels.shape == calls[0].labels.shape:
                    edges.append((calls[0].labels, other.labels))
                else:
                    why = f"'{other.module}' is called on different numbers of channels"
                    extra_blocked += [(calls[0].labels, why), (other.labels, why)]
            axes.append(calls[0])
        root = components(trace.num_labels, edges)
        owner = np.full(trace.num_labels, -1, dtype=np.int64)
        owner_channel = np.zeros(trace.num_labels, dtype=np.int64)
        owner_names: list[str | None] = []
        for index, (name, start, count) in enumerate(trace.label_owner):
            owner[start : start + count] = index
            owner_channel[start : start + count] = np.arange(count)
            owner_names.append(name)
        fields = {
            "trace": trace,
            "overrides": (),
            "axes": tuple(axes),
            "root": root,
            "owner": owner,
            "owner_channel": owner_channel,
            "owner_names": tuple(owner_names),
            "blocked": np.zeros(trace.num_labels, dtype=bool),
            "block_reason": np.full(trace.num_labels, -1, dtype=np.int64),
            "reasons": (),
            "tainted": _root_flags(root, trace.tainted),
        }
        self.__dict__.update(fields)
        self._block(list(trace.blocked) + extra_blocked)
        self._block(overrides, record=True)

    @classmethod
    def from_model(cls, model: nn.Module, example_input: Any, overrides: Iterable[Override] = ()) -> ChannelGraph:
        """Trace ``model`` on ``example_input`` and build its graph, restricted by ``overrides``."""
        return cls(trace_channels(model, example_input), overrides)

    def with_blocked(self, overrides: Iterable[Override]) -> ChannelGraph:
        """A new graph that also keeps the groups of each override's labels (this one is unchanged);
        the first reason given for a group is the one its notes report."""
        graph = copy.copy(self)
        graph.__dict__.update(blocked=self.blocked.copy(), block_reason=self.block_reason.copy())
        graph._block(tuple(overrides), record=True)
        return graph

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ChannelGraph is immutable (setting {name!r}); use with_blocked() for a restricted graph")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"ChannelGraph is immutable (deleting {name!r})")

    def _block(self, overrides: tuple[Override, ...] | list[Override], record: bool = False) -> None:
        """Construction only: mark the groups of ``overrides`` blocked, then freeze the arrays."""
        blocked, block_reason, reasons = self.blocked, self.block_reason, list(self.reasons)  # fresh arrays
        for labels, reason in overrides:
            labels = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
            labels = labels.ravel()
            roots = self.root[labels[labels >= 0]]
            if not roots.size:
                continue
            if reason not in reasons:
                reasons.append(reason)
            blocked[roots] = True
            fresh = roots[block_reason[roots] < 0]
            block_reason[fresh] = reasons.index(reason)
        self.__dict__["reasons"] = tuple(reasons)
        if record:
            self.__dict__["overrides"] = self.overrides + tuple(overrides)
        for array in (self.root, self.owner, self.owner_channel, blocked, block_reason, self.tainted):
            array.flags.writeable = False

    # ------------------------------------------------------------- groups
    @property
    def groups(self) -> list[list[tuple[str, int]]]:
        """Coupled groups of producer channels ``(layer, channel)`` that can be pruned (not blocked).

        Every member of a group is kept or pruned together; a group-consistent mask prunes
        whole groups, so nothing is lost to the union at export.
        """
        return list(self.group_members().values())

    def group_members(self) -> dict[int, list[tuple[str, int]]]:
        """:attr:`groups` keyed by each group's root label (what ``self.root`` maps a label to)."""
        members: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for label in range(self.trace.num_labels):
            name = self.owner_names[self.owner[label]]
            root = int(self.root[label])
            if name is not None and not self.blocked[root]:
                members[root].append((name, int(self.owner_channel[label])))
        return dict(members)

    @property
    def producers(self) -> Mapping[str, Tensor]:
        """Layer -> labels of its output channels, for every traced conv/linear layer."""
        return MappingProxyType(self.trace.producers)

    def kept(self, keep: np.ndarray, labels: Tensor | np.ndarray) -> np.ndarray:
        """Per label (any shape), whether its group is kept under ``keep`` (a flag per group root);
        a ``-1`` label (a channel of no producer) is always kept."""
        labels = labels.numpy() if isinstance(labels, Tensor) else labels
        return np.where(labels >= 0, keep[self.root[np.maximum(labels, 0)]], True)

    def channel_parameter_keep(self, masks: Masks, model: nn.Module) -> dict[tuple[str, str, int], Tensor]:
        """``(module, parameter, dim) -> bool keep-vector`` for every parameter, other than a conv or
        linear layer's own, that is sliced with channels the masks prune: the affine parameters of
        the norms they feed, a position embedding added to them, a class token joined to them, a
        per-head table.

        Zeroing these with the filters holds the whole channel at zero, so a pruned channel
        leaves no constant behind (what masked fine-tuning does).
        """
        keep, _ = initial_keep(self, masks)
        result = {}
        for axis in self.axes:
            if axis.module in self.trace.producers:
                continue
            if model.get_submodule(axis.module)._parameters.get(axis.param) is None:
                continue  # buffers (running statistics) are not the channel's value
            kept = self.kept(keep, axis.labels)
            if not kept.all():
                result[(axis.module, axis.param, axis.dim)] = torch.from_numpy(kept)
        return result


def initial_keep(
    graph: ChannelGraph, masks: Masks, reasons: list[str] | None = None, notes: list[Note] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per group root: kept unless every member's mask prunes it and nothing blocks it; and why (an
    index into ``reasons``, which starts as the graph's and grows; ``-1`` where nothing keeps it)."""
    reasons = list(graph.reasons) if reasons is None else reasons
    masks = shared_weight_masks(graph, masks)
    trace = graph.trace
    keep = np.zeros(trace.num_labels, dtype=bool)
    prune_vote = np.zeros(trace.num_labels, dtype=bool)
    for layer in trace.followers - set(masks):  # an unmasked depthwise conv follows its input
        prune_vote[trace.producers[layer].numpy()] = True
    for layer, layer_keep in masks.items():
        labels = trace.producers.get(layer)
        if labels is None:
            if notes is not None and not bool(layer_keep.all()):
                why_kept = "the layer did not run as a conv/linear in the traced forward"
                notes.append(Note(layer, int((~layer_keep).sum()), "kept", why_kept))
            continue
        prune_vote[labels.numpy()[~layer_keep.numpy()]] = True
    why = np.where(graph.blocked, graph.block_reason, -1)
    voters = np.flatnonzero(~prune_vote)  # labels whose owner keeps them: their groups keep the union
    roots, first = np.unique(graph.root[voters], return_index=True)
    keep[roots] = True
    open_groups = why[roots] < 0
    owners = graph.owner[voters[first[open_groups]]]
    for owner in sorted(set(owners.tolist())):  # one reason per layer whose vote keeps a group
        name = graph.owner_names[owner]
        if name in masks:
            reason = f"coupled with '{name}', whose mask keeps them (a coupled group keeps the union of its masks)"
        else:
            reason = f"coupled with '{name}', which has no mask (a coupled group keeps the union of its masks)"
        why[roots[open_groups][owners == owner]] = reason_code(reasons, reason)
    return keep | graph.blocked, why


def shared_weight_masks(graph: ChannelGraph, masks: Masks, notes: list[Note] | None = None) -> Masks:
    """``masks`` with those of layers sharing one weight (``b.weight = a.weight``) made one decision,
    under the name the trace gives the weight: the union of what they keep, as a coupled group
    keeps. With ``notes``, one per layer whose own mask prunes channels the union keeps."""

    def owner_of(layer: str, keep: Tensor) -> str:
        owner = graph.trace.shared.get((layer, "weight"), (layer,))[0]
        produced = graph.trace.producers.get(owner)  # a weight shared in another role (a tied output
        # embedding's vocabulary rows) shares none of its channels
        return owner if produced is None or produced.numel() == keep.numel() else layer

    owners = {layer: owner_of(layer, keep) for layer, keep in masks.items()}
    if all(owner == layer for layer, owner in owners.items()):
        return masks
    merged: Masks = {}
    for layer, keep in masks.items():
        owner = owners[layer]
        merged[owner] = merged[owner] | keep if owner in merged else keep
    for layer, keep in masks.items():
        kept = int((merged[owners[layer]] & ~keep).sum())
        sharers = sorted(other for other, owner in owners.items() if owner == owners[layer] and other != layer)
        if notes is not None and kept:
            why = f"it shares its weight with {sharers}, whose masks keep them; layers sharing a weight keep the union"
            notes.append(Note(layer, kept, "kept", why))
    return merged


def reason_code(reasons: list[str], reason: str) -> int:
    """The index of ``reason`` in ``reasons``, appended if new (notes and blocks refer to reasons by index)."""
    try:
        return reasons.index(reason)
    except ValueError:
        reasons.append(reason)
        return len(reasons) - 1


def _root_flags(root: np.ndarray, label_sets: list[Tensor]) -> np.ndarray:
    flags = np.zeros(len(root), dtype=bool)
    for labels in label_sets:
        labels = labels.numpy().ravel()
        flags[root[labels[labels >= 0]]] = True
    return flags


__all__ = ["ChannelGraph", "Override", "initial_keep", "reason_code", "shared_weight_masks"]
