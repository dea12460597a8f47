"""Hugging Face transformers from tiny random configs: heads and MLP width pruned exactly, no hand edits.

Each model is exported at 50% group masks (whole attention heads and key/value groups as units,
MLP width) and checked against the masked model on the example input and on a second input of
another batch size and sequence length (language models) or image size (vision models): exact,
strictly smaller, with the heads the masks prune gone and the attention modules' head counts
saying so. The Hugging Face
round trip: where one config describes the exported widths, ``save_pretrained`` and
``from_pretrained`` rebuild it; where widths differ per layer, ``load_pruned`` rebuilds it from the
original config.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import RTOL, randomize, zero_norm_affine
from torch import nn

from lightning_prune import (
    ChannelGraph,
    apply_masks,
    export,
    group_masks,
    load_pruned,
    save_pruned,
    verify_equivalence,
)
from lightning_prune.core.shrink.attention import KEY_VALUE_HEADS, QUERY_HEADS
from lightning_prune.core.verify.report import count_params

transformers = pytest.importorskip("transformers")

VOCAB = 100
TEXT = {"vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
GQA = {**TEXT, "num_key_value_heads": 2, "num_hidden_layers": 2}


def tokens(batch: int, length: int, seed: int, padded: bool = True) -> dict[str, torch.Tensor]:
    """Token ids and their attention mask (``padded``: the last row's final two tokens are padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def pixels(batch: int, seed: int, size: int = 32, **options: Any) -> dict[str, Any]:
    """``size`` x ``size`` images, with the model's keyword ``options``."""
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)), **options}


@dataclass(frozen=True)
class Case:
    """A tiny model and its two inputs: the example and a second one of other sizes."""

    build: Callable[[], nn.Module]
    example: Callable[[], dict[str, torch.Tensor]]
    second: Callable[[], dict[str, torch.Tensor]]
    causal: bool = False


def text_case(build: Callable[[], nn.Module], causal: bool = False) -> Case:
    return Case(build, lambda: tokens(2, 7, 0), lambda: tokens(3, 11, 1), causal)


def image_case(build: Callable[[], nn.Module], **options: Any) -> Case:
    """The second input is 48x48 (``options``: what the model needs for another size)."""
    return Case(build, lambda: pixels(2, 0), lambda: pixels(3, 1, 48, **options))


T = transformers
CASES = {
    "bert": text_case(
        lambda: T.BertForSequenceClassification(T.BertConfig(**TEXT, num_hidden_layers=2, max_position_embeddings=32))
    ),
    "roberta": text_case(
        lambda: T.RobertaForSequenceClassification(
            T.RobertaConfig(**TEXT, num_hidden_layers=2, max_position_embeddings=32)
        )
    ),
    "distilbert": text_case(
        lambda: T.DistilBertForSequenceClassification(
            T.DistilBertConfig(
                vocab_size=VOCAB, dim=64, n_heads=4, hidden_dim=128, n_layers=2, max_position_embeddings=32
            )
        )
    ),
    "gpt2": text_case(
        lambda: T.GPT2LMHeadModel(
            T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_head=4, n_inner=128, n_layer=2, n_positions=32)
        ),
        causal=True,
    ),
    "llama": text_case(lambda: T.LlamaForCausalLM(T.LlamaConfig(**GQA)), causal=True),
    "llama-eager": text_case(
        lambda: T.LlamaForCausalLM._from_config(T.LlamaConfig(**GQA), attn_implementation="eager"), causal=True
    ),
    "qwen2": text_case(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**GQA)), causal=True),
    "mistral": text_case(lambda: T.MistralForCausalLM(T.MistralConfig(**GQA)), causal=True),
    "vit": image_case(
        lambda: T.ViTForImageClassification(
            T.ViTConfig(
                hidden_size=64,
                num_attention_heads=4,
                intermediate_size=128,
                num_hidden_layers=2,
                image_size=32,
                patch_size=8,
                num_labels=3,
            )
        ),
        interpolate_pos_encoding=True,
    ),
    "swin": image_case(
        lambda: T.SwinForImageClassification(
            T.SwinConfig(
                image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=3
            )
        )
    ),
}
MARKS: dict[str, list] = {}
ALL = [pytest.param(name, id=name, marks=MARKS.get(name, [])) for name in CASES]
FIRST_BLOCK = re.compile(r"\.0\.")
"""Module names inside a model's first block (``model.layers.0.``, ``encoder.layer.0.``, ``h.0.``)."""
CAUSAL = [pytest.param(name, id=name, marks=MARKS.get(name, [])) for name, case in CASES.items() if case.causal]
PER_LAYER = [p for p in ALL if p.id in ("bert", "gpt2", "llama", "vit", "swin")]  # one of each attention code path
LLAMA_FAMILY = ("llama", "llama-eager", "qwen2", "mistral")
SAME_WIDTHS = [pytest.param(name, id=name, marks=MARKS.get(name, [])) for name in LLAMA_FAMILY]


@dataclass
class Exported:
    """A model, its masks, the masked reference and the export result."""

    model: nn.Module
    reference: nn.Module
    result: Any
    graph: ChannelGraph
    case: Case


@functools.cache
def export_case(name: str, first_layer_only: bool = False) -> Exported:
    """Export ``name`` at 50% group masks (``first_layer_only``: only groups inside its first block)."""
    torch.manual_seed(0)
    case = CASES[name]
    model = randomize(case.build())
    example = case.example()
    graph = ChannelGraph.from_model(model, example)
    allowed = [n for n, _ in model.named_modules() if FIRST_BLOCK.search(n)] if first_layer_only else None
    masks = group_masks(graph, 0.5, model=model, layers=allowed)
    result = export(model, masks, example, whole_channel=True)
    return Exported(model, zero_norm_affine(model, masks, example), result, graph, case)


def assert_exact(reference: nn.Module, exported: nn.Module, *inputs: dict[str, torch.Tensor]) -> float:
    """Exported == reference on every input; the largest relative error."""
    worst = 0.0
    for x in inputs:
        report = verify_equivalence(reference, exported, x, rtol=RTOL)
        assert report.passed, str(report)
        worst = max(worst, report.max_relative_error)
    return worst


def query_heads(module: nn.Module) -> int | None:
    """The query head count an attention module keeps as an attribute, if it keeps one."""
    return next((getattr(module, a) for a in QUERY_HEADS if isinstance(getattr(module, a, None), int)), None)


def key_value_heads(module: nn.Module) -> int | None:
    """The key/value head count an attention module keeps as an attribute, if it keeps one."""
    return next((getattr(module, a) for a in KEY_VALUE_HEADS if isinstance(getattr(module, a, None), int)), None)


def masked_heads(run: Exported, module_name: str) -> int:
    """How many query heads of ``module_name`` the masks prune whole (read from the query projection's mask)."""
    traced, trace = run.graph.trace.heads[module_name], run.graph.trace
    pruned = 0
    for label in traced.query.tolist():
        producer, first = next((p, f) for p, f, count in trace.label_owner if f <= label < f + count)
        start = (label - first) // traced.head_dim * traced.head_dim  # the producer's rows are heads in order
        rows = run.result.masks[producer][start : start + traced.head_dim]
        pruned += not bool(rows.any())
    return pruned


@pytest.mark.parametrize("name", ALL)
def test_export_exact_smaller_heads_removed(name: str) -> None:
    """50% heads and MLP width: exact on a second input of other sizes, smaller, heads gone as masked."""
    run = export_case(name)
    exported = run.result.model
    masked_differs = not verify_equivalence(run.model, run.reference, run.case.example(), rtol=RTOL).passed
    assert masked_differs, "the masks changed nothing: the exactness check would prove nothing"
    assert_exact(run.reference, exported, run.case.example(), run.case.second())
    assert count_params(exported) < count_params(run.model)
    heads = run.result.plan.heads
    assert run.graph.trace.heads and heads.keys() == run.graph.trace.heads.keys(), "an attention kept every head"
    removed = {note.layer: note.channels for note in run.result.notes if note.unit == "head(s)"}
    for module_name, counts in heads.items():
        assert removed[module_name] == counts.query_before - counts.query == masked_heads(run, module_name) > 0
        module = exported.get_submodule(module_name)
        if name not in LLAMA_FAMILY:  # LLaMA-style attention keeps no head count: it views by head_dim
            assert query_heads(module) == counts.query
        assert key_value_heads(module) in (None, counts.key_value)


@pytest.mark.parametrize("name", SAME_WIDTHS)
def test_save_pretrained_round_trip(tmp_path, name: str) -> None:
    """Every layer keeps the same widths: the config says them, and from_pretrained rebuilds the model
    (so does load_pruned, giving the rebuilt model a config of its own)."""
    run = export_case(name)
    exported = run.result.model
    counts = set(run.result.plan.heads.values())
    assert len(counts) == 1
    (count,) = counts
    config = exported.config
    said = (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size)
    assert said == (count.query, count.key_value, count.head_dim, exported.model.layers[0].mlp.up_proj.out_features)
    assert run.model.config.num_attention_heads == count.query_before  # the user's model keeps its config
    assert any(note.action == "updated in the config" for note in run.result.notes)
    exported.save_pretrained(tmp_path)
    reloaded = type(exported).from_pretrained(tmp_path).eval()
    assert count_params(reloaded) == count_params(exported)
    assert_exact(exported, reloaded, run.case.second())
    original = run.case.build()
    config_before = original.config.to_dict()
    save_pruned(tmp_path / "pruned.ckpt", run.result)
    rebuilt = load_pruned(tmp_path / "pruned.ckpt", type(original)(original.config)).eval()
    assert rebuilt.config.num_attention_heads == count.query  # our checkpoint says the new sizes too
    assert original.config.to_dict() == config_before  # ... without touching the config it was built from
    assert_exact(exported, rebuilt, run.case.second())


@pytest.mark.parametrize("name", PER_LAYER)
def test_load_pruned_rebuilds_per_layer_widths(tmp_path, name: str) -> None:
    """Only the first block pruned: no one config says that, so a note points to load_pruned, which
    rebuilds the model from the original config and our checkpoint (head counts included)."""
    run = export_case(name, first_layer_only=True)
    exported = run.result.model
    assert run.result.plan.heads, "the first block lost no head"
    assert any(note.action == "not described by the config" for note in run.result.notes)
    path = tmp_path / "pruned.ckpt"
    save_pruned(path, run.result)
    rebuilt = load_pruned(path, run.case.build()).eval()
    assert count_params(rebuilt) == count_params(exported) < count_params(run.model)
    for module_name, counts in run.result.plan.heads.items():
        assert query_heads(rebuilt.get_submodule(module_name)) in (None, counts.query)
    assert_exact(run.reference, rebuilt, run.case.example(), run.case.second())


@pytest.mark.parametrize("name", CAUSAL)
def test_generate_with_cache(name: str) -> None:
    """The exported language model generates what the masked one does, through its key/value cache."""
    run = export_case(name)
    prompt = tokens(3, 5, 2, padded=False)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = run.reference.generate(**prompt, **settings)
    assert torch.equal(run.result.model.generate(**prompt, **settings), expected)


def test_package_imports_without_transformers() -> None:
    """transformers is not a dependency: importing and exporting never imports it."""
    code = (
        "import sys, torch; from lightning_prune import export; "
        "export(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), {'0': torch.arange(4) < 2}, "
        "torch.randn(2, 4)); assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def conv1d_after(activation: nn.Module) -> nn.Sequential:
    """A Linear feeding transformers' Conv1D (weight stored (in, out), bias randomised)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), activation, transformers.pytorch_utils.Conv1D(4, 16)).eval()
    with torch.no_grad():
        model[2].bias.uniform_(-1, 1)
    return model


@pytest.mark.parametrize(
    ("activation", "zero_stays_zero"),
    [pytest.param(nn.ReLU(), True, id="relu"), pytest.param(nn.Sigmoid(), False, id="sigmoid")],
)
def test_conv1d_reads_pruned_channels(activation: nn.Module, zero_stays_zero: bool) -> None:
    """addmm with an (in, out) parameter: the Conv1D's rows follow the channels it reads, exactly; a
    pruned channel that carries a constant (sigmoid(0) = 0.5) is folded into its bias."""
    model = conv1d_after(activation)
    masks = {"0": torch.arange(16) % 2 == 0}
    result = export(model, masks, torch.randn(3, 5, 8))
    conv = result.model[2]
    assert_exact(apply_masks(model, masks), result.model, torch.randn(2, 7, 8))
    assert conv.weight.shape == (conv.nx, conv.nf) and conv.nf == 4
    assert conv.nx == 8
    assert [(note.layer, note.action) for note in result.notes] == (
        [] if zero_stays_zero else [("2", "folded into bias")]
    )


def test_addmm_of_two_activations_keeps_channels() -> None:
    """An addmm whose matrix is data, not a parameter, cannot be sliced: the channels reaching it stay."""

    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(torch.zeros(6), self.a(x), self.b(x).t() @ self.b(x))

    model = Bilinear().eval()
    result = export(model, {"a": torch.arange(6) < 3}, torch.randn(6, 6))
    assert result.model.a.out_features == 6
    assert any("op 'addmm'" in note.reason for note in result.notes)


def test_conv1d_shrinker_adds_a_folded_bias_then_slices() -> None:
    """The Conv1D shrink function: rows kept along the (in, out) weight, a folded bias change added."""
    from lightning_prune.core.graph.changes import LayerChange
    from lightning_prune.core.shrink.hf import shrink_conv1d
    from lightning_prune.core.shrink.registry import shrinker_for

    conv = transformers.pytorch_utils.Conv1D(4, 6)
    assert shrinker_for(conv) is shrink_conv1d
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    delta = torch.arange(4.0)
    change = LayerChange(keep={("weight", 0): (torch.tensor([0, 2, 5]), 1)}, bias_delta=delta)
    small = shrinker_for(conv)(conv, change)
    assert (small.nx, small.nf) == (3, 4)
    assert torch.equal(small.weight, weight[[0, 2, 5]]) and torch.equal(small.bias, bias + delta)
