"""What export keeps after its self-check fails: every module the failure implicates, in one retry.

The model's code fixes a size the export changed (a view's factor, a width read from another tensor's
shape: torchvision's Swin computes ``head_dim`` as ``C // num_heads``). The check stops at the first
module that raises, but the modules of its class that made size guesses run the same code, and some of
them may fail the same way. So before retrying, one more forward of the exported model (at batch 1
where that is valid) runs with each of them guarded: one that raises at the same line of code as the
first gives its input back as its output, so that the pass reaches the next, and anything else ends the
pass. Every module found raising is retried at once: Swin's twelve attention blocks are one retry,
not twelve, and a block of the same class that runs fine (its heads going with its width) keeps
nothing. A retry keeps the size guesses made inside each module, and where a module fails again all
its channels; where nothing localises the failure (a numerical difference), every size guess. A module
is retried at most twice and the guesses once, which bounds the passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.graph.channel_graph import ChannelGraph, Override
from lightning_prune.core.modules import evaluating, within
from lightning_prune.core.trace.records import call_model
from lightning_prune.core.verify.selfcheck import Failure, first_sample, normal_tensors, raised_at

_RESHAPED_WRONG = (
    "shrinking the tensor a view or an indexed write puts them in changed the model's output (its code fixes that size)"
)


class Retries:
    """The retries of one export: what each keeps (:meth:`overrides`), and how many there were (``count``)."""

    def __init__(self) -> None:
        self.tries: dict[str, int] = {}
        self.count = 0

    def overrides(
        self, graph: ChannelGraph, failure: Failure, model: nn.Module, example_input: Any, expected: Any
    ) -> list[Override]:
        """What to keep after ``model`` (the exported model) failed the check on ``example_input``, whose
        masked output is ``expected``; empty when nothing is left to keep."""
        module = failure.module
        kept: list[Override] = []
        if module is not None and self.tries.get(module, 0) < 2:
            attempt = self.tries.get(module, 0) + 1
            raised = {module: failure.what}
            alike = _alike(graph, model, module, lambda name: self.tries.get(name, 0) == attempt - 1)
            if alike and failure.where is not None:
                found = raising(model, [module, *alike], example_input, expected, failure.where)
                raised |= {name: what for name, what in found.items() if name != module}
            for name, what in raised.items():
                self.tries[name] = attempt
                kept += _kept(graph, name, attempt, what)
        elif "*" not in self.tries:
            self.tries["*"] = 1
            kept = [(labels, f"{_RESHAPED_WRONG}, in '{owner}'") for labels, owner in graph.trace.reshaped]
        self.count += bool(kept)
        return kept


def raising(
    model: nn.Module, names: list[str], example_input: Any, expected: Any, where: tuple[str, int]
) -> dict[str, str]:
    """Which of ``model``'s modules ``names`` raise at ``where`` (a file and line) in one forward on
    ``example_input`` (its first sample where it can be cut, see
    :func:`~lightning_prune.core.verify.selfcheck.first_sample`), each with what it raised. A module that
    raises there gives its first tensor input back as its output, so that the pass goes on; anything
    else raised ends the pass, and what was found before it counts."""
    one = first_sample(example_input, expected)
    raised: dict[str, str] = {}

    def guarded(name: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return forward(*args, **kwargs)
            except Exception as err:
                given = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
                if given is None or raised_at(err) != where:
                    raise
                raised[name] = f"{type(err).__name__}: {err}"
                return given

        return run

    modules = {name: model.get_submodule(name) for name in names}
    own = {name: module.__dict__.get("forward") for name, module in modules.items()}
    for name, module in modules.items():
        module.forward = guarded(name, module.forward)
    try:
        with torch.inference_mode(), evaluating(model):
            call_model(model, example_input if one is None else one[0])
    except Exception:  # something else failed: the pass ends there
        pass
    finally:
        for name, module in modules.items():
            if own[name] is None:
                del module.forward
            else:
                module.forward = own[name]
        normal_tensors(model)
    return raised


def _alike(graph: ChannelGraph, model: nn.Module, module: str, retried: Callable[[str], bool]) -> list[str]:
    """The other modules of ``module``'s class that made size guesses (as it did) and were ``retried`` as often."""
    if not _guesses(graph, module):
        return []
    kind = type(model.get_submodule(module))
    return [
        name
        for name, other in model.named_modules()
        if type(other) is kind and name != module and retried(name) and _guesses(graph, name)
    ]


def _kept(graph: ChannelGraph, name: str, attempt: int, what: str) -> list[Override]:
    """What retry ``attempt`` of module ``name`` keeps, after it raised ``what``."""
    inside = _guesses(graph, name)
    if inside and attempt == 1:
        return [(labels, f"{_RESHAPED_WRONG}: '{name}' raised {what}") for labels in inside]
    labels = [graph.trace.module_inputs.get(name, torch.empty(0, dtype=torch.long))]
    labels += [out for producer, out in graph.producers.items() if within(producer, name)]
    why = f"'{name}' fixes their size in its code (with them pruned it raised {what}), so they are kept"
    return [(torch.cat([x.flatten() for x in labels]), why)]


def _guesses(graph: ChannelGraph, module: str) -> list[Tensor]:
    """The labels of every size guess made inside ``module``."""
    return [labels for labels, owner in graph.trace.reshaped if within(owner, module)]


__all__ = ["Retries", "raising"]
