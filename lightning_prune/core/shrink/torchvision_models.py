"""torchvision's model classes: what an exported model's ``forward`` reads beyond sliced parameters.

Imported only once ``torchvision`` is (:func:`~lightning_prune.core.integrations.load_integrations`).
``VisionTransformer._process_input`` reshapes the patch embedding with ``self.hidden_dim``, so an
export that prunes the embedding width updates it.

Swin's ``shifted_window_attention`` derives ``head_dim`` as the embedding width over ``num_heads``
and reshapes the heads' output to the embedding width, so heads cannot go there while the width
stays. An attention that loses heads becomes a :class:`PrunedShiftedWindowAttention` (or its V2
twin): the same module, parameters, buffers and call, whose ``forward`` reads an explicit
``head_dim``. Its relative position bias table (V1) or bias MLP's last layer and logit scale (V2)
hold the kept heads only; the plan slices them with their heads.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
from torchvision.models.vision_transformer import VisionTransformer

from lightning_prune.core.shrink.attention import register_head_dim_twins, register_model_updater

if TYPE_CHECKING:
    from lightning_prune.core.graph.changes import Plan


@register_model_updater
def update_vision_transformers(model: nn.Module, plan: Plan) -> None:
    """Set ``hidden_dim`` of every torchvision ``VisionTransformer`` to its patch embedding's width."""
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            module.hidden_dim = module.conv_proj.out_channels


class _ExplicitHeadDim:
    """``forward`` as torchvision's, with ``head_dim`` read from the module instead of derived from the width."""

    head_dim: int

    def forward(self, x: Tensor) -> Tensor:
        """As ``ShiftedWindowAttention.forward``: ``[B, H, W, C]`` in and out."""
        return window_attention(x, self, self.get_relative_position_bias())  # type: ignore[attr-defined, arg-type]


class PrunedShiftedWindowAttention(_ExplicitHeadDim, ShiftedWindowAttention):
    """A ``ShiftedWindowAttention`` whose ``num_heads * head_dim`` may differ from its input width."""


class PrunedShiftedWindowAttentionV2(_ExplicitHeadDim, ShiftedWindowAttentionV2):
    """A ``ShiftedWindowAttentionV2`` whose ``num_heads * head_dim`` may differ from its input width."""


register_head_dim_twins(
    {ShiftedWindowAttention: PrunedShiftedWindowAttention, ShiftedWindowAttentionV2: PrunedShiftedWindowAttentionV2}
)


def window_attention(x: Tensor, module: ShiftedWindowAttention, relative_position_bias: Tensor) -> Tensor:
    """torchvision's ``shifted_window_attention`` (V1, and V2 where the module has ``logit_scale``) with
    ``module.head_dim`` explicit: the same windows, shifts, masks, scale and output."""
    window, shift = module.window_size, list(module.shift_size)
    heads, head_dim = module.num_heads, module.head_dim  # type: ignore[attr-defined]
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, (window[1] - W % window[1]) % window[1], 0, (window[0] - H % window[0]) % window[0]))
    _, pad_H, pad_W, _ = x.shape
    shift = [0 if window[i] >= size else shift[i] for i, size in enumerate((pad_H, pad_W))]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_H // window[0]) * (pad_W // window[1])
    x = x.view(B, pad_H // window[0], window[0], pad_W // window[1], window[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window[0] * window[1], C)

    logit_scale, qkv_bias = getattr(module, "logit_scale", None), module.qkv.bias
    if logit_scale is not None and qkv_bias is not None:  # V2: no key bias
        query, key, value = qkv_bias.chunk(3)
        qkv_bias = torch.cat([query, torch.zeros_like(key), value])
    qkv = F.linear(x, module.qkv.weight, qkv_bias)
    q, k, v = qkv.reshape(x.size(0), x.size(1), 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:  # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = _shift_mask(x, window, shift, pad_H, pad_W, num_windows)
        attn = attn.view(x.size(0) // num_windows, num_windows, heads, x.size(1), x.size(1))
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=module.attention_dropout, training=module.training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), heads * head_dim)
    x = F.dropout(module.proj(x), p=module.dropout, training=module.training)
    C = x.shape[-1]
    x = x.view(B, pad_H // window[0], pad_W // window[1], window[0], window[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def _shift_mask(x: Tensor, window: list[int], shift: list[int], pad_H: int, pad_W: int, num_windows: int) -> Tensor:
    """The ``-100``/0 mask torchvision adds so that shifted windows attend within their own regions."""
    mask = x.new_zeros((pad_H, pad_W))
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    for count, (h, w) in enumerate((h, w) for h in h_slices for w in w_slices):
        mask[h[0] : h[1], w[0] : w[1]] = count
    mask = mask.view(pad_H // window[0], window[0], pad_W // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


__all__ = [
    "PrunedShiftedWindowAttention",
    "PrunedShiftedWindowAttentionV2",
    "update_vision_transformers",
    "window_attention",
]
