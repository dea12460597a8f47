"""torchvision's model classes: size attributes that an exported model's ``forward`` reads.

Imported only once ``torchvision`` is (:func:`~lightning_prune.core.integrations.load_integrations`).
``VisionTransformer._process_input`` reshapes the patch embedding with ``self.hidden_dim``, so an
export that prunes the embedding width updates it. Swin's ``shifted_window_attention`` derives
``head_dim`` as the embedding width over ``num_heads``: where pruning keeps that ratio the export
runs as it is; where it does not, export's check keeps that block's channels (with a note).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from lightning_prune.core.shrink.attention import register_model_updater

if TYPE_CHECKING:
    from lightning_prune.core.graph.changes import Plan


@register_model_updater
def update_vision_transformers(model: nn.Module, plan: Plan) -> None:
    """Set ``hidden_dim`` of every torchvision ``VisionTransformer`` to its patch embedding's width."""
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            module.hidden_dim = module.conv_proj.out_channels


__all__ = ["update_vision_transformers"]
