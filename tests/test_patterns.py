"""The seed's patterns and every op family the tracer understands, on small in-repo models."""

from __future__ import annotations

import pytest
import torch
from helpers import export_and_check, random_masks, randomize, zero_norm_affine
from models import ConcatNet, Conv2dBetween3d, DepthwiseNet, OpsNet, SeedNet, SENet, ShuffleChunkNet, UnprunedLast
from torch import nn

from lightning_prune import apply_masks, export
from lightning_prune.core.verify.report import count_params

g = torch.Generator().manual_seed(3)
IMAGE = torch.randn(2, 3, 16, 16, generator=g)
CASES = [
    pytest.param(ConcatNet, IMAGE, id="concat_pruned_unpruned_input"),
    pytest.param(DepthwiseNet, IMAGE, id="depthwise_block"),
    pytest.param(SENet, IMAGE, id="se_block"),
    pytest.param(Conv2dBetween3d, torch.randn(2, 2, 4, 8, 8, generator=g), id="conv2d_between_conv3d"),
    pytest.param(UnprunedLast, IMAGE, id="unpruned_last_layer"),
    pytest.param(ShuffleChunkNet, IMAGE, id="chunk_shuffle_stack"),
    pytest.param(OpsNet, ({"image": IMAGE[:, :, :8, :8], "scale": 2.0},), id="ops_dict_io_reuse_inplace"),
    pytest.param(SeedNet, torch.randn(2, 3, 32, 32, generator=g), id="seed_hsmnet_like"),
]


@pytest.mark.parametrize("variant", ["weights", "weights+norms"])
@pytest.mark.parametrize(("builder", "example"), CASES)
def test_pattern_exports_exactly(builder, example, variant) -> None:
    torch.manual_seed(0)
    model = randomize(builder())
    masks = random_masks(model)
    reference = apply_masks(model, masks) if variant == "weights" else zero_norm_affine(model, masks, example)
    result = export_and_check(reference, masks, example)
    assert count_params(result.model) < count_params(model)


def test_concat_keeps_unpruned_and_input_channels() -> None:
    model = randomize(ConcatNet())
    masks = {"pruned.0": torch.arange(16) < 6}
    result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    assert result.model.pruned[0].out_channels == 6
    assert result.model.head.in_channels == 6 + 8 + 3


def test_conv2d_between_3d_convs_drops_depth_slices() -> None:
    model = randomize(Conv2dBetween3d())
    masks = {"conv3d_in.0": torch.arange(8) % 2 == 0}
    example = torch.randn(2, 2, 4, 8, 8)
    result = export_and_check(apply_masks(model, masks), masks, example)
    assert result.model.conv3d_in[0].out_channels == 4
    assert result.model.conv1.in_channels == 4 * 4  # each 3D channel spans `depth` 2D channels


def test_model_output_channels_are_kept() -> None:
    model = randomize(UnprunedLast())
    masks = {"last": torch.arange(8) < 2, "features.0": torch.arange(16) < 4}
    result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    assert result.model.last.out_channels == 8
    assert result.model.features[0].out_channels == 4


def test_depthwise_follows_its_producer() -> None:
    model = randomize(DepthwiseNet())
    keep = torch.arange(48) < 20
    masks = {"expand.0": keep, "depthwise.0": keep}
    result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    depthwise = result.model.depthwise[0]
    assert depthwise.in_channels == depthwise.out_channels == depthwise.groups == 20
    assert result.model.project[0].in_channels == 20


def test_residual_add_keeps_the_union() -> None:
    model = randomize(DepthwiseNet())
    masks = {"stem.0": torch.arange(16) < 8, "project.0": torch.arange(16) >= 4}
    result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    assert result.model.stem[0].out_channels == 16  # 0..7 kept by one mask, 4..15 by the other


def test_constant_channels_are_folded_into_a_1x1_consumer() -> None:
    model = randomize(DepthwiseNet())
    keep = torch.arange(48) < 24
    masks = {"expand.0": keep, "depthwise.0": keep}  # the BN shift after the pruned filters is a constant
    result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    assert result.model.project[0].in_channels == 24
    assert ("project.0", "folded into bias") in {(n.layer, n.action) for n in result.notes}
    assert result.model.project[0].bias is not None  # created to hold the fold


def test_unmasked_depthwise_follows_its_input() -> None:
    model = randomize(DepthwiseNet())
    masks = {"expand.0": torch.arange(48) < 24}  # the depthwise conv zero-pads a constant: kept, noted
    result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    kept = [n for n in result.notes if n.layer == "expand.0" and n.action == "kept"]
    assert len(kept) == 1 and "'project.0' not constant" in kept[0].reason
    assert 0 < kept[0].channels <= 24  # channels whose constant is 0 after ReLU6 still go
    assert result.model.expand[0].out_channels == 24 + kept[0].channels


def test_constant_before_padded_conv_is_kept_and_reported() -> None:
    model = randomize(SENet())
    masks = {"body.0": torch.arange(32) < 16, "se.fc2": torch.arange(32) < 16}
    result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    kept = [n for n in result.notes if n.layer == "body.0" and n.action == "kept"]
    assert len(kept) == 1 and "'head'" in kept[0].reason and "zero-pads" in kept[0].reason
    assert result.model.head.in_channels == 32 - 16 + kept[0].channels


def test_grouped_conv_mask_is_widened_not_crashed() -> None:
    model = randomize(
        nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Conv2d(8, 2, 1))
    )
    masks = {
        "0": torch.tensor([1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool),
        "2": torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool),
    }
    result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    grouped = result.model[2]
    assert grouped.groups == 4 and grouped.in_channels % 4 == 0 and grouped.out_channels % 4 == 0
    assert any("groups must keep equal" in n.reason for n in result.notes)


def test_layers_that_did_not_run_are_left_alone() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 8, 1)
            self.unused = nn.Conv2d(8, 8, 1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(torch.relu(self.used(x)))

    model = randomize(Branchy())
    masks = {"used": torch.arange(8) < 4, "unused": torch.arange(8) < 4}
    result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    assert result.model.unused.weight.shape == (8, 8, 1, 1)
    assert any(n.layer == "unused" and "did not run" in n.reason for n in result.notes)


def test_unknown_op_keeps_its_channels_with_a_warning() -> None:
    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.other = nn.Conv2d(3, 8, 1)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            return self.head(torch.cat([self.conv(x).cumsum(1), self.other(x)], 1))

    model = randomize(Cumulative())
    masks = {"conv": torch.arange(8) < 4, "other": torch.arange(8) < 4}
    with pytest.warns(UserWarning, match="op 'cumsum' is not understood"):
        result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    assert result.model.conv.out_channels == 8
    assert result.model.other.out_channels == 4


def test_argument_is_not_mutated() -> None:
    model = randomize(SENet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = export(model, random_masks(model), IMAGE).model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shared = {id(p) for p in model.parameters()} & {id(p) for p in small.parameters()}
    assert not shared
