"""timm's vision transformers, one small model per family, at 50% group masks: exact, smaller, heads gone.

Each model is built small through ``timm.create_model``'s own keyword arguments (few blocks, narrow
embeddings, few heads, small images) while keeping its family's code path: its attention class,
class and distillation tokens, position embeddings and per-head relative position tables. It is
exported with ``whole_channel=True`` and checked against the masked model whose whole pruned
channels are zeroed (filters, biases, norms, tokens, position embeddings, tables): equal on the
example, on a second input of another batch size, and on another image size where the architecture
takes one; strictly smaller; and

- where heads go (ViT, DeiT, Swin, PVT-v2, Twins, XCiT, LeViT, MobileViT, EfficientFormer, BEiT, EVA-02,
  Swin V2): every
  attention loses the heads the masks prune, the plan's notes count them, and the module's head
  count attribute (``num_heads``) says the new count;
- where heads stay (CaiT, CoaT, MaxViT, marked ``HEADS KEPT`` below): no head of the attentions
  named goes (CaiT's class-attention blocks lose theirs), and the reason the graph gives for keeping
  them is the one expected, so a change there fails loudly and the case can be moved to the other list.

Tiny models spend their time in thread hand-offs, not arithmetic: the module runs single-threaded.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from helpers import RTOL, TIMM_SWIN, TINY_VIT, randomize, zero_norm_affine
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_prune import ChannelGraph, export, group_masks, verify_equivalence
from lightning_prune.core.shrink.attention import QUERY_HEADS
from lightning_prune.core.verify.report import count_params

timm = pytest.importorskip("timm")
from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block  # noqa: E402

PYRAMID = {"embed_dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4)}


@dataclass(frozen=True)
class Case:
    """A timm model built small, its image sizes, and what must shrink or stay."""

    model: str
    kwargs: dict[str, Any]
    size: int
    other_size: int | None  # another image size it takes; None where the architecture fixes it (see CASES)
    sliced: dict[str, int] = field(default_factory=dict)
    """Parameters other than a conv's or linear's (tokens, position embeddings, per-head tables) -> the
    dim that must shrink with the pruned channels or heads."""
    heads_kept: tuple[str, str] | None = None
    """HEADS KEPT: (pattern of the layers that make queries, the reason the graph keeps their channels)."""


CASES: dict[str, Case] = {
    # dynamic_img_size: the position embedding is resampled for another image size
    "vit": Case(
        "vit_tiny_patch16_224",
        {**TINY_VIT, "dynamic_img_size": True},
        32,
        48,
        {"cls_token": -1, "pos_embed": -1},
    ),
    "deit_distilled": Case(
        "deit_tiny_distilled_patch16_224",
        {**TINY_VIT, "dynamic_img_size": True},
        32,
        48,
        {"cls_token": -1, "dist_token": -1, "pos_embed": -1},
    ),
    "swin": Case(
        "swin_tiny_patch4_window7_224",
        {
            "img_size": 32,
            "patch_size": 4,
            "window_size": 4,
            "embed_dim": 16,
            "depths": (2, 1),  # two blocks in the first stage: the shifted window and its mask run too
            "num_heads": (2, 4),
            "dynamic_img_size": True,  # attention masks built for the input's size
        },
        32,
        64,
        {"layers.0.blocks.0.attn.relative_position_bias_table": 1},
    ),
    "pvt_v2": Case("pvt_v2_b0", PYRAMID, 64, 96),  # convolutional patch embeddings: any size
    "twins": Case(  # two blocks a stage: locally grouped and global sub-sampled attention
        "twins_svt_small",
        {**PYRAMID, "img_size": 64, "depths": (2, 2, 2, 2), "wss": (2, 2, 2, 2)},
        64,
        96,
    ),
    "xcit": Case(  # Fourier position encoding: any size; class-attention layers after the XCA blocks
        "xcit_nano_12_p16_224",
        {"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 4, "cls_attn_layers": 1},
        64,
        96,
        {"cls_token": -1},
    ),
    "levit": Case(  # attention biases per head and position fix the image size
        "levit_128s",
        {"img_size": 64, "embed_dim": (32, 48, 64), "depth": (1, 1, 1), "num_heads": (2, 3, 4), "key_dim": 8},
        64,
        None,
        {"stages.0.blocks.0.attn.attention_biases": 0},
    ),
    "mobilevit": Case(  # timm's ByobNet overlays these on mobilevit_xxs's config: one MobileViT block
        "mobilevit_xxs",
        {
            "blocks": (
                _inverted_residual_block(d=1, c=8, s=1, br=2.0),
                _inverted_residual_block(d=1, c=16, s=2, br=2.0),
                *_mobilevit_block(d=1, c=16, s=2, transformer_dim=32, transformer_depth=1, patch_size=2, br=2.0),
            ),
            "stem_chs": 8,
            "num_features": 32,
        },
        32,
        64,
    ),
    "efficientformer": Case(  # the attention biases are for 7x7 tokens: 224x224 input only
        "efficientformer_l1",
        {"depths": (1, 1, 1, 1), "embed_dims": (8, 16, 24, 32)},
        224,
        None,
        {"stages.3.blocks.1.token_mixer.attention_biases": 0},
    ),
    # the query/key/value bias is cat(q_bias, a buffer of zeros, v_bias): sliced part by part
    "beit": Case(  # relative position bias tables fix the image size
        "beit_base_patch16_224",
        TINY_VIT,
        32,
        None,
        {"blocks.0.attn.relative_position_bias_table": 1, "blocks.0.attn.q_bias": 0},
    ),
    "eva02": Case(  # rotary embedding past the class token, SwiGLU MLP
        "eva02_tiny_patch14_224",
        {"img_size": 28, "embed_dim": 32, "depth": 2, "num_heads": 4, "dynamic_img_size": True},
        28,
        42,
        {"cls_token": -1, "pos_embed": -1, "blocks.0.attn.q_bias": 0},
    ),
    "swinv2": Case(  # cosine attention, a per-head logit scale, a bias MLP with one output per head
        "swinv2_tiny_window8_256",
        TIMM_SWIN,
        32,
        64,
        {"layers.0.blocks.0.attn.logit_scale": 0, "layers.1.blocks.0.attn.cpb_mlp.2.weight": 0},
    ),
    # HEADS KEPT (each case says why; once the tracer prunes them, drop heads_kept to test the heads)
    "cait": Case(  # the position embedding fixes the image size
        "cait_xxs24_224",
        {**TINY_VIT, "depth_token_only": 1},
        32,
        None,
        # talking-heads attention mixes the heads (proj_l, proj_w act across them): the slices of
        # q, k and v it takes from qkv cannot lose whole heads (the class-attention blocks' heads go)
        heads_kept=(r"blocks\.\d+\.attn\.qkv$", "op 'getitem' keeps a fixed part of them"),
    ),
    "coat_lite": Case(  # strict patch embeddings fix the image size
        "coat_lite_tiny",
        {"img_size": 32, "embed_dims": (16, 32, 48, 64), "serial_depths": (1, 1, 1, 1), "num_heads": 8},
        32,
        None,
        # the convolutional relative position encoding splits the value channels into fixed per-kernel groups
        heads_kept=(r"factoratt_crpe\.qkv$", "op 'split' splits them into pieces of fixed sizes"),
    ),
    "maxvit": Case(
        "maxvit_tiny_tf_224",
        {
            "img_size": 32,
            "embed_dim": (16, 32),
            "depths": (1, 1),
            "stem_width": 8,
            "transformer_dim_head": 8,
            "transformer_partition_ratio": 8,  # 4x4 windows and grids at 32x32
        },
        32,
        64,  # window and grid partitions of a fixed size: any multiple of them
        # the TF-style relative position bias is an einsum of a per-head table with one-hot lookup
        # buffers, added to the attention as a mask that differs per head
        heads_kept=(r"attn\.qkv$", "op 'scaled_dot_product_attention' meets an attention mask that differs per head"),
    ),
}
HEADS_GO = [pytest.param(name, id=name) for name, case in CASES.items() if case.heads_kept is None]
HEADS_KEPT = [pytest.param(name, id=name) for name, case in CASES.items() if case.heads_kept is not None]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small are dominated by thread start-up on a busy machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Exported:
    model: nn.Module
    reference: nn.Module
    result: Any
    graph: ChannelGraph


def images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return randomize(timm.create_model(case.model, pretrained=False, num_classes=10, **case.kwargs))


def export_model(model: nn.Module, example: torch.Tensor) -> Exported:
    """50% group masks (whole heads as units), exported whole-channel, and the reference it must equal."""
    graph = ChannelGraph.from_model(model, example)
    masks = group_masks(graph, 0.5, model=model)
    result = export(model, masks, example, whole_channel=True)
    return Exported(model, zero_norm_affine(model, masks, example), result, graph)


@functools.cache
def export_case(name: str) -> Exported:
    case = CASES[name]
    return export_model(build(case), images(2, case.size, 0))


def assert_exact(run: Exported, *inputs: torch.Tensor) -> float:
    worst = 0.0
    for x in inputs:
        report = verify_equivalence(run.reference, run.result.model, x, rtol=RTOL)
        assert report.passed, f"on {tuple(x.shape)}: {report}"
        worst = max(worst, report.max_relative_error)
    return worst


def query_heads(module: nn.Module) -> int | None:
    """The query head count a module keeps as an attribute (``num_heads``), if it keeps one."""
    return next((getattr(module, a) for a in QUERY_HEADS if isinstance(getattr(module, a, None), int)), None)


def masked_heads(run: Exported, module_name: str) -> int:
    """How many query heads of ``module_name`` the masks prune whole (read from the query producer's mask)."""
    traced, trace = run.graph.trace.heads[module_name], run.graph.trace
    pruned = 0
    for label in traced.query.tolist():  # one label per head
        producer, first = next((p, f) for p, f, count in trace.label_owner if f <= label < f + count)
        start = (label - first) // traced.head_dim * traced.head_dim  # the producer's rows are heads in order
        mask = run.result.masks.get(producer)  # none: the masks prune none of it
        pruned += mask is not None and not bool(mask[start : start + traced.head_dim].any())
    return pruned


def block_reasons(graph: ChannelGraph, layer: str) -> set[str]:
    """Why the channels of ``layer`` are kept whatever the masks say ('' for those free to go)."""
    roots = graph.root[graph.trace.producers[layer].numpy()]
    return {graph.reasons[i] if i >= 0 else "" for i in graph.block_reason[roots].tolist()}


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in CASES])
def test_exact_and_smaller(name: str) -> None:
    """Equal to the whole-channel masked model on the example, another batch size and (where the
    architecture takes one) another image size; fewer parameters; tokens and tables sliced."""
    case, run = CASES[name], export_case(name)
    example = images(2, case.size, 0)
    masked_differs = not verify_equivalence(run.model, run.reference, example, rtol=RTOL).passed
    assert masked_differs, "the masks changed nothing: the exactness check would prove nothing"
    inputs = [example, images(3, case.size, 1)]
    if case.other_size is not None:
        inputs.append(images(1, case.other_size, 2))
    assert_exact(run, *inputs)
    assert count_params(run.result.model) < count_params(run.model)
    before, after = dict(run.model.named_parameters()), dict(run.result.model.named_parameters())
    for parameter, dim in case.sliced.items():
        assert after[parameter].shape[dim] < before[parameter].shape[dim], parameter


@pytest.mark.parametrize("name", HEADS_GO)
def test_heads_removed_as_masked(name: str) -> None:
    """Every attention loses the heads its masks prune whole; the notes and ``num_heads`` say so."""
    run = export_case(name)
    removed = {note.layer: note.channels for note in run.result.notes if note.unit == "head(s)"}
    multi_head = [  # a block that records its attention's count (Swin V2's) is not an attention
        n
        for n, m in run.model.named_modules()
        if (query_heads(m) or 0) > 1 and not any(query_heads(inner) for inner in list(m.modules())[1:])
    ]
    assert multi_head, "no module says it has heads"
    missing = set(multi_head) - run.graph.trace.heads.keys()
    assert not missing, f"attentions whose heads the tracer did not find: {sorted(missing)}"
    for module_name, traced in run.graph.trace.heads.items():
        masked = masked_heads(run, module_name)
        assert removed.get(module_name, 0) == masked, module_name
        if traced.query.numel() > 1:  # a single head is never the half 50% masks prune
            assert masked > 0, f"{module_name}: the masks prune none of its {traced.query.numel()} heads"
    assert removed.keys() <= run.result.plan.heads.keys()
    for module_name, counts in run.result.plan.heads.items():
        assert counts.query_before - counts.query == removed[module_name]
        assert query_heads(run.result.model.get_submodule(module_name)) == counts.query
        assert query_heads(run.model.get_submodule(module_name)) == counts.query_before > counts.query


@pytest.mark.parametrize("name", HEADS_KEPT)
def test_heads_kept_for_the_known_reason(name: str) -> None:
    """HEADS KEPT: no head of the attentions named goes, and the graph keeps their query channels for the
    reason expected."""
    case, run = CASES[name], export_case(name)
    pattern, reason = case.heads_kept
    layers = [layer for layer in run.result.graph.trace.producers if re.search(pattern, layer)]
    assert layers, f"no layer matches {pattern!r}"
    attentions = {layer.rpartition(".")[0] for layer in layers}
    assert not [note for note in run.result.notes if note.unit == "head(s)" and note.layer in attentions]
    assert not attentions & run.result.plan.heads.keys()
    for layer in layers:
        assert any(reason in why for why in block_reasons(run.result.graph, layer)), (
            f"{layer}: {block_reasons(run.result.graph, layer)}"
        )
        attention = layer.rpartition(".")[0]
        assert query_heads(run.result.model.get_submodule(attention)) == query_heads(run.model.get_submodule(attention))


class CallNames(TorchFunctionMode):
    """The names of the torch functions a forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_vit_unfused_attention() -> None:
    """timm's explicit path (q @ k.T, softmax, @ v) instead of scaled_dot_product_attention: the
    same heads go, exactly."""
    model = build(CASES["vit"])
    attentions = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attentions
    for module in attentions:  # this model's own modules: timm's global default is left alone
        module.fused_attn = False
    example = images(2, 32, 0)
    with torch.no_grad(), CallNames() as calls:
        model(example)
    assert "scaled_dot_product_attention" not in calls.names and "softmax" in calls.names
    run = export_model(model, example)
    assert_exact(run, example, images(3, 32, 1), images(1, 48, 2))
    assert count_params(run.result.model) < count_params(model)
    assert all(not m.fused_attn for m in run.result.model.modules() if hasattr(m, "fused_attn"))
    fused = export_case("vit").result.plan.heads
    assert run.result.plan.heads == fused and fused  # the same heads as through the fused path
