"""Export a channel-masked model to a physically smaller one that computes the same function.

>>> import torch
>>> from torch import nn
>>> from lightning_prune import export_pruned_model
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> keep = {"0": torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)}
>>> small = export_pruned_model(model, keep, torch.randn(2, 3, 8, 8))
>>> small[0].out_channels, small[1].num_features, small[3].in_channels
(4, 4, 4)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_prune.core.errors import VerificationError
from lightning_prune.core.graph.changes import LayerChange, Note, Plan
from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.inplace_dict import (
    InplaceDict,
    check_inplace_dict,
    load_inplace_dict,
    traced_inplace_dict,
)
from lightning_prune.core.graph.masked_view import MaskedView, ParameterKeep
from lightning_prune.core.graph.masks import (
    Masks,
    MaskSource,
    collect_masks,
    has_mask_wrappers,
    unshare_tensors,
    unwrapped_copy,
)
from lightning_prune.core.graph.plan import plan
from lightning_prune.core.integrations import load_integrations
from lightning_prune.core.modules import copy_training_modes, tensor_places, within
from lightning_prune.core.progress import Progress, collecting_new_objects_only
from lightning_prune.core.shrink.attention import update_heads, update_model
from lightning_prune.core.shrink.registry import shrinker_for, slices_only
from lightning_prune.core.trace.records import ChannelTrace
from lightning_prune.core.trace.streaming import model_output
from lightning_prune.core.trace.tracer import trace_channels
from lightning_prune.core.verify.equivalence import compare_outputs
from lightning_prune.core.verify.retries import Retries
from lightning_prune.core.verify.selfcheck import Failure, self_check
from lightning_prune.core.weights import Loading


@dataclass
class ExportResult:
    """The exported model with everything that explains it."""

    model: nn.Module
    masks: Masks
    plan: Plan
    graph: ChannelGraph
    change_of_function: float | Callable[[], float] | None = field(default=None, repr=False)
    """:attr:`function_change`, or the measurement that gives it when first read."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase, in the order they ran (``trace``, ``plan``, ``shrink``, ``check``, ...)."""
    blocks: list[tuple[str, float]] = field(default_factory=list)
    """From a file, with ``verify="blocks"``: each block checked, and the relative error of its output."""
    retries: int = 0
    """How many times the self-check failed and the export was planned again, each time keeping at once
    the channels of every module the failure implicates (:class:`~lightning_prune.core.verify.retries.Retries`)."""

    @functools.cached_property
    def function_change(self) -> float | None:
        """With ``whole_channel=True``: the relative error, on the example input, between the model with
        whole channels zeroed (what the export computes exactly) and the model with only the given masks
        (the change of function the option accepts); ``None`` otherwise.

        Where export left the model as it was given (``inplace=False``), this is measured when first read,
        by one forward of that model with the masks alone (an export's time is then the export's), so read
        it before changing the model; with ``inplace=True`` it is measured during export, before the model
        is consumed."""
        if callable(measured := self.change_of_function):
            self.change_of_function = measured = measured()  # what the measurement held (the model) is let go
        return measured

    @property
    def notes(self) -> list[Note]:
        """Channels kept against the masks (per layer and reason; a layer's ``"kept"`` counts add up to
        its masked channels kept), constants folded, norms corrected: one line each."""
        return self.plan.notes

    @property
    def inplace_dict(self) -> InplaceDict:
        """The seed-format ``inplace_dict`` the export used (inferred from the trace)."""
        return traced_inplace_dict(self.graph)


@collecting_new_objects_only()
def export(
    model: nn.Module,
    masks: MaskSource | Masks | None,
    example_input: Any,
    *,
    inplace_dict: InplaceDict | str | os.PathLike | None = None,
    whole_channel: bool = False,
    round_to: int = 1,
    inplace: bool = False,
    progress: bool | None = None,
) -> ExportResult:
    """Like :func:`export_pruned_model`, returning the model with its masks, plan, graph and phase timings."""
    steps = Progress(progress)
    keep = collect_masks(model if masks is None else masks, model)
    # export replaces what it changes; the rest is cloned at the end (in place: nothing is copied)
    masked = model if inplace and not has_mask_wrappers(model) else unwrapped_copy(model, share_tensors=True)
    # with whole_channel, the masks' own output (function_change): here, where it is the model's own and the
    # export consumes the model; else after the trace, or when first read (the model is left as it is)
    given = model_output(masked, example_input) if whole_channel and masks is None and inplace else None
    # given masks zero filters and biases, as NNI's do; the model's own apply as they are. Each layer is
    # zeroed as it is used (a copy of one layer at a time), or in the model itself with inplace=True.
    view = MaskedView(masked, keep if masks is not None or whole_channel else {}, in_place=inplace)
    with steps.phase("trace"):  # with whole_channel, what the masks prune is zeroed as the pass finds it
        graph = ChannelGraph(trace_channels(masked, example_input, view, keep if whole_channel else None))
    function_change: float | Callable[[], float] | None = None
    if whole_channel:
        with steps.phase("whole channel"):
            if masks is not None and not zeroing_changed(graph.trace):
                given = graph.trace.output  # the pass zeroed nothing that was not zero already: the masks' own
            elif given is None and inplace:
                given = model_output(masked, example_input, view)  # before the model is consumed
            graph = zeroed_graph(graph, keep, masked, view.zeroed, lambda: trace_channels(masked, example_input, view))
        alone = functools.partial(_masks_alone, model, None if masks is None else keep, example_input)
        function_change = change_of_function(given, graph.trace.output, alone)
    if inplace_dict is not None and inplace_dict != "auto":
        graph = graph.with_blocked(check_inplace_dict(graph, load_inplace_dict(inplace_dict), masked))

    def planned() -> Plan:
        nonlocal masked, view
        if masked is None:  # a retry: the masked copy went into the model that failed its check
            masked = unwrapped_copy(model, share_tensors=True)
            view = MaskedView(masked, view.masks, view.zeroed)
        with steps.phase("plan"):
            loading = Loading(view, masked)  # a bias fold reads the masked weight of its layer
            try:
                return plan(graph, keep, loading, round_to=round_to)  # type: ignore[arg-type]
            finally:
                loading.release()

    def shrunk(decided: Plan) -> nn.Module:
        nonlocal masked
        work = shrink_model(masked, decided, steps, view)  # with inplace=False the masked model is export's copy
        if not inplace:
            masked = None
        return work

    decided = planned()
    work = shrunk(decided)
    retries = Retries()
    while (failure := _checked(steps, work, example_input, graph.trace.output)) is not None:
        if inplace:
            raise VerificationError(
                f"The exported model does not reproduce the masked one ({failure.what}), and with inplace=True the "
                "dense layers are gone, so export cannot retry with the channels its forward fixes kept. Export "
                "again from the saved model with inplace=False."
            )
        overrides = retries.overrides(graph, failure, work, example_input, graph.trace.output)
        if not overrides:
            raise VerificationError(
                f"The exported model does not reproduce the masked one ({failure.what}), even with every channel "
                "whose size was a guess kept. Please report this model: its forward fixes a size the tracer did not see."
            )
        graph = graph.with_blocked(overrides)
        decided = planned()  # its notes say which channels this kept
        work = shrunk(decided)
    if not inplace:
        with steps.phase("copy"):
            unshare_tensors(work, model)
        copy_training_modes(model, work)
    return ExportResult(work, keep, decided, graph, function_change, steps.timings, retries=retries.count)


def shrink_model(
    model: nn.Module, plan: Plan, progress: Progress | None = None, source: MaskedView | None = None
) -> nn.Module:
    """Apply ``plan`` to ``model`` in place: each changed layer goes through its registered shrink function
    (the dense tensors it replaces are dropped as it goes). With ``source`` (export's masked view), each
    layer (and what is under it) first takes its zeroed tensors for good, unless the plan cuts away all
    they zero and the layer's shrink function reads only the slices it keeps."""
    load_integrations()  # shrinkers and updaters for libraries the model uses (transformers)
    ties = shared_tensor_names(model)
    names = [name for name, module in model.named_modules() if source is not None and source.owned(module)]
    loaded: set[str] = set()

    def load(under: str, change: LayerChange | None = None) -> None:
        for name in names:
            if name not in loaded and within(name, under):
                loaded.add(name)
                sliceable = name == under and change is not None and slices_only(model.get_submodule(name))
                if sliceable and source.sliced_away(name, change.keep):  # type: ignore[union-attr]
                    continue  # what the view would zero is cut away: no zeroed copy
                source.load(name)  # type: ignore[union-attr]
                source.keep(name)  # type: ignore[union-attr]

    changes = plan.changes.items()
    for name, change in changes if progress is None else progress.steps("shrink", changes):
        load(name, change)
        model = shrink_layer(model, name, change)
    load("")  # layers the masks prune whose channels are all kept: masked, whole
    finish_shrink(model, plan, ties)
    return model


def shared_tensor_names(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Every tensor ``model`` holds under several names: the ``(module, attribute)`` names of each."""
    names = {id(module): name for name, module in model.named_modules()}
    return [[(names[id(m)], attr) for m, attr in places] for places in tensor_places(model).values() if len(places) > 1]


def shrink_layer(model: nn.Module, name: str, change: LayerChange) -> nn.Module:
    """Put module ``name`` of ``model`` through its shrink function and in its place; returns the model
    (a new one where ``name`` is the model itself, a bare ``nn.MultiheadAttention``)."""
    module = model.get_submodule(name)
    replacement = shrinker_for(module)(module, change)
    if replacement is not module and not name:
        return replacement
    if replacement is not module:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    return model


def finish_shrink(model: nn.Module, plan: Plan, ties: list[list[tuple[str, str]]]) -> None:
    """Once every layer is shrunk: tie again what was shared (``ties`` from :func:`shared_tensor_names`
    before shrinking), then update head counts and whatever describes the whole model."""
    _retie(model, ties)
    for name, counts in plan.heads.items():
        update_heads(model.get_submodule(name), counts)
    update_model(model, plan)


def _checked(steps: Progress, model: nn.Module, example_input: Any, expected: Any) -> Failure | None:
    with steps.phase("check"):
        return self_check(model, example_input, expected)


def _retie(model: nn.Module, ties: list[list[tuple[str, str]]]) -> None:
    """Tie again the tensors the shrink functions sliced apart: each sharer of a tensor was sliced
    the same way (the plan gives every name of a shared tensor its change), so they take the first's."""
    for (first, first_name), *others in ties:
        tensor = getattr(model.get_submodule(first), first_name, None)
        for module_name, name in others:
            module = model.get_submodule(module_name)
            held = module._parameters if name in module._parameters else module._buffers
            if isinstance(tensor, torch.Tensor) and isinstance(held.get(name), torch.Tensor):
                if held[name].shape == tensor.shape:  # a replaced module may hold something else there
                    held[name] = tensor


def zeroed_graph(
    graph: ChannelGraph,
    keep: Masks,
    model: nn.Module,
    zeroed: ParameterKeep,
    retrace: Callable[[], ChannelTrace],
) -> ChannelGraph:
    """With ``whole_channel``, after its one pass: the graph of the model with whole channels zeroed.
    ``zeroed`` (the slices a source zeroes as it loads a module) is set to what the graph asks. The pass
    zeroed what each channel's own mask prunes as it went; where the finished graph asks the same, it is
    that graph, else ``retrace()`` (a pass over the source, now zeroing what the graph asks) gives it."""
    wanted = graph.channel_parameter_keep(keep, model)
    done = graph.trace.zeroed
    same = (
        done is not None and done.keys() == wanted.keys() and all(torch.equal(done[key], wanted[key]) for key in wanted)
    )
    zeroed.update(wanted)
    return graph if same else ChannelGraph(retrace())


def zeroing_changed(trace: ChannelTrace) -> bool:
    """Whether a ``whole_channel`` pass changed a value: it could not zero as it went (``zeroed`` is ``None``),
    or a slice it zeroed was not zero already. Where it did not, its output is the masks' own."""
    return trace.zeroed is None or bool(trace.zeroed and trace.zeroing_changed)


def change_of_function(given: Any, whole: Any, masks_alone: Callable[[], Any]) -> float | Callable[[], float]:
    """``function_change``: the relative error of ``whole`` (the output with whole channels zeroed) against
    ``given`` (the masks' own output); where ``given`` is ``None``, the measurement that runs ``masks_alone()``
    for it, when :attr:`ExportResult.function_change` is first read."""
    if given is not None:
        return compare_outputs(given, whole).max_relative_error
    return lambda: compare_outputs(masks_alone(), whole).max_relative_error


def _masks_alone(model: nn.Module, keep: Masks | None, example_input: Any) -> Any:
    """What ``model`` outputs with the masks ``keep`` alone (their pruned filters and biases zeroed; ``None``:
    the model's own function), the model itself untouched."""
    copy = unwrapped_copy(model, share_tensors=True)
    return model_output(copy, example_input, None if keep is None else MaskedView(copy, keep))


def export_pruned_model(
    model: nn.Module,
    masks: MaskSource | Masks | None,
    example_input: Any,
    *,
    inplace_dict: InplaceDict | str | os.PathLike | None = None,
    whole_channel: bool = False,
    round_to: int = 1,
    inplace: bool = False,
    progress: bool | None = None,
) -> nn.Module:
    """Return a new, physically smaller model that computes what ``model`` with ``masks`` applied computes.

    ``masks`` is any source :func:`~lightning_prune.collect_masks` accepts (``None``: read them
    from ``model`` itself: NNI wrappers, ``torch.nn.utils.prune`` buffers or zeroed filters).
    ``example_input`` is a tensor, a tuple of positional inputs or a dict of keyword inputs; the
    channel topology is traced from one real forward pass on it. ``inplace_dict`` (a dict in the
    seed's format, or a path to a YAML/JSON file holding one) overrides the inferred topology:
    it is checked against the trace, and only its keys change shape. ``model`` is not mutated.

    The reference is the model as the mask source defines it: given masks zero the pruned
    filters and their biases (as NNI's masks do); masks read from the model leave whatever it
    computes, live biases included (constants are folded into the next layer where that is
    exact, else those channels are kept, with a note). ``whole_channel=True`` treats a pruned
    filter's whole channel as pruned: its bias and the norm parameters it feeds are zeroed first,
    so nothing constant remains and the export is as small as the masks say; the function change
    this accepts is :attr:`ExportResult.function_change`. ``round_to`` adds pruned channels back
    until each pruned layer keeps a multiple of it (keeping a channel is always exact), except a
    grouped conv whose groups admit no multiple below its full width (RegNet's 13 groups of 8 with
    ``round_to=8``): it keeps its count, as :func:`~lightning_prune.group_masks` leaves it.

    ``inplace=True`` lets export consume ``model`` to save memory: pruned channels are zeroed in its
    own tensors where a layer keeps them (rows the shrink drops are not written), and its layers are
    shrunk in place, each dense tensor dropped as its smaller one is built (nothing is copied; the
    peak is about the dense model). Use the returned model, not
    ``model``, afterwards. ``progress``: show where a long export is (``None``: once it has run a few
    seconds; a bar on a terminal, log lines on logger ``lightning_prune`` otherwise).
    """
    return export(
        model,
        masks,
        example_input,
        inplace_dict=inplace_dict,
        whole_channel=whole_channel,
        round_to=round_to,
        inplace=inplace,
        progress=progress,
    ).model
