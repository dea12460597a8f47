"""Helper process for the fault tests: `python tests/fault_writer.py PATH MODE`.

MODE `loop`: write versioned checkpoints to PATH forever (the test kills it with SIGKILL).
MODE `stall`: start one write, print the temporary file's path once a megabyte of it is on disk,
then wait there mid-write (the test kills it: deterministic, unlike timing a kill into `loop`).
MODE `full`: cap this process's file size (RLIMIT_FSIZE, SIGXFSZ ignored) so the write fails as
on a full disk, and report the error.
"""

from __future__ import annotations

import resource
import signal
import sys
import time

import torch

from lightning_prune.core.errors import CheckpointError
from lightning_prune.core.files import atomic
from lightning_prune.core.files.atomic import atomic_save


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
    elif mode == "stall":

        class Stalling:
            """The temporary file, which pauses for good once part of the checkpoint is written."""

            def __init__(self, stream) -> None:
                self.stream, self.written = stream, 0

            def write(self, data) -> int:
                count = self.stream.write(data)
                self.written += count
                if self.written > 1_000_000:
                    self.stream.flush()
                    print(self.stream.name, flush=True)
                    time.sleep(600)
                return count

            def __getattr__(self, name):
                return getattr(self.stream, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.stream.close()

        atomic.open = lambda *args, **kwargs: Stalling(open(*args, **kwargs))
        atomic_save(payload(1), path)
    else:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        try:
            atomic_save(payload(99), path)
        except CheckpointError as err:
            print(f"CheckpointError: {err}")
            sys.exit(3)
