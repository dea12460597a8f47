"""Notes that explain: every channel a mask prunes that export keeps has a note naming the layer,
the count and the reason, and a layer's "kept" counts add up to its masked channels kept."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from helpers import export_and_check, random_masks, randomize
from models import DepthwiseNet, UnprunedLast
from torch import nn

from lightning_prune import apply_masks
from lightning_prune.core.graph.prunable import out_channels
from lightning_prune.core.trace import op_rules

IMAGE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class ConvLSTM(nn.Module):
    """Conv1d features into an LSTM, an op the tracer does not understand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 16, 3, padding=1)
        self.conv2 = nn.Conv1d(16, 20, 3, padding=1)
        self.lstm = nn.LSTM(20, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        out, _ = self.lstm(y.transpose(1, 2))
        return self.head(out[:, -1])


def conv_lstm():
    model = randomize(ConvLSTM())
    return model, random_masks(model), torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))


def r3d_18():
    torch.manual_seed(0)
    model = randomize(torchvision.models.video.r3d_18(weights=None))
    return model, random_masks(model), torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))


def residual_masks_disagree():
    model = randomize(DepthwiseNet())
    return (
        model,
        {"stem.0": torch.arange(16) < 8, "project.0": torch.arange(16) >= 4, "expand.0": torch.arange(48) < 24},
        IMAGE,
    )


def last_conv_feeds_the_output():
    model = randomize(UnprunedLast())
    return model, {"last": torch.arange(8) < 2, "features.0": torch.arange(16) < 4}, IMAGE


def kept_against_masks(result, masks) -> dict[str, int]:
    return {layer: out_channels(result.model.get_submodule(layer)) - int(keep.sum()) for layer, keep in masks.items()}


def assert_notes_account_for_every_kept_channel(result, masks) -> None:
    for layer, kept in kept_against_masks(result, masks).items():
        notes = [n for n in result.notes if n.layer == layer and n.action == "kept"]
        assert sum(n.channels for n in notes) == kept, (layer, kept, [str(n) for n in notes])
        assert all(n.channels > 0 and n.reason for n in notes)
        assert len({n.reason for n in notes}) == len(notes)  # one line per reason
    assert not [n for n in result.notes if "without a recorded reason" in n.reason]


@pytest.mark.parametrize(
    ("build", "layer", "reason"),
    [
        pytest.param(conv_lstm, "conv2", "op 'lstm' is not understood by the tracer", id="conv_lstm"),
        pytest.param(r3d_18, "stem.0", "coupled with 'layer1.", id="r3d_18"),
        pytest.param(
            residual_masks_disagree,
            "stem.0",
            "coupled with 'project.0', whose mask keeps them",
            id="residual_masks_disagree",
        ),
        pytest.param(
            last_conv_feeds_the_output, "last", "they reach the model output", id="last_conv_feeds_the_output"
        ),
    ],
)
def test_kept_notes_add_up_to_the_masked_channels_kept(build, layer, reason) -> None:
    model, masks, example = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LSTM's warning is checked through its note
        result = export_and_check(apply_masks(model, masks), masks, example)
    assert_notes_account_for_every_kept_channel(result, masks)
    assert kept_against_masks(result, masks)[layer] > 0
    assert any(n.layer == layer and n.action == "kept" and n.reason.startswith(reason) for n in result.notes), [
        str(n) for n in result.notes
    ]


class CatKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(torch.cat(tensors=[self.a(x), self.b(x)], dim=1))  # no positional argument at all


class Unbind(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.Conv2d(3, 8, 1)
        self.parts = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.rows(x)
        y = torch.stack(torch.unbind(y, 2), 2) + torch.stack(y.unbind(dim=2), dim=2)  # both call forms, along height
        first, *rest = self.parts(x).unbind(1)  # along the channels: one tensor per channel
        return self.head(y) + first.unsqueeze(1) + sum(rest).unsqueeze(1)


def _export_without_warnings(model, masks):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_and_check(apply_masks(model, masks), masks, IMAGE)
    assert not [str(w.message) for w in caught if "lightning_prune" in str(w.message)]
    return result


def test_cat_given_its_tensors_as_a_keyword() -> None:
    masks = {"a": torch.arange(8) < 3, "b": torch.arange(8) < 5}
    result = _export_without_warnings(randomize(CatKeyword()), masks)
    assert (result.model.a.out_channels, result.model.b.out_channels, result.model.head.in_channels) == (3, 5, 8)


def test_unbind_in_both_call_forms() -> None:
    masks = {"rows": torch.arange(8) < 3, "parts": torch.arange(4) < 2}
    result = _export_without_warnings(randomize(Unbind()), masks)
    assert result.model.rows.out_channels == result.model.head.in_channels == 3
    assert result.model.parts.out_channels == 4
    assert [(n.layer, n.channels, n.reason) for n in result.notes if n.action == "kept"] == [
        ("parts", 2, "op 'unbind' makes one tensor of each of them"),
    ]


def test_a_rule_that_raises_is_reported_as_ours(monkeypatch) -> None:
    monkeypatch.setitem(op_rules.TABLE, "cumsum", op_rules.RULES["spatial"])  # a wrong rule: it cannot parse the call

    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.conv(x).cumsum(2)

    masks = {"conv": torch.arange(8) < 4}
    with pytest.warns(
        UserWarning, match=r"op 'cumsum' could not be traced \(rule raised IndexError: .*\); its channels are kept"
    ):
        result = export_and_check(apply_masks(randomize(Cumulative()), masks), masks, IMAGE)
    assert result.model.conv.out_channels == 8
    notes = [n for n in result.notes if n.layer == "conv" and n.action == "kept"]
    assert len(notes) == 1 and notes[0].reason.startswith("op 'cumsum' could not be traced (rule raised IndexError")
    assert not [n for n in result.notes if "is not understood" in n.reason]
