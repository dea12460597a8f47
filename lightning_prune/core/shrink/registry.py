"""One shrink function per module type, found through a registry users can extend.

A shrink function receives the module (a private copy, free to change in place) and its
:class:`~lightning_prune.core.graph.changes.LayerChange`, and returns the module to put in its place. Most
only slice parameters with :func:`shrink_parameters` and update size attributes.

Teaching the exporter a custom layer takes one function. Its parameters are traced through the
standard ops its ``forward`` uses; the shrink function updates whatever attributes describe its
size:

>>> import torch
>>> from torch import nn
>>> from lightning_prune import export_pruned_model, register_shrinker, shrink_parameters
>>> class Scale(nn.Module):
...     def __init__(self, channels):
...         super().__init__()
...         self.channels = channels
...         self.gain = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)
...     def forward(self, x):
...         return x * self.gain
>>> @register_shrinker(Scale)
... def shrink_scale(module, change):
...     shrink_parameters(module, change)
...     module.channels = module.gain.shape[0]
...     return module
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), Scale(8), nn.Conv2d(8, 4, 1))
>>> small = export_pruned_model(model, {"0": torch.arange(8) % 2 == 0}, torch.randn(1, 3, 8, 8))
>>> small[1].channels, small[2].in_channels
(4, 4)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_prune.core.graph.changes import LayerChange, NormConstants

Shrinker = Callable[[nn.Module, LayerChange], nn.Module]
_SHRINKERS: dict[type, Shrinker] = {}
_SLICES_ONLY: set[Shrinker] = set()  # shrink functions registered with slices_only=True


def register_shrinker(*types: type[nn.Module], slices_only: bool = False) -> Callable[[Shrinker], Shrinker]:
    """Register ``fn(module, change) -> module`` for ``types`` and their subclasses. ``slices_only=True``
    says ``fn`` reads nothing of the module's tensors but the slices ``change`` keeps (as
    :func:`shrink_parameters` does): export may then give it the module's own tensors, not a copy with the
    pruned channels zeroed."""

    def decorator(fn: Shrinker) -> Shrinker:
        for cls in types:
            _SHRINKERS[cls] = fn
        if slices_only:
            _SLICES_ONLY.add(fn)
        return fn

    return decorator


def slices_only(module: nn.Module) -> bool:
    """Whether ``module``'s shrink function reads only the slices it keeps (see :func:`register_shrinker`)."""
    shrinker = shrinker_for(module)
    return shrinker is shrink_parameters or shrinker in _SLICES_ONLY


def shrinker_for(module: nn.Module) -> Shrinker:
    """The most specific registered shrink function for ``module``, else :func:`shrink_parameters`."""
    for cls in type(module).__mro__:
        if cls in _SHRINKERS:
            return _SHRINKERS[cls]
    return shrink_parameters


def slice_along(tensor: Tensor, dim: int, index: Tensor, groups: int = 1) -> Tensor:
    """Keep ``index`` along ``dim``; with ``groups > 1``, ``dim`` is a grouped axis whose block ``k``
    belongs to the ``k``-th block of rows (dim 0), as in a grouped conv's weight."""
    index = index.to(tensor.device)
    if groups == 1:
        return tensor.index_select(dim, index)
    per_group, rows = tensor.shape[dim], tensor.shape[0] // groups
    parts = []
    for g in range(groups):
        local = index[(index >= g * per_group) & (index < (g + 1) * per_group)] - g * per_group
        parts.append(tensor[g * rows : (g + 1) * rows].index_select(dim, local))
    return torch.cat(parts, 0)


@torch.no_grad()
def shrink_parameters(module: nn.Module, change: LayerChange) -> nn.Module:
    """Slice the module's own parameters and buffers as ``change`` says, in place."""
    by_name: dict[str, list[tuple[int, Tensor, int]]] = {}
    for (name, dim), (index, groups) in change.keep.items():
        by_name.setdefault(name, []).append((dim, index, groups))
    for name, cuts in by_name.items():
        tensor = getattr(module, name)
        for dim, index, groups in sorted(cuts, key=lambda cut: -cut[2]):  # grouped axes before row cuts
            tensor = slice_along(tensor, dim, index, groups)
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
        else:
            module._buffers[name] = tensor
    return module


@torch.no_grad()
def _add_bias_delta(module: nn.Module, change: LayerChange) -> None:
    """Fold constant input channels into the bias (created if the layer had none), before slicing."""
    if change.bias_delta is None:
        return
    if module.bias is None:
        module.bias = nn.Parameter(
            torch.zeros(module.weight.shape[0], dtype=module.weight.dtype, device=module.weight.device)
        )
        if ("weight", 0) in change.keep:
            change.keep[("bias", 0)] = change.keep[("weight", 0)]
    module.bias = nn.Parameter(module.bias + change.bias_delta.to(module.bias.device, module.bias.dtype))


@register_shrinker(nn.modules.conv._ConvNd, slices_only=True)
def shrink_conv(module: nn.modules.conv._ConvNd, change: LayerChange) -> nn.Module:
    """Conv1d/2d/3d and ConvTranspose, grouped and depthwise."""
    depthwise = module.groups == module.in_channels == module.out_channels
    _add_bias_delta(module, change)
    shrink_parameters(module, change)
    weight = module.weight
    if depthwise:
        module.groups = module.in_channels = module.out_channels = weight.shape[0]
    elif module.transposed:
        module.in_channels, module.out_channels = weight.shape[0], weight.shape[1] * module.groups
    else:
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
    return module


@register_shrinker(nn.Linear, slices_only=True)
def shrink_linear(module: nn.Linear, change: LayerChange) -> nn.Module:
    _add_bias_delta(module, change)
    shrink_parameters(module, change)
    module.out_features, module.in_features = module.weight.shape
    return module


@register_shrinker(nn.modules.batchnorm._NormBase, slices_only=True)
def shrink_batch_norm(module: nn.modules.batchnorm._NormBase, change: LayerChange) -> nn.Module:
    """BatchNorm and InstanceNorm (both keep per-channel parameters and statistics)."""
    shrink_parameters(module, change)
    tensor = module.weight if module.weight is not None else module.running_mean
    if tensor is not None:
        module.num_features = tensor.shape[0]
    return module


@register_shrinker(nn.GroupNorm, slices_only=True)
def shrink_group_norm(module: nn.GroupNorm, change: LayerChange) -> nn.Module:
    per_group = module.num_channels // module.num_groups
    shrink_parameters(module, change)
    module.num_channels = module.weight.shape[0]
    module.num_groups = module.num_channels // per_group
    return module


@register_shrinker(nn.PReLU, slices_only=True)
def shrink_prelu(module: nn.PReLU, change: LayerChange) -> nn.Module:
    shrink_parameters(module, change)
    module.num_parameters = module.weight.numel()
    return module


@register_shrinker(nn.LayerNorm, slices_only=True)
def shrink_layer_norm(module: nn.LayerNorm, change: LayerChange) -> nn.Module:
    """A LayerNorm that lost channels it normalised over becomes a :class:`PrunedLayerNorm`."""
    shrink_parameters(module, change)
    if module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    if change.norm is None:
        return module
    return PrunedLayerNorm(module, change.norm, change.channel_dim)


class PrunedLayerNorm(nn.LayerNorm):
    """LayerNorm over channels that still counts the channels pruning removed.

    The masked model normalises over ``C`` channels, some of them pruned to a constant (usually
    zero); a plain LayerNorm over the kept ``C'`` channels has another mean and variance, so it
    computes another function (Torch-Pruning's ConvNeXt export differs by 0.46 for this reason).
    This norm keeps the original divisor and adds the pruned constants' sums, which is exact:
    ``mean = (sum(x) + S1) / C`` and ``var = (sum((x - mean)^2) + S2 - 2 mean S1 + P mean^2) / C``.
    ``channel_dim`` says where the channels are in the input (``-1``: channels-last, as
    ``nn.LayerNorm``; ``1``: channels-first, as ConvNeXt's ``LayerNorm2d``).
    """

    def __init__(self, source: nn.LayerNorm, constants: NormConstants, channel_dim: int = -1) -> None:
        nn.Module.__init__(self)
        self.normalized_shape = tuple(source.normalized_shape)
        self.eps = source.eps
        self.elementwise_affine = source.elementwise_affine
        self.weight, self.bias = source.weight, source.bias
        self.channel_dim = channel_dim
        self.channels = constants.channels
        self.pruned = constants.pruned
        self.register_buffer("pruned_sum", torch.tensor(constants.sum, dtype=torch.float64))
        self.register_buffer("pruned_sum_sq", torch.tensor(constants.sum_sq, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        # non-negative dims: torch.onnx's TorchScript exporter writes a negative one into a Transpose's
        # perm, which ONNX Runtime refuses to load
        channel_dim, last = self.channel_dim % x.dim(), x.dim() - 1
        x = x.movedim(channel_dim, last)
        s1, s2 = self.pruned_sum.to(x.dtype), self.pruned_sum_sq.to(x.dtype)
        mean = (x.sum(-1, keepdim=True) + s1) / self.channels
        centred = x - mean
        var = (
            centred.square().sum(-1, keepdim=True) + s2 - 2 * mean * s1 + self.pruned * mean.square()
        ) / self.channels
        y = centred * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.movedim(last, channel_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels={self.channels}, pruned={self.pruned}, channel_dim={self.channel_dim}"
