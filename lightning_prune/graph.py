"""The traced channel graph: coupled groups, keep decisions, and the seed's ``inplace_dict``.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> graph = ChannelGraph.from_model(model, torch.randn(1, 3, 8, 8))
>>> graph.infer_inplace_dict()
{'0': (None,), '1': ('0',), '3': ('0',)}
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from lightning_prune.errors import InplaceDictError, PrunedToZeroError
from lightning_prune.masks import Masks, unwrapped_copy
from lightning_prune.trace import ChannelTrace, Consumer, ParamAxis, trace_channels

InplaceDict = dict[str, tuple[Union[str, int, None], ...]]
"""The seed's format: layer -> producers of its input channels, in concat order (``None``: the
network input; an ``int``: that many channels from an unpruned source)."""


@dataclass
class Note:
    """One line of the export report: a layer, how many channels, what was done, and why."""

    layer: str
    channels: int
    action: str
    reason: str

    def __str__(self) -> str:
        return f"{self.layer}: {self.channels} channel(s) {self.action} ({self.reason})"


@dataclass
class NormConstants:
    """What a LayerNorm over channels must still count for channels it no longer sees."""

    channels: int  # the original number of channels (the divisor)
    pruned: int
    sum: float  # sum of the pruned channels' constant values
    sum_sq: float


@dataclass
class LayerChange:
    """How one module changes: parameter slices, a bias correction, norm constants."""

    keep: dict[tuple[str, int], tuple[Tensor, int]] = field(default_factory=dict)  # (param, dim) -> (index, groups)
    original_sizes: dict[tuple[str, int], int] = field(default_factory=dict)  # (param, dim) -> size before
    bias_delta: Optional[Tensor] = None
    norm: Optional[NormConstants] = None
    channel_dim: int = -1  # where a norm's channels are in its module-level input


@dataclass
class Plan:
    """The outcome of :meth:`ChannelGraph.plan`: per-layer changes and the notes behind them."""

    changes: dict[str, LayerChange]
    kept_channels: dict[str, int]  # producer -> output channels kept
    notes: list[Note]


class ChannelGraph:
    """Channels of a traced model, grouped into coupled groups that share one keep decision."""

    def __init__(self, trace: ChannelTrace) -> None:
        self.trace = trace
        edges = list(trace.edges)
        by_param: dict[tuple[str, str, int], list[ParamAxis]] = defaultdict(list)
        for axis in trace.axes:
            by_param[(axis.module, axis.param, axis.dim)].append(axis)
        self.axes: list[ParamAxis] = []
        extra_blocked = []
        for calls in by_param.values():  # a reused layer: every call slices the same weights
            for other in calls[1:]:
                if other.labels.shape == calls[0].labels.shape:
                    edges.append((calls[0].labels, other.labels))
                else:
                    extra_blocked += [calls[0].labels, other.labels]
            self.axes.append(calls[0])
        self.root = _components(trace.num_labels, edges)
        self.owner = np.full(trace.num_labels, -1, dtype=np.int64)
        self.owner_channel = np.zeros(trace.num_labels, dtype=np.int64)
        self.owner_names: list[Optional[str]] = []
        for index, (name, start, count) in enumerate(trace.label_owner):
            self.owner[start : start + count] = index
            self.owner_channel[start : start + count] = np.arange(count)
            self.owner_names.append(name)
        self.blocked = _root_flags(self.root, trace.blocked + extra_blocked)
        self.tainted = _root_flags(self.root, trace.tainted)

    @classmethod
    def from_model(cls, model: nn.Module, example_input: Any) -> ChannelGraph:
        """Trace ``model`` on ``example_input`` and build its graph."""
        return cls(trace_channels(model, example_input))

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
    def producers(self) -> dict[str, Tensor]:
        """Layer -> labels of its output channels, for every traced conv/linear layer."""
        return self.trace.producers

    def keep_reshaped(self) -> None:
        """Keep every channel a view spread over several dims (the fallback when the guess of which
        factor shrinks was wrong)."""
        self.blocked |= _root_flags(self.root, self.trace.reshaped)

    # ----------------------------------------------------------- decisions
    def plan(self, masks: Masks, model: nn.Module) -> Plan:
        """Decide which channels go, which stay (and why), and how each layer changes.

        ``model`` is the masked model that was traced (its weights give the bias folds).
        """
        notes: list[Note] = []
        root = self.root
        keep = self._union_keep(masks, notes)
        calls = Counter(c.module for c in self.trace.consumers)
        changed = True
        while changed:
            changed = self._widen_groups(keep, notes) | self._keep_unfoldable(keep, calls, notes)
        kept_channels = {}
        for layer, labels in self.trace.producers.items():
            kept = int(keep[root[labels.numpy()]].sum())
            if kept == 0:
                raise PrunedToZeroError(
                    f"Layer '{layer}' would keep none of its {labels.numel()} output channels. "
                    "Keep at least one channel in its mask, or drop the mask for this layer."
                )
            kept_channels[layer] = kept
        return Plan(self._changes(keep, model, notes), kept_channels, notes)

    def _union_keep(self, masks: Masks, notes: list[Note]) -> np.ndarray:
        """Per group root: kept unless every member's mask prunes it and nothing blocks it."""
        keep = np.zeros(self.trace.num_labels, dtype=bool)
        prune_vote = np.zeros(self.trace.num_labels, dtype=bool)
        for layer in self.trace.followers - set(masks):  # an unmasked depthwise conv follows its input
            prune_vote[self.trace.producers[layer].numpy()] = True
        for layer, layer_keep in masks.items():
            labels = self.trace.producers.get(layer)
            if labels is None:
                notes.append(Note(layer, int((~layer_keep).sum()), "kept", "the layer did not run as a conv/linear in the traced forward"))
                continue
            prune_vote[labels.numpy()[~layer_keep.numpy()]] = True
        keep[self.root[~prune_vote]] = True
        return keep | self.blocked

    def norm_affine_keep(self, masks: Masks, model: nn.Module) -> dict[tuple[str, str], Tensor]:
        """``(norm layer, "weight" | "bias") -> bool keep-vector`` for the affine parameters of every
        BatchNorm/InstanceNorm/GroupNorm/LayerNorm that pruned channels feed.

        Zeroing these with the filters holds the whole channel at zero, so a pruned channel
        leaves no constant behind (what masked fine-tuning does).
        """
        keep = self._union_keep(masks, [])
        norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        result = {}
        for axis in self.axes:
            module = model.get_submodule(axis.module)
            if isinstance(module, norms) and axis.param in ("weight", "bias"):
                kept = self._kept(keep, axis.labels)
                if not kept.all():
                    result[(axis.module, axis.param)] = torch.from_numpy(kept)
        return result

    def _kept(self, keep: np.ndarray, labels: Tensor) -> np.ndarray:
        labels = labels.numpy()
        return np.where(labels >= 0, keep[self.root[np.maximum(labels, 0)]], True)

    def _pruned_inputs(self, keep: np.ndarray, consumer: Consumer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A consumer's pruned input positions, those among them not exactly zero (NaN, not constant,
        counts as live), and the traced constants."""
        pruned = ~self._kept(keep, consumer.labels)
        values = consumer.constants.numpy()
        return pruned, pruned & (values != 0), values

    def _widen_groups(self, keep: np.ndarray, notes: list[Note]) -> bool:
        """A grouped conv needs the same number of channels kept in every group: widen to the largest."""
        changed = False
        for layer, labels, groups in self.trace.even_groups:
            kept = self._kept(keep, labels).reshape(groups, -1)
            counts = kept.sum(axis=1)
            if counts.min() == counts.max():
                continue
            added = 0
            for g in range(groups):
                missing = int(counts.max() - counts[g])
                extra = np.flatnonzero(~kept[g])[:missing] + g * kept.shape[1]
                keep[self.root[labels.numpy()[extra]]] = True
                added += missing
            notes.append(Note(layer, added, "kept", f"its {groups} groups must keep equal channel counts (mask widened)"))
            changed = True
        return changed

    def _keep_unfoldable(self, keep: np.ndarray, calls: Counter, notes: list[Note]) -> bool:
        """Keep pruned channels whose constant value a consumer cannot absorb exactly."""
        changed = False
        for consumer in self.trace.consumers:
            pruned, live, values = self._pruned_inputs(keep, consumer)
            if not live.any():
                continue
            reason = _why_not_absorbed(consumer, values[live], self.tainted[self.root[consumer.labels.numpy()[live]]].any(), calls)
            if reason is None:
                continue
            keep[self.root[consumer.labels.numpy()[live]]] = True
            notes.append(Note(consumer.module, int(live.sum()), "kept", reason))
            changed = True
        return changed

    def _changes(self, keep: np.ndarray, model: nn.Module, notes: list[Note]) -> dict[str, LayerChange]:
        changes: dict[str, LayerChange] = defaultdict(LayerChange)
        for axis in self.axes:
            kept = self._kept(keep, axis.labels)
            if kept.all():
                continue
            if not kept.any():
                raise PrunedToZeroError(
                    f"Layer '{axis.module}' would keep none of the {kept.size} channels of its '{axis.param}' "
                    f"(dim {axis.dim}). Keep at least one channel in the masks of the layers feeding it."
                )
            changes[axis.module].keep[(axis.param, axis.dim)] = (torch.from_numpy(np.flatnonzero(kept)), axis.groups)
            changes[axis.module].original_sizes[(axis.param, axis.dim)] = kept.size // axis.groups
        for consumer in self.trace.consumers:
            pruned, live, values = self._pruned_inputs(keep, consumer)
            if not (live.any() or (pruned.any() and consumer.kind == "layer_norm")):
                continue
            constants = torch.from_numpy(np.where(live, values, 0.0))
            if consumer.kind == "layer_norm":
                changes[consumer.module].channel_dim = self.trace.norm_channel_dim.get(consumer.module, -1)
                changes[consumer.module].norm = NormConstants(
                    channels=len(values),
                    pruned=int(pruned.sum()),
                    sum=float(constants.sum()),
                    sum_sq=float((constants**2).sum()),
                )
                notes.append(Note(consumer.module, int(pruned.sum()), "counted in the norm", "LayerNorm statistics span the pruned channels; the exported norm keeps the original divisor"))
            else:
                weight = model.get_submodule(consumer.module).weight.detach()
                changes[consumer.module].bias_delta = _fold(consumer, weight, constants)
                notes.append(Note(consumer.module, int(live.sum()), "folded into bias", "pruned channels carry a constant (BN shift, bias or f(0) != 0)"))
        return dict(changes)

    # -------------------------------------------------------- inplace_dict
    def _describe(self, labels: Tensor) -> tuple[Union[str, int, None], ...]:
        """Runs of consecutive positions from one producer; an int for unlabelled positions."""
        entries: list[Union[str, int, None]] = []
        previous: Any = object()
        for label in labels.tolist():
            if label < 0:
                if entries and isinstance(entries[-1], int) and previous == -1:
                    entries[-1] += 1
                else:
                    entries.append(1)
                previous = -1
                continue
            name = self.owner_names[self.owner[label]]
            if name != previous:
                entries.append(name)
            previous = name
        return tuple(entries)

    def infer_inplace_dict(self) -> InplaceDict:
        """The seed's ``inplace_dict`` for every traced layer with input channels, in forward order."""
        return {layer: self._describe(labels) for layer, labels in self.trace.layer_inputs.items()}

    def apply_inplace_dict(self, inplace_dict: InplaceDict, model: nn.Module) -> None:
        """Check a user-written ``inplace_dict`` against the graph and restrict pruning to its keys.

        Layers of a kind the dict can name (conv, norm, linear) but absent from its keys keep
        their shape, as in the seed's workflow; an ``int`` entry marks channels the user wants
        left unpruned. Raises :class:`InplaceDictError` naming the key on any disagreement.
        """
        layers = dict(model.named_modules())
        for key, value in inplace_dict.items():
            if key not in layers:
                raise InplaceDictError(f"inplace_dict key '{key}' is not a layer of the model.")
            if key not in self.trace.layer_inputs:
                raise InplaceDictError(f"inplace_dict key '{key}' names a layer that did not run on channels in the traced forward.")
            if not isinstance(value, (tuple, list)) or not value:
                raise InplaceDictError(f"inplace_dict['{key}'] must be a non-empty tuple of layer names, None or ints; got {value!r}.")
            self._check_entry(key, tuple(value), layers)
        for layer, labels in self.trace.layer_inputs.items():
            if layer not in inplace_dict:
                self.blocked[self.root[labels.numpy()[labels.numpy() >= 0]]] = True
                produced = self.trace.producers.get(layer)
                if produced is not None:
                    self.blocked[self.root[produced.numpy()]] = True

    def _check_entry(self, key: str, value: tuple, layers: dict[str, nn.Module]) -> None:
        graph_labels = self.trace.layer_inputs[key].numpy()
        expected, wildcard = [], []
        for item in value:
            if item is None:
                labels = torch.cat(self.trace.input_labels).numpy() if self.trace.input_labels else np.empty(0, np.int64)
            elif isinstance(item, int) and not isinstance(item, bool):
                labels = np.full(item, -1, dtype=np.int64)
            elif isinstance(item, str):
                if item not in layers:
                    raise InplaceDictError(f"inplace_dict['{key}'] names '{item}', which is not a layer of the model.")
                produced = self.trace.producers.get(item)
                if produced is None:
                    raise InplaceDictError(f"inplace_dict['{key}'] names '{item}', which produced no channels in the traced forward.")
                labels = produced.numpy()
            else:
                raise InplaceDictError(f"inplace_dict['{key}'] holds {item!r}; entries are layer names, None or ints.")
            expected.append(labels)
            wildcard.append(np.full(len(labels), isinstance(item, int)))
        mine, free = np.concatenate(expected), np.concatenate(wildcard)
        if len(graph_labels) != len(mine) and len(mine) and len(graph_labels) % len(mine) == 0:
            mine, free = np.repeat(mine, len(graph_labels) // len(mine)), np.repeat(free, len(graph_labels) // len(mine))
        ok = len(mine) == len(graph_labels)
        if ok:
            both = ~free & (graph_labels >= 0) & (mine >= 0)
            ok = bool((self.root[graph_labels[both]] == self.root[mine[both]]).all()) and not bool(
                (~free & ((graph_labels >= 0) != (mine >= 0))).any()
            )
        if not ok:
            raise InplaceDictError(
                f"inplace_dict['{key}'] = {value!r} disagrees with the traced graph, which has "
                f"{self._describe(self.trace.layer_inputs[key])!r} ({len(graph_labels)} input channels). "
                "Fix the entry or pass inplace_dict='auto'."
            )
        fixed = graph_labels[free & (graph_labels >= 0)]
        self.blocked[self.root[fixed]] = True


def format_inplace_dict(inplace_dict: InplaceDict) -> str:
    """The dict as Python source, one layer per line, for review and hand-editing as the seed advises."""
    lines = ["inplace_dict = {"]
    lines += [f"    {key!r}: {tuple(value)!r}," for key, value in inplace_dict.items()]
    lines.append("}")
    return "\n".join(lines)


def infer_inplace_dict(model: nn.Module, example_input: Any) -> InplaceDict:
    """Infer the seed's ``inplace_dict`` from one real forward pass of ``model``.

    Keys are the traced conv, norm and linear layers; values the producers of their input
    channels in concat order. Print it with :func:`format_inplace_dict`, edit, and pass it back
    as ``inplace_dict=`` to :func:`~lightning_prune.export_pruned_model`. A model still wrapped
    by a pruner (NNI, ``torch.nn.utils.prune``) is traced as the plain model it wraps.
    """
    return ChannelGraph.from_model(unwrapped_copy(model, share_tensors=True), example_input).infer_inplace_dict()


def _why_not_absorbed(consumer: Consumer, values: np.ndarray, tainted: bool, calls: Counter) -> Optional[str]:
    if np.isnan(values).any():
        return "pruned channels are not constant where they reach this layer (zero padding, pooling or data)"
    if tainted:
        return "pruned channels are scaled by input-dependent values before this layer"
    if calls[consumer.module] > 1:
        return "the layer is called more than once and a constant cannot be folded per call"
    if consumer.kind == "layer_norm" or consumer.foldable:
        return None
    if consumer.kind == "conv_transpose":
        return "a transposed conv cannot absorb a constant input exactly"
    return "pruned channels carry a constant and the conv zero-pads, so it cannot be folded into the bias exactly"


def _fold(consumer: Consumer, weight: Tensor, constants: Tensor) -> Tensor:
    """The bias change that accounts for constant input channels removed from a conv or linear."""
    live = constants.nonzero().flatten()
    summed = weight.flatten(2).sum(2) if weight.ndim > 2 else weight  # (out, in / groups)
    rows, cols = summed.shape
    groups = consumer.groups if consumer.kind == "conv" else 1
    group_of = live // cols
    columns = summed[:, (live % cols).to(weight.device)].double()  # only the columns that fold
    contribution = columns * constants[live].to(weight.device, torch.float64)
    row_group = torch.arange(rows, device=weight.device) // (rows // groups)
    same_group = row_group[:, None] == group_of.to(weight.device)[None, :]
    return (contribution * same_group).sum(1).to(weight.dtype)


def _components(count: int, edges: list[tuple[Tensor, Tensor]]) -> np.ndarray:
    """Connected components of labels under ``edges``: each label -> the smallest label of its group."""
    parent = np.arange(count, dtype=np.int64)
    if not edges:
        return parent
    a = np.concatenate([e[0].numpy().ravel() for e in edges]).astype(np.int64)
    b = np.concatenate([e[1].numpy().ravel() for e in edges]).astype(np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:  # pointer jumping: every label points at its root again
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def _root_flags(root: np.ndarray, label_sets: list[Tensor]) -> np.ndarray:
    flags = np.zeros(len(root), dtype=bool)
    for labels in label_sets:
        labels = labels.numpy().ravel()
        flags[root[labels[labels >= 0]]] = True
    return flags


__all__ = ["ChannelGraph", "InplaceDict", "Note", "Plan", "format_inplace_dict", "infer_inplace_dict"]
