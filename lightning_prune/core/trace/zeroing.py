"""``whole_channel`` in the one traced pass: zero the parameter slices pruned channels reach as the pass finds them.

``whole_channel=True`` zeroes, besides the pruned filters, the parameters a pruned channel reaches (the
norms it feeds, a position embedding added to it, a class token joined to it). Which ones is known only
from the trace, and zeroing them changes the values the trace records (the constants a pruned channel
carries, the model's output), so export used to trace twice. :class:`WholeChannel` zeroes them while the
one pass runs instead: when an op's rule records a parameter axis whose channels the masks prune, that
op runs again on the parameter with those slices zeroed, and every later op gets the zeroed parameter
(or the zeroed elements of a view of it). What the pass then records is what a pass over the zeroed
model records. A batch or layer norm, the commonest such op, is zeroed before it runs instead (the
channels of its input are known then, :meth:`WholeChannel.before`), so it runs once.

The keep decision of a channel is final only at the end of the pass (a later op may couple it with a
channel whose mask keeps it), so the pass zeroes what each channel's own layer's mask prunes and
export compares that with what the finished graph asks (:attr:`ChannelTrace.zeroed`); where they differ,
or where the pass could not zero as it went (a parameter computed with before its channels were known,
an in-place op on it), export zeroes what the graph asks and traces again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lightning_prune.core.trace import op_rules
from lightning_prune.core.trace.records import argument, leaves, replace_tensors, storage_key

if TYPE_CHECKING:
    from lightning_prune.core.trace.bookkeeping import Bookkeeping

Name = tuple[str, str]


class WholeChannel:
    """The parameter slices one pass zeroes as it goes, for the masks ``masks`` (see the module docstring)."""

    def __init__(self, tracer: Bookkeeping, masks: Mapping[str, Tensor]) -> None:
        self.t = tracer
        self.masks = masks
        self.zeroed: dict[Name, Tensor] = {}  # parameter -> which of its elements are zero (its shape)
        self.slices: dict[tuple[str, str, int], Tensor] = {}  # (module, parameter, dim) -> keep-vector
        self.computed: set[Name] = set()  # parameters an op has computed with, other than by a view
        self.failed: str | None = None  # why the pass could not zero as it went
        self.changed = False  # a value of the pass differs from the masks' alone
        # id(tensor) -> (tensor, zeroed elements, copy, whether the copy differs from it)
        self._copies: dict[int, tuple[Tensor, Tensor, Tensor, bool]] = {}
        self._alive: list[Tensor] = []
        self._firsts = np.empty(0, dtype=np.int64)  # each producer's first label, for _predicted_keep
        self._arrays: dict[str, tuple[Tensor, np.ndarray]] = {}  # producer -> (its mask, as a NumPy array)
        self._last: tuple[Tensor, int, Tensor] | None = None  # labels, producers known, keep: a norm's two parameters

    def substitute(self, args: tuple, kwargs: dict, again: bool = False) -> tuple[tuple, dict, list[Name]]:
        """``args`` and ``kwargs`` with every parameter (or view of one) that has zeroed slices replaced by
        its zeroed copy, and the names of the parameters they use."""
        used: list[Name] = []
        swapped: dict[int, Tensor] = {}
        differs = False
        for tensor in leaves((args, kwargs)):
            if not isinstance(tensor, Tensor):
                continue
            index = None  # the parameter itself, else a view of it: the parameter's flat index per element
            name = self.t.param_name(tensor)
            if name is None:
                entry = self.t.derived.get(id(tensor))
                if entry is None or entry[0] is not tensor or (name := self.t.param_name(entry[1])) is None:
                    continue
                index = entry[2]
            used.append(name)
            if name in self.zeroed:
                swapped[id(tensor)], zeroed_here = self._zeroed_copy(tensor, index, self.zeroed[name])
                differs |= zeroed_here
        if swapped:
            args, kwargs = replace_tensors((args, kwargs), swapped)
            self.changed |= differs and not again  # an op that runs once, on zeroed parameters: not compared
        return args, kwargs, used

    def after(self, func: Callable, args: tuple, kwargs: dict, out: Any, first_axis: int, used: list[Name]) -> Any:
        """Once the rule has run: zero the slices of the parameter axes it recorded (from ``first_axis`` on)
        that the masks prune, and give ``out`` again, computed from them, where this op used them."""
        if self.failed is not None:  # export traces again: what this pass zeroes no longer matters
            return out
        grown = self._record(first_axis)
        if grown:
            what = getattr(func, "__name__", str(func))
            if any(name not in used or name in self.computed for name in grown):
                self._fail(f"'{grown[0][0]}.{grown[0][1]}' was computed with before its channels were known")
            elif _aliases(out, args, kwargs):
                self._fail(f"op '{what}' works in place on a parameter, or returns a view of one")
            else:
                args, kwargs, _ = self.substitute(args, kwargs, again=True)
                try:
                    again = func(*args, **kwargs)
                except Exception as err:  # it ran once on the same shapes: a failure now is the op's own
                    self._fail(f"op '{what}' failed on the zeroed parameter: {type(err).__name__}")
                else:
                    for old, new in zip(leaves(out), leaves(again), strict=False):
                        self._move_labels(old, new)
                        self.changed |= isinstance(old, Tensor) and not torch.equal(old, new)
                    out = again
        moved = op_rules.rule_for(self.t.op) is op_rules.RULES["movement"]
        if not (moved and any(id(tensor) in self.t.derived for tensor in leaves(out) if isinstance(tensor, Tensor))):
            self.computed.update(used)  # a view or index of a parameter is followed (exp(scale) is computed)
        return out

    def _record(self, first_axis: int) -> list[Name]:
        """Zero, in :attr:`zeroed`, the pruned slices of the parameter axes recorded from ``first_axis`` on;
        the parameters whose zeroed elements grew."""
        axes = self.t.trace.axes[first_axis:]
        return [
            (axis.module, axis.param) for axis in axes if self._zero(axis.module, axis.param, axis.dim, axis.labels)
        ]

    def before(self, op: str, args: tuple, kwargs: dict) -> None:
        """Before a norm op runs on labelled channels: zero its affine parameters where the masks prune the
        channels, as its rule would ask after, so the op runs once (on the zeroed parameters) and not again."""
        norm = _NORM_PARAMETERS.get(op)
        data = argument(args, kwargs, 0, "input")
        if norm is None or self.failed is not None or not isinstance(data, Tensor) or data.ndim < 2:
            return
        channel_dim, affine = norm
        rep = self.t.rep(data)
        if rep is None or rep.dims != (channel_dim % data.ndim,):
            return
        for index, attr in affine:
            tensor = argument(args, kwargs, index, attr)
            name = self.t.param_name(tensor) if isinstance(tensor, Tensor) else None
            if name is not None and tensor.ndim == 1 and len(tensor) == len(rep.labels):
                self._zero(*name, 0, rep.labels)

    def _zero(self, module: str, param: str, dim: int, labels: Tensor) -> bool:
        """Zero, in :attr:`zeroed`, the slices along ``dim`` of ``module.param`` whose channels (``labels``) the
        masks prune; whether its zeroed elements grew."""
        tensor = self.t.modules[module]._parameters.get(param)
        if tensor is None or module in self.t.trace.producers:
            return False  # buffers are not the channel's value; a layer's own weights are the masks'
        key = (module, param, dim)
        keep = self._predicted_keep(labels)
        keep = keep & self.slices[key] if key in self.slices else keep
        if bool(keep.all()) or (key in self.slices and torch.equal(keep, self.slices[key])):
            return False
        self.slices[key] = keep
        zero = self.zeroed.get((module, param), torch.zeros(tensor.shape, dtype=torch.bool))
        self.zeroed[(module, param)] = zero.index_fill(dim, (~keep).nonzero().flatten(), True)
        return True

    def _predicted_keep(self, labels: Tensor) -> Tensor:
        """Kept unless the mask of the layer that made the channel prunes it (``-1``: kept)."""
        owners = self.t.trace.label_owner
        if self._last is not None and self._last[0] is labels and self._last[1] == len(owners):
            return self._last[2]
        if len(self._firsts) != len(owners):  # producers are added as the pass goes
            self._firsts = np.fromiter((first for _, first, _ in owners), dtype=np.int64, count=len(owners))
        firsts = self._firsts
        flat = labels.numpy()
        keep = np.ones(flat.shape, dtype=bool)
        index = np.searchsorted(firsts, flat, side="right") - 1
        for i in sorted(set(index[flat >= 0].tolist())):  # not np.unique: its first call imports numpy.ma (0.2 s)
            owner, first, count = owners[i]
            mask = self.masks.get(owner) if owner is not None else None
            if mask is None or mask.numel() != count:
                continue
            at = (index == i) & (flat >= 0)
            keep[at] = self._mask_array(owner, mask)[flat[at] - first]
        self._last = (labels, len(owners), torch.from_numpy(keep))
        return self._last[2]

    def _mask_array(self, owner: str, mask: Tensor) -> np.ndarray:
        found = self._arrays.get(owner)
        if found is None or found[0] is not mask:
            found = self._arrays[owner] = (mask, mask.cpu().numpy())
        return found[1]

    def _zeroed_copy(self, tensor: Tensor, index: Tensor | None, zero: Tensor) -> tuple[Tensor, bool]:
        """``tensor`` with the elements ``zero`` names zeroed, and whether any of them was not zero already
        (the norms of a model fine-tuned with its masks held are: zeroing them changes nothing)."""
        entry = self._copies.get(id(tensor))
        if entry is not None and entry[0] is tensor and entry[1] is zero:
            return entry[2], entry[3]
        elements = (zero if index is None else zero.flatten()[index].reshape(tensor.shape)).to(tensor.device)
        copy = tensor.detach().masked_fill(elements, 0)
        differs = bool(tensor.detach()[elements].any())
        self._copies[id(tensor)] = (tensor, zero, copy, differs)
        self._alive.append(copy)  # the bookkeeping knows it by its id until the pass ends
        self._move_labels(tensor, copy, keep=True)
        return copy, differs

    def _move_labels(self, old: Any, new: Any, keep: bool = False) -> None:
        """``new`` stands for ``old``: it is known as the same parameter, view of one, or labelled tensor."""
        if not isinstance(old, Tensor) or not isinstance(new, Tensor) or old is new:
            return
        t = self.t
        if (name := t.param_name(old)) is not None:
            t.params[id(new)] = name
        if (entry := t.derived.get(id(old))) is not None and entry[0] is old:
            t.derived[id(new)] = (new, entry[1], entry[2])
        if (rep := t.rep(old)) is not None:
            t.set_rep(new, rep)
            if not keep:
                t.set_rep(old, None)

    def _fail(self, why: str) -> None:
        self.failed = self.failed or why


# the norms :meth:`WholeChannel.before` zeroes: op -> (its input's channel dim, (position, name) of each affine parameter)
_NORM_PARAMETERS = {
    "batch_norm": (1, ((3, "weight"), (4, "bias"))),
    "layer_norm": (-1, ((2, "weight"), (3, "bias"))),
}


def _aliases(out: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a tensor of ``out`` lives in the memory of an input (a view, an in-place op)."""
    inputs = {storage_key(x) for x in leaves((args, kwargs)) if isinstance(x, Tensor)} - {None}
    return any(storage_key(x) in inputs for x in leaves(out) if isinstance(x, Tensor))


__all__ = ["WholeChannel"]
