"""The attention rules on hand-written attention, one form per case: whole heads go, exactly.

Each model embeds tokens with a Linear, runs one attention block written one way (``@`` with a
softmax, ``scaled_dot_product_attention``, ``einsum``, ``baddbmm`` over merged batch and heads,
grouped-query attention, rotary embeddings with a query/key RMSNorm, XCiT's channel attention)
and projects back. Group masks at 50% must remove heads, and the export must equal the masked model
on another batch size and sequence length. Then what must keep heads does, with its reason, and a
user's attention class is taught by one registered function.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import RTOL, randomize, zero_norm_affine
from torch import nn

from lightning_prune import ChannelGraph, export, group_masks, verify_equivalence
from lightning_prune.core.shrink.attention import _UPDATERS, register_attention
from lightning_prune.core.verify.report import count_params

WIDTH, HEADS = 32, 4


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention in the form ``form``; ``heads`` is read by ``forward`` (export updates it)."""

    def __init__(self, form: str, kv_heads: int = HEADS) -> None:
        super().__init__()
        self.form, self.num_heads, self.num_key_value_heads = form, HEADS, kv_heads
        self.head_dim = WIDTH // HEADS
        self.q = nn.Linear(WIDTH, WIDTH)
        self.kv = nn.Linear(WIDTH, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.q_norm = nn.Parameter(torch.rand(self.head_dim) + 0.5)  # an RMSNorm over head_dim, written out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.form == "rotary":
            q = self.q_norm * q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
            angles = torch.arange(n)[:, None] * torch.arange(self.head_dim)[None, :] / self.head_dim
            q = q * angles.cos() + rotate_half(q) * angles.sin()
            k = k * angles.cos() + rotate_half(k) * angles.sin()
        if self.form in ("matmul", "rotary"):
            scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            out = scores.softmax(-1) @ v
        elif self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.form == "gqa":
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif self.form == "einsum":
            scores = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
            out = torch.einsum("bhij,bhjd->bhid", scores, v)
        elif self.form == "baddbmm":
            causal = torch.full((n, n), float("-inf")).triu(1).expand(b * self.num_heads, n, n)
            scores = torch.baddbmm(causal, q.reshape(-1, n, self.head_dim), k.reshape(-1, n, self.head_dim).mT)
            out = (scores.softmax(-1) @ v.reshape(-1, n, self.head_dim)).view(b, -1, n, self.head_dim)
        else:  # "channels": XCiT's cross-covariance attention, head_dim x head_dim per head
            q, k = F.normalize(q.transpose(-2, -1), dim=-1), F.normalize(k.transpose(-2, -1), dim=-1)
            out = ((q @ k.transpose(-2, -1)).softmax(-1) @ v.transpose(-2, -1)).transpose(-2, -1)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Net(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(6, WIDTH)
        self.attn = attention
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        return self.head(x + self.attn(x, *extra))


def exported(attention: nn.Module, sparsity: float = 0.5):
    torch.manual_seed(0)
    model = randomize(Net(attention))
    example = (
        (torch.randn(2, 5, 6), torch.randint(1, 4, (2, HEADS)))
        if isinstance(attention, PerHeadData)
        else torch.randn(2, 5, 6)
    )
    graph = ChannelGraph.from_model(model, example)
    masks = group_masks(graph, sparsity, model=model, layers=["attn.q", "attn.kv"])
    return model, masks, example, graph, export(model, masks, example, whole_channel=True)


FORMS = ["matmul", "sdpa", "einsum", "baddbmm", "rotary", "channels"]


@pytest.mark.parametrize("form", [pytest.param(f, id=f) for f in [*FORMS, "gqa"]])
def test_whole_heads_go_exactly(form: str) -> None:
    attention = Attention(form, kv_heads=2 if form == "gqa" else HEADS)
    model, masks, example, _, result = exported(attention)
    reference = zero_norm_affine(model, masks, example)
    for x in (example, torch.randn(3, 7, 6)):  # another batch size and sequence length
        report = verify_equivalence(reference, result.model, x, rtol=RTOL)
        assert report.passed, f"{form} on {tuple(x.shape)}: {report}"
    assert count_params(result.model) < count_params(model)
    small = result.model.attn
    assert small.num_heads == 2 and small.q.out_features == 2 * small.head_dim
    assert small.kv.out_features == (2 if form == "gqa" else 4) * small.head_dim  # a key/value head and its queries
    assert [note.unit for note in result.notes if note.layer == "attn"] == ["head(s)"]


class PerHeadData(Attention):
    """Scores scaled by a data-dependent factor that differs per head: heads cannot move."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        per_head = ids.float()[:, :, None, None]  # (b, heads, 1, 1) from the data
        return self.proj(((q @ k.mT) * per_head).softmax(-1).matmul(v).transpose(1, 2).reshape(b, n, -1))


class FirstHeads(Attention):
    """Only the first two heads are used, by a slice the code fixes: they cannot move."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.head_dim).transpose(1, 2)[:, :2]
        k, v = self.kv(x).view(b, n, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k[:, :2], v[:, :2])
        return self.proj(torch.cat([out.transpose(1, 2).reshape(b, n, -1)] * 2, -1))


@pytest.mark.parametrize(
    "attention, reason",
    [
        pytest.param(PerHeadData("matmul"), "combines them position by position", id="per_head_data"),
        pytest.param(FirstHeads("sdpa"), "keeps a fixed part of them", id="fixed_heads"),
    ],
)
def test_what_heads_cannot_survive_keeps_them(attention: nn.Module, reason: str) -> None:
    model, _, example, graph, result = exported(attention)
    assert result.model.attn.num_heads == HEADS and not result.plan.heads
    labels = graph.producers["attn.q"].numpy()
    reasons = {graph.reasons[i] for i in graph.block_reason[graph.root[labels]] if i >= 0}
    assert any(reason in r for r in reasons), reasons
    assert verify_equivalence(zero_norm_affine(model, {}, example), result.model, example).passed


class OwnAttention(Attention):
    """A user's class whose view reads an attribute no built-in updater knows."""

    def __init__(self) -> None:
        super().__init__("sdpa")
        self.groups = HEADS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.groups, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.groups, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


def test_an_attention_export_cannot_update_keeps_its_heads_with_a_note_then_one_function_teaches_it() -> None:
    model, masks, example, _, result = exported(OwnAttention())
    assert result.model.attn.groups == HEADS and result.model.attn.q.out_features == WIDTH
    assert any("'attn'" in note.reason for note in result.notes if note.action == "kept")

    register_attention(OwnAttention)(lambda module, counts: setattr(module, "groups", counts.query))
    try:
        model, masks, example, _, result = exported(OwnAttention())
    finally:
        del _UPDATERS[OwnAttention]
    assert result.model.attn.groups == 2
    reference = zero_norm_affine(model, masks, example)
    assert verify_equivalence(reference, result.model, torch.randn(3, 7, 6), rtol=RTOL).passed


class JoinedBias(nn.Module):
    """BEiT's and EVA's form: one query/key/value weight without a bias, the bias joined in ``forward``
    from the query bias, a key bias of zeros (``key_bias`` says how it is made) and the value bias."""

    def __init__(self, key_bias: str) -> None:
        super().__init__()
        self.key_bias, self.num_heads = key_bias, HEADS
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(WIDTH)), nn.Parameter(torch.zeros(WIDTH))
        self.register_buffer("k_bias", torch.zeros(WIDTH), persistent=False)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        keys = {
            "buffer": lambda: self.k_bias,
            "zeros_like": lambda: torch.zeros_like(self.v_bias, requires_grad=False),
            "zeros": lambda: torch.zeros(self.v_bias.shape[0]),
            "data": lambda: x.mean((0, 1)),  # computed from the input: export cannot slice it
        }
        bias = torch.cat((self.q_bias, keys[self.key_bias](), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("key_bias", ["buffer", "zeros_like", "zeros", "data"])
def test_a_bias_joined_in_forward_is_sliced_part_by_part(key_bias: str) -> None:
    """Parts made from parameters, buffers and constants are sliced with the heads (randomized query and
    value biases: the kept heads' values, in order); a part computed from data keeps the heads, saying why."""
    torch.manual_seed(0)
    model, example = randomize(Net(JoinedBias(key_bias))), torch.randn(2, 5, 6)
    masks = group_masks(ChannelGraph.from_model(model, example), 0.5, model=model, layers=["attn.qkv", "attn.proj"])
    result = export(model, masks, example, whole_channel=True)
    if key_bias == "data":
        assert not masks and not result.plan.heads
        assert any("adds a computed bias" in reason for reason in result.graph.reasons), result.graph.reasons
        return
    reference = zero_norm_affine(model, masks, example)
    assert not verify_equivalence(model, reference, example, rtol=RTOL).passed
    for x in (example, torch.randn(3, 7, 6)):
        assert verify_equivalence(reference, result.model, x, rtol=RTOL).passed
    kept = list(result.plan.heads["attn"].kept)
    assert len(kept) == 2 and result.model.attn.num_heads == 2
    for name in ("q_bias", "v_bias"):
        before = model.attn.get_parameter(name).view(HEADS, -1)
        assert torch.equal(result.model.attn.get_parameter(name), before[kept].flatten()), name
    if key_bias == "buffer":
        assert result.model.attn.k_bias.numel() == 2 * WIDTH // HEADS
