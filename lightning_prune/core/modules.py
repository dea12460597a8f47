"""Small operations on ``nn.Module`` trees that several parts of the package need, in one place.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
>>> _ = model[1].eval()  # a user's frozen norm
>>> with evaluating(model):
...     model.training, model[1].training
(False, False)
>>> model.training, model[1].training
(True, False)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def running_modules(model: nn.Module, on_enter: Callable[[str, tuple], None] | None = None) -> Iterator[list[str]]:
    """Inside the block, the list yielded holds the names of ``model``'s modules now running,
    outermost first (global forward hooks, removed on exit). A module whose forward raises stays
    on it, so after an exception its last entry names the module that raised. ``on_enter(name,
    args)`` is called as each module starts."""
    names = {id(module): name for name, module in model.named_modules()}
    running: list[str] = []

    def enter(module: nn.Module, args: tuple) -> None:
        if id(module) in names:
            running.append(names[id(module)])
            if on_enter is not None:
                on_enter(running[-1], args)

    def leave(module: nn.Module, args: tuple, output: object) -> None:  # returns None: the output stays
        if id(module) in names and running:
            running.pop()

    hooks = [
        nn.modules.module.register_module_forward_pre_hook(enter),
        nn.modules.module.register_module_forward_hook(leave),
    ]
    try:
        yield running
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the block; afterwards every submodule gets back its own mode (a frozen norm stays frozen)."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def copy_training_modes(source: nn.Module, target: nn.Module) -> None:
    """Give each submodule of ``target`` the train/eval mode of the ``source`` submodule at the same path
    (a module the export put in place of another takes that one's mode), and each parameter its
    ``requires_grad``: a frozen layer stays frozen, including a bias the export gave it (a folded constant)."""
    modes = {name: module.training for name, module in source.named_modules()}
    for name, module in target.named_modules():
        module.training = modes.get(name, module.training)
    trainable = {name: p.requires_grad for name, p in source.named_parameters(remove_duplicate=False)}
    owner_trainable: dict[str, bool] = {}
    for name, value in trainable.items():
        owner = name.rpartition(".")[0]
        owner_trainable[owner] = owner_trainable.get(owner, False) or value
    for name, parameter in target.named_parameters(remove_duplicate=False):
        default = owner_trainable.get(name.rpartition(".")[0], parameter.requires_grad)
        parameter.requires_grad_(trainable.get(name, default))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (``"layer1.0.conv1"``)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def within(name: str, module: str) -> bool:
    """Whether the module (or tensor) at dotted path ``name`` is ``module`` or inside it (``""``: the model)."""
    return module == "" or name == module or name.startswith(module + ".")


def qualified_name(parent: str, child: str) -> str:
    """The dotted path of ``child`` (a submodule or tensor name) under module ``parent`` (``""``: the model)."""
    return f"{parent}.{child}" if parent and child else parent or child


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s own parameters and buffers (not its children's) by name, ``None`` entries left out."""
    own = {name: tensor for name, tensor in module._parameters.items() if tensor is not None}
    own.update({name: tensor for name, tensor in module._buffers.items() if tensor is not None})
    return own


Places = dict[int, list[tuple[nn.Module, str]]]
"""Tensor id -> every ``(module, name)`` holding it as a parameter or buffer (see :func:`tensor_places`)."""


def tensor_places(model: nn.Module) -> Places:
    """Where each of ``model``'s parameters and buffers is held: more than one place for a tensor two
    modules share (``b.weight = a.weight``)."""
    places: Places = {}
    for module in model.modules():
        for kind in (module._parameters, module._buffers):
            for name, tensor in kind.items():
                if tensor is not None:
                    places.setdefault(id(tensor), []).append((module, name))
    return places


def replace_tensor(module: nn.Module, name: str, value: torch.Tensor, places: Places | None = None) -> None:
    """Replace the parameter or buffer ``name`` of ``module`` by ``value`` (a parameter stays a parameter).

    With ``places`` (from :func:`tensor_places`, kept up to date here), every other module holding the
    same tensor gets the same new one, so a tie survives the replacement."""
    old = module._parameters[name] if name in module._parameters else module._buffers[name]
    if name in module._parameters:
        value = nn.Parameter(value, requires_grad=module._parameters[name].requires_grad)
    holders = places.pop(id(old), [(module, name)]) if places is not None else [(module, name)]
    for holder, attribute in holders:
        (holder._parameters if attribute in holder._parameters else holder._buffers)[attribute] = value
    if places is not None:
        places[id(value)] = holders


class SwappedTensors:
    """The tensors a :class:`~lightning_prune.core.weights.TensorSource` swapped out, per loaded module.

    :meth:`release` gives module ``name`` back the tensors it held before :meth:`load`;
    :meth:`keep` makes what it loaded its own for good.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._saved: dict[str, dict[str, torch.Tensor]] = {}  # module -> the tensors it held while loaded

    def release(self, name: str) -> None:
        """Module ``name`` gets back the tensors it held before it was loaded."""
        module = self.model.get_submodule(name)
        for attr, tensor in self._saved.pop(name, {}).items():
            (module._parameters if attr in module._parameters else module._buffers)[attr] = tensor

    def keep(self, name: str) -> None:
        """Module ``name`` keeps what it was loaded with: it is no longer the original's."""
        self._saved.pop(name, None)


__all__ = [
    "Places",
    "SwappedTensors",
    "copy_training_modes",
    "evaluating",
    "own_tensors",
    "qualified_name",
    "replace_tensor",
    "set_submodule",
    "tensor_places",
    "within",
]
