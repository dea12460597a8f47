"""T5's heads: a relative position bias shared by every layer of a stack, and cross-attention's zero bias.

``T5Attention`` reads ``n_heads`` and ``inner_dim``; the first layer of each stack (encoder, decoder)
holds the relative position table (``nn.Embedding(buckets, heads)``), and the bias it computes is
handed to every later layer. Its channel ``j`` is added to the scores of head ``j`` in every layer,
so the trace couples those heads: each stack's self-attention layers keep the same heads and the
table keeps their columns. Cross-attention layers have no table: the first builds a zero bias for
its heads and hands it on, so a later layer that keeps another number of heads builds its own.
Checked in sdpa and eager, exact to 1e-5 on a second input of another batch size and lengths.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest
import torch
from helpers import RTOL, randomize, zero_norm_affine
from hf_models import T5, VOCAB, LogitsOnly, tokens
from torch import nn
from torch.nn import functional as F

from lightning_prune import ChannelGraph, export, group_masks, verify_equivalence

transformers = pytest.importorskip("transformers")
T = transformers

IMPLEMENTATIONS = ["sdpa", "eager"]
CROSS_BLOCK_0 = r"decoder\.block\.0\.layer\.1\."
"""The first decoder block's cross-attention: masks on it alone prune heads of that layer only."""


@functools.cache
def exported(implementation: str, layers: str = "") -> tuple[nn.Module, nn.Module, Any]:
    """``(model, masked reference, export result)`` at 50% group masks over the groups inside the
    modules matching ``layers`` (every group where empty)."""
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration._from_config(T.T5Config(**T5), attn_implementation=implementation)
    model = randomize(LogitsOnly(model))
    x = tokens(2, 7, 0, decoder=True)
    allowed = [name for name, _ in model.named_modules() if re.search(layers, name)] if layers else None
    masks = group_masks(ChannelGraph.from_model(model, x), 0.5, model=model, layers=allowed)
    return model, zero_norm_affine(model, masks, x), export(model, masks, x, whole_channel=True)


def assert_exact(reference: nn.Module, model: nn.Module) -> None:
    for x in (tokens(2, 7, 0, decoder=True), tokens(3, 11, 1, decoder=True)):
        report = verify_equivalence(reference, model, x, rtol=RTOL)
        assert report.passed, str(report)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_heads_go_with_their_relative_position_bias(implementation: str) -> None:
    """Every attention (encoder self, decoder self and cross) loses half its heads; each stack's
    self-attention layers keep the same heads, and the first layer's table keeps their columns."""
    model, reference, result = exported(implementation)
    assert_exact(reference, result.model)
    attentions = [name for name, m in model.named_modules() if isinstance(m, T.models.t5.modeling_t5.T5Attention)]
    assert set(result.plan.heads) == set(attentions)
    for name in attentions:
        after = result.model.get_submodule(name)
        assert after.n_heads == 2 and after.inner_dim == 32 and after.q.out_features == 32
    for stack in ("encoder", "decoder"):
        kept = {c.kept for n, c in result.plan.heads.items() if f"{stack}." in n and "SelfAttention" in n}
        assert len(kept) == 1, f"{stack} self-attention layers keep different heads: {kept}"
        table = f"model.{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
        before, after = model.get_submodule(table), result.model.get_submodule(table)
        assert after.num_embeddings == before.num_embeddings and after.embedding_dim == 2
        assert torch.equal(after.weight, before.weight[:, list(kept.pop())])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cross_attention_layers_keep_heads_of_their_own(implementation: str) -> None:
    """Heads pruned in the first cross-attention only: the next one (all its heads) builds its own zero
    bias instead of the first's, exactly, and generation through the key/value cache agrees."""
    _, reference, result = exported(implementation, CROSS_BLOCK_0)
    assert list(result.plan.heads) == ["model.decoder.block.0.layer.1.EncDecAttention"]
    decoder = result.model.model.decoder
    assert [block.layer[1].EncDecAttention.n_heads for block in decoder.block] == [2, 4]
    assert_exact(reference, result.model)
    prompt = {"input_ids": torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))}
    settings = {"max_new_tokens": 4, "do_sample": False, "decoder_start_token_id": 0}
    assert torch.equal(
        result.model.model.generate(**prompt, **settings), reference.model.generate(**prompt, **settings)
    )


class SharedBiasStack(nn.Module):
    """A user's two sdpa attention layers sharing one per-head bias from a table (T5's pattern, in
    plain torch). Given ``per_head`` ids, the bias is computed from them instead: no channel explains
    it, so the heads must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(8, 4)  # bucket -> one bias per head
        self.qkv = nn.ModuleList(nn.Linear(16, 48) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

    def forward(self, x: torch.Tensor, per_head: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        buckets = (torch.arange(n)[None] - torch.arange(n)[:, None]).clamp(-4, 3) + 4
        bias = self.table(buckets).permute(2, 0, 1)[None]  # (1, heads, n, n)
        if per_head is not None:
            bias = per_head.float()[:, :, None, None].expand(b, 4, n, n)
        for qkv, out in zip(self.qkv, self.out, strict=True):
            q, k, v = qkv(x).view(b, n, 3, -1, 4).permute(2, 0, 3, 1, 4)
            x = out(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, -1))
        return x


def test_a_per_head_bias_from_a_table_ties_the_heads_of_every_layer_it_reaches() -> None:
    """The table's column j goes with head j of both layers: both keep the same heads, exactly."""
    torch.manual_seed(0)
    model = randomize(SharedBiasStack())
    x = torch.randn(2, 5, 16)
    masks = group_masks(ChannelGraph.from_model(model, x), 0.5, model=model)
    result = export(model, masks, x, whole_channel=True)
    assert torch.equal(result.masks["qkv.0"], result.masks["qkv.1"])  # one group: the same heads
    assert [layer.out_features for layer in result.model.qkv] == [24, 24]
    assert result.model.table.embedding_dim == 2
    report = verify_equivalence(zero_norm_affine(model, masks, x), result.model, torch.randn(3, 7, 16), rtol=RTOL)
    assert report.passed, str(report)


def test_a_per_head_mask_from_the_data_keeps_the_heads() -> None:
    """A mask that differs per head and carries no channel: the heads stay, with the reason."""
    model = SharedBiasStack()
    graph = ChannelGraph.from_model(model, (torch.randn(2, 5, 16), torch.randint(0, 3, (2, 4))))
    labels = graph.producers["qkv.0"].numpy()
    assert graph.blocked[graph.root[labels]].all()
    reasons = {graph.reasons[code] for code in graph.block_reason[graph.root[labels]].tolist()}
    assert reasons == {"op 'scaled_dot_product_attention' meets an attention mask that differs per head"}
