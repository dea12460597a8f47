"""Every torchvision classification builder (bar >150M params, and transformers but vit_b_16) and three
segmentation heads: random 50% masks, randomised norms (statistics set from the example's activations,
then perturbed, so the output depends on the image), exported == masked on the example and on another
batch, fewer parameters.

Random per-layer masks never prune a whole head; torchvision's transformers (vit_b_16, swin_t,
swin_v2_t, maxvit_t) are tested with group masks, heads removed, in test_transformers_torchvision.py."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from helpers import RTOL, export_and_check, random_masks, randomize, zero_norm_affine
from torchvision import models

from lightning_prune import verify_equivalence
from lightning_prune.core.verify.report import count_params

TRANSFORMERS = ("vit_", "swin_", "maxvit_")
OVER_150M = {"convnext_large", "regnet_y_128gf"}  # 197.8M and 644.8M parameters
SEGMENTATION = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
INPUT_SIZE = {"inception_v3": 80, "vit_b_16": 32}

ZOO = (
    [name for name in models.list_models(module=models) if not name.startswith(TRANSFORMERS) and name not in OVER_150M]
    + ["vit_b_16"]
    + SEGMENTATION
)


@functools.lru_cache(maxsize=1)
def build(name: str):
    torch.manual_seed(0)
    kwargs = {"weights_backbone": None} if name in SEGMENTATION else {}
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True
    if name.startswith("vit_"):
        kwargs["image_size"] = INPUT_SIZE[name]
    size = INPUT_SIZE.get(name, 64)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = randomize(torchvision.models.get_model(name, weights=None, **kwargs), example=example)
    return model, random_masks(model), example


@pytest.mark.parametrize("variant", ["weights", "weights+norms"])
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ZOO])
def test_export_is_exact_and_smaller(name: str, variant: str) -> None:
    model, masks, example = build(name)
    if variant == "weights":
        from lightning_prune import apply_masks

        reference = apply_masks(model, masks)
    else:
        reference = zero_norm_affine(model, masks, example)
    result = export_and_check(reference, masks, example)
    assert count_params(result.model) < count_params(model)
    other = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(2))
    report = verify_equivalence(reference, result.model, other, rtol=RTOL)
    assert report.passed, f"exact on the example, not on another batch:\n{report}"
    # The part of the output the image moves, alone and in float64: constants cancel and rounding
    # noise does not hide it, so a wrong image path fails here even where 50% masks in every layer of
    # a deep EfficientNet leave the image only 3e-5 of the output (measured: reproduced to 4e-7 or better).
    # Both models are this test's own copies: converted in place, and both images in one batch (eval mode).
    dense64, small64 = reference.double(), result.model.double()
    pair = other[:2].double()
    with torch.no_grad():
        dense_out, small_out = _logits(dense64(pair)), _logits(small64(pair))
        first = dense_out[:1]
        expected = first - dense_out[1:]
        got = small_out[:1] - small_out[1:]
    assert float(expected.norm() / first.norm()) > 1e-6  # the output depends on the image
    assert float((got - expected).norm() / expected.norm()) < RTOL


def _logits(output):
    return output["out"] if isinstance(output, dict) else output
