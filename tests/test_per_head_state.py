"""Attention whose heads carry state of their own: the state is sliced with the heads that go.

Cohere's query/key norm has a ``(heads, head_dim)`` weight; GPT-J and Cohere rotate queries and
keys in interleaved pairs (``x[..., ::2]``, ``x[..., 1::2]``, stacked and flattened), which gives
half of a head's channels labels of their own; DeBERTa-v2's disentangled attention picks its
relative-position scores per query with ``torch.gather``; BLOOM's model builds ALiBi biases for all
its heads once per forward, which each attention must cut to the heads it kept; StableLM's
``qk_layernorm`` is one LayerNorm module per head, applied through a split into one piece per head. At 50% group masks both lose heads, exactly on a
second input of another batch size and length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from helpers import RTOL, randomize, zero_norm_affine
from hf_models import BASE, GQA, VOCAB, tokens
from torch import nn

from lightning_prune import ChannelGraph, apply_masks, export, group_masks, verify_equivalence
from lightning_prune.core.verify.report import count_params

transformers = pytest.importorskip("transformers")
T = transformers


BUILDS: dict[str, Callable[[], nn.Module]] = {
    "cohere-qk-norm": lambda: T.CohereForCausalLM(T.CohereConfig(**GQA, use_qk_norm=True)),
    "deberta-v2": lambda: T.DebertaV2ForSequenceClassification(
        T.DebertaV2Config(
            **BASE,
            max_position_embeddings=32,
            relative_attention=True,
            pos_att_type=["c2p", "p2c"],
            position_buckets=8,
        )
    ),
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_head=4, n_layer=2)),
    "stablelm-qk-layernorm": lambda: T.StableLmForCausalLM(T.StableLmConfig(**GQA, qk_layernorm=True)),
    "gpt-j": lambda: T.GPTJForCausalLM(
        T.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=32)
    ),
}


@torch.no_grad()
def randomize_head_norms(model: nn.Module) -> nn.Module:
    """Cohere's query/key norm weights away from one, so a wrong slice shows."""
    generator = torch.Generator().manual_seed(2)
    for name, parameter in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model


@functools.cache
def exported(name: str) -> tuple[nn.Module, nn.Module, object]:
    torch.manual_seed(0)
    model = randomize_head_norms(randomize(BUILDS[name]()))
    masks = group_masks(ChannelGraph.from_model(model, tokens(2, 7, 0)), 0.5, model=model)
    result = export(model, masks, tokens(2, 7, 0), whole_channel=True)
    return model, zero_norm_affine(model, masks, tokens(2, 7, 0)), result


@pytest.mark.parametrize("name", list(BUILDS))
def test_heads_with_their_own_state_go_exactly(name: str) -> None:
    model, reference, result = exported(name)
    assert not verify_equivalence(model, reference, tokens(2, 7, 0), rtol=RTOL).passed
    for x in (tokens(2, 7, 0), tokens(3, 11, 1)):
        report = verify_equivalence(reference, result.model, x, rtol=RTOL)
        assert report.passed, str(report)
    assert result.plan.heads and all(c.query < c.query_before for c in result.plan.heads.values())
    assert count_params(result.model) < count_params(model)


def test_per_head_norm_weight_is_sliced_by_heads() -> None:
    """Cohere's (heads, head_dim) query norm weight loses the rows of the heads that go."""
    model, _, result = exported("cohere-qk-norm")
    name = next(iter(result.plan.heads))
    counts = result.plan.heads[name]
    weight = result.model.get_submodule(name).q_norm.weight
    assert weight.shape == (counts.query, counts.head_dim)
    assert model.get_submodule(name).q_norm.weight.shape == (counts.query_before, counts.head_dim)


def test_gather_along_the_channels_keeps_them() -> None:
    """torch.gather that picks along the channels themselves cannot follow them: they are kept, with a note."""

    class Pick(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.first(x)
            return self.second(torch.gather(y, -1, torch.arange(7, -1, -1).expand_as(y)))

    masks = {"first": torch.arange(8) < 4}
    model = Pick().eval()
    result = export(model, masks, torch.randn(3, 4))
    assert result.model.first.out_features == 8
    assert any("op 'gather' gathers along their dim" in note.reason for note in result.notes)
    assert verify_equivalence(apply_masks(model, masks), result.model, torch.randn(5, 4), rtol=RTOL).passed


@pytest.mark.parametrize("name", ["bloom", "stablelm-qk-layernorm"])
def test_generate_and_round_trip_with_per_head_state(tmp_path, name: str) -> None:
    """BLOOM's pruned attentions keep the ALiBi slopes of their own heads, StableLM's the norms of their
    own heads: generate through the cache matches the masked model, and from_pretrained(dir) rebuilds
    the model (BLOOM's config never says fewer heads: the model would build other slopes from it)."""
    from lightning_prune import from_pretrained

    model, reference, result = exported(name)
    prompt = {"input_ids": torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))}
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(result.model.generate(**prompt, **settings), reference.generate(**prompt, **settings))
    if name == "bloom":
        assert result.model.config.n_head == model.config.n_head
    else:  # one norm module per kept head, in order
        counts = next(iter(result.plan.heads.values()))
        norms = next(m for n, m in result.model.named_modules() if n.endswith("self_attn")).q_layernorm.norms
        assert len(norms) == counts.query
    result.model.save_pretrained(tmp_path)
    rebuilt = from_pretrained(tmp_path)
    assert verify_equivalence(result.model, rebuilt, tokens(3, 11, 1), rtol=RTOL).passed
