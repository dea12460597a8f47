"""The torchvision zoo's representative shapes, pruned as users do and shipped: exact at every step.

Each model (randomised norms and biases, batch-norm statistics set from a real batch and perturbed,
eval mode, 3x64x64 images) gets 50% group masks rounded to multiples of 8
and is exported with ``whole_channel=True, round_to=8``. The export must equal the whole-channel
model (filters, biases and the norms they feed zeroed) on another batch size, be as small as the
masks say, and keep multiples of 8; then ``pruned.onnx`` (in ONNX Runtime) and ``pruned.pt2``
(``torch.export.load``) must reproduce the export at batch sizes it never saw. resnet18 and
mobilenet_v2 are covered by test_deploy.py; here: compound scaling with squeeze-and-excitation
(EfficientNet), depthwise 7x7 with LayerNorm and layer scale (ConvNeXt), grouped convs (RegNet),
dense concatenation (DenseNet) and multi-head attention (ViT).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import onnxruntime
import pytest
import torch
import torchvision
from helpers import images, randomize, relative_error, zero_norm_affine
from torch import nn

from lightning_prune import ChannelGraph, ExportResult, export, group_masks, verify_equivalence
from lightning_prune.core.files.deploy import DEPLOY_FORMATS, save_deployables
from lightning_prune.core.graph.masks import Masks
from lightning_prune.core.verify.report import count_params

# Exported parameters over dense (measured: whole_channel / plain export). Each bound holds with margin
# and, but for EfficientNet (whose plain export is as small: 0.320), fails at the plain export's size.
MAX_PARAMS = {
    "efficientnet_b0": 0.35,  # 0.319 / 0.320
    "convnext_tiny": 0.30,  # 0.260 / 0.547
    "regnet_y_400mf": 0.30,  # 0.269 / 0.484
    "densenet121": 0.32,  # 0.285 / 0.393
    "vit_b_16": 0.30,  # 0.254 / 0.508
}
ROUND_TO = 8


class Exported(NamedTuple):
    name: str
    model: nn.Module
    masks: Masks
    result: ExportResult
    reference: nn.Module


def width(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "vit_b_16":
        return randomize(torchvision.models.vit_b_16(weights=None, image_size=64))  # randomize fills its zero head
    return randomize(torchvision.models.get_model(name, weights=None), example=images(8, 9))


@pytest.fixture(scope="module", params=[pytest.param(name, id=name) for name in MAX_PARAMS])
def exported(request: pytest.FixtureRequest) -> Exported:
    """One model, its rounded 50% group masks, the whole-channel export, and the model it must equal."""
    model, example = build(request.param), images(2, 0)
    masks = group_masks(ChannelGraph.from_model(model, example), 0.5, model=model, round_to=ROUND_TO)
    result = export(model, masks, example, whole_channel=True, round_to=ROUND_TO)
    return Exported(request.param, model, masks, result, zero_norm_affine(model, masks, example))


def test_whole_channel_export_is_exact_small_and_rounded(exported: Exported) -> None:
    name, model, masks, result, reference = exported
    small = result.model
    x = images(4, 1)  # not the example's batch size
    with torch.no_grad():
        assert relative_error(model(x)[0], model(x)[1]) > 0.01  # the output depends on the image
    report = verify_equivalence(reference, small, x, rtol=1e-5)
    assert report.passed, f"{name}: {report}"
    assert result.function_change > 0  # whole channels zeroed: the function changed, and export says by how much
    assert count_params(small) < MAX_PARAMS[name] * count_params(model)

    assert not [note for note in result.notes if note.action == "kept"]  # as small as the masks say
    original = dict(model.named_modules())
    for layer_name, layer in small.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and width(layer) != width(original[layer_name]):
            assert width(layer) == int(masks[layer_name].sum()), layer_name
            # grouped and depthwise convs too, but for RegNet's 13- and 55-group stages: no multiple of
            # lcm(groups, 8) lies below their full width, so they keep 4 of 8 channels per group
            in_odd_stage = name == "regnet_y_400mf" and layer_name.startswith(
                ("trunk_output.block2", "trunk_output.block4")
            )
            assert width(layer) % ROUND_TO == 0 or in_odd_stage, f"{layer_name}: {width(layer)} channels"
    if name == "vit_b_16":
        assert all(layer.self_attention.num_heads < 12 for layer in small.encoder.layers)


# ONNX and torch.export take 25-60 s a model here: the files are checked on the three that add ops the
# CNNs of tests/test_deploy.py lack (SiLU and squeeze-excite, channels-first LayerNorm, attention);
# RegNet's grouped convs and DenseNet's concatenations are checked for exactness above.
DEPLOYED = ("efficientnet_b0", "convnext_tiny", "vit_b_16")


@pytest.mark.parametrize("exported", [pytest.param(name, id=name) for name in DEPLOYED], indirect=True)
def test_deployable_files_reproduce_the_export(exported: Exported, tmp_path) -> None:
    small = exported.result.model
    report = save_deployables(small, images(2, 0), tmp_path, DEPLOY_FORMATS, batches=[images(5, 2)])
    assert sorted(os.listdir(tmp_path)) == ["pruned.onnx", "pruned.pt2"]
    for fmt, rtol in (("onnx", 1e-4), ("pt2", 1e-5)):
        assert report[fmt]["batch_sizes"] == [5] and report[fmt]["max_relative_error"] <= rtol, report[fmt]

    x = images(3, 3)  # a batch size neither the export nor save_deployables saw
    with torch.no_grad():
        expected = small(x)
    session = onnxruntime.InferenceSession(report["onnx"]["path"], providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert got.shape == (3, 1000) and relative_error(torch.from_numpy(got), expected) <= 1e-4
    with torch.no_grad():
        assert relative_error(torch.export.load(report["pt2"]["path"]).module()(x), expected) <= 1e-5
