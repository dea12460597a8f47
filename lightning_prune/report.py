"""Size and speed of a model: parameters, multiply-accumulates, measured latency.

>>> import torch
>>> from torch import nn
>>> count_macs(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 10, 10))
13824
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_prune.trace import call_model


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters())


class _MacCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name.startswith("conv") and name[-2:] in ("1d", "2d", "3d") and isinstance(out, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            if "transpose" in name:  # every input element meets (out / groups) x kernel weights
                self.macs += args[0].numel() * math.prod(weight.shape[1:])
            else:
                self.macs += out.numel() * math.prod(weight.shape[1:])
        elif name == "linear" and isinstance(out, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.macs += out.numel() * weight.shape[1]
        return out


@torch.no_grad()
def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of conv and linear ops in one forward pass on ``example_input``."""
    was_training = model.training
    model.eval()
    counter = _MacCounter()
    try:
        with counter:
            call_model(model, example_input)
    finally:
        model.train(was_training)
    return counter.macs


@torch.no_grad()
def measure_latency(model: nn.Module, example_input: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of one eval-mode forward pass (synchronising CUDA when the input is on a GPU)."""
    was_training = model.training
    model.eval()
    leaves = [t for t in torch.utils._pytree.tree_leaves(example_input) if isinstance(t, torch.Tensor)]
    cuda = any(t.is_cuda for t in leaves)
    times = []
    try:
        for step in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call_model(model, example_input)
            if cuda:
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times)
