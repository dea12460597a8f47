"""Which recorded op follows which channel rule: a table from op names to plain functions, users extend it.

The tracer (:mod:`lightning_prune.core.trace.tracer`) sees every ``torch`` function, ``Tensor`` method and
``torch.nn.functional`` call of a forward pass. Each is looked up in :data:`TABLE` by its
normalised name (``__iadd__`` -> ``add``, ``relu_`` -> ``relu``) and its rule is called as
``rule(tracer, call)`` with the recorded :class:`~lightning_prune.core.trace.records.OpCall`. A rule moves channel labels through the
op with the tracer's bookkeeping API (``rep``, ``set_rep``, ``couple``, ``block``, ``add_axis``,
``give_up``, ...). An op that is not in the table and touches a channel-carrying tensor blocks
those channels (they are kept) with a warning naming the op, so an unknown op never yields a
wrong model.

>>> from lightning_prune.core.trace.op_rules import register_op_rule, rule_for
>>> register_op_rule("my_fused_gelu", "elementwise")   # a custom op that acts per element
>>> rule_for("my_fused_gelu").__name__
'elementwise'

A rule of one's own is a function of the tracer and the call; this one says the op's output has
its input's layout, so the channels flow through it:

>>> def same_layout(tracer, call):
...     tracer.set_rep(call.out, tracer.rep(call.args[0]))
>>> register_op_rule("my_layout_preserving_op", same_layout)
"""

from __future__ import annotations

from lightning_prune.core.trace.bookkeeping import Rule
from lightning_prune.core.trace.op_rules.addmm import addmm
from lightning_prune.core.trace.op_rules.attention import baddbmm, einsum, matmul, scaled_dot_product_attention
from lightning_prune.core.trace.op_rules.elementwise import elementwise, identity, ignore, reduce, softmax, spatial
from lightning_prune.core.trace.op_rules.layers import (
    batch_norm,
    conv,
    conv_transpose,
    embedding,
    group_norm,
    instance_norm,
    layer_norm,
    linear,
    prelu,
)
from lightning_prune.core.trace.op_rules.movement import gather, movement, split
from lightning_prune.core.trace.op_rules.multihead import multi_head_attention_forward
from lightning_prune.core.trace.op_rules.norms import mean, rms_norm
from lightning_prune.core.trace.op_rules.writes import factory, fill, write

RULES: dict[str, Rule] = {
    rule.__name__: rule
    for rule in (
        elementwise,  # per element, with broadcasting: operands' channels are coupled
        identity,  # same tensor layout out as in (dtype/device moves, copies)
        movement,  # rearranges elements (view, permute, cat, getitem, ...): labels follow the elements
        split,  # chunk/split/unbind
        gather,  # torch.gather along a dim without channels
        spatial,  # acts on trailing spatial dims only (pooling, interpolation, padding)
        reduce,  # reduction over given dims
        softmax,  # normalises along one dim
        ignore,  # no effect on channels (in-place RNG, metadata)
        factory,  # reads only metadata: *_like (positions follow the input), new_empty/zeros (fresh constants)
        fill,  # in-place constant fill (fill_, zero_): positions keep their channels, values are constants
        write,  # assignment (setitem, copy_, index_put_): the source's channels move into the destination
        conv,
        conv_transpose,
        linear,
        embedding,  # a lookup: a producer of the weight's columns
        batch_norm,
        instance_norm,
        group_norm,
        layer_norm,
        rms_norm,
        mean,  # a reduction, or the statistic of an RMS norm module over the channels
        prelu,
        matmul,  # q @ k.T, attn @ v, x @ W: heads are the unit
        einsum,
        baddbmm,
        scaled_dot_product_attention,
        multi_head_attention_forward,  # nn.MultiheadAttention, seen whole: whole heads and out_proj
        addmm,  # bias + x @ W with W stored (in, out): Hugging Face's Conv1D
    )
}
"""The built-in rules by name (what :func:`register_op_rule` accepts as a string)."""

TRACKS_MEMORY: frozenset[Rule] = frozenset({factory, fill, write})
"""Rules the tracer runs on every call, labelled or not: they follow fresh and written memory."""

FOLLOWS_PARAMETERS: frozenset[Rule] = frozenset({movement, identity, elementwise})
"""Ops the tracer follows on a parameter (views, indexing, per-element math): what they make may later
be sliced with the channels it meets (a class token, a per-head table, Swin V2's logit scale)."""

PRODUCERS: frozenset[Rule] = frozenset({conv, conv_transpose, linear, embedding, multi_head_attention_forward, addmm})
"""Rules the tracer runs on unlabelled input too: their layers give out new channels."""

_ELEMENTWISE = """
add sub subtract mul multiply div divide true_divide truediv floor_divide floordiv remainder mod fmod
pow maximum minimum fmax fmin where clamp clip clamp_min clamp_max relu relu6 leaky_relu elu selu celu
gelu silu mish sigmoid tanh hardtanh hardswish hardsigmoid softplus softsign tanhshrink threshold
abs neg negative pos exp expm1 log log1p log2 sqrt rsqrt square reciprocal sin cos erf erfc logit sign
dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout rrelu hardshrink softshrink
logsigmoid log_sigmoid nan_to_num round floor ceil trunc frac lerp addcmul addcdiv masked_fill
eq ne lt le gt ge logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor
and or xor invert sigmoid_ silu_ copysign hypot atan2 heaviside xlogy
"""
_IDENTITY = """
to float half double bfloat16 type type_as clone detach contiguous cpu cuda requires_grad
pin_memory alias data identity
"""
_MOVEMENT = """
view reshape flatten unflatten permute transpose swapaxes swapdims t T mT squeeze unsqueeze movedim
moveaxis expand expand_as repeat tile view_as reshape_as cat concat concatenate stack hstack vstack
narrow select getitem roll flip index_select pixel_shuffle pixel_unshuffle channel_shuffle
native_channel_shuffle repeat_interleave
"""
_SPLIT = "chunk split tensor_split unbind"
_SPATIAL = """
max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices
avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d adaptive_max_pool1d_with_indices
adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices lp_pool1d lp_pool2d lp_pool3d
interpolate upsample upsample_nearest upsample_bilinear pad
"""
_REDUCE = "mean sum amax amin max min std var logsumexp prod nansum nanmean median norm all any"
_SOFTMAX = "softmax log_softmax softmin normalize"
_IGNORE = "size dim numel stride is_contiguous data_ptr element_size get_device item tolist"
_FACTORY = """
new_empty new_zeros new_ones new_full empty_like zeros_like ones_like full_like rand_like randn_like
randint_like empty zeros ones full
"""
_FILL = "fill zero"
_WRITE = "setitem copy index_put"

TABLE: dict[str, Rule] = {}
"""Normalised op name -> its rule. :func:`register_op_rule` adds to it."""
for _rule, _names in (
    (elementwise, _ELEMENTWISE),
    (identity, _IDENTITY),
    (movement, _MOVEMENT),
    (split, _SPLIT),
    (spatial, _SPATIAL),
    (reduce, _REDUCE),
    (softmax, _SOFTMAX),
    (ignore, _IGNORE),
    (factory, _FACTORY),
    (fill, _FILL),
    (write, _WRITE),
):
    TABLE.update(dict.fromkeys(_names.split(), _rule))
TABLE.update(
    {
        "conv1d": conv,
        "conv2d": conv,
        "conv3d": conv,
        "conv_transpose1d": conv_transpose,
        "conv_transpose2d": conv_transpose,
        "conv_transpose3d": conv_transpose,
        "linear": linear,
        "batch_norm": batch_norm,
        "instance_norm": instance_norm,
        "group_norm": group_norm,
        "layer_norm": layer_norm,
        "rms_norm": rms_norm,
        "mean": mean,
        "embedding": embedding,
        "gather": gather,
        "prelu": prelu,
        "matmul": matmul,
        "bmm": matmul,
        "einsum": einsum,
        "baddbmm": baddbmm,
        "scaled_dot_product_attention": scaled_dot_product_attention,
        "multi_head_attention_forward": multi_head_attention_forward,
        "addmm": addmm,
    }
)


def normalise_op_name(name: str) -> str:
    """``__iadd__`` -> ``add``, ``__rmul__`` -> ``mul``, ``relu_`` -> ``relu``, ``_max_pool2d`` -> ``max_pool2d``."""
    if name.startswith("__") and name.endswith("__"):
        base = name[2:-2]
        for prefix in ("i", "r"):
            if base.startswith(prefix) and base[1:] in TABLE and base not in TABLE:
                return base[1:]
        return base
    stripped = name.strip("_")
    return stripped if stripped in TABLE else name


def rule_for(name: str) -> Rule | None:
    """The rule for a normalised op name, or ``None`` for an op the tracer does not know."""
    return TABLE.get(name)


def register_op_rule(name: str, rule: str | Rule) -> None:
    """Teach the tracer an op by name (e.g. a custom ``torch.library`` op): ``rule`` is the name of a
    built-in rule (a key of :data:`RULES`, such as ``"elementwise"``) or a function
    ``rule(tracer, call) -> None`` of one's own."""
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"Unknown rule {rule!r} for op {name!r}; choose one of {', '.join(RULES)}.")
        rule = RULES[rule]
    elif not callable(rule):
        raise TypeError(
            f"The rule for op {name!r} must be a rule name or a function rule(tracer, call); got {type(rule).__name__}."
        )
    TABLE[name] = rule


__all__ = ["RULES", "TABLE", "normalise_op_name", "register_op_rule", "rule_for"]
