"""What a plan says: per-layer changes, attention head counts, and the notes behind them.

The data :func:`~lightning_prune.core.graph.plan.plan` returns and the shrink stage applies (the
checkpoint stores it, so a pruned model is rebuilt without pickled code).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class HeadCounts:
    """An attention module's heads before and after export, and the (unchanged) channels per head."""

    query: int
    key_value: int
    head_dim: int
    query_before: int
    key_value_before: int
    # the query heads kept, numbered as before (for per-head state a model builds each forward); two
    # counts are equal whichever heads they keep
    kept: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kept", tuple(int(h) for h in self.kept))  # a checkpoint gives a list


@dataclass
class Note:
    """One line of the export report: a layer, how many channels, what was done, and why."""

    layer: str
    channels: int  # how many of ``unit``
    action: str
    reason: str
    unit: str = "channel(s)"

    def __str__(self) -> str:
        return f"{self.layer}: {self.channels} {self.unit} {self.action} ({self.reason})"


@dataclass
class NormConstants:
    """What a norm over channels must still count for channels it no longer sees: a LayerNorm
    (``kind="layer_norm"``) or an RMS norm (``"rms_norm"``, which needs only ``sum_sq``)."""

    channels: int  # the original number of channels (the divisor)
    pruned: int
    sum: float  # sum of the pruned channels' constant values
    sum_sq: float
    kind: str = "layer_norm"


@dataclass
class LayerChange:
    """How one module changes: parameter slices, a bias correction, norm constants."""

    keep: dict[tuple[str, int], tuple[Tensor, int]] = field(default_factory=dict)  # (param, dim) -> (index, groups)
    original_sizes: dict[tuple[str, int], int] = field(default_factory=dict)  # (param, dim) -> size before
    bias_delta: Tensor | None = None
    norm: NormConstants | None = None
    channel_dim: int = -1  # where a norm's channels are in its module-level input


@dataclass
class Plan:
    """The outcome of :func:`plan`: per-layer changes and the notes behind them."""

    changes: dict[str, LayerChange]
    kept_channels: dict[str, int]  # producer -> output channels kept
    notes: list[Note]
    heads: dict[str, HeadCounts] = field(default_factory=dict)  # attention module -> heads, where some go


def layer_shapes(plan: Plan) -> dict[str, dict[str, Any]]:
    """Per changed layer, what :func:`load_pruned` needs to shrink a fresh model the same way:
    for each sliced axis its kept size, groups and original size (to recognise another architecture)."""
    shapes = {}
    for name, change in plan.changes.items():
        shapes[name] = {
            "keep": {
                f"{param}:{dim}": [int(index.numel()), int(groups), int(change.original_sizes.get((param, dim), -1))]
                for (param, dim), (index, groups) in change.keep.items()
            },
            "bias_added": change.bias_delta is not None,
            "norm": list(astuple(change.norm)) if change.norm is not None else None,
            "channel_dim": change.channel_dim,
        }
    return shapes


__all__ = ["HeadCounts", "LayerChange", "NormConstants", "Note", "Plan", "layer_shapes"]
