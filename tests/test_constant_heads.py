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
from helpers import RTOL, TINY_VIT, images, randomize
from hf_models import BASE, BLOOM, GPT2, GQA, OPT, tokens
from torch import nn

from lightning_prune import export, verify_equivalence

transformers = pytest.importorskip("transformers")
T = transformers

BERT = {**BASE, "max_position_embeddings": 32}
HEAD = 16  # head_dim of every tiny Hugging Face config (BASE: 4 heads over 64 channels)


@torch.no_grad()
def zero_first_heads(model: nn.Module) -> nn.Module:
    """Zero the query, key and value rows of each attention's first key/value head and the query heads
    that share it, leaving every bias live."""
    for module in model.modules():
        if hasattr(module, "k_proj") and hasattr(module, "q_proj"):  # LLaMA family, OPT, Phi, StableLM
            per_group = module.q_proj.out_features // module.k_proj.out_features
            module.q_proj.weight[: HEAD * per_group] = 0
            module.k_proj.weight[:HEAD] = 0
            module.v_proj.weight[:HEAD] = 0
        elif hasattr(module, "query") and hasattr(module, "value"):  # BERT
            for layer in (module.query, module.key, module.value):
                layer.weight[:HEAD] = 0
        elif hasattr(module, "c_attn"):  # GPT-2: one Conv1D, query | key | value columns
            for start in (0, 64, 128):
                module.c_attn.weight[:, start : start + HEAD] = 0
        elif hasattr(module, "query_key_value"):  # GPT-NeoX, BLOOM: per head, its query, key and value rows
            module.query_key_value.weight[: 3 * HEAD] = 0
        elif hasattr(module, "qkv") and hasattr(module, "head_dim"):  # timm: query | key | value rows
            width = module.qkv.out_features // 3
            for start in (0, width, 2 * width):
                module.qkv.weight[start : start + module.head_dim] = 0
    return model


def tiny_vit() -> nn.Module:
    """timm's ViT built small, taking another image size (its position embedding resampled)."""
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, dynamic_img_size=True, **TINY_VIT
    )


def vit_images(batch: int, length: int, seed: int) -> torch.Tensor:
    """Images whose side grows with ``length`` (7 -> 32, 11 -> 48): another number of patches."""
    return images(batch, seed, size=32 if length < 10 else 48)


Case = tuple[Callable[[], nn.Module], str, Callable[[int, int, int], object]]
CASES: dict[str, Case] = {  # name -> (build, output projection of layer 0, inputs(batch, length, seed))
    "qwen2-sdpa": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**GQA)), "model.layers.0.self_attn.o_proj", tokens),
    "llama-eager": (
        lambda: T.LlamaForCausalLM._from_config(T.LlamaConfig(**GQA, attention_bias=True), attn_implementation="eager"),
        "model.layers.0.self_attn.o_proj",
        tokens,
    ),
    "bert": (
        lambda: T.BertForSequenceClassification(T.BertConfig(**BERT)),
        "bert.encoder.layer.0.attention.output.dense",
        tokens,
    ),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT2)), "transformer.h.0.attn.c_proj", tokens),
    "opt": (
        lambda: T.OPTForCausalLM(T.OPTConfig(**OPT)),
        "model.decoder.layers.0.self_attn.out_proj",
        tokens,
    ),
    "gpt-neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**BASE)), "gpt_neox.layers.0.attention.dense", tokens),
    "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(**GQA)), "model.layers.0.self_attn.dense", tokens),
    "stablelm": (
        lambda: T.StableLmForCausalLM(T.StableLmConfig(**GQA, use_qkv_bias=True)),
        "model.layers.0.self_attn.o_proj",
        tokens,
    ),
    "bloom": (
        lambda: T.BloomForCausalLM(T.BloomConfig(**BLOOM)),
        "transformer.h.0.self_attention.dense",
        tokens,
    ),
    "timm-vit": (tiny_vit, "blocks.0.attn.proj", vit_images),
}


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in CASES])
def test_heads_with_live_biases_fold_into_the_output_bias(name: str) -> None:
    """The zeroed heads go, their value bias folded into the output projection's bias: exact on a
    second input of another batch size and length, causal and bidirectional, sdpa and eager."""
    torch.manual_seed(0)
    build, projection, inputs = CASES[name]
    model = zero_first_heads(randomize(build()))
    result = export(model, None, inputs(2, 7, 0))
    for x in (inputs(2, 7, 0), inputs(3, 11, 1)):
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
