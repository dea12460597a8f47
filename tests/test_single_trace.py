"""``whole_channel=True`` in one traced pass: the parameter slices pruned channels reach are zeroed as the
pass finds them, and what it records is what a pass over the zeroed model records.

Where the pass cannot know a slice in time (masks that disagree inside a coupled group, a parameter
computed with before its channels are known), export traces again; the export stays exact either way.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import RTOL, random_masks, randomize, zero_norm_affine
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_prune import ChannelGraph, apply_masks, export, group_masks, verify_equivalence
from lightning_prune.core.trace.tracer import Tracer, trace_channels
from lightning_prune.core.verify.equivalence import compare_outputs

IMAGE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny_vit() -> nn.Module:
    """torchvision's ViT at a test's size: a class token joined and a position embedding added to the width."""
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
    )


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "vit":
        return randomize(tiny_vit()).eval()
    return randomize(torchvision.models.get_model(name, weights=None, num_classes=10), example=IMAGE).eval()


def wanted(model: nn.Module, masks: dict, trace) -> dict:
    return ChannelGraph(trace).channel_parameter_keep(masks, model)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vit"])
def test_one_pass_records_what_a_pass_over_the_zeroed_model_records(name) -> None:
    model = build(name)
    masks = group_masks(ChannelGraph.from_model(model, IMAGE), 0.5, model=model)
    masked = apply_masks(model, masks)
    one = trace_channels(masked, IMAGE, whole_channel=masks)
    two = trace_channels(zero_norm_affine(model, masks, IMAGE), IMAGE)  # zeroed first, traced after
    expected = wanted(masked, masks, one)
    assert one.zeroed is not None and one.zeroed.keys() == expected.keys()  # zeroed as it went: no second pass
    assert all(torch.equal(one.zeroed[key], expected[key]) for key in expected)
    assert one.zeroing_changed  # randomised norms: zeroing them changed the values
    assert len(one.consumers) == len(two.consumers)
    for mine, theirs in zip(one.consumers, two.consumers, strict=True):
        assert mine.module == theirs.module
        assert np.allclose(mine.constants.numpy(), theirs.constants.numpy(), rtol=1e-6, atol=0.0, equal_nan=True)
    assert compare_outputs(two.output, one.output).max_relative_error <= 1e-6
    assert any(value.numel() and not bool(value.all()) for value in one.zeroed.values())
    if name == "vit":  # the class token (joined through a view of it) and the position embedding are zeroed too
        assert {("", "class_token"), ("encoder", "pos_embedding")} <= {(m, p) for m, p, _ in one.zeroed}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_whole_channel_export_from_one_pass_is_exact(name, inplace) -> None:
    model = build(name)
    masks = group_masks(ChannelGraph.from_model(model, IMAGE), 0.5, model=model)
    reference = zero_norm_affine(model, masks, IMAGE)
    change = verify_equivalence(apply_masks(model, masks), reference, IMAGE).max_relative_error
    result = export(model, masks, IMAGE, whole_channel=True, inplace=inplace)
    assert verify_equivalence(reference, result.model, IMAGE, rtol=RTOL).passed
    assert result.function_change == pytest.approx(change, rel=1e-4)
    assert result.function_change > 1e-3


@pytest.mark.parametrize("inplace", [False, True])
def test_masks_that_disagree_in_a_group_are_zeroed_as_the_graph_asks(inplace) -> None:
    """Random masks disagree inside ResNet's residual groups, whose union is kept: the pass zeroed what each
    layer's own mask prunes, which is more than the graph asks, so export zeroes what it asks and traces again."""
    model = build("resnet18")
    masks = random_masks(model, 0.5, seed=3, skip=("fc",))
    masked = apply_masks(model, masks)
    one = trace_channels(masked, IMAGE, whole_channel=masks)
    expected = wanted(masked, masks, one)
    assert one.zeroed is not None and (
        one.zeroed.keys() != expected.keys() or any(not torch.equal(one.zeroed[k], expected[k]) for k in expected)
    )
    reference = zero_norm_affine(model, masks, IMAGE)
    change = verify_equivalence(masked, reference, IMAGE).max_relative_error
    result = export(model, masks, IMAGE, whole_channel=True, inplace=inplace)
    assert verify_equivalence(reference, result.model, IMAGE, rtol=RTOL).passed
    assert result.function_change == pytest.approx(change, rel=1e-4)


class Shifted(nn.Module):
    """A per-channel shift computed from its parameter (``exp``) before the op that adds it to the channels:
    zeroing the parameter gives a shift of one, which zeroing the computed shift would miss."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(8, 1, 1, generator=torch.Generator().manual_seed(2)) * 0.3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x) + self.shift.exp()))


def test_a_parameter_computed_with_before_its_channels_are_known_is_traced_again() -> None:
    model = randomize(Shifted()).eval()
    masks = {"conv": torch.arange(8) % 2 == 0}
    masked = apply_masks(model, masks)
    assert trace_channels(masked, IMAGE, whole_channel=masks).zeroed is None  # exp(shift) was computed first
    result = export(model, masks, IMAGE, whole_channel=True)
    reference = zero_norm_affine(model, masks, IMAGE)  # shift zeroed: the pruned channels carry exp(0) = 1
    assert not bool(reference.shift[1::2].any())
    assert verify_equivalence(reference, result.model, IMAGE, rtol=RTOL).passed
    assert result.model.conv.out_channels == 4  # the constant one is folded into the 1x1 head's bias
    assert any(note.action == "folded into bias" and note.layer == "head" for note in result.notes)


def test_norms_already_zero_change_nothing() -> None:
    """Masked fine-tuning leaves the norms of pruned channels zero: the pass zeroes nothing new, and the
    change of function is exactly none."""
    model = build("resnet18")
    masks = group_masks(ChannelGraph.from_model(model, IMAGE), 0.5, model=model)
    reference = zero_norm_affine(model, masks, IMAGE)
    assert not trace_channels(reference, IMAGE, whole_channel=masks).zeroing_changed
    result = export(reference, masks, IMAGE, whole_channel=True)
    assert result.function_change == 0.0
    assert verify_equivalence(reference, result.model, IMAGE, rtol=RTOL).passed


def test_the_pass_leaves_nothing_for_the_garbage_collector() -> None:
    """The zeroing refers to its tracer: left linked, the two would keep every tensor of the pass alive until
    Python's cycle collector ran (a model's activations: ViT-B/16's peak RSS grew by its fp32 size)."""
    model = build("resnet18")
    masks = group_masks(ChannelGraph.from_model(model, IMAGE), 0.5, model=model)
    masked = apply_masks(model, masks)
    gc.collect()
    gc.disable()
    try:
        trace = trace_channels(masked, IMAGE, whole_channel=masks)
        left = [item for item in gc.get_objects() if type(item) is Tracer]
    finally:
        gc.enable()
    assert trace.zeroed is not None
    assert not left


class NormCalls(TorchFunctionMode):
    """The affine weight of each batch and layer norm call, as the trace runs it (under its mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            self.weights.append(kwargs.get("weight", args[3] if len(args) > 3 else None))
        elif func is F.layer_norm:
            self.weights.append(kwargs.get("weight", args[2] if len(args) > 2 else None))
        return func(*args, **kwargs)


@pytest.mark.parametrize(
    ("layers", "norm"),
    [
        pytest.param([nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)], 1, id="batch-norm"),
        pytest.param([nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 4)], 1, id="layer-norm"),
    ],
)
def test_a_norm_after_a_masked_layer_runs_once_on_its_zeroed_parameters(layers, norm) -> None:
    """What the masks prune is zeroed in a norm's parameters before it runs (its rule would ask it after,
    and the norm ran again)."""
    torch.manual_seed(0)
    model = randomize(nn.Sequential(*layers)).eval()
    masks = {"0": torch.tensor([True, False, True, True, False, True, False, True])}
    example = torch.randn(2, 3, 10, 10) if isinstance(layers[0], nn.Conv2d) else torch.randn(5, 6)
    with NormCalls() as seen:
        trace = trace_channels(apply_masks(model, masks), example, whole_channel=masks)
    (weight,) = seen.weights  # one call
    assert not weight[~masks["0"]].any() and torch.equal(weight[masks["0"]], model[norm].weight[masks["0"]])
    assert trace.zeroed is not None and set(trace.zeroed) == {(str(norm), "weight", 0), (str(norm), "bias", 0)}
    expected = zero_norm_affine(model, masks, example)
    with torch.no_grad():
        assert compare_outputs(apply_masks(expected, masks)(example), trace.output).max_relative_error <= 1e-6
