"""RMS norms over the channels: ``F.rms_norm`` and the mean of squares in a module's own code.

An RMS norm divides each channel by ``sqrt(mean(x^2) + eps)`` over all channels, pruned ones
included. Over the kept ``C'`` of ``C`` channels, with ``S2`` the pruned channels' constant squares
(zero when they are pruned to zero), ``(sum' + S2) / C + eps = (C' / C) (sum' / C' + eps')`` with
``eps' = eps C / C' + S2 / C'``: the same norm over the kept channels, its ``eps`` changed and its
scale multiplied by ``sqrt(C / C')``, is exact. So an RMS norm keeps its class (``save_pretrained``
still describes it); :mod:`lightning_prune.core.shrink.residual` makes that change.

That needs to know the module's form: :func:`rms_form` checks it numerically, once per class, on a
copy with a random weight and a large ``eps``: ``(offset + weight) * x * rsqrt(mean(x^2) + eps)``
with ``offset`` 0 (``torch.nn.RMSNorm``, LLaMA, Qwen, Mistral, T5, OLMo-2) or 1 (Gemma's
``1 + weight``) and ``eps`` under a known attribute name. A mean over the channels anywhere else
blocks them, as before.

Each rule is ``rule(tracer, call) -> None``; see :mod:`lightning_prune.core.trace.op_rules`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_prune.core.trace.constants import channel_constants
from lightning_prune.core.trace.op_rules.elementwise import reduce
from lightning_prune.core.trace.op_rules.layers import _layer_input
from lightning_prune.core.trace.records import Consumer, Deferred, storage_key

if TYPE_CHECKING:
    from lightning_prune.core.trace.bookkeeping import Bookkeeping
    from lightning_prune.core.trace.records import OpCall

EPS_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon", "rms_norm_eps")
"""Where RMS norm modules keep their ``eps`` (the first float attribute found is the one checked)."""


@dataclass(frozen=True)
class RmsForm:
    """How a norm module computes: ``(offset + weight) * x * rsqrt(mean(x^2) + eps)``, ``eps`` held in
    the attribute ``eps_attribute``; ``centred``: of ``x - mean(x)`` (a LayerNorm without bias written
    out by hand, as Cohere's)."""

    eps_attribute: str
    offset: float
    centred: bool = False


_FORMS: dict[tuple[type, int | None], RmsForm | None] = {}


def rms_form(module: nn.Module) -> RmsForm | None:
    """``module``'s :class:`RmsForm` if it is an RMS norm over its last dim, else ``None``."""
    if isinstance(module, nn.RMSNorm):
        return RmsForm("eps", 0.0)
    weight = module._parameters.get("weight")
    if weight is not None and weight.is_meta:  # nothing to probe with (a model built on the meta device)
        return None
    key = (type(module), weight.ndim if weight is not None else None)  # Cohere's class norms heads too, by a 2-D weight
    if key not in _FORMS:
        _FORMS[key] = _probe(module)
    return _FORMS[key]


@torch.no_grad()
def _probe(module: nn.Module) -> RmsForm | None:
    weight = module._parameters.get("weight")
    others = [name for name, p in module.named_parameters() if name != "weight"]
    attribute = next((a for a in EPS_ATTRIBUTES if isinstance(getattr(module, a, None), float)), None)
    if weight is None or weight.ndim != 1 or others or attribute is None:
        return None
    if any(True for _ in module.children()):
        return None
    probe = copy.deepcopy(module).float()
    generator = torch.Generator().manual_seed(0)
    probe.weight.copy_(torch.rand(weight.shape, generator=generator) + 0.5)
    setattr(probe, attribute, 0.5)  # large, so that an attribute that is not the eps shows
    x = (torch.randn(2, 3, weight.numel(), generator=generator) * 0.3).to(weight.device)
    try:
        out = type(probe).forward(probe, x)  # no hooks: the tracer's must not see the probe
    except Exception:  # a forward that needs other arguments is no plain norm
        return None
    for centred in (False, True):
        y = x - x.mean(-1, keepdim=True) if centred else x
        normalised = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 0.5)
        for offset in (0.0, 1.0):
            expected = (offset + probe.weight) * normalised
            if isinstance(out, Tensor) and out.shape == x.shape and torch.allclose(out, expected, rtol=1e-5, atol=1e-6):
                return RmsForm(attribute, offset, centred)
    return None


def mean(t: Bookkeeping, call: OpCall) -> None:
    """A mean over all of a tensor's channels (its last dim) inside an RMS norm module (see
    :func:`rms_form`): the module is a consumer whose statistics count the pruned channels; any
    other mean is a plain reduction."""
    data = call.args[0]
    rep = t.rep(data)
    dim = call.arg(1, "dim")
    last = data.ndim - 1
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (tuple, list)) else None
    module = t.current_module
    if rep.dims == (last,) and dims is not None and {d % data.ndim for d in dims} == {last}:
        holder = t.model.get_submodule(module)
        form = rms_form(holder)
        if (
            form is not None
            and getattr(holder, "weight", None) is not None
            and holder.weight.numel() == data.shape[last]
        ):
            _layer_input(t, module, data, rep.labels)
            if not form.centred:
                t.trace.consumers.append(Consumer(module, "rms_norm", rep.labels, channel_constants(data, last), False))
            elif not any(c.module == module and c.labels is rep.labels for c in t.trace.consumers):
                # the mean, not the variance after it: a LayerNorm's statistics, counted by PrunedLayerNorm
                t.trace.consumers.append(
                    Consumer(module, "layer_norm", rep.labels, channel_constants(data, last), False)
                )
                t.trace.tainted.append(rep.labels)  # x - mean(x) gives a pruned channel a data-dependent value
            if form.centred:  # the statistic is subtracted from the channels: a value of the norm, not data
                t.fresh[storage_key(call.out)] = (call.out, None)
            return t.outputs_unlabeled(call.out)
    reduce(t, call)


def rms_norm(t: Bookkeeping, call: OpCall) -> None:
    """``F.rms_norm`` (``torch.nn.RMSNorm``) over the last dim: its weight sliced with the channels, and
    a consumer whose statistics count the pruned ones; over ``head_dim`` (a query/key norm) exact
    where whole heads go."""
    data, shape, weight = call.args[0], call.arg(1, "normalized_shape"), call.arg(2, "weight")
    rep, last = t.rep(data), data.ndim - 1
    if not set(range(data.ndim - len(shape), data.ndim)) & set(rep.dims):
        return t.set_rep(call.out, rep)
    if len(shape) == 1 and len(rep.dims) > 1 and rep.dims[-1] == last:
        why = f"op '{call.op}' normalises them together with channels it cannot prune with them"
        t.trace.deferred.append(Deferred("within", rep.labels, why, axes=(len(rep.dims) - 1,)))
        return t.set_rep(call.out, rep)
    owner = t.param_name(weight) if weight is not None else (t.current_module, "weight")
    holder = t.model.get_submodule(owner[0]) if owner is not None else None
    if len(shape) != 1 or rep.dims != (last,) or not isinstance(holder, nn.RMSNorm):
        return t.give_up(call, "normalises them outside an nn.RMSNorm, or together with other dims")
    if weight is not None:
        t.add_axis(weight, 0, rep.labels)
    _layer_input(t, owner[0], data, rep.labels)
    squares = channel_constants(data, last).square()
    t.trace.consumers.append(Consumer(owner[0], "rms_norm", rep.labels, squares, False))
    t.set_rep(call.out, rep)


__all__ = ["EPS_ATTRIBUTES", "RmsForm", "mean", "rms_form", "rms_norm"]
