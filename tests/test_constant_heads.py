"""Heads pruned in their weights with live query/key/value biases (what NNI-style weight masks leave).

Such a head's value channels hold their bias at every position. Attention weights each row with
weights that sum to one, so whatever the queries, keys, causal or padding mask, the head outputs its
value bias, a constant the output projection's bias absorbs: the head goes. Masks are read from the
zeroed filters (``export(model, None, x)``), so the reference is the model itself, live biases included.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import RTOL, randomize
from hf_models import BASE, GPT2, GQA, tokens
from torch import nn

from lightning_prune import export, verify_equivalence

transformers = pytest.importorskip("transformers")
T = transformers

BERT = {**BASE, "max_position_embeddings": 32}


@torch.no_grad()
def zero_first_heads(model: nn.Module) -> nn.Module:
    """Zero the query, key and value rows of each attention's first 16 channels of key and value (one
    head, or one key/value head and the query heads that share it), leaving every bias live."""
    for module in model.modules():
        if hasattr(module, "k_proj") and hasattr(module, "q_proj"):  # LLaMA family: GQA, 2 query heads per group
            module.q_proj.weight[:32] = 0
            module.k_proj.weight[:16] = 0
            module.v_proj.weight[:16] = 0
        elif hasattr(module, "query") and hasattr(module, "value"):  # BERT
            for layer in (module.query, module.key, module.value):
                layer.weight[:16] = 0
        elif hasattr(module, "c_attn"):  # GPT-2: one Conv1D, query | key | value columns
            for start in (0, 64, 128):
                module.c_attn.weight[:, start : start + 16] = 0
    return model


CASES: dict[str, tuple[Callable[[], nn.Module], str]] = {  # name -> (build, output projection of layer 0)
    "qwen2-sdpa": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**GQA)), "model.layers.0.self_attn.o_proj"),
    "llama-eager": (
        lambda: T.LlamaForCausalLM._from_config(T.LlamaConfig(**GQA, attention_bias=True), attn_implementation="eager"),
        "model.layers.0.self_attn.o_proj",
    ),
    "bert": (
        lambda: T.BertForSequenceClassification(T.BertConfig(**BERT)),
        "bert.encoder.layer.0.attention.output.dense",
    ),
    "gpt2": (
        lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT2)),
        "transformer.h.0.attn.c_proj",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_heads_with_live_biases_fold_into_the_output_bias(name: str) -> None:
    """The zeroed heads go, their value bias folded into the output projection's bias: exact on a
    second input of another batch size and length, causal and bidirectional, sdpa and eager."""
    torch.manual_seed(0)
    build, projection = CASES[name]
    model = zero_first_heads(randomize(build()))
    result = export(model, None, tokens(2, 7, 0))
    for x in (tokens(2, 7, 0), tokens(3, 11, 1)):
        report = verify_equivalence(model, result.model, x, rtol=RTOL)
        assert report.passed, str(report)
    assert result.plan.heads and all(c.query < c.query_before for c in result.plan.heads.values())
    folded = {note.layer for note in result.notes if note.action == "folded into bias"}
    assert projection in folded


class SigmoidAttention(nn.Module):
    """Attention whose weights do not sum to one (a sigmoid of the scores): a constant value is
    scaled by a data-dependent sum, so a head with a live value bias must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (layer(x).view(b, n, 2, 4).transpose(1, 2) for layer in (self.q, self.k, self.v))
        weights = torch.sigmoid(q @ k.transpose(-1, -2))
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, 8))


def test_weights_that_do_not_sum_to_one_keep_the_head() -> None:
    """No fold without weights that sum to one: the head with a live value bias is kept, with a note."""
    torch.manual_seed(0)
    model = randomize(SigmoidAttention())
    with torch.no_grad():
        for layer in (model.q, model.k, model.v):
            layer.weight[:4] = 0
    result = export(model, None, torch.randn(2, 5, 8))
    assert not result.plan.heads and result.model.v.out_features == 8
    assert any(note.layer == "v" and note.action == "kept" for note in result.notes)
    assert verify_equivalence(model, result.model, torch.randn(3, 6, 8), rtol=RTOL).passed
