"""Hugging Face ``transformers``: what an exported model needs beyond sliced parameters.

Imported only once ``transformers`` is (:func:`~lightning_prune.core.integrations.load_integrations`);
the package does not depend on it. It registers:

- a shrink function for ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections, whose weight
  is ``(in, out)`` and whose ``forward`` sizes its output from ``nf``);
- a head updater for ``GPT2Attention`` (and its copies in Decision Transformer and ImageGPT),
  whose ``forward`` splits the fused query/key/value projection by ``split_size``. The other
  Hugging Face attention classes in this release size their views as ``(..., -1, head_dim)``; the
  attributes they keep (``num_attention_heads``, ``all_head_size``, ``n_heads``,
  ``num_key_value_heads``) are set by :func:`~lightning_prune.core.shrink.attention.update_head_attributes`,
  and LLaMA-style ``num_key_value_groups`` stays valid because whole key/value groups go with their
  query heads;
- a model updater for T5's attention (:func:`update_shared_bias_attentions`): a cross-attention layer
  that keeps another head count than the stack's first builds its own zero position bias;
- a model updater that re-ties input and output embeddings the export untied, and makes each
  ``PreTrainedModel``'s ``config`` say the exported sizes where one config can: the same heads,
  key/value heads, ``head_dim`` and MLP width in every layer, in a model that reads ``head_dim``
  from its config. It checks this by building the model from the new config on the meta device and
  comparing every parameter's shape with the exported one; where they differ (widths that differ
  per layer, ``head_dim`` derived from ``hidden_size`` as in BERT), the config is left as it was
  and a ``"not described by the config"`` note says to reload with :func:`~lightning_prune.load_pruned`.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import astuple, replace
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lightning_prune.core.graph.changes import HeadCounts, LayerChange, Note, layer_shapes
from lightning_prune.core.graph.prunable import register_prunable
from lightning_prune.core.shrink.attention import register_attention, register_model_updater, update_head_attributes
from lightning_prune.core.shrink.registry import register_shrinker, shrink_parameters
from lightning_prune.core.trace.op_rules.norms import rms_form

if TYPE_CHECKING:
    from lightning_prune.core.graph.changes import Plan

SHRINK_RECORD = "lightning_prune_shrink"
"""The config entry that says how to shrink a model built from the config's original sizes (plain
JSON: per changed layer its kept sizes, per attention its head counts), read by
:func:`lightning_prune.core.files.pretrained.from_pretrained`."""
EPS_FIELDS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps")
"""Config fields that hold the norms' ``eps`` (the first float one is updated where RMS norms lost channels)."""
MLP_WIDTHS = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim")
"""Config fields that hold the MLP width (the first fitting one with an int value is updated)."""


register_prunable(Conv1D, out_channel_dim=1)


@register_shrinker(Conv1D)
def shrink_conv1d(module: Conv1D, change: LayerChange) -> nn.Module:
    """Slice the ``(nx, nf)`` weight and the bias, then set ``nx``/``nf`` (``forward`` views by ``nf``).
    A bias change the plan folded in (constants of pruned inputs) is added first."""
    if change.bias_delta is not None:
        with torch.no_grad():
            module.bias = nn.Parameter(module.bias + change.bias_delta.to(module.bias))
    shrink_parameters(module, change)
    module.nx, module.nf = module.weight.shape
    return module


SPLIT_ATTENTIONS = (
    ("transformers.models.gpt2.modeling_gpt2", "GPT2Attention"),
    ("transformers.models.decision_transformer.modeling_decision_transformer", "DecisionTransformerGPT2Attention"),
    ("transformers.models.imagegpt.modeling_imagegpt", "ImageGPTAttention"),
)
"""GPT-2-style attentions: ``c_attn`` (a Conv1D) gives query, key and value, split by ``split_size``."""


def _classes(names: tuple[tuple[str, str], ...]) -> list[type[nn.Module]]:
    """The classes of ``(module, class name)`` pairs this transformers release has."""
    found = []
    for module, name in names:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


def update_split_attention(module: nn.Module, counts: HeadCounts) -> None:
    """``num_heads``, and ``split_size``: the width of each of the query, key and value thirds."""
    update_head_attributes(module, counts)
    if module.split_size == counts.query_before * counts.head_dim:
        module.split_size = counts.query * counts.head_dim


register_attention(*_classes(SPLIT_ATTENTIONS))(update_split_attention)

ALIBI_ATTENTIONS = (("transformers.models.bloom.modeling_bloom", "BloomAttention"),)
"""Attentions handed ALiBi biases for every head, built once per forward from the model's head count."""


def update_alibi_attention(module: nn.Module, counts: HeadCounts) -> None:
    """Head counts, and a pre-hook that keeps the ALiBi biases (``alibi``, ``(batch * heads, 1, keys)``)
    of the heads kept: the model still builds them for all its original heads, slopes by head index."""
    update_head_attributes(module, counts)
    kept = torch.tensor(counts.kept, dtype=torch.long)

    def keep_heads(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        alibi = kwargs.get("alibi")
        if isinstance(alibi, torch.Tensor) and alibi.shape[0] % counts.query_before == 0 and kept.numel():
            per_head = alibi.view(-1, counts.query_before, *alibi.shape[1:])
            kwargs["alibi"] = per_head[:, kept.to(alibi.device)].reshape(-1, *alibi.shape[1:])
        return args, kwargs

    module.register_forward_pre_hook(keep_heads, with_kwargs=True)


register_attention(*_classes(ALIBI_ATTENTIONS))(update_alibi_attention)

PER_HEAD_NORMS = (("transformers.models.stablelm.modeling_stablelm", "StableLmAttention"),)
"""Attentions whose query/key norms are one module per head (``q_layernorm.norms``, ``k_layernorm.norms``)."""


def update_per_head_norms(module: nn.Module, counts: HeadCounts) -> None:
    """Head counts, and the per-head norms of the heads kept, in order (``forward`` zips them with the heads)."""
    update_head_attributes(module, counts)
    per_group = counts.query_before // counts.key_value_before
    kept_kv = sorted({head // per_group for head in counts.kept})
    for name, kept in (("q_layernorm", counts.kept), ("k_layernorm", kept_kv)):
        norms = getattr(module, name, None)
        if norms is not None and kept and len(norms.norms) > len(kept):
            norms.norms = nn.ModuleList([norms.norms[head] for head in kept])
            norms.num_heads = len(kept)


register_attention(*_classes(PER_HEAD_NORMS))(update_per_head_norms)


SHARED_BIAS_ATTENTIONS = (("transformers.models.t5.modeling_t5", "T5Attention"),)
"""Attentions handed the position bias of the stack's first layer, one tensor for every layer; where a
layer has no relative position table of its own (T5's cross-attention) that is zeros sized by the
first layer's head count."""


@register_model_updater
def update_shared_bias_attentions(model: nn.Module, plan: Plan) -> None:
    """Where heads went, a pre-hook on each attention of :data:`SHARED_BIAS_ATTENTIONS` without a table
    of its own: a zero bias sized for another head count (cross-attention layers keep heads of their
    own) becomes its own (``None``: ``forward`` builds zeros for its heads). A self-attention bias is
    sized right already: it carries channels of the first layer's table, which the trace couples with
    the heads of every layer it reaches, so those layers keep the same heads."""
    if not plan.heads:  # (before the import: a model without heads need not load transformers)
        return
    classes = tuple(_classes(SHARED_BIAS_ATTENTIONS))
    if not classes:
        return
    for module in model.modules():
        if isinstance(module, classes) and not module.has_relative_attention_bias:
            if _own_zero_bias not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_own_zero_bias, with_kwargs=True)


def _own_zero_bias(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    bias = kwargs.get("position_bias")
    if isinstance(bias, torch.Tensor) and bias.shape[1] != module.n_heads and not bias.any():
        kwargs["position_bias"] = None
    return args, kwargs


@register_model_updater
def update_transformers(model: nn.Module, plan: Plan) -> None:
    """Re-tie embeddings and update the config of every ``PreTrainedModel`` inside ``model`` (the
    outermost one holding each config)."""
    outermost: dict[int, tuple[str, PreTrainedModel]] = {}
    for prefix, module in model.named_modules():  # outer modules come first
        if isinstance(module, PreTrainedModel):
            outermost.setdefault(id(module.config), (prefix, module))
    for prefix, module in outermost.values():
        _retie_embeddings(module)
        note = _update_config(module, _under(plan, prefix))
        if note is not None:
            count, action, reason, unit = note
            line = Note(prefix or type(module).__name__, count, action, reason, unit=unit)
            if line not in plan.notes:  # the same plan applied again (load_pruned into an exported model)
                plan.notes.append(line)


def _under(plan: Plan, prefix: str) -> Plan:
    """The part of ``plan`` inside the submodule ``prefix``, with names relative to it."""
    start = f"{prefix}." if prefix else ""

    def inside(items: dict) -> dict:
        return {name[len(start) :]: value for name, value in items.items() if name.startswith(start)}

    return replace(plan, changes=inside(plan.changes), heads=inside(plan.heads), notes=[])


@torch.no_grad()
def _retie_embeddings(model: PreTrainedModel) -> None:
    """Tied input and output embeddings that export sliced or cloned apart, tied again where equal."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(inputs, "weight", None)
    if outputs is None or weight is None or outputs.weight is weight:
        return
    if outputs.weight.shape == weight.shape and torch.equal(outputs.weight, weight):
        outputs.weight = weight


def _update_config(model: PreTrainedModel, plan: Plan) -> tuple[int, str, str, str] | None:
    """Give ``model`` a config with its exported sizes where one config describes them. For the note:
    ``(count, action, reason, unit)``; ``None`` where nothing changed."""
    if not plan.changes and not plan.heads:
        return None
    config = model.config
    fields = _changed_fields(config, plan, model)
    candidate = _fresh(config)
    for name, value in fields.items():
        setattr(candidate, name, value)
    shapes = _shapes(model)
    built = _built_shapes(model, candidate)
    if not (fields and built == shapes):  # the original sizes, and how to shrink a model built from them
        candidate = _fresh(config)
        heads = {name: list(astuple(counts)) for name, counts in plan.heads.items()}
        setattr(candidate, SHRINK_RECORD, {"layers": layer_shapes(plan), "heads": heads})
    for module in model.modules():  # a config of its own: the one the caller built it from stays as it was
        if getattr(module, "config", None) is config:
            module.config = candidate
    if fields and built == shapes:
        said = ", ".join(f"{name}={value}" for name, value in fields.items())
        return len(fields), "updated in the config", f"{said}; save_pretrained / from_pretrained rebuild it", "size(s)"
    unexplained = sum(shape != (built or {}).get(key) for key, shape in shapes.items())
    why = (
        f"no {type(config).__name__} builds them (widths that differ per layer, a head_dim the model derives "
        f"from hidden_size, a corrected norm, a scale computed from the original width): the config keeps the "
        f"original sizes and says how to shrink them ('{SHRINK_RECORD}'); save_pretrained writes both, and "
        f"lightning_prune.from_pretrained(directory) rebuilds it"
    )
    return unexplained, "not described by the config", why, "size(s)"


def _fresh(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` without a shrink record (one replayed already describes nothing further)."""
    fresh = copy.deepcopy(config)
    fresh.__dict__.pop(SHRINK_RECORD, None)
    return fresh


def _changed_fields(config: PretrainedConfig, plan: Plan, model: PreTrainedModel) -> dict[str, int | float]:
    """The config values the plan suggests: heads every changed attention agrees on, the MLP width
    every resized axis of that width agrees on, the embedding width. :func:`_update_config` checks them."""
    fields: dict[str, int | float] = {}
    heads = {(c.query, c.key_value, c.head_dim) for c in plan.heads.values()}
    alibi = tuple(_classes(ALIBI_ATTENTIONS))
    if len(heads) == 1 and not any(isinstance(module, alibi) for module in model.modules()):
        ((query, key_value, head_dim),) = heads
        fields["num_attention_heads"] = query
        if getattr(config, "num_key_value_heads", None) is not None:
            fields["num_key_value_heads"] = key_value
        fields["head_dim"] = head_dim
    resized: dict[int, set[int]] = {}  # size before -> sizes after, over every sliced axis
    for change in plan.changes.values():
        for key, (index, groups) in change.keep.items():
            if groups == 1 and key in change.original_sizes:
                resized.setdefault(change.original_sizes[key], set()).add(int(index.numel()))
    for name in MLP_WIDTHS:
        width = getattr(config, name, None)
        if isinstance(width, int) and len(resized.get(width, ())) == 1:
            fields[name] = next(iter(resized[width]))
            break
    embeddings = model.get_input_embeddings()
    hidden = getattr(config, "hidden_size", None)
    if isinstance(embeddings, nn.Embedding) and isinstance(hidden, int) and embeddings.weight.shape[1] != hidden:
        fields["hidden_size"] = embeddings.weight.shape[1]
        if isinstance(getattr(config, "head_dim", None), int):  # else derived from hidden_size
            fields.setdefault("head_dim", config.head_dim)
    eps = {_eps(module) for module in model.modules()} - {None}
    field = next((name for name in EPS_FIELDS if isinstance(getattr(config, name, None), float)), None)
    if len(eps) == 1 and field is not None and eps != {getattr(config, field)}:
        fields[field] = eps.pop()  # every RMS norm rescaled alike (the residual width's)
    return fields


def _eps(module: nn.Module) -> float | None:
    """An RMS norm's ``eps`` (``None`` for any other module)."""
    form = rms_form(module) if "weight" in module._parameters and not any(True for _ in module.children()) else None
    return getattr(module, form.eps_attribute) if form is not None else None


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...] | float]:
    """Every tensor's shape, and every float a module keeps (a norm's ``eps``, Gemma's embedding
    scale computed from ``hidden_size``): what a config must reproduce."""
    found: dict[str, tuple[int, ...] | float] = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if isinstance(value, float):
                found[f"{name}.{attribute}"] = value
    return found


def _built_shapes(model: PreTrainedModel, config: PretrainedConfig) -> dict[str, tuple[int, ...] | float] | None:
    """The parameter shapes (and module floats) ``type(model)(config)`` has (built on the meta device), or ``None`` if it cannot be built."""
    try:
        with torch.device("meta"):
            return _shapes(type(model)(config))
    except Exception:  # a config the model refuses (heads that do not divide hidden_size)
        return None


__all__ = [
    "ALIBI_ATTENTIONS",
    "MLP_WIDTHS",
    "PER_HEAD_NORMS",
    "SHARED_BIAS_ATTENTIONS",
    "SHRINK_RECORD",
    "SPLIT_ATTENTIONS",
    "shrink_conv1d",
    "update_alibi_attention",
    "update_per_head_norms",
    "update_shared_bias_attentions",
    "update_split_attention",
    "update_transformers",
]
