"""What survives a resume, and the teacher distillation learns from.

The callback's checkpoint state (``state_dict``): the masks, the schedule's position, whether the
module was shrunk and how (``finetune="pruned"``), the Taylor sums, the activation sums, the teacher's weights. Under FSDP2
a distributed checkpoint keeps the callback's state from rank zero alone, so a sharded teacher's shards
go beside the module's instead, each rank writing and reading its own. Some of the state must be in
place before Lightning loads the module's weights (a shrunk module's smaller layers, the teacher copied
from the dense network): a hook on the module's ``on_load_checkpoint`` does that
early restore, and is taken off again once restoring is over.
"""

from __future__ import annotations

from typing import Any

from lightning_prune.core.errors import ConfigurationError
from lightning_prune.core.sharded import is_sharded
from lightning_prune.lightning.compat import info
from lightning_prune.lightning.distill import Distiller
from lightning_prune.lightning.inputs import network_prefix
from lightning_prune.lightning.resharding import before_strategy_load
from lightning_prune.lightning.resize import Resizing
from lightning_prune.lightning.schedule import Schedule
from lightning_prune.lightning.sharding import load_teacher_shards, same_buffers, save_teacher, uses_fsdp2
from lightning_prune.lightning.state import PruneState


class Recovery:
    """Resume and distillation for one callback: ``settings`` is the callback (its arguments and
    public properties are read), ``state`` its :class:`~lightning_prune.lightning.state.PruneState`,
    ``resizing`` the unit that shrinks the module when a checkpoint holds the small one."""

    def __init__(self, settings: Any, state: PruneState, resizing: Resizing) -> None:
        self.settings, self.state, self.resizing = settings, state, resizing
        self._hook: tuple[Any, str] | None = None  # (the module or strategy, the method) while ours is on it

    # ------------------------------------------------------------ the checkpoint's state
    def state_dict(self) -> dict[str, Any]:
        """The callback's state in a checkpoint (keys kept stable: older checkpoints resume)."""
        state = self.state
        saved: dict[str, Any] = {
            "masks": {k: v.cpu() for k, v in state.masks.items()} if state.masks is not None else None,
            "steps_done": state.steps_done,
            "shrunk": state.shrunk,
        }
        if self.settings.importance == "taylor":
            saved["taylor"] = state.taylor.state_dict()
        if self.settings.importance == "activation":
            saved["activation"] = state.activations.state_dict()
        if state.shrunk and state.shrink_record is not None:
            saved["pruned"] = state.shrink_record  # what `load_pruned_module("last.ckpt", ...)` replays
        teacher = self._teacher()
        if teacher is not None and not is_sharded(teacher):  # a sharded one: see `save_teacher`
            saved["teacher"] = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
        return saved

    def save(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """As a checkpoint is written, under FSDP2 (collective): rank zero's norm statistics on every rank
        (a distributed checkpoint keeps one rank's), and a sharded teacher's shards beside the module's
        (the callback's state is rank zero's alone there); under ``torch.distributed`` (collective) the
        activation sums of every rank, as each rank's share."""
        same_buffers(trainer, pl_module)
        teacher = self._teacher()
        saved = checkpoint.get("callbacks", {}).get(self.settings.state_key)
        if saved is not None and "activation" in saved:  # each rank's own batches: their share of the total
            saved["activation"] = self.state.activations.shared_state()
        if teacher is not None and saved is not None and is_sharded(teacher):
            save_teacher(trainer, teacher, checkpoint, saved)

    def _teacher(self) -> Any:
        return self.state.distiller.teacher if self.state.distiller is not None else None

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take the state :meth:`state_dict` saved (or version 0.1.0 did)."""
        state = self.state
        state.masks = saved.get("masks")
        state.hold = None
        # saved by 0.1.0, which pruned once: masks mean the one step was taken
        steps = Schedule.of(self.settings.schedule, self.settings.prune_on_epoch).steps
        state.steps_done = saved.get("steps_done", 0 if state.masks is None else steps)
        state.shrunk = bool(saved.get("shrunk", False)) or state.shrunk
        state.taylor.load_state_dict(saved.get("taylor") or {})
        state.activations.load_state_dict(saved.get("activation") or {})
        state.teacher_state = saved.get("teacher")
        state.shrink_record = saved.get("pruned") or state.shrink_record

    def saved_state(self, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        """This callback's state in a checkpoint written by version 0.1.0 (keyed by the class name),
        when the checkpoint has none under the current ``state_key``."""
        states = checkpoint.get("callbacks", {})
        if self.settings.state_key in states:
            return None
        return states.get(type(self.settings).__qualname__)

    # ------------------------------------------------------------ set-up and the early restore
    def setup(self, trainer: Any, pl_module: Any) -> None:
        """Distillation's hooks, and the early restore that a resumed ``finetune="pruned"`` run (or a
        saved teacher) needs before Lightning loads the checkpoint's weights into the module."""
        self.resizing.check_strategy(trainer)
        if self.settings.distill is not None:
            if not pl_module.automatic_optimization:
                raise ConfigurationError(
                    "`PruneExportCallback(distill=...)` adds its loss to what `training_step` returns, and under manual "
                    "optimization (`automatic_optimization = False`) Lightning never receives a loss. HINT: add "
                    "`lightning_prune.lightning.distill.distill_loss(student, teacher, T)` to your own loss, or leave `distill` off."
                )
            if self.state.distiller is None:
                self.state.distiller = Distiller(**self.settings.distill, network_name=network_prefix(pl_module))
            self.state.distiller.attach(pl_module)
        if self.settings.finetune == "pruned" or self.settings.distill is not None:
            if uses_fsdp2(trainer):  # its strategy loads the weights itself, before any on_load_checkpoint hook
                self._hook = before_strategy_load(
                    trainer.strategy, lambda c: self._early_restore(trainer, pl_module, c)
                )
                return
            user_hook = pl_module.on_load_checkpoint

            def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
                self._early_restore(trainer, pl_module, checkpoint)
                user_hook(checkpoint)

            pl_module.on_load_checkpoint = on_load_checkpoint
            self._hook = (pl_module, "on_load_checkpoint")

    def _early_restore(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Before the weights load: rebuild the teacher from its saved state, and shrink the module
        when the checkpoint holds the small one."""
        saved = checkpoint.get("callbacks", {}).get(self.settings.state_key) or {}
        distiller = self.state.distiller
        if distiller is not None and saved.get("teacher") is not None:
            distiller.make_teacher(distiller.network_of(pl_module), saved["teacher"])
        elif distiller is not None and saved.get("teacher_shards") is not None:  # FSDP2: in the distributed checkpoint
            load_teacher_shards(
                trainer, distiller.make_teacher(distiller.network_of(pl_module)), saved["teacher_shards"]
            )
        if saved.get("shrunk") and not self.state.shrunk:
            self.resizing.replay(trainer, pl_module, saved)

    def remove_hook(self) -> None:
        """Take the early-restore hook off the module once restoring is over: nothing of ours that
        holds the trainer stays on it (a copy of it pickles under ``ddp_spawn``)."""
        if self._hook is not None:
            owner, attribute = self._hook
            vars(owner).pop(attribute, None)
            self._hook = None

    def stop(self) -> None:
        """Training is over: the distiller's hooks and the early-restore hook come off the module."""
        if self.state.distiller is not None:
            self.state.distiller.detach()  # the copies export makes carry no hook
        self.remove_hook()

    # ------------------------------------------------------------ the teacher
    def resume_teacher(self, trainer: Any, pl_module: Any) -> None:
        """When training starts: the teacher a checkpoint saved, if none was built before the weights
        loaded; else, with ``distill={"teacher": "fit_start"}``, a copy of the network now."""
        distiller = self.state.distiller
        if distiller is not None and distiller.teacher is None and self.state.teacher_state is not None:
            distiller.make_teacher(distiller.network_of(pl_module), self.state.teacher_state)
        if distiller is not None and distiller.teacher_from == "fit_start":
            self.start_teacher(trainer, pl_module)

    def start_teacher(self, trainer: Any, pl_module: Any) -> None:
        """Before the first pruning step: the teacher is a frozen copy of the dense network."""
        distiller = self.state.distiller
        if distiller is None or distiller.teacher is not None:
            return
        distiller.make_teacher(distiller.network_of(pl_module))
        info(
            trainer,
            f"PruneExportCallback: distilling from a frozen copy of {distiller.where()} "
            f"({distiller.teacher_megabytes():.1f} MiB on each device).",
        )


__all__ = ["Recovery"]
