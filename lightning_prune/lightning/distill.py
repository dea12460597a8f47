"""Distillation from the dense model while the pruned one fine-tunes, with the user's code unchanged.

How it finds the outputs: the callback knows the network inside the LightningModule (the deepest
submodule that holds every parameter, e.g. ``self.model``; the module itself when the parameters
are spread over several children). While the module's own ``training_step`` runs, a forward hook
on that network records its input and output. The network must be called exactly once per
training step and return one tensor of logits (class scores along dim 1), or a dict / an object
with a ``logits`` entry (Hugging Face outputs). Classes lie along dim 1 (``(batch, classes, ...)``),
except for a 3-d ``logits`` entry, Hugging Face's ``(batch, tokens, vocabulary)``, whose classes are
the last dim. For a causal LM whose head shares its weight with the embedding, the network is the
whole ``...ForCausalLM`` (the callback counts the tied parameter under both names). The frozen teacher, a copy of that network made just
before the first pruning step (``distill={"teacher": "fit_start"}``: as training starts; under FSDP2 sharded
as the network is, each rank holding its own shards), runs on the same input, and

    loss = your loss + weight * temperature**2 * KL(softmax(teacher / T) || softmax(student / T))

is returned to Lightning instead of your loss (for a dict result, its ``"loss"``) once the teacher
exists. The term is logged as ``prune/distill_loss``. ``training_step`` is replaced on the instance
for the fit and put back afterwards; your class is not touched.

Which teacher: by default the network just before the first pruning step, what a run that trains the
dense network first (``prune_on_epoch >= 1`` from scratch) needs. A run that starts from trained weights
and whose first step comes later (a schedule from epoch 1, Taylor) wants ``"fit_start"``: the epochs
before that step fine-tune the dense network at the run's learning rate, and a copy taken mid-way can
be worse than the weights fit began with (docs/recipes.md: 0.70 against 0.83 held-out accuracy).

Where it cannot work it says so before training: manual optimization (``automatic_optimization =
False``: Lightning never sees a loss to add to), and during training: a network called twice in
one step, or outputs that hold several tensors and no ``logits``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.core.errors import ConfigurationError
from lightning_prune.core.sharded import copy_into_shards, is_dtensor, is_sharded, sharded_copy

DEFAULTS: dict[str, Any] = {"weight": 0.5, "temperature": 4.0, "teacher": "first_step"}
TEACHER_FROM = {
    "first_step": "a copy of the network made just before the first pruning step",
    "fit_start": "a copy of the network as training starts (after a checkpoint is restored)",
}
"""When the teacher is made (``distill={"teacher": ...}``)."""


def distill_settings(value: Any) -> dict[str, Any] | None:
    """``distill=`` as given (``None``/``False``, ``True``, or a dict) -> the settings, checked."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(DEFAULTS)
    if not isinstance(value, Mapping) or set(value) - set(DEFAULTS):
        raise ConfigurationError(
            f"`PruneExportCallback(distill={value!r})` must be True, False, or a dict with keys "
            f"{list(DEFAULTS)}, e.g. {{'weight': 0.5, 'temperature': 4.0}}."
        )
    settings = {**DEFAULTS, **value}
    if settings["teacher"] not in TEACHER_FROM:
        raise ConfigurationError(
            f"`PruneExportCallback(distill={value!r})`: 'teacher' must be one of {list(TEACHER_FROM)} "
            f"('fit_start' when fit starts from trained weights); got {settings['teacher']!r}."
        )
    for key in ("weight", "temperature"):
        number = settings[key]
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= 0:
            raise ConfigurationError(
                f"`PruneExportCallback(distill={value!r})`: '{key}' must be a number > 0; got {number!r}."
            )
        settings[key] = float(number)
    return settings


def logits_of(output: Any, where: str) -> Tensor:
    """The logits tensor in a network's output: the tensor itself, or its ``logits`` entry."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    kind = type(output).__name__
    size = f" of {len(output)}" if isinstance(output, (tuple, list, Mapping)) else ""
    raise ConfigurationError(
        f"PruneExportCallback(distill=...): {where} returned a {kind}{size}, not one tensor of logits, so the "
        "distillation loss cannot tell which output to match. HINT: return the logits (or a dict / an object "
        "with a 'logits' entry) from the network, or leave `distill` off."
    )


def class_dim(output: Any, logits: Tensor) -> int:
    """Where the classes lie in ``logits`` (found in ``output``): the last dim for a 3-d ``logits``
    entry (Hugging Face's ``(batch, tokens, vocabulary)``), else dim 1."""
    return -1 if logits.ndim == 3 and logits is not output else 1


def distill_loss(student: Tensor, teacher: Tensor, temperature: float, dim: int = 1) -> Tensor:
    """Hinton's loss: ``T**2 * KL(softmax(teacher/T) || softmax(student/T))``, classes along ``dim``,
    averaged over every other position (batch, pixels, tokens)."""
    if dim != 1 and student.ndim > 1:
        student, teacher = student.movedim(dim, 1), teacher.movedim(dim, 1)
    classes = student.shape[1] if student.ndim > 1 else student.shape[0]
    s = student.movedim(1, -1).reshape(-1, classes) if student.ndim > 1 else student[None]
    t = teacher.movedim(1, -1).reshape(-1, classes) if teacher.ndim > 1 else teacher[None]
    log_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_t = F.log_softmax(t.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


class Distiller:
    """Holds the frozen teacher and adds the distillation term to the module's training loss."""

    def __init__(self, weight: float, temperature: float, network_name: str, teacher: str = "first_step") -> None:
        self.weight, self.temperature, self.network_name = weight, temperature, network_name
        self.teacher_from = teacher  #: a key of :data:`TEACHER_FROM`
        self.teacher: nn.Module | None = None
        self._calls: list[tuple[tuple, dict, Any]] | None = None
        self._handle: Any = None
        self._original: Any = None
        self.last_loss: float | None = None

    @property
    def attached(self) -> bool:
        """Whether the recording hook is on the network (between :meth:`attach` and :meth:`detach`)."""
        return self._handle is not None

    def network_of(self, pl_module: Any) -> nn.Module:
        """The network inside ``pl_module`` whose outputs are distilled."""
        return pl_module.get_submodule(self.network_name) if self.network_name else pl_module

    def where(self) -> str:
        return f"the network '{self.network_name}'" if self.network_name else "the LightningModule"

    def make_teacher(self, network: nn.Module, state: Mapping[str, Tensor] | None = None) -> nn.Module:
        """A frozen copy of ``network`` (evaluation mode), with ``state`` loaded when given; the
        recording hook is not copied with it. A network whose parameters ``fully_shard`` split gets a
        teacher sharded the same way (:func:`~lightning_prune.core.sharded.sharded_copy`; collective)."""
        hooked = self._handle is not None
        if hooked:
            self._handle.remove()
        sharded = is_sharded(network)
        try:
            teacher = sharded_copy(network) if sharded else copy.deepcopy(network)
        finally:
            if hooked:
                self._handle = network.register_forward_hook(self._record, with_kwargs=True)
        if state is not None:
            if sharded:  # whole tensors, each rank taking its own part
                copy_into_shards(teacher, state)
            else:
                teacher.load_state_dict(state)
        teacher.eval().requires_grad_(False)
        self.teacher = teacher
        return teacher

    def teacher_megabytes(self) -> float:
        if self.teacher is None:
            return 0.0
        tensors = [*self.teacher.parameters(), *self.teacher.buffers()]
        local = [t.to_local() if is_dtensor(t) else t for t in tensors]  # a sharded teacher: this rank's shards
        return sum(t.numel() * t.element_size() for t in local) / 2**20

    def attach(self, pl_module: Any) -> None:
        """Hook the network and wrap the instance's ``training_step`` (idempotent)."""
        if self._original is not None:
            return
        self._handle = self.network_of(pl_module).register_forward_hook(self._record, with_kwargs=True)
        original = pl_module.training_step
        self._original = (pl_module, original, "training_step" in vars(pl_module))

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._step(pl_module, original, args, kwargs)

        pl_module.training_step = training_step

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._original is not None:
            pl_module, original, had_own = self._original
            if had_own:
                pl_module.training_step = original
            else:
                vars(pl_module).pop("training_step", None)
            self._original = None

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._calls is not None and torch.is_grad_enabled():
            self._calls.append((args, kwargs, output))

    def _step(self, pl_module: Any, original: Any, args: tuple, kwargs: dict) -> Any:
        self._calls = []
        try:
            result = original(*args, **kwargs)
        finally:
            calls, self._calls = self._calls, None
        if result is None or self.teacher is None:
            return result
        if len(calls) != 1:
            raise ConfigurationError(
                f"PruneExportCallback(distill=...): {self.where()} ran {len(calls)} times in one training step; "
                "distillation matches one output per step. HINT: call the network once per training_step, or leave "
                "`distill` off."
            )
        inputs, keywords, output = calls[0]
        student = logits_of(output, self.where())
        with torch.no_grad():
            teacher = logits_of(self.teacher(*inputs, **keywords), "the teacher")
        term = distill_loss(student, teacher, self.temperature, class_dim(output, student))
        self.last_loss = float(term.detach())
        pl_module.log("prune/distill_loss", term.detach(), on_step=True, on_epoch=False, batch_size=student.shape[0])
        if isinstance(result, Tensor):
            return result + self.weight * term
        if isinstance(result, Mapping) and isinstance(result.get("loss"), Tensor):
            return {**result, "loss": result["loss"] + self.weight * term}
        raise ConfigurationError(
            f"PruneExportCallback(distill=...): training_step returned a {type(result).__name__} without a 'loss' "
            "tensor, so there is no loss to add the distillation term to."
        )


__all__ = ["DEFAULTS", "TEACHER_FROM", "Distiller", "class_dim", "distill_loss", "distill_settings", "logits_of"]
