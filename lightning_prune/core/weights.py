"""A model's weights read from a file one module at a time, into a skeleton on the meta device.

Export from disk (:func:`~lightning_prune.core.from_file.export_from_file`) never holds the dense
model whole: the trace, the plan, the shrink and the block-by-block check each bring in the tensors
of the module they need and let them go after. The file is a safetensors file (read with plain
positioned reads, so the pages read are the page cache's, not the process's) or a ``torch.save``
state dict (memory-mapped: the pages read are the file's, which the OS can drop).

>>> import os, tempfile
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
>>> torch.save(model.state_dict(), path)
>>> with parameters_on_meta():
...     skeleton = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> weights = StreamedWeights(skeleton, path)
>>> _ = weights.load("0"); skeleton[0].weight.device.type
'cpu'
>>> weights.release("0"); skeleton[0].weight.device.type
'meta'
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn

from lightning_prune.core.errors import CheckpointError
from lightning_prune.core.modules import SwappedTensors, own_tensors, qualified_name, tensor_places

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

Prepare = Callable[[str, nn.Module], None]
"""``prepare(module name, module)``: called on a module once its own tensors are loaded (export zeroes
the pruned channels there, so the loaded module is the masked one)."""


class TensorSource(Protocol):
    """Gives modules their tensors for a while: what the tracer and the shrink load module by module
    (:class:`StreamedWeights` from a file; ``graph.masked_view.MaskedView`` zeroed copies in memory)."""

    def owned(self, module: nn.Module) -> bool:
        """Whether :meth:`load` gives ``module`` tensors of its own."""

    def load(self, name: str) -> nn.Module:
        """Give module ``name`` its tensors; returns it."""

    def release(self, name: str) -> None:
        """Take back what :meth:`load` gave module ``name``."""

    def keep(self, name: str) -> None:
        """Leave module ``name`` with what :meth:`load` gave it, for good."""

    def output_cut(self, name: str) -> Tensor | None:
        """The output channels of module ``name`` that :meth:`load` only zeroes (a traced pass may zero the
        layer's output there instead of loading it), or ``None``: it must be loaded."""


class TensorStore(Protocol):
    """Tensors by name, read one at a time: a :class:`WeightFile`, a :class:`~.sharded.GatheredState`."""

    path: str  # what errors name

    def keys(self) -> set[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> Tensor: ...


class Loading:
    """Stands for a model whose submodules a :class:`TensorSource` loads on demand (``get_submodule``,
    what the plan reads for a bias fold); :meth:`release` gives back all it loaded."""

    def __init__(self, source: TensorSource, model: nn.Module) -> None:
        self.source, self.model = source, model
        self.names: list[str] = []

    def get_submodule(self, name: str) -> nn.Module:
        """Module ``name`` with its tensors loaded (if the source holds any for it)."""
        module = self.model.get_submodule(name)
        if not self.source.owned(module):
            return module
        self.names.append(name)
        return self.source.load(name)

    def release(self) -> None:
        """Give back everything :meth:`get_submodule` loaded."""
        for name in self.names:
            self.source.release(name)
        self.names.clear()


class WeightFile:
    """The tensors of a safetensors file or a ``torch.save`` state dict, read one at a time by name."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"Weights file '{self.path}' does not exist; pass the state dict file of the model.")
        self._header: dict[str, dict] | None = None
        self._state: dict[str, Tensor] | None = None
        with open(self.path, "rb") as stream:
            start = stream.read(8)
            try:
                size = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
                header = json.loads(stream.read(size)) if 0 < size < 1 << 30 else None
            except (ValueError, UnicodeDecodeError):
                header = None
        if isinstance(header, dict):  # safetensors: 8-byte header size, a JSON header, then the data
            header.pop("__metadata__", None)
            self._header, self._data_start = header, 8 + size
            return
        try:
            state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # torch raises several types for corrupt or foreign files
            raise CheckpointError(
                f"Weights file '{self.path}' is neither safetensors nor a torch.save state dict loadable with "
                f"weights_only=True ({type(err).__name__}: {err}). Save the model's state_dict() to it."
            ) from err
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(
                f"Weights file '{self.path}' holds a {type(state).__name__}, not a state dict of tensors; "
                "save model.state_dict()."
            )
        self._state = state

    def keys(self) -> set[str]:
        """The names of the tensors the file holds."""
        return set(self._header if self._header is not None else self._state or {})

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor ``key``, read from the header (nothing is loaded)."""
        if self._state is not None:
            return tuple(self._state[key].shape)
        return tuple(self._header[key]["shape"])  # type: ignore[index]

    def get(self, key: str) -> Tensor:
        """The tensor ``key``, as a new CPU tensor the caller owns."""
        if self._state is not None:
            return self._state[key].clone()
        entry = self._header[key]  # type: ignore[index]
        begin, end = entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"Weights file '{self.path}': tensor '{key}' has dtype {entry['dtype']}, not supported."
            )
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as stream:
            stream.seek(self._data_start + begin)
            if stream.readinto(memoryview(buffer.numpy())) != end - begin:
                raise CheckpointError(f"Weights file '{self.path}' is truncated: tensor '{key}' ends past its end.")
        return buffer.view(dtype).reshape(entry["shape"])


class StreamedWeights(SwappedTensors):
    """Loads a skeleton's tensors from a file (or any :class:`TensorStore`) module by module, and gives them back.

    ``model`` is the skeleton (its parameters on the meta device; buffers the file lacks, such as
    rotary frequencies, may be real and are left alone). ``load(name)`` gives the module ``name`` its
    own tensors from the file, cast to the skeleton's dtype, and calls ``prepare`` on it;
    ``release(name)`` puts meta tensors back. A tensor tied to another (an LM head sharing the
    embedding) is read under whichever of its names the file holds.
    """

    def __init__(self, model: nn.Module, path: str | os.PathLike | TensorStore, prepare: Prepare | None = None) -> None:
        super().__init__(model)
        self.file = WeightFile(path) if isinstance(path, (str, os.PathLike)) else path
        self.prepare = prepare
        self.names = {id(module): name for name, module in model.named_modules()}
        keys = self.file.keys()
        self._key: dict[int, str] = {}  # id of a skeleton tensor -> its key in the file
        missing = []
        for places in tensor_places(model).values():
            module, attr = places[0]
            tensor = _held(module, attr)
            names = [qualified_name(self.names[id(m)], a) for m, a in places]
            key = next((n for n in names if n in keys), None)
            if key is not None and self.file.shape(key) != tuple(tensor.shape):
                raise CheckpointError(
                    f"Weights file '{self.file.path}': tensor '{key}' has shape {self.file.shape(key)}, but the "
                    f"skeleton's '{names[0]}' has {tuple(tensor.shape)}. Build the skeleton with the checkpoint's "
                    "configuration."
                )
            if key is not None:
                self._key[id(tensor)] = key
            elif tensor.is_meta:
                missing.append(names[0])
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise CheckpointError(
                f"Weights file '{self.file.path}' lacks {len(missing)} tensor(s) the skeleton holds on the meta device: "
                f"{shown}. Save the model's full state_dict(), or give those tensors real values in the skeleton."
            )
        self.dtype: torch.dtype | None = None  # floating tensors are loaded in this dtype (None: the skeleton's)

    def owned(self, module: nn.Module) -> bool:
        """Whether ``module`` holds tensors of its own that the file gives."""
        return any(id(t) in self._key for t in own_tensors(module).values())

    def load(self, name: str) -> nn.Module:
        """Give module ``name`` its own tensors from the file (no-op if it has them already); returns it."""
        module = self.model.get_submodule(name)
        if name in self._saved:
            return module
        saved = {}
        with torch.no_grad():
            for attr, tensor in own_tensors(module).items():
                key = self._key.get(id(tensor))
                if key is None:
                    continue
                saved[attr] = tensor
                value = self.file.get(key)
                dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
                _put(module, attr, value.to(dtype))
        self._saved[name] = saved
        if saved and self.prepare is not None:
            self.prepare(name, module)
        return module

    def output_cut(self, name: str) -> None:
        """``None``: a file's tensors are read, never only zeroed."""
        return None

    @contextmanager
    def loaded(self, name: str, dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
        """Module ``name`` with the tensors of its whole subtree loaded inside the block (floating ones in
        ``dtype``, if given), released after it."""
        module = self.model.get_submodule(name)
        fresh = [n for n in self._owned_under(name) if n not in self._saved]
        self.dtype, before = dtype, self.dtype
        try:
            for n in fresh:
                self.load(n)
            yield module
        finally:
            self.dtype = before
            for n in fresh:
                self.release(n)

    def load_subtree(self, name: str) -> None:
        """Load and keep the tensors of module ``name`` and everything under it."""
        for owned in self._owned_under(name):
            self.load(owned)
            self.keep(owned)

    def _owned_under(self, name: str) -> list[str]:
        """Module ``name`` and the modules under it that hold tensors the file gives."""
        return [qualified_name(name, n) for n, m in self.model.get_submodule(name).named_modules() if self.owned(m)]


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside the block get their parameters on the meta device (no memory) and their
    buffers as usual, so buffers a checkpoint does not hold (rotary frequencies) have their values."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _held(module: nn.Module, attr: str) -> Tensor:
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def _put(module: nn.Module, attr: str, value: Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = value


__all__ = [
    "Loading",
    "Prepare",
    "StreamedWeights",
    "SwappedTensors",
    "TensorSource",
    "TensorStore",
    "WeightFile",
    "parameters_on_meta",
]
