"""timm's attention classes whose ``forward`` derives ``head_dim`` from the input width.

Imported only once ``timm`` is (:func:`~lightning_prune.core.integrations.load_integrations`).
XCiT's cross-covariance attention (``XCA``: ``C // num_heads``, its per-head ``temperature``), the
class attention XCiT and CaiT share (``ClassAttn``) and PVT-v2's ``Attention`` (a reshape back to
``C``) cannot lose heads while the embedding width stays. An attention that loses heads becomes its
pruned twin (:func:`~lightning_prune.core.shrink.attention.register_head_dim_twins`): the same module,
parameters and call, whose ``forward`` reads ``head_dim``. Per-head state (XCA's temperature) is
sliced with its heads by the plan. timm's Swin, ViT and EVA read ``head_dim`` from their views
(``-1``) already.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.models.cait import ClassAttn
from timm.models.pvt_v2 import Attention as PvtAttention
from timm.models.xcit import XCA
from torch import Tensor

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


register_head_dim_twins({XCA: PrunedXCA, ClassAttn: PrunedClassAttn, PvtAttention: PrunedPvtAttention})

__all__ = ["PrunedClassAttn", "PrunedPvtAttention", "PrunedXCA"]
