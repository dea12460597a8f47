"""Every mask source reaches one canonical form; bad masks fail with the layer named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from helpers import export_and_check, randomize
from models import UnprunedLast
from torch import nn

from lightning_prune import apply_masks, collect_masks, export, verify_equivalence

IMAGE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def keep_vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"features.0": torch.arange(16) % 3 != 0}


def nni_dict(model: nn.Module, keep: dict[str, torch.Tensor]) -> dict:
    masks = {}
    for name, vector in keep.items():
        module = model.get_submodule(name)
        weight = vector.float().view(-1, *[1] * (module.weight.ndim - 1)).expand_as(module.weight).clone()
        masks[name] = {"weight": weight, "bias": vector.float() if module.bias is not None else None}
    return masks


class Nni2Wrapper(nn.Module):
    """The layout NNI 2.x's PrunerModuleWrapper leaves: the layer under `.module`, masks as buffers."""

    def __init__(self, module: nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("weight_mask", keep.float().view(-1, 1, 1, 1).expand_as(module.weight).clone())

    def forward(self, x):
        return nn.functional.conv2d(
            x, self.module.weight * self.weight_mask, self.module.bias, self.module.stride, self.module.padding
        )


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return randomize(UnprunedLast())


def test_keep_vectors(model) -> None:
    keep = keep_vectors(model)
    assert {k: v.tolist() for k, v in collect_masks(keep, model).items()} == {k: v.tolist() for k, v in keep.items()}


def test_nni_masks_dict_and_file(model, tmp_path) -> None:
    keep = keep_vectors(model)
    masks = nni_dict(model, keep)
    path = tmp_path / "mask.pth"
    torch.save(masks, path)
    for source in (masks, path, str(path)):
        collected = collect_masks(source, model)
        assert all(torch.equal(collected[k], keep[k]) for k in keep)


def test_real_nni_pruner_wrapped_model_and_masks(model) -> None:
    from nni.compression.pruning import L1NormPruner

    pruner = L1NormPruner(model, [{"op_types": ["Conv2d"], "op_names": ["features.0"], "sparse_ratio": 0.5}])
    _, masks = pruner.compress()
    from_wrappers = collect_masks(model)
    from_dict = collect_masks(masks, model)
    assert set(from_wrappers) == {"features.0"}
    assert all(torch.equal(from_wrappers[k], from_dict[k]) for k in from_dict)
    assert int(from_wrappers["features.0"].sum()) == 8
    model.eval()
    with torch.no_grad():
        wrapped_output = model(IMAGE)  # NNI's own masked forward is the reference
    small = export(model, None, IMAGE).model
    assert small.features[0].out_channels < 16
    error = (small(IMAGE) - wrapped_output).norm() / wrapped_output.norm()
    assert error <= 1e-5


def test_nni2_weight_mask_wrappers(model) -> None:
    keep = keep_vectors(model)["features.0"]
    model.features[0] = Nni2Wrapper(model.features[0], keep)
    assert torch.equal(collect_masks(model)["features.0"], keep)
    model.eval()
    with torch.no_grad():
        wrapped_output = model(IMAGE)
    small = export(model, None, IMAGE).model
    assert isinstance(small.features[0], nn.Conv2d)
    assert torch.allclose(small(IMAGE), wrapped_output, rtol=1e-5, atol=1e-6)


def test_torch_prune_buffers_as_model_pruning_leaves_them(model) -> None:
    torch_prune.ln_structured(model.features[0], "weight", amount=0.5, n=1, dim=0)
    keep = collect_masks(model)
    assert set(keep) == {"features.0"} and int(keep["features.0"].sum()) == 8
    result = export_and_check(apply_masks(model, keep), keep, IMAGE)
    assert result.model.features[0].out_channels < 16
    assert hasattr(model.features[0], "weight_orig")  # the user's model keeps its reparametrisation


def test_zeroed_filters_in_plain_weights(model) -> None:
    torch_prune.ln_structured(model.features[0], "weight", amount=0.25, n=1, dim=0)
    torch_prune.remove(model.features[0], "weight")  # what make_pruning_permanent=True leaves
    keep = collect_masks(model)
    assert int((~keep["features.0"]).sum()) == 4


def test_exported_masks_equal_reference_via_verify(model) -> None:
    keep = keep_vectors(model)
    small = export(model, nni_dict(model, keep), IMAGE).model
    assert verify_equivalence(apply_masks(model, keep), small, IMAGE).passed
