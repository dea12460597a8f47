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
