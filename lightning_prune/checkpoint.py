"""The compressed checkpoint: one file ``torch.load(path, weights_only=True)`` opens.

It holds the small model's state dict, per-layer shape changes (enough to shrink a freshly built
original model without any pickled code), the masks, the export report and the module's
hyper-parameters.

>>> import torch, tempfile, os
>>> from torch import nn
>>> from lightning_prune import export
>>> build = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> result = export(build(), {"0": torch.arange(8) < 3}, torch.randn(1, 3, 8, 8))
>>> path = os.path.join(tempfile.mkdtemp(), "pruned.ckpt")
>>> save_pruned(path, result)
>>> load_pruned(path, build())[2].in_channels
3
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import torch
from torch import nn

from lightning_prune.errors import CheckpointError
from lightning_prune.export import ExportResult, shrink_model
from lightning_prune.graph import LayerChange, NormConstants, Plan

FORMAT = "lightning-prune/1"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: readers see the old file or the new one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(err, Exception):  # a full disk surfaces as OSError or as torch's zip-writer RuntimeError
            raise CheckpointError(f"Could not write '{path}': {err}. The previous file, if any, is unchanged.") from err
        raise


def layer_shapes(plan: Plan) -> dict[str, dict[str, Any]]:
    """Per changed layer, what :func:`load_pruned` needs to shrink a fresh model the same way:
    for each sliced axis its kept size, groups and original size (to recognise another architecture)."""
    shapes = {}
    for name, change in plan.changes.items():
        shapes[name] = {
            "keep": {
                f"{param}:{dim}": [int(index.numel()), int(groups), int(change.original_sizes.get((param, dim), -1))]
                for (param, dim), (index, groups) in change.keep.items()
            },
            "bias_added": change.bias_delta is not None,
            "norm": [change.norm.channels, change.norm.pruned] if change.norm is not None else None,
            "channel_dim": change.channel_dim,
        }
    return shapes


def save_pruned(
    path: str | os.PathLike,
    result: ExportResult,
    *,
    report: Optional[dict[str, Any]] = None,
    hyper_parameters: Optional[dict[str, Any]] = None,
) -> None:
    """Write the compressed checkpoint for an export ``result`` (atomically)."""
    atomic_save(
        {
            "format": FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
            "layers": layer_shapes(result.plan),
            "masks": {k: v.cpu() for k, v in result.masks.items()},
            "report": _plain(report or {}),
            "hyper_parameters": _plain(hyper_parameters or {}),
        },
        path,
    )


def read_pruned(path: str | os.PathLike) -> dict[str, Any]:
    """Load a compressed checkpoint safely (``weights_only=True``) and check its format."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, code-running payload: all refused
        raise CheckpointError(f"Checkpoint '{path}' could not be loaded safely (weights_only=True): {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"Checkpoint '{path}' is not a lightning-prune checkpoint (format {found!r}, expected {FORMAT!r}).")
    return data


def load_pruned(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Shrink ``model`` (a freshly built original) to the checkpoint's shapes, load its weights strictly, return it.

    ``model`` is changed in place. Raises :class:`CheckpointError` naming the file and the first
    layer that does not fit when the checkpoint was made for another architecture.
    """
    data = read_pruned(path)
    plan = Plan({}, {}, [])
    for name, info in data["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise CheckpointError(f"Checkpoint '{os.fspath(path)}' changes layer '{name}', which the model does not have.") from err
        plan.changes[name] = _change_for(module, info, os.fspath(path), name)
    shrink_model(model, plan)
    mismatch = _first_mismatch(model, data["state_dict"])
    if mismatch:
        raise CheckpointError(f"Checkpoint '{os.fspath(path)}' does not fit the model: {mismatch}.")
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"Checkpoint '{os.fspath(path)}' does not fit the model: {err}") from err
    return model


def load_pruned_module(path: str | os.PathLike, module_class: type[nn.Module]) -> nn.Module:
    """Build ``module_class(**saved hyper-parameters)`` (a LightningModule, typically) and load the pruned weights."""
    return load_pruned(path, module_class(**read_pruned(path)["hyper_parameters"]))


def _change_for(module: nn.Module, info: dict[str, Any], path: str, name: str) -> LayerChange:
    change = LayerChange(channel_dim=info["channel_dim"])
    for key, (size, groups, original) in info["keep"].items():
        param, dim = key.rsplit(":", 1)
        tensor = getattr(module, param, None)
        if not isinstance(tensor, torch.Tensor) or int(dim) >= tensor.ndim:
            raise CheckpointError(f"Checkpoint '{path}' slices '{name}.{param}' along dim {dim}, which the model's layer lacks.")
        per_group = tensor.shape[int(dim)]  # a grouped axis is already per group (conv weight dim 1)
        if original >= 0 and per_group != original:
            raise CheckpointError(
                f"Checkpoint '{path}' was made from a model whose '{name}.{param}' has {original} entries along "
                f"dim {dim}; this model's has {per_group}. Build the model with the same configuration."
            )
        keep_per_group = size // groups
        if keep_per_group > per_group:
            raise CheckpointError(f"Checkpoint '{path}' has {size} channels for '{name}.{param}', more than the model's {per_group * groups}.")
        index = torch.cat([g * per_group + torch.arange(keep_per_group) for g in range(groups)])
        change.keep[(param, int(dim))] = (index, groups)
    if info["bias_added"]:
        change.bias_delta = torch.zeros(module.weight.shape[0])
    if info["norm"] is not None:
        change.norm = NormConstants(channels=info["norm"][0], pruned=info["norm"][1], sum=0.0, sum_sq=0.0)
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
