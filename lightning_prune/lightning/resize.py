"""``finetune="pruned"``: fine-tuning at the pruned size.

After the last pruning step the module is exported and verified, its smaller layers replace the
full-size ones inside the user's LightningModule, and the optimizers are rebuilt for the new
parameters (learning rates and scheduler state carried over). A resumed run replays the same
shrink from the checkpoint's record before the small weights are loaded.

Under DDP every rank builds the smaller model itself (the same masks, weights and example input
give the same export); the ranks compare digests of it before any rank swaps its layers, and the
module is wrapped in ``DistributedDataParallel`` again, the way Lightning wrapped it, so the new
parameters' gradients are all-reduced. Under FSDP2 every rank builds it from the shards, a module
at a time, and the smaller layers are sharded again as the full-size ones were
(:mod:`~lightning_prune.lightning.resharding`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from lightning_prune.core.errors import ConfigurationError, PruneExportError
from lightning_prune.core.export import export
from lightning_prune.core.files.checkpoint import replay_shrink, shrink_record
from lightning_prune.core.sharded import skeleton
from lightning_prune.core.verify.equivalence import verify_on_batches
from lightning_prune.core.verify.report import count_macs, count_params
from lightning_prune.lightning.checks import is_sharded
from lightning_prune.lightning.compat import info, launched_in_new_processes
from lightning_prune.lightning.exporting import export_rounding
from lightning_prune.lightning.inputs import example_input, first_sample, network_prefix, prepare
from lightning_prune.lightning.resharding import ShardLayout, materialize
from lightning_prune.lightning.sharding import ShardedModule, read_sharded, same_buffers, uses_fsdp2
from lightning_prune.lightning.state import PruneState


class Resizing:
    """The shrink of one callback's module: ``settings`` is the callback (its arguments and public
    properties are read), ``state`` its :class:`~lightning_prune.lightning.state.PruneState`."""

    def __init__(self, settings: Any, state: PruneState) -> None:
        self.settings, self.state = settings, state

    def check_strategy(self, trainer: Any) -> None:
        """``finetune="pruned"`` replaces layers while training: a single device, DDP launched as
        separate scripts (``strategy="ddp"``), or FSDP2 (``ModelParallelStrategy``)."""
        if self.settings.finetune != "pruned":
            return
        strategy = trainer.strategy
        name = type(strategy).__name__
        ddp = any(cls.__name__ == "DDPStrategy" for cls in type(strategy).__mro__) and not is_sharded(strategy)
        if ddp and launched_in_new_processes(trainer):
            raise ConfigurationError(
                f"`PruneExportCallback(finetune='pruned')` cannot run under {name} started by `ddp_spawn` or "
                "`ddp_fork`: after fit, Lightning loads the workers' weights into the launching process's module, "
                "which still has the full-size layers, and the smaller weights do not fit there. "
                "HINT: use strategy='ddp' (separate processes, one script each), or finetune='masked'."
            )
        if name != "SingleDeviceStrategy" and not ddp and not uses_fsdp2(trainer):
            raise ConfigurationError(
                f"`PruneExportCallback(finetune='pruned')` replaces layers inside the module while training, which "
                "this version supports on a single device, under DDP (strategy='ddp') and under ModelParallelStrategy "
                f"(FSDP2) only; the trainer uses {name}. HINT: use finetune='masked' (the default) under this strategy."
            )

    def check_layout(self, trainer: Any, pl_module: Any) -> None:
        """Under FSDP2, once ``configure_model`` has sharded the module: refuse, before training, a
        sharding that the shrink could not redo on the smaller layers."""
        if self.settings.finetune == "pruned" and not self.state.shrunk and uses_fsdp2(trainer):
            ShardLayout.of(pl_module)

    def shrink(self, trainer: Any, pl_module: Any, rebuild_optimizers: bool = True) -> None:
        """Export now and put the smaller layers into the module itself; with ``rebuild_optimizers``
        (the masked model is live, not about to be overwritten by a checkpoint) verify the small
        model against it and give the optimizers the new parameters."""
        state = self.state
        layout = ShardLayout.of(pl_module) if uses_fsdp2(trainer) else None  # first: it reshards the units
        same_buffers(trainer, pl_module)  # FSDP2: each rank's norm statistics are its own; rank zero's count
        example = _rank_zeros(
            trainer, pl_module, example_input(trainer, pl_module, self.settings.example_input, self.settings.input_key)
        )
        paused = state.distiller is not None and state.distiller.attached
        if paused:
            state.distiller.detach()  # the copy export makes must not carry the hooks
        try:
            small = _same_on_every_rank(
                trainer, lambda: self._smaller(trainer, pl_module, example, verify=rebuild_optimizers)
            )
            before = sum(p.numel() for p in pl_module.parameters())
            _put_in(pl_module, small)
        finally:
            if paused:
                state.distiller.attach(pl_module)
        self._settle(trainer, pl_module, layout, rebuild_optimizers)
        if rebuild_optimizers:
            after = sum(p.numel() for p in pl_module.parameters())
            info(
                trainer,
                f"PruneExportCallback: fine-tuning at the pruned size from here: {after:,} parameters (was {before:,}).",
            )

    def _settle(self, trainer: Any, pl_module: Any, layout: ShardLayout | None, rebuild: bool) -> None:
        """With the smaller layers in: wrapped (DDP) or sharded (FSDP2) again as before; the optimizers
        rebuilt when ``rebuild``, or under FSDP2 (the strategy set them up before a checkpoint loads into them)."""
        self._at_pruned_size()
        _wrap_again(trainer, pl_module)
        if layout is not None:
            layout.apply(pl_module)
        if rebuild or layout is not None:
            _rebuild_optimizers(trainer)

    def _smaller(self, trainer: Any, pl_module: Any, example: Any, verify: bool) -> torch.nn.Module:
        """The exported copy of ``pl_module`` (its shrink recorded in the state), checked against it when
        ``verify``; under FSDP2 built from the shards a module at a time, on every rank (collective)."""
        settings = self.settings
        dense = _dense_size(trainer, pl_module, example)
        if read_sharded(trainer, pl_module):
            result = ShardedModule(pl_module).export(
                self.state.masks, example, round_to=export_rounding(settings), whole_channel=False, progress=False
            )
        else:
            result = export(
                pl_module,
                self.state.masks,
                example,
                inplace_dict=settings.inplace_dict,
                round_to=export_rounding(settings),
            )
        small = result.model.to(pl_module.device)
        self.state.shrink_record = {
            **shrink_record(result),
            "network_prefix": network_prefix(pl_module),
            "notes": [str(note) for note in result.notes],
            "dense": dense,  # the final report's dense column: no full-size model is left by then
        }
        if verify:  # FSDP2: the sharded module's forward is collective, and every rank runs it here
            verify_on_batches(pl_module, small, [(example, None)], settings.rtol)
        return small

    def replay(self, trainer: Any, pl_module: Any, saved: dict[str, Any]) -> None:
        """Before a checkpoint taken after the shrink loads: shrink the module as ``saved`` (its
        callback state) records, so the small weights fit."""
        self.state.masks = saved["masks"]
        record = saved.get("pruned")
        if record is None:  # saved before the record existed: shrink as the masks say
            self.shrink(trainer, pl_module, rebuild_optimizers=False)  # the weights come from the checkpoint next
            return
        layout = ShardLayout.of(pl_module) if uses_fsdp2(trainer) else None
        if layout is not None:  # the small layers built on meta, then sharded as the full ones were
            small = replay_shrink(skeleton(pl_module), record["layers"], record["heads"], "the resumed checkpoint")
            materialize(small, pl_module.device)
            _put_in(pl_module, small)
            self._settle(trainer, pl_module, layout, rebuild=False)
        else:
            replay_shrink(pl_module, record["layers"], record["heads"], "the resumed checkpoint")
            self._at_pruned_size()
        self.state.shrink_record = record

    def _at_pruned_size(self) -> None:
        self.state.hold, self.state.shrunk, self.state.graph = None, True, None


def _put_in(pl_module: Any, small: torch.nn.Module) -> None:
    """``small``'s children in place of ``pl_module``'s (the module object the trainer holds stays)."""
    for name, child in list(pl_module.named_children()):
        replacement = small.get_submodule(name)
        if replacement is not child:
            setattr(pl_module, name, replacement)


def _dense_size(trainer: Any, pl_module: Any, example: Any) -> dict[str, int]:
    """The full-size module's parameters (and, where its forward is not collective, its MACs on one
    sample), as :func:`compare_models` counts them, for the report at the end of a pruned-size fine-tune."""
    if read_sharded(trainer, pl_module):  # the full shapes on meta; a sharded forward is collective
        return {"params_dense": count_params(skeleton(pl_module))}
    return {"params_dense": count_params(pl_module), "macs_dense": count_macs(pl_module, first_sample(example))}


def _several_ranks(trainer: Any) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def _rank_zeros(trainer: Any, pl_module: Any, example: Any) -> Any:
    """Rank zero's example input on every rank (each may have read its own first batch): the
    trace, and the constants found on it, are then the same everywhere."""
    if not _several_ranks(trainer):
        return example
    on_cpu = tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, example)
    return prepare(trainer, pl_module, trainer.strategy.broadcast(on_cpu, src=0))


def _digest(model: torch.nn.Module) -> str:
    """A SHA-256 of ``model``'s state dict: every name, dtype, shape and byte."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _same_on_every_rank(trainer: Any, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` on every rank, which then learn whether every rank built it, and built the same
    model, before any rank changes its module: an error on one rank is an error on all (never a
    hang at the next collective), and so are ranks that differ."""
    if not _several_ranks(trainer):
        return build()
    model, own_error, outcome = None, None, None
    try:
        model = build()
        outcome = ("model", _digest(model))
    except Exception as err:  # every rank must reach the gather below, whatever this one hit
        own_error, outcome = err, ("error", f"{type(err).__name__}: {err}")
    outcomes: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(outcomes, outcome)
    if own_error is not None:
        raise own_error
    failed = [(rank, message) for rank, (kind, message) in enumerate(outcomes) if kind == "error"]
    if failed:
        rank, message = failed[0]
        raise PruneExportError(
            f"`PruneExportCallback(finetune='pruned')`: rank {rank} could not build the pruned model ({message}); "
            "every rank stops here, with its full-size layers in place."
        )
    differ = [rank for rank, (_, digest) in enumerate(outcomes) if digest != outcomes[0][1]]
    if differ:
        raise PruneExportError(
            f"`PruneExportCallback(finetune='pruned')`: ranks {differ} built a pruned model that differs from "
            "rank 0's (the digests of their state dicts differ): their modules differed before the shrink, "
            "though DDP keeps them in step (a change made on some ranks only, outside the optimizer step?). "
            "HINT: change the module the same way on every rank, or use finetune='masked'."
        )
    return model


def _wrap_again(trainer: Any, pl_module: Any) -> None:
    """Under DDP: wrap the module in ``DistributedDataParallel`` again (as the strategy first did),
    so the gradients of its new parameters are all-reduced; the old wrapper holds the old ones."""
    strategy = trainer.strategy
    if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
        strategy.model = pl_module
        strategy.configure_ddp()


def _rebuild_optimizers(trainer: Any) -> None:
    """Optimizers and schedulers from ``configure_optimizers`` again, for the module's new parameters;
    each param group's settings (learning rate, ...) and each scheduler's state carry over."""
    strategy = trainer.strategy
    old_optimizers, old_schedulers = list(strategy.optimizers), list(strategy.lr_scheduler_configs)
    strategy.setup_optimizers(trainer)
    for old, new in zip(old_optimizers, strategy.optimizers, strict=False):
        if len(old.param_groups) == len(new.param_groups):
            for old_group, new_group in zip(old.param_groups, new.param_groups, strict=True):
                new_group.update({k: v for k, v in old_group.items() if k != "params"})
    for old, new in zip(old_schedulers, strategy.lr_scheduler_configs, strict=False):
        new.scheduler.load_state_dict(old.scheduler.state_dict())


__all__ = ["Resizing"]
