"""PruneExportCallback: prune, fine-tune masked, export, verify, save and log, from one callback.

Hooks only, a few lines each; the work is in one unit per concern beside this module, over one
:class:`~lightning_prune.lightning.state.PruneState` (the units: ``docs/architecture.md``)::

    trainer = Trainer(callbacks=[PruneExportCallback(pruner="fpgm", sparsity=0.5)])
    trainer.fit(module, datamodule)   # prune -> masked fine-tune -> export -> verify -> save

Derived from the ``Callback`` of each Lightning namespace installed, so either ``Trainer`` accepts it."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from typing_extensions import override

from lightning_prune.core.errors import ConfigurationError, PruneExportError
from lightning_prune.core.graph.importance import IMPORTANCES
from lightning_prune.core.graph.inplace_dict import load_inplace_dict
from lightning_prune.core.graph.pruners import build_config_list
from lightning_prune.lightning.checks import check_epochs, validate_arguments
from lightning_prune.lightning.compat import callback_bases, warn
from lightning_prune.lightning.distill import distill_settings
from lightning_prune.lightning.exporting import Exporting
from lightning_prune.lightning.handoff import Handoff
from lightning_prune.lightning.pruning import CALIBRATION_BATCHES, Pruning
from lightning_prune.lightning.recovery import Recovery
from lightning_prune.lightning.resize import Resizing
from lightning_prune.lightning.schedule import Schedule
from lightning_prune.lightning.state import PruneState, StateField


class PruneExportCallback(*callback_bases()):  # type: ignore[misc]
    r"""Prune channels, hold them at zero while fine-tuning, and export a smaller, verified model.

    Args:
        pruner: ``"auto"`` (the masks given in ``masks``, else ``"fpgm"``); our own measures over whole coupled groups
            (:mod:`~lightning_prune.core.graph.importance`): ``"l1"``, ``"l2"``, ``"fpgm"``, ``"bn_scale"``, ``"taylor"``
            (gradients of the training steps before each pruning step: needs ``prune_on_epoch >= 1`` or a schedule
            from epoch 1 on), ``"activation"`` (what each channel carries in those steps' forward passes, as the layers
            reading it see it; at fit start, on ``calibration_batches`` training batches); ``"nni-fpgm"``, ``"nni-l1"``,
            ``"nni-l2"`` (NNI 3.0's per-layer pruners, made group-consistent); an NNI pruner object you built; or
            ``None``: masks read from the model (``torch.nn.utils.prune`` buffers as ``ModelPruning`` leaves them, or zeroed filters).
        sparsity: fraction of channels to prune in each targeted layer (named pruners only). With
            ``ranking="global"``: the fraction of all targeted channel groups, spread over the layers by score.
        op_types, op_names, exclude_op_names: which layers a named pruner prunes, and which to skip (paths
            from the LightningModule, as ``named_modules()`` gives them). A coupled group is pruned only
            when all its layers are targeted.
        config_list: a full NNI ``config_list`` instead (NNI 2.x's ``"sparsity"`` key accepted).
        masks: masks (any form :func:`~lightning_prune.collect_masks` takes) or a path to a mask file.
        inplace_dict: ``"auto"`` (inferred), a dict giving each layer's input producers in concat
            order (``None``: the network input), or a path to such a dict in YAML/JSON.
        example_input: a tensor, a tuple of positional inputs, a dict of keyword inputs, or a list of
            ints (the shape of a random tensor), for tracing; default: the module's
            ``example_input_array``, else the input of the first validation (or training) batch.
        input_key: for dict batches, the key holding the model input, passed by name when ``forward``
            takes it, else positionally.
        prune_on_epoch: ``0`` prunes when training starts (after a checkpoint is restored, so a resumed
            dense model is ranked on its trained weights); ``k`` trains dense for ``k`` epochs first.
        ranking: ``"uniform"`` (each layer, or set of coupled layers, loses ``sparsity``) or ``"global"``
            (every group ranked together); our own measures only.
        min_channels: the fewest channels (coupled groups) any pruned layer keeps; our own measures only.
        calibration_batches: ``pruner="activation"``: training batches run forward (no gradients, evaluation mode, the
            training's data order unchanged) for a pruning step no training step precedes; default 8.
        schedule: prune gradually: ``{"start_epoch": 1, "end_epoch": 6, "steps": 5, "ramp": "cubic"}``
            prunes at the start of ``steps`` epochs from ``start_epoch`` to ``end_epoch``, the sparsity
            rising on a cubic (AGP) or ``"linear"`` ramp; each step's masks contain the previous step's;
            a resumed run continues the schedule (:mod:`~lightning_prune.lightning.schedule`). Our own measures only.
        distill: ``True`` or ``{"weight": 0.5, "temperature": 4.0, "teacher": "first_step"}``: add
            ``weight * T**2 * KL(teacher || student)`` to your training loss once the teacher exists, a frozen
            copy of the network made just before the first pruning step (``"fit_start"``: as training starts,
            for a fit from trained weights; FSDP2: sharded as the network is; :mod:`~lightning_prune.lightning.distill`); checkpointed.
        finetune: ``"masked"`` (fine-tune at full size, the pruned channels held at zero) or ``"pruned"``: export after
            the last pruning step (verified), put the smaller layers into your module, rebuild the optimizers (learning
            rates and scheduler state carried over) and fine-tune the smaller model, which checkpoints then hold;
            ``load_pruned_module(path, YourModule)`` loads either file or such a checkpoint. One device, ``"ddp"`` or FSDP2.
        export_dir: where files go; default ``<trainer log dir>/pruned``. Checked writable in ``setup``.
        on_failure: ``"raise"`` or ``"warn"`` when export or verification fails.
        rtol: relative error allowed between masked and exported outputs.
        group_consistent: align masks within each coupled group (residual adds, concatenations),
            keeping each source's amount, so export loses no sparsity to unions.
        round_to: keep a multiple of this many channels in each pruned layer (a named pruner's count
            rounded down, never below it; your masks get channels added back). Default: 8 for a pruner
            named here (ONNX Runtime's fast CPU layouts, GPU tensor cores), 1 for your own masks.
        whole_channel: zero a pruned filter's bias and the norms it feeds before export (``function_change``).
        deploy_formats: also write ``pruned.onnx`` (``"onnx"``, needs ``lightning-prune[deploy]``) and/or
            ``pruned.pt2`` (``"pt2"``, ``torch.export``), each checked on the verification batches.
        verify_batches: how many validation batches verification runs (``0``: the example input only).
        measure_latency: time the dense and exported models for the report (``False``: sizes and errors only).
        gather_full_state: export from a fresh module built from the hyper-parameters and the full gathered state;
            default: under FSDP and DeepSpeed (FSDP2: the export reads the shards a module at a time).

    Under ``fast_dev_run`` the export is made and verified in memory, no file written. Training ended before the
    schedule's last step (EarlyStopping) exports the partial masks (the report: ``schedule_complete: False``).

    After ``fit``: ``exported_model`` (a copy of your LightningModule with smaller layers), ``exported_network``
    (the network in it holding the layers, what you deploy) and ``report`` (its figures), also in the launching
    process of a ``ddp_spawn`` run. A second ``fit`` on another model starts afresh; on the same model it
    continues with the same masks. The guide, every argument in use: ``docs/callback.md``.
    """

    masks = StateField()  #: the masks in effect (``None`` before the first pruning step)
    hold = StateField()  #: the :class:`~lightning_prune.core.graph.hold.MaskHold` keeping them at zero
    steps_done = StateField()  #: pruning steps taken (the schedule's position; 1 after a one-shot prune)
    shrunk = StateField()  #: ``finetune="pruned"``: the smaller layers are in the module
    taylor = StateField()  #: the Taylor sums of ``pruner="taylor"``
    activations = StateField()  #: the activation sums of ``pruner="activation"``
    _distiller = StateField()

    def __init__(
        self,
        pruner: str | Any | None = "auto",
        sparsity: float = 0.5,
        op_types: list[str] | None = None,
        op_names: list[str] | None = None,
        exclude_op_names: list[str] | None = None,
        config_list: list[dict[str, Any]] | None = None,
        masks: dict[str, Any] | str | None = None,
        inplace_dict: str | dict[str, Any] = "auto",
        example_input: torch.Tensor | list[int] | tuple | dict[str, Any] | None = None,
        input_key: str | None = None,
        prune_on_epoch: int = 0,
        export_dir: str | None = None,
        on_failure: str = "raise",
        rtol: float = 1e-5,
        group_consistent: bool = True,
        round_to: int | None = None,
        whole_channel: bool = False,
        deploy_formats: list[str] | None = None,
        verify_batches: int = 4,
        measure_latency: bool = True,
        gather_full_state: bool | None = None,
        ranking: str = "uniform",
        min_channels: int = 1,
        schedule: dict[str, Any] | None = None,
        distill: bool | dict[str, float | str] | None = None,
        finetune: str = "masked",
        calibration_batches: int | None = None,
    ) -> None:
        validate_arguments(**{name: value for name, value in locals().items() if name != "self"})
        self.pruner = pruner
        self.sparsity = float(sparsity)
        config_argument = "config_list" if config_list is not None else "op_names/op_types"
        self.config_list = build_config_list(
            self.sparsity, op_types or ["Conv2d"], op_names, exclude_op_names, config_list
        )
        self.mask_source = masks
        try:  # a file's contents are read now, not after training
            self.inplace_dict = None if inplace_dict == "auto" else load_inplace_dict(inplace_dict)
        except PruneExportError as err:
            raise ConfigurationError(f"`PruneExportCallback(inplace_dict={inplace_dict!r})`: {err}") from err
        self.example_input, self.input_key, self.prune_on_epoch = example_input, input_key, prune_on_epoch
        self._export_dir_argument = self.export_dir = export_dir
        self.on_failure, self.rtol = on_failure, rtol
        self.group_consistent, self.round_to, self.whole_channel = group_consistent, round_to, whole_channel
        self.deploy_formats, self.verify_batches = list(deploy_formats or []), verify_batches
        self.measure_latency, self.gather_full_state = measure_latency, gather_full_state
        self.ranking, self.min_channels = ranking, min_channels
        self.calibration_batches = CALIBRATION_BATCHES if calibration_batches is None else calibration_batches
        self.schedule = Schedule.from_argument(schedule) if schedule is not None else None
        self.distill, self.finetune = distill_settings(distill), finetune
        self._state = PruneState()
        self._handoff = Handoff()
        self._pruning = Pruning(self, self._state, config_argument)
        self._exporting = Exporting(self, self._state)
        self._resizing = Resizing(self, self._state)
        self._recovery = Recovery(self, self._state, self._resizing)

    @property
    def rounding(self) -> int:
        """The ``round_to`` in effect: as given, else 8 for a pruner named here and 1 for widths you chose."""
        return self.round_to if self.round_to is not None else 8 if self.pruner_name is not None else 1

    @property
    def pruner_name(self) -> str | None:
        """The pruner run by name (ours, or ``"nni-..."``), or ``None`` (a pruner object, given or the model's masks)."""
        if self.pruner == "auto":
            return None if self.mask_source is not None else "fpgm"
        return self.pruner if isinstance(self.pruner, str) else None

    @property
    def importance(self) -> str | None:
        """Our own importance measure in use, or ``None`` (NNI, a pruner object, masks)."""
        return self.pruner_name if self.pruner_name in IMPORTANCES else None

    @property
    def report(self) -> dict[str, Any]:
        """Params, MACs, latency, errors and accuracy before and after export, and the checkpoint path."""
        self._handoff.receive(self._state)
        return self._state.report

    @property
    def exported_model(self) -> torch.nn.Module | None:
        """A copy of the LightningModule with physically smaller layers (``None`` before export)."""
        self._handoff.receive(self._state)
        return self._state.exported_model

    @property
    def exported_network(self) -> torch.nn.Module | None:
        """The network in :attr:`exported_model` holding every parameter (``module.model``), else the module itself."""
        model = self.exported_model
        return model.get_submodule(self._state.network_prefix) if model is not None else None

    @property
    @override
    def state_key(self) -> str:
        pruner = self.pruner if isinstance(self.pruner, (str, type(None))) else type(self.pruner).__name__
        return self._generate_state_key(pruner=pruner, sparsity=self.sparsity, prune_on_epoch=self.prune_on_epoch)

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_epochs(trainer, self.schedule, self.prune_on_epoch)
        if not self._state.is_for(pl_module):
            self._state.reset()  # a new model: the masks and figures of the previous fit are not its own
        self._state.module = weakref.ref(pl_module)
        self.export_dir = self._exporting.directory(trainer, self._export_dir_argument)
        self._pruning.setup(trainer, pl_module)
        self._exporting.check(trainer, pl_module)
        self._recovery.setup(trainer, pl_module)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._recovery.stop()
        self._pruning.stop()

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # after a checkpoint is restored: a dense one is ranked on its own weights
        self._recovery.remove_hook()
        self._resizing.check_layout(trainer, pl_module)  # FSDP2: configure_model has sharded it by now
        if self.masks is not None and self.hold is None and not self.shrunk:  # restored masks, or a second fit
            self._pruning.hold(trainer, pl_module)
        self._recovery.resume_teacher(trainer, pl_module)
        self._prune_due(trainer, pl_module, trainer.current_epoch)
        self._pruning.watch(trainer, pl_module)  # pruner="activation": the training steps' activations

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.fit_loop.done:  # else no next epoch (EarlyStopping): a step now would never be fine-tuned
            self._prune_due(trainer, pl_module, trainer.current_epoch + 1)  # the start of the next epoch

    def _prune_due(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        for step in self._pruning.due(epoch):
            self._prune(trainer, pl_module, step)

    def _prune(self, trainer: Any, pl_module: Any, step: int = 1) -> None:
        """Step ``step``: the teacher (from the dense network), the masks; the last: ``finetune="pruned"`` shrinks."""
        self._recovery.start_teacher(trainer, pl_module)
        self._pruning.take(trainer, pl_module, step)
        if step == self._pruning.steps.steps and self.finetune == "pruned":
            self._resizing.shrink(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._pruning.accumulate(trainer, pl_module)
        if self.hold is not None:
            self.hold.zero_grads()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hold is not None:
            self.hold.apply()

    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._recovery.save(trainer, pl_module, checkpoint)

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._recovery.stop()
        self._pruning.stop()
        if not self._exporting.ready(trainer):
            return
        error = self._exporting.run(trainer, pl_module)
        if error is None:
            self._handoff.send(trainer, self._state)
        elif self.on_failure == "raise":
            raise PruneExportError(error)
        else:
            warn(trainer, f"PruneExportCallback: export failed: {error}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._recovery.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._recovery.load_state_dict(state_dict)

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if (saved := self._recovery.saved_state(checkpoint)) is not None:  # version 0.1.0's, under another key
            self.load_state_dict(saved)


__all__ = ["PruneExportCallback"]
