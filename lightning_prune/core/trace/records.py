"""What a traced forward pass records: the data the tracer, its op rules and the graph share.

A :class:`Rep` says where a tensor's channel labels live; :class:`ChannelTrace` is everything one
pass recorded (the graph is built from it); :class:`OpCall` is one recorded call as a rule receives
it. The helpers below are the pure functions several stages use: how a model is called on its
example input, connected components of coupled labels, and the memory a tensor views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class Rep:
    """Where a tensor's channel labels live: ``labels[i, j, ...]`` is the label of every element
    whose indices along ``dims`` are ``(i, j, ...)``. Label ``-1`` means no channel."""

    dims: tuple[int, ...]
    labels: Tensor
    from_view: bool = False  # made by a view that changed the tensor's rank (a 2D conv over a 5D volume)


@dataclass
class ParamAxis:
    """One sliceable axis of a parameter or buffer.

    ``labels`` has one entry per channel along ``dim``; with ``groups > 1`` the axis is the
    grouped input (or transposed-conv output) axis of a convolution: ``labels`` then covers all
    groups and the weight rows of group ``k`` take the channels of block ``k``.
    """

    module: str
    param: str
    dim: int
    labels: Tensor
    groups: int = 1


@dataclass
class Consumer:
    """A call that mixes channels: conv/linear inputs and norms over channels.

    ``constants[i]`` is the value of input position ``i`` if it was the same everywhere in the
    traced batch (NaN otherwise); a pruned position with a nonzero constant cannot simply be
    dropped.
    """

    module: str
    kind: str  # "conv", "conv_transpose", "linear", "layer_norm"
    labels: Tensor
    constants: Tensor
    foldable: bool
    groups: int = 1


@dataclass
class AttentionHeads:
    """The heads an attention op found, for the module that called it (export updates its head counts).

    ``query[h]`` is a label of query head ``h`` (every channel of a head shares its keep decision),
    ``key_value[g]`` one of key/value head ``g``; under grouped-query attention each key/value head
    is coupled with the query heads that share it, so both counts shrink by the same factor.
    """

    query: Tensor
    key_value: Tensor
    head_dim: int


@dataclass
class Deferred:
    """A coupling or block that depends on what attention finds later in the pass.

    A view that splits channels into ``(heads, head_dim)`` and an op that treats the positions of a
    head differently (rotary embeddings, a per-position scale, a slice of ``head_dim``) are exact
    when whole heads go, and otherwise are not. They are decided when the pass ends, once the
    attention ops have said which labels form heads: see :func:`~lightning_prune.core.trace.deferred.resolve_deferred`.
    ``kind`` is ``"split"`` (``labels``: the split labels, coupled as :func:`movement` guesses unless
    they all form heads), ``"within"`` (``labels`` blocked unless, along each of ``axes``, they stay
    inside one head), ``"in_heads"`` (blocked unless they all belong to heads: a head's output is
    checked where it is projected, so what is added to its scores does not matter) or
    ``"fixed_part"`` (``labels`` blocked unless each of their heads keeps a label in ``survivors``,
    so that what the op drops is a fixed part of every head). A ``"within"`` whose ``axes`` is one
    parameter's only axis has that parameter's slice by heads in ``per_head``: where each index
    along the axis is one whole head instead (a gate ``[heads, 1, 1]``), the parameter is sliced so.
    """

    kind: str
    labels: Tensor
    reason: str
    axes: tuple[int, ...] = ()
    survivors: Tensor | None = None
    per_head: tuple[ParamAxis, ...] = ()


@dataclass
class ChannelTrace:
    """Everything one traced forward pass recorded about channels."""

    label_owner: list[tuple[str | None, int, int]] = field(default_factory=list)  # (producer, first label, count)
    num_labels: int = 0
    edges: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    blocked: list[tuple[Tensor, str]] = field(default_factory=list)  # (labels, why they must be kept)
    tainted: list[Tensor] = field(default_factory=list)
    axes: list[ParamAxis] = field(default_factory=list)
    producers: dict[str, Tensor] = field(default_factory=dict)
    consumers: list[Consumer] = field(default_factory=list)
    even_groups: list[tuple[str, Tensor, int]] = field(default_factory=list)  # (layer, labels, groups)
    layer_inputs: dict[str, Tensor] = field(default_factory=dict)  # first call's input labels per layer
    norm_channel_dim: dict[str, int] = field(default_factory=dict)
    followers: set[str] = field(default_factory=set)  # depthwise layers: their channels are their input's
    warnings: list[str] = field(default_factory=list)
    input_labels: list[Tensor] = field(default_factory=list)
    reshaped: list[tuple[Tensor, str]] = field(
        default_factory=list
    )  # (labels, module): exported size a guess to verify
    module_inputs: dict[str, Tensor] = field(default_factory=dict)  # module -> labels of its first call's inputs
    head_units: list[Tensor] = field(default_factory=list)  # (heads, channels per head) labels attention found
    deferred: list[Deferred] = field(default_factory=list)
    reshaped_inputs: set[str] = field(default_factory=set)  # layers that read a tensor a view gave another rank
    heads: dict[str, AttentionHeads] = field(default_factory=dict)  # attention module -> its heads
    exact_constants: dict[int, float] = field(default_factory=dict)  # label -> value attention keeps it at exactly
    # a tensor held under several names (b.weight = a.weight): (module, name) -> the first name
    # ``named_modules`` gives it, which the trace uses for it everywhere
    shared: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    output: Any = None  # what the traced (masked) model returned
    # whole_channel: the (module, parameter, dim) keep-vectors of the slices the pass zeroed as it went
    # (trace.zeroing), or None where it could not follow them; changed: some zeroed element was not zero
    zeroed: dict[tuple[str, str, int], Tensor] | None = None
    zeroing_changed: bool = False

    def new_labels(self, owner: str | None, count: int) -> Tensor:
        """``count`` fresh labels for the channels of ``owner`` (``None``: the network input)."""
        labels = torch.arange(self.num_labels, self.num_labels + count)
        self.label_owner.append((owner, self.num_labels, count))
        self.num_labels += count
        return labels


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` the way ``example_input`` asks: a tensor, a tuple of positional inputs, or a dict of keywords."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


@dataclass(frozen=True)
class OpCall:
    """One recorded call, as a rule receives it.

    ``op`` is the normalised name (the table key), ``name`` the function's own name (``fill_``,
    ``__setitem__``: it tells in-place from out-of-place), ``func`` the function itself (a rule
    may call it again on labels), ``args``/``kwargs`` what it was called with, ``out`` what it
    returned.
    """

    op: str
    name: str
    func: Callable
    args: tuple
    kwargs: dict
    out: Any

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The argument given by keyword ``name`` or at position ``index``, else ``default``."""
        return argument(self.args, self.kwargs, index, name, default)

    @property
    def inputs(self) -> tuple[tuple, dict]:
        """``(args, kwargs)``: every input, for blocking the channels they carry."""
        return (self.args, self.kwargs)


def argument(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """A call's argument given by keyword ``name`` or at position ``index``, else ``default``."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def leaves(value: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts, what an op's arguments and results are made of: as
    ``torch.utils._pytree.tree_leaves`` gives them, at a fraction of its cost per call."""
    if isinstance(value, dict):
        value = list(value.values())
    elif not isinstance(value, (tuple, list)):
        return [value]
    found = []
    for item in value:
        if isinstance(item, (tuple, list, dict)):
            found += leaves(item)
        else:
            found.append(item)
    return found


def replace_tensors(value: Any, swapped: dict[int, Tensor]) -> Any:
    """``value`` (an op's arguments: nested tuples, lists and dicts) with each tensor whose id ``swapped``
    holds replaced by the tensor it maps to."""
    if isinstance(value, Tensor):
        return swapped.get(id(value), value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(replace_tensors(v, swapped) for v in value)
    if isinstance(value, list):
        return [replace_tensors(v, swapped) for v in value]
    if isinstance(value, dict):
        return {k: replace_tensors(v, swapped) for k, v in value.items()}
    return value


def components(count: int, edges: list[tuple[Tensor, Tensor]]) -> np.ndarray:
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


def storage_key(tensor: Any) -> Any:
    """Identifies the memory a tensor lives in (views share it); None for tensors without one."""
    if not isinstance(tensor, Tensor):
        return None
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except Exception:  # sparse, functional or other tensors without plain storage
        return None
    return (tensor.device.type, tensor.device.index, pointer) if pointer else None


def region(flat: Tensor, tensor: Tensor) -> Tensor:
    """The elements of ``flat`` (one per element of ``tensor``'s memory) that ``tensor`` views."""
    return flat.as_strided(tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())


__all__ = [
    "AttentionHeads",
    "ChannelTrace",
    "Consumer",
    "Deferred",
    "OpCall",
    "ParamAxis",
    "Rep",
    "argument",
    "call_model",
    "components",
    "leaves",
    "region",
    "replace_tensors",
    "storage_key",
]
