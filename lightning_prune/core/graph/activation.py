"""Activation-based channel importance: what each channel carries on real batches.

:class:`ActivationScores` records, for every layer that reads channels (a conv or linear layer the
trace labelled: ``trace.layer_inputs``), the sum of squares of each input channel over the batches it
sees, through forward pre-hooks registered by :meth:`ActivationScores.attach` and removed by
:meth:`ActivationScores.detach`. A coupled group is scored from its channels as the layers reading them
see them (Wanda, Sun et al. 2023, per input channel; Minitron, Sreenivas et al. 2024, chose the
activation-based criterion for width pruning):

    score(layer, c) = ||W[:, c]||_1 x rms(x_c)

``x_c`` the layer's input channel ``c`` over every batch and position, ``W[:, c]`` the weights that read
it. The layer's scores are divided by their mean (each consumer weighs alike), and a group's score is
the mean over every (consumer, channel) pair it owns: a neuron of an MLP is read by the down
projection, an attention head's channels by the output projection, a language model's residual
channel (the embedding's column) by every projection that reads the normed hidden states, and a
CNN's channel by the next conv after its norm and activation. The norms themselves are not consumers:
what they read is the residual stream before normalisation, not what the next layer sees.

Only forward passes in training mode are recorded (not validation), plus those run inside
:meth:`ActivationScores.calibrating` (a fit-start prune's calibration batches, in evaluation mode). A
group that no recorded layer reads has no score here (the caller scores it otherwise). The sums are
plain tensors (:meth:`state_dict`), so they survive a checkpoint; under ``torch.distributed`` the
ranks' sums are added (:meth:`reduce`, collective) before they are scored.

>>> import torch
>>> from torch import nn
>>> from lightning_prune.core.graph.channel_graph import ChannelGraph
>>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
>>> graph = ChannelGraph.from_model(model, torch.randn(1, 4))
>>> scores = ActivationScores()
>>> scores.attach(graph, model)
>>> _ = model(torch.randn(8, 4))
>>> scores.detach()
>>> len(scores.per_root(graph, model))  # the 6 hidden channels, read by the last layer
6
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.prunable import out_channel_dim
from lightning_prune.core.sharded import whole


def _reads_channels(module: nn.Module) -> bool:
    """A layer whose weight reads its input's channels: a conv, a linear (or ``Conv1D``), not a norm or embedding."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.ndim >= 2 and not isinstance(module, nn.Embedding)


def _channel_dim(module: nn.Module, x: Tensor) -> int:
    """Where ``module`` reads channels in its input ``x``: before the spatial dims of a conv, else last."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return x.ndim - (module.weight.ndim - 1)
    return x.ndim - 1


def column_sums(module: nn.Module) -> Tensor | None:
    """Per input channel of ``module``, the summed absolute weight that reads it (``None``: no such weight)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim < 2:
        return None
    w = whole(weight.detach()).float().abs()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # (in, out / groups, ...)
        return w.flatten(1).sum(1)
    if isinstance(module, nn.modules.conv._ConvNd):  # (out, in / groups, ...): group g reads its own inputs
        groups = module.groups
        return w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).sum((1, 3)).flatten()
    return w.movedim(1 - out_channel_dim(module), 0).flatten(1).sum(1)  # linear: (out, in); Conv1D: (in, out)


class ActivationScores:
    """Per layer that reads channels, the sum of squares of each input channel and how many positions it summed."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, float] = {}  # positions summed (a resumed rank's share may be fractional)
        self._handles: list[Any] = []
        self._watched: dict[str, nn.Module] = {}
        self._calibrating = False

    @property
    def recorded(self) -> bool:
        """Whether any batch has been recorded since the last :meth:`reset`."""
        return bool(self.sums)

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the model."""
        return bool(self._handles)

    def attach(self, graph: ChannelGraph, model: nn.Module) -> None:
        """Record the input channels of every layer of ``graph`` that reads prunable channels (``model``: the traced one)."""
        if self._handles:
            return
        prunable = set(graph.group_members())
        for layer, labels in graph.trace.layer_inputs.items():
            module = model.get_submodule(layer)
            labels = labels.numpy().ravel()
            if _reads_channels(module) and prunable.intersection(graph.root[labels[labels >= 0]].tolist()):
                self._watched[layer] = module
                hook = functools.partial(self._record, layer, labels.size)
                self._handles.append(module.register_forward_pre_hook(hook))

    def detach(self) -> None:
        """Remove the hooks (the sums stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._watched = [], {}

    @contextmanager
    def calibrating(self) -> Iterator[None]:
        """Record the forward passes run inside, in evaluation mode too (calibration batches)."""
        self._calibrating = True
        try:
            yield
        finally:
            self._calibrating = False

    @torch.no_grad()
    def _record(self, layer: str, channels: int, module: nn.Module, args: tuple) -> None:
        # a copy of the model (a teacher, an export) carries the hook along: only the watched layer counts
        if self._watched.get(layer) is not module or not (module.training or self._calibrating) or not args:
            return
        x = args[0]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim == 0:
            return
        dim = _channel_dim(module, x)
        if x.shape[dim] != channels:
            return
        squares = x.detach().float().pow(2).movedim(dim, 0).reshape(channels, -1)
        total = self.sums.get(layer)
        total = squares.sum(1) if total is None else total.to(squares.device) + squares.sum(1)
        self.sums[layer] = total
        self.counts[layer] = self.counts.get(layer, 0) + squares.shape[1]

    def _added_over_ranks(self, layers: Mapping[str, int]) -> tuple[dict[str, Tensor], dict[str, float]] | None:
        """Every rank's sums and counts added (collective), for ``layers`` (name -> channels, the same on every
        rank); ``None`` outside ``torch.distributed``."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        names = sorted(layers)  # one order on every rank, recorded or not
        flat = [self.sums.get(name, torch.zeros(layers[name])).to(device).double() for name in names]
        counts = [float(self.counts.get(name, 0)) for name in names]
        joined = torch.cat([*flat, torch.tensor(counts, dtype=torch.float64, device=device)])
        dist.all_reduce(joined)
        sizes = [t.numel() for t in flat]
        parts, totals = joined[: sum(sizes)].split(sizes), joined[sum(sizes) :].tolist()
        kept = [(name, part, total) for name, part, total in zip(names, parts, totals, strict=True) if total > 0]
        return {name: part.float().cpu() for name, part, _ in kept}, {name: total for name, _, total in kept}

    def reduce(self, graph: ChannelGraph) -> None:
        """Under ``torch.distributed``: every rank's sums added, on every rank (collective: every rank calls it)."""
        added = self._added_over_ranks({layer: labels.numel() for layer, labels in graph.trace.layer_inputs.items()})
        if added is not None:
            self.sums, self.counts = added

    def shared_state(self) -> dict[str, Any]:
        """What a checkpoint keeps under ``torch.distributed`` (collective): the ranks' sums added and divided by
        the number of ranks, so that when every rank resumes from it and the ranks' sums are added again, the
        total is an uninterrupted run's (a checkpoint keeps one rank's state). Elsewhere :meth:`state_dict`."""
        added = self._added_over_ranks({layer: total.numel() for layer, total in self.sums.items()})
        if added is None:
            return self.state_dict()
        ranks = torch.distributed.get_world_size()
        return {
            "sums": {layer: total / ranks for layer, total in added[0].items()},
            "counts": {layer: count / ranks for layer, count in added[1].items()},
        }

    def per_root(self, graph: ChannelGraph, model: nn.Module, weighted: bool = True) -> dict[int, float]:
        """Group root -> score, for the groups some recorded layer reads. ``weighted=False``: the
        channel's root mean square alone, without the weights that read it."""
        totals = np.zeros(graph.trace.num_labels)
        entries = np.zeros(graph.trace.num_labels)
        for layer, labels in graph.trace.layer_inputs.items():
            if layer not in self.sums or not self.counts.get(layer):
                continue
            scores = (self.sums[layer].float().cpu() / self.counts[layer]).sqrt()
            columns = column_sums(model.get_submodule(layer)) if weighted else None
            if columns is not None and columns.numel() == scores.numel():
                scores = scores * columns.cpu()
            mean = scores.mean()
            scores = (scores / mean if mean > 0 else scores).double().numpy()
            labels = labels.numpy().ravel()
            valid = labels >= 0
            np.add.at(totals, graph.root[labels[valid]], scores[valid])
            np.add.at(entries, graph.root[labels[valid]], 1.0)
        members = graph.group_members()
        return {root: float(totals[root] / entries[root]) for root in members if entries[root]}

    def reset(self) -> None:
        """Forget the sums (after a pruning step: the next one ranks on what follows it)."""
        self.sums, self.counts = {}, {}

    def state_dict(self) -> dict[str, Any]:
        """The sums and counts, on the CPU (what a checkpoint keeps)."""
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take what :meth:`state_dict` gave (an empty mapping: nothing recorded)."""
        self.sums = {k: v.clone() for k, v in (state.get("sums") or {}).items()}
        self.counts = {k: float(v) for k, v in (state.get("counts") or {}).items()}

    def __deepcopy__(self, memo: dict) -> ActivationScores:
        # a copy of the watched model (a distillation teacher) copies its hooks: they stay bound to
        # this one, which records only the modules it watches
        return self

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _handles=[], _watched={})  # hooks do not pickle (ddp_spawn pickles callbacks)


__all__ = ["ActivationScores", "column_sums"]
