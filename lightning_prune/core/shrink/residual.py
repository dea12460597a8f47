"""The residual stream of a language model: embeddings that lost columns, and RMS norms that lost
channels (the same module, its ``eps`` and scale changed so it stays exact).

Over the kept ``C'`` of ``C`` channels, with ``S2`` the pruned channels' constant squares,
``rsqrt((sum' + S2) / C + eps) = sqrt(C / C') rsqrt(sum' / C' + eps')`` with
``eps' = eps C / C' + S2 / C'`` (see :mod:`lightning_prune.core.trace.op_rules.norms`): the norm keeps
its class and parameter shapes, its weight ``w`` becomes ``(offset + w) sqrt(C / C') - offset`` and
its ``eps`` becomes ``eps'``. Every module type without a shrink function of its own comes here:
anything but an RMS norm the plan counted is only sliced.

>>> import torch
>>> from lightning_prune.core.graph.changes import LayerChange, NormConstants
>>> norm = torch.nn.RMSNorm(4, eps=1e-6)
>>> change = LayerChange(keep={("weight", 0): (torch.tensor([0, 2]), 1)}, norm=NormConstants(4, 2, 0.0, 0.0, "rms_norm"))
>>> small = shrink_rms_norm(norm, change)
>>> small.normalized_shape, small.eps, round(float(small.weight[0]), 4)
((2,), 2e-06, 1.4142)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_prune.core.graph.changes import LayerChange
from lightning_prune.core.shrink.registry import PrunedLayerNorm, register_shrinker, shrink_parameters
from lightning_prune.core.trace.op_rules.norms import rms_form


@register_shrinker(nn.Embedding, slices_only=True)
def shrink_embedding(module: nn.Embedding, change: LayerChange) -> nn.Module:
    """Slice the columns (the embedding width) and say the new width."""
    shrink_parameters(module, change)
    module.num_embeddings, module.embedding_dim = module.weight.shape
    return module


@register_shrinker(nn.Module, slices_only=True)
def shrink_module(module: nn.Module, change: LayerChange) -> nn.Module:
    """The default: an RMS norm the plan counted is rescaled (:func:`shrink_rms_norm`); any other
    module has its parameters and buffers sliced."""
    if change.norm is not None and change.norm.kind == "rms_norm":
        return shrink_rms_norm(module, change)
    form = rms_form(module) if change.norm is not None else None
    if form is not None and form.centred:  # a LayerNorm written by hand: the one that keeps the divisor
        shrink_parameters(module, change)
        source = nn.LayerNorm(module.weight.shape, eps=getattr(module, form.eps_attribute), bias=False)
        source.weight = nn.Parameter(module.weight.detach() + form.offset, requires_grad=module.weight.requires_grad)
        return PrunedLayerNorm(source, change.norm, -1)
    return shrink_parameters(module, change)


@register_shrinker(nn.RMSNorm, slices_only=True)
@torch.no_grad()
def shrink_rms_norm(module: nn.Module, change: LayerChange) -> nn.Module:
    """Slice the weight, then scale it by ``sqrt(C / C')`` and set ``eps`` to ``eps C / C' + S2 / C'``."""
    shrink_parameters(module, change)
    norm = change.norm
    if norm is None or norm.kind != "rms_norm" or not norm.pruned:
        return _resized(module)
    form = rms_form(module)
    if form is None:  # the trace only counts norms whose form it knows
        raise TypeError(f"{type(module).__name__} is not an RMS norm of a known form; it cannot be rescaled")
    kept = norm.channels - norm.pruned
    ratio = norm.channels / kept
    weight = getattr(module, "weight", None)
    if weight is None:  # torch.nn.RMSNorm without affine parameters: its new scale needs one
        module.weight = nn.Parameter(torch.ones(kept))
        module.elementwise_affine = True
        weight = module.weight
    scaled = (form.offset + weight.double()) * math.sqrt(ratio) - form.offset
    module.weight = nn.Parameter(scaled.to(weight.dtype), requires_grad=weight.requires_grad)
    eps = getattr(module, form.eps_attribute)
    if eps is None:  # torch.nn.RMSNorm's default: the input dtype's epsilon
        eps = torch.finfo(weight.dtype).eps
    setattr(module, form.eps_attribute, float(eps) * ratio + norm.sum_sq / kept)
    return _resized(module)


def _resized(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.RMSNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    return module


__all__ = ["shrink_embedding", "shrink_module", "shrink_rms_norm"]
