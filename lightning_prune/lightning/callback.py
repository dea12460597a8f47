"""PruneExportCallback: prune, fine-tune masked, export, verify, save and log, from one callback.

Thin Lightning glue over the core (:mod:`~lightning_prune.core.graph.masks`, :mod:`~lightning_prune.core.export`,
:mod:`~lightning_prune.core.verify.equivalence`, :mod:`~lightning_prune.core.files.checkpoint`)::

    trainer = Trainer(callbacks=[PruneExportCallback(pruner="fpgm", sparsity=0.5)])
    trainer.fit(module, datamodule)   # prune -> masked fine-tune -> export -> verify -> save

The class derives from the ``Callback`` of every Lightning namespace installed
(``pytorch_lightning`` and ``lightning.pytorch``), so either ``Trainer`` accepts it.
"""

from __future__ import annotations

import copy
import os
import time
import weakref
from typing import Any

import torch
from typing_extensions import override

from lightning_prune.core.errors import ConfigurationError, InplaceDictError, MaskError, PruneExportError
from lightning_prune.core.export import export
from lightning_prune.core.files.atomic import remove_stale_temporaries, temporary_path
from lightning_prune.core.files.checkpoint import replay_shrink, save_pruned, shrink_record
from lightning_prune.core.files.deploy import save_deployables
from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.groups import group_masks
from lightning_prune.core.graph.hold import MaskHold
from lightning_prune.core.graph.importance import IMPORTANCES, TaylorScores, importance_masks
from lightning_prune.core.graph.inplace_dict import check_inplace_dict, load_inplace_dict
from lightning_prune.core.graph.masks import Masks, collect_masks, make_pruning_permanent
from lightning_prune.core.graph.pruners import build_config_list, layers_to_prune, masks_from_pruner, nni_masks
from lightning_prune.core.verify.batches import split_batch
from lightning_prune.core.verify.equivalence import verify_on_batches
from lightning_prune.core.verify.report import compare_models, format_report
from lightning_prune.lightning.checks import NNI_NAMES, check_epochs, is_sharded, validate_arguments, writable_problem
from lightning_prune.lightning.compat import Handoff, callback_bases, info, warn
from lightning_prune.lightning.data import first_batches
from lightning_prune.lightning.distill import Distiller, distill_settings
from lightning_prune.lightning.schedule import Schedule

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class PruneExportCallback(*callback_bases()):  # type: ignore[misc]
    r"""Prune channels, hold them at zero while fine-tuning, and export a smaller, verified model.

    Args:
        pruner: ``"auto"`` (the masks given in ``masks``, else ``"fpgm"``); this package's own
            importance measures, each scoring whole coupled groups (:mod:`~lightning_prune.core.graph.importance`):
            ``"l1"``, ``"l2"``, ``"fpgm"``, ``"bn_scale"`` or ``"taylor"`` (gradients of the training
            steps before each pruning step, so it needs ``prune_on_epoch >= 1`` or a schedule starting
            at epoch 1 or later); ``"nni-fpgm"``, ``"nni-l1"``, ``"nni-l2"`` (NNI 3.0's per-layer one-shot
            pruners, made group-consistent afterwards); an NNI pruner object you built; or ``None`` to
            read masks from the model itself (``torch.nn.utils.prune`` buffers as Lightning's
            ``ModelPruning`` leaves them, or zeroed filters).
        sparsity: fraction of channels to prune in each targeted layer (named pruners only; a
            pruner object or given masks keep their own amount). With ``ranking="global"``: the
            fraction of all targeted channel groups, spread over the layers by score: after a
            schedule's last step, that amount (within ``round_to / 2`` groups when rounding).
        op_types, op_names, exclude_op_names: which layers a named pruner prunes (names are paths
            from the LightningModule, as ``named_modules()`` gives them); ``exclude_op_names`` are the
            layers to skip. A coupled group is pruned only when all its layers are targeted.
        config_list: a full NNI ``config_list`` instead (NNI 2.x's ``"sparsity"`` key accepted).
        masks: masks (any form :func:`~lightning_prune.collect_masks` takes) or a path to a mask file.
        inplace_dict: ``"auto"`` (inferred), a dict giving each layer's input producers in concat
            order (``None``: the network input), or a path to such a dict in YAML/JSON.
        example_input: a tensor, a tuple of positional inputs or a dict of keyword inputs (or a
            list of ints: the shape of a random tensor) for tracing; default: the module's
            ``example_input_array``, else the input of the first validation (or training) batch.
        input_key: for dict batches, the one key holding the model input: passed by that name when the
            module's ``forward`` takes it (or ``**kwargs``), else positionally (:mod:`~lightning_prune.core.verify.batches`).
        prune_on_epoch: ``0`` prunes when training starts (after any checkpoint is restored, so a
            resumed dense model is ranked on its trained weights); ``k`` trains dense for ``k`` epochs first.
        ranking: ``"uniform"`` (each layer, or each set of coupled layers, loses ``sparsity`` of its
            channels) or ``"global"`` (every group of the model ranked together, so layers whose
            channels score high keep more); our own measures only.
        min_channels: the fewest channels (coupled groups) any pruned layer keeps; our own measures only.
        schedule: prune gradually: ``{"start_epoch": 1, "end_epoch": 6, "steps": 5, "ramp": "cubic"}``
            prunes at the start of ``steps`` epochs spread from ``start_epoch`` to ``end_epoch``, the
            sparsity rising on a cubic (AGP) or ``"linear"`` ramp to ``sparsity``; each step's masks
            contain the previous step's; the position is saved in checkpoints, so a resumed run
            continues the schedule (:mod:`~lightning_prune.lightning.schedule`). Our own measures only.
        distill: ``True`` or ``{"weight": 0.5, "temperature": 4.0}``: from the first pruning step on,
            add ``weight * T**2 * KL(teacher || student)`` to your training loss, the teacher being a
            frozen copy of the network made just before that step; your ``training_step`` is unchanged
            (how the outputs are found: :mod:`~lightning_prune.lightning.distill`). The teacher is
            saved in checkpoints so a resume keeps it.
        finetune: ``"masked"`` (fine-tune at full size with the pruned channels held at zero) or
            ``"pruned"``: export right after the last pruning step (verified), put the smaller layers
            into your LightningModule, rebuild the optimizers (learning rates and scheduler state
            carried over, momentum restarts) and fine-tune the smaller model; checkpoints then hold
            the small model and resume into it; ``pruned.ckpt`` records the shrink from the original
            architecture. ``load_pruned_module(path, YourModule)`` loads either file, a Lightning
            checkpoint taken after the shrink too (``load_from_checkpoint`` cannot: it builds the
            full-size module). Single-device strategies only.
        export_dir: where files go; default ``<trainer log dir>/pruned``. Checked writable in ``setup``.
        on_failure: ``"raise"`` or ``"warn"`` when export or verification fails.
        rtol: relative error allowed between masked and exported outputs.
        group_consistent: align masks within each coupled group (residual adds, concatenations),
            keeping each source's amount, so export loses no sparsity to unions.
        round_to: keep a multiple of this many channels in each pruned layer: a named pruner's kept
            count is rounded down (never below ``round_to``), your masks get channels added back.
            Default ``None``: 8 for a pruner named here, 1 (your widths as given) for masks, a pruner
            object or ``ModelPruning``. Why 8: ONNX Runtime's CPU convolutions take their fast blocked
            layout only for multiples of 8 (16 on AVX-512), and ragged widths left a pruned MobileNetV2
            no faster than the dense model there (``benchmarks/deploy.py --ranking global``); GPU
            tensor cores want multiples of 8 too. A layer of 8 channels or fewer is then not pruned.
        whole_channel: zero a pruned filter's bias and the norm parameters it feeds before export,
            so nothing constant is left (the mask hold already does this while fine-tuning); the
            report's ``function_change`` says how much that changed the model.
        deploy_formats: also write ``pruned.onnx`` (``"onnx"``, dynamic batch axis, checked in ONNX
            Runtime) and/or ``pruned.pt2`` (``"pt2"``, ``torch.export``, runs without your code),
            each checked on the verification batches; ONNX needs ``pip install 'lightning-prune[deploy]'``.
        verify_batches: how many validation batches verification runs (``0``: the example input only).
        gather_full_state: export from a fresh module (built from the module's hyper-parameters)
            holding the full gathered state; default: only under sharded strategies (FSDP, DeepSpeed).

    Under ``fast_dev_run`` the export is made and verified in memory and no file is written. When
    training ends before the schedule's last step (EarlyStopping), the partial masks are exported
    and the report says ``schedule_complete: False``.

    After ``fit``: ``exported_model`` (a copy of your LightningModule with smaller layers),
    ``exported_network`` (the network inside it that holds the layers, what you deploy) and
    ``report`` (its figures), also in the launching process of a ``ddp_spawn`` run. A second
    ``fit`` on another model starts afresh; on the same model it continues with the same masks.
    """

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
        gather_full_state: bool | None = None,
        ranking: str = "uniform",
        min_channels: int = 1,
        schedule: dict[str, Any] | None = None,
        distill: bool | dict[str, float] | None = None,
        finetune: str = "masked",
    ) -> None:
        validate_arguments(
            pruner=pruner,
            sparsity=sparsity,
            op_types=op_types,
            op_names=op_names,
            exclude_op_names=exclude_op_names,
            config_list=config_list,
            masks=masks,
            inplace_dict=inplace_dict,
            example_input=example_input,
            input_key=input_key,
            prune_on_epoch=prune_on_epoch,
            export_dir=export_dir,
            on_failure=on_failure,
            rtol=rtol,
            group_consistent=group_consistent,
            round_to=round_to,
            whole_channel=whole_channel,
            deploy_formats=deploy_formats,
            verify_batches=verify_batches,
            gather_full_state=gather_full_state,
            ranking=ranking,
            min_channels=min_channels,
            schedule=schedule,
            distill=distill,
            finetune=finetune,
        )
        self.pruner = pruner
        self.sparsity = float(sparsity)
        self._config_argument = "config_list" if config_list is not None else "op_names/op_types"
        self.config_list = build_config_list(
            self.sparsity, op_types or ["Conv2d"], op_names, exclude_op_names, config_list
        )
        self.mask_source = masks
        try:  # a file's contents are read now, not after training
            self.inplace_dict = None if inplace_dict == "auto" else load_inplace_dict(inplace_dict)
        except PruneExportError as err:
            raise ConfigurationError(f"`PruneExportCallback(inplace_dict={inplace_dict!r})`: {err}") from err
        self.example_input = example_input
        self.input_key = input_key
        self.prune_on_epoch = prune_on_epoch
        self._export_dir_argument = export_dir
        self.export_dir = export_dir
        self.on_failure = on_failure
        self.rtol = rtol
        self.group_consistent = group_consistent
        self.round_to = round_to
        self.whole_channel = whole_channel
        self.deploy_formats = list(deploy_formats or [])
        self.verify_batches = verify_batches
        self.gather_full_state = gather_full_state
        self.ranking = ranking
        self.min_channels = min_channels
        self.schedule = Schedule.from_argument(schedule) if schedule is not None else None
        self.distill = distill_settings(distill)
        self.finetune = finetune
        self._handoff = Handoff()
        self._reset()

    def _reset(self) -> None:
        self.masks: Masks | None = None
        self.hold: MaskHold | None = None
        self._exported_model: torch.nn.Module | None = None
        self._network_prefix = ""
        self._report: dict[str, Any] = {}
        self._module: weakref.ref | None = None
        self._pruner_votes: Masks | None = None
        self.steps_done = 0  # pruning steps taken (the schedule's position; 1 after a one-shot prune)
        self.shrunk = False  # finetune="pruned": the smaller layers are in the module
        self.taylor = TaylorScores()
        self._graph: ChannelGraph | None = None
        self._distiller: Distiller | None = None
        self._teacher_state: dict[str, torch.Tensor] | None = None
        self._shrink_record: dict[str, Any] | None = None  # finetune="pruned": how the original was shrunk

    @property
    def rounding(self) -> int:
        """The ``round_to`` in effect: as given, else 8 for a pruner named here and 1 for widths you chose."""
        if self.round_to is not None:
            return self.round_to
        return 8 if self.pruner_name is not None else 1

    @property
    def _export_rounding(self) -> int:
        """What export rounds up: your widths, to :attr:`rounding`; a named pruner's masks are rounded already."""
        return 1 if self.pruner_name is not None else self.rounding

    @property
    def pruner_name(self) -> str | None:
        """The pruner this callback runs by name (one of ours, or ``"nni-..."``), or ``None`` (a pruner
        object, given masks, or the model's own)."""
        if self.pruner == "auto":
            return None if self.mask_source is not None else "fpgm"
        return self.pruner if isinstance(self.pruner, str) else None

    @property
    def importance(self) -> str | None:
        """Our own importance measure in use, or ``None`` (NNI, a pruner object, masks)."""
        return self.pruner_name if self.pruner_name in IMPORTANCES else None

    @property
    def _steps(self) -> Schedule:
        """The schedule; a one-shot prune is the schedule of one step at ``prune_on_epoch``."""
        return self.schedule or Schedule(self.prune_on_epoch, self.prune_on_epoch, 1, "linear")

    @property
    def report(self) -> dict[str, Any]:
        """Params, MACs, latency, errors and accuracy before and after export, and the checkpoint path."""
        self._receive()
        return self._report

    @property
    def exported_model(self) -> torch.nn.Module | None:
        """A copy of the LightningModule with physically smaller layers (``None`` before export)."""
        self._receive()
        return self._exported_model

    @property
    def exported_network(self) -> torch.nn.Module | None:
        """The network inside :attr:`exported_model` that holds every parameter (e.g. ``module.model``),
        or the module itself when the parameters are spread over several children."""
        model = self.exported_model
        return model.get_submodule(self._network_prefix) if model is not None else None

    @property
    @override
    def state_key(self) -> str:
        pruner = self.pruner if isinstance(self.pruner, (str, type(None))) else type(self.pruner).__name__
        return self._generate_state_key(pruner=pruner, sparsity=self.sparsity, prune_on_epoch=self.prune_on_epoch)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_epochs(trainer, self.schedule, self.prune_on_epoch)
        if self._module is not None and self._module() is not pl_module:
            self._reset()  # a new model: the masks and figures of the previous fit are not its own
        self._module = weakref.ref(pl_module)
        directory = self._export_dir_argument or os.path.join(trainer.log_dir or trainer.default_root_dir, "pruned")
        self.export_dir = trainer.strategy.broadcast(directory, src=0)
        problem = trainer.strategy.broadcast(
            writable_problem(self.export_dir) if trainer.is_global_zero else None, src=0
        )
        if problem is not None:
            raise ConfigurationError(
                f"`PruneExportCallback(export_dir={self.export_dir!r})` cannot be written: {problem}. "
                "HINT: choose a directory this process can create files in; it is checked before training so no work is lost."
            )
        if self.masks is None and self._pruner_votes is None and self._pruner_object() is not None:
            # NNI wraps the model as soon as a pruner is built on it: read its masks and unwrap now,
            # before a checkpoint is restored into the plain layers and optimizers see them.
            bound = getattr(self.pruner, "bound_model", pl_module)
            self._pruner_votes = _prefixed(masks_from_pruner(self.pruner, bound), pl_module, bound)
        self._check_against_model(trainer, pl_module)
        self._graph = None
        self._setup_recovery(trainer, pl_module)

    def _setup_recovery(self, trainer: Any, pl_module: Any) -> None:
        """Distillation's hooks, and the early restore that a resumed ``finetune="pruned"`` run (or a
        saved teacher) needs before Lightning loads the checkpoint's weights into the module."""
        if self.finetune == "pruned" and type(trainer.strategy).__name__ != "SingleDeviceStrategy":
            raise ConfigurationError(
                f"`PruneExportCallback(finetune='pruned')` replaces layers inside the module while training, which "
                f"this version supports on a single device only; the trainer uses {type(trainer.strategy).__name__}. "
                "HINT: use finetune='masked' (the default) under this strategy."
            )
        if self.distill is not None:
            if not pl_module.automatic_optimization:
                raise ConfigurationError(
                    "`PruneExportCallback(distill=...)` adds its loss to what `training_step` returns, and under manual "
                    "optimization (`automatic_optimization = False`) Lightning never receives a loss. HINT: add "
                    "`lightning_prune.lightning.distill.distill_loss(student, teacher, T)` to your own loss, or leave `distill` off."
                )
            if self._distiller is None:
                self._distiller = Distiller(**self.distill, network_name=_network_prefix(pl_module))
            self._distiller.attach(pl_module)
        if self.finetune == "pruned" or self.distill is not None:
            user_hook = pl_module.on_load_checkpoint

            def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
                self._early_restore(trainer, pl_module, checkpoint)
                user_hook(checkpoint)

            pl_module.on_load_checkpoint = on_load_checkpoint
            self._restore_hook = (pl_module, user_hook)

    def _early_restore(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Called by the module's ``on_load_checkpoint``, before the weights are loaded: rebuild the
        teacher from its saved state and shrink the module when the checkpoint holds the small one."""
        state = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        if self._distiller is not None and state.get("teacher") is not None:
            self._distiller.make_teacher(self._network(pl_module), state["teacher"])
        if state.get("shrunk") and not self.shrunk:
            self.masks = state["masks"]
            record = state.get("pruned")
            if record is None:  # saved before the record existed: shrink as the masks say
                self._shrink(trainer, pl_module, rebuild_optimizers=False)  # the weights come from the checkpoint next
                return
            replay_shrink(pl_module, record["layers"], record["heads"], "the resumed checkpoint")
            self._shrink_record = record
            self.hold, self.shrunk, self._graph = None, True, None

    def _remove_restore_hook(self) -> None:
        """Take the early-restore hook off the module once restoring is over: nothing of ours that
        holds the trainer stays on it (a copy of it pickles under ``ddp_spawn``)."""
        restore = self.__dict__.pop("_restore_hook", None)
        if restore is not None:
            vars(restore[0]).pop("on_load_checkpoint", None)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._distiller is not None:
            self._distiller.detach()
        self._remove_restore_hook()

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # after a checkpoint is restored: a dense one is ranked on its own weights
        self._remove_restore_hook()
        if self.masks is not None and self.hold is None and not self.shrunk:  # restored masks, or a second fit
            self._hold(trainer, pl_module)
        if self._distiller is not None and self._distiller.teacher is None and self._teacher_state is not None:
            self._distiller.make_teacher(self._network(pl_module), self._teacher_state)
        self._prune_due(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._prune_due(trainer, pl_module, trainer.current_epoch + 1)  # the start of the next epoch

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.importance == "taylor" and self.steps_done < self._steps.steps:
            self.taylor.accumulate(self._graph_for(trainer, pl_module), pl_module)  # complete, unscaled gradients
        if self.hold is not None:
            self.hold.zero_grads()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hold is not None:
            self.hold.apply()

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._distiller is not None:
            self._distiller.detach()  # training is over: the copies export makes carry no hook
        self._remove_restore_hook()
        if self.masks is not None and self.steps_done < self._steps.steps:
            warn(
                trainer,
                f"PruneExportCallback: training ended after {self.steps_done} of the schedule's {self._steps.steps} "
                "pruning steps (stopped early, e.g. by EarlyStopping); exporting the masks reached so far, "
                "the report says `schedule_complete: False`.",
            )
        if self.masks is None:
            where = "the schedule's 'start_epoch'" if self.schedule is not None else "`prune_on_epoch`"
            warn(trainer, f"PruneExportCallback: training ended before pruning (see {where}); nothing exported.")
            return
        masked_path = os.path.join(self.export_dir, "masked.ckpt")
        # fast_dev_run: Lightning writes no checkpoint, and neither do we (a real run's files stay)
        error = None if trainer.fast_dev_run else self._save_masked(trainer, masked_path)  # before export starts
        if error is None:
            module = self._full_module(trainer, pl_module)  # collective under sharded strategies
            if trainer.is_global_zero:
                try:
                    self._report = self._export(trainer, module)
                except Exception as err:  # whatever rank zero hits must reach every rank, never hang them
                    kind = "" if isinstance(err, PruneExportError) else f"{type(err).__name__}: "
                    error = f"{kind}{err} The masked checkpoint is kept at '{masked_path}'."
            error = trainer.strategy.broadcast(error, src=0)  # the other ranks wait here for rank zero
            self._report = trainer.strategy.broadcast(self._report, src=0)
        if error is None:
            self._handoff.send(trainer, self._report, self._exported_model, self._network_prefix)
        elif self.on_failure == "raise":
            raise PruneExportError(error)
        else:
            warn(trainer, f"PruneExportCallback: export failed: {error}")

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "masks": {k: v.cpu() for k, v in self.masks.items()} if self.masks is not None else None,
            "steps_done": self.steps_done,
            "shrunk": self.shrunk,
        }
        if self.importance == "taylor":
            state["taylor"] = self.taylor.state_dict()
        if self.shrunk and self._shrink_record is not None:
            state["pruned"] = self._shrink_record  # what `load_pruned_module("last.ckpt", ...)` replays
        teacher = self._distiller.teacher if self._distiller is not None else None
        if teacher is not None:
            state["teacher"] = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = state_dict.get("masks")
        self.hold = None
        # saved by 0.1.0, which pruned once: masks mean the one step was taken
        self.steps_done = state_dict.get("steps_done", 0 if self.masks is None else self._steps.steps)
        self.shrunk = bool(state_dict.get("shrunk", False)) or self.shrunk
        self.taylor.load_state_dict(state_dict.get("taylor") or {})
        self._teacher_state = state_dict.get("teacher")
        self._shrink_record = state_dict.get("pruned") or self._shrink_record

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks", {})
        if self.state_key not in states and type(self).__qualname__ in states:  # saved by version 0.1.0
            self.load_state_dict(states[type(self).__qualname__])

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _module=None)  # a weak reference does not pickle (ddp_spawn pickles callbacks)

    def _receive(self) -> None:
        """In the launching process of a ``ddp_spawn`` run: take rank zero's results once they exist."""
        data = self._handoff.receive()
        if data is not None:
            self._report, self._exported_model, self._network_prefix = (
                data["report"],
                data["model"],
                data["network_prefix"],
            )

    # ---------------------------------------------------------------- checks
    def _check_against_model(self, trainer: Any, pl_module: Any) -> None:
        """What can be checked before training: layers the config names, masks, batches, an example
        input, and the inplace_dict against the traced graph."""
        if self.pruner_name is not None:
            layers_to_prune(pl_module, self.config_list, self._config_argument)
        if self.mask_source is not None:
            try:
                collect_masks(self.mask_source, pl_module)
            except MaskError as err:
                raise ConfigurationError(f"`PruneExportCallback(masks=...)` does not fit the model: {err}") from err
        for batch in first_batches(trainer, 1 if self.verify_batches else 0):
            split_batch(batch, pl_module.forward, self.input_key)  # verification will read batches this way
        example = self._example(trainer, pl_module)
        if self.inplace_dict is not None:  # every entry against the traced graph, all wrong ones in one error
            try:
                check_inplace_dict(ChannelGraph.from_model(pl_module, example), self.inplace_dict, pl_module)
            except InplaceDictError as err:
                raise ConfigurationError(
                    f"`PruneExportCallback(inplace_dict=...)` does not fit the model: {err}"
                ) from err

    # ---------------------------------------------------------------- pruning
    def _prune_due(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        """Take every pruning step whose epoch has come (at most one, except after a skipped epoch)."""
        for step in self._steps.due(epoch, self.steps_done):
            self._prune(trainer, pl_module, step)

    def _prune(self, trainer: Any, pl_module: Any, step: int = 1) -> None:
        last = step == self._steps.steps
        if self._distiller is not None and self._distiller.teacher is None:  # the dense model, before any mask
            self._distiller.make_teacher(self._network(pl_module))
            info(
                trainer,
                f"PruneExportCallback: distilling from a frozen copy of {self._distiller.where()} "
                f"({self._distiller.teacher_megabytes():.1f} MiB on each device).",
            )
        if self.importance is not None:
            graph = self._graph_for(trainer, pl_module)
            masks = self._importance_masks(pl_module, graph, step)
            chosen = sorted(self._layer_sparsity(pl_module))
        else:
            votes = self._votes(pl_module)  # may make torch.nn.utils.prune's reparametrisation permanent
            self._graph = None  # so the graph is traced on the plain layers
            graph = self._graph_for(trainer, pl_module)
            masks, chosen = votes, sorted(votes)
            if self.group_consistent and votes:
                # a named pruner's amount is rounded down to hardware-friendly widths; yours is kept, and
                # export adds channels back to the multiple instead
                round_to = self.rounding if self.pruner_name is not None else 1
                masks = group_masks(graph, None, model=pl_module, votes=votes, layers=votes.keys(), round_to=round_to)
        masks = trainer.strategy.broadcast(masks, src=0)  # every rank holds rank zero's masks
        pruned = sum(int((~keep).sum()) for keep in masks.values())
        if pruned == 0 and last:
            chosen = chosen or "none"
            raise ConfigurationError(
                f"PruneExportCallback: nothing to prune. The {self._source()} chose layers {chosen}, but none of "
                "their pruned channels can be removed: each is tied to the model's input or output, or reaches an "
                "op that keeps its channels (see the warnings above). HINT: target other layers (`op_types`, `op_names`)."
            )
        self.masks = masks
        self.steps_done = step
        self.taylor.reset()
        self._hold(trainer, pl_module, graph)
        total = sum(int(labels.numel()) for labels in graph.producers.values())
        where = f" (step {step} of {self._steps.steps})" if self._steps.steps > 1 else ""
        info(
            trainer,
            f"PruneExportCallback: pruned {pruned} of {total} channels in {len(masks)} layers ({self._source()}){where}.",
        )
        if last and self.finetune == "pruned":
            self._shrink(trainer, pl_module)

    def _importance_masks(self, pl_module: Any, graph: ChannelGraph, step: int) -> Masks:
        """Our own group-level masks for schedule step ``step``, containing the previous step's."""
        fraction = self._steps.fraction(step)
        sparsity = {layer: ratio * fraction for layer, ratio in self._layer_sparsity(pl_module).items()}
        return importance_masks(
            graph,
            pl_module,
            self.importance,
            sparsity,
            ranking=self.ranking,
            min_channels=self.min_channels,
            previous=self.masks,
            round_to=self.rounding,
            taylor=self.taylor,
        )

    def _layer_sparsity(self, pl_module: Any) -> dict[str, float]:
        """Each targeted layer's fraction from the config (the last entry naming a layer wins, as in NNI)."""
        selected = layers_to_prune(pl_module, self.config_list, self._config_argument)
        ratios: dict[str, float] = {}
        for entry in self.config_list:
            ratio = entry.get("sparse_ratio", entry.get("sparsity"))
            if entry.get("exclude") or ratio is None:
                continue
            try:
                ratios.update(dict.fromkeys(layers_to_prune(pl_module, [entry], self._config_argument), float(ratio)))
            except ConfigurationError:
                continue  # this entry selects nothing; the whole config was checked above
        return {layer: ratios[layer] for layer in selected if layer in ratios}

    def _graph_for(self, trainer: Any, pl_module: Any) -> ChannelGraph:
        if self._graph is None:
            self._graph = ChannelGraph.from_model(pl_module, self._example(trainer, pl_module))
        return self._graph

    def _network(self, pl_module: Any) -> torch.nn.Module:
        name = self._distiller.network_name if self._distiller is not None else _network_prefix(pl_module)
        return pl_module.get_submodule(name) if name else pl_module

    def _shrink(self, trainer: Any, pl_module: Any, rebuild_optimizers: bool = True) -> None:
        """``finetune="pruned"``: export now and put the smaller layers into the module itself."""
        example = self._example(trainer, pl_module)
        paused = self._distiller is not None and self._distiller._handle is not None
        if paused:
            self._distiller.detach()  # the copy export makes must not carry the hooks
        try:
            result = export(
                pl_module, self.masks, example, inplace_dict=self.inplace_dict, round_to=self._export_rounding
            )
            small = result.model.to(pl_module.device)
            self._shrink_record = {
                **shrink_record(result),
                "network_prefix": _network_prefix(pl_module),
                "notes": [str(note) for note in result.notes],
            }
            if rebuild_optimizers:  # the masked model is live: the small one must compute what it computes
                verify_on_batches(pl_module, small, [(example, None)], self.rtol)
            before = sum(p.numel() for p in pl_module.parameters())
            for name, child in list(pl_module.named_children()):
                replacement = small.get_submodule(name)
                if replacement is not child:
                    setattr(pl_module, name, replacement)
        finally:
            if paused:
                self._distiller.attach(pl_module)
        self.hold, self.shrunk, self._graph = None, True, None
        if rebuild_optimizers:
            _rebuild_optimizers(trainer)
            after = sum(p.numel() for p in pl_module.parameters())
            info(
                trainer,
                f"PruneExportCallback: fine-tuning at the pruned size from here: {after:,} parameters (was {before:,}).",
            )

    def _pruner_object(self) -> Any:
        return None if self.pruner is None or isinstance(self.pruner, str) else self.pruner

    def _source(self) -> str:
        if self.pruner_name is not None:
            return f"{self.pruner_name} pruner"
        if self._pruner_object() is not None:
            return f"{type(self.pruner).__name__} pruner"
        return "given masks" if self.mask_source is not None else "masks read from the model"

    def _votes(self, pl_module: Any) -> Masks:
        """Masks as the chosen source gives them, layer by layer."""
        if self.pruner_name is not None:
            return nni_masks(pl_module, NNI_NAMES[self.pruner_name], self.config_list)
        if self._pruner_votes is not None:
            return self._pruner_votes
        if self.mask_source is not None:
            return collect_masks(self.mask_source, pl_module)
        votes = collect_masks(pl_module)
        make_pruning_permanent(pl_module)
        return votes

    def _hold(self, trainer: Any, pl_module: Any, graph: ChannelGraph | None = None) -> None:
        if graph is None:
            graph = ChannelGraph.from_model(pl_module, self._example(trainer, pl_module))
        self.hold = MaskHold.build(pl_module, self.masks, graph=graph)
        self.hold.apply()

    # ----------------------------------------------------------------- export
    def _save_masked(self, trainer: Any, path: str) -> str | None:
        """Write the resumable masked checkpoint; a failed write on rank zero reaches every rank."""
        temporary = trainer.strategy.broadcast(temporary_path(path), src=0)
        if trainer.is_global_zero:
            remove_stale_temporaries(self.export_dir)  # what a killed earlier run left beside its files
        error = None
        try:
            trainer.save_checkpoint(temporary, weights_only=False)
            if trainer.is_global_zero:
                os.replace(temporary, path)
        except Exception as err:
            if not trainer.is_global_zero:
                raise
            error = f"Could not write the masked checkpoint '{path}': {type(err).__name__}: {err}"
            if os.path.exists(temporary):
                os.remove(temporary)
            trainer.strategy.barrier("Trainer.save_checkpoint")  # the other ranks wait there for this one
        return trainer.strategy.broadcast(error, src=0)

    def _full_module(self, trainer: Any, pl_module: Any) -> Any:
        """The module to export: itself, or under a sharded strategy (FSDP, DeepSpeed) a fresh
        unsharded copy built from its hyper-parameters and the gathered full state."""
        sharded = self.gather_full_state if self.gather_full_state is not None else is_sharded(trainer.strategy)
        if not sharded:
            return pl_module
        state = trainer.strategy.lightning_module_state_dict()  # every rank takes part in the gather
        if not trainer.is_global_zero:
            return pl_module
        full = type(pl_module)(**pl_module.hparams)
        full.load_state_dict(state)
        return full.to(device=pl_module.device, dtype=_dtype(pl_module))

    def _export(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        trained_dtype = _dtype(pl_module)
        # Half-precision sums differ with the number of channels: export and verify in float32.
        reference = copy.deepcopy(pl_module).float() if trained_dtype in _LOW_PRECISION else pl_module
        dtype = _dtype(reference)
        example = _cast(self._example(trainer, pl_module), dtype)
        batches = [
            (_cast(self._prepare(trainer, pl_module, inputs), dtype), target)
            for inputs, target in self._batches(trainer, pl_module)
        ]
        start = time.perf_counter()
        result = export(
            reference,
            {} if self.shrunk else self.masks,  # at the pruned size already: the export is verified against itself
            example,
            inplace_dict=self.inplace_dict,
            whole_channel=self.whole_channel,
            round_to=self._export_rounding,
        )
        export_seconds = time.perf_counter() - start
        small = result.model.to(pl_module.device).eval()
        report = verify_on_batches(reference, small, batches or [(example, None)], self.rtol)
        inputs = {f"b{_batch_size(x)}": x for x in (_first_sample(example), batches[0][0] if batches else example)}
        report.update(compare_models(reference, small, inputs))
        if self.deploy_formats and not trainer.fast_dev_run:
            report["deploy"] = save_deployables(
                small, example, self.export_dir, self.deploy_formats, batches, latency_budget_s=2.0
            )
        shrunk_by = self._shrink_record if self.shrunk else None  # the shrink from the original model
        report.update(
            export_seconds=export_seconds,
            device=str(pl_module.device),
            verified_dtype=str(dtype).replace("torch.", ""),
            function_change=result.function_change,
            notes=[*(shrunk_by or {}).get("notes", []), *(str(note) for note in result.notes)],
            pruning_steps_done=self.steps_done,
            pruning_steps_planned=self._steps.steps,
            schedule_complete=self.steps_done >= self._steps.steps,
        )
        result.model = small.to(trained_dtype)
        self._network_prefix = _network_prefix(result.model)
        hparams = dict(pl_module.hparams) if hasattr(pl_module, "hparams") else {}
        pruned_path = os.path.join(self.export_dir, "pruned.ckpt")
        if trainer.fast_dev_run:
            pruned_path = None
            info(trainer, "PruneExportCallback: fast_dev_run: exported and verified in memory; no file written.")
        else:
            save_pruned(
                pruned_path,
                result,
                report=report,
                hyper_parameters=hparams,
                network_prefix=self._network_prefix,
                shrunk_by=shrunk_by,
            )
        report["path"] = pruned_path
        report["network_prefix"] = self._network_prefix
        self._exported_model = result.model
        self._log(trainer, report)
        return report

    def _batches(self, trainer: Any, pl_module: Any) -> list[tuple[Any, Any]]:
        """``(model input, target)`` pairs from the first validation (or training) batches."""
        return [split_batch(b, pl_module.forward, self.input_key) for b in first_batches(trainer, self.verify_batches)]

    def _log(self, trainer: Any, report: dict[str, Any]) -> None:
        metrics = {
            f"prune/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        info(trainer, format_report(report))

    def _example(self, trainer: Any, pl_module: Any) -> Any:
        """The input to trace with, in the module's precision and on its device."""
        if isinstance(self.example_input, list) and all(isinstance(v, int) for v in self.example_input):
            example: Any = torch.randn(*self.example_input, generator=torch.Generator().manual_seed(0))
        elif self.example_input is not None:
            example = self.example_input
        elif getattr(pl_module, "example_input_array", None) is not None:
            example = pl_module.example_input_array
        else:
            batches = first_batches(trainer, 1)
            if not batches:
                raise ConfigurationError(
                    "PruneExportCallback needs an example input and found no data to take one from: set "
                    "`example_input=`, the module's `example_input_array`, or give the trainer training or validation data."
                )
            example = split_batch(batches[0], pl_module.forward, self.input_key)[0]
        return self._prepare(trainer, pl_module, example)

    def _prepare(self, trainer: Any, pl_module: Any, inputs: Any) -> Any:
        converted = trainer.precision_plugin.convert_input(inputs)
        return torch.utils._pytree.tree_map(
            lambda t: t.to(pl_module.device) if isinstance(t, torch.Tensor) else t, converted
        )


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


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``value`` (nested) cast to ``dtype``."""
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value
    )


def _first_sample(example: Any) -> Any:
    """The example cut to a batch of one (every tensor's first dim)."""
    return torch.utils._pytree.tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) and t.ndim else t, example)


def _batch_size(example: Any) -> int:
    return next(
        (t.shape[0] for t in torch.utils._pytree.tree_leaves(example) if isinstance(t, torch.Tensor) and t.ndim), 1
    )


def _network_prefix(module: torch.nn.Module) -> str:
    """The deepest submodule path that holds every parameter (``""``: the module itself)."""
    # every name: a tied LM head's weight is the embedding's, and the network must hold the head too
    owners = [name.split(".")[:-1] for name, _ in module.named_parameters(remove_duplicate=False)]
    return ".".join(os.path.commonprefix(owners)) if owners else ""


def _prefixed(masks: Masks, pl_module: Any, bound: torch.nn.Module) -> Masks:
    """Masks from a pruner bound to a submodule, renamed relative to the LightningModule."""
    prefix = next((name for name, module in pl_module.named_modules() if module is bound), "")
    return {f"{prefix}.{k}" if prefix else k: v for k, v in masks.items()}


__all__ = ["PruneExportCallback"]
