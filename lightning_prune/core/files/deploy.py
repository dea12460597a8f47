"""Deployable files of an exported network: ``pruned.onnx`` and ``pruned.pt2``, each checked numerically.

The exported (smaller) network is plain PyTorch; these functions turn it into files that run
without its Python code: ONNX (checked in ONNX Runtime, with a dynamic batch axis on every input
and output) and a ``torch.export`` program (``torch.export.load(path).module()`` runs it). Each
file is written to a temporary name beside its target and renamed, like the checkpoints, and is
compared with the model on real batches before it lands.

``onnx``, ``onnxscript`` (torch's ONNX exporter) and ``onnxruntime`` are the optional ``deploy``
extra: ``pip install 'lightning-prune[deploy]'``. ``pt2`` needs torch alone.

>>> import os, tempfile, torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
>>> directory = tempfile.mkdtemp()
>>> report = save_deployables(model, torch.randn(1, 3, 8, 8), directory, ["pt2"], batches=[torch.randn(5, 3, 8, 8)])
>>> os.path.basename(report["pt2"]["path"]), report["pt2"]["batches"], report["pt2"]["dynamic_batch"]
('pruned.pt2', 1, True)
>>> torch.export.load(report["pt2"]["path"]).module()(torch.randn(3, 3, 8, 8)).shape
torch.Size([3, 2])
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_prune.core.errors import ConfigurationError, VerificationError
from lightning_prune.core.files.atomic import atomic_write
from lightning_prune.core.files.capture import (
    ONNX_PACKAGES,
    batch_inputs,
    export_program,
    first_line,
    leading_batch_size,
    onnx_bytes,
    pt2_bytes,
    require_packages,
    signature_order,
    split_arguments,
    tensor_arguments,
)
from lightning_prune.core.modules import evaluating
from lightning_prune.core.verify.equivalence import compare_outputs
from lightning_prune.core.verify.report import compare_latency, latency_is_noise

DEPLOY_FORMATS = ("onnx", "pt2")
FILE_NAMES = {"onnx": "pruned.onnx", "pt2": "pruned.pt2"}
DEFAULT_RTOL = {"onnx": 1e-4, "pt2": 1e-5}


def save_onnx(model: nn.Module, example_input: Any, path: str | os.PathLike, *, opset: int | None = None) -> str:
    """Write what ``model(example_input)`` computes (eval mode) as an ONNX file; returns the path.

    Every input and output has a dynamic batch axis (dim 0 of each input whose dim 0 is the batch
    size), unless the model's code fixes it, which is warned about. Inputs follow
    :func:`~lightning_prune.core.trace.records.call_model`: a tensor, a tuple of positional tensors or a dict of
    keyword tensors. A LightningModule is exported as its ``forward``. The graph comes from
    ``torch.export`` through torch's ONNX exporter (``opset`` defaults to the exporter's); the file is
    written to a temporary name and renamed. Needs ``onnx`` and ``onnxscript``
    (:class:`~lightning_prune.core.errors.ConfigurationError` otherwise). The model is not modified.
    """
    path = os.fspath(path)
    require_packages("onnx", "onnxscript", purpose=f"save_onnx('{path}')")
    program, _ = export_program(model, example_input)
    data = onnx_bytes(program, opset, type(model).__name__)
    atomic_write(path, lambda stream: stream.write(data))
    return path


def save_pt2(model: nn.Module, example_input: Any, path: str | os.PathLike) -> str:
    """Write what ``model(example_input)`` computes (eval mode) as a ``torch.export`` archive; returns the path.

    ``torch.export.load(path).module()`` runs it with no model code. The batch dimension (dim 0 of
    each input whose dim 0 is the batch size) is dynamic where the model allows it; where its code
    fixes the batch, the program takes the example's size, with a warning. The file is written to a
    temporary name and renamed. The model is not modified.
    """
    path = os.fspath(path)
    program, _ = export_program(model, example_input)
    data = pt2_bytes(program)
    atomic_write(path, lambda stream: stream.write(data))
    return path


# --- running and checking the files -------------------------------------------------------------


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by an ONNX Runtime session, called like the model it came from.

    Inputs follow :func:`~lightning_prune.core.trace.records.call_model` (keywords in the order of the original
    ``forward`` where ``reference`` is given, else as given); tensor inputs are fed to the graph's
    inputs in order. Returns a tensor for a one-output graph, else a list of tensors (the model's
    output tensors, flattened). ``providers`` defaults to the CPU provider; ``threads`` sets ONNX
    Runtime's intra-op thread count (default: its own choice, one per physical core).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        reference: nn.Module | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        require_packages("onnxruntime", purpose=f"Running '{self.path}' in ONNX Runtime")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(self.path, options, providers=list(providers))
        except Exception as err:
            raise VerificationError(
                f"ONNX Runtime could not load '{self.path}': {err}. Re-export it with save_onnx."
            ) from err
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._order = reference

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | list[Tensor]:
        """Run the session on the tensor inputs; outputs come back as CPU tensors."""
        if kwargs and self._order is not None:
            kwargs = signature_order(self._order, kwargs)
        tensors = tensor_arguments(args, kwargs)
        if len(tensors) != len(self.input_names):
            raise VerificationError(
                f"'{self.path}' takes {len(self.input_names)} inputs ({', '.join(self.input_names)}); "
                f"got {len(tensors)} tensors. Pass the inputs the model was exported with."
            )
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, tensors, strict=True)}
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else outputs


def _format_of(path: str, format: str | None) -> str:
    if format is not None:
        if format not in DEPLOY_FORMATS:
            raise ConfigurationError(
                f"Unknown deploy format {format!r} for '{path}'; expected one of {', '.join(DEPLOY_FORMATS)}."
            )
        return format
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension in DEPLOY_FORMATS:
        return extension
    if zipfile.is_zipfile(path):
        return "pt2"
    raise ConfigurationError(
        f"Cannot tell the format of '{path}' from its name: expected a file ending in .onnx or .pt2. "
        f"Pass format='onnx' or format='pt2'."
    )


@torch.no_grad()
def _check(
    path: str, label: str, format: str, reference_model: nn.Module, batches: Iterable[Any], rtol: float
) -> dict[str, Any]:
    """Run the file at ``path`` (named ``label`` in messages) on every batch against the reference."""
    if not os.path.isfile(path):
        raise VerificationError(f"Deployed file '{label}' does not exist. Write it with save_onnx / save_pt2 first.")
    if format == "onnx":
        runner: Callable[..., Any] = OnnxRuntimeModel(path, reference=reference_model)
    else:
        try:
            with open(path, "rb") as stream:  # a stream: the temporary name does not end in .pt2
                runner = torch.export.load(stream).module()
        except Exception as err:
            raise VerificationError(
                f"torch.export.load could not load '{label}': {err}. Re-export it with save_pt2."
            ) from err
    worst, count, sizes = 0.0, 0, []
    with evaluating(reference_model):
        for index, batch in enumerate(batches):
            args, kwargs = split_arguments(reference_model, batch_inputs(batch))
            expected = reference_model(*args, **kwargs)
            try:
                got = runner(*args, **kwargs)
            except VerificationError:
                raise
            except Exception as err:
                raise VerificationError(
                    f"Deployed file '{label}' failed to run on batch {index} (batch size {leading_batch_size(args, kwargs)}): "
                    f"{type(err).__name__}: {first_line(err)}. A file exported with a fixed batch size runs only "
                    f"that size; check the inputs match the example the file was exported with."
                ) from err
            reference_leaves = [leaf.detach().cpu() for leaf in tree_flatten(expected)[0] if isinstance(leaf, Tensor)]
            got_leaves = [leaf.detach().cpu() for leaf in tree_flatten(got)[0] if isinstance(leaf, Tensor)]
            if len(got_leaves) != len(reference_leaves):
                raise VerificationError(
                    f"Deployed file '{label}' gives {len(got_leaves)} output tensors on batch {index}; the model gives "
                    f"{len(reference_leaves)}. Was it exported from another model? Re-export it."
                )
            comparison = compare_outputs(reference_leaves, got_leaves, rtol)
            worst, count = max(worst, comparison.max_relative_error), count + 1
            sizes.append(leading_batch_size(args, kwargs))
            if not comparison.passed:
                raise VerificationError(
                    f"Deployed file '{label}' differs from the model on batch {index}: max relative error "
                    f"{comparison.max_relative_error:.2e}, expected at most rtol {rtol:g}. "
                    + (f"{comparison.problem}. " if comparison.problem else "")
                    + "Was it exported from another model, or is the tolerance too tight for this runtime?"
                )
    if count == 0:
        raise ConfigurationError(
            f"check_deployed('{label}') got no batches; pass at least one (inputs, target) batch or input."
        )
    return {"format": format, "max_relative_error": worst, "batches": count, "batch_sizes": sizes, "rtol": rtol}


def check_deployed(
    path: str | os.PathLike,
    reference_model: nn.Module,
    batches: Iterable[Any],
    *,
    rtol: float | None = None,
    format: str | None = None,
) -> dict[str, Any]:
    """Run a deployed file on every batch and compare it with ``reference_model`` in eval mode.

    ``.onnx`` files run in ONNX Runtime (CPU), ``.pt2`` files through ``torch.export.load(path).module()``
    (``format=`` names the format of a file named otherwise). ``batches`` holds ``(inputs, target)``
    pairs as :func:`~lightning_prune.core.verify.equivalence.verify_on_batches` takes them (the target is not used) or
    bare inputs (a tensor or dict); inputs follow :func:`~lightning_prune.core.trace.records.call_model`. ``rtol``
    bounds the relative error ``||file - model|| / ||model||`` of every output tensor (default 1e-4
    for ONNX, 1e-5 for pt2). Returns ``{"format", "path", "max_relative_error", "batches",
    "batch_sizes", "rtol"}``; raises :class:`~lightning_prune.core.errors.VerificationError` naming the file
    and the batch where it differs or fails to run.
    """
    path = os.fspath(path)
    fmt = _format_of(path, format)
    if fmt == "onnx":
        require_packages("onnxruntime", purpose=f"check_deployed('{path}')")
    result = _check(path, path, fmt, reference_model, batches, DEFAULT_RTOL[fmt] if rtol is None else rtol)
    return {"path": path, **result}


def save_deployables(
    model: nn.Module,
    example_input: Any,
    directory: str | os.PathLike,
    formats: Iterable[str] = DEPLOY_FORMATS,
    batches: Iterable[Any] = (),
    *,
    rtol_onnx: float = 1e-4,
    rtol_pt2: float = 1e-5,
    opset: int | None = None,
    latency_budget_s: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Write ``pruned.onnx`` and/or ``pruned.pt2`` for ``model`` into ``directory``, each checked before it lands.

    ``model`` is what you deploy (the exported network, or a LightningModule around it: what
    ``model(example_input)`` computes in eval mode is exported). One ``torch.export`` capture (dynamic
    batch where the model allows) feeds both formats. Each file is written to a temporary name,
    checked against ``model`` on ``batches`` (``(inputs, target)`` pairs or bare inputs; the example
    input when there are none) with :func:`check_deployed`, and only then renamed onto its target: a
    file that fails leaves the previous one, if any, in place, and raises
    :class:`~lightning_prune.core.errors.VerificationError` naming it. With ``latency_budget_s > 0`` the ONNX
    entry also times ONNX Runtime against torch eager on the example input, interleaved
    (:func:`~lightning_prune.core.verify.report.compare_latency`).

    Returns, per format, ``{"path", "size_bytes", "format", "max_relative_error", "batches",
    "batch_sizes", "rtol", "dynamic_batch"}`` (plus ``latency_ms``, ``latency_iqr_ms``,
    ``torch_latency_ms``, ``torch_latency_iqr_ms``, ``latency_within_noise`` for ONNX when timed).
    Unknown formats and missing optional packages raise
    :class:`~lightning_prune.core.errors.ConfigurationError` before anything is written.
    """
    formats = list(formats)
    unknown = [f for f in formats if f not in DEPLOY_FORMATS]
    if unknown or not formats:
        named = ", ".join(map(repr, unknown)) or "(none given)"
        raise ConfigurationError(
            f"save_deployables: unknown deploy format{'s' if len(unknown) > 1 else ''} {named}; "
            f"expected some of {', '.join(map(repr, DEPLOY_FORMATS))}."
        )
    if "onnx" in formats:
        require_packages(*ONNX_PACKAGES, purpose="save_deployables(formats=['onnx'])")
    directory = os.fspath(directory)
    batches = list(batches) or [(example_input, None)]
    program, dynamic = export_program(model, example_input)
    rtol = {"onnx": rtol_onnx, "pt2": rtol_pt2}
    reports: dict[str, dict[str, Any]] = {}
    for fmt in dict.fromkeys(formats):
        target = os.path.join(directory, FILE_NAMES[fmt])
        data = onnx_bytes(program, opset, type(model).__name__) if fmt == "onnx" else pt2_bytes(program)
        result = atomic_write(
            target,
            lambda stream, data=data: stream.write(data),
            lambda temporary, fmt=fmt, target=target: _check(temporary, target, fmt, model, batches, rtol[fmt]),
        )
        reports[fmt] = {"path": target, "size_bytes": os.path.getsize(target), **result, "dynamic_batch": dynamic}
    if "onnx" in reports and latency_budget_s > 0:
        times = compare_latency(
            {"torch": model, "onnxruntime": OnnxRuntimeModel(reports["onnx"]["path"], reference=model)},
            example_input,
            budget_s=latency_budget_s,
        )
        reports["onnx"].update(
            latency_ms=times["onnxruntime"].median_ms,
            latency_iqr_ms=times["onnxruntime"].spread_ms,
            torch_latency_ms=times["torch"].median_ms,
            torch_latency_iqr_ms=times["torch"].spread_ms,
            latency_within_noise=latency_is_noise(times["torch"], times["onnxruntime"]),
        )
    return reports


__all__: Sequence[str] = [
    "DEFAULT_RTOL",
    "DEPLOY_FORMATS",
    "FILE_NAMES",
    "OnnxRuntimeModel",
    "check_deployed",
    "save_deployables",
    "save_onnx",
    "save_pt2",
]
