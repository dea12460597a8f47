"""What one fit of :class:`~lightning_prune.PruneExportCallback` accumulates, in one mutable object.

The callback's arguments stay on the callback; everything a fit learns or builds (the masks, the
schedule's position, the hold, the teacher, the exported model, ...) lives in a :class:`PruneState`
that the callback's units receive. The callback's public attributes of that kind (``masks``,
``hold``, ``steps_done``, ``shrunk``, ``taylor``, ``activations``) read and write it through :class:`StateField`.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch

from lightning_prune.core.graph.activation import ActivationScores
from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.hold import MaskHold
from lightning_prune.core.graph.importance import TaylorScores
from lightning_prune.core.graph.masks import Masks
from lightning_prune.lightning.distill import Distiller


@dataclasses.dataclass(eq=False)  # identity: a state is one fit's, never compared
class PruneState:
    """The state of one fit; :meth:`reset` starts afresh when the callback meets a new model."""

    masks: Masks | None = None
    hold: MaskHold | None = None
    steps_done: int = 0  # pruning steps taken (the schedule's position; 1 after a one-shot prune)
    shrunk: bool = False  # finetune="pruned": the smaller layers are in the module
    taylor: TaylorScores = dataclasses.field(default_factory=TaylorScores)
    activations: ActivationScores = dataclasses.field(default_factory=ActivationScores)
    graph: ChannelGraph | None = None  # traced once per model and masks source; None: trace again
    pruner_votes: Masks | None = None  # a pruner object's masks, read in setup before it is unwrapped
    distiller: Distiller | None = None
    teacher_state: dict[str, torch.Tensor] | None = None  # a resumed teacher, built when training starts
    shrink_record: dict[str, Any] | None = None  # finetune="pruned": how the original was shrunk
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    exported_model: torch.nn.Module | None = None
    network_prefix: str = ""
    module: weakref.ref | None = None  # the LightningModule of this fit

    def reset(self) -> None:
        """Forget the previous fit's masks and figures: a new model is not bound by them."""
        for field in dataclasses.fields(self):
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            setattr(self, field.name, default)

    def is_for(self, pl_module: Any) -> bool:
        """Whether this state belongs to ``pl_module`` (or to no module yet)."""
        return self.module is None or self.module() is pl_module

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, module=None)  # a weak reference does not pickle (ddp_spawn pickles callbacks)


class StateField:
    """A callback attribute that lives in the callback's :class:`PruneState` (``_state``), read and written there."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name.lstrip("_")

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else getattr(instance._state, self.name)

    def __set__(self, instance: Any, value: Any) -> None:
        setattr(instance._state, self.name, value)


__all__ = ["PruneState", "StateField"]
