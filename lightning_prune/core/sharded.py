"""A model sharded by torch's ``fully_shard`` (FSDP2), seen whole one module at a time.

Under FSDP2 each parameter is a ``DTensor`` whose rows are split across the ranks. Pruning needs the
whole model only one layer at a time: :func:`skeleton` is the model's structure on the meta device
(original classes, full shapes, no FSDP state), and :class:`GatheredState` gives the full value of one
tensor when asked, gathered from the shards. Together they are what a weights file is to
:func:`~lightning_prune.core.from_file.export_from_file`: the trace, the plan, the shrink and the
block-by-block check run on the skeleton, each module's tensors gathered as it is needed and dropped
after. Gathering is collective: every rank must ask for the same tensors in the same order, which it
does when every rank runs the same export on the same masks and example input.

Without a process group (an unsharded model), both work on plain tensors:

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> bare = skeleton(model)
>>> bare[0].weight.device.type, tuple(bare[0].weight.shape), is_sharded(model)
('meta', (3, 4), False)
>>> state = GatheredState(model)
>>> torch.equal(state.get("2.bias"), model[2].bias)
True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.errors import ConfigurationError

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]

_FSDP_ATTRIBUTES = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded across ranks)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism)."""
    return any(is_dtensor(p) for p in model.parameters())


def whole(tensor: Tensor) -> Tensor:
    """``tensor`` itself, or the full value of a ``DTensor`` gathered from its shards (collective)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local_rows(tensor: Tensor, dim: int) -> tuple[Tensor, int, int]:
    """The part of ``tensor`` this rank holds, and the global indices ``[begin, end)`` it holds along
    ``dim``: the whole range for a plain tensor or one not split along ``dim``. Writing into the part
    writes the shard."""
    if not is_dtensor(tensor):
        return tensor, 0, tensor.shape[dim]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tensor.to_local(), offset[dim], offset[dim] + shape[dim]


def local_part(full: Tensor, like: Tensor) -> Tensor:
    """The part of ``full`` (a whole tensor) that this rank holds of ``like``, a ``DTensor`` of its shape
    (``full`` itself when ``like`` is a plain tensor)."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return full[tuple(slice(begin, begin + size) for begin, size in zip(offset, shape, strict=True))]


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (a norm's running statistics), in place.

    FSDP2 shards parameters but leaves each rank's buffers its own: each rank's BatchNorm statistics
    come from its own batches, so the ranks' models differ. DDP broadcasts them before every forward;
    this does it once (a collective; nothing happens without a process group of two or more)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for buffer in model.buffers():
        if not is_dtensor(buffer):
            dist.broadcast(buffer, src=src)


def fsdp_units(model: nn.Module) -> list[str]:
    """The names of ``model``'s modules that ``fully_shard`` made FSDP units, children before parents
    (``""``: ``model`` itself); none for a plain model or a torch without distributed support."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)][::-1]


def reshard(model: nn.Module) -> None:
    """Register the shards again as the parameters of every ``fully_shard`` module in ``model`` that FSDP2 left
    unsharded, freeing the gathered copies (not collective; nothing happens to a plain module).

    After a forward without a backward (a validation loop, a check) the root's parameters stay gathered:
    plain tensors, views into a buffer that the next reshard frees. Whatever reads or writes the parameters
    then must do it on the shards, which training updates."""
    for name in fsdp_units(model):
        model.get_submodule(name).reshard()


def skeleton(model: nn.Module) -> nn.Module:
    """``model``'s modules as they were before sharding, with every parameter on the meta device at its
    full shape (ties kept) and every buffer a copy of its full value.

    The modules are new objects of the original classes (FSDP's ``FSDP<Name>`` classes, its state and
    its hooks left out; the user's hooks kept); their other attributes are shared with ``model``'s."""
    tensors: dict[int, Tensor] = {}

    def bare(module: nn.Module) -> nn.Module:
        new = object.__new__(_original_class(type(module)))
        new.__dict__.update(
            {
                k: v
                for k, v in module.__dict__.items()
                if not k.startswith("__composable_api") and k not in _FSDP_ATTRIBUTES
            }
        )
        new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        for hooks in _HOOK_DICTS:
            if hooks in module.__dict__:
                new.__dict__[hooks] = type(module.__dict__[hooks])(
                    (key, hook) for key, hook in module.__dict__[hooks].items() if not _from_torch_distributed(hook)
                )
        new._parameters = {
            name: None if p is None else _meta_parameter(p, tensors) for name, p in module._parameters.items()
        }
        new._buffers = {name: None if b is None else _buffer_copy(b, tensors) for name, b in module._buffers.items()}
        new._modules = {name: None if child is None else bare(child) for name, child in module._modules.items()}
        return new

    return bare(model)


def sharded_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network``, whose parameters ``fully_shard`` split, sharded the same way and never whole
    on a rank: its :func:`skeleton` (meta) sharded at the modules the user sharded (children first, on the
    same mesh; the copy's top module too), then given memory for its own shards only and filled from
    ``network``'s local shards, with rank zero's buffers. Collective (every rank calls it)."""
    from torch.distributed.fsdp import fully_shard

    names = fsdp_units(network)
    twin = skeleton(network)
    for name in names if "" in names else [*names, ""]:  # children first, the copy's top module last
        fully_shard(twin.get_submodule(name), mesh=_mesh_of(network.get_submodule(name)) or _mesh_of(network))
    device = next(p.to_local().device for p in network.parameters() if is_dtensor(p))
    twin.to_empty(device=device)
    copy_into_shards(twin, {**dict(network.named_parameters()), **dict(network.named_buffers())})
    broadcast_buffers(twin)  # each rank's norm statistics are its own until now
    return twin


@torch.no_grad()
def copy_into_shards(target: nn.Module, source: Mapping[str, Tensor]) -> None:
    """Write ``source``'s tensors (by name) into ``target``'s, each rank only its own part: a ``DTensor``
    gives its local shard (sharded as the target is), a whole tensor the part of it this rank holds."""
    tensors = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    for name, tensor in tensors.items():
        if name not in source:
            continue  # a buffer a state dict leaves out (non-persistent): the copy's own
        value = source[name].detach()
        if is_dtensor(tensor):
            if is_dtensor(value) and value.placements != tensor.placements:
                raise ConfigurationError(
                    f"'{name}' is sharded as {value.placements}, which fully_shard does not reproduce "
                    f"({tensor.placements}): a sharded copy follows fully_shard (FSDP2) alone, not tensor parallelism. "
                    "HINT: shard the model with fully_shard only."
                )
            value = value.to_local() if is_dtensor(value) else local_part(value, tensor)
            tensor = tensor.to_local()
        tensor.copy_(value)


class GatheredState:
    """The tensors of ``model`` by state-dict name, each given whole when asked for (a ``DTensor`` is
    gathered from its shards; every rank must ask for the same tensors in the same order).

    It reads like a weights file (:class:`~lightning_prune.core.weights.WeightFile`: ``keys``,
    ``shape``, ``get``, ``path``), so :class:`~lightning_prune.core.weights.StreamedWeights` loads a
    :func:`skeleton` from it module by module."""

    def __init__(self, model: nn.Module, description: str = "the sharded model") -> None:
        self.path = description  # what errors name, as a file's path
        self._tensors: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
        self._tensors.update(model.named_buffers(remove_duplicate=False))

    def keys(self) -> set[str]:
        """The names of the model's parameters and buffers (a tied tensor under each of its names)."""
        return set(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        """The full shape of tensor ``key`` (nothing is gathered)."""
        return tuple(self._tensors[key].shape)

    @torch.no_grad()
    def get(self, key: str) -> Tensor:
        """The full value of tensor ``key``, as a new tensor the caller owns."""
        tensor = self._tensors[key].detach()
        return tensor.full_tensor() if is_dtensor(tensor) else tensor.clone()


def _mesh_of(module: nn.Module) -> Any:
    return next((p.device_mesh for p in module.parameters() if is_dtensor(p)), None)


def _original_class(cls: type) -> type:
    """The class ``fully_shard`` replaced (``FSDPLinear`` -> ``Linear``), or ``cls``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls
    if not issubclass(cls, FSDPModule):
        return cls
    return next(base for base in cls.__mro__ if not issubclass(base, FSDPModule))


def _from_torch_distributed(hook: Any) -> bool:
    owner = getattr(hook, "__self__", hook)
    return type(owner).__module__.startswith("torch.distributed")


def _meta_parameter(param: Tensor, seen: dict[int, Tensor]) -> Tensor:
    if id(param) not in seen:
        meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
        seen[id(param)] = nn.Parameter(meta, requires_grad=param.requires_grad)
    return seen[id(param)]


def _buffer_copy(buffer: Tensor, seen: dict[int, Tensor]) -> Tensor:
    if id(buffer) not in seen:
        seen[id(buffer)] = copy.deepcopy(whole(buffer).detach())
    return seen[id(buffer)]


__all__ = [
    "GatheredState",
    "broadcast_buffers",
    "copy_into_shards",
    "fsdp_units",
    "is_dtensor",
    "is_sharded",
    "local_part",
    "local_rows",
    "reshard",
    "sharded_copy",
    "skeleton",
    "whole",
]
