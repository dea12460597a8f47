"""Where a long export is, and how long each of its phases took.

An export that runs past a few seconds says where it is, as Lightning shows training: a progress bar
(tqdm) on a terminal, a log line (logger ``lightning_prune``) every few seconds otherwise. Every phase's
time goes in :attr:`Progress.timings`, which the export's result carries.

>>> progress = Progress(show=False)
>>> with progress.phase("trace"):
...     pass
>>> for _ in progress.steps("shrink", range(3)):
...     pass
>>> sorted(progress.timings)
['shrink', 'trace']
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

log = logging.getLogger("lightning_prune")
T = TypeVar("T")

QUIET_SECONDS = 3.0
"""Nothing is shown before an export has run this long."""


@contextmanager
def collecting_new_objects_only() -> Iterator[None]:
    """Inside the block, the garbage collector leaves alone the objects that existed before it.

    An export creates many short-lived objects, and each full collection they trigger also walks every
    object of the process (torch's and transformers' modules): 0.1-0.2 s each, about half of a CNN's
    export on a cold process. ``gc.freeze()`` moves the existing objects out of its way until the block
    ends; cycles made inside the block are still collected. Nothing is changed when the collector is
    off or the process froze objects of its own (a forking server's).

    >>> with collecting_new_objects_only():
    ...     gc.get_freeze_count() > 0
    True
    """
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Progress:
    """Phase timings, and what is shown while they run.

    ``show``: ``None`` shows progress once the export has run :data:`QUIET_SECONDS` (a bar where
    stderr is a terminal and tqdm is installed, log lines otherwise); ``False`` never; ``True``
    from the start.
    """

    def __init__(self, show: bool | None = None) -> None:
        self.show = show
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._last_line = 0.0

    def _visible(self) -> bool:
        if self.show is None:
            return time.perf_counter() - self.started >= QUIET_SECONDS
        return self.show

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (times of a phase run again add up)."""
        start = time.perf_counter()
        if self._visible():
            log.info("lightning_prune export: %s ...", name)
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def steps(self, name: str, items: Iterable[T]) -> Iterator[T]:
        """Iterate ``items`` as phase ``name``, showing ``i of n`` as they go."""
        items = list(items)
        with self.counter(name, len(items)) as tick:
            for item in items:
                yield item
                tick()

    @contextmanager
    def counter(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        """Phase ``name`` of ``total`` steps: the block calls what it gets after each, to show ``i of n``."""
        done = [0]
        with self.phase(name):
            bar = self._bar(name, total)

            def tick() -> None:
                done[0] += 1
                if bar is not None:
                    bar.update(1)
                elif self._visible() and time.perf_counter() - self._last_line >= QUIET_SECONDS:
                    self._last_line = time.perf_counter()
                    log.info("lightning_prune export: %s %d of %d", name, done[0], total)

            try:
                yield tick
            finally:
                if bar is not None:
                    bar.close()

    def _bar(self, name: str, total: int) -> Any:
        if not self._visible() or not sys.stderr.isatty():
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, desc=f"export: {name}", leave=False)

    def summary(self) -> str:
        """One line: each phase's seconds, in the order they ran."""
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.timings.items())


__all__ = ["Progress", "QUIET_SECONDS"]
