"""The compressed checkpoint: one file ``torch.load(path, weights_only=True)`` opens.

It holds the small model's state dict, per-layer shape changes and the attention modules' head counts
(enough to shrink a freshly built original model without any pickled code), the masks, the export report and the module's
hyper-parameters. A Lightning checkpoint taken while fine-tuning at the pruned size (the callback's
``finetune="pruned"``) is read the same way: the callback's state records the shrink.

>>> import torch, tempfile, os
>>> from torch import nn
>>> from lightning_prune import export
>>> build = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> result = export(build(), {"0": torch.arange(8) < 3}, torch.randn(1, 3, 8, 8))
>>> path = os.path.join(tempfile.mkdtemp(), "pruned.ckpt")
>>> save_pruned(path, result)
>>> load_pruned(path, build())[2].in_channels
3

A checkpoint saved from a wrapper (a LightningModule holding ``self.net``) loads into the bare
network too, and the other way round; the attribute prefix is found from the names:

>>> class Wrapper(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.net = build()
...     def forward(self, x):
...         return self.net(x)
>>> save_pruned(path, export(Wrapper(), {"net.0": torch.arange(8) < 3}, torch.randn(1, 3, 8, 8)))
>>> load_pruned(path, build())[2].in_channels
3
>>> load_pruned(path, Wrapper()).net[2].in_channels
3
"""

from __future__ import annotations

import inspect
import os
from dataclasses import astuple
from typing import Any

import torch
from torch import nn

from lightning_prune.core.errors import CheckpointError
from lightning_prune.core.export import ExportResult, shrink_model
from lightning_prune.core.files.atomic import atomic_save
from lightning_prune.core.files.names import find_mapping
from lightning_prune.core.graph.changes import HeadCounts, LayerChange, NormConstants, Plan, layer_shapes

FORMAT = "lightning-prune/1"


def shrink_record(result: ExportResult) -> dict[str, Any]:
    """How an export shrank the original model, in plain types (what :func:`load_pruned` replays):
    the changed layers' shapes, the attention head counts and the masks."""
    return {
        "format": FORMAT,
        "layers": layer_shapes(result.plan),
        "heads": {name: list(astuple(counts)) for name, counts in result.plan.heads.items()},
        "masks": {k: v.cpu() for k, v in result.masks.items()},
    }


def save_pruned(
    path: str | os.PathLike,
    result: ExportResult,
    *,
    report: dict[str, Any] | None = None,
    hyper_parameters: dict[str, Any] | None = None,
    network_prefix: str | None = None,
    shrunk_by: dict[str, Any] | None = None,
) -> None:
    """Write the compressed checkpoint for an export ``result`` (atomically).

    ``network_prefix`` (optional) is the attribute path of the deployable network inside the
    exported module, ``"model"`` for a LightningModule holding ``self.model``; :func:`load_pruned`
    prefers it when it matches the names in both ways. ``shrunk_by`` (optional) is the
    :func:`shrink_record` of an earlier export from the original model, for a ``result`` exported
    from a model already at the pruned size (fine-tuned there): the file then describes the shrink
    from the original, so it loads into a freshly built one.
    """
    record = shrunk_by if shrunk_by is not None else shrink_record(result)
    data = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "layers": record["layers"],
        "heads": record["heads"],
        "masks": record["masks"],
        "report": _plain(report or {}),
        "hyper_parameters": _plain(hyper_parameters or {}),
    }
    if network_prefix is not None:
        try:
            result.model.get_submodule(network_prefix)
        except AttributeError as err:
            raise CheckpointError(
                f"save_pruned('{os.fspath(path)}', network_prefix={network_prefix!r}): the exported "
                f"{type(result.model).__name__} has no submodule {network_prefix!r}. Pass the attribute path of "
                f"the network inside it (e.g. 'model' for self.model), or leave network_prefix out."
            ) from err
        data["network_prefix"] = network_prefix
    atomic_save(data, path)


def read_pruned(path: str | os.PathLike) -> dict[str, Any]:
    """Load a compressed checkpoint safely (``weights_only=True``) and check its format."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, "pruned.ckpt")
        hint = (
            f"Did you mean '{inside}'?"
            if os.path.isfile(inside)
            else "Pass the path of the pruned.ckpt file the export wrote."
        )
        raise CheckpointError(f"'{path}' is a directory, not a checkpoint file. {hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, code-running payload: all refused
        raise CheckpointError(f"Checkpoint '{path}' could not be loaded safely (weights_only=True): {err}") from err
    if isinstance(data, dict) and isinstance(data.get("callbacks"), dict) and "state_dict" in data:
        return _from_lightning(data, path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"Checkpoint '{path}' is not a lightning-prune checkpoint (format {found!r}, expected {FORMAT!r})."
        )
    return data


def _from_lightning(checkpoint: dict[str, Any], path: str) -> dict[str, Any]:
    """A Lightning checkpoint taken while fine-tuning at the pruned size, read as a compressed one:
    the callback's state holds the shrink from the original model, the checkpoint the weights."""
    records = [
        state["pruned"]
        for state in checkpoint["callbacks"].values()
        if isinstance(state, dict) and state.get("shrunk") and isinstance(state.get("pruned"), dict)
    ]
    if not records or records[0].get("format") != FORMAT:
        raise CheckpointError(
            f"Checkpoint '{path}' is a Lightning checkpoint of the model at its full size (taken before any shrink, or from "
            "finetune='masked'): load it with YourLightningModule.load_from_checkpoint(path); its pruned channels "
            "are zeros there. The smaller model is the pruned.ckpt in the callback's export_dir."
        )
    return {
        **records[0],
        "state_dict": checkpoint["state_dict"],
        "report": {},
        "hyper_parameters": checkpoint.get("hyper_parameters") or {},
    }


def load_pruned(path: str | os.PathLike, model: nn.Module, *, prefix: str | None = None) -> nn.Module:
    """Shrink ``model`` (a freshly built original) to the checkpoint's shapes, load its weights strictly, return it.

    ``model`` may be the module the checkpoint was saved from (a LightningModule, say) or the
    network inside it (``resnet18(num_classes=10)`` for a module holding ``self.model``), or a
    wrapper holding the network a checkpoint was saved from. The attribute prefix that maps the
    checkpoint's names onto ``model`` is found automatically; ``prefix="model"`` names it (the
    checkpoint's names start with ``model.`` and ``model`` is that network, or ``model`` holds the
    saved network at ``.model``); ``prefix=""`` loads the names as they are. Loading into the
    network loads only the checkpoint's keys under the prefix, strictly for that network.

    ``model`` is changed in place. Raises :class:`CheckpointError` naming the file and the first
    layer that does not fit when the checkpoint was made for another architecture, or when the
    prefix is ambiguous (pass ``prefix=``).
    """
    path = os.fspath(path)
    data = read_pruned(path)
    mapping = find_mapping(data, model, path, prefix)
    target = mapping.target(model)
    state_dict = {mapping.local(k): v for k, v in data["state_dict"].items() if mapping.local(k) is not None}
    heads = {mapping.local(n): c for n, c in data.get("heads", {}).items() if mapping.local(n) is not None}
    replay_shrink(target, {mapping.local(n): info for n, info in data["layers"].items()}, heads, path)
    mismatch = _first_mismatch(target, state_dict)
    if mismatch:
        raise CheckpointError(f"Checkpoint '{path}' does not fit the model: {mismatch}.")
    try:
        target.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"Checkpoint '{path}' does not fit the model: {err}") from err
    return model


def replay_shrink(
    model: nn.Module, layers: dict[str, dict[str, Any]], heads: dict[str, list[int]], path: str
) -> nn.Module:
    """Shrink ``model`` (built at the original size) in place as a :func:`shrink_record`'s ``layers``
    and ``heads`` say; ``path`` names the record's file in errors."""
    plan = Plan({}, {}, [])
    for name, info in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise CheckpointError(
                f"Checkpoint '{path}' changes layer '{name}', which the model does not have."
            ) from err
        plan.changes[name] = _change_for(module, info, path, name)
    for name, counts in heads.items():  # the head counts attention modules' forward reads
        plan.heads[name] = HeadCounts(*counts)
    return shrink_model(model, plan)


def load_pruned_module(path: str | os.PathLike, module_class: type[nn.Module]) -> nn.Module:
    """Build ``module_class(**saved hyper-parameters)`` (a LightningModule, typically) and load the pruned weights.

    ``path`` is a ``pruned.ckpt``, or a Lightning checkpoint (``last.ckpt``) taken while fine-tuning
    at the pruned size (``finetune="pruned"``), which ``load_from_checkpoint`` cannot load: the module
    is built at its original size, shrunk as the callback's state records, then given the weights.
    """
    return load_pruned(path, module_class(**_init_arguments(module_class, read_pruned(path)["hyper_parameters"])))


def _init_arguments(module_class: type[nn.Module], hyper_parameters: dict[str, Any]) -> dict[str, Any]:
    """The saved hyper-parameters ``module_class`` takes, as ``load_from_checkpoint`` picks them:
    without the keys LightningCLI adds (``_class_path``, ...) unless ``__init__`` takes ``**kwargs``."""
    parameters = inspect.signature(module_class.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return {k: v for k, v in hyper_parameters.items() if not k.startswith("_")}
    names = {p.name for p in parameters}
    return {k: v for k, v in hyper_parameters.items() if k in names}


def _change_for(module: nn.Module, info: dict[str, Any], path: str, name: str) -> LayerChange:
    change = LayerChange(channel_dim=info["channel_dim"])
    for key, (size, groups, original) in info["keep"].items():
        param, dim = key.rsplit(":", 1)
        tensor = getattr(module, param, None)
        if not isinstance(tensor, torch.Tensor) or int(dim) >= tensor.ndim:
            raise CheckpointError(
                f"Checkpoint '{path}' slices '{name}.{param}' along dim {dim}, which the model's layer lacks."
            )
        per_group = tensor.shape[int(dim)]  # a grouped axis is already per group (conv weight dim 1)
        if original >= 0 and per_group != original:
            raise CheckpointError(
                f"Checkpoint '{path}' was made from a model whose '{name}.{param}' has {original} entries along "
                f"dim {dim}; this model's has {per_group}. Build the model with the same configuration."
            )
        keep_per_group = size // groups
        if keep_per_group > per_group:
            raise CheckpointError(
                f"Checkpoint '{path}' has {size} channels for '{name}.{param}', more than the model's {per_group * groups}."
            )
        index = torch.cat([g * per_group + torch.arange(keep_per_group) for g in range(groups)])
        change.keep[(param, int(dim))] = (index, groups)
        change.original_sizes[(param, int(dim))] = per_group
    if info["bias_added"]:
        change.bias_delta = torch.zeros(module.weight.shape[0])
    if info["norm"] is not None:
        change.norm = NormConstants(*info["norm"]) if len(info["norm"]) > 2 else NormConstants(*info["norm"], 0.0, 0.0)
    return change


def _first_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str:
    own = model.state_dict()
    for key, tensor in own.items():
        if key not in state_dict:
            return f"'{key}' is missing from the checkpoint"
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            return f"'{key}' has shape {tuple(state_dict[key].shape)} in the checkpoint, {tuple(tensor.shape)} in the model"
    extra = [key for key in state_dict if key not in own]
    return f"'{extra[0]}' is in the checkpoint but not in the model" if extra else ""


def _plain(value: Any) -> Any:
    """Keep only what ``weights_only=True`` can load: numbers, strings, tensors, lists and dicts of them."""
    if isinstance(value, (bool, int, float, str, type(None), torch.Tensor)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
