"""Group-consistent masks: score each coupled group as one and prune whole groups.

Masks drawn layer by layer lose most of their sparsity at export, where coupled channels keep
the union. Drawing per group avoids that:

>>> import torch
>>> from torch import nn
>>> from lightning_prune import ChannelGraph, group_masks
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> graph = ChannelGraph.from_model(model, torch.randn(1, 3, 8, 8))
>>> int((~group_masks(graph, 0.5, model=model)["0"]).sum())
4
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn

from lightning_prune.graph import ChannelGraph
from lightning_prune.masks import Masks, out_channel_dim


def group_masks(
    graph: ChannelGraph,
    sparsity: float,
    *,
    model: Optional[nn.Module] = None,
    score: str = "l1",
    seed: int = 0,
    votes: Optional[Masks] = None,
    layers: Optional[Iterable[str]] = None,
) -> Masks:
    """One keep decision per coupled group, pruning ``sparsity`` of the groups of each family.

    A family is the set of groups that span the same layers (for instance every channel of one
    residual stage); its lowest-scoring groups go, and at least one group always stays.
    ``score="l1"`` ranks a group by the summed L1 norm of its members' filters (needs ``model``);
    ``score="random"`` draws with ``seed``. With ``votes`` (masks from a per-layer pruner such as
    NNI's), a group ranks first by how many of its members the pruner kept, the score breaking
    ties. With ``layers``, only groups whose members all lie in those layers can be pruned.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}.")
    if score == "l1" and model is None:
        raise ValueError("score='l1' needs the model whose filters are scored.")
    if score not in ("l1", "random"):
        raise ValueError(f"score must be 'l1' or 'random'; got {score!r}.")
    generator = torch.Generator().manual_seed(seed)
    families: dict[tuple[str, ...], list[list[tuple[str, int]]]] = defaultdict(list)
    allowed = set(layers) if layers is not None else None
    for group in graph.groups:
        if allowed is not None and not all(layer in allowed for layer, _ in group):
            continue
        families[tuple(sorted({layer for layer, _ in group}))].append(group)
    norms = _filter_norms(model, graph) if score == "l1" else {}
    masks: Masks = {layer: torch.ones(labels.numel(), dtype=torch.bool) for layer, labels in graph.producers.items()}
    for groups in families.values():
        count = min(math.floor(sparsity * len(groups)), len(groups) - 1)
        if count <= 0:
            continue
        if score == "l1":
            scores = torch.tensor([sum(float(norms[layer][channel]) for layer, channel in g) for g in groups])
        else:
            scores = torch.rand(len(groups), generator=generator)
        if votes is not None:
            kept = torch.tensor([sum(bool(votes[layer][channel]) for layer, channel in g if layer in votes) for g in groups])
            scores = kept + scores / (scores.abs().max() + 1)  # the vote decides, the score breaks ties
        for index in scores.argsort()[:count].tolist():
            for layer, channel in groups[index]:
                masks[layer][channel] = False
    return {layer: keep for layer, keep in masks.items() if not bool(keep.all())}


def _filter_norms(model: nn.Module, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    norms = {}
    for layer in graph.producers:
        module = model.get_submodule(layer)
        weight = module.weight.detach().movedim(out_channel_dim(module), 0).flatten(1)
        norms[layer] = weight.abs().sum(1) / max(weight.shape[1], 1)
    return norms
