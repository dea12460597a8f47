"""Head counts after export: the attributes an attention module's ``forward`` reads.

Attention code sizes its views from attributes (timm's ``num_heads``, Hugging Face's
``num_attention_heads`` and ``all_head_size``); once whole heads are pruned they must say the new
counts, or the exported model fails or computes something else. Export calls one updater per
attention module whose heads changed: the most specific one registered for its class, else
:func:`update_head_attributes`, which sets the attributes it knows by name. A class of your own
takes one function:

>>> from torch import nn
>>> from lightning_prune.core.graph.changes import HeadCounts
>>> from lightning_prune.core.shrink.attention import register_attention
>>> class MyAttention(nn.Module):
...     heads = 8
>>> @register_attention(MyAttention)
... def my_attention(module, counts):
...     module.heads = counts.query
>>> module = MyAttention()
>>> update_heads(module, HeadCounts(query=6, key_value=6, head_dim=16, query_before=8, key_value_before=8))
>>> module.heads
6

Export checks the exported model against the masked one, so an attention whose attributes no
updater knows is caught there: its heads are kept, with a note (:mod:`lightning_prune.core.export`).

What describes the whole model (a Hugging Face ``config``) is set once all layers are shrunk, by the
functions :func:`register_model_updater` registers. Integrations with libraries the package does
not depend on (:mod:`lightning_prune.core.shrink.hf` for ``transformers``) register theirs when that
library has been imported: :func:`~lightning_prune.core.integrations.load_integrations`, which
export calls before it shrinks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from lightning_prune.core.errors import ConfigurationError
from lightning_prune.core.graph.changes import HeadCounts

if TYPE_CHECKING:
    from lightning_prune.core.graph.changes import Plan


HeadUpdater = Callable[[nn.Module, HeadCounts], None]
_UPDATERS: dict[type, HeadUpdater] = {}
ModelUpdater = Callable[[nn.Module, "Plan"], None]
_MODEL_UPDATERS: list[ModelUpdater] = []

QUERY_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
"""Attributes that hold the number of query heads."""
KEY_VALUE_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
"""Attributes that hold the number of key/value heads (grouped-query attention)."""
WIDTHS = ("all_head_size", "attn_dim", "inner_dim", "val_attn_dim")
"""Attributes that hold query heads times a per-head width (``head_dim``, LeViT's ``val_dim``)."""


def register_attention(*types: type[nn.Module]) -> Callable[[HeadUpdater], HeadUpdater]:
    """Register ``fn(module, counts: HeadCounts) -> None`` for ``types`` and their subclasses: it sets
    whatever the module's ``forward`` reads to size its heads."""

    def decorator(fn: HeadUpdater) -> HeadUpdater:
        for cls in types:
            _UPDATERS[cls] = fn
        return fn

    return decorator


def update_heads(module: nn.Module, counts: HeadCounts) -> None:
    """Run the most specific updater registered for ``module``'s class, else :func:`update_head_attributes`."""
    for cls in type(module).__mro__:
        if cls in _UPDATERS:
            return _UPDATERS[cls](module, counts)
    return update_head_attributes(module, counts)


def update_head_attributes(module: nn.Module, counts: HeadCounts) -> None:
    """Set the attributes of :data:`QUERY_HEADS`, :data:`KEY_VALUE_HEADS` and :data:`WIDTHS` the
    module has, where they hold the count before export (an attribute of another meaning is left)."""
    targets = [(name, counts.query_before, counts.query) for name in QUERY_HEADS]
    targets += [(name, counts.key_value_before, counts.key_value) for name in KEY_VALUE_HEADS]
    for name in WIDTHS:  # scaled with the query heads
        width = getattr(module, name, None)
        if isinstance(width, int) and not isinstance(width, bool) and width % counts.query_before == 0:
            targets.append((name, width, width // counts.query_before * counts.query))
    for name, before, after in targets:
        if getattr(module, name, None) == before and not isinstance(getattr(module, name), bool):
            setattr(module, name, after)


def register_head_dim_twins(twins: dict[type[nn.Module], type[nn.Module]]) -> None:
    """Register a head updater for library attention whose ``forward`` derives ``head_dim`` from its input
    width (``C // num_heads``, a reshape back to ``C``), so that heads cannot go while the width stays.

    ``twins`` maps each such class to its pruned twin: a subclass overriding only ``forward``, reading
    ``self.head_dim``. The updater sets the head counts (:func:`update_head_attributes`), then makes a
    module of the class exactly (or an exported twin, exported again) its twin with ``head_dim`` set,
    in place: parameters, buffers, hooks and names stay, so a checkpoint loads as before. The class is
    swapped rather than the module rebuilt, as ``torch.nn.utils.parametrize`` does, so that an attention
    that is the whole model is changed too. A subclass of one's own keeps its ``forward``: export's check
    keeps its heads if that derives ``head_dim`` from the width.
    """
    for library_class, twin in twins.items():
        if not issubclass(twin, library_class):
            raise ConfigurationError(
                f"register_head_dim_twins: {twin.__name__} does not subclass {library_class.__name__}; give a "
                "subclass of it that overrides only forward."
            )

    def update(module: nn.Module, counts: HeadCounts) -> None:
        update_head_attributes(module, counts)
        twin = twins.get(type(module), type(module))
        if twin in twins.values():
            module.__class__ = twin
            module.head_dim = counts.head_dim

    register_attention(*twins)(update)


def register_model_updater(fn: ModelUpdater) -> ModelUpdater:
    """Register ``fn(model, plan) -> None``, run on every exported model once its layers are shrunk
    (to update what describes the whole model, such as a Hugging Face ``config``)."""
    if fn not in _MODEL_UPDATERS:
        _MODEL_UPDATERS.append(fn)
    return fn


def update_model(model: nn.Module, plan: Plan) -> None:
    """Run every registered model updater on ``model``, shrunk as ``plan`` says."""
    for fn in _MODEL_UPDATERS:
        fn(model, plan)


__all__ = [
    "register_attention",
    "register_head_dim_twins",
    "register_model_updater",
    "update_head_attributes",
    "update_heads",
    "update_model",
]
