"""NNI 3.0 one-shot pruners built from plain config (NNI is imported only here, and only when asked)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Optional

from torch import nn

from lightning_prune.masks import Masks, collect_masks

PRUNERS = {"fpgm": "FPGMPruner", "l1": "L1NormPruner", "l2": "L2NormPruner"}


def build_config_list(
    sparsity: float,
    op_types: Sequence[str] = ("Conv2d",),
    op_names: Optional[Sequence[str]] = None,
    exclude_op_names: Optional[Sequence[str]] = None,
    config_list: Optional[list[dict[str, Any]]] = None,
) -> list[dict[str, Any]]:
    """NNI 3.0's ``config_list`` from plain arguments, or a given one with NNI 2.x's ``sparsity`` renamed."""
    if config_list is not None:
        converted = []
        for entry in config_list:
            entry = dict(entry)
            if "sparsity" in entry and "sparse_ratio" not in entry:
                entry["sparse_ratio"] = entry.pop("sparsity")
            converted.append(entry)
        return converted
    entry: dict[str, Any] = {"op_types": list(op_types), "sparse_ratio": sparsity}
    if op_names:
        entry["op_names"] = list(op_names)
    if exclude_op_names:
        entry["exclude_op_names"] = list(exclude_op_names)
    return [entry]


def nni_masks(model: nn.Module, pruner: str, config_list: list[dict[str, Any]]) -> Masks:
    """Run NNI's one-shot ``pruner`` ("fpgm", "l1" or "l2") on a copy of ``model``; return its masks."""
    import nni.compression.pruning as nni_pruning  # slow and noisy: only when a pruner is asked for

    work = copy.deepcopy(model)
    instance = getattr(nni_pruning, PRUNERS[pruner])(work, config_list)
    _, masks = instance.compress()
    instance.unwrap_model()
    return collect_masks(masks, model)


def masks_from_pruner(pruner: Any, model: nn.Module) -> Masks:
    """Masks from a user's NNI pruner object (the seed's flow): compress, read, then unwrap the model."""
    _, masks = pruner.compress()
    pruner.unwrap_model()
    return collect_masks(masks, model)
