"""NNI 3.0 one-shot pruners built from plain config (NNI is imported only here, and only when asked)."""

from __future__ import annotations

import copy
import difflib
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.core.errors import ConfigurationError
from lightning_prune.core.graph.masks import Masks, collect_masks

PRUNERS = {"fpgm": "FPGMPruner", "l1": "L1NormPruner", "l2": "L2NormPruner"}


def build_config_list(
    sparsity: float,
    op_types: Sequence[str] = ("Conv2d",),
    op_names: Sequence[str] | None = None,
    exclude_op_names: Sequence[str] | None = None,
    config_list: list[dict[str, Any]] | None = None,
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


def check_config_list(config_list: Any, argument: str = "config_list") -> None:
    """Check a ``config_list``'s shape and values without a model: a list of dicts whose amount
    (``sparse_ratio``, or NNI 2.x's ``sparsity``) is a number in (0, 1) and whose name lists are
    lists of strings. Raises :class:`~lightning_prune.core.errors.ConfigurationError` naming the entry."""
    if not isinstance(config_list, (list, tuple)) or not config_list:
        raise ConfigurationError(f"`{argument}` must be a non-empty list of dicts; got {config_list!r}.")
    for index, entry in enumerate(config_list):
        where = f"`{argument}[{index}]`"
        if not isinstance(entry, Mapping):
            raise ConfigurationError(
                f"{where} must be a dict such as {{'op_types': ['Conv2d'], 'sparse_ratio': 0.5}}; got {entry!r}."
            )
        for key in ("sparse_ratio", "sparsity"):
            value = entry.get(key)
            if value is not None and not _is_fraction(value):
                raise ConfigurationError(f"{where}['{key}'] = {value!r} must be a number in (0, 1), e.g. 0.5.")
        for key in ("op_types", "op_names", "exclude_op_names", "exclude_op_types"):
            names = entry.get(key)
            if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
                raise ConfigurationError(f"{where}['{key}'] = {names!r} must be a list of strings, e.g. ['Conv2d'].")
        if not entry.get("exclude") and entry.get("sparse_ratio", entry.get("sparsity")) is None:
            raise ConfigurationError(f"{where} has no 'sparse_ratio': say how much of these layers to prune, e.g. 0.5.")


def layers_to_prune(model: nn.Module, config_list: list[dict[str, Any]], argument: str = "config_list") -> list[str]:
    """The layer names of ``model`` that ``config_list`` selects, as NNI 3.0 would.

    Raises :class:`~lightning_prune.core.errors.ConfigurationError` when a named layer does not exist
    (with the closest names) or when nothing is selected (with the layer types the model has),
    so a configuration that would prune nothing fails before training, not after it.
    """
    modules = dict(model.named_modules())
    selected: dict[str, None] = {}
    for entry in config_list:
        for key in ("op_names", "exclude_op_names"):
            for name in entry.get(key) or ():
                if name not in modules:
                    close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
                    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                    raise ConfigurationError(
                        f"`{argument}` names layer {name!r} ({key}), which the model does not have.{hint} "
                        "HINT: names are paths from the LightningModule, as in `model.named_modules()`."
                    )
        types, names = entry.get("op_types"), entry.get("op_names")
        excluded_types, excluded = set(entry.get("exclude_op_types") or ()), set(entry.get("exclude_op_names") or ())
        matched = [
            name
            for name, module in modules.items()
            if name
            and (types is None or _is_a(module, types))
            and (names is None or name in names)
            and not _is_a(module, excluded_types)
            and name not in excluded
        ]
        if entry.get("exclude"):
            for name in matched:
                selected.pop(name, None)
        else:
            selected.update(dict.fromkeys(matched))
    if not selected:
        kinds = sorted(
            {type(m).__name__ for m in modules.values() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
        )
        raise ConfigurationError(
            f"`{argument}` selects no layer of the model, so nothing would be pruned. The model's prunable "
            f"layer types are {kinds or 'none'}. HINT: set `op_types` (e.g. {kinds[:1] or ['Conv2d']}) or `op_names`."
        )
    return list(selected)


def _is_a(module: nn.Module, type_names: Iterable[str]) -> bool:
    """Whether ``module``'s class or a base class is named in ``type_names`` (``"Linear"`` matches
    ``nn.MultiheadAttention``'s ``out_proj``, a ``NonDynamicallyQuantizableLinear``)."""
    names = set(type_names)
    return any(cls.__name__ in names for cls in type(module).__mro__)


def _is_fraction(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 < float(value) < 1.0


def nni_masks(model: nn.Module, pruner: str, config_list: list[dict[str, Any]]) -> Masks:
    """Run NNI's one-shot ``pruner`` ("fpgm", "l1" or "l2") on a copy of ``model``; return its masks."""
    import nni.compression.pruning as nni_pruning  # slow and noisy: only when a pruner is asked for

    work = copy.deepcopy(model)
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in work.parameters()):
        work.float()  # NNI's distances and norms need full precision; the masks are the same shape
    instance = getattr(nni_pruning, PRUNERS[pruner])(work, config_list)
    _, masks = instance.compress()
    instance.unwrap_model()
    return collect_masks(masks, model)


def masks_from_pruner(pruner: Any, model: nn.Module) -> Masks:
    """Masks from a user's NNI pruner object (the seed's flow): compress, read, then unwrap the model."""
    _, masks = pruner.compress()
    pruner.unwrap_model()
    return collect_masks(masks, model)
