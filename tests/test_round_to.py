"""group_masks(round_to=): each pruned family keeps a multiple of round_to channels, and exports exactly."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import export_and_check, random_masks, randomize, zero_norm_affine
from torch import nn

from lightning_prune import ChannelGraph, group_masks

EXAMPLE = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def traced() -> dict[str, tuple[nn.Module, ChannelGraph]]:
    """Each model built and traced once for the module (tracing is the slow part)."""
    cache: dict[str, tuple[nn.Module, ChannelGraph]] = {}

    def get(name: str) -> tuple[nn.Module, ChannelGraph]:
        if name not in cache:
            torch.manual_seed(0)
            model = randomize(torchvision.models.get_model(name, weights=None), example=EXAMPLE)
            cache[name] = (model, ChannelGraph.from_model(model, EXAMPLE))
        return cache[name]

    return get


def _assert_exported_multiples(model: nn.Module, masks: dict[str, torch.Tensor], round_to: int) -> None:
    """Every layer group_masks pruned keeps a multiple of round_to (at least round_to), in the masks and exported."""
    assert masks, "group_masks pruned nothing"
    for layer, keep in masks.items():
        kept = int(keep.sum())
        assert kept % round_to == 0 and kept >= round_to, f"{layer}: keeps {kept} of {keep.numel()}"
    result = export_and_check(zero_norm_affine(model, masks, EXAMPLE), masks, EXAMPLE)
    assert not [n for n in result.notes if n.action == "kept"]  # the export keeps exactly what the masks keep
    checked = 0
    for name, module in result.model.named_modules():
        if name in masks and isinstance(module, (nn.Conv2d, nn.Linear)):
            width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            assert width == int(masks[name].sum()) and width % round_to == 0, f"{name}: {width} channels"
            checked += 1
    assert checked == len(masks)


@pytest.mark.parametrize("round_to", [8, 16, 32])
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ("resnet18", "mobilenet_v2", "resnext50_32x4d")])
def test_exported_convs_keep_multiples_of_round_to(traced, name: str, round_to: int) -> None:
    model, graph = traced(name)
    masks = group_masks(graph, 0.5, model=model, round_to=round_to)
    _assert_exported_multiples(model, masks, round_to)


def test_resnext_grouped_convs_keep_equal_counts_per_group_and_the_multiple(traced) -> None:
    model, graph = traced("resnext50_32x4d")
    masks = group_masks(graph, 0.5, model=model, round_to=16)
    conv = model.get_submodule("layer1.0.conv2")  # 128 channels in 32 groups of 4
    kept = masks["layer1.0.conv1"].reshape(conv.groups, -1).sum(1)
    assert kept.min() == kept.max() and int(kept.sum()) % 16 == 0


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ("resnet18", "mobilenet_v2")])
def test_votes_with_sparsity_none_are_rounded_too(traced, name: str) -> None:
    model, graph = traced(name)
    votes = random_masks(model, 0.3, seed=2)
    plain = group_masks(graph, None, model=model, votes=votes)
    rounded = group_masks(graph, None, model=model, votes=votes, round_to=8)
    _assert_exported_multiples(model, rounded, 8)
    # rounding down only ever prunes more, and by less than round_to channels per layer
    for layer, keep in rounded.items():
        before = int(plain[layer].sum()) if layer in plain else keep.numel()
        assert before - 8 < int(keep.sum()) <= before or int(keep.sum()) == 8


def test_high_sparsity_never_rounds_below_round_to(traced) -> None:
    model, graph = traced("resnet18")
    masks = group_masks(graph, 0.95, model=model, round_to=16)
    assert {int(keep.sum()) for keep in masks.values()} == {16}  # 64..512-channel families would keep 3..25
    _assert_exported_multiples(model, masks, 16)


def test_round_to_one_is_the_default_and_changes_nothing(traced) -> None:
    model, graph = traced("mobilenet_v2")
    default = group_masks(graph, 0.5, model=model)
    ones = group_masks(graph, 0.5, model=model, round_to=1)
    assert default.keys() == ones.keys() and all(torch.equal(default[k], ones[k]) for k in default)
    assert any(int(keep.sum()) % 8 for keep in default.values())  # without rounding, counts are not multiples


def test_a_family_no_larger_than_round_to_is_left_whole() -> None:
    model = randomize(
        nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 40, 1), nn.ReLU(), nn.Conv2d(40, 4, 1))
    )
    example = torch.randn(1, 3, 8, 8)
    graph = ChannelGraph.from_model(model, example)
    masks = group_masks(graph, 0.5, model=model, round_to=16)
    assert "0" not in masks  # 12 channels: no multiple of 16 below it, so not pruned
    assert int(masks["2"].sum()) == 16  # 40 -> 20 -> 16
    assert group_masks(graph, 0.0, model=model, round_to=16) == {}  # nothing pruned for rounding's sake
    export_and_check(zero_norm_affine(model, masks, example), masks, example)


@pytest.mark.parametrize("round_to", [0, -8, 2.5, True, "8", None])
def test_round_to_must_be_a_positive_int(round_to) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    graph = ChannelGraph.from_model(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=rf"round_to must be an int >= 1 .*; got {round_to!r}\. Use 1 for no rounding"):
        group_masks(graph, 0.5, model=model, round_to=round_to)


class TinyEncoder(nn.Module):
    """Two encoder layers of 8 heads of 8 channels: a head is 24 channels of the fused q/k/v projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 64)
        layer = nn.TransformerEncoderLayer(64, 8, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


@pytest.mark.parametrize("ranking", ["group_masks", "uniform", "global"])
def test_heads_are_rounded_by_their_channels_not_their_count(ranking: str) -> None:
    """round_to=16 on 8 heads of 8 channels: 4 heads are 96 q/k/v channels, a multiple of 16, so half
    the heads go (rounding the head count itself up to 16 would keep every head)."""
    from lightning_prune.core.graph.importance import importance_masks

    torch.manual_seed(0)
    model = randomize(TinyEncoder())
    example = torch.randn(2, 10, 12, generator=torch.Generator().manual_seed(2))
    graph = ChannelGraph.from_model(model, example)
    if ranking == "group_masks":
        masks = group_masks(graph, 0.5, model=model, round_to=16)
    else:
        masks = importance_masks(graph, model, "l1", dict.fromkeys(graph.producers, 0.5), ranking=ranking, round_to=16)
    result = export_and_check(zero_norm_affine(model, masks, example), masks, example)
    attention = [m for m in result.model.modules() if hasattr(m, "heads_before")]
    assert len(attention) == 2 and all(m.num_heads < m.heads_before for m in attention)
    for name, module in result.model.named_modules():
        if isinstance(module, nn.Linear) and name in masks:
            assert module.out_features % 16 == 0, f"{name}: {module.out_features} channels"
