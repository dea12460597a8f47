"""``finetune="pruned"`` under FSDP2: the smaller layers sharded again the way the user sharded the full-size ones.

The user applies ``fully_shard`` in ``configure_model``, once, to the full-size layers. After the
shrink (every rank builds the same smaller model from the shards), :class:`ShardLayout` records,
before the layers are replaced, which modules were FSDP units, on which mesh and with which
settings; once the smaller layers are in the module it calls ``fully_shard`` on each unit again,
children before parents. What cannot be redone that way (the LightningModule itself as the unit,
a mesh of more than one dimension, a parameter not sharded by rows) is refused before training.

Resuming from a checkpoint taken after the shrink: ``ModelParallelStrategy.load_checkpoint`` loads
the weights and the optimizer states itself, before any ``on_load_checkpoint`` hook runs, so
:func:`before_strategy_load` reads the callback's state from the checkpoint first and lets the
callback shrink (and re-shard) the module, so the small sharded weights fit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_prune.core.errors import CheckpointError, ConfigurationError
from lightning_prune.core.sharded import fsdp_units, is_dtensor, reshard

_METADATA = "meta.pt"  # what Lightning's distributed checkpoint directory keeps besides the shards


@dataclass(frozen=True)
class ShardLayout:
    """Which modules of a LightningModule ``fully_shard`` made FSDP units (children first), the
    mesh they were sharded on, and each unit's ``fully_shard`` settings."""

    units: tuple[str, ...]
    mesh: Any
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, pl_module: nn.Module) -> ShardLayout | None:
        """The layout of ``pl_module`` as ``configure_model`` sharded it (``None``: no FSDP unit), each
        unit's parameters resharded first (a root unit keeps them whole after a forward without a
        backward, e.g. validation); a ``ConfigurationError`` for what :meth:`apply` could not redo."""
        from torch.distributed.tensor import Shard

        units = fsdp_units(pl_module)
        if not units and not any(is_dtensor(p) for p in pl_module.parameters()):
            return None  # nothing sharded: the smaller layers stay as they are
        if not units:
            raise _refuse(
                "parameters sharded without `fully_shard` (tensor parallelism)", "shard with `fully_shard` only"
            )
        if "" in units:
            raise _refuse(
                f"{type(pl_module).__name__} itself is an FSDP unit (`fully_shard(self)`)",
                "shard `self.model` (or its blocks) in `configure_model`",
            )
        reshard(pl_module)
        sharded = [(name, p) for name, p in pl_module.named_parameters() if is_dtensor(p)]
        meshes = {p.device_mesh for _, p in sharded}
        if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
            raise _refuse(
                "parameters on a mesh of more than one dimension, or on several meshes (tensor parallelism, HSDP)",
                "shard on one data-parallel mesh: `fully_shard(block, mesh=self.device_mesh['data_parallel'])`",
            )
        other = next(((name, p.placements) for name, p in sharded if tuple(p.placements) != (Shard(0),)), None)
        if other is not None:
            raise _refuse(
                f"parameter '{other[0]}' placed as {other[1]} (a `shard_placement_fn`)",
                "shard parameters by rows (fully_shard's default)",
            )
        settings = {name: _settings(pl_module.get_submodule(name)) for name in units}
        return cls(tuple(units), next(iter(meshes)), settings)

    def apply(self, pl_module: nn.Module) -> None:
        """``fully_shard`` each recorded unit of ``pl_module`` (its layers replaced) again, on the same mesh."""
        from torch.distributed.fsdp import fully_shard

        for name in self.units:
            fully_shard(pl_module.get_submodule(name), mesh=self.mesh, **self.settings[name])


def _settings(unit: nn.Module) -> dict[str, Any]:
    """The ``fully_shard`` arguments ``unit`` was sharded with (mixed precision, offloading, resharding)."""
    state = unit._get_fsdp_state()
    group = state._fsdp_param_group
    if group is None:  # a unit without parameters of its own
        return {}
    after = group.post_forward_mesh_info  # None: kept whole after forward; a smaller mesh: an int was given
    if state._auto_reshard_after_forward:
        reshard: bool | int | None = None
    elif after is None or after.shard_mesh_size == group.mesh_info.shard_mesh_size:
        reshard = after is not None
    else:
        reshard = after.shard_mesh_size
    return {"mp_policy": group.mp_policy, "offload_policy": group.offload_policy, "reshard_after_forward": reshard}


def _refuse(what: str, hint: str) -> ConfigurationError:
    return ConfigurationError(
        "`PruneExportCallback(finetune='pruned')` under ModelParallelStrategy shards the smaller layers again the "
        f"way `configure_model` sharded the full-size ones, which it cannot do here: {what}. "
        f"HINT: {hint}, or use finetune='masked'."
    )


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> None:
    """Give every parameter of ``model`` left on the meta device real zeros on ``device`` (values a
    checkpoint then overwrites); ties stay ties."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in made:
                    zeros = torch.zeros(param.shape, dtype=param.dtype, device=device)
                    made[id(param)] = nn.Parameter(zeros, requires_grad=param.requires_grad)
                module._parameters[name] = made[id(param)]


def checkpoint_metadata(path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
    """What a Lightning checkpoint keeps besides the weights (the callbacks' states among it): a
    distributed checkpoint directory's ``meta.pt``, or the file itself (memory-mapped)."""
    try:
        if os.path.isdir(path):
            return torch.load(os.path.join(path, _METADATA), map_location="cpu", weights_only=weights_only)
        return torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(
            f"Could not read the callbacks' state from checkpoint '{path}' before loading it: {type(err).__name__}: {err}. "
            "HINT: pass a checkpoint Lightning wrote under ModelParallelStrategy (a directory, or one file)."
        ) from err


def before_strategy_load(strategy: Any, restore: Callable[[dict[str, Any]], None]) -> tuple[Any, str]:
    """Make ``strategy.load_checkpoint`` call ``restore(metadata)`` (on every rank) before it loads
    the weights; the ``(object, attribute)`` to remove again."""
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        path = strategy.broadcast(checkpoint_path)  # as the strategy does: rank zero's path everywhere
        restore(checkpoint_metadata(path, kwargs.get("weights_only")))
        return original(path, *args, **kwargs)

    strategy.load_checkpoint = load_checkpoint
    return strategy, "load_checkpoint"


__all__ = ["ShardLayout", "before_strategy_load", "checkpoint_metadata", "materialize"]
