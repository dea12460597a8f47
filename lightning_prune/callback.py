"""PruneExportCallback: prune, fine-tune masked, export, verify, save and log, from one callback.

Thin Lightning glue over the core (:mod:`~lightning_prune.masks`, :mod:`~lightning_prune.export`,
:mod:`~lightning_prune.verify`, :mod:`~lightning_prune.checkpoint`)::

    trainer = Trainer(callbacks=[PruneExportCallback(pruner="fpgm", sparsity=0.5)])
    trainer.fit(module, datamodule)   # prune -> masked fine-tune -> export -> verify -> save
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils._pytree import tree_map
from typing_extensions import override

from lightning_prune.checkpoint import save_pruned
from lightning_prune.errors import ConfigurationError, PruneExportError, VerificationError
from lightning_prune.export import export
from lightning_prune.graph import ChannelGraph
from lightning_prune.groups import group_masks
from lightning_prune.hold import MaskHold
from lightning_prune.masks import Masks, collect_masks, make_pruning_permanent
from lightning_prune.pruners import PRUNERS, build_config_list, masks_from_pruner, nni_masks
from lightning_prune.report import count_macs, count_params, measure_latency
from lightning_prune.verify import compare_outputs

_ON_FAILURE = ("raise", "warn")


class PruneExportCallback(Callback):
    r"""Prune channels, hold them at zero while fine-tuning, and export a smaller, verified model.

    Args:
        pruner: ``"fpgm"``, ``"l1"`` or ``"l2"`` (NNI 3.0 one-shot pruners built from the config
            below), an NNI pruner object you built (the seed's flow), or ``None`` to take masks
            from ``masks`` or from the model itself (``torch.nn.utils.prune`` buffers as
            Lightning's ``ModelPruning`` leaves them, or zeroed filters).
        sparsity: fraction of channels to prune in each targeted layer.
        op_types, op_names, exclude_op_names: which layers NNI prunes.
        config_list: a full NNI ``config_list`` instead (NNI 2.x's ``"sparsity"`` key accepted).
        masks: masks (any form :func:`~lightning_prune.collect_masks` takes) or a path to a mask file.
        inplace_dict: ``"auto"`` (inferred), a dict in the seed's format, or a path to YAML/JSON.
        example_input: a tensor (or a list of ints: the shape of a random one) for tracing;
            default: the module's ``example_input_array``, else the first validation batch.
        prune_on_epoch: ``0`` prunes at fit start; ``k`` trains dense for ``k`` epochs first.
        export_dir: where files go; default ``<trainer log dir>/pruned``.
        on_failure: ``"raise"`` or ``"warn"`` when export or verification fails.
        rtol: relative error allowed between masked and exported outputs.
        group_consistent: prune whole coupled groups so export loses no sparsity to unions.
        verify_batches: how many validation batches verification runs.
        gather_full_state: export from a fresh module (built from the module's hyper-parameters)
            holding the full gathered state; default: only under sharded strategies (FSDP, DeepSpeed).

    After ``fit``, ``callback.exported_model`` holds the small model and ``callback.report`` its figures.
    """

    def __init__(
        self,
        pruner: Union[str, Any, None] = "fpgm",
        sparsity: float = 0.5,
        op_types: Sequence[str] = ("Conv2d",),
        op_names: Optional[Sequence[str]] = None,
        exclude_op_names: Optional[Sequence[str]] = None,
        config_list: Optional[list[dict[str, Any]]] = None,
        masks: Union[dict[str, Any], str, None] = None,
        inplace_dict: Union[str, dict[str, Any]] = "auto",
        example_input: Union[torch.Tensor, list[int], None] = None,
        prune_on_epoch: int = 0,
        export_dir: Optional[str] = None,
        on_failure: str = "raise",
        rtol: float = 1e-5,
        group_consistent: bool = True,
        verify_batches: int = 4,
        gather_full_state: Optional[bool] = None,
    ) -> None:
        if isinstance(pruner, str) and pruner not in PRUNERS:
            raise ConfigurationError(
                f"`PruneExportCallback(pruner={pruner!r})` is not supported. Choose one of {sorted(PRUNERS)}, "
                "an NNI pruner object, or None. HINT: None reads masks from `masks=` or from the model."
            )
        if pruner is not None and not isinstance(pruner, str) and not hasattr(pruner, "compress"):
            raise ConfigurationError(
                f"`PruneExportCallback(pruner=...)` got a value of type {type(pruner).__name__!r}, which has no `compress()`; "
                "pass an NNI 3.0 pruner object, a pruner name, or None."
            )
        if not 0.0 < sparsity < 1.0:
            raise ConfigurationError(f"`PruneExportCallback(sparsity={sparsity!r})` must be in (0, 1), e.g. 0.5.")
        if on_failure not in _ON_FAILURE:
            raise ConfigurationError(f"`PruneExportCallback(on_failure={on_failure!r})` must be one of {_ON_FAILURE}.")
        if not isinstance(prune_on_epoch, int) or prune_on_epoch < 0:
            raise ConfigurationError(f"`PruneExportCallback(prune_on_epoch={prune_on_epoch!r})` must be an int >= 0.")
        if rtol <= 0:
            raise ConfigurationError(f"`PruneExportCallback(rtol={rtol!r})` must be > 0.")
        if pruner is None and masks is None:
            rank_zero_info("PruneExportCallback: pruner=None and no masks given; masks will be read from the model.")
        if isinstance(inplace_dict, str) and inplace_dict != "auto" and not os.path.isfile(inplace_dict):
            raise ConfigurationError(
                f"`PruneExportCallback(inplace_dict={inplace_dict!r})` is neither 'auto' nor an existing YAML/JSON file."
            )
        if isinstance(masks, str) and not os.path.isfile(masks):
            raise ConfigurationError(f"`PruneExportCallback(masks={masks!r})`: mask file not found.")
        self.pruner = pruner
        self.sparsity = sparsity
        self.config_list = build_config_list(sparsity, op_types, op_names, exclude_op_names, config_list)
        self.mask_source = masks
        self.inplace_dict = inplace_dict
        self.example_input = example_input
        self.prune_on_epoch = prune_on_epoch
        self.export_dir = export_dir
        self.on_failure = on_failure
        self.rtol = rtol
        self.group_consistent = group_consistent
        self.verify_batches = verify_batches
        self.gather_full_state = gather_full_state
        self.masks: Optional[Masks] = None
        self.hold: Optional[MaskHold] = None
        self.exported_model: Optional[torch.nn.Module] = None
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        directory = self.export_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "pruned")
        self.export_dir = trainer.strategy.broadcast(directory, src=0)
        if trainer.ckpt_path is None and self.masks is None and self.prune_on_epoch == 0:
            self._prune(trainer, pl_module)  # before configure_optimizers runs

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is not None and self.hold is None:  # masks restored from a checkpoint
            self._hold(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None and self.prune_on_epoch > 0 and trainer.current_epoch + 1 >= self.prune_on_epoch:
            self._prune(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.hold is not None:
            self.hold.zero_grads()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hold is not None:
            self.hold.apply()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is None:
            rank_zero_warn("PruneExportCallback: training ended before pruning (see `prune_on_epoch`); nothing exported.")
            return
        masked_path = os.path.join(self.export_dir, "masked.ckpt")
        temporary = trainer.strategy.broadcast(os.path.join(self.export_dir, f".masked-{os.getpid()}.ckpt.part"), src=0)
        trainer.save_checkpoint(temporary, weights_only=False)  # every rank takes part; resumable, saved before export
        if trainer.is_global_zero:
            os.replace(temporary, masked_path)
        module = self._full_module(trainer, pl_module)  # collective under sharded strategies
        outcome: dict[str, Any] = {"error": None, "report": {}}
        if trainer.is_global_zero:
            try:
                outcome["report"] = self._export(trainer, module)
            except Exception as err:  # whatever rank zero hits must reach every rank, never hang them
                kind = "" if isinstance(err, PruneExportError) else f"{type(err).__name__}: "
                outcome["error"] = f"{kind}{err} The masked checkpoint is kept at '{masked_path}'."
        outcome = trainer.strategy.broadcast(outcome, src=0)  # the other ranks wait here for rank zero
        self.report = outcome["report"]
        if outcome["error"] is not None:
            if self.on_failure == "raise":
                raise PruneExportError(outcome["error"])
            rank_zero_warn(f"PruneExportCallback: export failed: {outcome['error']}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.cpu() for k, v in self.masks.items()} if self.masks is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = state_dict.get("masks")
        self.hold = None

    # ---------------------------------------------------------------- pruning
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        votes = self._votes(pl_module)  # first: a user's pruner and torch prune leave wrappers to remove
        graph = ChannelGraph.from_model(pl_module, self._example(trainer, pl_module))
        masks = votes
        if self.group_consistent and self.mask_source is None:
            sparsity = self.config_list[0].get("sparse_ratio", self.sparsity)
            masks = group_masks(graph, sparsity, model=pl_module, votes=votes, layers=votes.keys())
        self.masks = trainer.strategy.broadcast(masks, src=0)  # every rank holds rank zero's masks
        self._hold(trainer, pl_module, graph)
        kept = sum(int(k.sum()) for k in self.masks.values())
        total = sum(k.numel() for k in self.masks.values())
        rank_zero_info(f"PruneExportCallback: pruned {total - kept} of {total} channels in {len(self.masks)} layers.")

    def _votes(self, pl_module: pl.LightningModule) -> Masks:
        """Masks as the chosen source gives them, layer by layer."""
        if isinstance(self.pruner, str):
            return nni_masks(pl_module, self.pruner, self.config_list)
        if self.pruner is not None:
            bound = getattr(self.pruner, "bound_model", pl_module)
            return _prefixed(masks_from_pruner(self.pruner, bound), pl_module, bound)
        if self.mask_source is not None:
            return collect_masks(self.mask_source, pl_module)
        votes = collect_masks(pl_module)
        make_pruning_permanent(pl_module)
        return votes

    def _hold(self, trainer: pl.Trainer, pl_module: pl.LightningModule, graph: Optional[ChannelGraph] = None) -> None:
        if graph is None:
            graph = ChannelGraph.from_model(pl_module, self._example(trainer, pl_module))
        self.hold = MaskHold.build(pl_module, self.masks, graph=graph)
        self.hold.apply()

    # ----------------------------------------------------------------- export
    def _full_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> pl.LightningModule:
        """The module to export: itself, or under a sharded strategy (FSDP, DeepSpeed) a fresh
        unsharded copy built from its hyper-parameters and the gathered full state."""
        sharded = self.gather_full_state if self.gather_full_state is not None else _is_sharded(trainer.strategy)
        if not sharded:
            return pl_module
        state = trainer.strategy.lightning_module_state_dict()  # every rank takes part in the gather
        if not trainer.is_global_zero:
            return pl_module
        full = type(pl_module)(**pl_module.hparams)
        full.load_state_dict(state)
        return full.to(pl_module.device)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        example = self._example(trainer, pl_module)
        start = time.perf_counter()
        result = export(pl_module, self.masks, example, inplace_dict=self.inplace_dict)
        export_seconds = time.perf_counter() - start
        small = result.model.to(pl_module.device).eval()
        report = self._verify(trainer, pl_module, small, example)
        report.update(
            params_dense=count_params(pl_module),
            params_exported=count_params(small),
            macs_dense=count_macs(pl_module, example),
            macs_exported=count_macs(small, example),
            latency_dense_ms=measure_latency(pl_module, example) * 1e3,
            latency_exported_ms=measure_latency(small, example) * 1e3,
            export_seconds=export_seconds,
            device=str(pl_module.device),
        )
        hparams = dict(pl_module.hparams) if hasattr(pl_module, "hparams") else {}
        pruned_path = os.path.join(self.export_dir, "pruned.ckpt")
        save_pruned(pruned_path, result, report=report, hyper_parameters=hparams)
        report["path"] = pruned_path
        self.exported_model = small
        self._log(trainer, report)
        return report

    @torch.no_grad()
    def _verify(self, trainer: pl.Trainer, pl_module: pl.LightningModule, small: torch.nn.Module, example: Any) -> dict[str, Any]:
        from torchmetrics.classification import MulticlassAccuracy  # rank zero alone: no cross-rank sync

        was_training = pl_module.training
        pl_module.eval()
        batches = _first_batches(trainer, self.verify_batches) or [(example, None)]
        worst, agreement, accuracy = 0.0, None, {}
        try:
            for index, (inputs, target) in enumerate(batches):
                inputs = _to(inputs, pl_module.device)
                reference, candidate = pl_module(inputs), small(inputs)
                comparison = compare_outputs(reference, candidate, self.rtol)
                worst = max(worst, comparison.max_relative_error)
                if not comparison.passed:
                    raise VerificationError(
                        f"The exported model differs from the masked model on validation batch {index}: "
                        f"max relative error {comparison.max_relative_error:.2e} > rtol {self.rtol:g}."
                    )
                if isinstance(reference, torch.Tensor) and reference.ndim == 2:  # classifier logits
                    classes = reference.shape[1]
                    if agreement is None:
                        agreement = MulticlassAccuracy(classes, average="micro", sync_on_compute=False).to(reference.device)
                        if target is not None:
                            accuracy = {k: MulticlassAccuracy(classes, average="micro", sync_on_compute=False).to(reference.device) for k in ("masked", "exported")}
                    agreement.update(candidate, reference.argmax(1))
                    if target is not None:
                        accuracy["masked"].update(reference, _to(target, reference.device))
                        accuracy["exported"].update(candidate, _to(target, reference.device))
        finally:
            pl_module.train(was_training)
        report: dict[str, Any] = {"max_relative_error": worst, "verified_batches": len(batches)}
        if agreement is not None:
            report["top1_agreement"] = float(agreement.compute())
            if report["top1_agreement"] < 1.0:
                raise VerificationError(f"Exported and masked models disagree on top-1 for {1 - report['top1_agreement']:.2%} of samples.")
        for name, metric in accuracy.items():
            report[f"accuracy_{name}"] = float(metric.compute())
        return report

    def _log(self, trainer: pl.Trainer, report: dict[str, Any]) -> None:
        metrics = {f"prune/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        rank_zero_info(format_report(report))

    def _example(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if isinstance(self.example_input, (list, tuple)) and all(isinstance(v, int) for v in self.example_input):
            example: Any = torch.randn(*self.example_input)
        elif self.example_input is not None:
            example = self.example_input
        elif pl_module.example_input_array is not None:
            example = pl_module.example_input_array
        else:
            batches = _first_batches(trainer, 1)
            if not batches:
                raise ConfigurationError(
                    "PruneExportCallback needs an example input: set `example_input=`, the module's "
                    "`example_input_array`, or give the trainer validation data."
                )
            example = batches[0][0]
        return _to(example, pl_module.device)


def format_report(report: dict[str, Any]) -> str:
    """The export summary as a small markdown table (dense vs exported)."""
    rows = [("params", "params_dense", "params_exported", "{:,.0f}"), ("MACs", "macs_dense", "macs_exported", "{:,.0f}"),
            ("latency ms", "latency_dense_ms", "latency_exported_ms", "{:.3f}"),
            ("accuracy", "accuracy_masked", "accuracy_exported", "{:.4f}")]
    lines = ["| | dense (masked) | exported |", "|---|---|---|"]
    for label, dense, small, fmt in rows:
        if dense in report and small in report:
            lines.append(f"| {label} | {fmt.format(report[dense])} | {fmt.format(report[small])} |")
    lines.append(f"| max relative error | | {report.get('max_relative_error', float('nan')):.2e} |")
    if "top1_agreement" in report:
        lines.append(f"| top-1 agreement | | {report['top1_agreement']:.4f} |")
    lines.append(f"| export seconds | | {report.get('export_seconds', float('nan')):.3f} |")
    return "\n".join(lines)


def _is_sharded(strategy: Any) -> bool:
    return any(cls.__name__ in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy") for cls in type(strategy).__mro__)


def _first_batches(trainer: pl.Trainer, count: int) -> list[tuple[Any, Any]]:
    """Up to ``count`` (inputs, target) pairs from the validation data, else the training data."""
    sources = [trainer.val_dataloaders]
    if trainer.datamodule is not None:
        sources += [getattr(trainer.datamodule, "val_dataloader", None), getattr(trainer.datamodule, "train_dataloader", None)]
    for source in sources:
        loader = source() if callable(source) else source
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            continue
        batches = []
        for batch in loader:
            batches.append(_split_batch(batch))
            if len(batches) >= count:
                break
        if batches:
            return batches
    return []


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0], batch[1] if len(batch) > 1 else None
    raise ConfigurationError(
        f"PruneExportCallback cannot tell the model input in a {type(batch).__name__} batch; set `example_input=`."
    )


def _to(value: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


def _prefixed(masks: Masks, pl_module: pl.LightningModule, bound: torch.nn.Module) -> Masks:
    """Masks from a pruner bound to a submodule, renamed relative to the LightningModule."""
    prefix = next((name for name, module in pl_module.named_modules() if module is bound), "")
    return {f"{prefix}.{k}" if prefix else k: v for k, v in masks.items()}


__all__ = ["PruneExportCallback", "format_report"]
