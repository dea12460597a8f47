"""Attention whose code derives ``head_dim`` from the width loses heads while the embedding width stays.

torchvision's ``shifted_window_attention`` (Swin V1 and V2), timm's ``XCA`` and ``ClassAttn`` (XCiT),
PVT-v2's ``Attention``, EVA's ``EvaAttention`` and Swin V2's ``WindowAttention`` derive ``head_dim``
as the input width over ``num_heads``, or reshape the heads' output back to that width, so heads
could go only with the embedding width (export kept them, with a note). Masks here prune whole
heads only (group masks over the layers inside each attention): the exported attention is the
library's class with an explicit ``head_dim``, its per-head state (relative position table, V2's
bias MLP and logit scale, XCiT's temperature, each scaled at random first) sliced with the heads,
EVA's and timm Swin V2's query/key/value bias (a ``cat`` of the query bias, a key bias buffer of
zeros and the value bias, randomized) sliced by channel, exact against the whole-channel masked
model on the example, on another batch size and on another image size. timm's Swin reads
``head_dim`` from its views (``-1``) and ``scale``: the same holds there without a twin.

The torchvision models are ``swin_t``'s and ``swin_v2_t``'s own blocks at a small size
(``SwinTransformer`` with their block and patch-merging classes), so each export takes seconds.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import RTOL, TIMM_SWIN, randomize, zero_norm_affine
from torch import nn
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from lightning_prune import (
    ChannelGraph,
    check_deployed,
    export,
    group_masks,
    load_pruned,
    save_pruned,
    save_pt2,
    verify_equivalence,
)
from lightning_prune.core.errors import ConfigurationError
from lightning_prune.core.shrink.attention import register_head_dim_twins
from lightning_prune.core.shrink.torchvision_models import PrunedShiftedWindowAttention, PrunedShiftedWindowAttentionV2

timm = pytest.importorskip("timm")
from lightning_prune.core.shrink.timm_models import (  # noqa: E402
    PrunedClassAttn,
    PrunedEvaAttention,
    PrunedPvtAttention,
    PrunedSwinV2Attention,
    PrunedXCA,
)

SMALL = {"patch_size": [4, 4], "embed_dim": 16, "depths": [2, 1], "num_heads": [2, 4], "window_size": [4, 4]}
"""Two blocks in the first stage (the shifted window and its mask run), four heads in the second."""


def timm_model(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    size: int  # the example's image size
    other_size: int  # another one it takes
    per_head: dict[str, int]  # per-head state of each attention -> its heads' dim
    twins: tuple[type, ...] = ()  # the pruned classes its attentions become
    head_channels: tuple[str, ...] = ()  # per-channel state of each attention: its heads' rows, in order


V1_TABLE = {"relative_position_bias_table": 1}
QV_BIAS = ("q_bias", "v_bias")
CASES: dict[str, Case] = {
    "swin_t": Case(lambda: SwinTransformer(**SMALL, num_classes=10), 32, 64, V1_TABLE, (PrunedShiftedWindowAttention,)),
    "swin_v2_t": Case(
        lambda: SwinTransformer(**SMALL, num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2),
        32,
        64,
        {"logit_scale": 0, "cpb_mlp.2.weight": 0},  # the bias MLP's input width may be pruned too
        (PrunedShiftedWindowAttentionV2,),
    ),
    "timm-swin_tiny_patch4_window7_224": Case(
        timm_model("swin_tiny_patch4_window7_224", **TIMM_SWIN),
        32,
        64,
        V1_TABLE,
    ),
    "timm-xcit_nano_12_p16_224": Case(  # XCA blocks, then a class-attention block
        timm_model("xcit_nano_12_p16_224", img_size=64, embed_dim=32, depth=2, num_heads=4, cls_attn_layers=1),
        64,
        96,
        {"temperature": 0},  # XCA's; class attention has none
        (PrunedXCA, PrunedClassAttn),
    ),
    "timm-pvt_v2_b0": Case(
        timm_model("pvt_v2_b0", embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
        64,
        96,
        {},
        (PrunedPvtAttention,),
    ),
    "timm-eva02_tiny_patch14_224": Case(  # rotary embedding past the class token; qkv bias = cat(q, zeros, v)
        timm_model("eva02_tiny_patch14_224", img_size=28, embed_dim=32, depth=2, num_heads=4, dynamic_img_size=True),
        28,
        42,
        {},
        (PrunedEvaAttention,),
        QV_BIAS,
    ),
    "timm-swinv2_tiny_window8_256": Case(  # cosine attention, per-head logit scale and bias MLP
        timm_model("swinv2_tiny_window8_256", **TIMM_SWIN),
        32,
        64,
        {"logit_scale": 0, "cpb_mlp.2.weight": 0},
        (PrunedSwinV2Attention,),
        QV_BIAS,
    ),
}
LIVE_BIASES = [
    "timm-xcit_nano_12_p16_224",
    "timm-pvt_v2_b0",
    "timm-eva02_tiny_patch14_224",
    "timm-swinv2_tiny_window8_256",
]


def images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def scale_per_head_state(model: nn.Module, case: Case) -> nn.Module:
    """Each element of the per-head state scaled by a factor in [0.5, 1.5]: heads that differ, so a wrong slice shows."""
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if name.endswith(tuple("." + state for state in case.per_head)):
            parameter.mul_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model


@functools.cache
def exported(name: str) -> tuple[nn.Module, nn.Module, Any, ChannelGraph]:
    """The model, the whole-channel masked reference, and the export of 50% of each attention's heads."""
    torch.manual_seed(0)
    model, x = scale_per_head_state(randomize(CASES[name].build()), CASES[name]), images(2, CASES[name].size, 0)
    graph = ChannelGraph.from_model(model, x)
    inside = [layer for layer in graph.trace.producers if any(layer.startswith(a + ".") for a in graph.trace.heads)]
    masks = group_masks(graph, 0.5, model=model, layers=inside)  # heads (and widths inside attention) only
    return model, zero_norm_affine(model, masks, x), export(model, masks, x, whole_channel=True), graph


@pytest.mark.parametrize("name", list(CASES))
def test_heads_go_without_the_embedding_width(name: str) -> None:
    case = CASES[name]
    model, reference, result, graph = exported(name)
    example = images(2, case.size, 0)
    assert not verify_equivalence(model, reference, example, rtol=RTOL).passed  # the masks change something
    for x in (example, images(3, case.size, 1), images(1, case.other_size, 2)):
        report = verify_equivalence(reference, result.model, x, rtol=RTOL)
        assert report.passed, f"on {tuple(x.shape)}: {report}"
    assert result.plan.heads.keys() == graph.trace.heads.keys(), [str(note) for note in result.notes]
    for attention_name, counts in result.plan.heads.items():
        before, after = model.get_submodule(attention_name), result.model.get_submodule(attention_name)
        assert after.num_heads == counts.query < before.num_heads == counts.query_before
        assert after.proj.out_features == before.proj.out_features  # the embedding width stays
        assert after.proj.in_features == counts.query * counts.head_dim
        for state, dim in case.per_head.items():  # sliced with the heads, kept heads in order
            if hasattr(before, state.partition(".")[0]):
                old, new = before.get_parameter(state), after.get_parameter(state)
                assert new.shape[dim] == counts.query, state
                if state != "cpb_mlp.2.weight":
                    assert torch.equal(new, old.index_select(dim, torch.tensor(counts.kept))), state
        for state in case.head_channels:
            old, new = before.get_parameter(state), after.get_parameter(state)
            assert torch.equal(new, old.view(counts.query_before, -1)[list(counts.kept)].flatten()), state
        twin = next((t for t in case.twins if isinstance(after, t)), None)
        assert (twin is not None) == bool(case.twins), type(after)
        assert twin is None or (type(after) is twin and after.head_dim == counts.head_dim)


@pytest.mark.parametrize("name", ["timm-xcit_nano_12_p16_224", "timm-pvt_v2_b0", "timm-eva02_tiny_patch14_224"])
def test_both_attention_paths_of_the_timm_twins(name: str) -> None:
    """timm's fused (scaled_dot_product_attention) and explicit paths, each twin switched to the other."""
    case, (_, reference, result, _) = CASES[name], exported(name)
    reference, exported_model = copy.deepcopy(reference), copy.deepcopy(result.model)
    assert any(isinstance(module, case.twins) for module in exported_model.modules())
    for model in (reference, exported_model):
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = not module.fused_attn
    report = verify_equivalence(reference, exported_model, images(3, case.size, 1), rtol=RTOL)
    assert report.passed, str(report)


@torch.no_grad()
def zero_first_head(model: nn.Module, graph: ChannelGraph) -> nn.Module:
    """Zero the query, key and value rows of each attention's first head, leaving their biases live (and
    Swin V2's bias MLP's row of that head: the head's weights, all of them)."""
    for attention_name, traced in graph.trace.heads.items():
        attention = model.get_submodule(attention_name)
        for layer_name, parts in (("qkv", 3), ("q", 1), ("k", 1), ("v", 1), ("kv", 2)):
            layer = getattr(attention, layer_name, None)
            for part in range(parts) if isinstance(layer, nn.Linear) else ():
                start = part * layer.out_features // parts
                layer.weight[start : start + traced.head_dim] = 0
        if hasattr(attention, "cpb_mlp"):
            attention.cpb_mlp[-1].weight[0] = 0
    return model


@pytest.mark.parametrize("name", LIVE_BIASES)
def test_heads_with_live_biases_go_without_the_embedding_width(name: str) -> None:
    """Masks read from zeroed query/key/value rows with live biases: the heads go, their constant output
    folded into the projection's bias, exact (the reference is the model itself)."""
    case, (model, _, _, graph) = CASES[name], exported(name)
    model = zero_first_head(copy.deepcopy(model), graph)
    result = export(model, None, images(2, case.size, 0))
    for x in (images(2, case.size, 0), images(3, case.size, 1), images(1, case.other_size, 2)):
        report = verify_equivalence(model, result.model, x, rtol=RTOL)
        assert report.passed, f"on {tuple(x.shape)}: {report}"
    assert result.plan.heads.keys() == graph.trace.heads.keys(), [str(note) for note in result.notes]
    assert all(counts.query == counts.query_before - 1 for counts in result.plan.heads.values())


@pytest.mark.parametrize("name", ["swin_t", "timm-eva02_tiny_patch14_224", "timm-swinv2_tiny_window8_256"])
def test_the_checkpoint_rebuilds_the_pruned_attention_from_the_original_architecture(tmp_path, name: str) -> None:
    """load_pruned on a freshly built model gives the same classes, head counts and outputs (EVA's and Swin V2's
    key bias, a buffer not in the checkpoint, sized too); a deep copy runs."""
    case, (model, _, result, _) = CASES[name], exported(name)
    assert result.plan.heads
    save_pruned(tmp_path / "pruned.ckpt", result)
    rebuilt = load_pruned(tmp_path / "pruned.ckpt", copy.deepcopy(model))
    for attention_name, counts in result.plan.heads.items():
        attention = rebuilt.get_submodule(attention_name)
        assert type(attention) in case.twins and attention.num_heads == counts.query
    for twin in (rebuilt, copy.deepcopy(result.model)):
        assert verify_equivalence(result.model, twin, images(3, case.size, 1), rtol=0.0).passed


def test_a_twin_that_does_not_subclass_its_class_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="PrunedShiftedWindowAttention does not subclass Linear"):
        register_head_dim_twins({nn.Linear: PrunedShiftedWindowAttention})


def test_the_pruned_attention_exports_to_pt2(tmp_path) -> None:
    """torch.export traces the twin's forward: the deployed file computes what the exported model does."""
    _, _, result, _ = exported("swin_t")
    path = save_pt2(result.model, images(2, 32, 0), tmp_path / "pruned.pt2")
    checked = check_deployed(path, result.model, [images(3, 32, 1)], format="pt2")
    assert checked["max_relative_error"] <= checked["rtol"]
