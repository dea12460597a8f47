"""The seed page's own network (HSMNet) and format: its inplace_dict as written, every wrong entry
in one error, and cost-volume features that shrink exactly (slice assignment into a fresh tensor)."""

from __future__ import annotations

import ast
import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers import RTOL, export_and_check, random_masks, randomize, zero_norm_affine
from models import HSMNetLike
from torch import nn

from lightning_prune import (
    ChannelGraph,
    InplaceDictError,
    apply_masks,
    export,
    format_inplace_dict,
    group_masks,
    infer_inplace_dict,
    verify_equivalence,
)
from lightning_prune.core.errors import InplaceDictMismatchError
from lightning_prune.core.graph.inplace_dict import load_inplace_dict
from lightning_prune.core.verify.report import count_params

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "data" / "seed_inplace_dict.py.txt"  # the dict exactly as the page prints it
PAGE = HERE.parent.parent / "shared" / "seed" / "manually-export.md"
g = torch.Generator().manual_seed(0)
STEREO = (torch.randn(1, 3, 128, 128, generator=g), torch.randn(1, 3, 128, 128, generator=g))
FE = "feature_extraction."
# The page's entries the trace contradicts (the public HSMNet forward: `self.upconv5(conv5)` right
# after `conv5 = self.iconv5(...)`, and `torch.cat((conv5, self.upconv6(conv6)), 1)`).
WRONG_ORDER = [FE + "iconv5.cbr_unit.0", FE + "iconv4.cbr_unit.0", FE + "iconv3.cbr_unit.0"]
WRONG_PRODUCER = {
    FE + "upconv5.1.cbr_unit.0": FE + "iconv5.cbr_unit.0",
    FE + "upconv4.1.cbr_unit.0": FE + "iconv4.cbr_unit.0",
}


@pytest.fixture(scope="module")
def hsm() -> nn.Module:
    torch.manual_seed(0)
    return randomize(HSMNetLike())


@pytest.fixture(scope="module")
def page_dict() -> dict:
    return load_inplace_dict(FIXTURE)


def page_text() -> str:
    match = re.search(r"```python\n(    inplace_dict = \{.*?\n    \})\n```", PAGE.read_text(encoding="utf-8"), re.S)
    assert match, "the seed page no longer prints an inplace_dict block"
    return match.group(1) + "\n"


@pytest.mark.skipif(not PAGE.is_file(), reason="the seed page is not beside the repository (../shared/seed)")
def test_fixture_is_the_pages_dict() -> None:
    assert FIXTURE.read_text(encoding="utf-8") == page_text()


def test_page_dict_parses_in_the_seed_convention(page_dict) -> None:
    tree = ast.parse(textwrap.dedent(FIXTURE.read_text(encoding="utf-8")))
    assert page_dict == ast.literal_eval(tree.body[0].value)
    assert len(page_dict) == 60
    assert page_dict[FE + "convbnrelu1_1.cbr_unit.0"] == (None,)  # the network input
    assert page_dict["decoder3.convs.0.downsample.conv1"] == (None,)  # input channels not pruned


def test_page_dict_reports_every_wrong_entry_at_once(hsm, page_dict) -> None:
    masks = random_masks(hsm)
    with pytest.raises(InplaceDictMismatchError) as caught:
        export(apply_masks(hsm, masks), masks, STEREO, inplace_dict=page_dict)
    error = caught.value
    assert isinstance(error, InplaceDictError)
    assert sorted(error.problems) == sorted(WRONG_ORDER + list(WRONG_PRODUCER))  # the (None,) entries load
    message = str(error)
    assert message.startswith("inplace_dict has 5 wrong entries, all listed")
    for key in WRONG_ORDER:
        assert error.problems[key].endswith("wrong order")
    for key, actual in WRONG_PRODUCER.items():
        assert f"which has ({actual!r},)" in error.problems[key]
        assert "wrong producer" in error.problems[key] and f"missing producer {actual!r}" in error.problems[key]
    assert list(error.corrected) == list(page_dict)
    assert error.corrected[FE + "upconv5.1.cbr_unit.0"] == (FE + "iconv5.cbr_unit.0",)
    assert error.corrected[FE + "iconv5.cbr_unit.0"] == (FE + "res_block6.0.downsample.0", FE + "upconv6.1.cbr_unit.0")
    printed = format_inplace_dict(error.corrected)
    assert ast.literal_eval(printed.split("=", 1)[1].strip()) == error.corrected
    for line in printed.splitlines()[1:-1]:
        if line.strip().split(":")[0] in {repr(key) for key in error.problems}:
            assert line.strip() in message  # the fixes are in the message too


def test_corrected_page_dict_exports_exactly(hsm, page_dict, tmp_path) -> None:
    masks = random_masks(hsm)
    reference = apply_masks(hsm, masks)
    try:
        export(reference, masks, STEREO, inplace_dict=page_dict)
    except InplaceDictMismatchError as error:
        corrected = error.corrected
    path = tmp_path / "fixed.py"
    path.write_text(format_inplace_dict(corrected))  # printed, reviewed, read back: the seed's workflow
    result = export(reference, masks, STEREO, inplace_dict=path)
    assert verify_equivalence(reference, result.model, STEREO, rtol=RTOL).passed
    assert count_params(result.model) < count_params(hsm)
    # the 3D decoders are no keys, so they keep their shape, and so do the features they read
    assert result.model.decoder3.convs[0].conv1[0].in_channels == 8
    proj3 = [n for n in result.notes if n.layer == FE + "proj3.cbr_unit.0" and n.action == "kept"]
    assert [n.reason for n in proj3] == [
        "inplace_dict['decoder3.convs.0.downsample.conv1'] is (None,): its input channels are not pruned"
    ]


def test_inferred_dict_round_trips_in_the_page_convention(hsm, page_dict) -> None:
    inferred = infer_inplace_dict(hsm, STEREO)
    assert inferred[FE + "convbnrelu1_1.cbr_unit.0"] == (None,)  # left and right, batched: the network input
    assert inferred["decoder3.convs.0.downsample.conv1"] == ("decoder4.up.1.0", FE + "proj3.cbr_unit.0")
    disagree = {k for k in page_dict if page_dict[k] != inferred[k]}
    assert disagree == set(WRONG_ORDER) | set(WRONG_PRODUCER) | {"decoder3.convs.0.downsample.conv1"}
    read_back = ast.literal_eval(format_inplace_dict(inferred).split("=", 1)[1].strip())
    masks = random_masks(hsm)
    reference = apply_masks(hsm, masks)
    result = export(reference, masks, STEREO, inplace_dict=read_back)
    assert verify_equivalence(reference, result.model, STEREO, rtol=RTOL).passed


def _no_warnings_export(reference: nn.Module, masks: dict, example) -> object:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_and_check(reference, masks, example)
    assert not [w for w in caught if "lightning_prune" in str(w.message)], [str(w.message) for w in caught]
    return result


@pytest.mark.parametrize("variant", ["weights", "weights+norms"])
def test_cost_volume_features_shrink_exactly_with_random_masks(hsm, variant) -> None:
    masks = random_masks(hsm)  # every conv, 2D and 3D, 50% of its filters
    reference = apply_masks(hsm, masks) if variant == "weights" else zero_norm_affine(hsm, masks, STEREO)
    result = _no_warnings_export(reference, masks, STEREO)
    small = result.model
    if variant == "weights":  # pruned channels carry BN shifts into zero-padded convs: many are kept
        assert count_params(small) < count_params(hsm)  # 148,464 -> 135,582
        return
    assert small.feature_extraction.proj3.cbr_unit[0].out_channels == 2
    assert small.decoder3.convs[0].conv1[0].in_channels == small.decoder4.up[1][0].out_channels + 2
    assert small.decoder3.convs[0].downsample.conv1.in_channels == small.decoder3.convs[0].conv1[0].in_channels
    assert count_params(small) < 0.5 * count_params(hsm)  # 148,464 -> 65,962
    for note in result.notes:  # nothing the volume touches is blocked
        assert "is not understood" not in note.reason and "new_empty" not in note.reason


def test_cost_volume_features_shrink_exactly_with_group_masks(hsm) -> None:
    masks = group_masks(ChannelGraph.from_model(hsm, STEREO), 0.5, model=hsm)
    result = _no_warnings_export(zero_norm_affine(hsm, masks, STEREO), masks, STEREO)
    small, fe = result.model, result.model.feature_extraction
    assert [getattr(fe, f"proj{i}").cbr_unit[0].out_channels for i in (6, 5, 4, 3)] == [4, 2, 2, 2]  # of 8, 4, 4, 4
    assert small.decoder6.convs[0].conv1[0].in_channels == 4
    assert small.decoder5.convs[0].conv1[0].in_channels == small.decoder6.up[1][0].out_channels + 2
    assert small.decoder3.convs[0].downsample.conv1.in_channels == small.decoder4.up[1][0].out_channels + 2
    assert not [n for n in result.notes if n.action == "kept"]  # whole groups: nothing lost to a union
    assert count_params(small) < 0.3 * count_params(hsm)  # 148,464 -> 42,034


# ------------------------------------------------- slice assignment, in isolation


class ConcatVolume(nn.Module):
    """PSMNet's concat volume: left features in the first channels, right in the rest, per disparity,
    into a fresh tensor sized from the features (`cost_fn` can size it wrongly on purpose)."""

    def __init__(self, literal_size: bool = False) -> None:
        super().__init__()
        self.literal_size = literal_size
        self.left = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.agg = nn.Conv3d(12, 4, 3, padding=1)

    def forward(self, x):
        a, b = self.left(x), self.right(x)
        n, ca, h, w = a.shape
        channels = 12 if self.literal_size else ca + b.shape[1]
        cost = a.new_zeros(n, channels, 4, h, w)
        for i in range(4):
            cost[:, :ca, i, :, i:] = a[:, :, :, i:]
            cost[:, ca:, i, :, i:] = b[:, :, :, : w - i]
        return self.agg(cost)


class SplitWrite(nn.Module):
    """Two producers written at the same channel positions (left and right halves of the width)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        out = a.new_full(a.shape, 0.5)  # fresh: its size is the code's, read from a's shape
        half = x.shape[3] // 2
        out[..., :half] = a[..., :half]
        out[..., half:].copy_(b[..., half:])  # into a view
        return self.head(out)


class OverwriteNet(nn.Module):
    """Writes into a conv's own output: a region of another producer, and the network input."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Conv2d(3, 8, 1)
        self.patch = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.base(x)
        y[:, :, :4] = self.patch(x)[:, :, :4]  # a region: base's and patch's channels now share positions
        y[:, 0] = x.mean(1)  # data of no prunable channel at channel 0
        return self.head(y)


IMAGE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_concat_volume_couples_each_feature_with_its_channels() -> None:
    model = randomize(ConcatVolume())
    masks = {"left.0": torch.arange(6) < 2, "right.0": torch.arange(6) >= 3}
    result = _no_warnings_export(zero_norm_affine(model, masks, IMAGE), masks, IMAGE)
    assert result.model.left[0].out_channels == 2 and result.model.right[0].out_channels == 3
    assert result.model.agg.in_channels == 5
    assert not [n for n in result.notes if n.action == "kept"]


def test_volume_sized_by_a_literal_keeps_its_channels_exactly() -> None:
    model = randomize(ConcatVolume(literal_size=True))
    masks = {"left.0": torch.arange(6) < 2, "right.0": torch.arange(6) >= 3}
    result = export_and_check(zero_norm_affine(model, masks, IMAGE), masks, IMAGE)
    assert result.model.agg.in_channels == 12  # the guess failed the check: kept, and said so
    kept = [n for n in result.notes if n.layer == "left.0" and n.action == "kept"]
    assert sum(n.channels for n in kept) == 4 and "changed the model's output" in kept[0].reason


def test_writes_at_one_channel_position_couple_their_sources() -> None:
    model = randomize(SplitWrite())
    masks = {"a": torch.arange(8) < 4, "b": torch.arange(8) % 2 == 0}
    result = _no_warnings_export(apply_masks(model, masks), masks, IMAGE)
    assert result.model.a.out_channels == result.model.b.out_channels == result.model.head.in_channels == 6  # the union
    reasons = {n.layer: n.reason for n in result.notes if n.action == "kept"}
    assert reasons == {
        "a": "coupled with 'b', whose mask keeps them (a coupled group keeps the union of its masks)",
        "b": "coupled with 'a', whose mask keeps them (a coupled group keeps the union of its masks)",
    }


def test_overwriting_couples_or_blocks() -> None:
    model = randomize(OverwriteNet())
    masks = {"base": torch.arange(8) >= 2, "patch": torch.arange(8) >= 3}
    result = _no_warnings_export(apply_masks(model, masks), masks, IMAGE)
    # channel 0: the data written there keeps it; 1: both masks prune it; 2: base's mask keeps it
    assert result.model.base.out_channels == result.model.patch.out_channels == 7
    notes = {(n.layer, n.reason): n.channels for n in result.notes if n.action == "kept"}
    assert notes == {
        (
            "base",
            "op 'setitem' writes values that belong to no prunable channel over them, or them over such values",
        ): 1,
        (
            "patch",
            "op 'setitem' writes values that belong to no prunable channel over them, or them over such values",
        ): 1,
        ("patch", "coupled with 'base', whose mask keeps them (a coupled group keeps the union of its masks)"): 1,
    }
    for layer, mask in masks.items():
        kept = getattr(result.model, layer).out_channels - int(mask.sum())
        assert sum(c for (name, _), c in notes.items() if name == layer) == kept


def test_metadata_ops_never_block() -> None:
    class Meta(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            shapes = [
                t.shape
                for t in (
                    torch.zeros_like(y),
                    torch.ones_like(y),
                    torch.empty_like(y),
                    torch.full_like(y, 2.0),
                    torch.rand_like(y),
                    torch.randn_like(y),
                    y.new_empty(2),
                    y.new_zeros(2),
                    y.new_ones(2),
                    y.new_full((2,), 1.0),
                    torch.zeros(y.shape),
                )
            ]
            assert len(shapes) == 11
            y = y * torch.ones_like(y) + torch.zeros(y.shape) + torch.zeros_like(y).fill_(0.25)
            return self.head(y)

    model = randomize(Meta())
    masks = {"conv": torch.arange(8) < 3}
    result = _no_warnings_export(apply_masks(model, masks), masks, IMAGE)
    assert result.model.conv.out_channels == 3 and result.model.head.in_channels == 3


class Writes(nn.Module):
    """One write per case, into a conv's output or a fresh tensor, read by a 1x1 head."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y, z = self.a(x), self.b(x)
        if self.case == "literal_channel":
            y[:, 2] = z[:, 0]  # index 2 of the exported tensor is another channel: checked, kept
        elif self.case == "constant_channel":
            y[:, 3] = 1.5
        elif self.case == "mask_of_itself":
            y[y < 0] = 0
        elif self.case == "copy_into_view":
            y[:, :, :2].copy_(z[:, :, :2])
        elif self.case == "index_put_batch":
            y.index_put_((torch.tensor([1]),), z[0:1])
        elif self.case == "index_put_repeated":
            y.index_put_((torch.tensor([0, 0]),), z, accumulate=True)
        elif self.case == "written_view_read_later":
            v = y.view(y.shape[0], y.shape[1], -1)
            y[:, :, 0] = z[:, :, 0]
            y = v.view_as(y)
        elif self.case == "fresh_with_data_and_channels":
            out = z.new_zeros(z.shape)
            out[:, :, 0] = x.mean(1, keepdim=True).expand(-1, 8, -1, -1)[:, :, 0]
            out[:, :, 1:] = z[:, :, 1:]
            y = y * out
        return self.head(y)


@pytest.mark.parametrize(
    ("case", "sizes"),
    [
        ("literal_channel", (8, 8)),
        ("constant_channel", (8, 5)),
        ("mask_of_itself", (4, 5)),
        ("copy_into_view", (6, 6)),
        ("index_put_batch", (6, 6)),
        ("index_put_repeated", (8, 8)),
        ("written_view_read_later", (6, 6)),
        ("fresh_with_data_and_channels", (8, 8)),
    ],
)
def test_writes_stay_exact(case, sizes) -> None:
    model = randomize(Writes(case))
    masks = {"a": torch.arange(8) % 2 == 0, "b": torch.arange(8) < 5}
    result = _no_warnings_export(
        apply_masks(model, masks), masks, torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    )
    assert (result.model.a.out_channels, result.model.b.out_channels) == sizes
    for layer, mask in masks.items():
        kept = getattr(result.model, layer).out_channels - int(mask.sum())
        assert sum(n.channels for n in result.notes if n.layer == layer and n.action == "kept") == kept
