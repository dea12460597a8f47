"""Group-consistent masks lose nothing to the union: half the groups go, most parameters with them."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import apply_masks, export_and_check, randomize, zero_norm_affine

from lightning_prune import ChannelGraph, group_masks
from lightning_prune.core.verify.report import count_params


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, id=n) for n in ("resnet50", "mobilenet_v2", "densenet121", "resnext50_32x4d", "regnet_y_400mf")],
)
def test_group_masks_keep_at_most_60_percent_exactly(name: str) -> None:
    torch.manual_seed(0)
    example = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = randomize(torchvision.models.get_model(name, weights=None), example=example)
    graph = ChannelGraph.from_model(model, example)
    masks = group_masks(graph, 0.5, model=model)
    result = export_and_check(zero_norm_affine(model, masks, example), masks, example)
    assert count_params(result.model) <= 0.6 * count_params(model)
    assert not [n for n in result.notes if n.action == "kept"]  # nothing lost to the union


def test_every_group_is_decided_as_one() -> None:
    model = randomize(torchvision.models.resnet18())
    example = torch.randn(1, 3, 32, 32)
    graph = ChannelGraph.from_model(model, example)
    masks = group_masks(graph, 0.5, score="random", seed=3)
    for group in graph.groups:
        decisions = {bool(masks.get(layer, torch.ones(10**4, dtype=torch.bool))[channel]) for layer, channel in group}
        assert len(decisions) == 1
    export_and_check(apply_masks(model, masks), masks, example)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"sparsity": 1.0}, r"sparsity must be in \[0, 1\); got 1\.0", id="sparsity"),
        pytest.param({"sparsity": 0.5, "score": "taylor"}, r"score must be 'l1' or 'random'; got 'taylor'", id="score"),
    ],
)
def test_group_masks_reject_bad_arguments(kwargs, error) -> None:
    model = torchvision.models.resnet18()
    graph = ChannelGraph.from_model(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=error):
        group_masks(graph, model=model, **kwargs)
