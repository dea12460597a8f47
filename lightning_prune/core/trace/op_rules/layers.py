"""Rules for the layers export resizes: conv, transposed conv, linear and embedding (producers of
channels) and the norms and PReLU (per-channel parameters).

Each rule is ``rule(tracer, call) -> None``; see :mod:`lightning_prune.core.trace.op_rules`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_prune.core.trace.constants import channel_constants, without_padding
from lightning_prune.core.trace.records import Consumer, Deferred, Rep

if TYPE_CHECKING:
    from lightning_prune.core.trace.bookkeeping import Bookkeeping
    from lightning_prune.core.trace.records import OpCall

COMPUTED_WEIGHT = "uses a computed weight, which export cannot slice"
COMPUTED_BIAS = "their layer adds a computed bias, which export cannot slice"


def register_producer(t: Bookkeeping, call: OpCall, channel_dim: int, count: int) -> tuple[str, Tensor, Tensor] | None:
    """What conv and linear share: the layer their weight names, its input labels along ``channel_dim``
    (recorded as the layer's input) and its ``count`` output labels (created on the first call, the
    same on every later one). ``None`` for a computed weight (weight standardisation): export
    cannot slice it, so labelled input is blocked."""
    data, weight = call.args[0], call.arg(1, "weight")
    owner = t.param_name(weight)
    if owner is None:
        if t.rep(data) is not None:
            t.give_up(call, COMPUTED_WEIGHT)
        return None
    module = owner[0]
    in_labels = _channel_labels(t, data, channel_dim, module)
    _layer_input(t, module, data, in_labels)
    out_labels = t.trace.producers.get(module)
    if out_labels is None:
        out_labels = t.trace.new_labels(module, count)
        t.trace.producers[module] = out_labels
    bias = call.arg(2, "bias")
    if isinstance(bias, Tensor) and t.param_name(bias) is None and not t.slice_parameter(bias, 0, out_labels):
        t.block(out_labels, COMPUTED_BIAS)  # BEiT's cat of three biases; a clone of one (Swin V2) is sliced
    return module, in_labels, out_labels


def conv(t: Bookkeeping, call: OpCall, transposed: bool = False) -> None:
    """Conv1d/2d/3d, grouped and depthwise: a producer; a depthwise conv's channels are its input's."""
    data, weight, bias, out = call.args[0], call.arg(1, "weight"), call.arg(2, "bias"), call.out
    spatial = weight.ndim - 2
    channel_dim = data.ndim - spatial - 1
    produced = register_producer(t, call, channel_dim, out.shape[channel_dim])
    if produced is None:
        return
    module, in_labels, out_labels = produced
    groups = call.arg(6, "groups", 1)
    padding = call.arg(4, "padding", 0)
    n_in = data.shape[channel_dim]
    n_out = out.shape[channel_dim]
    if groups == n_in == n_out:  # depthwise: one input channel per output channel
        t.couple(in_labels, out_labels)
        t.trace.followers.add(module)
        t.add_axis(weight, 0, out_labels)  # (channels, 1, *kernel) for conv and transposed conv
    else:
        if transposed:
            t.add_axis(weight, 0, in_labels)
            t.add_axis(weight, 1, out_labels, groups)
        else:
            t.add_axis(weight, 1, in_labels, groups)
            t.add_axis(weight, 0, out_labels)
        if groups > 1:
            t.trace.even_groups.append((module, in_labels, groups))
            t.trace.even_groups.append((module, out_labels, groups))
        t.trace.consumers.append(
            Consumer(
                module,
                "conv_transpose" if transposed else "conv",
                in_labels,
                t.constants(data, channel_dim),
                foldable=not transposed and without_padding(padding),
                groups=groups,
            )
        )
    if bias is not None:
        t.add_axis(bias, 0, out_labels)
    t.set_rep(out, Rep((channel_dim,), out_labels))


def conv_transpose(t: Bookkeeping, call: OpCall) -> None:
    """ConvTranspose1d/2d/3d: as :func:`conv`, with the weight's in and out dims swapped."""
    conv(t, call, transposed=True)


def embedding(t: Bookkeeping, call: OpCall) -> None:
    """An embedding lookup: a producer of its weight's columns (the residual width of a language model,
    with position and token-type embeddings added to it). ``max_norm`` renormalises rows across the
    columns, so an embedding that uses it produces no prunable channel."""
    weight, out = call.arg(1, "weight"), call.out
    owner = t.param_name(weight)
    if owner is None or call.arg(3, "max_norm") is not None or weight.ndim != 2:
        return t.outputs_unlabeled(out)
    if not isinstance(t.model.get_submodule(owner[0]), nn.Embedding):  # a tie named after the output layer
        return t.outputs_unlabeled(out)
    out_labels = t.trace.producers.get(owner[0])
    if out_labels is None:
        out_labels = t.trace.producers[owner[0]] = t.trace.new_labels(owner[0], weight.shape[1])
    t.add_axis(weight, 1, out_labels)
    t.set_rep(out, Rep((out.ndim - 1,), out_labels))


def _tied_output(t: Bookkeeping, call: OpCall, embedding: str) -> None:
    """A linear whose weight is an input embedding's (tied input and output embeddings): its input
    channels are the embedding's columns, sliced with them; its output (the vocabulary) carries no
    prunable channel. A constant input folds into the bias of the calling module when that module
    holds the weight (``lm_head``); read as a weight anywhere else, the channels are kept."""
    data, weight = call.args[0], call.arg(1, "weight")
    module = t.current_module
    in_labels = _channel_labels(t, data, data.ndim - 1, module)
    t.add_axis(weight, 1, in_labels)
    if getattr(t.model.get_submodule(module), "weight", None) is weight:
        _layer_input(t, module, data, in_labels)
        constants = consumer_constants(t, data, data.ndim - 1, in_labels)
        t.trace.consumers.append(Consumer(module, "linear", in_labels, constants, True))
    else:
        t.block(in_labels, f"'{module}' reads the embedding '{embedding}' as a weight outside a Linear module")
    t.outputs_unlabeled(call.out)


def linear(t: Bookkeeping, call: OpCall) -> None:
    """Linear over the last dim: a producer, and a consumer whose pruned constant inputs fold into its bias."""
    data, weight, bias, out = call.args[0], call.arg(1, "weight"), call.arg(2, "bias"), call.out
    owner = t.param_name(weight)
    if owner is not None and isinstance(t.model.get_submodule(owner[0]), nn.Embedding):
        return _tied_output(t, call, owner[0])
    produced = register_producer(t, call, data.ndim - 1, out.shape[-1])
    if produced is None:
        return
    module, in_labels, out_labels = produced
    t.add_axis(weight, 1, in_labels)
    t.add_axis(weight, 0, out_labels)
    if bias is not None:
        t.add_axis(bias, 0, out_labels)
    constants = consumer_constants(t, data, data.ndim - 1, in_labels)
    t.trace.consumers.append(Consumer(module, "linear", in_labels, constants, True))
    t.set_rep(out, Rep((out.ndim - 1,), out_labels))


def batch_norm(t: Bookkeeping, call: OpCall) -> None:
    """BatchNorm: statistics and affine parameters sliced with the channels."""
    names = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
    _per_channel(t, call, [call.arg(i, n) for i, n in names])


def instance_norm(t: Bookkeeping, call: OpCall) -> None:
    """InstanceNorm: the same signature as batch norm, per-channel statistics too."""
    batch_norm(t, call)


def prelu(t: Bookkeeping, call: OpCall) -> None:
    """PReLU: a per-channel slope is sliced with the channels; one shared slope stays."""
    weight = call.arg(1, "weight")
    _per_channel(t, call, [weight] if weight.numel() > 1 else [])


def group_norm(t: Bookkeeping, call: OpCall) -> None:
    """GroupNorm: statistics are per group, so only whole groups may go (each group's channels coupled)."""
    num_groups = call.arg(1, "num_groups")
    weight, bias = call.arg(2, "weight"), call.arg(3, "bias")
    if weight is None:  # without affine parameters nothing names the layer to resize
        return t.give_up(call, "has no affine parameters that name the layer to resize")
    labels = _per_channel(t, call, [weight, bias])
    if labels is not None:  # statistics are per group: only whole groups may go
        per_group = labels.reshape(num_groups, -1)
        t.couple(per_group, per_group[:, :1].expand_as(per_group), f"op '{call.op}' normalises them in groups")


def layer_norm(t: Bookkeeping, call: OpCall) -> None:
    """LayerNorm over the last dim: parameters sliced, and a consumer (its statistics count pruned channels)."""
    data = call.args[0]
    rep = t.rep(data)
    shape = call.arg(1, "normalized_shape")
    weight, bias = call.arg(2, "weight"), call.arg(3, "bias")
    normalised = set(range(data.ndim - len(shape), data.ndim))
    if not normalised & set(rep.dims):
        t.set_rep(call.out, rep)
        return
    owner = t.param_name(weight)
    if len(shape) == 1 and len(rep.dims) > 1 and rep.dims[-1] == data.ndim - 1:
        # over head_dim (a query/key norm): its weight is shared by all heads, exact where whole heads go
        why = f"op '{call.op}' normalises them together with channels it cannot prune with them"
        t.trace.deferred.append(Deferred("within", rep.labels, why, axes=(len(rep.dims) - 1,)))
        t.set_rep(call.out, rep)
        return
    if len(shape) != 1 or rep.dims != (data.ndim - 1,) or owner is None:
        return t.give_up(call, "normalises them together with other dims, or without the model's parameters")
    labels = _per_channel(t, call, [weight, bias], dim=-1)
    t.trace.consumers.append(Consumer(owner[0], "layer_norm", labels, channel_constants(data, data.ndim - 1), False))


def _per_channel(t: Bookkeeping, call: OpCall, params: list, dim: int = 1) -> Tensor | None:
    """Shared by norms with per-channel parameters: slice ``params`` along the channel labels."""
    data = call.args[0]
    rep = t.rep(data)
    channel_dim = dim % data.ndim
    if rep.dims != (channel_dim,):
        t.give_up(call, "sees them along a dim other than its channel dim")
        return None
    for tensor in params:
        if tensor is None:
            continue
        owner = t.param_name(tensor)
        if owner is None:
            t.give_up(call, "uses parameters that are not the model's, which export cannot slice")
            return None
        t.add_axis(tensor, 0, rep.labels)
        _layer_input(t, owner[0], data, rep.labels)
    t.set_rep(call.out, rep)
    return rep.labels


def _channel_labels(t: Bookkeeping, data: Tensor, channel_dim: int, module: str) -> Tensor:
    """Labels along ``channel_dim`` of a consumer's input; labels on other dims are blocked."""
    rep = t.rep(data)
    if rep is None:
        return torch.full((data.shape[channel_dim],), -1, dtype=torch.long)
    if rep.dims == (channel_dim,):
        return rep.labels
    t.block(rep.labels, f"'{module}' reads them along a dim other than its channel dim (a view it cannot shrink)")
    return torch.full((data.shape[channel_dim],), -1, dtype=torch.long)


def _layer_input(t: Bookkeeping, module: str, data: Tensor, labels: Tensor) -> None:
    t.trace.layer_inputs.setdefault(module, labels)
    rep = t.rep(data)
    if rep is not None and rep.from_view:
        t.trace.reshaped_inputs.add(module)


def consumer_constants(t: Bookkeeping, data: Tensor, dim: int, labels: Tensor) -> Tensor:
    """What :func:`~lightning_prune.core.trace.constants.channel_constants` finds, and where attention made a
    channel exactly constant (a value channel averaged by weights that sum to one: ``trace.exact_constants``)
    and the data agree to rounding, that value: the weighted sum is exact in arithmetic, only its rounding
    varies."""
    constants = t.constants(data, dim)
    exact = t.trace.exact_constants
    if not exact:
        return constants
    per_position = labels.tolist()  # a Python loop over every channel of a wide layer: no tensor indexing in it
    for i in torch.nonzero(constants.isnan()).flatten().tolist():
        value = exact.get(per_position[i])
        if value is None:
            continue
        low, high = (float(v) for v in torch.aminmax(data.detach().select(dim, i).double()))
        if max(abs(low - value), abs(high - value)) <= 1e-5 * max(abs(value), 1e-3):
            constants[i] = value
    return constants
