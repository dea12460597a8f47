"""``nn.MultiheadAttention`` after export: fewer heads, and possibly narrower inputs.

``nn.MultiheadAttention`` needs its inner width (heads times ``head_dim``) to equal its input
width (``embed_dim``), so once heads or embedding channels go it cannot stay one. Its shrinker
returns a :class:`PrunedMultiheadAttention`: the same call and return value as
``nn.MultiheadAttention.forward`` (``(output, weights or None)``, ``batch_first``, masks, ``bias_k``/
``bias_v``, ``add_zero_attn``, ``is_causal``), computing what the masked module computes.

The attention weights returned with ``need_weights=True`` cover every head the module had: a
pruned head's query and key projections are their biases alone (the masked weights are zero), so
its weights are ``softmax(b_q . b_k / sqrt(head_dim) + mask)`` over the keys, which this module
recomputes from those biases (kept as buffers). The heads' average, or each head's weights at its
original position, are then those of the masked module.

>>> import torch
>>> from torch import nn
>>> from lightning_prune import export_pruned_model
>>> model = nn.MultiheadAttention(16, 4, batch_first=True)
>>> keep = {"": (torch.arange(48) % 16 < 8)}  # heads 0 and 1 of the query, key and value channels
>>> small = export_pruned_model(model, keep, (torch.randn(2, 5, 16),) * 3)
>>> small.num_heads, small.in_proj_weight.shape
(2, torch.Size([24, 16]))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.core.graph.changes import HeadCounts, LayerChange
from lightning_prune.core.shrink.attention import register_attention
from lightning_prune.core.shrink.registry import register_shrinker, shrink_parameters


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` of the ``heads_before`` heads an ``nn.MultiheadAttention`` had.

    Parameters keep ``nn.MultiheadAttention``'s names (``in_proj_weight`` or ``q/k/v_proj_weight``,
    ``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj``); their widths come from the tensors. The
    buffers ``head_index`` and ``ghost_index`` hold the original positions of the kept and the pruned
    heads, ``ghost_query_bias``/``ghost_key_bias``/``ghost_bias_k`` the pruned heads' query and key
    biases (what their attention weights depend on).
    """

    def __init__(
        self,
        source: nn.MultiheadAttention,
        head_index: Tensor,
        ghost_index: Tensor,
        ghost_query_bias: Tensor,
        ghost_key_bias: Tensor,
        ghost_bias_k: Tensor | None,
    ) -> None:
        super().__init__()
        self.num_heads = int(head_index.numel())
        self.heads_before = int(source.num_heads)
        self.head_dim = int(source.head_dim)
        self.batch_first = bool(source.batch_first)
        self.dropout = float(source.dropout)
        self.add_zero_attn = bool(source.add_zero_attn)
        # nn.TransformerEncoderLayer and nn.TransformerEncoder read this to choose their fused fast
        # path, which assumes embed_dim == num_heads * head_dim; False keeps them on the plain path.
        self._qkv_same_embed_dim = False
        self.packed = bool(source._qkv_same_embed_dim)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            self.register_parameter(name, getattr(source, name, None))
        self.bias_k, self.bias_v = source.bias_k, source.bias_v
        self.out_proj = source.out_proj
        self.register_buffer("head_index", head_index.long())
        self.register_buffer("ghost_index", ghost_index.long())
        self.register_buffer("head_order", torch.argsort(torch.cat([head_index, ghost_index]).long()))
        self.register_buffer("ghost_query_bias", ghost_query_bias)
        self.register_buffer("ghost_key_bias", ghost_key_bias)
        self.register_buffer("ghost_bias_k", ghost_bias_k)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(output, attention weights or None)``."""
        batched = query.dim() == 3
        if batched and self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        elif not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        length, batch = query.shape[0], query.shape[1]
        mask = self._mask(attn_mask, key_padding_mask, query.dtype, batch, length)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention).")
        causal = is_causal and key_padding_mask is None and not need_weights
        q, k, v = self._project(query, key, value)
        q, k, v = self._split(q, batch), self._keys(k, self.bias_k, batch), self._keys(v, self.bias_v, batch)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            weights = self._weights(q, k, _heads(mask, self.head_index))
            out = F.dropout(weights, dropout) @ v if dropout > 0 else weights @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, None if causal else _heads(mask, self.head_index), dropout, causal
            )
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length * batch, -1)).view(length, batch, -1)
        if weights is not None:
            weights = self._all_heads(weights, query, key, mask, average_attn_weights)
        if not batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        bias = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        if not self.packed:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, bias, strict=True))
        if query is key and key is value:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
        weights = self.in_proj_weight.chunk(3)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, bias, strict=True))

    def _split(self, x: Tensor, batch: int) -> Tensor:
        """``(tokens, batch, heads * head_dim)`` -> ``(batch, heads, tokens, head_dim)``."""
        return x.reshape(x.shape[0], batch, -1, self.head_dim).permute(1, 2, 0, 3)

    def _keys(self, x: Tensor, extra: Tensor | None, batch: int) -> Tensor:
        """Keys or values by head, with the ``bias_k``/``bias_v`` token and the zero-attention key appended."""
        if extra is not None:
            x = torch.cat([x, extra.expand(1, batch, -1)])
        x = self._split(x, batch)
        if self.add_zero_attn:
            x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])], 2)
        return x

    def _mask(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, dtype: torch.dtype, batch: int, length: int
    ) -> Tensor | None:
        """Both masks as one additive mask of shape ``(batch or 1, heads_before or 1, length, keys)``."""
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        mask = None
        if attn_mask is not None:
            attn_mask = _additive(attn_mask, dtype)
            heads = self.heads_before if attn_mask.dim() == 3 else 1
            mask = attn_mask.reshape(-1, heads, length, attn_mask.shape[-1])
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).reshape(batch, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        return F.pad(mask, (0, extra)) if mask is not None and extra else mask

    def _weights(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
        return torch.softmax(scores if mask is None else scores + mask, dim=-1)

    def _all_heads(self, weights: Tensor, query: Tensor, key: Tensor, mask: Tensor | None, average: bool) -> Tensor:
        """The kept heads' weights with the pruned heads' put back at their positions (or the average of all)."""
        if self.ghost_index.numel():
            batch, ghosts = query.shape[1], self.ghost_index.numel()
            q = self.ghost_query_bias.reshape(1, ghosts, 1, self.head_dim).expand(batch, -1, query.shape[0], -1)
            k = self.ghost_key_bias.reshape(1, 1, -1).expand(key.shape[0], batch, -1)
            k = self._keys(k, self.ghost_bias_k, batch)
            ghost = self._weights(q.to(weights.dtype), k.to(weights.dtype), _heads(mask, self.ghost_index))
            weights = torch.cat([weights, ghost], 1).index_select(1, self.head_order)
        return weights.mean(dim=1) if average else weights

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, heads_before={self.heads_before}, head_dim={self.head_dim}, batch_first={self.batch_first}"


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (``True``: not attended) as ``-inf``/0, as ``nn.MultiheadAttention`` reads it; a float one as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


def _heads(mask: Tensor | None, index: Tensor) -> Tensor | None:
    """The rows of a per-head mask for the heads ``index`` names (a mask shared by all heads as it is)."""
    return mask.index_select(1, index) if mask is not None and mask.shape[1] > 1 else mask


@register_shrinker(nn.MultiheadAttention)
@torch.no_grad()
def shrink_multihead_attention(module: nn.MultiheadAttention, change: LayerChange) -> PrunedMultiheadAttention:
    """Slice the projections as ``change`` says and return a :class:`PrunedMultiheadAttention`.

    The kept heads are read from the query rows kept: the first third of the kept projection rows
    (whole heads keep their query, key and value rows alike).
    """
    width, head_dim = module.embed_dim, module.head_dim
    name = "in_proj_weight" if module._qkv_same_embed_dim else "q_proj_weight"
    rows = change.keep.get((name, 0), (torch.arange(3 * width if module._qkv_same_embed_dim else width), 1))[0]
    query_rows = rows.sort().values[: rows.numel() // 3] if module._qkv_same_embed_dim else rows
    kept = torch.unique(query_rows // head_dim)
    ghost = torch.tensor([h for h in range(module.num_heads) if h not in set(kept.tolist())], dtype=torch.long)
    ghost_rows = (ghost[:, None] * head_dim + torch.arange(head_dim)).flatten()
    bias = module.in_proj_bias if module.in_proj_bias is not None else module.out_proj.weight.new_zeros(3 * width)
    ghost_bias_k = None if module.bias_k is None else module.bias_k.reshape(width)[ghost_rows].detach().clone()
    shrink_parameters(module, change)
    return PrunedMultiheadAttention(
        module, kept, ghost, bias[ghost_rows].detach().clone(), bias[width + ghost_rows].detach().clone(), ghost_bias_k
    )


@register_attention(PrunedMultiheadAttention)
def check_multihead_heads(module: PrunedMultiheadAttention, counts: HeadCounts) -> None:
    """The shrinker sized the module already; a count that disagrees with the plan's is a bug, said plainly."""
    if module.num_heads != counts.query:
        raise RuntimeError(f"PrunedMultiheadAttention kept {module.num_heads} heads; the plan kept {counts.query}.")


__all__ = ["PrunedMultiheadAttention", "shrink_multihead_attention"]
