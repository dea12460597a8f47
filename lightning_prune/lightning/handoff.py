"""The hand-off between processes: what rank zero does reaches every rank, and the launching process.

Rank zero exports and writes; the other ranks wait for it at a broadcast, which also carries any
error it hit, so a failure on rank zero is an error on every rank, never a hang. Under
``ddp_spawn`` the callback that runs is a copy in a worker; :class:`Handoff` carries rank zero's
results back to the launching process's callback.
"""

from __future__ import annotations

import copy
import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import torch

from lightning_prune.core.errors import PruneExportError
from lightning_prune.lightning.compat import launched_in_new_processes
from lightning_prune.lightning.state import PruneState


def error_message(err: Exception, after: str = "") -> str:
    """What every rank reports of ``err``: our errors as they are, others prefixed with their type."""
    kind = "" if isinstance(err, PruneExportError) else f"{type(err).__name__}: "
    return f"{kind}{err}{after}"


def on_rank_zero(trainer: Any, work: Callable[[], Any], after_error: str = "") -> tuple[Any, str | None]:
    """Run ``work`` on rank zero; every rank gets its result and the error it raised (as a message
    ending in ``after_error``), or ``None``. The other ranks wait at the broadcast meanwhile."""
    result, error = None, None
    if trainer.is_global_zero:
        try:
            result = work()
        except Exception as err:  # whatever rank zero hits must reach every rank, never hang them
            error = error_message(err, after_error)
    error = trainer.strategy.broadcast(error, src=0)
    return trainer.strategy.broadcast(result, src=0), error


class Handoff:
    """Carries rank zero's results from a spawned worker back to the launching process.

    Under ``ddp_spawn`` the callback that runs is a copy; the launching process's copy reads
    what the worker left at :attr:`path` (a file in the temporary directory, removed once read).
    """

    def __init__(self) -> None:
        self.path = os.path.join(tempfile.gettempdir(), f"lightning-prune-handoff-{uuid.uuid4().hex}.pt")

    def send(self, trainer: Any, state: PruneState) -> None:
        """In a spawned worker of rank zero: leave the report and the exported model for the launcher."""
        if not (trainer.is_global_zero and launched_in_new_processes(trainer)):
            return
        model = copy.deepcopy(state.exported_model).cpu() if state.exported_model is not None else None
        data = {"report": state.report, "model": model, "network_prefix": state.network_prefix}
        torch.save(data, self.path + ".part")
        os.replace(self.path + ".part", self.path)

    def receive(self, state: PruneState) -> None:
        """In the launching process: take rank zero's results into ``state`` once they exist."""
        if not os.path.isfile(self.path):
            return
        data = torch.load(self.path, weights_only=False)  # our own worker wrote it a moment ago
        os.remove(self.path)
        state.report, state.exported_model, state.network_prefix = data["report"], data["model"], data["network_prefix"]


__all__ = ["Handoff", "error_message", "on_rank_zero"]
