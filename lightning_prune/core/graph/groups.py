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
import numbers
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.families import balance_grouped_convs, family_step, rounded_kept
from lightning_prune.core.graph.masks import Masks
from lightning_prune.core.graph.prunable import filter_norms


def group_masks(
    graph: ChannelGraph,
    sparsity: float | None,
    *,
    model: nn.Module | None = None,
    score: str = "l1",
    seed: int = 0,
    votes: Masks | None = None,
    layers: Iterable[str] | None = None,
    round_to: int = 1,
) -> Masks:
    """One keep decision per coupled group, pruning ``sparsity`` of the groups of each family.

    A family is the set of groups that span the same layers (for instance every channel of one
    residual stage); its lowest-scoring groups go, and at least one group always stays.
    ``score="l1"`` ranks a group by the summed L1 norm of its members' filters (needs ``model``);
    ``score="random"`` draws with ``seed``. With ``votes`` (masks from a per-layer pruner such as
    NNI's), a group ranks first by how many of its members the pruner kept, the score breaking
    ties. ``sparsity=None`` (with ``votes``) keeps the votes' own amount: each family prunes as
    many groups as its layers' votes prune channels on average, so a pruner or mask that asked
    for 25% gets 25%, only aligned within each coupled group. With ``layers``, only groups whose
    members all lie in those layers can be pruned. The channels a grouped conv reads or writes
    are picked group by group, the same number in each, so export need not widen the mask
    (ResNeXt, RegNet).

    ``round_to`` (an int >= 1) rounds each pruned family's kept count down to a multiple of it, so
    the exported layers get channel counts that vectorised kernels like (8, 16, 32): never to
    zero, never below ``round_to`` itself, never above the family's size. A group wider than one
    channel per layer counts its channels: whole attention heads of 64 channels are a multiple of
    8 at any head count, so heads are not rounded. A family of at most ``round_to`` groups is left
    whole; a family the sparsity (or the votes) does not prune is not pruned for rounding's sake.
    This applies with ``sparsity`` and with ``sparsity=None`` alike.
    A grouped conv keeps its own rule first (the same count in each of its ``G`` groups); its
    per-group count is then rounded down to a multiple of ``round_to / gcd(G, round_to)``, so the
    total is a multiple of ``lcm(G, round_to)``, wherever such a count below the conv's full
    width exists. Where none does (RegNet's 9 groups of 16 with ``round_to=16``: only all 144
    channels are a multiple of 144) the grouped-conv rule wins and the count is left as it is,
    not a multiple of ``round_to``, rather than unpruning the layer. Depthwise convs share their
    input's family and follow it. A layer whose channels mix pruned families with channels
    nothing may prune (a blocked op, ``layers=``) keeps those as they are, so its total can miss
    the multiple.

    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune import ChannelGraph
    >>> model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 4, 1))
    >>> graph = ChannelGraph.from_model(model, torch.randn(1, 3, 8, 8))
    >>> int(group_masks(graph, 0.5, model=model)["0"].sum()), int(group_masks(graph, 0.5, model=model, round_to=16)["0"].sum())
    (20, 16)
    """
    if sparsity is None and votes is None:
        raise ValueError("sparsity=None keeps the amount of `votes`; pass votes, or a sparsity in [0, 1).")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}.")
    if score == "l1" and model is None:
        raise ValueError("score='l1' needs the model whose filters are scored.")
    if score not in ("l1", "random"):
        raise ValueError(f"score must be 'l1' or 'random'; got {score!r}.")
    if isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral) or round_to < 1:
        raise ValueError(
            f"round_to must be an int >= 1 (the multiple each pruned family's kept channel count is rounded down to); "
            f"got {round_to!r}. Use 1 for no rounding, or e.g. 8."
        )
    round_to = int(round_to)
    members = graph.group_members()
    allowed = set(layers) if layers is not None else None
    candidates = {
        root: group for root, group in members.items() if allowed is None or all(layer in allowed for layer, _ in group)
    }
    scores = _scores(candidates, score, model, graph, seed)
    if votes is not None:  # the vote decides, the score breaks ties
        top = max((abs(v) for v in scores.values()), default=0.0) + 1
        scores = {
            r: sum(bool(votes[layer][c]) for layer, c in candidates[r] if layer in votes) + v / top
            for r, v in scores.items()
        }
    families: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for root, group in candidates.items():
        families[tuple(sorted({layer for layer, _ in group}))].append(root)
    pruned: set[int] = set()
    for layers_spanned, roots in families.items():
        if sparsity is None:
            voted_out = sum(not bool(votes[layer][c]) for r in roots for layer, c in candidates[r] if layer in votes)
            count = round(voted_out / len(layers_spanned))  # the average over the family's layers
        else:
            count = math.floor(sparsity * len(roots))
        count = min(count, len(roots) - 1)
        if count > 0 and round_to > 1:
            count = len(roots) - rounded_kept(len(roots) - count, len(roots), family_step(roots, candidates, round_to))
        pruned.update(sorted(roots, key=scores.__getitem__)[: max(count, 0)])
    balance_grouped_convs(graph, pruned, scores, round_to)
    masks: Masks = {layer: torch.ones(labels.numel(), dtype=torch.bool) for layer, labels in graph.producers.items()}
    for root in pruned:
        for layer, channel in candidates[root]:
            masks[layer][channel] = False
    return {layer: keep for layer, keep in masks.items() if not bool(keep.all())}


def _scores(
    candidates: dict[int, list[tuple[str, int]]], score: str, model: nn.Module | None, graph: ChannelGraph, seed: int
) -> dict[int, float]:
    if score == "random":
        draws = torch.rand(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
        return dict(zip(sorted(candidates), draws, strict=True))
    norms = _filter_norms(model, graph)
    return {root: sum(float(norms[layer][channel]) for layer, channel in group) for root, group in candidates.items()}


def _filter_norms(model: nn.Module, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    norms = {}
    for layer in graph.producers:
        norms[layer] = filter_norms(model.get_submodule(layer))
    return norms
