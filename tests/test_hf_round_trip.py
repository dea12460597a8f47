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
from hf_models import BASE, GPT2, GQA, VOCAB, tokens
from torch import nn

from lightning_prune import ChannelGraph, CheckpointError, export, from_pretrained, group_masks, verify_equivalence
from lightning_prune.core.verify.report import count_params

transformers = pytest.importorskip("transformers")
T = transformers

BUILDS: dict[str, Callable[[], nn.Module]] = {
    "opt": lambda: T.OPTForCausalLM(
        T.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_attention_heads=4,
            ffn_dim=128,
            num_hidden_layers=2,
            word_embed_proj_dim=64,
            max_position_embeddings=32,
        )
    ),
    "gpt-neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**BASE)),
    "stablelm": lambda: T.StableLmForCausalLM(T.StableLmConfig(**GQA)),
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**BASE, max_position_embeddings=32)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT2)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**GQA, head_dim=16)),
}


def exported(name: str, first_block_only: bool = False) -> tuple[nn.Module, nn.Module]:
    """``(model, exported)`` at 50% group masks (``first_block_only``: only groups inside block 0)."""
    torch.manual_seed(0)
    model = randomize(BUILDS[name]())
    graph = ChannelGraph.from_model(model, tokens(2, 7, 0))
    allowed = [n for n, _ in model.named_modules() if re.search(r"\.0\.", n)] if first_block_only else None
    masks = group_masks(graph, 0.5, model=model, layers=allowed)
    return model, export(model, masks, tokens(2, 7, 0), whole_channel=True).model


@pytest.mark.parametrize(
    ("name", "first_block_only"),
    [(name, False) for name in BUILDS] + [("opt", True), ("bert", True)],
    ids=[*BUILDS, "opt-first-block", "bert-first-block"],
)
def test_from_pretrained_needs_only_the_directory(tmp_path, name: str, first_block_only: bool) -> None:
    """save_pretrained, then our from_pretrained(dir): the same model (sizes and function) with no
    original config, no pickle and no code of ours saved beside it."""
    model, small = exported(name, first_block_only)
    assert small.config.to_dict().get("lightning_prune_shrink") is not None  # no config says these widths
    small.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.py"))
    rebuilt = from_pretrained(tmp_path)
    assert type(rebuilt) is type(small)
    assert count_params(rebuilt) == count_params(small) < count_params(model)
    report = verify_equivalence(small, rebuilt, tokens(3, 11, 1), rtol=RTOL)
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
