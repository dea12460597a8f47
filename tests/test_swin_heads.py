"""Swin attention loses heads while the embedding width stays.

torchvision's ``shifted_window_attention`` derives ``head_dim`` as the input width over ``num_heads``
and reshapes the heads' output back to that width, so heads could go only with the embedding width
(export kept them, with a note). Masks here prune whole heads only (group masks over the layers
inside each attention): the exported attention is torchvision's class with an explicit ``head_dim``,
its per-head relative position table (V1) or bias MLP and logit scale (V2) sliced with the heads,
exact against the whole-channel masked model on the example, on another batch size and on another
image size. timm's Swin reads ``head_dim`` from its views (``-1``) and ``scale``: the same holds.

The torchvision models are ``swin_t``'s and ``swin_v2_t``'s own blocks at a small size
(``SwinTransformer`` with their block and patch-merging classes), so each export takes seconds.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import RTOL, randomize, zero_norm_affine
from torch import nn
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from lightning_prune import ChannelGraph, export, group_masks, load_pruned, save_pruned, verify_equivalence
from lightning_prune.core.errors import ConfigurationError
from lightning_prune.core.shrink.attention import with_head_dim
from lightning_prune.core.shrink.torchvision_models import PrunedShiftedWindowAttention, PrunedShiftedWindowAttentionV2

timm = pytest.importorskip("timm")

SMALL = {"patch_size": [4, 4], "embed_dim": 16, "depths": [2, 1], "num_heads": [2, 4], "window_size": [4, 4]}
"""Two blocks in the first stage (the shifted window and its mask run), four heads in the second."""

BUILDS: dict[str, Callable[[], nn.Module]] = {
    "swin_t": lambda: SwinTransformer(**SMALL, num_classes=10),
    "swin_v2_t": lambda: SwinTransformer(
        **SMALL, num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2
    ),
    "timm-swin_tiny_patch4_window7_224": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(2, 1),
        num_heads=(2, 4),
        dynamic_img_size=True,
    ),
}
PRUNED_CLASS = {"swin_t": PrunedShiftedWindowAttention, "swin_v2_t": PrunedShiftedWindowAttentionV2}


def images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@functools.cache
def exported(name: str) -> tuple[nn.Module, nn.Module, Any, ChannelGraph]:
    """The model, the whole-channel masked reference, and the export of 50% of each attention's heads."""
    torch.manual_seed(0)
    model = randomize(BUILDS[name]())
    graph = ChannelGraph.from_model(model, images(2, 32, 0))
    inside = [layer for layer in graph.trace.producers if any(layer.startswith(a + ".") for a in graph.trace.heads)]
    masks = group_masks(graph, 0.5, model=model, layers=inside)  # heads (and a bias MLP's hidden width) only
    result = export(model, masks, images(2, 32, 0), whole_channel=True)
    return model, zero_norm_affine(model, masks, images(2, 32, 0)), result, graph


def per_head(attention: nn.Module) -> dict[str, int]:
    """The per-head state of a Swin attention -> its heads' dim: V1's relative position bias table, V2's
    logit scale and the last layer of its bias MLP (whose input width may be pruned too)."""
    if hasattr(attention, "cpb_mlp"):
        return {"logit_scale": 0, "cpb_mlp.2.weight": 0}
    return {"relative_position_bias_table": 1}


@pytest.mark.parametrize("name", list(BUILDS))
def test_heads_go_without_the_embedding_width(name: str) -> None:
    model, reference, result, graph = exported(name)
    assert not verify_equivalence(model, reference, images(2, 32, 0), rtol=RTOL).passed  # the masks change something
    for x in (images(2, 32, 0), images(3, 32, 1), images(1, 64, 2)):
        report = verify_equivalence(reference, result.model, x, rtol=RTOL)
        assert report.passed, f"on {tuple(x.shape)}: {report}"
    assert result.plan.heads.keys() == graph.trace.heads.keys(), [str(note) for note in result.notes]
    for attention_name, counts in result.plan.heads.items():
        before, after = model.get_submodule(attention_name), result.model.get_submodule(attention_name)
        assert after.num_heads == counts.query < before.num_heads == counts.query_before
        assert after.qkv.in_features == before.qkv.in_features  # the embedding width stays
        assert after.qkv.out_features == 3 * counts.query * counts.head_dim
        assert after.proj.in_features == counts.query * counts.head_dim
        for state, dim in per_head(before).items():  # sliced with the heads, kept heads in order
            old, new = before.get_parameter(state), after.get_parameter(state)
            assert new.shape[dim] == counts.query, state
            if state != "cpb_mlp.2.weight":
                assert torch.equal(new, old.index_select(dim, torch.tensor(counts.kept))), state
        if name in PRUNED_CLASS:
            assert type(after) is PRUNED_CLASS[name] and after.head_dim == counts.head_dim


def test_the_checkpoint_rebuilds_the_pruned_attention_from_the_original_architecture(tmp_path) -> None:
    """load_pruned on a freshly built swin_t gives the same classes, head counts and outputs; a deep copy runs."""
    model, _, result, _ = exported("swin_t")
    assert result.plan.heads
    save_pruned(tmp_path / "pruned.ckpt", result)
    rebuilt = load_pruned(tmp_path / "pruned.ckpt", copy.deepcopy(model))
    for attention_name, counts in result.plan.heads.items():
        attention = rebuilt.get_submodule(attention_name)
        assert type(attention) is PrunedShiftedWindowAttention and attention.num_heads == counts.query
    for twin in (rebuilt, copy.deepcopy(result.model)):
        assert verify_equivalence(result.model, twin, images(3, 32, 1), rtol=0.0).passed


def test_a_pruned_class_that_does_not_subclass_the_module_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="PrunedShiftedWindowAttention does not subclass .* Linear"):
        with_head_dim(nn.Linear(4, 4), PrunedShiftedWindowAttention, 2)
