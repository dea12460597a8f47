"""Shrinking: each planned module rebuilt at its new size, and the adapters that keep its code working.

- :mod:`~lightning_prune.core.shrink.registry`: module type -> shrink function
  (:func:`~lightning_prune.register_shrinker`), the built-in layers and ``PrunedLayerNorm``;
- :mod:`~lightning_prune.core.shrink.attention`: head counts an attention module's ``forward`` reads,
  set after export (``register_attention``, ``register_model_updater``);
- :mod:`~lightning_prune.core.shrink.multihead`: ``nn.MultiheadAttention`` with fewer heads;
- :mod:`~lightning_prune.core.shrink.residual`: embeddings that lost columns, RMS norms rescaled to stay
  exact (the default for any module);
- :mod:`~lightning_prune.core.shrink.hf`, :mod:`~lightning_prune.core.shrink.torchvision_models`,
  :mod:`~lightning_prune.core.shrink.timm_models`: the Hugging Face, torchvision and timm adapters,
  imported once their library is
  (:func:`~lightning_prune.core.integrations.load_integrations`).
"""

from lightning_prune.core.integrations import register_integration
from lightning_prune.core.shrink import multihead, residual  # noqa: F401  (register their shrinkers)

register_integration("transformers", "lightning_prune.core.shrink.hf")
register_integration("torchvision", "lightning_prune.core.shrink.torchvision_models")
register_integration("timm", "lightning_prune.core.shrink.timm_models")
