"""Trace a masked conv or linear layer on its own weights, computing its kept outputs instead of copying them.

A layer whose pruned filters and biases are zero outputs zero at those channels and, at every other
channel, what it outputs with its own weights. So where a source's :meth:`output_cut` says that zeroing
those output channels is all its loading would do (a plain conv or linear layer of the masked model),
the traced pass does not load the layer: its conv or linear call runs on the rows of the layer's own
tensors that the cut keeps, and the output is zero at the cut channels (:meth:`MaskedOutputs.call`; the
arithmetic of the pruned channels, half a 50% pruned layer's, is not done at all, in place or not). A
copy of every masked weight was, after the arithmetic, the largest cost of a trace (0.1 s of a
ResNet50's, in fresh memory each time). Any other op that reads the layer's tensors (a parent reading a
child's weight, as ``nn.MultiheadAttention`` reads ``out_proj``'s; a view; ``.data``) loads the layer
then and gets its zeroed tensors, as does every later op given the layer's own (one read before the
load). An untraced pass over the masked model (the masks' own output) does the same under
:class:`ZeroingOutputs`.

The call also leaves out the input channels that hold one value everywhere, where a quarter or more do
(a pruned channel of the layer before it: zero with ``whole_channel``, else what its norm's shift makes
of zero): a zero channel adds nothing, and where the layer has no padding a constant one adds the same to
every output, which goes into the bias. With ``whole_channel``, a 50% pruned ResNet50's trace then does about a
quarter of the dense model's conv arithmetic, not a half.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_prune.core.trace.constants import LastConstants, kernel_sums, without_padding
from lightning_prune.core.trace.records import argument, leaves, replace_tensors
from lightning_prune.core.weights import TensorSource

if TYPE_CHECKING:
    from lightning_prune.core.trace.bookkeeping import Bookkeeping

_OUTPUT_DIM = {"linear": -1, "conv1d": 1, "conv2d": 1, "conv3d": 1}  # batched; unbatched convs: 0
_ATTRIBUTES = ("weight", "bias")


class MaskedOutputs:
    """The layers a traced pass runs on their own tensors, and what to zero in their outputs (see the module docstring)."""

    def __init__(
        self, modules: dict[str, nn.Module], source: TensorSource | None, constants: LastConstants | None = None
    ) -> None:
        self.constants = constants or LastConstants()  # the traced pass's: its rules read the same inputs
        self.modules = modules  # by name (the tracer's dict: this one holds no tracer, so no cycle keeps its tensors)
        self.source = source
        self.pending: dict[int, tuple[Tensor, str]] = {}  # id(tensor) -> (tensor, its layer) of deferred layers
        self.cuts: dict[str, Tensor] = {}  # deferred layer -> the output channels to zero
        # deferred layers an op loaded after all: id of each own tensor -> its zeroed copy, which every later op
        # gets for it (a tensor read before the load, as torchvision's Swin V2 attention reads qkv.weight)
        self.loaded: dict[str, dict[int, Tensor]] = {}
        # the kept rows of each call's weight, and their columns for live inputs, in two buffers the pass reuses: a
        # fresh copy per call left the allocator holding freed layer-sized blocks (a 1.1B LLaMA in place peaked at
        # 1.28x-1.50x its size)
        self._buffers: list[Tensor | None] = [None, None]

    def defer(self, name: str) -> bool:
        """Whether layer ``name``, about to run, need not be loaded (its kept outputs are computed instead, :meth:`call`)."""
        cut = self.source.output_cut(name) if self.source is not None else None
        if cut is None:
            return False
        self.cuts[name] = cut
        module = self.modules[name]
        for attr in _ATTRIBUTES:
            if (tensor := module._parameters.get(attr)) is not None:
                self.pending[id(tensor)] = (tensor, name)
        return True

    def finish(self, name: str) -> bool:
        """Layer ``name`` has run: whether it was deferred and never loaded (there is nothing to give back)."""
        if self.cuts.pop(name, None) is None:
            return False
        self.pending = {key: entry for key, entry in self.pending.items() if entry[1] != name}
        return self.loaded.pop(name, None) is None

    def prepare(
        self, tracer: Bookkeeping | None, op: str, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict, tuple[int, Tensor] | None]:
        """Before op ``op`` runs: its arguments, and ``(dim, channels)`` to zero in its output where it is a
        deferred layer's own conv or linear call. Any other op that reads a deferred layer's tensors loads
        the layer (``tracer``, if given, is told) and gets its zeroed tensors in place of the others."""
        found = {
            entry[1]
            for x in leaves((args, kwargs))
            if isinstance(x, Tensor) and (entry := self.pending.get(id(x))) is not None and entry[0] is x
        }
        if not found:
            return args, kwargs, None
        if op in _OUTPUT_DIM and len(found) == 1 and not self.loaded.keys() & found:
            (name,) = found
            own = self.modules[name]._parameters
            data, weight = argument(args, kwargs, 0, "input"), argument(args, kwargs, 1, "weight")
            bias = argument(args, kwargs, 2, "bias")
            # a bias other than the layer's own is not zero at the cut channels
            plain = isinstance(data, Tensor) and data is not weight and weight is own.get("weight")
            if plain and (bias is None or bias is own.get("bias")):
                dim = _OUTPUT_DIM[op] if op == "linear" or data.ndim == weight.ndim else 0
                return args, kwargs, (dim, self.cuts[name])
        swapped: dict[int, Tensor] = {}
        for name in found:
            if name not in self.loaded:
                module = self.modules[name]
                before = {attr: module._parameters.get(attr) for attr in _ATTRIBUTES}
                self.source.load(name)  # type: ignore[union-attr]
                if tracer is not None:
                    tracer.track(name, module)
                self.loaded[name] = {id(old): module._parameters[a] for a, old in before.items() if old is not None}
            swapped |= self.loaded[name]
        return replace_tensors(args, swapped), replace_tensors(kwargs, swapped), None

    def call(self, func: Callable, args: tuple, kwargs: dict, cut: tuple[int, Tensor]) -> Any:
        """A deferred layer's conv or linear call (``cut`` from :meth:`prepare`) computed on its kept output
        channels only, zeros at the cut ones: what the masked layer outputs, for the arithmetic of the kept
        channels alone, less the input channels that are constant (:func:`_live_inputs`). A grouped conv and
        a layer cut whole run whole and are zeroed after."""
        dim, channels = cut
        weight, bias = argument(args, kwargs, 1, "weight"), argument(args, kwargs, 2, "bias")
        count = weight.shape[0]
        kept = torch.ones(count, dtype=torch.bool).index_fill_(0, channels, False).nonzero().flatten()
        kept = kept.to(weight.device)
        # a grouped conv: a depthwise one on its kept channels measured slower than whole (the copies in and out
        # cost more than the memory-bound conv saves: ConvNeXt-tiny's export 0.66 -> 0.74 s)
        if argument(args, kwargs, 6, "groups", 1) != 1 or not len(kept):
            out = func(*args, **kwargs)
            _zero_output(out, cut)
            return out
        rows = torch.index_select(weight, 0, kept, out=self._buffer(0, weight, (len(kept), *weight.shape[1:])))
        rows_bias = bias.index_select(0, kept) if bias is not None else None
        data = argument(args, kwargs, 0, "input")
        live = _live_inputs(data, dim, rows, argument(args, kwargs, 4, "padding", 0), self.constants)
        if live is not None:
            channels, values = live
            if values is not None:  # constant inputs of a layer without padding add the same to every output
                folded = values.nonzero().flatten()  # only the columns that fold
                extra = (kernel_sums(rows, folded) @ values[folded]).to(rows.dtype)
                rows_bias = extra if rows_bias is None else rows_bias + extra
            data = data.index_select(dim, channels)
            shape = (rows.shape[0], len(channels), *rows.shape[2:])
            rows = torch.index_select(rows, 1, channels, out=self._buffer(1, rows, shape))
        for index, name, value in ((0, "input", data), (1, "weight", rows), (2, "bias", rows_bias)):
            args, kwargs = _with_argument(args, kwargs, index, name, value)
        out = func(*args, **kwargs)
        shape = list(out.shape)
        shape[dim] = count
        return out.new_zeros(shape).index_copy_(dim, kept, out)

    def _buffer(self, slot: int, like: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A tensor of ``shape`` in buffer ``slot`` of the pass (the kept rows; their live columns), grown (at
        least doubled) when too small."""
        size = math.prod(shape)
        held = self._buffers[slot]
        if held is None or held.numel() < size or held.dtype != like.dtype or held.device != like.device:
            grown = size if held is None or held.dtype != like.dtype else max(size, 2 * held.numel())
            self._buffers[slot] = held = None  # the old buffer goes before the new one comes
            self._buffers[slot] = held = torch.empty(grown, dtype=like.dtype, device=like.device)
        return held[:size].view(shape)


class ZeroingOutputs(TorchFunctionMode):
    """An untraced pass that does what :class:`MaskedOutputs` does in a traced one (the masks' own output)."""

    def __init__(self, outputs: MaskedOutputs) -> None:
        super().__init__()
        self.outputs = outputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.outputs.pending:
            return func(*args, **kwargs)
        args, kwargs, cut = self.outputs.prepare(None, getattr(func, "__name__", ""), args, kwargs)
        return func(*args, **kwargs) if cut is None else self.outputs.call(func, args, kwargs, cut)


def _with_argument(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    """A call's arguments with the one at ``index`` (or keyword ``name``) set to ``value``."""
    if name in kwargs or len(args) <= index:
        return args, {**kwargs, name: value}
    return (*args[:index], value, *args[index + 1 :]), kwargs


_FEWEST_MACS = 1 << 24  # a smaller call costs less than finding its constant inputs


def _live_inputs(
    data: Any, dim: int, weight: Tensor, padding: Any, constants_of: LastConstants
) -> tuple[Tensor, Tensor | None] | None:
    """Where a quarter or more of the input channels of a conv or linear call (``weight``: its kept rows) hold
    one value everywhere and the call is large enough for it to pay: the other channels, and the values
    to fold into the bias (``None``: all zero). A nonzero constant is left out only without padding (a zero
    border makes it vary) and in float32 or float64 (the fold's rounding within the layer's own); ``None``
    where nothing is left out."""
    if not isinstance(data, Tensor) or data.ndim < 2 or data.numel() == 0:
        return None
    count = data.shape[dim]
    if data.numel() // count * weight.numel() < _FEWEST_MACS:
        return None
    constants = constants_of(data, dim).to(data.device)
    constant = ~constants.isnan()
    unpadded = weight.ndim == 2 or without_padding(padding)
    if not unpadded or data.dtype not in (torch.float32, torch.float64):
        constant &= constants == 0
    dropped = int(constant.sum())
    if dropped * 4 < count or dropped == count:
        return None
    values = torch.where(constant, constants, 0.0)  # float64, as the fold sums them
    return (~constant).nonzero().flatten(), values if bool(values.any()) else None


def _zero_output(out: Any, cut: tuple[int, Tensor]) -> None:
    """Zero ``out`` at the channels ``cut`` names (``(dim, indices)``)."""
    dim, channels = cut
    if isinstance(out, Tensor):
        out.index_fill_(dim, channels.to(out.device), 0)


__all__ = ["MaskedOutputs", "ZeroingOutputs"]
