"""The layers a mask prunes, and the tensors of each that hold its output channels.

Conv, transposed conv, linear, embedding (its columns: a language model's residual width) and
``nn.MultiheadAttention`` layers are prunable; an integration registers a library's own
(:func:`register_prunable`: Hugging Face's ``Conv1D``).

>>> from torch import nn
>>> layer = nn.ConvTranspose2d(4, 6, 3, groups=2)
>>> is_prunable(layer), out_channel_dim(layer), out_channels(layer)
(True, 1, 6)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from lightning_prune.core.integrations import load_integrations

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Embedding,
    nn.MultiheadAttention,
)
OUT_CHANNEL_DIMS: dict[type[nn.Module], int] = {nn.modules.conv._ConvTransposeNd: 1, nn.Embedding: 1}
"""Prunable layer types whose ``weight`` holds the output channels along another dim than 0."""


def register_prunable(cls: type[nn.Module], out_channel_dim: int = 0) -> None:
    """Let masks prune the output channels of ``cls``, a layer with a ``weight`` that holds them along
    ``out_channel_dim`` (Hugging Face's ``Conv1D``: 1) and an optional ``bias``."""
    global PRUNABLE_TYPES
    if cls not in PRUNABLE_TYPES:
        PRUNABLE_TYPES = (*PRUNABLE_TYPES, cls)
    if out_channel_dim:
        OUT_CHANNEL_DIMS[cls] = out_channel_dim


def is_prunable(module: nn.Module) -> bool:
    """Whether ``module`` has output channels a mask can prune (conv, transposed conv, linear, embedding)."""
    load_integrations()  # layers of libraries the model uses (transformers' Conv1D)
    return isinstance(module, PRUNABLE_TYPES)


def out_channel_dim(module: nn.Module) -> int:
    """The weight dimension that indexes output channels (1 for transposed convs and embeddings, else 0)."""
    return next((dim for cls, dim in OUT_CHANNEL_DIMS.items() if isinstance(module, cls)), 0)


def out_channels(module: nn.Module) -> int:
    """The number of output channels of a prunable layer (all groups of a transposed conv; an
    ``nn.MultiheadAttention``'s query, key and value projections together)."""
    if isinstance(module, nn.MultiheadAttention):
        return 3 * module.embed_dim
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return module.weight.shape[1] * module.groups
    return module.weight.shape[out_channel_dim(module)]


class ChannelTensor(NamedTuple):
    """A tensor that holds output channels of a prunable layer: ``count`` channels (``None``: all of
    them) from channel ``first`` on, along ``dim``."""

    name: str
    dim: int
    first: int = 0
    count: int | None = None
    is_weight: bool = True  # a filter (scored, read for zeros) rather than a bias


def channel_tensors(module: nn.Module) -> list[ChannelTensor]:
    """The tensors of a prunable layer that hold its output channels: its filters, then its biases.

    A conv or linear layer: ``weight`` (along :func:`out_channel_dim`) and ``bias``. An
    ``nn.MultiheadAttention``, whose channels are its query, key and value projections (``3 *
    embed_dim``): ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``),
    ``in_proj_bias``, and ``bias_k``/``bias_v`` (shaped ``(1, 1, embed_dim)``, the key and value
    thirds). Tensors the layer lacks are left out.
    """
    if isinstance(module, nn.MultiheadAttention):
        width = module.embed_dim
        if module._qkv_same_embed_dim:
            found = [ChannelTensor("in_proj_weight", 0)]
        else:
            found = [ChannelTensor(f"{p}_proj_weight", 0, i * width, width) for i, p in enumerate("qkv")]
        found += [ChannelTensor("in_proj_bias", 0, is_weight=False)]
        found += [ChannelTensor(f"bias_{p}", 2, i * width, width, False) for i, p in ((1, "k"), (2, "v"))]
    else:
        found = [ChannelTensor("weight", out_channel_dim(module)), ChannelTensor("bias", 0, is_weight=False)]
    return [item for item in found if getattr(module, item.name, None) is not None]


def filters(module: nn.Module) -> list[torch.Tensor]:
    """A prunable layer's filters, one ``(channels, -1)`` matrix per weight of :func:`channel_tensors`
    (one for a conv or linear; an attention's separate q, k, v projections give three)."""
    found = []
    for item in channel_tensors(module):
        weight = getattr(module, item.name)
        if item.is_weight and weight.ndim >= 2:
            found.append(weight.detach().movedim(item.dim, 0).flatten(1))
    return found


def filter_norms(module: nn.Module) -> torch.Tensor:
    """Per output channel of a prunable layer, the mean absolute value of its filter."""
    return torch.cat([rows.abs().sum(1) / max(rows.shape[1], 1) for rows in filters(module)])


__all__ = [
    "ChannelTensor",
    "channel_tensors",
    "filter_norms",
    "filters",
    "is_prunable",
    "out_channel_dim",
    "out_channels",
    "register_prunable",
]
