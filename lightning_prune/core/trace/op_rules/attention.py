"""Rules for attention: ``matmul``/``@``/``bmm``/``baddbmm``/``einsum`` and ``scaled_dot_product_attention``.

Attention contracts a head's query and key channels together and mixes its value channels by
data-dependent weights, so a head is the unit that can go exactly: all its query, key and value
channels, and the output projection's input channels it feeds (:class:`~lightning_prune.core.trace.tracer.
Deferred` explains how the views that make heads are told apart from other splits). Under
grouped-query attention a key/value head goes with the query heads that share it. Pruning inside
a head is not done: ``head_dim`` sets the softmax scale of ``scaled_dot_product_attention``, and
the views of most attention code assume one ``head_dim`` for all heads.

Each rule is ``rule(tracer, call) -> None``; see :mod:`lightning_prune.core.trace.op_rules`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_prune.core.trace.records import AttentionHeads, Deferred, Rep

if TYPE_CHECKING:
    from lightning_prune.core.trace.bookkeeping import Bookkeeping
    from lightning_prune.core.trace.records import OpCall


def matmul(t: Bookkeeping, call: OpCall) -> None:
    """``a @ b`` (``matmul``, ``bmm``) as the contraction ``...nk,...km->...nm``: see :func:`contract`."""
    if call.name == "__rmatmul__":
        a, b = call.args[1], call.args[0]
    else:
        a = call.args[0] if call.args else call.kwargs.get("input")
        b = call.arg(1, "other", call.kwargs.get("mat2"))
    if not all(isinstance(x, Tensor) and x.ndim >= 2 for x in (a, b)):
        return t.give_up(call, "multiplies them as vectors")
    batch = _LETTERS[: call.out.ndim - 2]
    spec_a = batch[len(batch) - (a.ndim - 2) :] + "nk"
    spec_b = batch[len(batch) - (b.ndim - 2) :] + "km"
    contract(t, call, [(a, spec_a), (b, spec_b)], batch + "nm")


def baddbmm(t: Bookkeeping, call: OpCall) -> None:
    """``baddbmm(scores_bias, q, k.T)``: the contraction of :func:`matmul` plus a tensor added to the
    result (a mask or position bias added to the scores: harmless to whole heads, decided at the end)."""
    base, first, second = call.arg(0, "input"), call.arg(1, "batch1"), call.arg(2, "batch2")
    if t.rep(base) is not None or not all(isinstance(x, Tensor) and x.ndim == 3 for x in (first, second)):
        return t.give_up(call, "adds channels to a batched product")
    contract(t, call, [(first, "bnk"), (second, "bkm")], "bnm")
    rep = t.rep(call.out)
    if rep is not None and isinstance(base, Tensor) and base.numel() > 1 and t.parameter_origin(base) is None:
        why = "op 'baddbmm' adds input-dependent values that belong to no channel across them"
        t.trace.deferred.append(Deferred("in_heads", rep.labels, why))


def einsum(t: Bookkeeping, call: OpCall) -> None:
    """``torch.einsum(equation, *operands)``: see :func:`contract` (``...`` and spaces allowed)."""
    equation = call.arg(0, "equation")
    operands = call.args[1:] if len(call.args) > 1 else call.kwargs.get("operands", ())
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if not isinstance(equation, str) or not all(isinstance(x, Tensor) for x in operands):
        return t.give_up(call, "is an einsum the tracer cannot read")
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    specs = inputs.split(",")
    if len(specs) != len(operands):
        return t.give_up(call, "is an einsum the tracer cannot read")
    spare = "".join(c for c in _LETTERS if c not in equation)
    widths = [x.ndim - len(spec.replace("...", "")) for x, spec in zip(operands, specs, strict=True)]
    ellipsis = spare[: max(widths, default=0)]
    specs = [
        spec.replace("...", ellipsis[len(ellipsis) - width :] if width else "")
        for spec, width in zip(specs, widths, strict=True)
    ]
    if not arrow:  # implicit output: the letters used once, in order, after the ellipsis
        output = "..." + "".join(sorted(c for c in set(inputs) if c.isalpha() and inputs.count(c) == 1))
    contract(t, call, list(zip(operands, specs, strict=True)), output.replace("...", ellipsis))


def contract(t: Bookkeeping, call: OpCall, operands: list[tuple[Tensor, str]], output: str) -> None:
    """A product of tensors written as an einsum: ``operands`` are ``(tensor, one letter per dim)``.

    Without heads (no channel letter that every operand and the output keep), one operand may
    carry channels along letters the output keeps (``x @ W``): they pass on. With heads, all the
    channels of a head, in every operand, are one unit: ``q @ k.T`` couples a head's queries and
    keys, ``attn @ v`` its scores and values, ``k.T @ v`` (XCiT, CoaT) its keys and values. The
    output carries the channels of the one operand whose channels all survive in it (``attn @ v``:
    the values), else one label per head.
    """
    labelled = []
    for tensor, spec in operands:
        rep = t.rep(tensor)
        if rep is not None:
            labelled.append(([spec[d] for d in rep.dims], rep.labels))
    shared = set(output).intersection(*(spec for _, spec in operands))
    heads = [c for c in labelled[0][0] if c in shared]
    if not all(set(heads) <= set(letters) for letters, _ in labelled):
        return t.give_up(call, "mixes channels of different heads")
    data = [x for x, _ in operands if t.rep(x) is None and t.parameter_origin(x) is None and not t.is_fresh(x)]
    if not heads:
        if len(labelled) > 1:
            return t.give_up(call, "multiplies channels of both operands together")
        letters, labels = labelled[0]
        if not set(letters) <= set(output):
            return t.give_up(call, "contracts them with values that belong to no channel")
        if data:  # a pruned channel stays zero, but its constant no longer folds
            t.trace.tainted.append(labels.flatten())
        return _output(t, call, output, letters, labels)
    units = []
    for letters, labels in labelled:
        order = [letters.index(c) for c in heads] + [i for i, c in enumerate(letters) if c not in heads]
        units.append(labels.permute(order))
        if units[-1].shape[: len(heads)] != units[0].shape[: len(heads)]:
            return t.give_up(call, "mixes channels of different heads")
    head_shape = units[0].shape[: len(heads)]
    flat = [unit.reshape(head_shape.numel(), -1) for unit in units]
    whole_heads(t, torch.cat(flat, 1))  # one unit per head, across the operands
    representative = flat[0][:, 0]
    module = t.current_module
    if len(flat) > 1 or module not in t.trace.heads:
        record_heads(t, representative, flat[-1][:, 0], flat[0].shape[1])
    surviving = [(ls, labels) for ls, labels in labelled if set(ls) <= set(output) and set(ls) - set(heads)]
    if len(surviving) == 1:
        if data or len(labelled) > 1:  # mixed by data-dependent weights: constants no longer fold
            constant = _averaged_constants(t, operands, output, surviving[0][1])
            varying = ~constant.reshape(head_shape.numel(), -1).all(1) if constant is not None else slice(None)
            t.trace.tainted.append(representative[varying])
        return _output(t, call, output, *surviving[0])
    # scores (q @ k.T): what they weigh is checked where they do (attn @ v), so they taint nothing
    _output(t, call, output, heads, representative.reshape(head_shape))


def _averaged_constants(
    t: Bookkeeping, operands: list[tuple[Tensor, str]], output: str, labels: Tensor
) -> Tensor | None:
    """``attn @ v`` with weights that sum to one over what they contract (a softmax's rows): a value
    channel that is the same at every position gives that value, exactly, whatever the weights (a
    head pruned in its weights with a live value bias). Records those values; per label of the
    values, whether it is one; ``None`` where the weights do not sum to one."""
    values = next(x for x, _ in operands if t.rep(x) is not None and t.rep(x).labels is labels)
    weights = [(x, spec) for x, spec in operands if x is not values]
    if len(weights) != 1:
        return None
    weight, spec = weights[0]
    summed = tuple(i for i, letter in enumerate(spec) if letter not in output)
    if not summed or not torch.allclose(weight.detach().double().sum(summed), torch.ones((), dtype=torch.float64)):
        return None
    return constant_channels(t, values)


def constant_channels(t: Bookkeeping, tensor: Tensor) -> Tensor:
    """Per label of ``tensor``, whether it holds one value everywhere; those values are recorded as exact
    (``trace.exact_constants``: consumers take them where the data agree to rounding)."""
    rep = t.rep(tensor)
    moved = tensor.detach().movedim(rep.dims, tuple(range(len(rep.dims))))
    flat = moved.reshape(rep.labels.numel(), -1)
    low, high = flat.amin(1), flat.amax(1)  # several times faster than one aminmax on the CPU
    constant = (low == high).cpu()
    for label, value in zip(rep.labels.flatten()[constant].tolist(), low.cpu()[constant].tolist(), strict=True):
        if label >= 0:
            t.trace.exact_constants[label] = value
    return constant.reshape(rep.labels.shape)


def _output(t: Bookkeeping, call: OpCall, output: str, letters: list[str], labels: Tensor) -> None:
    """Label the result with ``labels``, whose axes are the output letters ``letters``."""
    order = sorted(range(len(letters)), key=lambda i: output.index(letters[i]))
    t.set_rep(call.out, Rep(tuple(output.index(letters[i]) for i in order), labels.permute(order)))


def scaled_dot_product_attention(t: Bookkeeping, call: OpCall) -> None:
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
    q_labels, k_labels, v_labels = (rep.labels for rep in reps)
    if isinstance(mask, Tensor) and not _per_head_mask(t, mask, query, q_labels[:, 0]):
        return t.give_up(call, "meets an attention mask that differs per head")
    groups, rest = divmod(q_labels.shape[0], k_labels.shape[0])
    if rest:
        return t.give_up(call, "has query heads that no key/value head divides")
    representative = k_labels[:, :1]
    t.couple(k_labels, representative.expand_as(k_labels))
    t.couple(v_labels, representative.expand_as(v_labels))
    per_query = representative.repeat_interleave(groups, 0)
    t.couple(q_labels, per_query.expand_as(q_labels))
    t.trace.head_units += [q_labels, k_labels, v_labels]
    record_heads(t, q_labels[:, 0], k_labels[:, 0], q_labels.shape[1])
    if not call.arg(4, "dropout_p", 0.0):  # each row of weights sums to one: constant values stay exact
        constant_channels(t, value)
    t.set_rep(call.out, Rep(expected, v_labels.repeat_interleave(groups, 0)))


def whole_heads(t: Bookkeeping, units: Tensor) -> None:
    """Each row of ``units`` (heads, channels per head) is one head: its channels share one keep decision."""
    t.couple(units, units[:, :1].expand_as(units))
    t.trace.head_units.append(units)


def record_heads(t: Bookkeeping, query: Tensor, key_value: Tensor, head_dim: int) -> None:
    """Tell the module running the op (the attention module, whose head counts export updates)."""
    module = t.current_module
    t.trace.heads.setdefault(module, AttentionHeads(query.flatten(), key_value.flatten(), head_dim))


def _per_head_mask(t: Bookkeeping, mask: Tensor, query: Tensor, heads: Tensor) -> bool:
    """Whether whole heads can go under ``mask`` (added to the scores): one that is the same for every
    head; a per-head bias gathered from a table (MaxViT's relative positions), whose table is then
    sliced with the heads; or one whose channels lie along the heads alone (T5's relative position
    embedding, one column per head), each coupled with its head. T5 hands one layer's bias to the
    next: its heads are then the same heads in every layer of the stack, which keeps each layer's
    bias the one the first layer computes."""
    per_head = query.ndim - 3 - (query.ndim - mask.ndim)
    rep = t.rep(mask)
    if rep is not None:
        if rep.dims != (per_head,) or rep.labels.numel() != heads.numel():
            return False
        t.couple(rep.labels, heads)
        return True
    if per_head < 0 or mask.shape[per_head] == 1:
        return True
    if t.slice_parameter(mask, per_head, heads):
        return True
    return bool((mask == mask.narrow(per_head, 0, 1)).all())  # T5's zero bias of cross-attention


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

__all__ = [
    "baddbmm",
    "constant_channels",
    "contract",
    "einsum",
    "matmul",
    "record_heads",
    "scaled_dot_product_attention",
    "whole_heads",
]
