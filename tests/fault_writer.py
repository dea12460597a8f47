"""Helper process for the fault tests: `python tests/fault_writer.py PATH MODE`.

MODE `loop`: write versioned checkpoints to PATH forever (the test kills it with SIGKILL).
MODE `full`: cap this process's file size (RLIMIT_FSIZE, SIGXFSZ ignored) so the write fails as
on a full disk, and report the error.
"""

from __future__ import annotations

import resource
import signal
import sys

import torch

from lightning_prune.checkpoint import atomic_save
from lightning_prune.errors import CheckpointError


def payload(version: int) -> dict:
    return {"version": version, "weights": torch.full((2_000_000,), float(version))}


if __name__ == "__main__":
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "loop":
        version = 0
        while True:
            version += 1
            atomic_save(payload(version), path)
            print(version, flush=True)
    else:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        try:
            atomic_save(payload(99), path)
        except CheckpointError as err:
            print(f"CheckpointError: {err}")
            sys.exit(3)
