"""Export a model that lives on disk: a skeleton on the meta device plus its state dict file.

The dense model is never whole in memory: the trace loads each module's tensors as it runs and drops
them after; the plan loads only the layers a bias fold needs; the smaller model is built block by
block (load a block, zero its pruned channels, slice the kept ones, drop the dense tensors); the check
runs the exported model once and compares each block with its masked block loaded from the file on
the same inputs. The peak is the pruned model plus about one block.

>>> import os, tempfile
>>> import torch
>>> from torch import nn
>>> from lightning_prune.core.weights import parameters_on_meta
>>> def build():
...     return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
>>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
>>> torch.save(build().state_dict(), path)
>>> with parameters_on_meta():
...     skeleton = build()
>>> result = export_from_file(skeleton, path, {"0": torch.arange(16) % 2 == 0}, torch.randn(2, 8), progress=False)
>>> result.model[0].out_features, result.model[2].in_features, skeleton[0].weight.device.type
(8, 8, 'meta')
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_prune.core.errors import MaskError, VerificationError
from lightning_prune.core.export import (
    ExportResult,
    change_of_function,
    finish_shrink,
    shared_tensor_names,
    shrink_layer,
    zeroed_graph,
    zeroing_changed,
)
from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.masked_view import tensor_ties, zero_module
from lightning_prune.core.graph.masks import Masks, MaskSource, collect_masks
from lightning_prune.core.graph.plan import plan
from lightning_prune.core.integrations import load_integrations
from lightning_prune.core.modules import within
from lightning_prune.core.progress import Progress, collecting_new_objects_only
from lightning_prune.core.trace.streaming import model_output
from lightning_prune.core.trace.tracer import trace_channels
from lightning_prune.core.verify.blocks import blocks as default_blocks
from lightning_prune.core.verify.blocks import verify_blocks
from lightning_prune.core.verify.retries import Retries
from lightning_prune.core.verify.selfcheck import self_check
from lightning_prune.core.weights import Loading, StreamedWeights, TensorStore

BLOCK_RTOL = 1e-5
"""Largest relative error of a block's output, computed in float32, that passes."""


@collecting_new_objects_only()
def export_from_file(
    skeleton: nn.Module,
    path: str | os.PathLike | TensorStore,
    masks: MaskSource | Masks,
    example_input: Any,
    *,
    whole_channel: bool = False,
    round_to: int = 1,
    blocks: list[str] | None = None,
    verify: bool = True,
    progress: bool | None = None,
) -> ExportResult:
    """Export the model whose weights are in ``path``, never holding its dense weights whole.

    ``skeleton`` is the model built with its parameters on the meta device
    (:func:`~lightning_prune.core.weights.parameters_on_meta`), in the dtype the export should have;
    ``path`` a safetensors file or a ``torch.save`` state dict with the skeleton's names, or any
    :class:`~lightning_prune.core.weights.TensorStore` (a sharded model's
    :class:`~lightning_prune.core.sharded.GatheredState`: every rank then runs the same export). ``masks``,
    ``whole_channel`` and ``round_to`` are :func:`~lightning_prune.export_pruned_model`'s (masks read
    from the model itself need its weights, so they must be given). ``blocks``: the modules built and
    checked one at a time (default :func:`~lightning_prune.core.verify.blocks.blocks`: a transformer's
    layers). The result is what :func:`~lightning_prune.export` returns; the skeleton stays on meta. With
    ``whole_channel``, its ``function_change`` is measured when first read (one more pass over ``path``,
    which must then still hold the weights), or during export where ``path`` is a store.

    Checks: the exported model must reproduce the masked model's output on ``example_input`` (relative
    error 1e-4 in float32 and float64, 5e-2 in 16-bit types, where the two differ by their own
    rounding); with ``verify=True`` each block is then compared with its masked block on the same
    inputs, both in float32 (weights cast from the file's), within :data:`BLOCK_RTOL`
    (:attr:`ExportResult.blocks` lists each block's error).
    """
    if masks is None:
        raise MaskError(
            "export_from_file needs the masks: reading them from the model's zero filters would load it whole. "
            "Pass the masks dict (or the path of a mask file) the pruner gave."
        )
    load_integrations()
    steps = Progress(progress)
    keep = collect_masks(masks, skeleton)
    weights = masked_weights(skeleton, path, keep)
    file, prepare, zeroed = weights.file, weights.prepare, weights.prepare.zeroed  # type: ignore[union-attr]
    with steps.phase("trace"):  # with whole_channel, what the masks prune is zeroed as the pass finds it
        graph = ChannelGraph(trace_channels(skeleton, example_input, weights, keep if whole_channel else None))
    function_change: float | Callable[[], float] | None = None
    if whole_channel:

        def alone() -> Any:  # the masks' own output: one more pass over the file, only the masks zeroed
            return model_output(skeleton, example_input, masked_weights(skeleton, file, keep))

        with steps.phase("whole channel"):
            given = None if zeroing_changed(graph.trace) else graph.trace.output  # else: the masks' own
            if given is None and not isinstance(path, (str, os.PathLike)):  # a store, a sharded model's: read now
                given = alone()
            graph = zeroed_graph(
                graph, keep, skeleton, zeroed, lambda: trace_channels(skeleton, example_input, weights)
            )
        function_change = change_of_function(given, graph.trace.output, alone)
    blocks = default_blocks(skeleton) if blocks is None else list(blocks)
    rtol = 1e-4 if _dtype(skeleton) in (torch.float32, torch.float64) else 5e-2
    retries = Retries()
    while True:
        with steps.phase("plan"):
            loading = Loading(weights, skeleton)
            try:
                decided = plan(graph, keep, loading, round_to=round_to)  # type: ignore[arg-type]
            finally:
                loading.release()
        model = _build(skeleton, file, prepare, decided, blocks, steps)
        with steps.phase("check"):
            failure = self_check(model, example_input, graph.trace.output, rtol)
        if failure is None:
            break
        overrides = retries.overrides(graph, failure, model, example_input, graph.trace.output)
        if not overrides:
            raise VerificationError(
                f"The model exported from '{file.path}' does not reproduce the masked one ({failure.what}), even with "
                "every channel whose size was a guess kept. Please report this model."
            )
        graph = graph.with_blocked(overrides)
    result = ExportResult(model, keep, decided, graph, function_change, steps.timings, retries=retries.count)
    if verify:
        with steps.counter("verify block", len(blocks)) as tick:
            result.blocks = verify_blocks(model, weights, blocks, example_input, on_block=lambda _: tick())
        bad = [(name, error) for name, error in result.blocks if error is not None and error > BLOCK_RTOL]
        if bad:
            name, error = max(bad, key=lambda item: item[1])
            raise VerificationError(
                f"Block '{name}' of the model exported from '{file.path}' differs from the masked block on the same "
                f"inputs (relative error {error:.2e} > {BLOCK_RTOL:g}, in float32); {len(bad)} block(s) differ. "
                "Please report this model."
            )
    return result


class _Masking:
    """The masked model: pruned channels zeroed in each module as it is loaded (its own copy); with
    ``zeroed``, the parameter slices they reach too (``whole_channel``)."""

    def __init__(self, keep: Masks, skeleton: nn.Module) -> None:
        self.keep, self.skeleton = keep, skeleton
        self.zeroed: dict[tuple[str, str, int], torch.Tensor] = {}
        self.ties = tensor_ties(skeleton)  # a tied tensor is loaded into each holder: each is zeroed

    def __call__(self, name: str, module: nn.Module) -> None:
        zero_module(name, module, self.keep, self.zeroed, True, self.ties, self.skeleton)


def masked_weights(skeleton: nn.Module, path: str | os.PathLike | TensorStore, masks: Masks) -> StreamedWeights:
    """The masked model, loaded from ``path`` into ``skeleton`` module by module: each module's pruned
    output channels (``masks``, keep-vectors) are zeroed as it is loaded (the reference of
    :func:`~lightning_prune.core.verify.blocks.verify_blocks`)."""
    return StreamedWeights(skeleton, path, _Masking(masks, skeleton))


def _build(
    skeleton: nn.Module, file: TensorStore, prepare: Any, decided: Any, blocks: list[str], steps: Progress
) -> nn.Module:
    """The smaller model, built block by block from the file: each block loaded, its pruned channels
    zeroed, its planned layers shrunk (the dense tensors dropped), before the next one is read."""
    model = copy.deepcopy(skeleton)  # modules only: the parameters are on meta
    source = StreamedWeights(model, file, prepare)
    ties = shared_tensor_names(model)
    inside = {name: [c for c in decided.changes if within(c, name)] for name in blocks}
    rest = [name for name, module in model.named_modules() if not any(within(name, b) for b in blocks)]
    for name in rest:  # what no block holds: the model's (or a large module's) own tensors
        if source.owned(model.get_submodule(name)):
            source.load(name)
            source.keep(name)
    for name in steps.steps("shrink block", blocks):
        source.load_subtree(name)
        for layer in inside[name]:
            model = shrink_layer(model, layer, decided.changes[layer])
    for layer, change in decided.changes.items():  # a change outside every block (the model's own tensors)
        if not any(within(layer, b) for b in blocks):
            model = shrink_layer(model, layer, change)
    finish_shrink(model, decided, ties)
    return model


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


__all__ = ["BLOCK_RTOL", "export_from_file"]
