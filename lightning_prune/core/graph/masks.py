"""Every mask source turned into one canonical form: ``{layer name: bool keep-vector}``.

A keep-vector has one entry per output channel of a ``Conv*``, ``ConvTranspose*`` or
``Linear`` layer: ``True`` keeps the channel, ``False`` prunes it.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
>>> keep = collect_masks({"0": {"weight": torch.tensor([1, 0, 1, 1.]).view(4, 1, 1, 1).expand(4, 3, 3, 3)}}, model)
>>> keep["0"].tolist()
[True, False, True, True]
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.core.errors import MaskError
from lightning_prune.core.graph.prunable import (
    ChannelTensor,
    channel_tensors,
    is_prunable,
    out_channel_dim,
    out_channels,
)
from lightning_prune.core.modules import own_tensors, replace_tensor, set_submodule, tensor_places

Masks = dict[str, torch.Tensor]
"""The canonical form: layer name -> bool keep-vector over the layer's output channels."""

MaskSource = Mapping | str | os.PathLike | nn.Module


def collect_masks(source: MaskSource | Masks, model: nn.Module | None = None) -> Masks:
    """Turn any supported mask source into ``{layer: bool keep-vector}``, validated against ``model``.

    Sources:

    - an NNI 3.0 masks dict ``{layer: {"weight": tensor, "bias": tensor | None}}``;
    - a path to such a dict saved with ``torch.save`` (loaded with ``weights_only=True``);
    - a model still carrying NNI 3.0 wrappers, NNI 2.x ``weight_mask`` wrappers,
      ``torch.nn.utils.prune`` buffers (``weight_orig``/``weight_mask``, as Lightning's
      ``ModelPruning`` leaves them), or all-zero output filters in plain weights;
    - a dict of keep-vectors (bool or 0/1) per layer.

    Raises :class:`~lightning_prune.core.errors.MaskError` naming the layer for a layer the model
    lacks, a shape that does not match the weight, non-binary values, or a mask that is not a
    channel mask (a filter partly zero).
    """
    if isinstance(source, (str, os.PathLike)):
        return collect_masks(_load_mask_file(source), model)
    if isinstance(source, nn.Module):
        return _validated(_masks_from_module(source), model if model is not None else source)
    if not isinstance(source, Mapping):
        raise MaskError(
            f"Masks must be a dict, a path to a file saved with torch.save, or a model; got {type(source).__name__}."
        )
    model_layers = _plain_layers(model) if model is not None else {}
    masks: Masks = {}
    for name, value in source.items():
        module = model_layers.get(name)
        masks[name] = _keep_vector(name, value, module)
    return _validated(masks, model)


def _load_mask_file(path: str | os.PathLike) -> Any:
    if not os.path.isfile(path):
        raise MaskError(f"Mask file '{os.fspath(path)}' does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise MaskError(
            f"Mask file '{os.fspath(path)}' could not be loaded safely (weights_only=True): {err}. "
            "Save masks as a dict of tensors with torch.save."
        ) from err


def _keep_vector(name: str, value: Any, module: nn.Module | None) -> torch.Tensor:
    """Reduce one layer's mask (NNI dict, weight-shaped tensor or keep-vector) to a bool vector."""
    if isinstance(value, Mapping):
        if "weight" not in value:
            raise MaskError(f"Mask for layer '{name}' has no 'weight' entry; found keys {sorted(value)}.")
        value = value["weight"]
    mask = torch.as_tensor(value).detach().cpu()
    if mask.dtype != torch.bool:
        binary = (mask == 0) | (mask == 1)
        if not bool(binary.all()):
            bad = mask[~binary].flatten()[0].item()
            raise MaskError(f"Mask for layer '{name}' is not binary: found value {bad}; masks hold only 0 and 1.")
        mask = mask != 0
    if mask.ndim <= 1:
        return mask.reshape(-1)
    dim = out_channel_dim(module) if module is not None else 0
    per_channel = mask.movedim(dim, 0).flatten(1)
    keep = per_channel.any(dim=1)
    partial = keep & ~per_channel.all(dim=1)
    if bool(partial.any()):
        channel = int(partial.nonzero()[0])
        raise MaskError(
            f"Mask for layer '{name}' is not a channel mask: output channel {channel} is partly zero. "
            "Channel pruning needs whole filters kept or pruned (use a structured pruner such as FPGM or L1)."
        )
    return keep


def _validated(masks: Masks, model: nn.Module | None) -> Masks:
    if model is None:
        return masks
    layers = _plain_layers(model)
    for name, keep in masks.items():
        module = layers.get(name)
        if module is None:
            raise MaskError(
                f"Mask given for layer '{name}', but the model has no such layer. "
                f"Prunable layers include: {_some_prunable(model)}."
            )
        if not is_prunable(module):
            raise MaskError(
                f"Mask given for layer '{name}', a {type(module).__name__}; masks apply to the output "
                "channels of Conv, ConvTranspose, Linear, Embedding (its columns) and MultiheadAttention layers."
            )
        expected = out_channels(module)
        if keep.numel() != expected:
            raise MaskError(
                f"Mask for layer '{name}' has {keep.numel()} channels, but its weight "
                f"{tuple(getattr(module, channel_tensors(module)[0].name).shape)} has {expected} output channels."
            )
    return masks


def _plain_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layer names as they are once wrappers are removed: NNI 2.x wrappers stand for the layer they wrap."""
    layers = {}
    for name, module in model.named_modules():
        if _is_nni3_wrapper(module):
            continue
        inner = getattr(module, "module", None)
        layers[name] = inner if hasattr(module, "weight_mask") and isinstance(inner, nn.Module) else module
    return layers


def _some_prunable(model: nn.Module, limit: int = 5) -> str:
    names = [n for n, m in _plain_layers(model).items() if is_prunable(m)]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "") if names else "none"


def _masks_from_module(model: nn.Module) -> Masks:
    """Read masks a model carries: NNI 3.0/2.x wrappers, torch prune buffers, else zero filters."""
    masks: Masks = {}
    for name, module in model.named_modules():
        if _is_nni3_wrapper(module):
            continue  # read through the module it wraps, below
        wrapper = module._modules.get("_nni_wrapper")
        if wrapper is not None:  # NNI 3.0: the wrapper hangs off the original module
            space = wrapper.pruning_target_spaces.get("weight")
            if space is not None and space.mask is not None:
                masks[name] = _keep_vector(name, space.mask, module)
        elif hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):  # torch.nn.utils.prune
            masks[name] = _keep_vector(name, module.weight_mask, module)
        elif hasattr(module, "weight_mask") and isinstance(getattr(module, "module", None), nn.Module):
            masks[name] = _keep_vector(name, module.weight_mask, module.module)  # NNI 2.x wrapper
    if masks:
        return masks
    for name, module in model.named_modules():
        if is_prunable(module):
            filters = [
                getattr(module, t.name).detach().movedim(t.dim, 0) for t in channel_tensors(module) if t.is_weight
            ]
            keep = torch.cat([f.flatten(1).ne(0).any(dim=1).cpu() for f in filters])
            if not bool(keep.all()):
                masks[name] = keep
    return masks


_EMPTY_COPIES = (dict, OrderedDict, set)


def unwrapped_copy(model: nn.Module, share_tensors: bool = False) -> nn.Module:
    """A deep copy of ``model`` with NNI wrappers and ``torch.nn.utils.prune`` reparametrisations removed.

    Pruning buffers are made permanent (``weight = weight_orig * weight_mask``); NNI wrappers are
    replaced by the modules they wrap, with their masks (weight, and bias where they mask it)
    multiplied in, so the copy computes what the wrapped model computes. The argument itself is
    not changed. With
    ``share_tensors=True`` plain parameters and buffers are shared with ``model`` rather than
    copied (cheap, for callers that replace every tensor they change and copy the rest after).
    """
    memo: dict[int, Any] = {}
    for module in model.modules():  # torch prune's computed `weight` is not a leaf: deepcopy refuses it
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch.nn.utils.prune.BasePruningMethod):
                computed = getattr(module, hook._tensor_name)
                memo[id(computed)] = computed.detach()  # recomputed by prune.remove below
        for value in module.__dict__.values():  # a module's many empty hook dicts: deepcopy's slowest items
            if type(value) in _EMPTY_COPIES and not value:
                memo[id(value)] = type(value)()
        if share_tensors and not _is_wrapped(module):
            for tensor in own_tensors(module).values():
                memo[id(tensor)] = tensor
    model = copy.deepcopy(model, memo)
    for name, module in list(model.named_modules()):
        if _is_nni3_wrapper(module):
            continue
        wrapper = module._modules.get("_nni_wrapper")
        if wrapper is not None:  # NNI 3.0 masks in its forward; unwrapping restores the unmasked tensors
            spaces = wrapper.pruning_target_spaces.items()
            applied = {target: space.mask for target, space in spaces if space.mask is not None}
            wrapper.unwrap()
            _multiply(module, applied)
        inner = getattr(module, "module", None)
        if hasattr(module, "weight_mask") and isinstance(inner, nn.Module) and name:  # NNI 2.x
            _multiply(
                inner, {t: getattr(module, f"{t}_mask") for t in ("weight", "bias") if hasattr(module, f"{t}_mask")}
            )
            set_submodule(model, name, inner)
    make_pruning_permanent(model)
    return model


@torch.no_grad()
def _multiply(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            replace_tensor(module, name, tensor * mask.to(tensor.device, tensor.dtype))


def make_pruning_permanent(model: nn.Module) -> None:
    """Remove ``torch.nn.utils.prune`` reparametrisations in place (``weight = weight_orig * weight_mask``),
    so parameter names are the module's own again."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch.nn.utils.prune.BasePruningMethod):
                torch.nn.utils.prune.remove(module, hook._tensor_name)


def _is_nni3_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "pruning_target_spaces")


def has_mask_wrappers(model: nn.Module) -> bool:
    """Whether ``model`` carries NNI wrappers or ``torch.nn.utils.prune`` reparametrisations."""
    return any(_is_nni3_wrapper(module) or _is_wrapped(module) for module in model.modules())


def _is_wrapped(module: nn.Module) -> bool:
    return (
        "_nni_wrapper" in module._modules
        or hasattr(module, "weight_mask")
        or any(isinstance(h, torch.nn.utils.prune.BasePruningMethod) for h in module._forward_pre_hooks.values())
    )


@torch.no_grad()
def pruned_slices(
    module: nn.Module, keep: torch.Tensor, device: torch.device | str | None = None
) -> list[tuple[ChannelTensor, torch.Tensor]]:
    """Per tensor of :func:`channel_tensors`, the indices along its ``dim`` of the channels ``keep`` prunes
    (on ``device``; by default the tensor's)."""
    pruned = (~keep.bool()).nonzero().flatten()
    slices = []
    for item in channel_tensors(module):
        local = pruned - item.first
        if item.count is not None:  # it holds a part of the channels (a key or value projection)
            local = local[(local >= 0) & (local < item.count)]
        slices.append((item, local.to(getattr(module, item.name).device if device is None else device)))
    return slices


def zero_pruned_channels(model: nn.Module, masks: Masks, in_place: bool = False) -> None:
    """Zero the weights and biases of every pruned output channel: as new tensors (old ones untouched;
    a tensor two layers share stays shared), or with ``in_place=True`` in the tensors themselves (no copy)."""
    places = tensor_places(model)
    for name, keep in masks.items():
        module = model.get_submodule(name)
        for item, local in pruned_slices(module, keep):
            _zero(module, item.name, item.dim, local, places, in_place)


@torch.no_grad()
def _zero(module: nn.Module, name: str, dim: int, index: torch.Tensor, places: Any, in_place: bool) -> None:
    tensor = getattr(module, name)
    if in_place:
        tensor.index_fill_(dim, index.to(tensor.device), 0.0)
    else:
        replace_tensor(module, name, tensor.index_fill(dim, index.to(tensor.device), 0.0), places)


def zero_pruned_parameters(
    model: nn.Module, channel_keep: dict[tuple[str, str, int], torch.Tensor], in_place: bool = False
) -> bool:
    """Zero the parameter slices pruned channels reach (``ChannelGraph.channel_parameter_keep``'s
    ``{(module, parameter, dim): keep-vector}``), as new tensors (shared ones stay shared) or, with
    ``in_place=True``, in the tensors themselves. Whether anything changed."""
    places = tensor_places(model)
    for (layer, param, dim), keep in channel_keep.items():
        _zero(model.get_submodule(layer), param, dim, (~keep).nonzero().flatten(), places, in_place)
    return bool(channel_keep)


def unshare_tensors(copy_: nn.Module, original: nn.Module) -> None:
    """Clone every parameter or buffer ``copy_`` still shares with ``original``."""
    shared = {id(t) for t in list(original.parameters()) + list(original.buffers())}
    clones: dict[int, torch.Tensor] = {}  # a tensor shared inside the copy (tied embeddings) stays shared
    with torch.no_grad():
        for module in copy_.modules():
            for kind in ("_parameters", "_buffers"):
                tensors = getattr(module, kind)
                for name, tensor in tensors.items():
                    if tensor is not None and id(tensor) in shared:
                        if id(tensor) not in clones:
                            replace_tensor(module, name, tensor.detach().clone())
                        tensors[name] = clones.setdefault(id(tensor), tensors[name])


def apply_masks(model: nn.Module, masks: MaskSource | Masks) -> nn.Module:
    """The masked reference: a copy of ``model`` with pruned channels' weights and biases zeroed.

    This is what :func:`~lightning_prune.export_pruned_model` must reproduce exactly.
    """
    keep = collect_masks(masks, model)
    masked = unwrapped_copy(model)
    zero_pruned_channels(masked, keep)
    return masked


__all__: Sequence[str] = [
    "Masks",
    "apply_masks",
    "collect_masks",
    "make_pruning_permanent",
    "unwrapped_copy",
    "zero_pruned_channels",
]
