"""What the callback needs from Lightning itself, whichever namespace is installed
(``pytorch_lightning`` or ``lightning.pytorch``): base classes, rank-zero messages, and whether
the trainer runs in processes of its own."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

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
