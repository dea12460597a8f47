"""One ``torch.export`` capture of a model, and the bytes of its deployable files.

What :mod:`~lightning_prune.core.files.deploy` writes comes from here: a model's example input split into
positional and keyword arguments, an exported program with a dynamic batch axis where the model's
code allows one, and that program as ONNX (torch's exporter) or as a ``.pt2`` archive.
"""

from __future__ import annotations

import importlib
import inspect
import io
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from lightning_prune.core.errors import ConfigurationError
from lightning_prune.core.modules import evaluating

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
"""What writing and checking ``pruned.onnx`` needs: the optional ``deploy`` extra."""
_EXTRA_HINT = "Install them with: pip install 'lightning-prune[deploy]' (or pip install onnx onnxscript onnxruntime)."


# --- inputs -------------------------------------------------------------------------------------


def signature_order(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword inputs in the order of ``model.forward``'s parameters (then any others, as given):
    the order the exported graph's inputs take, whatever order a batch's dict has."""
    try:
        names = [n for n in inspect.signature(model.forward).parameters if n in inputs]
    except (TypeError, ValueError):
        names = []
    return {**{n: inputs[n] for n in names}, **{n: v for n, v in inputs.items() if n not in names}}


def split_arguments(model: nn.Module, inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``inputs`` in :func:`~lightning_prune.core.trace.records.call_model`'s convention as ``(args, kwargs)``:
    a tensor is one positional input, a tuple or list several, a dict keywords."""
    if isinstance(inputs, Mapping):
        return (), signature_order(model, inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def tensor_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    return [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, Tensor)]


def batch_inputs(batch: Any) -> Any:
    """The inputs of one verification batch: ``(inputs, target)`` as :func:`~lightning_prune.core.verify.equivalence.verify_on_batches`
    takes them, or a bare tensor or dict of inputs."""
    if isinstance(batch, (Tensor, Mapping)):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    raise ConfigurationError(
        f"A verification batch must be (inputs, target) (target may be None), a tensor or a dict of inputs; "
        f"got a {type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}. "
        f"Wrap a tuple of positional inputs as ((x1, x2), None)."
    )


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def leading_batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    tensors = [t for t in tensor_arguments(args, kwargs) if t.ndim > 0]
    return int(tensors[0].shape[0]) if tensors else None


# --- export -------------------------------------------------------------------------------------


def export_program(model: nn.Module, example_input: Any) -> tuple[torch.export.ExportedProgram, bool]:
    """``torch.export`` of what ``model(example_input)`` computes in eval mode, with dim 0 of every input
    whose dim 0 is the batch size dynamic where the model allows it; returns the program and whether
    the batch is dynamic. An example batch of one is doubled for tracing (torch.export specialises size 1)."""
    args, kwargs = split_arguments(model, example_input)
    batch = leading_batch_size(args, kwargs)
    name = type(model).__name__
    with evaluating(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if batch is not None and batch > 0:
            dim = torch.export.Dim("batch", min=1)

            def widen(leaf: Any) -> Any:
                return (
                    torch.cat([leaf, leaf])
                    if isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] == 1 == batch
                    else leaf
                )

            def spec(leaf: Any) -> Any:
                return {0: dim} if isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] == batch else None

            traced_args, traced_kwargs = tree_map(widen, args), tree_map(widen, kwargs)
            shapes: Any = (
                {k: tree_map(spec, v) for k, v in kwargs.items()} if kwargs else tuple(tree_map(spec, a) for a in args)
            )
            try:
                return torch.export.export(model, traced_args, traced_kwargs, dynamic_shapes=shapes), True
            except Exception as err:  # batch-dependent control flow, say: fall back to the example's shapes
                reason = f"{type(err).__name__}: {first_line(err)}"
        else:
            reason = "its inputs have no batch dimension"
        try:
            program = torch.export.export(model, args, kwargs)
        except Exception as err:
            raise ConfigurationError(
                f"torch.export could not capture the {name} on the example input: {type(err).__name__}: {err}. "
                f"Deployable files need a model torch.export can trace (no data-dependent Python control flow); "
                f"see https://pytorch.org/docs/stable/export.html."
            ) from err
    warnings.warn(
        f"The {name} was exported with a fixed batch size of {batch} ({reason}); the files accept only that size.",
        stacklevel=3,
    )
    return program, False


def require_packages(*packages: str, purpose: str) -> None:
    """Import the optional ``packages`` or raise a ConfigurationError naming the missing ones."""
    missing = []
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ConfigurationError(
            f"{purpose} needs the optional package{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
            f"which could not be imported. {_EXTRA_HINT}"
        )


def onnx_bytes(program: torch.export.ExportedProgram, opset: int | None, name: str) -> bytes:
    """The ONNX file for ``program`` (the captured ``name``), from torch's ONNX exporter."""
    require_packages("onnx", "onnxscript", purpose="Writing ONNX")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False)
    except Exception as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # the exporter colours its messages
        cause = next((line.strip() for line in text.splitlines() if line.strip().startswith("<class")), "")
        raise ConfigurationError(
            f"torch's ONNX exporter could not convert the {name}: {type(err).__name__}: {cause or first_line(err)}. "
            f"An op without an ONNX translation cannot go to ONNX; the pt2 file does not need one "
            f"(formats=['pt2'])."
        ) from err
    return onnx_program.model_proto.SerializeToString()


def pt2_bytes(program: torch.export.ExportedProgram) -> bytes:
    """The archive in memory: written straight to a failing file (a full disk), torch's zip writer aborts
    the process from a destructor instead of raising, so the bytes are written by Python."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()
