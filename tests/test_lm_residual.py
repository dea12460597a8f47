"""The residual width of language models: embeddings, RMS norms in every form, tied output embeddings.

Tiny random configs at 50% group masks (heads, MLP width and the residual width: every embedding's
columns with the projections that write the residual stream), exported and checked against the
masked model on the example and on a second input of another batch size and length, exact to
1e-5. Every RMS norm over the stream (and OLMo-2's query/key norms over the whole projection) keeps
its class: its ``eps`` and weight are rescaled so its statistics still count the pruned channels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import RTOL, randomize, zero_norm_affine
from hf_models import BASE, GPT2, GQA, T5, VOCAB, LogitsOnly, tokens
from torch import nn

from lightning_prune import ChannelGraph, export, group_masks, load_pruned, save_pruned, verify_equivalence
from lightning_prune.core.errors import MaskError
from lightning_prune.core.trace.op_rules.norms import rms_form
from lightning_prune.core.verify.report import count_params

transformers = pytest.importorskip("transformers")
T = transformers

CASES: dict[str, tuple[Callable[[], nn.Module], bool]] = {  # name -> (build, loses heads)
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**GQA)), True),
    "llama-tied": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**GQA, tie_word_embeddings=True)), True),
    "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**GQA, head_dim=16)), True),
    "olmo2": (lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**GQA, eos_token_id=1, pad_token_id=0)), True),
    "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**GQA, head_dim=16)), True),
    # a LayerNorm without bias written out by hand (mean, then variance of x - mean): a PrunedLayerNorm
    "cohere": (lambda: T.CohereForCausalLM(T.CohereConfig(**GQA, use_qk_norm=True)), True),
    "gpt2": (
        lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT2)),
        True,
    ),
    "bert": (
        lambda: T.BertForSequenceClassification(T.BertConfig(**BASE, max_position_embeddings=32)),
        True,
    ),
    # T5's relative position bias (one column per head) is shared by every layer of a stack
    "t5": (lambda: LogitsOnly(T.T5ForConditionalGeneration(T.T5Config(**T5))), True),
}


@torch.no_grad()
def randomize_rms_norms(model: nn.Module) -> nn.Module:
    """Trained-like RMS norm weights (LLaMA's start at one, Gemma's ``1 + weight`` at zero), Cohere's
    hand-written LayerNorms too."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if (form := rms_form(module)) is not None and module.weight is not None:
            module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5 - form.offset)
    return model


def inputs(name: str, second: bool = False) -> dict[str, torch.Tensor]:
    return tokens(3, 11, 1, name == "t5") if second else tokens(2, 7, 0, name == "t5")


@functools.cache
def export_case(name: str) -> tuple[nn.Module, nn.Module, Any, dict[str, torch.Tensor]]:
    """``(model, masked reference, export result, masks)`` at 50% group masks over every group."""
    torch.manual_seed(0)
    model = randomize_rms_norms(randomize(CASES[name][0]()))
    graph = ChannelGraph.from_model(model, inputs(name))
    masks = group_masks(graph, 0.5, model=model)
    result = export(model, masks, inputs(name), whole_channel=True)
    return model, zero_norm_affine(model, masks, inputs(name)), result, masks


def embedding(model: nn.Module) -> nn.Embedding:
    inner = model.model if isinstance(model, LogitsOnly) else model
    return inner.get_input_embeddings()


@pytest.mark.parametrize("name", list(CASES))
def test_residual_width_goes_exactly(name: str) -> None:
    """Half the embedding width goes with heads and MLP width; exact on a second input of other sizes."""
    if name == "cohere":  # its hand-written LayerNorms become PrunedLayerNorms that count the pruned channels
        assert any(type(m).__name__ == "PrunedLayerNorm" for m in export_case(name)[2].model.modules())
    model, reference, result, masks = export_case(name)
    exported = result.model
    assert any(isinstance(model.get_submodule(layer), nn.Embedding) for layer in masks)
    assert not verify_equivalence(model, reference, inputs(name), rtol=RTOL).passed  # the masks change something
    for x in (inputs(name), inputs(name, second=True)):
        report = verify_equivalence(reference, exported, x, rtol=RTOL)
        assert report.passed, str(report)
    assert embedding(exported).weight.shape[1] == embedding(model).weight.shape[1] // 2
    assert count_params(exported) < (0.4 if CASES[name][1] else 0.5) * count_params(model)
    assert embedding(exported).embedding_dim == embedding(exported).weight.shape[1]
    assert bool(result.plan.heads) == CASES[name][1]
    if name == "llama-tied" or name == "gpt2":  # the output embedding is still the input one
        assert exported.lm_head.weight is embedding(exported).weight


@pytest.mark.parametrize("name", ["llama", "qwen3", "olmo2", "gemma", "t5"])
def test_rms_norms_keep_their_class_and_count_pruned_channels(name: str) -> None:
    """Each RMS norm that lost channels is still its own class, its eps scaled by C / C' (the stream's
    pruned channels are zero), with a note saying the norm counts them."""
    model, _, result, _ = export_case(name)
    changed = [n for n, change in result.plan.changes.items() if change.norm is not None]
    assert changed
    for layer in changed:
        before, after = model.get_submodule(layer), result.model.get_submodule(layer)
        form = rms_form(before)
        assert type(after) is type(before) and form is not None
        ratio = before.weight.numel() / after.weight.numel()
        assert getattr(after, form.eps_attribute) == pytest.approx(getattr(before, form.eps_attribute) * ratio)
    assert {n.layer for n in result.notes if n.action == "counted in the norm"} == set(changed)


def test_llama_round_trip_says_the_residual_width(tmp_path) -> None:
    """One config describes LLaMA at its new residual width (hidden_size, rms_norm_eps, head_dim kept)."""
    model, _, result, _ = export_case("llama")
    exported = result.model
    config = exported.config
    assert config.hidden_size == 32 and config.head_dim == 16
    assert config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps * 2)
    exported.save_pretrained(tmp_path)
    reloaded = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert verify_equivalence(exported, reloaded, inputs("llama", second=True), rtol=RTOL).passed


def test_gemma_scale_from_the_original_width_needs_load_pruned(tmp_path) -> None:
    """Gemma scales its embeddings by sqrt(hidden_size) computed when built: a config with the new
    width would change that scale, so the config is left, a note says so, and load_pruned rebuilds it."""
    model, reference, result, _ = export_case("gemma")
    assert result.model.config.hidden_size == model.config.hidden_size
    assert any(note.action == "not described by the config" for note in result.notes)
    save_pruned(tmp_path / "pruned.ckpt", result)
    rebuilt = load_pruned(tmp_path / "pruned.ckpt", CASES["gemma"][0]()).eval()
    assert verify_equivalence(reference, rebuilt, inputs("gemma", second=True), rtol=RTOL).passed


@pytest.mark.parametrize("name", ["llama-tied", "gpt2"])
def test_generate_at_the_pruned_width(name: str) -> None:
    """The exported language model generates what the masked one does, through its key/value cache."""
    _, reference, result, _ = export_case(name)
    prompt = {"input_ids": torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))}
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(result.model.generate(**prompt, **settings), reference.generate(**prompt, **settings))


class TinyLM(nn.Module):
    """A user's language model with torch's own ``nn.RMSNorm`` (``affine``: with a weight) and biases."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.position = nn.Embedding(12, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.norm = nn.RMSNorm(16, eps=1e-3, elementwise_affine=affine)
        self.head = nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1]))
        x = x + self.down(torch.relu(self.up(self.norm(x))))
        return self.head(self.norm(x))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-weight"])
def test_torch_rms_norm_over_the_stream(affine: bool) -> None:
    """nn.RMSNorm (with and without a weight) over a residual stream of two embeddings: exact."""
    torch.manual_seed(0)
    model = randomize(TinyLM(affine))
    ids = torch.randint(0, 50, (2, 9))
    keep = torch.arange(16) % 2 == 0
    result = export(model, {"embed": keep, "position": keep, "down": keep}, ids)
    assert result.model.embed.weight.shape == (50, 8) and result.model.head.in_features == 8
    assert result.model.norm.weight.shape == (8,)
    masked = zero_norm_affine(model, {"embed": keep, "position": keep, "down": keep}, ids)
    assert verify_equivalence(masked, result.model, torch.randint(0, 50, (3, 12)), rtol=RTOL).passed


def test_rms_norm_counts_constant_pruned_channels() -> None:
    """Pruned channels that carry a live bias reach nn.RMSNorm as constants: the exported norm's eps
    holds their squares (S2 / C'), so it stays exact with no channel kept."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.norm, self.out = nn.Linear(8, 16), nn.RMSNorm(16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.norm(self.proj(x)))

    torch.manual_seed(0)
    model = randomize(Block())
    with torch.no_grad():  # channels 8..15 pruned in the weights, their biases left live
        model.proj.weight[8:] = 0
        model.norm.weight[8:] = 0  # so the norm gives them no value downstream
    result = export(model, None, torch.randn(4, 8))
    assert result.model.norm.weight.shape == (8,)
    assert result.model.norm.eps > 1e-3  # the constants' squares, over the 8 kept channels
    assert verify_equivalence(model, result.model, torch.randn(5, 3, 8), rtol=RTOL).passed


def test_mean_over_channels_outside_a_norm_keeps_them() -> None:
    """A mean over the channels in a module that is no RMS norm (a centring) blocks them, with the reason."""

    class Centre(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - x.mean(-1, keepdim=True)

    model = nn.Sequential(nn.Linear(4, 8), Centre(), nn.Linear(8, 2))
    result = export(model, {"0": torch.arange(8) < 4}, torch.randn(3, 4))
    assert result.model[0].out_features == 8
    assert any("op 'mean' reduces over their dim" in note.reason for note in result.notes)


def test_embedding_with_max_norm_is_no_producer() -> None:
    """max_norm renormalises rows across the columns: such an embedding's columns cannot go."""

    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(10, 8, max_norm=1.0), nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    result = export(Lookup(), {"embed": torch.arange(8) < 4}, torch.randint(0, 10, (2, 5)))
    assert result.model.embed.weight.shape == (10, 8)
    assert any(note.layer == "embed" and note.action == "kept" for note in result.notes)


def test_embedding_mask_of_the_wrong_length_names_the_layer() -> None:
    """An embedding's mask has one entry per column (its embedding width), not per row."""
    model = TinyLM()
    with pytest.raises(MaskError, match=r"Mask for layer 'embed' has 50 channels, .* has 16 output channels"):
        export(model, {"embed": torch.ones(50, dtype=torch.bool)}, torch.randint(0, 50, (2, 4)))


class TiedNamedAfterTheHead(nn.Module):
    """nanoGPT's tie written the other way round: the embedding takes the output layer's weight, and
    the output layer comes first in ``named_modules``, so the shared weight is named after it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 50, bias=False)
        self.embed = nn.Embedding(50, 16)
        self.embed.weight = self.head.weight
        self.mlp = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x + self.mlp(x))


def test_a_tie_named_after_the_output_layer_keeps_the_width() -> None:
    """Its columns are then no producer's: the width stays (as before this release), exactly."""
    torch.manual_seed(0)
    model = randomize(TiedNamedAfterTheHead())
    masks = {"mlp": torch.arange(16) % 2 == 0}
    result = export(model, masks, torch.randint(0, 50, (2, 6)))
    assert result.model.embed.weight.shape == (50, 16) and result.model.head.weight is result.model.embed.weight
    reference = zero_norm_affine(model, masks, torch.randint(0, 50, (2, 6)))
    assert verify_equivalence(reference, result.model, torch.randint(0, 50, (3, 9)), rtol=RTOL).passed
