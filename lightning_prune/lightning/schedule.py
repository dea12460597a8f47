"""When each pruning step happens and how much it prunes: a gradual schedule in plain types.

``schedule={"start_epoch": 1, "end_epoch": 6, "steps": 5, "ramp": "cubic"}`` prunes ``steps`` times,
at the start of epochs spread evenly from ``start_epoch`` to ``end_epoch`` (both included). The
fraction of the final sparsity reached after step ``k`` of ``n`` is ``1 - (1 - k/n)**3`` on the cubic
ramp (Zhu & Gupta's AGP: large steps while the network is still redundant, small ones near the end)
or ``k/n`` on the linear one. A one-shot prune is the schedule of one step. ``end_epoch`` is
required when ``steps > 1``; every step's epoch must come before the trainer's ``max_epochs``
(checked in ``setup``, :func:`~lightning_prune.lightning.checks.check_epochs`).

>>> s = Schedule.from_argument({"start_epoch": 1, "end_epoch": 5, "steps": 3})
>>> [s.epoch_of(k) for k in (1, 2, 3)], [round(s.fraction(k), 3) for k in (1, 2, 3)]
([1, 3, 5], [0.704, 0.963, 1.0])
>>> s.due(epoch=3, done=1)
[2]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_prune.core.errors import ConfigurationError

RAMPS = ("cubic", "linear")
_KEYS = ("start_epoch", "end_epoch", "steps", "ramp")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Schedule:
    start_epoch: int
    end_epoch: int
    steps: int
    ramp: str = "cubic"

    @classmethod
    def from_argument(cls, value: Any) -> Schedule:
        """Check ``schedule=`` (a dict of plain types, as YAML gives it) and build the schedule."""

        def fail(expected: str) -> ConfigurationError:
            return ConfigurationError(f"`PruneExportCallback(schedule={value!r})` {expected}")

        if not isinstance(value, Mapping):
            raise fail("must be a dict such as {'start_epoch': 1, 'end_epoch': 6, 'steps': 5, 'ramp': 'cubic'}.")
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise fail(f"has unknown keys {unknown}; the keys are {list(_KEYS)}.")
        start, end, steps = value.get("start_epoch", 0), value.get("end_epoch"), value.get("steps")
        ramp = value.get("ramp", "cubic")
        if not _int(start) or start < 0:
            raise fail("needs 'start_epoch', an int >= 0 (the epoch whose start the first step comes at).")
        if not _int(steps) or steps < 1:
            raise fail("needs 'steps', an int >= 1 (how many times to prune).")
        if ramp not in RAMPS:
            raise fail(f"has 'ramp': {ramp!r}; choose one of {list(RAMPS)}.")
        if end is None and steps > 1:  # where the ramp ends is the schedule's main choice: not guessed
            raise fail(
                f"needs 'end_epoch', the epoch of the last of its {steps} steps (an int >= start_epoch + steps - 1 = "
                f"{start + steps - 1}), e.g. {{'start_epoch': {start}, 'end_epoch': {start + 2 * steps - 2}, 'steps': {steps}}}."
            )
        if end is None:
            end = start
        if not _int(end) or end < start + steps - 1:
            raise fail(
                f"needs 'end_epoch', an int >= start_epoch + steps - 1 = {start + steps - 1}: each step gets an epoch of its own."
            )
        if steps == 1 and end != start:
            raise fail("prunes once ('steps': 1), at 'start_epoch'; set 'end_epoch' equal to it or leave it out.")
        return cls(start, end, steps, ramp)

    @classmethod
    def of(cls, schedule: Schedule | None, prune_on_epoch: int) -> Schedule:
        """The schedule in effect: ``schedule``, else the one-shot prune, one step at ``prune_on_epoch``."""
        return schedule or cls(prune_on_epoch, prune_on_epoch, 1, "linear")

    def epoch_of(self, step: int) -> int:
        """The epoch at whose start step ``step`` (1-based) prunes."""
        if self.steps == 1:
            return self.start_epoch
        return self.start_epoch + round((step - 1) * (self.end_epoch - self.start_epoch) / (self.steps - 1))

    def fraction(self, step: int) -> float:
        """The fraction of the final sparsity reached after step ``step``."""
        progress = step / self.steps
        return 1.0 - (1.0 - progress) ** 3 if self.ramp == "cubic" else progress

    def due(self, epoch: int, done: int) -> list[int]:
        """The steps not yet done whose epoch has come."""
        return [k for k in range(done + 1, self.steps + 1) if self.epoch_of(k) <= epoch]


__all__ = ["RAMPS", "Schedule"]
