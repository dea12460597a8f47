"""The masked model without a masked copy of it: each layer's pruned channels zeroed while it is used.

The trace, the plan and the shrink each need the masked model, whose pruned filters (and, with
``whole_channel``, the norm parameters they feed) are zero. A :class:`MaskedView` gives a layer
zeroed tensors when it is loaded and its own back when released (the trace: one layer's copy at a
time), or for good (the shrink: the zeroed copy is sliced at once, so only the kept slices stay).
With ``in_place=True`` the model's own tensors are zeroed (no copy; the model is the masked one after).

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 3))
>>> view = MaskedView(model, {"0": torch.tensor([True, False, True])})
>>> bool(view.load("0").weight[1].any())
False
>>> view.release("0"); bool(model[0].weight[1].any())
True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_prune.core.graph.masks import Masks, pruned_slices
from lightning_prune.core.modules import SwappedTensors, replace_tensor, tensor_places

ParameterKeep = dict[tuple[str, str, int], Tensor]
"""``(module, parameter, dim) -> keep-vector``: parameter slices pruned channels reach (``whole_channel``)."""

Ties = dict[tuple[str, str], list[tuple[str, str]]]
"""``(module, attribute) -> the other (module, attribute) names of the same tensor``, for each tensor
held in several places (T5's ``shared`` embedding, also its encoder's and decoder's ``embed_tokens``
and the tied ``lm_head``)."""


def tensor_ties(model: nn.Module) -> Ties:
    """Every name of a tensor ``model`` holds in several places, with that tensor's other names."""
    names = {id(module): name for name, module in model.named_modules()}
    ties: Ties = {}
    for places in tensor_places(model).values():
        named = [(names[id(module)], attr) for module, attr in places]
        for place in named if len(named) > 1 else []:
            ties[place] = [other for other in named if other != place]
    return ties


class MaskedView(SwappedTensors):
    """Zeroed tensors for the layers ``keep`` masks (and the parameters of ``zeroed``), on demand.

    Implements :class:`~lightning_prune.core.weights.TensorSource`: ``load(name)`` gives module ``name``
    its masked tensors, ``release(name)`` its own back (in place: they stay zeroed), ``keep(name)``
    leaves it masked for good.
    """

    def __init__(self, model: nn.Module, keep: Masks, zeroed: ParameterKeep | None = None, in_place: bool = False):
        super().__init__(model)
        self.masks = keep
        self.zeroed: ParameterKeep = dict(zeroed or {})
        self.in_place = in_place
        self.ties = tensor_ties(model)
        self._names = {id(module): name for name, module in model.named_modules()}
        self._in_place_done: dict[str, frozenset] = {}  # module -> the ``zeroed`` slices it had when zeroed in place
        self._tied = {layer for layer, _ in self.ties}  # modules holding a tensor another module holds too
        self._derived: tuple[tuple, dict] = ((), {})  # (version, what _for_version keeps)

    @property
    def targets(self) -> set[str]:
        """The modules that have something to zero: those the masks and ``zeroed`` name, and every other
        module holding one of their tensors (a tied embedding is zeroed wherever it is used)."""
        derived = self._for_version()  # asked once per module of a pass
        if "targets" not in derived:
            named = set(self.masks) | {layer for layer, _, _ in self.zeroed}
            tied = {other for (layer, _), others in self.ties.items() if layer in named for other, _ in others}
            derived["targets"] = named | tied
        return derived["targets"]

    def owned(self, module: nn.Module) -> bool:
        """Whether ``module`` has pruned channels to zero."""
        return self._names.get(id(module)) in self.targets

    def load(self, name: str) -> nn.Module:
        """Module ``name`` with its pruned channels zeroed (copies, unless ``in_place``); returns it."""
        module = self.model.get_submodule(name)
        if name not in self._saved:
            self._saved[name] = dict(module._parameters) | dict(module._buffers)
            cuts = self._cut_names(name) if self.in_place else None  # copies are made afresh at each load
            if cuts is None or self._in_place_done.get(name) != cuts:  # zeroed in place already: it stays zero
                zero_module(name, module, self.masks, self.zeroed, self.in_place, self.ties, self.model)
            if cuts is not None:
                self._in_place_done[name] = cuts
        return module

    def sliced_away(self, name: str, keep: Mapping[tuple[str, int], tuple[Tensor, int]]) -> bool:
        """Whether every slice :meth:`load` would zero in module ``name`` is one ``keep`` (a
        ``LayerChange.keep``) drops: the shrink then slices the module's own tensors, with no zeroed copy (in
        place: without zeroing rows it drops)."""
        if name in self._tied:  # a tensor it shares is zeroed where the others cut it too
            return False
        module = self.model.get_submodule(name)
        for attr, dim, index in _cuts(name, module, self.masks, self.zeroed):
            kept = keep.get((attr, dim))
            if index.numel() and (
                kept is None or kept[1] != 1 or _overlap(index, kept[0], getattr(module, attr).shape[dim])
            ):
                return False
        return True

    def output_cut(self, name: str) -> Tensor | None:
        """The output channels :meth:`load` zeroes in module ``name``, where that is all it does to a plain
        conv or linear layer (its filters and biases there, nothing shared, nothing else): the layer's output
        at those channels is then zero whatever they hold, so a traced pass may run the layer on the kept
        rows of its own tensors and leave the cut outputs zero, instead of copying them (or, in place,
        zeroing them: the arithmetic of the cut channels is saved either way; the shrink zeroes what it keeps).
        ``None`` for any other module."""
        found = self._for_version().setdefault("output_cuts", {})
        if name not in found:
            found[name] = self._output_cut(name)
        return found[name]

    def _output_cut(self, name: str) -> Tensor | None:
        module = self.model.get_submodule(name)
        if name not in self.masks or type(module).forward not in _PLAIN_FORWARDS:
            return None
        if name in self._tied or any(layer == name for layer, _, _ in self.zeroed):
            return None
        cuts = _cuts(name, module, self.masks, self.zeroed)
        index = cuts[0][2] if cuts else None
        if index is None or any(dim != 0 or not torch.equal(cut, index) for _, dim, cut in cuts):
            return None
        return index

    def _for_version(self) -> dict:
        """What is computed from the masks and ``zeroed`` (:attr:`targets`, :meth:`output_cut`), kept until
        entries are added to (or removed from) either, which is how export changes them."""
        version = (id(self.masks), len(self.masks), id(self.zeroed), len(self.zeroed))
        if self._derived[0] != version:
            self._derived = (version, {})
        return self._derived[1]

    def _cut_names(self, name: str) -> frozenset:
        """The ``zeroed`` slices module ``name`` is cut by, its own and those of the modules it shares a tensor with."""
        sharers = {name} | {other for (layer, _), others in self.ties.items() if layer == name for other, _ in others}
        return frozenset(key for key in self.zeroed if key[0] in sharers)


@torch.no_grad()
def zero_module(
    name: str,
    module: nn.Module,
    keep: Masks,
    zeroed: ParameterKeep,
    in_place: bool,
    ties: Ties | None = None,
    model: nn.Module | None = None,
) -> None:
    """Zero module ``name``'s pruned output channels (``keep``) and its parameter slices in ``zeroed``:
    in its own tensors with ``in_place``, else as new tensors of this module only. With ``ties`` (from
    :func:`tensor_ties` of ``model``), a tensor ``name`` shares with other modules is also zeroed where
    their masks and ``zeroed`` cut it: the masked model's tied tensor is zero in every place it is held."""
    cuts = _cuts(name, module, keep, zeroed)
    for attr in [*module._parameters, *module._buffers] if ties and model is not None else []:
        for other, other_attr in ties.get((name, attr), []):  # type: ignore[union-attr]
            found = _cuts(other, model.get_submodule(other), keep, zeroed)  # type: ignore[union-attr]
            cuts += [(attr, dim, index) for cut, dim, index in found if cut == other_attr]
    copied: set[str] = set()
    for attr, dim, index in cuts:
        tensor = getattr(module, attr)
        index = index.to(tensor.device)
        if in_place or attr in copied:  # a second cut of the same tensor goes into the first's copy
            tensor.index_fill_(dim, index, 0.0)
        else:
            replace_tensor(module, attr, tensor.index_fill(dim, index, 0.0))
            copied.add(attr)


_PLAIN_FORWARDS = frozenset(layer.forward for layer in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _overlap(index: Tensor, other: Tensor, size: int) -> bool:
    """Whether indices ``index`` and ``other`` (into a dim of ``size``) share one (a fifth of ``torch.isin``'s time at a layer's width)."""
    marked = torch.zeros(size, dtype=torch.bool, device=index.device).index_fill_(0, other, True)
    return bool(marked.index_select(0, index).any())


def _cuts(name: str, module: nn.Module, keep: Masks, zeroed: ParameterKeep) -> list[tuple[str, int, Tensor]]:
    """``(attribute, dim, pruned indices)`` of module ``name``'s own tensors: its masks' and ``zeroed``'s."""
    cuts: list[tuple[str, int, Tensor]] = []
    if name in keep:  # on the CPU: a tied module's tensors may be on the meta device while it is not loaded
        cuts += [(item.name, item.dim, local) for item, local in pruned_slices(module, keep[name], "cpu")]
    cuts += [(param, dim, (~kept).nonzero().flatten()) for (layer, param, dim), kept in zeroed.items() if layer == name]
    return cuts


__all__ = ["MaskedView", "ParameterKeep", "Ties", "tensor_ties", "zero_module"]
