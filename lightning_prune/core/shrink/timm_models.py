"""timm's attention classes whose ``forward`` derives ``head_dim`` from the input width.

Imported only once ``timm`` is (:func:`~lightning_prune.core.integrations.load_integrations`).
XCiT's cross-covariance attention (``XCA``: ``C // num_heads``, its per-head ``temperature``), the
class attention XCiT and CaiT share (``ClassAttn``), PVT-v2's ``Attention``, EVA's ``EvaAttention``
(EVA-02, DINOv3) and Swin V2's ``WindowAttention`` (a reshape back to ``C``) cannot lose heads
while the embedding width stays. An attention that loses heads becomes its pruned twin
(:func:`~lightning_prune.core.shrink.attention.register_head_dim_twins`): the same module,
parameters and call, whose ``forward`` reads ``head_dim``. Per-head state (XCA's temperature) is
sliced with its heads by the plan, as are Swin V2's logit scale and bias MLP; EVA's and Swin V2's
query/key/value bias, a ``cat`` of the query bias, a key bias buffer of zeros and the value bias, is
sliced part by part (:meth:`~lightning_prune.core.trace.bookkeeping.Bookkeeping.follow_concatenation`).
timm's Swin and ViT read ``head_dim`` from their views (``-1``) already.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask
from timm.models.cait import ClassAttn
from timm.models.eva import EvaAttention
from timm.models.pvt_v2 import Attention as PvtAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2Attention
from timm.models.xcit import XCA
from torch import Tensor, nn

from lightning_prune.core.shrink.attention import register_head_dim_twins


class PrunedXCA(XCA):
    """timm's ``XCA`` whose ``num_heads * head_dim`` may differ from its input width."""

    head_dim: int

    def forward(self, x: Tensor) -> Tensor:
        """As ``XCA.forward``: attention across each head's channels, scaled by its temperature."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 4, 1).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q * self.temperature, k, v, scale=1.0)
        else:
            attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1))
            x = attn @ v
        return self.proj_drop(self.proj(x.permute(0, 3, 1, 2).reshape(B, N, -1)))


class PrunedClassAttn(ClassAttn):
    """timm's ``ClassAttn`` (CaiT, XCiT) whose ``num_heads * head_dim`` may differ from its input width."""

    head_dim: int

    def forward(self, x: Tensor) -> Tensor:
        """As ``ClassAttn.forward``: the class token attends to every token."""
        B, N, _ = x.shape
        q = self.q(x[:, 0]).reshape(B, 1, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        if self.fused_attn:
            x_cls = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            x_cls = self.attn_drop((q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(B, 1, -1)))


class PrunedPvtAttention(PvtAttention):
    """timm's PVT-v2 ``Attention`` whose ``num_heads * head_dim`` may differ from its input width."""

    def forward(self, x: Tensor, feat_size: list[int]) -> Tensor:
        """As PVT-v2's ``Attention.forward``: keys and values from a spatially reduced (or pooled) map."""
        B, N, C = x.shape
        H, W = feat_size
        q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        if self.sr is not None:  # linear attention pools first; sr_ratio > 1 reduces by a strided conv
            x = x.permute(0, 2, 1).reshape(B, C, H, W)
            x = self.sr(x if self.pool is None else self.pool(x)).flatten(2).permute(0, 2, 1)  # sr may be pruned
            x = self.norm(x)
            x = x if self.act is None else self.act(x)
        k, v = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            x = self.attn_drop((q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


class PrunedEvaAttention(EvaAttention):
    """timm's ``EvaAttention`` (EVA-02, DINOv3) whose ``num_heads * head_dim`` may differ from its input width."""

    def forward(
        self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """As ``EvaAttention.forward``: rotary embedding past the prefix tokens, optional gate and inner norm."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            q, k, v = _joined_qkv(self, x)
        else:
            q, k, v = (
                p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
            )
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        if self.fused_attn:
            dropout = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
        return self.proj_drop(self.proj(x if gate is None else x * gate))


def _joined_qkv(attention: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query, key and value ``(B, heads, N, head_dim)`` from one ``qkv`` layer whose bias is joined from
    ``q_bias``, ``k_bias`` (zeros) and ``v_bias`` in ``forward`` (EVA-02's and Swin V2's way)."""
    B, N, _ = x.shape
    qkv_bias = None if attention.q_bias is None else torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
    if qkv_bias is not None and attention.qkv_bias_separate:
        qkv = attention.qkv(x) + qkv_bias
    else:
        qkv = F.linear(x, attention.qkv.weight, qkv_bias)
    return qkv.reshape(B, N, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class PrunedSwinV2Attention(SwinV2Attention):
    """timm's Swin V2 ``WindowAttention`` whose ``num_heads * head_dim`` may differ from its input width."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """As Swin V2's ``WindowAttention.forward``: cosine attention, per-head logit scale and bias MLP."""
        B_, N, _ = x.shape
        q, k, v = _joined_qkv(self, x)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        window = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index.view(-1)].view(window, window, -1).permute(2, 0, 1)
        attn = attn + 16 * torch.sigmoid(bias.contiguous()).unsqueeze(0)
        if mask is not None:
            attn = attn.view(-1, mask.shape[0], self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        x = (self.attn_drop(self.softmax(attn)) @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


register_head_dim_twins(
    {
        XCA: PrunedXCA,
        ClassAttn: PrunedClassAttn,
        PvtAttention: PrunedPvtAttention,
        EvaAttention: PrunedEvaAttention,
        SwinV2Attention: PrunedSwinV2Attention,
    }
)

__all__ = ["PrunedClassAttn", "PrunedEvaAttention", "PrunedPvtAttention", "PrunedSwinV2Attention", "PrunedXCA"]
