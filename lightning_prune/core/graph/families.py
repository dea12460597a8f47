"""How many of a family's groups a pruned family keeps: widths rounded to multiples, grouped convs balanced.

A family is the set of coupled groups that span the same layers (every channel of one residual
stage, say). :func:`~lightning_prune.group_masks` and the importance measures
(:mod:`~lightning_prune.core.graph.importance`) both prune whole families this way.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping

from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.plan import grouped_conv_rows, rounding_step


def rounded_kept(kept: int, size: int, round_to: int) -> int:
    """``kept`` rounded down to a multiple of ``round_to``, at least ``round_to``, at most ``size``.

    >>> rounded_kept(20, 40, 16), rounded_kept(5, 40, 16), rounded_kept(6, 12, 16)
    (16, 16, 12)
    """
    return min(size, max(round_to, kept // round_to * round_to))


def family_step(roots: list[int], members: Mapping[int, list[tuple[str, int]]], round_to: int) -> int:
    """How many of a family's groups make a multiple of ``round_to`` channels in every layer it spans.

    A group is one channel per layer (the step is ``round_to``) unless it is wider: an attention
    head is ``head_dim`` channels of each projection, so whole heads already keep a multiple of 8
    (step 1) and rounding the head count to 8 would keep heads the masks prune.

    >>> family_step([0, 1], {0: [("a", 0)], 1: [("a", 1)]}, 8), family_step([0], {0: [("q", c) for c in range(64)]}, 8)
    (8, 1)
    """
    steps = {
        rounding_step(width, round_to)
        for root in roots
        for width in Counter(layer for layer, _ in members[root]).values()
    }
    return math.lcm(*steps)


def round_kept_counts(
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


def balance_grouped_convs(graph: ChannelGraph, pruned: set[int], scores: dict[int, float], round_to: int = 1) -> None:
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


def tied_families(families: Mapping[tuple[str, ...], list[int]], scores: Mapping[int, float], importance: str) -> set:
    """The families whose groups all score the same (to 1e-6), with a warning naming their layers."""
    tied = set()
    for family, roots in families.items():
        values = [scores[root] for root in roots]
        if len(values) > 1 and max(values) - min(values) <= 1e-6 * max(abs(max(values)), abs(min(values))):
            tied.add(family)
    if tied:
        layers = sorted({layer for family in tied for layer in family})
        warnings.warn(
            f"importance={importance!r} cannot rank the channels of {layers}: every channel of each scores the same "
            "(as with 'bn_scale' on norms never trained, every scale 1). They are pruned by position, the asked "
            "fraction of each, and ranking='global' takes no more from them. HINT: prune a trained model, or choose "
            "another measure ('l1', 'fpgm', 'taylor').",
            stacklevel=3,
        )
    return tied


__all__ = ["balance_grouped_convs", "family_step", "round_kept_counts", "rounded_kept", "tied_families"]
