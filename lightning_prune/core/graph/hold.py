"""Hold pruned channels at exactly zero while fine-tuning: filters, biases and the norm affine
parameters they feed, so that the exported model is the masked model.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
>>> hold = MaskHold.build(model, {"0": torch.tensor([True, False, True, True])}, torch.randn(1, 3, 5, 5))
>>> _ = nn.init.ones_(model[0].weight); hold.apply()
>>> model[0].weight[1].abs().sum().item(), model[1].weight[1].item()
(0.0, 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.masks import Masks, pruned_slices
from lightning_prune.core.sharded import local_rows


@dataclass
class _Held:
    param: Tensor
    dim: int
    pruned: Tensor  # indices along dim


class MaskHold:
    """Zeroes the pruned slices of a model's parameters (and their gradients) in place.

    Cheap: one ``index_fill_`` per held tensor; parameters keep their identity, so optimizers,
    state dict keys and checkpoints are those of the user's model. A parameter sharded across ranks
    (a ``DTensor``) has the pruned slices of its own rows zeroed on each rank, nothing gathered.
    """

    def __init__(self, held: list[_Held]) -> None:
        self.held = held

    @classmethod
    def build(
        cls, model: nn.Module, masks: Masks, example_input: Any = None, graph: ChannelGraph | None = None
    ) -> MaskHold:
        """Hold the masked layers' filters and biases, plus (given an example input or a graph) the
        affine parameters of the norms the pruned channels feed."""
        held = []
        for name, keep in masks.items():
            module = model.get_submodule(name)
            for item, pruned in pruned_slices(module, keep):  # filters and biases (an attention's q, k, v)
                held.append(_Held(getattr(module, item.name), item.dim, pruned))
        if graph is None and example_input is not None:
            graph = ChannelGraph.from_model(model, example_input)
        if graph is not None:
            for (layer, param, dim), keep in graph.channel_parameter_keep(masks, model).items():
                tensor = getattr(model.get_submodule(layer), param)
                held.append(_Held(tensor, dim, (~keep).nonzero().flatten().to(tensor.device)))
        return cls([h for h in held if h.pruned.numel()])

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every held slice of the parameters."""
        for item in self.held:
            _zero(item.param, item.dim, item.pruned)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the held slices of the gradients, so optimizer state stays clean too."""
        for item in self.held:
            if item.param.grad is not None:
                _zero(item.param.grad, item.dim, item.pruned)


def _zero(tensor: Tensor, dim: int, pruned: Tensor) -> None:
    """Zero the slices ``pruned`` (global indices along ``dim``) of this rank's part of ``tensor``."""
    part, begin, end = local_rows(tensor, dim)
    if part is not tensor:
        pruned = pruned[(pruned >= begin) & (pruned < end)] - begin
    part.index_fill_(dim, pruned.to(part.device), 0.0)
