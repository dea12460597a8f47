"""The seed's inplace_dict: inferred from the trace, printed for review, accepted as an override."""

from __future__ import annotations

import ast
import json
import pickle

import pytest
import torch
import yaml
from helpers import export_and_check, random_masks, randomize
from models import SEED_INPLACE_DICT, ConcatNet, Conv2dBetween3d, SeedNet

from lightning_prune import (
    InplaceDictError,
    apply_masks,
    export,
    format_inplace_dict,
    infer_inplace_dict,
)
from lightning_prune.core.errors import InplaceDictMismatchError

SEED_INPUT = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
IMAGE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def seed_model():
    torch.manual_seed(0)
    return randomize(SeedNet())


def test_inferred_dict_matches_the_seed_structure(seed_model) -> None:
    inferred = infer_inplace_dict(seed_model, SEED_INPUT)
    assert inferred == SEED_INPLACE_DICT


def test_printed_dict_reads_back(seed_model) -> None:
    inferred = infer_inplace_dict(seed_model, SEED_INPUT)
    text = format_inplace_dict(inferred)
    assert text.startswith("inplace_dict = {")
    assert ast.literal_eval(text.split("=", 1)[1].strip()) == inferred


def test_hand_written_dict_is_accepted_and_exact(seed_model) -> None:
    masks = random_masks(seed_model)
    result = export_and_check(apply_masks(seed_model, masks), masks, SEED_INPUT)
    restricted = dict(SEED_INPLACE_DICT)
    for key in [k for k in restricted if k.startswith("feature_extraction.proj4")]:
        del restricted[key]  # proj4 left out: it keeps its shape, and so does what feeds it
    reference = apply_masks(seed_model, masks)
    limited = export(reference, masks, SEED_INPUT, inplace_dict=restricted)
    assert limited.model.feature_extraction.proj4.cbr_unit[0].in_channels == 16
    assert limited.model.feature_extraction.proj4.cbr_unit[0].out_channels == 8
    assert sum(p.numel() for p in limited.model.parameters()) > sum(p.numel() for p in result.model.parameters())
    from lightning_prune import verify_equivalence

    assert verify_equivalence(reference, limited.model, SEED_INPUT).passed


def test_int_entries_and_network_input(tmp_path) -> None:
    model = randomize(ConcatNet())
    masks = {"pruned.0": torch.arange(16) < 8, "unpruned.0": torch.arange(8) < 4}
    inplace = {
        "pruned.0": (None,),
        "pruned.1": ("pruned.0",),
        "head": ("pruned.0", 8, None),  # the 8 channels of `unpruned` stay as they are
    }
    reference = apply_masks(model, masks)
    for source in (
        inplace,
        _write(tmp_path / "d.yaml", yaml.safe_dump({k: list(v) for k, v in inplace.items()})),
        _write(tmp_path / "d.json", json.dumps(inplace)),
    ):
        result = export(reference, masks, IMAGE, inplace_dict=source)
        assert result.model.pruned[0].out_channels == 8
        assert result.model.unpruned[0].out_channels == 8
        assert result.model.head.in_channels == 8 + 8 + 3
        from lightning_prune import verify_equivalence

        assert verify_equivalence(reference, result.model, IMAGE).passed


def _write(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("inplace", "error"),
    [
        pytest.param(
            {"head": ("unpruned.0", "pruned.0", None)},
            r"inplace_dict\['head'\] = .* disagrees with the traced graph, which has \('pruned\.0', 'unpruned\.0', None\)",
            id="wrong_order",
        ),
        pytest.param(
            {"head": ("pruned.0",)}, r"inplace_dict\['head'\].*disagrees.*27 input channels", id="too_few_channels"
        ),
    ],
)
def test_disagreeing_dict_names_the_key(inplace, error) -> None:  # the other bad entries: the bad-input table
    model = randomize(ConcatNet())
    with pytest.raises(InplaceDictError, match=error):
        export(model, {"pruned.0": torch.arange(16) < 8}, IMAGE, inplace_dict=inplace)


def test_a_missing_inplace_dict_file(tmp_path) -> None:
    model = ConcatNet()
    with pytest.raises(InplaceDictError, match=r"inplace_dict file '.*missing\.yaml' does not exist"):
        export(model, {}, IMAGE, inplace_dict=tmp_path / "missing.yaml")


def test_every_wrong_entry_in_one_error() -> None:
    model = randomize(ConcatNet())
    masks = {"pruned.0": torch.arange(16) < 8}
    wrong = {
        "pruned.0": (None,),  # right: the network input
        "pruned.1": ("unpruned.0",),
        "head": ("unpruned.0", "pruned.0", None),
        "ghost": ("pruned.0",),
    }
    with pytest.raises(InplaceDictMismatchError) as caught:
        export(model, masks, IMAGE, inplace_dict=wrong)
    error = caught.value
    assert str(error).startswith("inplace_dict has 3 wrong entries, all listed")
    assert sorted(error.problems) == ["ghost", "head", "pruned.1"]
    assert error.problems["head"].endswith("(27 input channels): wrong order")
    assert error.problems["pruned.1"].endswith(
        "wrong producer 'unpruned.0' (not an input of this layer); missing producer 'pruned.0'"
    )
    assert error.corrected == {"pruned.0": (None,), "pruned.1": ("pruned.0",), "head": ("pruned.0", "unpruned.0", None)}
    again = pickle.loads(pickle.dumps(error))  # errors travel between ranks
    assert str(again) == str(error) and again.corrected == error.corrected
    reference = apply_masks(model, masks)
    result = export(reference, masks, IMAGE, inplace_dict=error.corrected)
    from lightning_prune import verify_equivalence

    assert verify_equivalence(reference, result.model, IMAGE).passed
    assert result.model.pruned[0].out_channels == 8


def test_none_alone_keeps_the_input_of_a_conv_over_a_reshaped_volume() -> None:
    model = randomize(Conv2dBetween3d())
    example = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    masks = {"conv3d_in.0": torch.arange(8) % 2 == 0}
    inplace = infer_inplace_dict(model, example)
    assert inplace["conv1"] == ("conv3d_in.0",)
    inplace["conv1"] = (None,)  # the seed's decoder3 entry: this 2D conv's input channels are not pruned
    reference = apply_masks(model, masks)
    result = export(reference, masks, example, inplace_dict=inplace)
    from lightning_prune import verify_equivalence

    assert verify_equivalence(reference, result.model, example).passed
    assert result.model.conv3d_in[0].out_channels == 8 and result.model.conv1.in_channels == 32
    assert [(n.layer, n.channels, n.reason) for n in result.notes if n.action == "kept"] == [
        ("conv3d_in.0", 4, "inplace_dict['conv1'] is (None,): its input channels are not pruned"),
    ]
