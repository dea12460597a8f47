"""torchvision's transformers at 50% group masks: whole heads and the embedding width go, exactly.

Every classifier torchvision ships with attention: ViT (``nn.MultiheadAttention``), Swin and Swin V2
(``shifted_window_attention`` with per-head relative position tables; V2's continuous position
bias MLP and logit scale), MaxViT (einsum attention with a per-head table). The reference zeroes
what ``whole_channel`` zeroes (filters, biases, norms, class token, position embedding, tables);
the export must equal it on the example and on another batch size (and another image size where
the model takes one), be smaller, and have lost heads in every model.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import RTOL, randomize, zero_norm_affine

from lightning_prune import ChannelGraph, export, group_masks, verify_equivalence
from lightning_prune.core.verify.report import count_params

# (image size, another size the model takes or None): ViT's position embedding fixes its size,
# MaxViT's partitions need 224; Swin pads its windows, so it takes any multiple of 32.
SIZES = {"vit_b_16": (32, None), "swin_t": (64, 96), "swin_v2_t": (64, 96), "maxvit_t": (224, None)}


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in SIZES])
def test_heads_and_embedding_width_go_exactly(name: str) -> None:
    torch.manual_seed(0)
    size, other_size = SIZES[name]
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    model = randomize(torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs))
    example = torch.randn(2 if size < 224 else 1, 3, size, size, generator=torch.Generator().manual_seed(1))
    masks = group_masks(ChannelGraph.from_model(model, example), 0.5, model=model)
    result = export(model, masks, example, whole_channel=True)

    reference = zero_norm_affine(model, masks, example)
    inputs = [example, torch.randn(3, 3, size, size)] if size < 224 else [example]
    if other_size:
        inputs.append(torch.randn(1, 3, other_size, other_size))
    for x in inputs:
        report = verify_equivalence(reference, result.model, x, rtol=RTOL)
        assert report.passed, f"{name} on {tuple(x.shape)}: {report}"
    assert count_params(result.model) < 0.4 * count_params(model)  # heads, MLP and embedding width
    assert [note for note in result.notes if note.unit == "head(s)"]
    before = dict(model.named_modules())
    for module_name, counts in result.plan.heads.items():  # the attributes forward reads say the new counts
        after = result.model.get_submodule(module_name)
        attribute = next(a for a in ("num_heads", "n_heads") if hasattr(after, a))
        assert getattr(after, attribute) == counts.query < getattr(before[module_name], attribute)
