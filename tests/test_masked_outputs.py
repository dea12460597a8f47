"""A pass over the masked model (traced, or the masks' own output) runs a plain masked conv or linear layer
on its own weights and zeroes its output (no zeroed copy); any other read of the layer's tensors gets them zeroed."""

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
from lightning_prune.core.trace.streaming import model_output
from lightning_prune.core.trace.tracer import trace_channels

PRUNED = torch.tensor([1, 4, 6])


def keep(channels: int) -> torch.Tensor:
    mask = torch.ones(channels, dtype=torch.bool)
    mask[PRUNED] = False
    return mask


@torch.no_grad()
def masked_copy(model: nn.Module, layer: str) -> nn.Module:
    """``model`` with ``layer``'s filters and bias at :data:`PRUNED` zeroed: the masked model, built by hand."""
    masked = copy.deepcopy(model)
    module = masked.get_submodule(layer)
    module.weight[PRUNED] = 0
    if module.bias is not None:
        module.bias[PRUNED] = 0
    return masked


class ReadsChildWeight(nn.Module):
    """Calls its layer, and reads the layer's weight itself (before or after the call)."""

    def __init__(self, read_first: bool) -> None:
        super().__init__()
        self.read_first = read_first
        self.fc = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.read_first:
            read = x @ self.fc.weight.T
            return self.out(self.fc(x) + read)
        called = self.fc(x)
        return self.out(called + x @ self.fc.weight.T)


class OtherBias(nn.Module):
    """Calls ``F.linear`` on its layer's weight with a bias of its own, not the layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.other = nn.Parameter(torch.randn(8))
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(F.linear(x, self.fc.weight, self.other)) + self.fc(x))


class ReadsThenClones(nn.Module):
    """Reads its layer's weight and bias, clones the bias, then calls ``F.linear`` on them: the weight it
    holds was read before the clone loaded the layer (torchvision's Swin V2 attention does this)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fc.weight, self.fc.bias
        return self.out(F.linear(x, weight, bias.clone()))


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


CASES = [
    pytest.param(conv_net, "0", torch.randn(2, 3, 8, 8), id="conv-batched"),
    pytest.param(
        lambda: nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 1)),
        "0",
        torch.randn(3, 16),
        id="conv1d-unbatched",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1)),
        "0",
        torch.randn(2, 4, 8, 8),
        id="grouped-conv",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1)),
        "0",
        torch.randn(2, 8, 8, 8),
        id="depthwise-conv",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Conv1d(4, 8, 3, groups=4), nn.ReLU(), nn.Conv1d(8, 4, 1)),
        "0",
        torch.randn(4, 16),
        id="depthwise-multiplier-unbatched",
    ),
    pytest.param(lambda: ReadsChildWeight(read_first=False), "fc", torch.randn(5, 6), id="weight-read-after-call"),
    pytest.param(lambda: ReadsChildWeight(read_first=True), "fc", torch.randn(5, 6), id="weight-read-before-call"),
    pytest.param(OtherBias, "fc", torch.randn(5, 6), id="another-bias"),
    pytest.param(ReadsThenClones, "fc", torch.randn(5, 6), id="weight-read-before-the-layer-is-loaded"),
]


@pytest.mark.parametrize(("build", "layer", "example"), CASES)
def test_the_trace_computes_the_masked_model(build, layer, example):
    torch.manual_seed(0)
    model = randomize(build().eval())
    masks = {layer: keep(8)}
    expected = masked_copy(model, layer)(example)
    trace = trace_channels(model, example, MaskedView(model, masks))
    assert relative_error(trace.output, expected) < 1e-6
    assert relative_error(model_output(model, example, MaskedView(model, masks)), expected) < 1e-6  # untraced
    in_place = copy.deepcopy(model)
    assert (
        relative_error(trace_channels(in_place, example, MaskedView(in_place, masks, in_place=True)).output, expected)
        < 1e-6
    )
    result = export(model, masks, example)  # exact against the traced output, which is the masked model's
    assert relative_error(result.model(example), expected) < 1e-5


def test_a_plain_masked_layer_runs_on_its_own_weights_and_outputs_zero_where_pruned():
    torch.manual_seed(0)
    model = randomize(conv_net().eval())
    own = model[0].weight
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append((module.weight is own, out)))
    trace_channels(model, torch.randn(2, 3, 8, 8), MaskedView(model, {"0": keep(8)}))
    ((ran_on_own, out),) = seen
    assert ran_on_own
    assert not out[:, PRUNED].any() and out[:, keep(8)].abs().min() > 0
    assert model[0].weight is own and model[0].weight[PRUNED].abs().min() > 0  # the model is untouched


class LayerWeights(TorchFunctionMode):
    """Records the weight of every ``conv2d`` and ``linear`` call that reaches it (and keeps it alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, F.linear):
            self.weights.append(args[1])
        return func(*args, **(kwargs or {}))


def test_a_plain_masked_layer_computes_its_kept_channels_only():
    torch.manual_seed(0)
    model = randomize(conv_net().eval())
    with LayerWeights() as seen:  # under the tracer's mode: it sees the calls as the trace runs them
        trace_channels(model, torch.randn(2, 3, 8, 8), MaskedView(model, {"0": keep(8)}))
    first, second = seen.weights
    assert torch.equal(first, model[0].weight[keep(8)])  # the kept filters alone
    assert second is model[3].weight  # an unmasked layer runs on its own weight


def test_the_kept_rows_of_every_layer_go_into_one_buffer():
    """A fresh copy of each layer's kept rows left the allocator holding freed layer-sized blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with LayerWeights() as seen:
        trace_channels(model, torch.randn(5, 10), MaskedView(model, {"0": keep(8), "2": keep(8)}))
    first, second, last = seen.weights
    assert first.shape == (5, 10) and second.shape == (5, 8) and last is model[4].weight
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()  # the first is still held
    assert torch.equal(second, model[2].weight[keep(8)])


def test_a_layer_read_outside_its_call_is_given_zeroed_weights_and_then_its_own_back():
    torch.manual_seed(0)
    model = ReadsChildWeight(read_first=False).eval()
    own = model.fc.weight
    seen = []
    model.out.register_forward_pre_hook(lambda module, args: seen.append(model.fc.weight))
    trace_channels(model, torch.randn(5, 6), MaskedView(model, {"fc": keep(8)}))
    (during,) = seen
    assert during is not own and not during[PRUNED].any()  # the zeroed copy, loaded for the matmul
    assert model.fc.weight is own and model.fc.weight[PRUNED].abs().min() > 0


def test_a_bias_fold_reads_the_layers_own_weight_and_a_kept_masked_row_stays_zero():
    """Layer ``3`` folds the constants of layer ``0``'s pruned channels (BN shifts through a ReLU) into its bias,
    from its own weight (no zeroed copy); ``round_to=2`` keeps one of its masked rows, whose fold must be zero."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 7, 1), nn.ReLU(), nn.Conv2d(7, 2, 1)]
    model = randomize(nn.Sequential(*layers)).eval()
    with torch.no_grad():
        model[1].bias.abs_().add_(0.5)  # positive shifts: the pruned channels carry a constant through the ReLU
    row_masks = torch.ones(7, dtype=torch.bool)
    row_masks[[1, 4]] = False
    masks = {"0": keep(8), "3": row_masks}
    example = torch.randn(2, 3, 10, 10)
    result = export(model, masks, example, round_to=2)
    assert result.model[3].out_channels == 6 and result.retries == 0  # one of its two masked rows is kept
    assert any(note.action == "folded into bias" and note.layer == "3" for note in result.notes)
    expected = masked_copy(model, "0")
    with torch.no_grad():
        expected[3].weight[~row_masks] = 0
        expected[3].bias[~row_masks] = 0
    assert relative_error(result.model(example), expected(example)) < 1e-5


def test_a_layer_masked_whole_outputs_zero():
    torch.manual_seed(0)
    model = randomize(conv_net().eval())
    example = torch.randn(2, 3, 8, 8)
    masks = {"0": torch.zeros(8, dtype=torch.bool)}
    with torch.no_grad():
        expected = model[1:](torch.zeros(2, 8, 6, 6))  # what follows a layer that outputs zero everywhere
    assert relative_error(trace_channels(model, example, MaskedView(model, masks)).output, expected) < 1e-6
