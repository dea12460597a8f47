"""Rules for attention: ``matmul``/``@``/``bmm`` and ``scaled_dot_product_attention``.

Attention contracts a head's query and key channels together and mixes its value channels by
data-dependent weights, so a head is the unit that can go exactly: all its query, key and value
channels, and the output projection's input channels it feeds (:class:`~lightning_prune.core.trace.
Deferred` explains how the views that make heads are told apart from other splits). Under
grouped-query attention a key/value head goes with the query heads that share it. Pruning inside
a head is not done: ``head_dim`` sets the softmax scale of ``scaled_dot_product_attention``, and
the views of most attention code assume one ``head_dim`` for all heads.

Each rule is ``rule(tracer, call) -> None``; see :mod:`lightning_prune.core.op_rules`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lightning_prune.core.trace import AttentionHeads, Rep

if TYPE_CHECKING:
    from lightning_prune.core.op_rules import OpCall
    from lightning_prune.core.trace import Tracer


def matmul(t: Tracer, call: OpCall) -> None:
    """``a @ b`` (``matmul``, ``bmm``): scores from queries and keys, or weights applied to values.

    ``q @ k.transpose(-2, -1)`` contracts the head channels of both: each query channel is
    coupled with its key channel and every channel of a head with the others; the scores carry one
    label per head. ``attn @ v`` couples the scores' heads with the value heads and gives the
    output the value channels. An operand whose channels lie only along dims the product keeps
    (rows of ``a``, columns of ``b``, batch dims) passes them on.
    """
    if call.name == "__rmatmul__":
        a, b = call.args[1], call.args[0]
    else:
        a = call.args[0] if call.args else call.kwargs.get("input")
        b = call.arg(1, "other", call.kwargs.get("mat2"))
    out = call.out
    if not all(isinstance(x, Tensor) and x.ndim >= 2 for x in (a, b)):
        return t.give_up(call, "multiplies them as vectors")
    rank = out.ndim
    rows, cols = rank - 2, rank - 1
    dims_a, labels_a = _placed(t, a, rank, contracted=a.ndim - 1)
    dims_b, labels_b = _placed(t, b, rank, contracted=b.ndim - 2)
    batch = set(range(rows))
    if "k" in dims_a and "k" in dims_b:  # queries and keys
        heads = [d for d in dims_a if d != "k"]
        if not heads or heads != [d for d in dims_b if d != "k"] or not batch.issuperset(heads):
            return t.give_up(call, "contracts them without a heads dim to prune by")
        query, key = _units(labels_a, dims_a), _units(labels_b, dims_b)
        if query.shape != key.shape:
            return t.give_up(call, "contracts query and key heads of different sizes")
        t.couple(query, key)  # a query channel meets its key channel
        _whole_heads(t, query)
        t.trace.head_units.append(key)
        _record_heads(t, query[:, 0], key[:, 0], query.shape[1])
        t.set_rep(out, Rep(tuple(heads), query[:, 0].reshape(labels_a.shape[:-1])))
        return
    if "k" in dims_a or "k" in dims_b:
        return t.give_up(call, "contracts them with values that belong to no channel")
    if dims_b and cols in dims_b and batch.issuperset(d for d in dims_b if d != cols):  # weights @ values
        heads = [d for d in dims_b if d != cols]
        if dims_a and (dims_a != heads or labels_a.shape != labels_b.shape[:-1]):
            return t.give_up(call, "weights values with scores of other heads")
        value = _units(labels_b, dims_b, last=cols)
        if heads:
            _whole_heads(t, value)
            if dims_a:
                t.couple(labels_a.flatten(), value[:, 0])
            module = t.module_stack[-1] if t.module_stack else ""
            if module not in t.trace.heads:
                _record_heads(t, value[:, 0], value[:, 0], value.shape[1])
        _taint_unless_constant(t, a, labels_b)
        t.set_rep(out, Rep(tuple(dims_b), labels_b))
        return
    if dims_a and dims_b:
        return t.give_up(call, "multiplies channels of both operands along dims it keeps")
    dims, labels, other = (dims_a, labels_a, b) if dims_a else (dims_b, labels_b, a)
    _taint_unless_constant(t, other, labels)
    t.set_rep(out, Rep(tuple(dims), labels))


def scaled_dot_product_attention(t: Tracer, call: OpCall) -> None:
    """``F.scaled_dot_product_attention(q, k, v)`` over ``(..., heads, tokens, head_dim)``: whole heads.

    The query, key and value channels of a head are one unit (a key/value head with the query
    heads that share it under ``enable_gqa``); the output carries the value channels, repeated
    for each query head of a group.
    """
    query = call.arg(0, "query")
    key, value = call.arg(1, "key"), call.arg(2, "value")
    mask = call.arg(3, "attn_mask")
    head_dim = query.ndim - 3
    expected = (head_dim, query.ndim - 1)
    reps = [t.rep(x) for x in (query, key, value)]
    if query.ndim < 3 or any(rep is None or rep.dims != expected for rep in reps):
        return t.give_up(call, "reaches attention other than along (heads, head_dim)")
    if isinstance(mask, Tensor) and (t.rep(mask) is not None or _spans(mask, query, head_dim)):
        return t.give_up(call, "meets an attention mask that differs per head")
    q_labels, k_labels, v_labels = (rep.labels for rep in reps)
    groups, rest = divmod(q_labels.shape[0], k_labels.shape[0])
    if rest:
        return t.give_up(call, "has query heads that no key/value head divides")
    representative = k_labels[:, :1]
    t.couple(k_labels, representative.expand_as(k_labels))
    t.couple(v_labels, representative.expand_as(v_labels))
    per_query = representative.repeat_interleave(groups, 0)
    t.couple(q_labels, per_query.expand_as(q_labels))
    t.trace.head_units += [q_labels, k_labels, v_labels]
    _record_heads(t, q_labels[:, 0], k_labels[:, 0], q_labels.shape[1])
    t.set_rep(call.out, Rep(expected, v_labels.repeat_interleave(groups, 0)))


def _placed(t: Tracer, x: Tensor, rank: int, contracted: int) -> tuple[list, Tensor | None]:
    """``x``'s labelled dims in the product's coordinates (``"k"`` for the contracted one), and its labels."""
    rep = t.rep(x)
    if rep is None:
        return [], None
    shift = rank - x.ndim
    return ["k" if d == contracted else d + shift for d in rep.dims], rep.labels


def _units(labels: Tensor, dims: list, last: object = "k") -> Tensor:
    """``labels`` as ``(heads, channels per head)``: the ``last`` dim's axis moved to the end."""
    axis = dims.index(last)
    return labels.movedim(axis, -1).reshape(-1, labels.shape[axis])


def _whole_heads(t: Tracer, units: Tensor) -> None:
    t.couple(units, units[:, :1].expand_as(units))
    t.trace.head_units.append(units)


def _record_heads(t: Tracer, query: Tensor, key_value: Tensor, head_dim: int) -> None:
    """Tell the module running the op (the attention module, whose head counts export updates)."""
    module = t.module_stack[-1] if t.module_stack else ""
    t.trace.heads.setdefault(module, AttentionHeads(query.flatten(), key_value.flatten(), head_dim))


def _spans(mask: Tensor, query: Tensor, dim: int) -> bool:
    shift = query.ndim - mask.ndim
    return dim >= shift and mask.shape[dim - shift] > 1


def _taint_unless_constant(t: Tracer, other: Tensor, labels: Tensor) -> None:
    """A pruned channel stays zero when multiplied by data, but its constant no longer folds."""
    if t.param_name(other) is None and not t.is_fresh(other):
        t.trace.tainted.append(labels.flatten())


__all__ = ["matmul", "scaled_dot_product_attention"]
