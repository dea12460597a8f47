"""Attention whose heads carry state of their own: the state is sliced with the heads that go.

Cohere's query/key norm has a ``(heads, head_dim)`` weight; GPT-J and Cohere rotate queries and
keys in interleaved pairs (``x[..., ::2]``, ``x[..., 1::2]``, stacked and flattened), which gives
half of a head's channels labels of their own; DeBERTa-v2's disentangled attention picks its
relative-position scores per query with ``torch.gather``; BLOOM's model builds ALiBi biases for all
its heads once per forward, which each attention must cut to the heads it kept; StableLM's
``qk_layernorm`` is one LayerNorm module per head, applied through a split into one piece per head; Beam
adds a bias per head (``gate_bias[None, None, :, None]``) to its output gate. At 50% group masks each
loses heads, exactly on a second input of another batch size and length. A user's attention with a
learnable gate per head (``[heads]``, ``[heads, 1, 1]``, ``[1, heads, 1, 1]`` or ``[heads, 1]``, through
``sigmoid`` or ``tanh``, before the heads are merged) keeps the gates of its kept heads, in order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
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
if hasattr(T, "BeamForCausalLM"):  # a sigmoid output gate with one bias per head; dense MLPs at this depth
    BUILDS["beam-gate-bias"] = lambda: T.BeamForCausalLM(
        T.BeamConfig(
            **GQA, head_dim=16, num_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, sliding_window=4
        )
    )


@torch.no_grad()
def randomize_head_norms(model: nn.Module) -> nn.Module:
    """Cohere's query/key norm weights away from one and Beam's gate biases away from zero, so a wrong slice shows."""
    generator = torch.Generator().manual_seed(2)
    for name, parameter in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight", "gate_bias")):
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


@pytest.mark.parametrize("name", list(BUILDS))
def test_round_trip_with_per_head_state(tmp_path, name: str) -> None:
    """save_pretrained, then from_pretrained(dir) alone: the per-head state (norms, relative positions,
    ALiBi, interleaved rotary, gates) comes back with the kept heads, exact on a second input."""
    from lightning_prune import from_pretrained

    model, _, result = exported(name)
    result.model.save_pretrained(tmp_path)
    rebuilt = from_pretrained(tmp_path)
    assert count_params(rebuilt) == count_params(result.model) < count_params(model)
    assert verify_equivalence(result.model, rebuilt, tokens(3, 11, 1), rtol=RTOL).passed


def test_per_head_gate_bias_is_sliced_by_heads() -> None:
    """Beam's gate bias (one per query head) keeps its kept heads' values, in order."""
    if "beam-gate-bias" not in BUILDS:
        pytest.skip("this transformers has no Beam")
    model, _, result = exported("beam-gate-bias")
    assert result.plan.heads
    for name, counts in result.plan.heads.items():
        before, after = model.get_submodule(name).gate_bias, result.model.get_submodule(name).gate_bias
        assert torch.equal(after, before[list(counts.kept)]) and after.numel() == counts.query < before.numel()


GATES = {  # gate shape, activation, applied to (batch, heads, tokens, head_dim) or (batch, tokens, heads, head_dim)
    "heads-sigmoid": ((4,), torch.sigmoid, "bhtd"),
    "heads11-sigmoid": ((4, 1, 1), torch.sigmoid, "bhtd"),
    "1heads11-tanh": ((1, 4, 1, 1), torch.tanh, "bhtd"),
    "heads1-tanh-tokens-first": ((4, 1), torch.tanh, "bthd"),
}


class GatedAttention(nn.Module):
    """A user's self-attention whose heads each have a learnable gate, applied before the heads are merged."""

    def __init__(self, dim: int, num_heads: int, gate: str, fused: bool) -> None:
        super().__init__()
        self.num_heads, self.fused = num_heads, fused
        shape, self.activation, self.layout = GATES[gate]
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v
        gate = self.activation(self.gate)
        if self.layout == "bthd":
            out = out.transpose(1, 2) * gate
        else:
            out = (out * (gate.view(1, -1, 1, 1) if gate.ndim == 1 else gate)).transpose(1, 2)
        return self.proj(out.reshape(B, N, -1))


class GatedEncoder(nn.Module):
    """Tokens in, two pre-norm gated attention blocks, a mean-pooled classifier."""

    def __init__(self, gate: str, fused: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.norms = nn.ModuleList(nn.LayerNorm(32) for _ in range(2))
        self.blocks = nn.ModuleList(GatedAttention(32, 4, gate, fused) for _ in range(2))
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for norm, block in zip(self.norms, self.blocks, strict=True):
            h = h + block(norm(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize(
    ("gate", "fused"),
    [pytest.param(gate, True, id=gate) for gate in GATES] + [pytest.param("heads11-sigmoid", False, id="explicit")],
)
def test_per_head_gates_are_sliced_with_their_heads(gate: str, fused: bool) -> None:
    """Half the heads of each attention go (group masks over its projections); each gate keeps its kept
    heads' values in order, and the export equals the masked model on another batch size and length."""
    torch.manual_seed(0)
    model = randomize(GatedEncoder(gate, fused))
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(1))
    layers = [f"blocks.{i}.{name}" for i in range(2) for name in ("qkv", "proj")]
    masks = group_masks(ChannelGraph.from_model(model, x), 0.5, model=model, layers=layers)
    reference, result = zero_norm_affine(model, masks, x), export(model, masks, x, whole_channel=True)
    assert not verify_equivalence(model, reference, x, rtol=RTOL).passed
    for other in (x, torch.randn(3, 11, 8, generator=torch.Generator().manual_seed(2))):
        report = verify_equivalence(reference, result.model, other, rtol=RTOL)
        assert report.passed, str(report)
    assert result.plan.heads.keys() == {"blocks.0", "blocks.1"}, [str(note) for note in result.notes]
    for name, counts in result.plan.heads.items():
        before, after = model.get_submodule(name), result.model.get_submodule(name)
        assert after.num_heads == counts.query == 2 < before.num_heads == 4
        heads_dim = next(d for d, size in enumerate(before.gate.shape) if size == 4)
        assert torch.equal(after.gate, before.gate.index_select(heads_dim, torch.tensor(counts.kept)))
