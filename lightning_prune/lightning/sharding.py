"""The callback under fully sharded training: ``ModelParallelStrategy`` with torch's ``fully_shard`` (FSDP2).

The parameters are ``DTensor`` shards, and no rank ever holds the whole model. What pruning reads
of it, it reads one module at a time from :func:`~lightning_prune.core.sharded.skeleton` (the
structure on the meta device) and :class:`~lightning_prune.core.sharded.GatheredState` (one tensor
gathered when asked): the trace, the importance scores, the export and its check. Gathering is
collective, so every rank runs these steps, on the same example input (rank zero's), in the same
order; the masks are rank zero's on every rank, as under DDP. The hold zeroes each rank's own rows
(:class:`~lightning_prune.core.graph.hold.MaskHold` writes into the local shards), and Taylor
importance reduces each layer's per-channel sums across ranks. Distillation's teacher is a frozen copy
sharded as the network is (:func:`~lightning_prune.core.sharded.sharded_copy`): each rank builds and
fills only its own shards, and the teacher's forward, like the network's, runs on every rank at every
step; a checkpoint keeps its shards (:func:`save_teacher`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from lightning_prune.core.errors import CheckpointError, ConfigurationError
from lightning_prune.core.export import ExportResult
from lightning_prune.core.from_file import export_from_file
from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.masks import Masks
from lightning_prune.core.sharded import (
    GatheredState,
    broadcast_buffers,
    is_sharded,
    reshard,
    skeleton,
    whole,
)
from lightning_prune.core.trace.tracer import trace_channels
from lightning_prune.core.weights import StreamedWeights

SHARDED_STRATEGIES = ("ModelParallelStrategy",)
"""Lightning strategies whose modules the callback reads as :class:`ShardedModule` (FSDP2)."""
TEACHER_PREFIX = "lightning_prune.teacher."
"""Where a sharded teacher's tensors are in a distributed checkpoint's ``state_dict``, beside the module's."""


def uses_fsdp2(trainer: Any) -> bool:
    """Whether the trainer's strategy shards with ``fully_shard`` (Lightning's ``ModelParallelStrategy``)."""
    return any(cls.__name__ in SHARDED_STRATEGIES for cls in type(trainer.strategy).__mro__)


def read_sharded(trainer: Any, pl_module: Any) -> bool:
    """Whether the callback reads ``pl_module`` shard by shard: its parameters are ``DTensor`` shards (once
    :func:`shards_registered` has put back those a validation forward left gathered)."""
    shards_registered(trainer, pl_module)
    return uses_fsdp2(trainer) and is_sharded(pl_module)


def shards_registered(trainer: Any, pl_module: Any) -> None:
    """Under FSDP2, the shards registered as ``pl_module``'s parameters again where a forward without a
    backward (validation) left the root's gathered (:func:`~lightning_prune.core.sharded.reshard`), so that
    what the callback reads, and what its hold writes, are the shards."""
    if uses_fsdp2(trainer):
        reshard(pl_module)


def same_buffers(trainer: Any, pl_module: Any) -> None:
    """Under FSDP2, give every rank rank zero's buffers (each rank's norm statistics are its own, and a
    distributed checkpoint keeps one rank's copy of each): before a checkpoint and before export."""
    if read_sharded(trainer, pl_module):
        broadcast_buffers(pl_module)


def check_sharded_settings(settings: Any, trainer: Any) -> None:
    """Refuse, in ``setup``, what the callback cannot do on a fully sharded module, before any training."""
    if not uses_fsdp2(trainer):
        return
    strategy = type(trainer.strategy).__name__
    problem = None
    if settings.pruner_name is not None and settings.importance is None:
        problem = (
            f"pruner={settings.pruner!r} (NNI's pruners wrap each layer's parameters, which {strategy} shards)",
            "name one of this package's measures ('l1', 'l2', 'fpgm', 'bn_scale', 'taylor', 'activation'), or give `masks=`",
        )
    elif settings.pruner_name is None and settings.mask_source is None:
        problem = (
            "a pruner object or masks read from the model's own zeros (they need every layer whole at once)",
            "name one of this package's measures, or give `masks=` (a dict or a mask file)",
        )
    if problem is not None:
        what, hint = problem
        raise ConfigurationError(
            f"`PruneExportCallback` under {strategy} (fully sharded, FSDP2) does not support {what}. "
            f"HINT: {hint}; see docs/distributed.md."
        )


class OneAtATime:
    """Stands for the model where scores read weights: :meth:`get_submodule` gives the skeleton's
    module with its own tensors gathered, and releases the one it gave before."""

    def __init__(self, weights: StreamedWeights) -> None:
        self.weights, self.loaded = weights, None

    def get_submodule(self, name: str) -> nn.Module:
        """Module ``name`` with its tensors (the previous module's are dropped)."""
        self.release()
        module = self.weights.model.get_submodule(name)
        if self.weights.owned(module):
            self.loaded = name
            return self.weights.load(name)
        return module

    def release(self) -> None:
        """Drop the tensors of the module given last."""
        if self.loaded is not None:
            self.weights.release(self.loaded)
            self.loaded = None


class ShardedModule:
    """What the callback reads of a LightningModule whose parameters ``fully_shard`` split: every
    method is collective (call it on every rank, with the same arguments)."""

    def __init__(self, pl_module: nn.Module) -> None:
        self.skeleton = skeleton(pl_module)
        self.state = GatheredState(pl_module, f"the sharded {type(pl_module).__name__}")

    def graph(self, example: Any) -> ChannelGraph:
        """The channel graph, traced on the skeleton with each module's tensors gathered as it runs."""
        return ChannelGraph(trace_channels(self.skeleton, example, StreamedWeights(self.skeleton, self.state)))

    @contextmanager
    def weights(self) -> Iterator[OneAtATime]:
        """The model as importance scores read it: one module's tensors gathered at a time."""
        reader = OneAtATime(StreamedWeights(self.skeleton, self.state))
        try:
            yield reader
        finally:
            reader.release()

    def export(self, masks: Masks, example: Any, *, round_to: int, whole_channel: bool, progress: bool) -> ExportResult:
        """The smaller model, built block by block from gathered tensors, on every rank."""
        return export_from_file(
            self.skeleton,
            self.state,
            masks,
            example,
            round_to=round_to,
            whole_channel=whole_channel,
            progress=None if progress else False,
        )


def save_teacher(trainer: Any, teacher: nn.Module, checkpoint: dict[str, Any], saved: dict[str, Any]) -> None:
    """Put a sharded teacher into ``checkpoint`` (collective). In a distributed checkpoint (Lightning's
    default under FSDP2) its shards go beside the module's in ``checkpoint["state_dict"]``, each rank
    writing its own, and ``saved`` (the callback's state, which rank zero alone writes) says where; in a
    single-file checkpoint (``save_distributed_checkpoint=False``) its whole tensors go into ``saved``,
    gathered one at a time and kept on rank zero, as Lightning gathers the module's own for that file."""
    state = teacher.state_dict()
    if getattr(trainer.strategy, "_save_distributed_checkpoint", True):
        checkpoint["state_dict"].update({TEACHER_PREFIX + key: value for key, value in state.items()})
        saved["teacher_shards"] = TEACHER_PREFIX
        return
    gathered = {}
    for key, value in state.items():
        value = whole(value).cpu()
        if trainer.is_global_zero:
            gathered[key] = value
    saved["teacher"] = gathered


def load_teacher_shards(trainer: Any, teacher: nn.Module, prefix: str) -> None:
    """Read a sharded teacher's shards from the distributed checkpoint being resumed (each rank its own;
    collective)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException

    path = trainer.ckpt_path
    state = {prefix + key: value for key, value in teacher.state_dict().items()}
    try:
        load({"state_dict": state}, checkpoint_id=path)
    except (CheckpointException, OSError, RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"The checkpoint '{path}' says the distillation teacher's shards are in it (keys '{prefix}...'), "
            f"but they cannot be read: {err}. HINT: resume from the distributed checkpoint directory Lightning "
            "wrote, as it is."
        ) from err


__all__ = [
    "TEACHER_PREFIX",
    "OneAtATime",
    "ShardedModule",
    "check_sharded_settings",
    "load_teacher_shards",
    "read_sharded",
    "same_buffers",
    "save_teacher",
    "shards_registered",
    "uses_fsdp2",
]
