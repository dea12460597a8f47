"""``finetune="pruned"``: fine-tuning at the pruned size.

After the last pruning step the module is exported and verified, its smaller layers replace the
full-size ones inside the user's LightningModule, and the optimizers are rebuilt for the new
parameters (learning rates and scheduler state carried over). A resumed run replays the same
shrink from the checkpoint's record before the small weights are loaded.
"""

from __future__ import annotations

from typing import Any

from lightning_prune.core.errors import ConfigurationError
from lightning_prune.core.export import export
from lightning_prune.core.files.checkpoint import replay_shrink, shrink_record
from lightning_prune.core.verify.equivalence import verify_on_batches
from lightning_prune.lightning.compat import info
from lightning_prune.lightning.exporting import export_rounding
from lightning_prune.lightning.inputs import example_input, network_prefix
from lightning_prune.lightning.state import PruneState


class Resizing:
    """The shrink of one callback's module: ``settings`` is the callback (its arguments and public
    properties are read), ``state`` its :class:`~lightning_prune.lightning.state.PruneState`."""

    def __init__(self, settings: Any, state: PruneState) -> None:
        self.settings, self.state = settings, state

    def check_strategy(self, trainer: Any) -> None:
        """``finetune="pruned"`` replaces layers while training: single-device strategies only."""
        strategy = type(trainer.strategy).__name__
        if self.settings.finetune == "pruned" and strategy != "SingleDeviceStrategy":
            raise ConfigurationError(
                f"`PruneExportCallback(finetune='pruned')` replaces layers inside the module while training, which "
                f"this version supports on a single device only; the trainer uses {strategy}. "
                "HINT: use finetune='masked' (the default) under this strategy."
            )

    def shrink(self, trainer: Any, pl_module: Any, rebuild_optimizers: bool = True) -> None:
        """Export now and put the smaller layers into the module itself; with ``rebuild_optimizers``
        (the masked model is live, not about to be overwritten by a checkpoint) verify the small
        model against it and give the optimizers the new parameters."""
        state = self.state
        example = example_input(trainer, pl_module, self.settings.example_input, self.settings.input_key)
        paused = state.distiller is not None and state.distiller.attached
        if paused:
            state.distiller.detach()  # the copy export makes must not carry the hooks
        try:
            result = export(
                pl_module,
                state.masks,
                example,
                inplace_dict=self.settings.inplace_dict,
                round_to=export_rounding(self.settings),
            )
            small = result.model.to(pl_module.device)
            state.shrink_record = {
                **shrink_record(result),
                "network_prefix": network_prefix(pl_module),
                "notes": [str(note) for note in result.notes],
            }
            if rebuild_optimizers:
                verify_on_batches(pl_module, small, [(example, None)], self.settings.rtol)
            before = sum(p.numel() for p in pl_module.parameters())
            for name, child in list(pl_module.named_children()):
                replacement = small.get_submodule(name)
                if replacement is not child:
                    setattr(pl_module, name, replacement)
        finally:
            if paused:
                state.distiller.attach(pl_module)
        self._at_pruned_size()
        if rebuild_optimizers:
            _rebuild_optimizers(trainer)
            after = sum(p.numel() for p in pl_module.parameters())
            info(
                trainer,
                f"PruneExportCallback: fine-tuning at the pruned size from here: {after:,} parameters (was {before:,}).",
            )

    def replay(self, trainer: Any, pl_module: Any, saved: dict[str, Any]) -> None:
        """Before a checkpoint taken after the shrink loads: shrink the module as ``saved`` (its
        callback state) records, so the small weights fit."""
        self.state.masks = saved["masks"]
        record = saved.get("pruned")
        if record is None:  # saved before the record existed: shrink as the masks say
            self.shrink(trainer, pl_module, rebuild_optimizers=False)  # the weights come from the checkpoint next
            return
        replay_shrink(pl_module, record["layers"], record["heads"], "the resumed checkpoint")
        self.state.shrink_record = record
        self._at_pruned_size()

    def _at_pruned_size(self) -> None:
        self.state.hold, self.state.shrunk, self.state.graph = None, True, None


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
