"""The rule for ``nn.MultiheadAttention``: ``F.multi_head_attention_forward``, seen as one op.

Under the tracer's mode the functional arrives whole (its inner ops are not seen), so this rule
says what it does to channels. Its query, key and value projections (the fused ``in_proj_weight``,
or ``q/k/v_proj_weight`` when key or value have their own width) are one producer, named after the
module, with ``3 * embed_dim`` output channels: the query, key and value channels of each head are
coupled, so whole heads are the unit, as :func:`~lightning_prune.core.trace.op_rules.attention.
scaled_dot_product_attention` makes them. The projections' input axes are sliced with the labels
of the query, key and value (the embedding width); ``bias_k``/``bias_v`` with the key and value
channels. ``out_proj`` reads the heads' value channels (a linear consumer) and produces new labels.

Constants: a pruned head's value channels that hold one value ``c`` at every key (its live value
bias, ``bias_v`` and the zero-attention key agreeing) give ``c`` after attention, whatever the
weights, since every softmax row sums to one; the plan folds it into ``out_proj``'s bias. Any other
pruned value channel is not constant, and its head is kept. The attention weights the op returns
carry no channels: :class:`~lightning_prune.core.shrink.multihead.PrunedMultiheadAttention` recomputes the
weights of the heads it lost, so that ``need_weights`` returns what the masked module returns.

Each rule is ``rule(tracer, call) -> None``; see :mod:`lightning_prune.core.trace.op_rules`.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.core.trace.constants import channel_constants
from lightning_prune.core.trace.op_rules.attention import record_heads, whole_heads
from lightning_prune.core.trace.op_rules.layers import (
    COMPUTED_WEIGHT,
    _channel_labels,
    linear,
    register_producer,
)
from lightning_prune.core.trace.records import Consumer, OpCall, Rep

if TYPE_CHECKING:
    from lightning_prune.core.trace.bookkeeping import Bookkeeping

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def multi_head_attention_forward(t: Bookkeeping, call: OpCall) -> None:
    """``F.multi_head_attention_forward``: a producer of ``3 * embed_dim`` channels in whole heads, then
    ``out_proj``, a linear layer over the heads' value channels."""

    args = _arguments(call)
    query, key, value = args["query"], args["key"], args["value"]
    separate = bool(args["use_separate_proj_weight"])
    weights = [args[f"{p}_proj_weight"] for p in "qkv"] if separate else [args["in_proj_weight"]]
    owners = [t.param_name(w) for w in weights + [args["out_proj_weight"]]]
    if any(owner is None for owner in owners):
        return t.give_up(call, COMPUTED_WEIGHT)
    module = owners[0][0]
    if not isinstance(t.model.get_submodule(module), nn.MultiheadAttention) or t.module_stack[-1:] != [module]:
        return t.give_up(call, f"runs with the parameters of '{module}' outside an nn.MultiheadAttention's forward")
    if args["static_k"] is not None or args["static_v"] is not None:
        return t.give_up(call, "is given static keys or values, which export cannot slice")
    t.block_inputs((args["key_padding_mask"], args["attn_mask"]), f"op '{call.op}' reads them as an attention mask")
    width, heads = args["embed_dim_to_check"], args["num_heads"]
    bias = args["in_proj_bias"]
    projection = OpCall("linear", "linear", F.linear, (query, weights[0], bias), {}, None)
    module, in_query, labels = register_producer(t, projection, query.ndim - 1, 3 * width)
    in_key = _channel_labels(t, key, key.ndim - 1, module)
    in_value = _channel_labels(t, value, value.ndim - 1, module)
    parts = labels.reshape(3, heads, width // heads)  # query, key, value: (heads, head_dim) each
    if separate:
        for weight, part, inputs in zip(weights, parts, (in_query, in_key, in_value), strict=True):
            t.add_axis(weight, 0, part)
            t.add_axis(weight, 1, inputs)
    else:  # one weight's columns read query, key and value: their channels go together
        t.couple(in_query, in_key)
        t.couple(in_query, in_value)
        t.add_axis(weights[0], 0, labels)
        t.add_axis(weights[0], 1, in_query)
    if bias is not None:
        t.add_axis(bias, 0, labels)
    for extra, part in ((args["bias_k"], parts[1]), (args["bias_v"], parts[2])):
        if extra is not None:
            t.add_axis(extra, 2, part)
    seen: list[Tensor] = []
    for data, inputs in ((query, in_query), (key, in_key), (value, in_value)):
        if not any(data is other for other in seen):  # the fused weight cannot fold: the plan keeps what is live
            seen.append(data)
            t.trace.consumers.append(Consumer(module, "linear", inputs, channel_constants(data, data.ndim - 1), False))
    whole_heads(t, parts.permute(1, 0, 2).reshape(heads, -1))  # a head's query, key and value channels: one unit
    record_heads(t, parts[0][:, 0], parts[1][:, 0], parts.shape[2])
    values = _values(args, weights[-1] if separate else weights[0][2 * width :], width)
    projected = channel_constants(values[: values.shape[0] - _extra_keys(args)], 1)
    differ = ~projected.isnan() & (channel_constants(values, 1).isnan())  # constant until bias_v or the zero key
    t.block(parts[2].flatten()[differ], f"op '{call.op}' mixes their constant with bias_v or the zero-attention key")
    t.set_rep(values, Rep((1,), parts[2].flatten()))
    out, attention = call.out
    linear(t, OpCall("linear", "linear", F.linear, (values, args["out_proj_weight"], args["out_proj_bias"]), {}, out))
    t.outputs_unlabeled(attention)


def _extra_keys(args: dict[str, Any]) -> int:
    """Keys the op appends: the ``bias_k``/``bias_v`` token and the zero-attention key."""
    return int(args["bias_v"] is not None) + int(bool(args["add_zero_attn"]))


def _arguments(call: OpCall) -> dict[str, Any]:
    bound = _SIGNATURE.bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@torch.no_grad()
def _values(args: dict[str, Any], weight: Tensor, width: int) -> Tensor:
    """Every value a head's value channel holds, one row per key: projected values, ``bias_v`` and the
    zero-attention key. A channel constant over its rows is that constant after attention."""
    bias = args["in_proj_bias"]
    value = args["value"]
    rows = [F.linear(value, weight, None if bias is None else bias[2 * width :]).reshape(-1, width)]
    if args["bias_v"] is not None:
        rows.append(args["bias_v"].reshape(1, width))
    if args["add_zero_attn"]:
        rows.append(value.new_zeros(1, width))
    return torch.cat(rows)


__all__ = ["multi_head_attention_forward"]
