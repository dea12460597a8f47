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
    the mean absolute scale (``weight``) of the norms the group feeds (Network Slimming); a group
    that feeds no norm has no such score and is kept;

``"taylor"``
    first-order Taylor (Molchanov et al. 2019): ``|sum of weight x grad|`` over every parameter
    slice the group owns (filters, biases, norm scales and shifts, the consumers' input slices),
    one estimate of the loss change per optimizer step, summed over the steps since the last
    pruning step (:class:`TaylorScores`). A frozen layer (``requires_grad=False``) has no gradient
    of its own and cannot recover by fine-tuning, so a group whose layers are all frozen has no
    estimate: it is kept, with a warning naming the layers. The magnitude measures score frozen
    weights as they are: freezing changes nothing for them.
``"activation"``
    what the group's channels carry on real batches, as the layers reading them see them (Wanda's
    ``||W[:, c]||_1 x rms(x_c)``; :mod:`~lightning_prune.core.graph.activation`); a group no layer reads is scored as ``"l2"``.

For ``"l1"``, ``"l2"`` and ``"fpgm"`` each layer's channel scores are divided by their layer's mean
first, so a group spanning several layers weighs each layer alike and groups of different layers
compare in global mode; Taylor's scores are estimates of the loss in the same units everywhere
and are used as they are. The magnitude measures score a group by those of its members that have
a filter weight of their own; a group with none (only attention heads, say) is kept.

:func:`importance_masks` draws masks from the scores: ``ranking="uniform"`` prunes the same
fraction of each family (the groups spanning the same layers), ``"global"`` ranks every group of
the model together, so a layer whose channels matter keeps more; either way the model loses the
asked amount (within rounding) after the last step of a schedule. ``previous`` masks only grow.

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
import warnings
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from lightning_prune.core.graph.activation import ActivationScores
from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.families import (
    balance_grouped_convs,
    family_step,
    round_kept_counts,
    rounded_kept,
    tied_families,
)
from lightning_prune.core.graph.masks import Masks
from lightning_prune.core.graph.prunable import filters
from lightning_prune.core.sharded import whole

IMPORTANCES = ("l1", "l2", "fpgm", "bn_scale", "taylor", "activation")
RANKINGS = ("uniform", "global")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def group_scores(
    graph: ChannelGraph,
    model: nn.Module,
    importance: str,
    taylor: TaylorScores | None = None,
    activations: ActivationScores | None = None,
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
        per_root, trainable = taylor.per_root(graph), taylor.trainable(graph)
        return {root: float(per_root[root]) for root in members if trainable[root]}
    if importance == "activation":
        if activations is None or not activations.recorded:
            raise ValueError(
                "importance='activation' needs batches: record an ActivationScores over forward passes first."
            )
        activations.reduce(graph)  # collective under torch.distributed: every rank's batches
        return {**group_scores(graph, model, "l2"), **activations.per_root(graph, model)}
    if importance == "bn_scale":
        scale = np.zeros(graph.trace.num_labels)
        fed = np.zeros(graph.trace.num_labels)
        for axis in graph.axes:
            module = model.get_submodule(axis.module)
            if isinstance(module, _NORMS) and axis.param == "weight" and axis.groups == 1:
                labels = axis.labels.numpy().ravel()
                valid = labels >= 0
                roots = graph.root[labels[valid]]
                values = getattr(module, axis.param).detach().abs().float().cpu().numpy().ravel()[valid]
                np.add.at(scale, roots, values)
                np.add.at(fed, roots, 1.0)
        return {root: float(scale[root] / fed[root]) for root in members if fed[root]}
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
        self.signal: np.ndarray | None = None  # per group: a trainable parameter in some step (not frozen)
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
            product = whole(product.reshape(product.shape[0], -1).sum(1))  # sharded: summed across ranks
            labels = axis.labels.numpy().ravel()
            if labels.size != product.numel():
                continue
            valid = labels >= 0
            np.add.at(step, graph.root[labels[valid]], product.cpu().double().numpy()[valid])
        signal = np.zeros(graph.trace.num_labels, dtype=bool)
        for layer, labels in graph.producers.items():  # a group is trainable when one of its layers is
            if any(p.requires_grad for p in model.get_submodule(layer).parameters(recurse=False)):
                labels = labels.numpy().ravel()
                signal[graph.root[labels[labels >= 0]]] = True
        fresh = self.totals is None or self.totals.size != step.size
        self.totals = (np.zeros_like(step) if fresh else self.totals) + np.abs(step)
        self.signal = signal | (False if fresh or self.signal is None else self.signal)
        self.steps += 1

    def per_root(self, graph: ChannelGraph) -> np.ndarray:
        if self.totals is None or self.totals.size != graph.trace.num_labels:
            return np.zeros(graph.trace.num_labels)
        return self.totals / max(self.steps, 1)

    def trainable(self, graph: ChannelGraph) -> np.ndarray:
        """Per group root: whether one of its layers had a trainable parameter of its own in an
        accumulated step. A group of frozen layers (``requires_grad=False``) is not fine-tuned and has
        no Taylor estimate of its own (not a zero one): it is kept."""
        if self.signal is None or self.signal.size != graph.trace.num_labels:
            return np.ones(graph.trace.num_labels, dtype=bool)  # saved before this was recorded
        return self.signal

    def reset(self) -> None:
        self.totals, self.signal, self.steps = None, None, 0

    def state_dict(self) -> dict:
        def tensor(array: np.ndarray | None) -> torch.Tensor | None:
            return None if array is None else torch.from_numpy(array.copy())

        return {"totals": tensor(self.totals), "signal": tensor(self.signal), "steps": self.steps}

    def load_state_dict(self, state: Mapping) -> None:
        totals, signal = state.get("totals"), state.get("signal")
        self.totals = None if totals is None else totals.double().numpy().copy()
        self.signal = None if signal is None else signal.bool().numpy().copy()
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
    activations: ActivationScores | None = None,
) -> Masks:
    """Masks that prune whole coupled groups by ``importance``.

    ``sparsity`` maps each layer that may be pruned to its fraction; a group can be pruned only
    when every member lies in such a layer, and a family (groups spanning the same layers) is asked
    for ``floor(f x n)`` of its ``n`` groups, ``f`` the mean fraction of its layers. Every family
    keeps at least ``min_channels`` groups (and at least one). Groups pruned in ``previous`` stay
    pruned and count towards the amount (masks only grow).

    ``ranking="uniform"`` prunes each family's asked amount, its lowest groups, the kept count
    rounded down to a multiple of ``round_to``. ``"global"`` prunes the sum of the families' asked
    amounts, chosen across the families by score, however ``previous`` spread it: after the last
    step of a schedule the model has lost the asked amount, not more. With ``round_to``, each family
    keeps at least ``round_to`` (or all its groups, when it has no more) and its kept count is then
    rounded down or up to a multiple, whichever keeps the model's total nearest the asked amount:
    the total is within half of the largest family's step (``round_to / 2`` groups for one-channel
    groups) of it.

    A family whose groups all score the same (``bn_scale`` on norms never trained) cannot be ranked:
    it is pruned by position, its own asked amount, with a warning, and global ranking takes nothing
    more from it. Under ``"taylor"``, a group whose parameters are all frozen has no score and is
    kept, with a warning naming its layers.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}; got {ranking!r}.")
    scores = group_scores(graph, model, importance, taylor, activations)
    members = graph.group_members()
    eligible = {root: group for root, group in members.items() if all(layer in sparsity for layer, _ in group)}
    candidates = {root: group for root, group in eligible.items() if root in scores}
    if importance == "taylor" and len(candidates) < len(eligible):
        frozen = sorted({layer for root, group in eligible.items() if root not in scores for layer, _ in group})
        warnings.warn(
            f"importance='taylor' leaves the channels of {frozen} unpruned: these layers are frozen "
            "(requires_grad=False), so they have no gradient to estimate with and could not recover by fine-tuning. HINT: to prune "
            "them, choose a magnitude measure ('l1', 'l2', 'fpgm', 'bn_scale'), which scores frozen weights as they "
            "are; to silence this, leave them out (`exclude_op_names`).",
            stacklevel=2,
        )
    was_pruned = {
        root
        for root, group in candidates.items()
        if previous and any(layer in previous and not bool(previous[layer][c]) for layer, c in group)
    }
    families: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for root, group in candidates.items():
        families[tuple(sorted({layer for layer, _ in group}))].append(root)
    tied = tied_families(families, scores, importance)
    ranked = {family: roots for family, roots in families.items() if ranking == "global" and family not in tied}
    pruned: set[int] = set(was_pruned)
    for family, roots in families.items():
        if family in ranked:
            continue
        most = max(len(roots) - max(min_channels, 1), 0)
        count = min(math.floor(_fraction(sparsity, family) * len(roots)), most)
        if count > 0 and round_to > 1:
            step = family_step(roots, candidates, round_to)
            count = min(len(roots) - rounded_kept(len(roots) - count, len(roots), step), most)
        order = sorted((r for r in roots if r not in was_pruned), key=scores.__getitem__)
        pruned.update(order[: max(count - sum(r in was_pruned for r in roots), 0)])
    if ranked:
        pruned |= _rank_globally(ranked, candidates, scores, sparsity, was_pruned, min_channels, round_to)
    balance = {root: scores[root] - (1e30 if root in was_pruned else 0.0) for root in candidates}
    balance_grouped_convs(graph, pruned, balance, round_to)
    masks: Masks = {layer: torch.ones(labels.numel(), dtype=torch.bool) for layer, labels in graph.producers.items()}
    for root in pruned | was_pruned:
        for layer, channel in candidates[root]:
            masks[layer][channel] = False
    for layer, keep in (previous or {}).items():  # a previous mask's channels outside any group stay pruned too
        if layer in masks and keep.numel() == masks[layer].numel():
            masks[layer] &= keep.to(torch.bool).cpu()
    return {layer: keep for layer, keep in masks.items() if not bool(keep.all())}


def _fraction(sparsity: Mapping[str, float], family: tuple[str, ...]) -> float:
    return sum(sparsity[layer] for layer in family) / len(family)


def _rank_globally(
    families: Mapping[tuple[str, ...], list[int]],
    candidates: Mapping[int, list[tuple[str, int]]],
    scores: Mapping[int, float],
    sparsity: Mapping[str, float],
    was_pruned: set[int],
    min_channels: int,
    round_to: int,
) -> set[int]:
    """The groups ``ranking="global"`` prunes (besides ``was_pruned``): the families' asked amounts
    in all, the lowest scores of the model first, each family's kept count then rounded."""
    order, steps, fewest, asked = {}, {}, {}, 0
    for family, roots in families.items():
        size = len(roots)
        steps[family] = step = family_step(roots, candidates, round_to) if round_to > 1 else 1
        least = min(size, max(min_channels, 1))
        fewest[family] = size if size <= step else min(size, -(-least // step) * step)
        asked += min(math.floor(_fraction(sparsity, family) * size), size - fewest[family])
        order[family] = sorted((r for r in roots if r not in was_pruned), key=scores.__getitem__, reverse=True)
    kept = {family: len(best) for family, best in order.items()}  # each family keeps its best `kept`
    budget = asked - sum(len(roots) - kept[family] for family, roots in families.items())
    family_of = {root: family for family, best in order.items() for root in best}
    for root in sorted(family_of, key=scores.__getitem__):
        if budget <= 0:
            break
        if kept[family_of[root]] > fewest[family_of[root]]:
            kept[family_of[root]] -= 1
            budget -= 1
    if round_to > 1:
        sizes = {family: len(roots) for family, roots in families.items()}
        round_kept_counts(kept, order, sizes, steps, fewest, scores)
    return {root for family, best in order.items() for root in best[kept[family] :]}


__all__ = ["IMPORTANCES", "RANKINGS", "TaylorScores", "group_scores", "importance_masks"]
