"""What the callback needs from Lightning itself, whichever namespace is installed
(``pytorch_lightning`` or ``lightning.pytorch``): base classes, rank-zero messages, and a way
back from spawned workers."""

from __future__ import annotations

import copy
import importlib
import os
import tempfile
import uuid
from types import ModuleType
from typing import Any

import torch

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


def callback_bases() -> tuple[type, ...]:
    """``Callback`` of every installed Lightning namespace: a class deriving from all of them is a
    callback to either ``Trainer``."""
    bases = []
    for name in NAMESPACES:
        try:
            bases.append(importlib.import_module(name).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError("PruneExportCallback needs Lightning: `pip install pytorch-lightning` (or `lightning`).")
    return tuple(bases)


def _rank_zero(trainer: Any) -> ModuleType:
    unified = type(trainer).__module__.startswith("lightning.")
    return importlib.import_module(f"{NAMESPACES[1] if unified else NAMESPACES[0]}.utilities.rank_zero")


def info(trainer: Any, message: str) -> None:
    """Log ``message`` once, from rank zero, through the trainer's own Lightning namespace."""
    if trainer.is_global_zero:
        _rank_zero(trainer).rank_zero_info(message)


def warn(trainer: Any, message: str) -> None:
    """Warn once, from rank zero, through the trainer's own Lightning namespace."""
    if trainer.is_global_zero:
        _rank_zero(trainer).rank_zero_warn(message)


def launched_in_new_processes(trainer: Any) -> bool:
    """Whether the trainer runs in processes it started itself (``ddp_spawn``, ``ddp_fork``), so the
    launching process holds another copy of each callback."""
    launcher = getattr(trainer.strategy, "launcher", None)
    return type(launcher).__name__ == "_MultiProcessingLauncher"


class Handoff:
    """Carries rank zero's results from a spawned worker back to the launching process.

    Under ``ddp_spawn`` the callback that runs is a copy; the launching process's copy reads
    what the worker left at :attr:`path` (a file in the temporary directory, removed once read).
    """

    def __init__(self) -> None:
        self.path = os.path.join(tempfile.gettempdir(), f"lightning-prune-handoff-{uuid.uuid4().hex}.pt")

    def send(self, trainer: Any, report: dict[str, Any], model: torch.nn.Module | None, network_prefix: str) -> None:
        if not (trainer.is_global_zero and launched_in_new_processes(trainer)):
            return
        model = copy.deepcopy(model).cpu() if model is not None else None
        torch.save({"report": report, "model": model, "network_prefix": network_prefix}, self.path + ".part")
        os.replace(self.path + ".part", self.path)

    def receive(self) -> dict[str, Any] | None:
        if not os.path.isfile(self.path):
            return None
        data = torch.load(self.path, weights_only=False)  # our own worker wrote it a moment ago
        os.remove(self.path)
        return data
