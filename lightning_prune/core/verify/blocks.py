"""Block-by-block equivalence: each block of the masked model against its exported block, on the same inputs.

Where the dense model comes from a file (:class:`~lightning_prune.core.weights.StreamedWeights`), the
masked and exported models never both live whole: the exported model runs once, and as each block
starts, the masked block is loaded on the inputs it got, both are run in float32 (the weights cast
from what the file holds), compared, and the masked block is dropped. :func:`blocks` says how a model
divides into blocks (a transformer's layers, a ResNet stage's blocks).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from lightning_prune.core.modules import evaluating, own_tensors, qualified_name
from lightning_prune.core.trace.records import call_model
from lightning_prune.core.verify.equivalence import compare_outputs
from lightning_prune.core.weights import StreamedWeights


@torch.no_grad()
def verify_blocks(
    exported: nn.Module,
    masked: StreamedWeights,
    blocks: list[str],
    example_input: Any,
    *,
    dtype: torch.dtype = torch.float32,
    on_block: Callable[[str], None] | None = None,
) -> list[tuple[str, float | None]]:
    """Run ``exported`` on ``example_input``; as each of ``blocks`` starts, compare its output with the
    masked block's (``masked``'s skeleton module of the same name, loaded for the comparison) on the
    same inputs, both computed in ``dtype``. Returns ``(block, relative error)`` per block called, in
    call order; ``None`` where the blocks' inputs or outputs differ in shape (pruned channels cross the
    block's boundary, so only the model's output compares them). ``on_block(name)`` is called after each."""
    results: list[tuple[str, float | None]] = []
    busy: list[str] = []

    def compare(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if busy:  # the block's copy below runs with the hooks it was copied with
                return
            busy.append(name)
            try:
                check(module, args, kwargs)
            finally:
                busy.pop()

        def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
            def inputs() -> tuple[tuple, dict]:  # a copy for each call: a key/value cache among them grows
                return tree_map(lambda x: _cast(x, dtype), copy.deepcopy((args, kwargs)))

            with masked.loaded(name, dtype) as reference, evaluating(reference):
                try:
                    expected = reference(*(given := inputs())[0], **given[1])
                except RuntimeError:  # the exported block's inputs are narrower than the masked block's
                    expected = None
            if expected is None:
                results.append((name, None))
            else:
                candidate = copy.deepcopy(module).to(dtype)
                got = candidate(*(given := inputs())[0], **given[1])
                report = compare_outputs(expected, got, rtol=0.0)
                results.append((name, None if _shapes(expected) != _shapes(got) else report.max_relative_error))
            if on_block is not None:
                on_block(name)

        return hook

    hooks = [exported.get_submodule(name).register_forward_pre_hook(compare(name), with_kwargs=True) for name in blocks]
    try:
        with evaluating(exported):
            call_model(exported, example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return results


def _shapes(value: Any) -> list:
    return [tuple(x.shape) if isinstance(x, Tensor) else None for x in tree_leaves(value)]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    return value.to(dtype) if isinstance(value, Tensor) and value.is_floating_point() else value


def blocks(model: nn.Module) -> list[str]:
    """Modules that partition ``model``'s tensors into pieces no larger than one of its repeated blocks.

    The repeated blocks are the children of the largest ``nn.ModuleList`` or ``nn.Sequential`` with
    two or more children (a transformer's layers, a ResNet stage's blocks); a module no larger than the
    largest of them is one piece, a larger one is split into its children (its own tensors then go
    with no piece). Without such a container, the pieces are about a sixteenth of the model."""
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for name, module in reversed(list(model.named_modules())):  # children before parents
        own = [t for t in own_tensors(module).values() if id(t) not in seen]
        seen.update(id(t) for t in own)
        children = sum(sizes.get(qualified_name(name, child), 0) for child, _ in module.named_children())
        sizes[name] = sum(t.numel() for t in own) + children
    containers = [
        (sizes[name], name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1 and name
    ]
    if containers:
        _, name, container = max(containers, key=lambda item: item[0])
        budget = max(sizes.get(qualified_name(name, child), 0) for child, _ in container.named_children())
    else:
        budget = sizes[""] // 16
    found: list[str] = []

    def split(name: str, module: nn.Module) -> None:
        if sizes.get(name, 0) <= max(budget, 1) or not module._modules:
            if sizes.get(name, 0):
                found.append(name)
            return
        for child, sub in module.named_children():
            split(qualified_name(name, child), sub)

    split("", model)
    return found


__all__ = ["blocks", "verify_blocks"]
