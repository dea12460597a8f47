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
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.masks import Masks
from lightning_prune.core.graph.plan import grouped_conv_rows, rounding_step
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
            count = len(roots) - _rounded_kept(
                len(roots) - count, len(roots), _family_step(roots, candidates, round_to)
            )
        pruned.update(sorted(roots, key=scores.__getitem__)[: max(count, 0)])
    _balance_grouped_convs(graph, pruned, scores, round_to)
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


def _rounded_kept(kept: int, size: int, round_to: int) -> int:
    """``kept`` rounded down to a multiple of ``round_to``, at least ``round_to``, at most ``size``.

    >>> _rounded_kept(20, 40, 16), _rounded_kept(5, 40, 16), _rounded_kept(6, 12, 16)
    (16, 16, 12)
    """
    return min(size, max(round_to, kept // round_to * round_to))


def _family_step(roots: list[int], members: Mapping[int, list[tuple[str, int]]], round_to: int) -> int:
    """How many of a family's groups make a multiple of ``round_to`` channels in every layer it spans.

    A group is one channel per layer (the step is ``round_to``) unless it is wider: an attention
    head is ``head_dim`` channels of each projection, so whole heads already keep a multiple of 8
    (step 1) and rounding the head count to 8 would keep heads the masks prune.

    >>> _family_step([0, 1], {0: [("a", 0)], 1: [("a", 1)]}, 8), _family_step([0], {0: [("q", c) for c in range(64)]}, 8)
    (8, 1)
    """
    steps = {
        rounding_step(width, round_to)
        for root in roots
        for width in Counter(layer for layer, _ in members[root]).values()
    }
    return math.lcm(*steps)


def _round_kept_counts(
    kept: dict, order: Mapping, sizes: Mapping, steps: Mapping, fewest: Mapping, scores: Mapping[int, float]
) -> None:
    """Round each pruned family's kept count to a multiple of its step: first down, then back up
    where that brings the model's total nearer the amount chosen (the best groups restored first).

    ``kept``: family -> how many of its best groups it keeps (changed in place); ``order``: family ->
    its groups that may still be pruned, best first; ``sizes``: family -> its number of groups;
    ``steps`` and ``fewest``: its rounding step and the fewest groups it may keep. The total ends
    within half of the largest step of the amount chosen."""
    excess, choices = 0, []  # excess: groups pruned beyond the chosen amount
    for family, count in kept.items():
        step, available = steps[family], len(order[family])
        if step == 1 or count == sizes[family] or count % step == 0:
            continue
        down = count // step * step if count // step * step >= fewest[family] else None
        up = min(-(-count // step) * step, sizes[family])
        up = up if up <= available else None
        if down is None and up is None:
            continue
        kept[family] = down if down is not None else up
        excess += count - kept[family]
        if down is not None and up is not None:
            restored = [scores[root] for root in order[family][down:up]]
            choices.append((-sum(restored) / len(restored), family, up - down))
    for _, family, width in sorted(choices):
        if 2 * excess > width:
            kept[family] += width
            excess -= width


def _balance_grouped_convs(graph: ChannelGraph, pruned: set[int], scores: dict[int, float], round_to: int = 1) -> None:
    """A grouped conv needs the same number of channels pruned in each of its groups: re-pick
    within each group by score (the same total, spread evenly), rather than let export widen
    the mask to the largest group. With ``round_to``, the per-group kept count is rounded down to
    a multiple of ``round_to / gcd(groups, round_to)`` where one below the full width exists."""
    for _, rows in grouped_conv_rows(graph):  # the rule's one home, shared with export's plan
        if (rows < 0).any():
            continue
        roots = graph.root[rows]
        if len(set(roots.flat)) != roots.size or not all(int(r) in scores for r in roots.flat):
            continue  # shared or fixed channels: left to export's widening
        total = sum(int(r) in pruned for r in roots.flat)
        per = roots.shape[1]
        target = min(round(total / roots.shape[0]), per - 1)
        step = rounding_step(roots.shape[0], round_to)
        if target > 0 and step < per:  # a multiple of lcm(groups, round_to) below the full width exists
            target = per - min(per - 1, max(step, (per - target) // step * step))
        for chunk in roots.tolist():
            order = sorted(chunk, key=scores.__getitem__)
            pruned.difference_update(order[target:])
            pruned.update(order[:target])


def _filter_norms(model: nn.Module, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    norms = {}
    for layer in graph.producers:
        norms[layer] = filter_norms(model.get_submodule(layer))
    return norms
