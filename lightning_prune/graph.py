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
network input, and ``(None,)`` alone, for a layer over a reshaped tensor or over no layer's
channels, "its input channels are not pruned"; an ``int``: that many channels from an unpruned
source)."""


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
                    why = f"'{other.module}' is called on different numbers of channels"
                    extra_blocked += [(calls[0].labels, why), (other.labels, why)]
            self.axes.append(calls[0])
        self.root = _components(trace.num_labels, edges)
        self.owner = np.full(trace.num_labels, -1, dtype=np.int64)
        self.owner_channel = np.zeros(trace.num_labels, dtype=np.int64)
        self.owner_names: list[Optional[str]] = []
        for index, (name, start, count) in enumerate(trace.label_owner):
            self.owner[start : start + count] = index
            self.owner_channel[start : start + count] = np.arange(count)
            self.owner_names.append(name)
        self.blocked = np.zeros(trace.num_labels, dtype=bool)  # per group root: must be kept
        self.block_reason = np.full(trace.num_labels, -1, dtype=np.int64)  # per root: index into reasons
        self.reasons: list[str] = []
        for labels, reason in trace.blocked + extra_blocked:
            self.block(labels, reason)
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

    def block(self, labels: Union[Tensor, np.ndarray], reason: str) -> None:
        """Keep the groups of ``labels`` whatever the masks say; the first reason given for a group
        is the one its notes report."""
        labels = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        labels = labels.ravel()
        roots = self.root[labels[labels >= 0]]
        if not roots.size:
            return
        code = self._reason_code(reason)
        self.blocked[roots] = True
        fresh = roots[self.block_reason[roots] < 0]
        self.block_reason[fresh] = code

    def _reason_code(self, reason: str) -> int:
        try:
            return self.reasons.index(reason)
        except ValueError:
            self.reasons.append(reason)
            return len(self.reasons) - 1

    def keep_reshaped(self) -> None:
        """Keep every channel whose exported size was a guess (a view spread over several dims, a
        write into a tensor the model's code sizes): the fallback when the guess was wrong."""
        for labels in self.trace.reshaped:
            self.block(labels, "shrinking the tensor a view or an indexed write puts them in changed the model's output (its code fixes that size)")

    # ----------------------------------------------------------- decisions
    def plan(self, masks: Masks, model: nn.Module) -> Plan:
        """Decide which channels go, which stay (and why), and how each layer changes.

        ``model`` is the masked model that was traced (its weights give the bias folds). Every
        channel a mask prunes that the plan keeps gets a note: the notes of action ``"kept"`` for
        a layer add up to the number of its masked channels kept, one note per reason.
        """
        notes: list[Note] = []
        root = self.root
        keep, why = self._initial_keep(masks, notes)
        calls = Counter(c.module for c in self.trace.consumers)
        changed = True
        while changed:
            changed = self._widen_groups(keep, why) | self._keep_unfoldable(keep, why, calls)
        kept_channels = {}
        for layer, labels in self.trace.producers.items():
            kept = int(keep[root[labels.numpy()]].sum())
            if kept == 0:
                raise PrunedToZeroError(
                    f"Layer '{layer}' would keep none of its {labels.numel()} output channels. "
                    "Keep at least one channel in its mask, or drop the mask for this layer."
                )
            kept_channels[layer] = kept
        notes += self._kept_notes(masks, keep, why)
        return Plan(self._changes(keep, model, notes), kept_channels, notes)

    def _initial_keep(self, masks: Masks, notes: Optional[list[Note]] = None) -> tuple[np.ndarray, np.ndarray]:
        """Per group root: kept unless every member's mask prunes it and nothing blocks it; and
        why (an index into :attr:`reasons`, ``-1`` where nothing keeps it)."""
        keep = np.zeros(self.trace.num_labels, dtype=bool)
        prune_vote = np.zeros(self.trace.num_labels, dtype=bool)
        for layer in self.trace.followers - set(masks):  # an unmasked depthwise conv follows its input
            prune_vote[self.trace.producers[layer].numpy()] = True
        for layer, layer_keep in masks.items():
            labels = self.trace.producers.get(layer)
            if labels is None:
                if notes is not None and not bool(layer_keep.all()):
                    notes.append(Note(layer, int((~layer_keep).sum()), "kept", "the layer did not run as a conv/linear in the traced forward"))
                continue
            prune_vote[labels.numpy()[~layer_keep.numpy()]] = True
        why = np.where(self.blocked, self.block_reason, -1)
        voters = np.flatnonzero(~prune_vote)  # labels whose owner keeps them: their groups keep the union
        roots, first = np.unique(self.root[voters], return_index=True)
        keep[roots] = True
        for group, index in zip(roots.tolist(), first.tolist()):
            if why[group] >= 0:
                continue
            name = self.owner_names[self.owner[voters[index]]]
            if name in masks:
                reason = f"coupled with '{name}', whose mask keeps them (a coupled group keeps the union of its masks)"
            else:
                reason = f"coupled with '{name}', which has no mask (a coupled group keeps the union of its masks)"
            why[group] = self._reason_code(reason)
        return keep | self.blocked, why

    def _kept_notes(self, masks: Masks, keep: np.ndarray, why: np.ndarray) -> list[Note]:
        """One note per (layer, reason) for the channels a layer's mask prunes that are kept."""
        notes = []
        for layer, layer_keep in masks.items():
            labels = self.trace.producers.get(layer)
            if labels is None:
                continue
            roots = self.root[labels.numpy()]
            against = ~layer_keep.numpy() & keep[roots]
            for code, count in sorted(Counter(why[roots[against]].tolist()).items()):
                reason = self.reasons[code] if code >= 0 else "kept by the plan without a recorded reason"
                notes.append(Note(layer, count, "kept", reason))
        return notes

    def norm_affine_keep(self, masks: Masks, model: nn.Module) -> dict[tuple[str, str], Tensor]:
        """``(norm layer, "weight" | "bias") -> bool keep-vector`` for the affine parameters of every
        BatchNorm/InstanceNorm/GroupNorm/LayerNorm that pruned channels feed.

        Zeroing these with the filters holds the whole channel at zero, so a pruned channel
        leaves no constant behind (what masked fine-tuning does).
        """
        keep, _ = self._initial_keep(masks)
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

    def _keep_groups(self, keep: np.ndarray, why: np.ndarray, labels: np.ndarray, reason: str) -> None:
        roots = self.root[labels[labels >= 0]]
        fresh = roots[~keep[roots]]
        keep[fresh] = True
        why[fresh] = self._reason_code(reason)

    def _widen_groups(self, keep: np.ndarray, why: np.ndarray) -> bool:
        """A grouped conv needs the same number of channels kept in every group: widen to the largest."""
        changed = False
        for layer, labels, groups in self.trace.even_groups:
            kept = self._kept(keep, labels).reshape(groups, -1)
            counts = kept.sum(axis=1)
            if counts.min() == counts.max():
                continue
            extra = [np.flatnonzero(~kept[g])[: int(counts.max() - counts[g])] + g * kept.shape[1] for g in range(groups)]
            reason = f"'{layer}' is a grouped conv whose {groups} groups must keep equal channel counts (mask widened)"
            self._keep_groups(keep, why, labels.numpy()[np.concatenate(extra)], reason)
            changed = True
        return changed

    def _keep_unfoldable(self, keep: np.ndarray, why: np.ndarray, calls: Counter) -> bool:
        """Keep pruned channels whose constant value a consumer cannot absorb exactly."""
        changed = False
        for consumer in self.trace.consumers:
            pruned, live, values = self._pruned_inputs(keep, consumer)
            if not live.any():
                continue
            reason = _why_not_absorbed(consumer, values[live], self.tainted[self.root[consumer.labels.numpy()[live]]].any(), calls)
            if reason is None:
                continue
            self._keep_groups(keep, why, consumer.labels.numpy()[live], f"they reach '{consumer.module}' {reason}")
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
        left unpruned. ``None`` is the network input; ``(None,)`` alone also means "this layer's
        input channels are not pruned" for a layer that reads no layer's channels directly: its
        input carries only the network input or channels of no layer, or is a tensor a view gave
        another rank (the seed's 2D conv over a reshaped 5D volume). Every entry the trace
        contradicts is reported at once, in one :class:`InplaceDictMismatchError` whose
        ``corrected`` dict has each fixed.
        """
        layers = dict(model.named_modules())
        problems: dict[str, str] = {}
        corrected: InplaceDict = {}
        blocks: list[tuple[np.ndarray, str]] = []
        for key, value in inplace_dict.items():
            if key not in layers:
                problems[key] = f"inplace_dict key '{key}' is not a layer of the model (dropped from the corrected dict)"
                continue
            if key not in self.trace.layer_inputs:
                problems[key] = f"inplace_dict key '{key}' names a layer that did not run on channels in the traced forward (dropped from the corrected dict)"
                continue
            traced = self._describe(self.trace.layer_inputs[key])
            if not isinstance(value, (tuple, list)) or not value:
                problems[key] = f"inplace_dict['{key}'] must be a non-empty tuple of layer names, None or ints; got {value!r}; the trace has {traced!r}"
                corrected[key] = traced
                continue
            problem = self._check_entry(key, tuple(value), layers, blocks)
            if problem is None:
                corrected[key] = tuple(value)
            else:
                problems[key] = problem
                corrected[key] = traced
        if problems:
            raise InplaceDictMismatchError(problems, corrected)
        for labels, reason in blocks:
            self.block(labels, reason)
        for layer, labels in self.trace.layer_inputs.items():
            if layer not in inplace_dict:
                reason = f"'{layer}' is not a key of the inplace_dict, so it keeps its shape"
                self.block(labels, reason)
                produced = self.trace.producers.get(layer)
                if produced is not None:
                    self.block(produced, reason)

    def _check_entry(self, key: str, value: tuple, layers: dict[str, nn.Module], blocks: list) -> Optional[str]:
        """What is wrong with ``inplace_dict[key] = value`` (None if nothing); the channels it keeps
        go to ``blocks``."""
        graph_labels = self.trace.layer_inputs[key].numpy()
        traced = self._describe(self.trace.layer_inputs[key])
        inputs = torch.cat(self.trace.input_labels).numpy() if self.trace.input_labels else np.empty(0, np.int64)
        expected, wildcard = [], []
        for item in value:
            if item is None:
                labels = inputs
            elif isinstance(item, int) and not isinstance(item, bool):
                labels = np.full(item, -1, dtype=np.int64)
            elif isinstance(item, str):
                if item not in layers:
                    return f"inplace_dict['{key}'] names '{item}', which is not a layer of the model; the trace has {traced!r}"
                produced = self.trace.producers.get(item)
                if produced is None:
                    return f"inplace_dict['{key}'] names '{item}', which produced no channels in the traced forward; the trace has {traced!r}"
                labels = produced.numpy()
            else:
                return f"inplace_dict['{key}'] holds {item!r}; entries are layer names, None or ints; the trace has {traced!r}"
            expected.append(labels)
            wildcard.append(np.full(len(labels), isinstance(item, int)))
        if value == (None,) and self._reads_no_layer_directly(key, graph_labels):
            blocks.append((graph_labels, f"inplace_dict['{key}'] is (None,): its input channels are not pruned"))
            return None
        mine, free = np.concatenate(expected), np.concatenate(wildcard)
        if len(graph_labels) != len(mine) and len(mine) and len(graph_labels) % len(mine) == 0:
            mine, free = np.repeat(mine, len(graph_labels) // len(mine)), np.repeat(free, len(graph_labels) // len(mine))
        ok = len(mine) == len(graph_labels)
        if ok:
            network = ~free & np.isin(mine, inputs)  # the network input: its labels may be lost on the way
            named = ~free & ~network
            both = named & (graph_labels >= 0) & (mine >= 0)
            ok = bool((self.root[graph_labels[both]] == self.root[mine[both]]).all())
            ok &= not bool((named & ((graph_labels >= 0) != (mine >= 0))).any())
            seen = graph_labels[network & (graph_labels >= 0)]
            ok &= bool(np.isin(self.root[seen], self.root[inputs]).all())
        if not ok:
            return (
                f"inplace_dict['{key}'] = {value!r} disagrees with the traced graph, which has "
                f"{traced!r} ({len(graph_labels)} input channels): {self._difference(value, traced)}"
            )
        fixed = graph_labels[free & (graph_labels >= 0)]
        blocks.append((fixed, f"inplace_dict['{key}'] gives them as an int (channels left unpruned)"))
        return None

    def _reads_no_layer_directly(self, key: str, labels: np.ndarray) -> bool:
        """Whether ``key``'s input holds no layer's channels, or reads a tensor a view reshaped."""
        labels = labels[labels >= 0]
        from_layers = np.array([name is not None for name in self.owner_names], dtype=bool)[self.owner[labels]]
        return not from_layers.any() or key in self.trace.reshaped_inputs

    def _difference(self, given: tuple, traced: tuple) -> str:
        """Wrong order, wrong producer or missing producer, comparing producers up to coupling."""

        def identity(item: Any) -> Any:
            if item is None:
                return ("input",)
            labels = self.trace.producers.get(item)
            return ("group", int(self.root[int(labels[0])])) if labels is not None and labels.numel() else ("name", item)

        mine = [(item, identity(item)) for item in given if item is None or isinstance(item, str)]
        theirs = [(item, identity(item)) for item in traced if item is None or isinstance(item, str)]
        mine_ids, their_ids = [i for _, i in mine], [i for _, i in theirs]
        if Counter(mine_ids) == Counter(their_ids):
            return "wrong order" if mine_ids != their_ids else "wrong channel counts"
        parts = []
        extra = [item for item, i in mine if i not in their_ids]
        missing = [item for item, i in theirs if i not in mine_ids]
        if extra:
            parts.append("wrong producer " + ", ".join(repr(i) for i in extra) + " (not an input of this layer)")
        if missing:
            parts.append("missing producer " + ", ".join(repr(i) for i in missing))
        return "; ".join(parts) or "wrong channel counts"


class InplaceDictMismatchError(InplaceDictError):
    """Every entry of an ``inplace_dict`` the traced graph contradicts, reported at once.

    ``problems``: key -> what is wrong (wrong producer, wrong order, missing producer, unknown
    name) and what the trace has. ``corrected``: the dict with each wrong entry replaced by the
    trace's and unknown keys dropped, ready for :func:`format_inplace_dict`, so a hand-written
    dict is fixed in one pass.
    """

    def __init__(self, problems: dict[str, str], corrected: InplaceDict) -> None:
        self.problems = dict(problems)
        self.corrected = dict(corrected)
        count = len(self.problems)
        fixed = {key: value for key, value in self.corrected.items() if key in self.problems}
        lines = [
            f"inplace_dict has {count} wrong entr{'y' if count == 1 else 'ies'}, all listed; the error's "
            "`corrected` dict has each fixed (print it with format_inplace_dict):"
        ]
        lines += [f"  {message}" for message in self.problems.values()]
        if fixed:
            lines.append("Corrected entries:")
            lines += [f"  {line.strip()}" for line in format_inplace_dict(fixed).splitlines()[1:-1]]
        lines.append("Fix the entries or pass inplace_dict='auto'.")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple:  # picklable (errors travel between ranks)
        return (type(self), (self.problems, self.corrected))


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
    """Why pruned channels that reach ``consumer`` nonzero cannot go, or None where a fold is exact."""
    if np.isnan(values).any():
        return "not constant (zero padding, pooling or data in between), so they cannot be dropped or folded"
    if tainted:
        return "scaled by input-dependent values, so their constant cannot be folded"
    if calls[consumer.module] > 1:
        return "carrying a constant, and the layer is called more than once, so it cannot be folded per call"
    if consumer.kind == "layer_norm" or consumer.foldable:
        return None
    if consumer.kind == "conv_transpose":
        return "carrying a constant, which a transposed conv cannot absorb exactly"
    return "carrying a constant, and the conv zero-pads, so it cannot be folded into the bias exactly"


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


__all__ = ["ChannelGraph", "InplaceDict", "InplaceDictMismatchError", "Note", "Plan", "format_inplace_dict", "infer_inplace_dict"]
