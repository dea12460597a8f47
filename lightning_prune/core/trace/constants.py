"""Which channels of a tensor hold one value everywhere, and that value: what a pruned channel carries.

A traced pass asks this of a masked conv or linear layer's input twice, once to leave its constant channels
out of the layer's arithmetic (:mod:`~lightning_prune.core.trace.masked_outputs`) and once in the layer's
rule, to record what the pruned channels carry: :class:`LastConstants` reads the tensor once for both.

>>> import torch
>>> channel_constants(torch.tensor([[1.0, 2.0], [1.0, 3.0]]), 1)
tensor([1., nan], dtype=torch.float64)
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor


def channel_constants(data: Tensor, dim: int) -> Tensor:
    """Per position along ``dim`` of ``data``: its value where it is the same everywhere else, else NaN
    (float64, on the CPU)."""
    dim %= max(data.ndim, 1)
    if data.numel() == 0:
        return torch.full((data.shape[dim],), math.nan, dtype=torch.float64)
    others = [d for d in range(data.ndim) if d != dim]
    # two reductions are several times faster than one aminmax on the CPU, and need no copy of a strided channel
    low, high = (data.detach().amin(others), data.detach().amax(others)) if others else (data.detach(),) * 2
    return torch.where(low == high, low, torch.full_like(low, math.nan)).double().cpu()


class LastConstants:
    """:func:`channel_constants`, the last answer kept for the next question about the same tensor: a traced
    pass asks it of a masked layer's input before the call and in the layer's rule after, one read for both.
    One per pass."""

    def __init__(self) -> None:
        self._last: tuple[weakref.ref, int, int, Tensor] | None = None  # (tensor, dim, its version, the answer)

    def __call__(self, data: Tensor, dim: int) -> Tensor:
        dim %= max(data.ndim, 1)
        version = None if data.is_inference() else data._version  # an inference tensor has no version counter
        last = self._last
        if last is not None and last[0]() is data and last[1] == dim and last[2] == version:  # never kept: None
            return last[3].clone()  # a caller may write into its answer
        constants = channel_constants(data, dim)
        self._last = (weakref.ref(data), dim, version, constants) if version is not None else None
        return constants.clone()


def kernel_sums(weight: Tensor, columns: Tensor) -> Tensor:
    """Each row's sum over the kernel of ``weight``'s input ``columns`` (a conv's ``(out, in, *kernel)`` or a
    linear's ``(out, in)``), in float64: what a constant input channel is multiplied by at every output
    position of a layer without padding, so ``kernel_sums(weight, columns) @ values`` is the bias the
    constants ``values`` at ``columns`` add."""
    picked = weight.index_select(1, columns.to(weight.device))
    return (picked.flatten(2).sum(2) if weight.ndim > 2 else picked).double()


def without_padding(padding: Any) -> bool:
    """Whether a conv's ``padding`` argument adds no border: a constant input channel then adds the same to
    every output position (with a zero border, its sum over the kernel varies at the edges)."""
    if isinstance(padding, str):
        return padding == "valid"
    return all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


__all__ = ["LastConstants", "channel_constants", "kernel_sums", "without_padding"]
