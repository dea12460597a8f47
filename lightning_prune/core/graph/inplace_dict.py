"""The seed's ``inplace_dict`` from a traced graph: infer it, load it, check it (its text format and type:
:mod:`lightning_prune.core.inplace_format`).

Keys are the conv, norm and linear layers to shrink; values the producers of their input
channels in concat order: a layer name, ``None`` for the network input, an ``int`` for that many
channels from an unpruned source.

>>> import torch
>>> from torch import nn
>>> from lightning_prune.core.graph.channel_graph import ChannelGraph
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> graph = ChannelGraph.from_model(model, torch.randn(1, 3, 8, 8))
>>> traced_inplace_dict(graph)
{'0': (None,), '1': ('0',), '3': ('0',)}

The seed page writes its dict as Python source, ``inplace_dict = {'layer': (None,), ...}``,
comments included. A ``.py`` or ``.txt`` file holding that text is read with :mod:`ast` as a
literal, so it is never executed:

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "seed.py")
>>> _ = open(path, "w").write("inplace_dict = {\\n    'conv1': (None,),  # the input\\n    'bn1': ('conv1',),\\n}\\n")
>>> load_inplace_dict(path)
{'conv1': (None,), 'bn1': ('conv1',)}
"""

from __future__ import annotations

import ast
import json
import os
import textwrap
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_prune.core.errors import InplaceDictError, InplaceDictMismatchError
from lightning_prune.core.graph.channel_graph import ChannelGraph, Override
from lightning_prune.core.graph.masks import unwrapped_copy
from lightning_prune.core.inplace_format import InplaceDict

PYTHON_SUFFIXES = (".py", ".txt")


# ---------------------------------------------------------------------------------- infer
def traced_inplace_dict(graph: ChannelGraph) -> InplaceDict:
    """The seed's ``inplace_dict`` for every traced layer with input channels, in forward order."""
    return {layer: _describe(graph, labels) for layer, labels in graph.trace.layer_inputs.items()}


def infer_inplace_dict(model: nn.Module, example_input: Any) -> InplaceDict:
    """Infer the seed's ``inplace_dict`` from one real forward pass of ``model``.

    Keys are the traced conv, norm and linear layers; values the producers of their input
    channels in concat order. Print it with :func:`~lightning_prune.format_inplace_dict`, edit, and pass it back
    as ``inplace_dict=`` to :func:`~lightning_prune.export_pruned_model`. A model still wrapped
    by a pruner (NNI, ``torch.nn.utils.prune``) is traced as the plain model it wraps.
    """
    return traced_inplace_dict(ChannelGraph.from_model(unwrapped_copy(model, share_tensors=True), example_input))


def _describe(graph: ChannelGraph, labels: Tensor) -> tuple[str | int | None, ...]:
    """Runs of consecutive positions from one producer; an int for unlabelled positions."""
    entries: list[str | int | None] = []
    previous: Any = object()
    for label in labels.tolist():
        if label < 0:
            if entries and isinstance(entries[-1], int) and previous == -1:
                entries[-1] += 1
            else:
                entries.append(1)
            previous = -1
            continue
        name = graph.owner_names[graph.owner[label]]
        if name != previous:
            entries.append(name)
        previous = name
    return tuple(entries)


# ------------------------------------------------------------------------------- load
def load_inplace_dict(source: InplaceDict | str | os.PathLike) -> InplaceDict:
    """An ``inplace_dict`` from a dict, or from a YAML/JSON file (lists become tuples, ``null`` is
    None), or a ``.py``/``.txt`` file with the seed's Python text (``inplace_dict = {...}``)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise InplaceDictError(f"inplace_dict file '{path}' does not exist.")
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            if path.endswith(".json"):
                data: Any = json.loads(text)
            elif path.endswith(PYTHON_SUFFIXES):
                data = parse_python_inplace_dict(text)
            else:
                data = _yaml_load(text)
        except (ValueError, OSError) as err:
            raise InplaceDictError(f"inplace_dict file '{path}' could not be parsed: {err}") from err
        if not isinstance(data, Mapping):
            raise InplaceDictError(
                f"inplace_dict file '{path}' must hold a mapping of layer -> list; found {type(data).__name__}."
            )
        source = data
    if not isinstance(source, Mapping):
        raise InplaceDictError(f"inplace_dict must be a dict or a path; got {type(source).__name__}.")
    return {str(k): tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in source.items()}


def parse_python_inplace_dict(text: str) -> Any:
    """The dict literal in ``text``: ``inplace_dict = {...}`` (or a bare ``{...}``), indented or not,
    comments allowed. Only literals are accepted (:func:`ast.literal_eval`): nothing runs."""
    try:
        tree = ast.parse(textwrap.dedent(text))
    except SyntaxError as err:
        raise ValueError(f"not Python source: {err}") from err
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(target, ast.Name) and target.id == "inplace_dict" for target in targets):
            return ast.literal_eval(node.value)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Dict):
            return ast.literal_eval(node.value)
    raise ValueError("no `inplace_dict = {...}` assignment or dict literal found")


def _yaml_load(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from err


# ------------------------------------------------------------------------------ check
def check_inplace_dict(graph: ChannelGraph, inplace_dict: InplaceDict, model: nn.Module) -> list[Override]:
    """Check a user-written ``inplace_dict`` against the graph; return the overrides that restrict
    pruning to its keys (``graph.with_blocked(...)`` applies them).

    Layers of a kind the dict can name (conv, norm, linear) but absent from its keys keep
    their shape, as in the seed's workflow; an ``int`` entry marks channels the user wants
    left unpruned. ``None`` is the network input; ``(None,)`` alone also means "this layer's
    input channels are not pruned" for a layer that reads no layer's channels directly: its
    input carries only the network input or channels of no layer, or is a tensor a view gave
    another rank (the seed's 2D conv over a reshaped 5D volume). Every entry the trace
    contradicts is reported at once, in one :class:`~lightning_prune.core.errors.InplaceDictMismatchError`
    whose ``corrected`` dict has each fixed.
    """
    trace = graph.trace
    layers = dict(model.named_modules())
    problems: dict[str, str] = {}
    corrected: InplaceDict = {}
    overrides: list[Override] = []
    for key, value in inplace_dict.items():
        if key not in layers:
            problems[key] = f"inplace_dict key '{key}' is not a layer of the model (dropped from the corrected dict)"
            continue
        if key not in trace.layer_inputs:
            problems[key] = (
                f"inplace_dict key '{key}' names a layer that did not run on channels in the traced forward "
                "(dropped from the corrected dict)"
            )
            continue
        traced = _describe(graph, trace.layer_inputs[key])
        if not isinstance(value, (tuple, list)) or not value:
            problems[key] = (
                f"inplace_dict['{key}'] must be a non-empty tuple of layer names, None or ints; got {value!r}; "
                f"the trace has {traced!r}"
            )
            corrected[key] = traced
            continue
        problem = _check_entry(graph, key, tuple(value), layers, overrides)
        if problem is None:
            corrected[key] = tuple(value)
        else:
            problems[key] = problem
            corrected[key] = traced
    if problems:
        raise InplaceDictMismatchError(problems, corrected)
    for layer, labels in trace.layer_inputs.items():
        if layer not in inplace_dict:
            reason = f"'{layer}' is not a key of the inplace_dict, so it keeps its shape"
            overrides.append((labels, reason))
            produced = trace.producers.get(layer)
            if produced is not None:
                overrides.append((produced, reason))
    return overrides


def _check_entry(
    graph: ChannelGraph, key: str, value: tuple, layers: dict[str, nn.Module], overrides: list[Override]
) -> str | None:
    """What is wrong with ``inplace_dict[key] = value`` (None if nothing); the channels it keeps
    go to ``overrides``."""
    trace, root = graph.trace, graph.root
    graph_labels = trace.layer_inputs[key].numpy()
    traced = _describe(graph, trace.layer_inputs[key])
    has = f"the trace has {traced!r}"
    inputs = torch.cat(trace.input_labels).numpy() if trace.input_labels else np.empty(0, np.int64)
    expected, wildcard = [], []
    for item in value:
        if item is None:
            labels = inputs
        elif isinstance(item, int) and not isinstance(item, bool):
            labels = np.full(item, -1, dtype=np.int64)
        elif isinstance(item, str):
            if item not in layers:
                return f"inplace_dict['{key}'] names '{item}', which is not a layer of the model; {has}"
            produced = trace.producers.get(item)
            if produced is None:
                return f"inplace_dict['{key}'] names '{item}', which produced no channels in the traced forward; {has}"
            labels = produced.numpy()
        else:
            return f"inplace_dict['{key}'] holds {item!r}; entries are layer names, None or ints; {has}"
        expected.append(labels)
        wildcard.append(np.full(len(labels), isinstance(item, int)))
    if value == (None,) and _reads_no_layer_directly(graph, key, graph_labels):
        overrides.append((graph_labels, f"inplace_dict['{key}'] is (None,): its input channels are not pruned"))
        return None
    mine, free = np.concatenate(expected), np.concatenate(wildcard)
    if len(graph_labels) != len(mine) and len(mine) and len(graph_labels) % len(mine) == 0:
        mine, free = np.repeat(mine, len(graph_labels) // len(mine)), np.repeat(free, len(graph_labels) // len(mine))
    ok = len(mine) == len(graph_labels)
    if ok:
        network = ~free & np.isin(mine, inputs)  # the network input: its labels may be lost on the way
        named = ~free & ~network
        both = named & (graph_labels >= 0) & (mine >= 0)
        ok = bool((root[graph_labels[both]] == root[mine[both]]).all())
        ok &= not bool((named & ((graph_labels >= 0) != (mine >= 0))).any())
        seen = graph_labels[network & (graph_labels >= 0)]
        ok &= bool(np.isin(root[seen], root[inputs]).all())
    if not ok:
        return (
            f"inplace_dict['{key}'] = {value!r} disagrees with the traced graph, which has "
            f"{traced!r} ({len(graph_labels)} input channels): {_difference(graph, value, traced)}"
        )
    fixed = graph_labels[free & (graph_labels >= 0)]
    overrides.append((fixed, f"inplace_dict['{key}'] gives them as an int (channels left unpruned)"))
    return None


def _reads_no_layer_directly(graph: ChannelGraph, key: str, labels: np.ndarray) -> bool:
    """Whether ``key``'s input holds no layer's channels, or reads a tensor a view reshaped."""
    labels = labels[labels >= 0]
    from_layers = np.array([name is not None for name in graph.owner_names], dtype=bool)[graph.owner[labels]]
    return not from_layers.any() or key in graph.trace.reshaped_inputs


def _difference(graph: ChannelGraph, given: tuple, traced: tuple) -> str:
    """Wrong order, wrong producer or missing producer, comparing producers up to coupling."""

    def identity(item: Any) -> Any:
        if item is None:
            return ("input",)
        labels = graph.producers.get(item)
        return ("group", int(graph.root[int(labels[0])])) if labels is not None and labels.numel() else ("name", item)

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


__all__ = [
    "check_inplace_dict",
    "infer_inplace_dict",
    "load_inplace_dict",
    "parse_python_inplace_dict",
    "traced_inplace_dict",
]
