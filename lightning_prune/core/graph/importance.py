"""Our own channel importance, scored over whole coupled groups, and masks drawn from it.

A coupled group (see :class:`~lightning_prune.core.graph.channel_graph.ChannelGraph`) is every channel that
must be kept or pruned together: a residual stage's channel in each of its convs, a channel of a
concatenation, a grouped conv's rows. Each measure scores the group as one:

``"l1"`` / ``"l2"``
    the mean absolute value / the root mean square of each member's filter;
``"fpgm"``
    each member filter's summed distance to the other filters of its layer (FPGM, He et al. 2019:
    a filter close to its layer's geometric median is the most replaceable);
``"bn_scale"``
    the absolute scale (``weight``) of the norms the group feeds (Network Slimming); a group that
    feeds no norm has no such score and is kept;

``"taylor"``
    first-order Taylor (Molchanov et al. 2019): ``|sum of weight x grad|`` over every parameter
    slice the group owns (filters, biases, norm scales and shifts, the consumers' input slices),
    one estimate of the loss change per optimizer step, summed over the steps since the last
    pruning step (:class:`TaylorScores`).

For ``"l1"``, ``"l2"`` and ``"fpgm"`` each layer's channel scores are divided by their layer's mean
first, so a group spanning several layers weighs each layer alike and groups of different layers
compare in global mode; Taylor's scores are estimates of the loss in the same units everywhere
and are used as they are. The magnitude measures score a group by those of its members that have
a filter weight of their own; a group with none (only attention heads, say) is kept.

:func:`importance_masks` draws masks from the scores: ``ranking="uniform"`` prunes the same
fraction of each family (the groups spanning the same layers), ``"global"`` ranks every group of
the model together, so a layer whose channels matter keeps more. ``previous`` masks only grow.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> graph = ChannelGraph.from_model(model, torch.randn(1, 3, 8, 8))
>>> masks = importance_masks(graph, model, "fpgm", {"0": 0.5})
>>> int(masks["0"].sum())
4
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.groups import _balance_grouped_convs, _family_step, _rounded_kept
from lightning_prune.core.graph.masks import Masks
from lightning_prune.core.graph.prunable import filters

IMPORTANCES = ("l1", "l2", "fpgm", "bn_scale", "taylor")
RANKINGS = ("uniform", "global")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def group_scores(
    graph: ChannelGraph, model: nn.Module, importance: str, taylor: TaylorScores | None = None
) -> dict[int, float]:
    """Group root -> score (higher: more important) for every prunable group of ``graph``.

    Groups that ``importance`` cannot score (``"bn_scale"``: no norm fed) are left out: they are kept.
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}; got {importance!r}.")
    members = graph.group_members()
    if importance == "taylor":
        if taylor is None or taylor.steps == 0:
            raise ValueError(
                "importance='taylor' needs gradients: accumulate a TaylorScores over training steps first."
            )
        per_root = taylor.per_root(graph)
        return {root: float(per_root[root]) for root in members}
    if importance == "bn_scale":
        scale = np.zeros(graph.trace.num_labels)
        fed = np.zeros(graph.trace.num_labels, dtype=bool)
        for axis in graph.axes:
            module = model.get_submodule(axis.module)
            if isinstance(module, _NORMS) and axis.param == "weight" and axis.groups == 1:
                labels = axis.labels.numpy().ravel()
                valid = labels >= 0
                roots = graph.root[labels[valid]]
                values = getattr(module, axis.param).detach().abs().float().cpu().numpy().ravel()[valid]
                np.add.at(scale, roots, values)
                fed[roots] = True
        return {root: float(scale[root]) for root in members if fed[root]}
    channel = {}
    for layer, labels in graph.producers.items():
        scores = _channel_scores(model.get_submodule(layer), importance)
        if scores is not None and scores.numel() == labels.numel():
            channel[layer] = scores
    result = {}
    for root, group in members.items():
        known = [float(channel[layer][c]) for layer, c in group if layer in channel]
        if known:  # members without a filter of their own (attention heads) follow the others
            result[root] = sum(known) / len(known)
    return result


def _channel_scores(module: nn.Module, importance: str) -> torch.Tensor | None:
    """Per output channel of ``module``, its score divided by the layer's mean score (``None``:
    the layer has no single filter weight to score)."""
    parts = []
    for rows in filters(module):  # a conv's or linear's weight; an attention's q, k, v projections
        rows = rows.float()
        if importance == "l1":
            parts.append(rows.abs().mean(1))
        elif importance == "l2":
            parts.append(rows.pow(2).mean(1).sqrt())
        else:  # fpgm: summed distance to the layer's other filters
            parts.append(torch.cdist(rows[None], rows[None])[0].sum(1))
    if not parts:
        return None
    scores = torch.cat(parts)
    mean = scores.mean()
    return (scores / mean if mean > 0 else scores).cpu()


class TaylorScores:
    """First-order Taylor importance accumulated over optimizer steps.

    Call :meth:`accumulate` once per optimizer step, after the gradients are complete (the callback
    does so in ``on_before_optimizer_step``); each call adds ``|sum of weight x grad|`` per group.
    Nothing is registered on the model. The totals are plain arrays (:meth:`state_dict`), so they
    survive a checkpoint.
    """

    def __init__(self) -> None:
        self.totals: np.ndarray | None = None
        self.steps = 0

    @torch.no_grad()
    def accumulate(self, graph: ChannelGraph, model: nn.Module) -> None:
        step = np.zeros(graph.trace.num_labels)
        seen = set()
        for axis in graph.axes:
            if axis.groups != 1 or (axis.module, axis.param) in seen:
                continue
            seen.add((axis.module, axis.param))
            tensor = getattr(model.get_submodule(axis.module), axis.param, None)
            if not isinstance(tensor, nn.Parameter) or tensor.grad is None:
                continue
            product = (tensor.detach().float() * tensor.grad.float()).movedim(axis.dim, 0)
            product = product.reshape(product.shape[0], -1).sum(1)
            labels = axis.labels.numpy().ravel()
            if labels.size != product.numel():
                continue
            valid = labels >= 0
            np.add.at(step, graph.root[labels[valid]], product.cpu().double().numpy()[valid])
        totals = self.totals if self.totals is not None and self.totals.size == step.size else np.zeros_like(step)
        self.totals = totals + np.abs(step)
        self.steps += 1

    def per_root(self, graph: ChannelGraph) -> np.ndarray:
        if self.totals is None or self.totals.size != graph.trace.num_labels:
            return np.zeros(graph.trace.num_labels)
        return self.totals / max(self.steps, 1)

    def reset(self) -> None:
        self.totals, self.steps = None, 0

    def state_dict(self) -> dict:
        return {"totals": None if self.totals is None else torch.from_numpy(self.totals.copy()), "steps": self.steps}

    def load_state_dict(self, state: Mapping) -> None:
        totals = state.get("totals")
        self.totals = None if totals is None else totals.double().numpy().copy()
        self.steps = int(state.get("steps", 0))


def importance_masks(
    graph: ChannelGraph,
    model: nn.Module,
    importance: str,
    sparsity: Mapping[str, float],
    *,
    ranking: str = "uniform",
    min_channels: int = 1,
    previous: Masks | None = None,
    round_to: int = 1,
    taylor: TaylorScores | None = None,
) -> Masks:
    """Masks that prune whole coupled groups by ``importance``.

    ``sparsity`` maps each layer that may be pruned to its fraction; a group can be pruned only
    when every member lies in such a layer, and a family (groups spanning the same layers) prunes
    the mean fraction of its layers. ``ranking="uniform"`` prunes that many of each family's
    lowest groups; ``"global"`` prunes the same total number of groups, chosen across all
    families by score. Every family keeps at least ``min_channels`` groups (and at least one),
    its kept count rounded down to a multiple of ``round_to``. Groups pruned in ``previous``
    stay pruned and count towards the amount (masks only grow).
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}; got {ranking!r}.")
    scores = group_scores(graph, model, importance, taylor)
    members = graph.group_members()
    candidates = {
        root: group
        for root, group in members.items()
        if root in scores and all(layer in sparsity for layer, _ in group)
    }
    was_pruned = {
        root
        for root, group in candidates.items()
        if previous and any(layer in previous and not bool(previous[layer][c]) for layer, c in group)
    }
    families: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for root, group in candidates.items():
        families[tuple(sorted({layer for layer, _ in group}))].append(root)
    quota, cap = {}, {}
    for family, roots in families.items():
        fraction = sum(sparsity[layer] for layer in family) / len(family)
        most = max(len(roots) - max(min_channels, 1), 0)
        count = min(math.floor(fraction * len(roots)), most)
        if count > 0 and round_to > 1:
            step = _family_step(roots, candidates, round_to)
            count = min(len(roots) - _rounded_kept(len(roots) - count, len(roots), step), most)
        already = sum(root in was_pruned for root in roots)
        quota[family] = max(count, already)
        cap[family] = max(most, already)  # the most groups this family may lose
    pruned: set[int] = set(was_pruned)
    if ranking == "uniform":
        for family, roots in families.items():
            order = sorted((r for r in roots if r not in was_pruned), key=scores.__getitem__)
            pruned.update(order[: quota[family] - sum(r in was_pruned for r in roots)])
    else:
        budget = sum(quota.values()) - len(was_pruned)
        lost = {family: sum(r in was_pruned for r in roots) for family, roots in families.items()}
        family_of = {root: family for family, roots in families.items() for root in roots}
        for root in sorted((r for r in candidates if r not in was_pruned), key=scores.__getitem__):
            if budget <= 0:
                break
            family = family_of[root]
            if lost[family] < cap[family]:
                pruned.add(root)
                lost[family] += 1
                budget -= 1
        if round_to > 1:  # round each family's kept count down, taking the lowest scores
            for roots in families.values():
                kept = [r for r in roots if r not in pruned]
                target = _rounded_kept(len(kept), len(roots), _family_step(roots, candidates, round_to))
                if len(kept) < len(roots) and target < len(kept):
                    pruned.update(sorted(kept, key=scores.__getitem__)[: len(kept) - target])
    balance = {root: scores[root] - (1e30 if root in was_pruned else 0.0) for root in candidates}
    _balance_grouped_convs(graph, pruned, balance, round_to)
    masks: Masks = {layer: torch.ones(labels.numel(), dtype=torch.bool) for layer, labels in graph.producers.items()}
    for root in pruned | was_pruned:
        for layer, channel in candidates[root]:
            masks[layer][channel] = False
    for layer, keep in (previous or {}).items():  # a previous mask's channels outside any group stay pruned too
        if layer in masks and keep.numel() == masks[layer].numel():
            masks[layer] &= keep.to(torch.bool).cpu()
    return {layer: keep for layer, keep in masks.items() if not bool(keep.all())}


__all__ = ["IMPORTANCES", "RANKINGS", "TaylorScores", "group_scores", "importance_masks"]
