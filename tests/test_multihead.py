"""nn.MultiheadAttention loses whole heads exactly: a user's model in every call form, torchvision's
vit_b_16, nn.TransformerEncoder, and the replacement module through copies, files and checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import RTOL, randomize, zero_norm_affine
from torch import nn

from lightning_prune import ChannelGraph, apply_masks, export, group_masks, verify_equivalence
from lightning_prune.core.files.checkpoint import load_pruned, save_pruned
from lightning_prune.core.files.deploy import check_deployed, save_onnx, save_pt2
from lightning_prune.core.shrink.multihead import PrunedMultiheadAttention
from lightning_prune.core.verify.report import count_params


class Attend(nn.Module):
    """Linear -> nn.MultiheadAttention -> Linear, called as ``options`` say; returns the weights too when asked."""

    def __init__(self, batch_first: bool = True, **options) -> None:
        super().__init__()
        self.batch_first, self.options = batch_first, options
        self.cross, self.mask = options.pop("cross", False), options.pop("mask", None)
        self.unbatched = options.pop("unbatched", False)
        self.call = {k: options.pop(k) for k in ("need_weights", "average_attn_weights") if k in options}
        self.embed = nn.Linear(8, 16)
        self.memory = nn.Linear(8, options.get("kdim", 16))
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **options)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor):
        if self.unbatched:
            x = x[0]
        elif not self.batch_first:
            x = x.transpose(0, 1)
        h = self.embed(x)
        kv = self.memory(x) if self.cross else h
        tokens = x.shape[-2] if self.batch_first or self.unbatched else x.shape[0]
        batch = 1 if self.unbatched else x.shape[0 if self.batch_first else 1]
        masks = {}
        if self.mask == "padding":
            padding = torch.zeros(batch, tokens, dtype=torch.bool)
            padding[:, -1] = True
            masks["key_padding_mask"] = padding[0] if self.unbatched else padding
        elif self.mask in ("bool", "causal"):
            masks["attn_mask"] = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
            masks["is_causal"] = self.mask == "causal"
        elif self.mask == "per_head":
            masks["attn_mask"] = torch.randn(batch * 4, tokens, tokens, generator=torch.Generator().manual_seed(1))
        out, weights = self.attn(h, kv, kv, **self.call, **masks)
        y = self.head(out)
        if not self.batch_first and not self.unbatched:
            y = y.transpose(0, 1)
        return y if weights is None else (y, weights)


CASES = {
    "self": {},
    "per_head_weights": {"average_attn_weights": False},
    "no_weights": {"need_weights": False},
    "key_padding_mask": {"mask": "padding"},
    "bool_attn_mask": {"mask": "bool"},
    "per_head_float_mask": {"mask": "per_head", "average_attn_weights": False},
    "causal": {"mask": "causal", "need_weights": False},
    "cross_kdim_vdim": {"cross": True, "kdim": 12, "vdim": 12},
    "cross_packed": {"cross": True},
    "unbatched_padding": {"unbatched": True, "mask": "padding", "average_attn_weights": False},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True, "mask": "padding", "average_attn_weights": False},
    "no_bias": {"bias": False},
}


def export_group_masked(model: nn.Module, example: torch.Tensor, other: torch.Tensor, whole_channel: bool = False):
    """50% group masks, export, and the check on ``example`` and ``other`` (another batch size): the result."""
    masks = group_masks(ChannelGraph.from_model(model, example), 0.5, model=model)
    result = export(model, masks, example, whole_channel=whole_channel)
    reference = zero_norm_affine(model, masks, example) if whole_channel else apply_masks(model, masks)
    for x in (example, other):
        report = verify_equivalence(reference, result.model, x, rtol=RTOL)
        assert report.passed, f"{report}\nnotes: {[str(n) for n in result.notes]}"
    assert count_params(result.model) < count_params(model)
    return result


def removed_heads(result, layer: str) -> int:
    return sum(n.channels for n in result.notes if n.layer == layer and n.unit == "head(s)" and n.action == "removed")


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_user_model_loses_whole_heads_exactly(case: str, batch_first: bool) -> None:
    torch.manual_seed(0)
    model = randomize(Attend(batch_first, **copy.deepcopy(CASES[case])))
    result = export_group_masked(model, torch.randn(2, 5, 8), torch.randn(3, 7, 8))
    per_head = result.masks["attn"].reshape(3, 4, 4)  # (query/key/value, head, head_dim)
    assert (per_head == per_head[:1, :, :1]).all(), "a head's query, key and value channels go together"
    attention = result.model.attn
    assert isinstance(attention, PrunedMultiheadAttention) and attention.num_heads == 2
    assert removed_heads(result, "attn") == 2
    assert attention.batch_first is batch_first


def test_live_value_biases_of_pruned_heads_fold_into_out_proj() -> None:
    """Masks read from zeroed filters leave the biases live: a pruned head gives its value bias (softmax
    rows sum to one), folded into out_proj's bias; its weights come from its query/key biases."""
    torch.manual_seed(0)
    model = randomize(Attend(average_attn_weights=False))
    x = torch.randn(2, 5, 8)
    masks = group_masks(ChannelGraph.from_model(model, x), 0.5, model=model)
    with torch.no_grad():
        model.attn.in_proj_weight[~masks["attn"]] = 0.0
    result = export(model, None, x)
    for example in (x, torch.randn(3, 6, 8)):
        assert verify_equivalence(model, result.model, example, rtol=RTOL).passed
    assert removed_heads(result, "attn") == 2
    assert [n.action for n in result.notes if n.layer == "attn.out_proj"] == ["folded into bias"]


def test_a_value_constant_that_bias_v_breaks_keeps_the_heads() -> None:
    torch.manual_seed(0)
    model = randomize(Attend(add_bias_kv=True))
    x = torch.randn(2, 5, 8)
    masks = group_masks(ChannelGraph.from_model(model, x), 0.5, model=model)
    with torch.no_grad():
        model.attn.in_proj_weight[~masks["attn"]] = 0.0  # the value biases and bias_v stay live
    result = export(model, None, x)
    assert verify_equivalence(model, result.model, x, rtol=RTOL).passed
    assert type(result.model.attn) is nn.MultiheadAttention
    reasons = {n.reason for n in result.notes if n.layer == "attn" and n.action == "kept"}
    assert any("bias_v or the zero-attention key" in reason for reason in reasons), reasons


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = torch.zeros(x.shape[:2], dtype=torch.bool)
        padding[:, -1] = True
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding))


def test_transformer_encoder_loses_heads_and_embedding_width() -> None:
    """nn.TransformerEncoder's fused fast path (taken in eval without grad) would read sizes the
    replacement no longer has; the export keeps it on the plain path and is exact."""
    torch.manual_seed(0)
    model = randomize(Encoder())
    result = export_group_masked(model, torch.randn(2, 5, 8), torch.randn(3, 7, 8), whole_channel=True)
    for index in range(2):
        attention = result.model.encoder.layers[index].self_attn
        assert isinstance(attention, PrunedMultiheadAttention) and attention.num_heads == 2
        assert attention.in_proj_weight.shape == (3 * 16, 16)  # half the heads, half the embedding width
    assert result.model.embed.out_features == 16


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model = randomize(Attend(mask="padding"))
    x = torch.randn(2, 5, 8)
    masks = group_masks(ChannelGraph.from_model(model, x), 0.5, model=model)
    return model, export(model, masks, x), x


def test_the_replacement_survives_deepcopy_and_a_state_dict_round_trip(exported) -> None:
    _, result, x = exported
    twin = copy.deepcopy(result.model)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.normal_()
    assert not verify_equivalence(result.model, twin, x).passed
    buffer = io.BytesIO()
    torch.save(result.model.state_dict(), buffer)
    buffer.seek(0)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert verify_equivalence(result.model, twin, torch.randn(4, 5, 8), rtol=0.0).passed


@pytest.mark.parametrize("save", [save_pt2, save_onnx], ids=["pt2", "onnx"])
def test_the_replacement_deploys(exported, tmp_path, save) -> None:
    _, result, x = exported
    path = save(result.model, x, tmp_path / "pruned.file")
    checked = check_deployed(path, result.model, [torch.randn(3, 5, 8)], format="pt2" if save is save_pt2 else "onnx")
    assert checked["max_relative_error"] <= checked["rtol"]


def test_the_checkpoint_rebuilds_the_replacement_from_the_original_architecture(exported, tmp_path) -> None:
    model, result, x = exported
    save_pruned(tmp_path / "pruned.ckpt", result)
    rebuilt = load_pruned(tmp_path / "pruned.ckpt", copy.deepcopy(model))
    assert isinstance(rebuilt.attn, PrunedMultiheadAttention) and rebuilt.attn.num_heads == 2
    assert verify_equivalence(result.model, rebuilt, torch.randn(3, 6, 8), rtol=0.0).passed


class Functional(nn.Module):
    """Calls the functional with an nn.MultiheadAttention's parameters from its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.inner, self.head = nn.Linear(8, 16), nn.MultiheadAttention(16, 4), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, inner = self.embed(x).transpose(0, 1), self.inner
        out, _ = F.multi_head_attention_forward(
            h, h, h, 16, 4, inner.in_proj_weight, inner.in_proj_bias, None, None, False, 0.0,
            inner.out_proj.weight, inner.out_proj.bias, training=False, need_weights=False,
        )  # fmt: skip
        return self.head(out.transpose(0, 1))


def test_the_functional_outside_the_module_keeps_its_channels() -> None:
    torch.manual_seed(0)
    model = randomize(Functional())
    x = torch.randn(2, 5, 8)
    masks = {"inner": torch.arange(48) % 16 < 8, "embed": torch.arange(16) < 8}
    result = export(model, masks, x)
    assert verify_equivalence(apply_masks(model, masks), result.model, x, rtol=RTOL).passed
    assert type(result.model.inner) is nn.MultiheadAttention and result.model.embed.out_features == 16
    kept = {n.layer: n.reason for n in result.notes if n.action == "kept"}
    assert "outside an nn.MultiheadAttention's forward" in kept["embed"]
    assert kept["inner"] == "the layer did not run as a conv/linear in the traced forward"


@pytest.mark.parametrize("name", [pytest.param("vit_b_16", id="vit_b_16")])
def test_torchvision_vit_loses_half_its_heads_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = randomize(torchvision.models.get_model(name, weights=None, image_size=32))
    result = export_group_masked(model, torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32))
    layers = result.model.encoder.layers
    assert all(isinstance(layer.self_attention, PrunedMultiheadAttention) for layer in layers)
    assert [layer.self_attention.num_heads for layer in layers] == [6] * len(layers)
    assert removed_heads(result, "encoder.layers.encoder_layer_0.self_attention") == 6
    assert count_params(result.model) < 0.55 * count_params(model)
