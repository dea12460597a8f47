"""A masked layer's traced call leaves out the input channels that hold one value everywhere: zero ones always,
nonzero ones folded into its bias where it has no padding. The pass still computes the masked model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize, relative_error
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_prune import export
from lightning_prune.core.graph.masked_view import MaskedView
from lightning_prune.core.trace import masked_outputs
from lightning_prune.core.trace.constants import LastConstants
from lightning_prune.core.trace.streaming import model_output
from lightning_prune.core.trace.tracer import trace_channels

PRUNED = [1, 4, 6]  # of the first layer's 8 outputs
SHIFTS = torch.tensor([0.3, 0.7, -0.4, 0.2, -0.6, 0.5, -0.5, 0.1])  # BN shifts: pruned 1 carries a positive constant


def keep(channels: int, pruned: list[int]) -> torch.Tensor:
    mask = torch.ones(channels, dtype=torch.bool)
    mask[pruned] = False
    return mask


def net(second: nn.Module) -> nn.Module:
    """conv -> BN (known shifts) -> ReLU -> ``second``: the first layer's pruned channels reach ``second`` as
    the constants ``relu(shift)``: one positive, two zero."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), second)).eval()
    with torch.no_grad():
        model[1].running_mean.zero_()
        model[1].bias.copy_(SHIFTS)
    return model


@torch.no_grad()
def hand_masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    masked = copy.deepcopy(model)
    for name, mask in masks.items():
        layer = masked.get_submodule(name)
        layer.weight[~mask] = 0
        if layer.bias is not None:
            layer.bias[~mask] = 0
    return masked


class Calls(TorchFunctionMode):
    """Each ``conv2d`` and ``linear`` call's input and weight, as the trace runs them (under its mode), and the
    weight's values then (a buffer the pass reuses holds another layer's after)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.values: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, F.linear):
            weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
            self.calls.append((kwargs.get("input", args[0]), weight))
            self.values.append(weight.detach().clone())
        return func(*args, **kwargs)


CASES = [
    # without padding the constants are left out, the nonzero one folded into the bias: 5 of 8 inputs left
    pytest.param(nn.Conv2d(8, 6, 1), 5, id="conv-1x1-folds-constants"),
    pytest.param(nn.Conv2d(8, 6, 3, stride=2), 5, id="conv-3x3-unpadded-folds-constants"),
    # a zero border makes a constant channel vary at the edges: only the zero ones are left out
    pytest.param(nn.Conv2d(8, 6, 3, padding=1), 6, id="conv-3x3-padded-zero-only"),
    pytest.param(nn.Conv2d(8, 6, 3, padding=1, bias=False), 6, id="conv-3x3-padded-no-bias"),
    pytest.param(nn.Conv2d(8, 6, 1, bias=False), 5, id="conv-1x1-no-bias"),
]


@pytest.mark.parametrize(("second", "live"), CASES)
def test_constant_inputs_are_left_out_and_the_pass_computes_the_masked_model(monkeypatch, second, live):
    monkeypatch.setattr(masked_outputs, "_FEWEST_MACS", 0)  # these layers are small
    torch.manual_seed(0)
    model = net(second)
    masks = {"0": keep(8, PRUNED), "3": keep(6, [2])}
    example = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = hand_masked(model, masks)(example)
    with Calls() as seen:
        trace = trace_channels(model, example, MaskedView(model, masks))
    (_, first), (data, weight) = seen.calls
    assert first.shape[:2] == (8 - len(PRUNED), 3)
    assert weight.shape[:2] == (5, live) and data.shape[1] == live  # kept rows, live columns
    assert relative_error(trace.output, expected) < 1e-6
    assert relative_error(model_output(model, example, MaskedView(model, masks)), expected) < 1e-6  # untraced
    result = export(model, masks, example)  # its reference is the trace's output
    assert result.retries == 0 and relative_error(result.model(example), expected) < 1e-5


def test_a_linear_layer_leaves_out_its_zero_inputs_and_its_live_columns_reuse_one_buffer(monkeypatch):
    monkeypatch.setattr(masked_outputs, "_FEWEST_MACS", 0)
    torch.manual_seed(0)
    # the masks zero the pruned rows and biases: tanh keeps their outputs zero, and no kept channel constant
    layers = [nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    model = randomize(nn.Sequential(*layers)).eval()
    masks = {"0": keep(8, PRUNED), "2": keep(8, PRUNED), "4": keep(8, PRUNED)}
    example = torch.randn(5, 10)
    with Calls() as seen:
        trace = trace_channels(model, example, MaskedView(model, masks))
    _, second, third, last = (weight for _, weight in seen.calls)
    assert second.shape == third.shape == (5, 5)
    assert torch.equal(seen.values[1], model[2].weight[keep(8, PRUNED)][:, keep(8, PRUNED)])
    assert second.untyped_storage().data_ptr() == third.untyped_storage().data_ptr()  # the second is still held
    assert last is model[6].weight  # an unmasked layer runs on its own weight, its zero inputs in
    with torch.no_grad():
        assert relative_error(trace.output, hand_masked(model, masks)(example)) < 1e-6


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("whole_channel", [False, True], ids=["constants", "whole-channel"])
def test_a_resnet_block_exports_exactly_with_its_constant_inputs_left_out(monkeypatch, whole_channel, inplace):
    """A bottleneck's 1x1 and padded 3x3 convs, every conv masked: default folds what the pruned channels
    carry, ``whole_channel`` zeroes it."""
    from torchvision.models.resnet import Bottleneck

    monkeypatch.setattr(masked_outputs, "_FEWEST_MACS", 0)
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32))
    model = randomize(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), Bottleneck(16, 8, downsample=downsample)
        )
    ).eval()
    masks = {
        "0": torch.arange(16) % 3 != 0,
        "3.conv1": torch.arange(8) % 2 == 0,
        "3.conv2": torch.arange(8) % 4 != 1,
        "3.conv3": torch.arange(32) % 2 == 1,
        "3.downsample.0": torch.arange(32) % 2 == 1,
    }
    example = torch.randn(2, 3, 10, 10)
    reference = export(copy.deepcopy(model), masks, example, whole_channel=whole_channel)
    monkeypatch.setattr(masked_outputs, "_FEWEST_MACS", 1 << 62)  # the same export, every input computed
    expected = export(copy.deepcopy(model), masks, example, whole_channel=whole_channel)
    monkeypatch.setattr(masked_outputs, "_FEWEST_MACS", 0)
    result = export(model, masks, example, whole_channel=whole_channel, inplace=inplace)
    for got in (reference, result):
        assert got.retries == 0
        assert [p.shape for p in got.model.parameters()] == [p.shape for p in expected.model.parameters()]
        assert relative_error(got.model(example), expected.model(example)) < 1e-5
    if whole_channel:
        assert result.function_change == pytest.approx(expected.function_change, rel=1e-4)


def test_the_last_answer_is_read_once_and_an_in_place_write_asks_again():
    constants = LastConstants()
    data = torch.ones(2, 3, 4)
    data[:, 1] = torch.arange(8.0).view(2, 4)
    first = constants(data, 1)
    assert first[0] == 1 and first[1].isnan() and first[2] == 1
    first[0] = 5  # the caller's copy
    assert constants(data, -2)[0] == 1  # the same dim, counted from the end
    data[:, 0] = 2  # in place: the version moves on
    assert constants(data, 1)[0] == 2
