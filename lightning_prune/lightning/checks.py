"""Eager checks of :class:`~lightning_prune.PruneExportCallback`'s arguments, in Lightning's manner:
every type and value in ``__init__``, a message naming the argument, the value and a hint."""

from __future__ import annotations

import importlib.util
import numbers
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from lightning_prune.core.errors import ConfigurationError
from lightning_prune.core.files.capture import ONNX_PACKAGES
from lightning_prune.core.files.deploy import DEPLOY_FORMATS
from lightning_prune.core.graph.importance import IMPORTANCES, RANKINGS
from lightning_prune.core.graph.pruners import PRUNERS, check_config_list
from lightning_prune.lightning.distill import distill_settings
from lightning_prune.lightning.schedule import Schedule

NNI_NAMES = {f"nni-{name}": name for name in PRUNERS}  # NNI's own one-shot pruners, per layer
PRUNER_NAMES = ("auto", *IMPORTANCES, *NNI_NAMES)
ON_FAILURE = ("raise", "warn")
FINETUNE = ("masked", "pruned")


def _fail(argument: str, value: Any, expected: str) -> ConfigurationError:
    return ConfigurationError(f"`PruneExportCallback({argument}={value!r})` {expected}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _names(argument: str, value: Any) -> None:
    if value is not None and (
        isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value)
    ):
        raise _fail(argument, value, "must be a list of strings, e.g. ['Conv2d'] or ['net.0'].")


def validate_arguments(
    *,
    pruner: Any,
    sparsity: Any,
    op_types: Any,
    op_names: Any,
    exclude_op_names: Any,
    config_list: Any,
    masks: Any,
    inplace_dict: Any,
    example_input: Any,
    input_key: Any,
    prune_on_epoch: Any,
    export_dir: Any,
    on_failure: Any,
    rtol: Any,
    group_consistent: Any,
    verify_batches: Any,
    gather_full_state: Any,
    measure_latency: Any = True,
    round_to: Any = None,
    whole_channel: Any = False,
    deploy_formats: Any = None,
    ranking: Any = "uniform",
    min_channels: Any = 1,
    schedule: Any = None,
    distill: Any = None,
    finetune: Any = "masked",
    calibration_batches: Any = None,
) -> None:
    """Raise :class:`~lightning_prune.core.errors.ConfigurationError` for the first argument out of range."""
    if isinstance(pruner, str) and pruner not in PRUNER_NAMES:
        raise _fail(
            "pruner",
            pruner,
            f"is not supported. Choose one of {list(PRUNER_NAMES)}, an NNI pruner object, "
            "or None. HINT: None reads masks from the model; 'auto' uses `masks=` when given.",
        )
    if pruner is not None and not isinstance(pruner, str) and not hasattr(pruner, "compress"):
        raise ConfigurationError(
            f"`PruneExportCallback(pruner=...)` got a value of type {type(pruner).__name__!r}, which has no "
            "`compress()`; pass an NNI 3.0 pruner object, a pruner name, or None."
        )
    if masks is not None and pruner not in ("auto", None):
        raise ConfigurationError(
            f"`PruneExportCallback(pruner={pruner if isinstance(pruner, str) else type(pruner).__name__!r}, "
            "masks=...)` gives two mask sources. HINT: leave `pruner` at 'auto' to use your masks."
        )
    if not _is_number(sparsity) or not 0.0 < sparsity < 1.0:
        raise _fail("sparsity", sparsity, "must be a number in (0, 1), e.g. 0.5.")
    for argument, value in (("op_types", op_types), ("op_names", op_names), ("exclude_op_names", exclude_op_names)):
        _names(argument, value)
    if config_list is not None:
        if op_names or exclude_op_names or op_types:
            raise ConfigurationError(
                "`PruneExportCallback(config_list=...)` replaces `op_types`, `op_names` and `exclude_op_names`; give one or the other."
            )
        check_config_list(config_list, "PruneExportCallback(config_list=...)")
    if masks is not None and not isinstance(masks, (Mapping, str, os.PathLike)):
        raise _fail(
            "masks", type(masks).__name__, "must be a dict of masks or the path of a file saved with torch.save."
        )
    if isinstance(masks, (str, os.PathLike)) and not os.path.isfile(masks):
        raise ConfigurationError(f"`PruneExportCallback(masks={os.fspath(masks)!r})`: mask file not found.")
    if isinstance(inplace_dict, (str, os.PathLike)):
        if inplace_dict != "auto" and not os.path.isfile(inplace_dict):
            raise _fail("inplace_dict", os.fspath(inplace_dict), "is neither 'auto' nor an existing YAML/JSON file.")
    elif not isinstance(inplace_dict, Mapping):
        raise _fail(
            "inplace_dict", type(inplace_dict).__name__, "must be 'auto', a dict, or the path of a YAML/JSON file."
        )
    if example_input is not None and not isinstance(example_input, (torch.Tensor, list, tuple, Mapping)):
        raise _fail(
            "example_input",
            type(example_input).__name__,
            "must be a tensor, a tuple or dict of inputs, or a list of ints (a shape).",
        )
    if (
        isinstance(example_input, list)
        and example_input
        and all(_is_int(v) for v in example_input)
        and min(example_input) < 1
    ):
        raise _fail("example_input", example_input, "as a shape must hold positive sizes, e.g. [1, 3, 32, 32].")
    if input_key is not None and not isinstance(input_key, str):
        raise _fail("input_key", input_key, "must be the name of a key of your dict batches, or None.")
    if not _is_int(prune_on_epoch) or prune_on_epoch < 0:
        raise _fail("prune_on_epoch", prune_on_epoch, "must be an int >= 0.")
    if export_dir is not None and not isinstance(export_dir, (str, os.PathLike)):
        raise _fail("export_dir", export_dir, "must be a directory path, or None for `<log dir>/pruned`.")
    if on_failure not in ON_FAILURE:
        raise _fail("on_failure", on_failure, f"must be one of {ON_FAILURE}.")
    if not _is_number(rtol) or rtol <= 0:
        raise _fail("rtol", rtol, "must be > 0.")
    if not isinstance(group_consistent, bool):
        raise _fail("group_consistent", group_consistent, "must be True or False.")
    if not _is_int(verify_batches) or verify_batches < 0:
        raise _fail("verify_batches", verify_batches, "must be an int >= 0 (0 verifies on the example input only).")
    if not isinstance(measure_latency, bool):
        raise _fail("measure_latency", measure_latency, "must be True or False.")
    if round_to is not None and (not _is_int(round_to) or round_to < 1):
        raise _fail("round_to", round_to, "must be an int >= 1 (1: no rounding; 8 suits GPU tensor cores) or None.")
    if not isinstance(whole_channel, bool):
        raise _fail("whole_channel", whole_channel, "must be True or False.")
    _deploy_formats(deploy_formats)
    if gather_full_state is not None and not isinstance(gather_full_state, bool):
        raise _fail("gather_full_state", gather_full_state, "must be True, False or None.")
    _recovery(pruner, masks, prune_on_epoch, ranking, min_channels, schedule, distill, finetune)
    if calibration_batches is not None and (not _is_int(calibration_batches) or calibration_batches < 1):
        raise _fail(
            "calibration_batches",
            calibration_batches,
            "must be an int >= 1: how many training batches `pruner='activation'` runs forward before a prune at fit start.",
        )
    if calibration_batches is not None and pruner != "activation":
        raise _fail(
            "calibration_batches",
            calibration_batches,
            f"is read by `pruner='activation'` alone (the pruner is {pruner!r}). HINT: choose that pruner, or leave "
            "`calibration_batches` out.",
        )


def _recovery(
    pruner: Any,
    masks: Any,
    prune_on_epoch: Any,
    ranking: Any,
    min_channels: Any,
    schedule: Any,
    distill: Any,
    finetune: Any,
) -> None:
    """The accuracy-recovery arguments: our importance measures, the schedule, distillation, the fine-tune size."""
    if ranking not in RANKINGS:
        raise _fail(
            "ranking", ranking, f"must be one of {list(RANKINGS)} ('global' ranks every group of the model together)."
        )
    if not _is_int(min_channels) or min_channels < 1:
        raise _fail("min_channels", min_channels, "must be an int >= 1 (the fewest channels a pruned layer keeps).")
    if finetune not in FINETUNE:
        raise _fail("finetune", finetune, f"must be one of {list(FINETUNE)}.")
    distill_settings(distill)
    ours = pruner in IMPORTANCES or (pruner == "auto" and masks is None)
    if schedule is not None:
        steps = Schedule.from_argument(schedule)
        if not ours:
            shown = pruner if isinstance(pruner, (str, type(None))) else type(pruner).__name__
            raise ConfigurationError(
                f"`PruneExportCallback(pruner={shown!r}, schedule=...)`: a schedule prunes step by step with this "
                f"package's own importance measures; choose `pruner` from {list(IMPORTANCES)}."
            )
        if prune_on_epoch != 0:
            raise ConfigurationError(
                f"`PruneExportCallback(prune_on_epoch={prune_on_epoch}, schedule=...)`: the schedule's 'start_epoch' "
                "says when pruning starts; leave `prune_on_epoch` at 0."
            )
        first = steps.start_epoch
    else:
        first = prune_on_epoch
    if pruner == "taylor" and first == 0:
        where = "schedule={'start_epoch': 0, ...}" if schedule is not None else "prune_on_epoch=0"
        raise ConfigurationError(
            f"`PruneExportCallback(pruner='taylor', {where})`: Taylor importance is measured from the gradients "
            "of training steps, and none have run when training starts. HINT: prune after an epoch of training "
            "(`prune_on_epoch=1`, or a schedule with 'start_epoch' >= 1)."
        )


def _deploy_formats(formats: Any) -> None:
    if formats is None:
        return
    if isinstance(formats, str) or not isinstance(formats, (list, tuple)) or not set(formats) <= set(DEPLOY_FORMATS):
        raise _fail(
            "deploy_formats", formats, f"must be a list drawn from {list(DEPLOY_FORMATS)}, e.g. ['onnx', 'pt2']."
        )
    missing = [name for name in ONNX_PACKAGES if "onnx" in formats and importlib.util.find_spec(name) is None]
    if missing:
        raise _fail("deploy_formats", formats, f"needs {', '.join(missing)}: `pip install 'lightning-prune[deploy]'`.")


def writable_problem(directory: str) -> str | None:
    """Why files cannot be written in ``directory`` (created if missing), or ``None`` when they can."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def is_sharded(strategy: Any) -> bool:
    """Whether parameters are sharded across ranks (FSDP, DeepSpeed, model parallel): export needs the full state."""
    return any(
        cls.__name__ in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy") for cls in type(strategy).__mro__
    )


def check_epochs(trainer: Any, schedule: Schedule | None, prune_on_epoch: int) -> None:
    """Raise in ``setup`` when a pruning step's epoch is one the trainer never starts.

    A step at epoch ``e`` prunes at the start of epoch ``e``, so it needs ``e < max_epochs`` (the
    epochs are ``0 .. max_epochs - 1``), leaving the epochs after the last step for fine-tuning.
    ``max_epochs=-1`` (a ``max_steps``-only trainer) and ``fast_dev_run`` do not say how many epochs
    run: nothing is checked, and a run that ends before the last step warns at its end.
    """
    limit = trainer.max_epochs
    if limit is None or limit < 0 or trainer.fast_dev_run:
        return
    if schedule is None:
        if prune_on_epoch >= limit:
            raise _fail(
                "prune_on_epoch",
                prune_on_epoch,
                f"is not an epoch of this run: the trainer's max_epochs={limit} runs epochs 0 to {limit - 1}, so "
                "nothing would be pruned or exported. HINT: lower `prune_on_epoch` or raise `max_epochs`.",
            )
        return
    if schedule.end_epoch < limit:
        return
    shown = {"start_epoch": schedule.start_epoch, "end_epoch": schedule.end_epoch, "steps": schedule.steps}
    key = "start_epoch" if schedule.start_epoch >= limit else "end_epoch"
    runs = len(schedule.due(limit - 1, 0))
    raise _fail(
        "schedule",
        shown,
        f"has '{key}': {shown[key]}, but the trainer's max_epochs={limit} runs epochs 0 to {limit - 1}: only {runs} "
        f"of its {schedule.steps} steps would run and a partly pruned model would be exported. HINT: raise "
        "`max_epochs` past 'end_epoch' (the epochs after it fine-tune at the final sparsity) or end the schedule sooner.",
    )
