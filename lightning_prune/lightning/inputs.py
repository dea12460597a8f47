"""The callback's inputs: the example to trace with, the batches to verify on, and the network inside the module.

Every input is put in the module's precision and on its device the way Lightning would
(``trainer.precision_plugin.convert_input``), so tracing and verification see what training sees.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

from lightning_prune.core.errors import ConfigurationError
from lightning_prune.core.verify.batches import split_batch
from lightning_prune.lightning.data import first_batches


def example_input(trainer: Any, pl_module: Any, given: Any, input_key: str | None) -> Any:
    """The input to trace with (``given``: the callback's ``example_input``), prepared for the module.

    In order: a list of ints (the shape of a seeded random tensor), the input given, the module's
    ``example_input_array``, the model input of the first validation (or training) batch.
    """
    if isinstance(given, list) and all(isinstance(v, int) for v in given):
        example: Any = torch.randn(*given, generator=torch.Generator().manual_seed(0))
    elif given is not None:
        example = given
    elif getattr(pl_module, "example_input_array", None) is not None:
        example = pl_module.example_input_array
    else:
        batches = first_batches(trainer, 1)
        if not batches:
            raise ConfigurationError(
                "PruneExportCallback needs an example input and found no data to take one from: set "
                "`example_input=`, the module's `example_input_array`, or give the trainer training or validation data."
            )
        example = split_batch(batches[0], pl_module.forward, input_key)[0]
    return prepare(trainer, pl_module, example)


def prepare(trainer: Any, pl_module: Any, inputs: Any) -> Any:
    """``inputs`` converted by the trainer's precision plugin and moved to the module's device."""
    converted = trainer.precision_plugin.convert_input(inputs)
    return tree_map(lambda t: t.to(pl_module.device) if isinstance(t, torch.Tensor) else t, converted)


def verification_batches(trainer: Any, pl_module: Any, count: int, input_key: str | None) -> list[tuple[Any, Any]]:
    """``(model input, target)`` pairs from the first ``count`` validation (or training) batches."""
    return [split_batch(b, pl_module.forward, input_key) for b in first_batches(trainer, count)]


def network_prefix(module: torch.nn.Module) -> str:
    """The deepest submodule path that holds every parameter (``""``: the module itself)."""
    # every name: a tied LM head's weight is the embedding's, and the network must hold the head too
    owners = [name.split(".")[:-1] for name, _ in module.named_parameters(remove_duplicate=False)]
    return ".".join(os.path.commonprefix(owners)) if owners else ""


def dtype_of(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``value`` (nested) cast to ``dtype``."""
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value)


def first_sample(example: Any) -> Any:
    """The example cut to a batch of one (every tensor's first dim)."""
    return tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) and t.ndim else t, example)


def batch_size(example: Any) -> int:
    """The first dim of the first tensor in ``example`` that has one (1 when none has)."""
    return next((t.shape[0] for t in tree_leaves(example) if isinstance(t, torch.Tensor) and t.ndim), 1)


__all__ = [
    "batch_size",
    "cast",
    "dtype_of",
    "example_input",
    "first_sample",
    "network_prefix",
    "prepare",
    "verification_batches",
]
