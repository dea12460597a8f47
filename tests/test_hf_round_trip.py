"""The Hugging Face round trip with no original config: ``save_pretrained`` -> ``from_pretrained(dir)``.

Where no config describes the exported widths (per-layer widths, BERT-style ``head_dim`` derived from
``hidden_size``, corrected norms, Gemma's embedding scale), the exported model's config keeps the
original sizes and a plain-JSON record of how to shrink them. ``exported.save_pretrained(dir)``
writes both; ``lightning_prune.from_pretrained(dir)`` needs nothing else (no pickle, no code from the
directory) and rebuilds the model exactly, heads and residual width included.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from helpers import RTOL, randomize
from hf_models import BASE, GPT2, GQA, OPT, T5, VISION, VOCAB, LogitsOnly, pixels, tokens
from torch import nn

from lightning_prune import ChannelGraph, CheckpointError, export, from_pretrained, group_masks, verify_equivalence
from lightning_prune.core.verify.report import count_params

transformers = pytest.importorskip("transformers")
T = transformers

Inputs = Callable[[bool], dict[str, torch.Tensor]]


def text(second: bool) -> dict[str, torch.Tensor]:
    """The example (2 x 7 tokens) or a second input of another batch size and length (3 x 11)."""
    return tokens(3, 11, 1) if second else tokens(2, 7, 0)


def text_to_text(second: bool) -> dict[str, torch.Tensor]:
    """T5's: encoder and decoder ids, the second of another batch size and lengths."""
    return tokens(3, 11, 1, decoder=True) if second else tokens(2, 7, 0, decoder=True)


def image(other_size: int) -> Inputs:
    """32 x 32 images, the second input 3 of them at ``other_size`` (where the model resamples positions)."""
    return lambda second: pixels(3, other_size, 1) if second else pixels(2, 32, 0)


BART = {
    "vocab_size": VOCAB,
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "max_position_embeddings": 32,
}
CLIP_TEXT = {**BASE, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 2}
CLIP_VISION = VISION
DINOV2 = {**{k: v for k, v in VISION.items() if k != "intermediate_size"}, "mlp_ratio": 2}
BUILDS: dict[str, tuple[Callable[[], nn.Module], Inputs]] = {  # name -> (build, inputs)
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(**OPT)), text),
    "gpt-neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**BASE)), text),
    "stablelm": (lambda: T.StableLmForCausalLM(T.StableLmConfig(**GQA)), text),
    "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(**BASE, max_position_embeddings=32)), text),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT2)), text),
    "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**GQA, head_dim=16)), text),
    "clip-text": (lambda: T.CLIPTextModel(T.CLIPTextConfig(**CLIP_TEXT)), text),
    "clip-vision": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**CLIP_VISION)), image(32)),
    "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(**DINOV2)), image(48)),
    "electra": (
        lambda: T.ElectraForSequenceClassification(T.ElectraConfig(**BASE, max_position_embeddings=32)),
        text,
    ),
    "bart": (lambda: LogitsOnly(T.BartForConditionalGeneration(T.BartConfig(**BART))), text),
    "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(**GQA)), text),
    "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**GQA, head_dim=16)), text),
    "olmo2": (lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**GQA, eos_token_id=1, pad_token_id=0)), text),
    "t5": (lambda: LogitsOnly(T.T5ForConditionalGeneration(T.T5Config(**T5))), text_to_text),
}


def exported(name: str, first_block_only: bool = False) -> tuple[nn.Module, nn.Module]:
    """``(model, exported)`` Hugging Face models at 50% group masks (``first_block_only``: only groups
    inside block 0); a user's logits-only wrapper is exported, the model inside it returned."""
    torch.manual_seed(0)
    build, inputs = BUILDS[name]
    model = randomize(build())
    graph = ChannelGraph.from_model(model, inputs(False))
    allowed = [n for n, _ in model.named_modules() if re.search(r"\.0\.", n)] if first_block_only else None
    masks = group_masks(graph, 0.5, model=model, layers=allowed)
    small = export(model, masks, inputs(False), whole_channel=True).model
    return (model.model, small.model) if isinstance(model, LogitsOnly) else (model, small)


@pytest.mark.parametrize(
    ("name", "first_block_only"),
    [pytest.param(name, False, id=name) for name in BUILDS]
    + [pytest.param(name, True, id=f"{name}-first-block") for name in ("opt", "bert", "t5")],
)
def test_from_pretrained_needs_only_the_directory(tmp_path, name: str, first_block_only: bool) -> None:
    """save_pretrained, then our from_pretrained(dir): the same model (sizes and function) with no
    original config, no pickle and no code of ours saved beside it. Where the config alone says the
    exported sizes (no shrink record), transformers' own from_pretrained rebuilds it too."""
    model, small = exported(name, first_block_only)
    small.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.py"))
    rebuilt = [from_pretrained(tmp_path)]
    if small.config.to_dict().get("lightning_prune_shrink") is None:  # the config describes it
        rebuilt.append(type(small).from_pretrained(tmp_path).eval())
    for again in rebuilt:
        assert type(again) is type(small)
        assert count_params(again) == count_params(small) < count_params(model)
        report = verify_equivalence(small, again, BUILDS[name][1](True), rtol=RTOL)
        assert report.passed, str(report)
    assert model.config.to_dict().get("lightning_prune_shrink") is None  # the user's config is untouched


def test_a_described_model_carries_no_shrink_record(tmp_path) -> None:
    """LLaMA at uniform widths: the config says them, so no record is written and transformers'
    own from_pretrained suffices (ours gives the same)."""
    torch.manual_seed(0)
    model = randomize(T.LlamaForCausalLM(T.LlamaConfig(**GQA)))
    masks = group_masks(ChannelGraph.from_model(model, tokens(2, 7, 0)), 0.5, model=model)
    small = export(model, masks, tokens(2, 7, 0), whole_channel=True).model
    assert small.config.to_dict().get("lightning_prune_shrink") is None
    small.save_pretrained(tmp_path)
    assert verify_equivalence(small, from_pretrained(tmp_path), tokens(3, 11, 1), rtol=RTOL).passed


def test_a_directory_without_a_config_is_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"holds no config.json: pass the directory exported.save_pretrained"):
        from_pretrained(tmp_path)


def test_pickled_weights_are_not_read(tmp_path) -> None:
    """A directory with only pytorch_model.bin (pickle) is refused, naming what to save instead."""
    _, small = exported("opt")
    small.config.save_pretrained(tmp_path)
    torch.save(small.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"holds no model.safetensors: .*pytorch_model.bin is not read"):
        from_pretrained(tmp_path)


def test_weights_of_another_model_are_refused(tmp_path) -> None:
    """The record shrinks the model its config builds; weights saved from another export do not fit."""
    _, small = exported("opt")
    _, other = exported("opt", first_block_only=True)
    small.save_pretrained(tmp_path / "small")
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "small" / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"do not fit the model|does not fit"):
        from_pretrained(tmp_path / "small")


def test_a_config_naming_no_class_asks_for_one(tmp_path) -> None:
    """A config saved on its own names no architecture: the error says to pass model_class."""
    _, small = exported("opt")
    small.save_pretrained(tmp_path)
    small.config.architectures = None
    small.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"names no transformers class in 'architectures'.*pass model_class="):
        from_pretrained(tmp_path)
    rebuilt = from_pretrained(tmp_path, T.OPTForCausalLM)
    assert verify_equivalence(small, rebuilt, tokens(3, 11, 1), rtol=RTOL).passed
