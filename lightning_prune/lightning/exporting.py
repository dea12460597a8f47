"""The end of fit: the masked checkpoint, then export, verification, the deployables, ``pruned.ckpt`` and the report.

The masked checkpoint is written first, so a failed export loses no training. Rank zero then
exports the module that :meth:`Exporting.module_to_export` gives (the one place that gathers a
sharded model), verifies it on real batches, writes the files and logs the figures; every rank
learns the outcome (:func:`~lightning_prune.lightning.handoff.on_rank_zero`). Under
``fast_dev_run`` everything runs in memory and no file is written.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch

from lightning_prune.core.errors import ConfigurationError, InplaceDictError
from lightning_prune.core.export import export
from lightning_prune.core.files.atomic import remove_path, remove_stale_temporaries, replace_path, temporary_path
from lightning_prune.core.files.checkpoint import save_pruned
from lightning_prune.core.files.deploy import save_deployables
from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.inplace_dict import check_inplace_dict
from lightning_prune.core.verify.equivalence import verify_on_batches
from lightning_prune.core.verify.report import compare_models, format_report
from lightning_prune.lightning.checks import is_sharded, writable_problem
from lightning_prune.lightning.compat import info, warn
from lightning_prune.lightning.handoff import error_message, on_rank_zero
from lightning_prune.lightning.inputs import (
    batch_size,
    cast,
    dtype_of,
    example_input,
    first_sample,
    network_prefix,
    prepare,
    verification_batches,
)
from lightning_prune.lightning.schedule import Schedule
from lightning_prune.lightning.sharding import ShardedModule, read_sharded, same_buffers, shards_registered
from lightning_prune.lightning.state import PruneState

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def export_rounding(settings: Any) -> int:
    """What export rounds up: your widths, to the callback's ``rounding``; a named pruner's masks are rounded already."""
    return 1 if settings.pruner_name is not None else settings.rounding


class Exporting:
    """Export, verify, save and report for one callback: ``settings`` is the callback (its arguments
    and public properties are read), ``state`` its :class:`~lightning_prune.lightning.state.PruneState`."""

    def __init__(self, settings: Any, state: PruneState) -> None:
        self.settings, self.state = settings, state

    def directory(self, trainer: Any, given: str | None) -> str:
        """Where the files go (``given``, else ``<trainer log dir>/pruned``): rank zero's choice on
        every rank, checked writable before training so no work is lost."""
        directory = given or os.path.join(trainer.log_dir or trainer.default_root_dir, "pruned")
        directory = trainer.strategy.broadcast(directory, src=0)
        problem = trainer.strategy.broadcast(writable_problem(directory) if trainer.is_global_zero else None, src=0)
        if problem is not None:
            raise ConfigurationError(
                f"`PruneExportCallback(export_dir={directory!r})` cannot be written: {problem}. "
                "HINT: choose a directory this process can create files in; it is checked before training so no work is lost."
            )
        return directory

    def check(self, trainer: Any, pl_module: Any) -> None:
        """Before training: the batches verification will read, the example input, and the
        ``inplace_dict`` against the traced graph (every wrong entry in one error)."""
        settings = self.settings
        verification_batches(trainer, pl_module, 1 if settings.verify_batches else 0, settings.input_key)
        example = example_input(trainer, pl_module, settings.example_input, settings.input_key)
        if settings.inplace_dict is not None:
            try:
                check_inplace_dict(ChannelGraph.from_model(pl_module, example), settings.inplace_dict, pl_module)
            except InplaceDictError as err:
                raise ConfigurationError(
                    f"`PruneExportCallback(inplace_dict=...)` does not fit the model: {err}"
                ) from err

    def ready(self, trainer: Any) -> bool:
        """Whether there are masks to export; warns when the schedule was cut short or never began."""
        steps = Schedule.of(self.settings.schedule, self.settings.prune_on_epoch).steps
        if self.state.masks is not None and self.state.steps_done < steps:
            warn(
                trainer,
                f"PruneExportCallback: training ended after {self.state.steps_done} of the schedule's {steps} "
                "pruning steps (stopped early, e.g. by EarlyStopping); exporting the masks reached so far, "
                "the report says `schedule_complete: False`.",
            )
        if self.state.masks is None:
            where = "the schedule's 'start_epoch'" if self.settings.schedule is not None else "`prune_on_epoch`"
            warn(trainer, f"PruneExportCallback: training ended before pruning (see {where}); nothing exported.")
        return self.state.masks is not None

    def run(self, trainer: Any, pl_module: Any) -> str | None:
        """The masked checkpoint, then the export on rank zero; the error every rank gets, or ``None``."""
        masked_path = os.path.join(self.settings.export_dir, "masked.ckpt")
        same_buffers(trainer, pl_module)  # FSDP2 leaves each rank its own norm statistics: rank zero's count
        # fast_dev_run: Lightning writes no checkpoint, and neither do we (a real run's files stay)
        error = None if trainer.fast_dev_run else self.save_masked(trainer, masked_path)  # before export starts
        if error is not None:
            return error
        kept = f" The masked checkpoint is kept at '{masked_path}'."
        if read_sharded(trainer, pl_module) and not self.settings.gather_full_state:
            report, error = self.export_sharded(trainer, pl_module, kept)
        else:
            module = self.module_to_export(trainer, pl_module)  # collective under sharded strategies
            report, error = on_rank_zero(trainer, lambda: self.export(trainer, module), after_error=kept)
        if error is None:
            self.state.report = report
        return error

    def save_masked(self, trainer: Any, path: str) -> str | None:
        """Write the resumable masked checkpoint; a failed write on rank zero reaches every rank."""
        temporary = trainer.strategy.broadcast(temporary_path(path), src=0)
        if trainer.is_global_zero:
            remove_stale_temporaries(self.settings.export_dir)  # what a killed earlier run left beside its files
        error = None
        try:
            trainer.save_checkpoint(temporary, weights_only=False)
            if trainer.is_global_zero:
                replace_path(temporary, path)  # a file, or a sharded strategy's checkpoint directory
        except Exception as err:
            if not trainer.is_global_zero:
                raise
            error = f"Could not write the masked checkpoint '{path}': {type(err).__name__}: {err}"
            remove_path(temporary)
            trainer.strategy.barrier("Trainer.save_checkpoint")  # the other ranks wait there for this one
        return trainer.strategy.broadcast(error, src=0)

    def module_to_export(self, trainer: Any, pl_module: Any) -> Any:
        """The module to export: itself, or under a sharded strategy (FSDP, DeepSpeed) a fresh
        unsharded copy built from its hyper-parameters and the gathered full state (on rank zero)."""
        gather = self.settings.gather_full_state
        if not (gather if gather is not None else is_sharded(trainer.strategy)):
            return pl_module
        state = trainer.strategy.lightning_module_state_dict()  # every rank takes part in the gather
        if not trainer.is_global_zero:
            return pl_module
        full = type(pl_module)(**pl_module.hparams)
        full.load_state_dict(state)
        return full.to(device=pl_module.device, dtype=dtype_of(pl_module))

    def export_sharded(self, trainer: Any, pl_module: Any, kept: str) -> tuple[dict[str, Any] | None, str | None]:
        """Every rank builds the smaller model from the shards, a module at a time, and checks it
        against the sharded masked module on rank zero's batches (collective); rank zero writes. The
        report (latency is not timed: the masked model's forward is collective) and the error, on every rank."""
        settings, state = self.settings, self.state
        strategy = trainer.strategy
        example, batches = strategy.broadcast(self._inputs(trainer, pl_module, dtype_of(pl_module)), src=0)
        error = None
        try:
            start = time.perf_counter()
            result = ShardedModule(pl_module).export(
                {} if state.shrunk else state.masks,  # at the pruned size already: checked against itself
                example,
                round_to=export_rounding(settings),
                whole_channel=settings.whole_channel,
                progress=trainer.is_global_zero,
            )
            seconds = time.perf_counter() - start
            small = result.model.to(pl_module.device).eval()
            report = self._measure(pl_module, small, result, example, batches, seconds, latency=False)
        except Exception as err:  # the same on every rank: each computed the same thing
            error = error_message(err, kept)
        finally:
            shards_registered(trainer, pl_module)  # the verification's forward left the root gathered: free it
        error = strategy.broadcast(error, src=0)
        if error is not None:
            return None, error
        report, error = on_rank_zero(
            trainer, lambda: self._write(trainer, pl_module, result, report, example, batches), kept
        )
        if error is None:  # every rank built the same smaller model: each keeps its own
            state.exported_model = result.model.to(dtype_of(pl_module))
            state.network_prefix = network_prefix(state.exported_model)
        return report, error

    def export(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """Export and verify ``pl_module`` (in float32 when it trained in half precision), write the
        deployables and ``pruned.ckpt``, log the figures; the report."""
        settings, state = self.settings, self.state
        # Half-precision sums differ with the number of channels: export and verify in float32.
        reference = copy.deepcopy(pl_module).float() if dtype_of(pl_module) in _LOW_PRECISION else pl_module
        example, batches = self._inputs(trainer, pl_module, dtype_of(reference))
        start = time.perf_counter()
        result = export(
            reference,
            {} if state.shrunk else state.masks,  # at the pruned size already: the export is verified against itself
            example,
            inplace_dict=settings.inplace_dict,
            whole_channel=settings.whole_channel,
            round_to=export_rounding(settings),
        )
        small = result.model.to(pl_module.device).eval()
        seconds = time.perf_counter() - start
        report = self._measure(reference, small, result, example, batches, seconds, settings.measure_latency)
        return self._write(trainer, pl_module, result, report, example, batches)

    def _inputs(self, trainer: Any, pl_module: Any, dtype: Any) -> tuple[Any, list[tuple[Any, Any]]]:
        """The example input and the verification batches, in ``dtype``."""
        settings = self.settings
        example = cast(example_input(trainer, pl_module, settings.example_input, settings.input_key), dtype)
        batches = [
            (cast(prepare(trainer, pl_module, inputs), dtype), target)
            for inputs, target in verification_batches(trainer, pl_module, settings.verify_batches, settings.input_key)
        ]
        return example, batches

    def _measure(
        self, reference: Any, small: Any, result: Any, example: Any, batches: list, seconds: float, latency: bool = True
    ) -> dict[str, Any]:
        """``small`` verified against ``reference`` on the batches; their sizes (and speeds) side by side."""
        settings, state = self.settings, self.state
        report = verify_on_batches(reference, small, batches or [(example, None)], settings.rtol)
        inputs = {f"b{batch_size(x)}": x for x in (first_sample(example), batches[0][0] if batches else example)}
        report.update(compare_models(reference, small, inputs, measure_latency=latency))
        if state.shrunk:
            report = _against_the_full_size(report, state.shrink_record)
        steps = Schedule.of(settings.schedule, settings.prune_on_epoch).steps
        report.update(
            export_seconds=seconds,
            device=str(next((p.device for p in small.parameters()), torch.device("cpu"))),
            verified_dtype=str(dtype_of(small)).replace("torch.", ""),
            function_change=result.function_change,
            notes=[*((state.shrink_record if state.shrunk else None) or {}).get("notes", []), *map(str, result.notes)],
            pruning_steps_done=state.steps_done,
            pruning_steps_planned=steps,
            schedule_complete=state.steps_done >= steps,
        )
        return report

    def _write(
        self, trainer: Any, pl_module: Any, result: Any, report: dict[str, Any], example: Any, batches: list
    ) -> dict[str, Any]:
        """On rank zero: the deployables and ``pruned.ckpt`` (none under ``fast_dev_run``), the figures logged."""
        settings, state = self.settings, self.state
        small = result.model
        if settings.deploy_formats and not trainer.fast_dev_run:
            report["deploy"] = save_deployables(
                small, example, settings.export_dir, settings.deploy_formats, batches, latency_budget_s=2.0
            )
        shrunk_by = state.shrink_record if state.shrunk else None  # the shrink from the original model
        result.model = small.to(dtype_of(pl_module))
        state.network_prefix = network_prefix(result.model)
        pruned_path = os.path.join(settings.export_dir, "pruned.ckpt")
        if trainer.fast_dev_run:
            pruned_path = None
            info(trainer, "PruneExportCallback: fast_dev_run: exported and verified in memory; no file written.")
        else:
            hparams = dict(pl_module.hparams) if hasattr(pl_module, "hparams") else {}
            save_pruned(
                pruned_path,
                result,
                report=report,
                hyper_parameters=hparams,
                network_prefix=state.network_prefix,
                shrunk_by=shrunk_by,
            )
        report["path"] = pruned_path
        report["network_prefix"] = state.network_prefix
        state.exported_model = result.model
        _log(trainer, report)
        return report


def _against_the_full_size(report: dict[str, Any], record: dict[str, Any] | None) -> dict[str, Any]:
    """At the pruned size the final export compares the small model with itself: its dense column
    comes from the full-size module as the shrink counted it (``record["dense"]``), and what only the
    full-size model could give (its latency, a count the shrink did not make) is left out, not repeated."""
    dense = (record or {}).get("dense", {})
    kept = {
        key: value
        for key, value in report.items()
        if not (key in ("params_dense", "macs_dense") or (key.startswith("latency_") and "_exported" not in key))
    }
    return {**kept, **dense}


def _log(trainer: Any, report: dict[str, Any]) -> None:
    """The report's numbers to every attached logger (as ``prune/<name>``), and its table to the console."""
    metrics = {
        f"prune/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()
    info(trainer, format_report(report))


__all__ = ["Exporting", "export_rounding"]
