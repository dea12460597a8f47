"""Run a model with each module's tensors given to it as it runs (a file's, or zeroed copies), traced or not."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_prune.core.modules import evaluating
from lightning_prune.core.trace.masked_outputs import MaskedOutputs, ZeroingOutputs
from lightning_prune.core.trace.records import call_model
from lightning_prune.core.weights import TensorSource

if TYPE_CHECKING:
    from lightning_prune.core.trace.tracer import Tracer


def model_output(model: nn.Module, example_input: Any, weights: TensorSource | None = None) -> Any:
    """What ``model`` returns on ``example_input`` (eval mode, no grad), not traced; with ``weights``, each
    module has the tensors ``weights`` holds for it while it runs, as the trace gives them (a layer that
    ``weights`` only zeroes output channels of runs on its own, its output zeroed: :mod:`.masked_outputs`)."""
    if weights is None:
        with torch.no_grad(), evaluating(model):
            return call_model(model, example_input)
    outputs = MaskedOutputs(dict(model.named_modules()), weights)
    hooks = streaming_hooks(model, weights, outputs=outputs)
    try:
        with torch.no_grad(), evaluating(model), ZeroingOutputs(outputs):
            return call_model(model, example_input)
    finally:
        for hook in hooks:
            hook.remove()


def streaming_hooks(
    model: nn.Module, weights: TensorSource, tracer: Tracer | None = None, outputs: MaskedOutputs | None = None
) -> list:
    """Hooks that give each module of ``model`` its tensors from ``weights`` while it runs, and its children
    theirs: a module may read a child's weights without calling it (``nn.MultiheadAttention``'s
    ``out_proj``, a functional call on a submodule's parameters). What several hold is given back by the
    last. With ``tracer``, what loading runs is not recorded, and the tracer knows the loaded tensors.
    ``outputs`` (by default the tracer's) defers the layers whose outputs it zeroes instead."""
    hooks: list = []
    held: dict[str, int] = {}
    if outputs is None and tracer is not None:
        outputs = tracer.masked_outputs

    def load(module: nn.Module, args: tuple, members: list[str]) -> None:
        if tracer is not None:
            tracer.paused = True
        try:
            for member in members:
                held[member] = held.get(member, 0) + 1
                if held[member] > 1 or (outputs is not None and outputs.defer(member)):
                    continue
                loaded = weights.load(member)
                if tracer is not None:
                    tracer.track(member, loaded)
        finally:
            if tracer is not None:
                tracer.paused = False

    def release(module: nn.Module, args: tuple, out: Any, members: list[str]) -> None:
        for member in members:
            held[member] -= 1
            if not held[member] and not (outputs is not None and outputs.finish(member)):
                if tracer is not None:
                    tracer.untrack(model.get_submodule(member))
                weights.release(member)

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        members = [name] if weights.owned(module) else []
        members += [prefix + child for child, sub in module.named_children() if weights.owned(sub)]
        if members:
            hooks.append(module.register_forward_pre_hook(functools.partial(load, members=members)))
            hooks.append(module.register_forward_hook(functools.partial(release, members=members), always_call=True))
    return hooks


__all__ = ["model_output", "streaming_hooks"]
