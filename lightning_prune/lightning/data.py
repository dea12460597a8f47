"""Batches from a Lightning ``Trainer``'s data, whichever way it was given, for tracing and verification.

Loaders passed to ``trainer.fit(model, train_loader, val_loader)`` are attached to the fit loop
before any hook runs but only become ``trainer.val_dataloaders`` once the loop sets them up, so
both places are read. The global RNG is saved and restored around the read, so taking a batch
does not change the order in which training then sees its data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader


def first_batches(trainer: Any, count: int, training: bool = False) -> list[Any]:
    """Up to ``count`` batches, from the validation data if there is any, else from the training data
    (``training=True``: from the training data only)."""
    if count <= 0:
        return []
    with torch.random.fork_rng(devices=[]):
        for loader in _loaders(trainer, training):
            batches = []
            for batch in loader:
                batches.append(batch)
                if len(batches) >= count:
                    break
            if batches:
                return batches
    return []


def _loaders(trainer: Any, training: bool) -> Iterator[Iterable]:
    val_loop = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None)
    candidates = (
        lambda: trainer.val_dataloaders,
        lambda: _from_source(getattr(val_loop, "_data_source", None)),
        lambda: trainer.train_dataloader,
        lambda: _from_source(getattr(trainer.fit_loop, "_data_source", None)),
    )
    for candidate in candidates[2:] if training else candidates:
        loader = _first_iterable(candidate())
        if loader is not None:
            yield loader


def _from_source(source: Any) -> Any:
    """What Lightning's ``_DataLoaderSource`` (loaders given to ``fit``, or a module's or datamodule's
    ``*_dataloader`` hook) returns; ``None`` where it defines none."""
    if source is None or getattr(source, "instance", None) is None:
        return None
    is_defined = getattr(source, "is_defined", None)
    if callable(is_defined) and not is_defined():
        return None
    return source.dataloader()


def _first_iterable(loaders: Any) -> Iterable | None:
    """The first loader of a loader, a list/tuple of loaders, or a dict of them (a list of batches is one loader);
    of Lightning's ``CombinedLoader`` (what ``trainer.train_dataloader`` is once the loop set it up, yielding
    ``(batch, index, loader index)``), its first loader, with the sampler Lightning gave it (DDP's)."""
    flattened = getattr(loaders, "flattened", None)
    if isinstance(flattened, list) and flattened:
        loaders = flattened[0]
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    elif isinstance(loaders, (list, tuple)) and loaders and isinstance(loaders[0], DataLoader):
        loaders = loaders[0]
    return loaders if isinstance(loaders, Iterable) and not isinstance(loaders, (str, bytes)) else None


__all__ = ["first_batches"]
