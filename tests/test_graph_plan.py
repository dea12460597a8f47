"""The channel graph is immutable and planning is a function of (graph, masks, model): a restriction
gives a new graph, and planning twice gives the same plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_masks, randomize
from models import DepthwiseNet, ShuffleChunkNet

from lightning_prune import ChannelGraph, InplaceDictMismatchError, apply_masks, export
from lightning_prune.core import errors
from lightning_prune.core.graph.changes import Plan
from lightning_prune.core.graph.inplace_dict import check_inplace_dict, traced_inplace_dict
from lightning_prune.core.graph.plan import plan

IMAGE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def masked_model(build=DepthwiseNet):
    model = randomize(build())
    masks = random_masks(model)
    return apply_masks(model, masks), masks


def summary(decided: Plan) -> tuple:
    changes = {
        layer: (
            {key: (index.tolist(), groups) for key, (index, groups) in change.keep.items()},
            None if change.bias_delta is None else change.bias_delta.tolist(),
            change.norm,
        )
        for layer, change in decided.changes.items()
    }
    return decided.kept_channels, [str(note) for note in decided.notes], changes


def test_the_graph_cannot_be_changed() -> None:
    masked, _ = masked_model()
    graph = ChannelGraph.from_model(masked, IMAGE)
    with pytest.raises(AttributeError, match="immutable"):
        graph.blocked = np.zeros_like(graph.blocked)
    with pytest.raises(AttributeError, match="immutable"):
        del graph.root
    for array in (graph.root, graph.blocked, graph.block_reason, graph.owner, graph.tainted):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = array[0]
    with pytest.raises(TypeError):
        graph.producers["stem.0"] = torch.arange(3)
    assert not hasattr(graph, "plan") and not hasattr(graph, "apply_inplace_dict") and not hasattr(graph, "block")


def test_planning_twice_gives_the_same_plan() -> None:
    masked, masks = masked_model()
    graph = ChannelGraph.from_model(masked, IMAGE)
    blocked, reasons = graph.blocked.copy(), graph.reasons
    first, second = plan(graph, masks, masked), plan(graph, masks, masked)
    assert summary(first) == summary(second)
    assert [n for n in first.notes if n.action == "kept"]  # the plan added reasons of its own ...
    assert graph.reasons == reasons and np.array_equal(graph.blocked, blocked)  # ... to no graph


def test_a_restriction_is_a_new_graph() -> None:
    masked, masks = masked_model()
    graph = ChannelGraph.from_model(masked, IMAGE)
    before = summary(plan(graph, masks, masked))
    stem = graph.producers["stem.0"]
    kept = graph.with_blocked([(stem, "kept by hand")])
    assert kept is not graph and kept.overrides[-1][1] == "kept by hand" and graph.overrides == ()
    assert summary(plan(graph, masks, masked)) == before
    restricted = plan(kept, masks, masked)
    assert restricted.kept_channels["stem.0"] == stem.numel()
    assert ("stem.0", "kept by hand") in {(n.layer, n.reason) for n in restricted.notes if n.action == "kept"}
    assert summary(plan(kept, masks, masked)) == summary(restricted)


def test_checking_an_inplace_dict_returns_overrides_and_leaves_the_graph_alone() -> None:
    masked, masks = masked_model()
    graph = ChannelGraph.from_model(masked, IMAGE)
    traced = traced_inplace_dict(graph)
    partial = {key: value for key, value in traced.items() if key != "expand.0"}
    overrides = check_inplace_dict(graph, partial, masked)
    expand = graph.producers["expand.0"].numpy()
    assert overrides and graph.overrides == () and not graph.blocked[graph.root[expand]].any()
    restricted = graph.with_blocked(overrides)
    assert restricted.blocked[restricted.root[expand]].all()
    wrong = {**traced, "project.0": ("stem.0",)}
    with pytest.raises(InplaceDictMismatchError) as caught:
        check_inplace_dict(graph, wrong, masked)
    assert caught.value.corrected["project.0"] == traced["project.0"]
    assert errors.InplaceDictMismatchError is InplaceDictMismatchError


def test_the_export_plan_is_the_plan_of_the_graph_it_returns() -> None:
    masked, masks = masked_model(ShuffleChunkNet)  # views whose sizes export checks
    result = export(masked, masks, IMAGE)
    assert summary(plan(result.graph, masks, masked)) == summary(result.plan)
