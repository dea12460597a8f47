"""Export at scale: from a skeleton on meta plus a weights file, in place, block by block, with progress."""

from __future__ import annotations

import gc
import logging
import os
import weakref

import pytest
import torch
import torchvision
from helpers import RTOL, random_masks, randomize, relative_error
from test_lm_residual import LogitsOnly
from torch import nn

from lightning_prune import ChannelGraph, apply_masks, export, group_masks
from lightning_prune.core.errors import CheckpointError, MaskError, VerificationError
from lightning_prune.core.from_file import export_from_file, masked_weights
from lightning_prune.core.graph.masked_view import MaskedView
from lightning_prune.core.shrink.registry import slices_only
from lightning_prune.core.verify.blocks import blocks, verify_blocks
from lightning_prune.core.weights import WeightFile, parameters_on_meta

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

LLAMA = {
    "vocab_size": 100,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
}
LAYERS = ["model.layers.0", "model.layers.1", "model.layers.2"]


def llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def tokens(length: int = 7) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(1))}


def logits(model: nn.Module, example: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**example).logits.float()


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    """A randomised tiny LLaMA, its 50% group masks (heads and MLP width), and its safetensors file."""
    model = randomize(llama())
    with torch.no_grad():  # RMSNorm weights away from 1, as trained ones are
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    # not the residual width (embedding columns): pruned channels would cross every block's boundary,
    # so the blocks could not be compared on the same inputs (verify_blocks gives None there)
    layers = [name for name, _ in model.named_modules() if name != "model.embed_tokens"]
    masks = group_masks(ChannelGraph.from_model(model, tokens()), 0.5, model=model, layers=layers)
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    return model, masks, path


def skeleton(dtype: torch.dtype = torch.float32) -> nn.Module:
    with parameters_on_meta():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    return model.to(dtype)


def test_from_file_safetensors_equals_masked_and_in_memory_export(llama_file):
    model, masks, path = llama_file
    meta = skeleton()
    result = export_from_file(meta, path, masks, tokens(), progress=False)
    assert all(p.is_meta for p in meta.parameters()), "the skeleton must stay on meta"
    assert not any(p.is_meta for p in result.model.parameters())
    in_memory = export(model, masks, tokens()).model
    shapes = {n: p.shape for n, p in in_memory.named_parameters()}
    assert {n: p.shape for n, p in result.model.named_parameters()} == shapes
    assert result.model.model.layers[0].mlp.down_proj.in_features == 64  # half the MLP width
    assert result.model.model.layers[0].self_attn.q_proj.out_features == 32  # half the heads
    masked = apply_masks(model, masks)
    for example in (tokens(), tokens(11)):
        assert relative_error(logits(result.model, example), logits(masked, example)) <= RTOL
    assert [name for name, _ in result.blocks] == [
        "model.embed_tokens",
        "model.rotary_emb",
        *LAYERS,
        "model.norm",
        "lm_head",
    ]
    checked = dict(result.blocks)
    assert all(checked[name] is not None and checked[name] <= 1e-5 for name in LAYERS), result.blocks
    assert {"trace", "plan", "shrink block", "check", "verify block"} <= set(result.timings)


def test_from_file_bf16_blocks_checked_in_float32(llama_file):
    model, masks, path = llama_file
    bf16 = path.parent / "bf16.safetensors"
    safetensors_torch.save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, str(bf16))
    result = export_from_file(skeleton(torch.bfloat16), bf16, masks, tokens(), progress=False)
    assert result.model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    errors = dict(result.blocks)
    assert all(errors[name] is not None and errors[name] <= 1e-5 for name in LAYERS), result.blocks
    # the same weights in float32, exported in memory, give the same small model
    reference = export(model.to(torch.bfloat16).float(), masks, tokens()).model
    exported = result.model.model.layers[2].mlp.down_proj.weight.float()
    assert torch.equal(exported, reference.model.layers[2].mlp.down_proj.weight)


def test_block_check_finds_a_wrong_block(llama_file):
    model, masks, path = llama_file
    result = export_from_file(skeleton(), path, masks, tokens(), progress=False)
    with torch.no_grad():
        result.model.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5
    errors = dict(verify_blocks(result.model, masked_weights(skeleton(), path, masks), LAYERS, tokens()))
    assert errors["model.layers.1"] > 1e-3 and errors["model.layers.0"] <= 1e-5


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def test_from_file_torch_state_dict_convnet_whole_channel(tmp_path):
    model = randomize(resnet(), example=torch.randn(2, 3, 32, 32))
    masks = random_masks(model, skip=("fc",))
    path = tmp_path / "resnet.pt"
    torch.save(model.state_dict(), path)
    with parameters_on_meta():
        meta = resnet()
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    result = export_from_file(meta, path, masks, example, whole_channel=True, progress=False)
    expected = export(model, masks, example, whole_channel=True)
    with torch.no_grad():
        assert relative_error(result.model.eval()(example), expected.model.eval()(example)) <= RTOL
    assert result.function_change == pytest.approx(expected.function_change, rel=1e-3)
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    assert "layer1" in blocks(meta) and "fc" in blocks(meta)


@pytest.mark.parametrize("path_given", [True, False], ids=["path", "store"])
def test_from_file_whole_channel_traces_once_and_measures_the_change_when_read(tmp_path, path_given):
    """Group masks agree inside each coupled group, so the one pass zeroes what the graph asks: the file is
    traced once. The masks' own output (``function_change``) is one more pass over the file when first read;
    given an open store (a sharded model's gather, which every rank must read together), during export."""
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = randomize(resnet(), example=example)
    masks = group_masks(ChannelGraph.from_model(model, example), 0.5, model=model)
    path = tmp_path / "resnet.pt"
    torch.save(model.state_dict(), path)
    with parameters_on_meta():
        meta = resnet()
    forwards = []
    meta.register_forward_pre_hook(lambda module, args: forwards.append(module))  # the exported model's copy too
    result = export_from_file(
        meta, path if path_given else WeightFile(path), masks, example, whole_channel=True, verify=False, progress=False
    )
    assert [module is meta for module in forwards] == ([True, False] if path_given else [True, True, False])
    expected = export(model, masks, example, whole_channel=True)
    assert result.function_change == pytest.approx(expected.function_change, rel=1e-3)
    assert result.function_change > 1e-3  # the randomised norms' shifts no longer reach the next convs
    assert len(forwards) == 3  # the file read once more, once
    with torch.no_grad():
        assert relative_error(result.model.eval()(example), expected.model.eval()(example)) <= RTOL


def test_inplace_frees_the_dense_layers_and_exports_the_same():
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = randomize(resnet(), example=example)
    masks = random_masks(model, skip=("fc",))
    expected = export(model, masks, example)
    dense = weakref.ref(model.layer1[0].conv1.weight)
    result = export(model, masks, example, inplace=True)
    gc.collect()
    assert dense() is None, "inplace=True must drop each dense tensor it replaces"
    assert result.model is model and model.layer1[0].conv1.out_channels < 64
    with torch.no_grad():
        assert relative_error(result.model(example), expected.model(example)) <= RTOL
    kept = weakref.ref(expected.model.layer1[0].conv1.weight)
    assert kept() is not None


def test_export_keeps_the_model_without_inplace():
    example = torch.randn(1, 3, 32, 32)
    model = randomize(resnet(), example=example)
    dense = model.layer1[0].conv1.weight
    export(model, random_masks(model, skip=("fc",)), example)
    assert model.layer1[0].conv1.weight is dense and dense.shape[0] == 64


def test_shrink_slices_a_layers_own_tensors_only_where_every_zeroed_slice_is_dropped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    keep = {"0": torch.tensor([True, False, True, False])}
    rows = (torch.tensor([0, 2]), 1)
    view = MaskedView(model, keep)
    assert view.sliced_away("0", {("weight", 0): rows, ("bias", 0): rows})
    assert not view.sliced_away("0", {("weight", 0): rows}), "its bias keeps the pruned rows, zeroed"
    with_pruned = (torch.tensor([0, 1, 2]), 1)
    assert not view.sliced_away("0", {("weight", 0): with_pruned, ("bias", 0): with_pruned})
    in_place = MaskedView(model, keep, in_place=True)  # rows the shrink drops are not zeroed first either
    assert in_place.sliced_away("0", {("weight", 0): rows, ("bias", 0): rows})
    assert not in_place.sliced_away("0", {("weight", 0): with_pruned, ("bias", 0): with_pruned})
    assert slices_only(model[0]) and slices_only(model[1])
    assert not slices_only(nn.MultiheadAttention(8, 2)), "it keeps the pruned heads' biases: it reads zeroed rows"


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_a_masked_channel_the_export_keeps_stays_zero(inplace):
    """``round_to=2`` adds one masked channel back: its rows must come out zeroed, the others' sliced away."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)))
    masks = {"0": torch.tensor([True, False, True, False, True, False, False, False])}
    example = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = apply_masks(model, masks)(example)
    result = export(model, masks, example, round_to=2, inplace=inplace)
    assert result.model[0].out_channels == 4 and result.retries == 0
    with torch.no_grad():
        assert relative_error(result.model(example), expected) <= RTOL


@pytest.mark.parametrize("before", ["collector on", "objects frozen already", "collector off"])
def test_export_keeps_the_collector_off_the_older_objects_and_restores_it(before):
    """During an export the process's older objects are frozen (a full collection would walk every one of
    them: torch's, transformers'); afterwards the collector is as it was, a user's own freeze kept."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    frozen_inside: list[int] = []
    model[0].register_forward_hook(lambda *_: frozen_inside.append(gc.get_freeze_count()))
    example = torch.randn(1, 3, 8, 8)
    gc.unfreeze()
    if before == "objects frozen already":
        gc.freeze()
    if before == "collector off":
        gc.disable()
    frozen_before = gc.get_freeze_count()
    try:
        export(model, {"0": torch.arange(8) % 2 == 0}, example)
        assert gc.get_freeze_count() == frozen_before and gc.isenabled() == (before != "collector off")
    finally:
        gc.enable()
        gc.unfreeze()
    if before == "collector on":
        assert frozen_before == 0 and frozen_inside and min(frozen_inside) > 0
    else:  # nothing changed: a user's freeze or disabled collector is theirs
        assert frozen_inside and set(frozen_inside) == {frozen_before}


def test_progress_log_lines_and_timings(caplog):
    model = resnet()
    with caplog.at_level(logging.INFO, logger="lightning_prune"):
        result = export(model, random_masks(model, skip=("fc",)), torch.randn(1, 3, 32, 32), progress=True)
    assert "lightning_prune export: trace" in caplog.text and "lightning_prune export: shrink" in caplog.text
    assert list(result.timings) == ["trace", "plan", "shrink", "check", "copy"]


def test_from_file_bad_inputs(tmp_path, llama_file):
    model, masks, path = llama_file
    with pytest.raises(CheckpointError, match=r"Weights file '.*missing\.safetensors' does not exist"):
        export_from_file(skeleton(), tmp_path / "missing.safetensors", masks, tokens())
    with pytest.raises(MaskError, match="export_from_file needs the masks"):
        export_from_file(skeleton(), path, None, tokens())
    partial = tmp_path / "partial.safetensors"
    state = model.state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    safetensors_torch.save_file(state, str(partial))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\).*'model\.layers\.1\.mlp\.up_proj\.weight'"):
        export_from_file(skeleton(), partial, masks, tokens())
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "intermediate_size": 96}))
    other = tmp_path / "other.safetensors"
    safetensors_torch.save_file(wider.state_dict(), str(other))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(96, 64\)"):
        export_from_file(skeleton(), other, masks, tokens())
    junk = tmp_path / "junk.pt"
    torch.save([torch.zeros(2)], junk)
    with pytest.raises(CheckpointError, match=r"'.*junk\.pt' holds a list, not a state dict"):
        WeightFile(junk)
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match=r"'.*notes\.txt' is neither safetensors nor a torch.save state dict"):
        WeightFile(text)
    assert os.path.exists(path)


def test_inplace_cannot_retry(tmp_path):
    """A model whose forward fixes a channel count: export retries with them kept, which inplace cannot."""

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.head = nn.Linear(8 * 4, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.head(y.reshape(y.shape[0], 8 * 4))

    keep = {"conv": torch.arange(8) % 2 == 0}
    example = torch.randn(2, 3, 2, 2)
    assert export(Fixed(), keep, example).model.conv.out_channels == 8  # kept after the retry
    with pytest.raises(VerificationError, match="with inplace=True the dense layers are gone"):
        export(Fixed(), keep, example, inplace=True)


def t5() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2)
    return LogitsOnly(transformers.T5ForConditionalGeneration(config)).eval()


def t5_tokens(length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (2, length), generator=torch.Generator().manual_seed(length))
    return {"input_ids": ids, "decoder_input_ids": ids[:, :-2]}


@pytest.mark.parametrize("source", ["file", "copy", "inplace"])
def test_tied_embedding_held_by_several_modules_is_masked_in_each(tmp_path, source):
    """T5's ``shared`` embedding is also its encoder's and decoder's ``embed_tokens`` (modules of their
    own) and its ``lm_head``: the masks name ``shared``, which never runs, so a layer-by-layer masked
    view must zero the tied tensor in every module that holds it, or the residual width is not zero."""
    model = randomize(t5())
    example = t5_tokens(7)
    masks = group_masks(ChannelGraph.from_model(model, example), 0.5, model=model)
    assert "model.shared" in masks and "model.encoder.embed_tokens" not in masks, "the test needs the tie named once"
    masked = apply_masks(model, masks)
    if source == "file":
        path = tmp_path / "t5.pt"
        torch.save(model.state_dict(), path)
        with parameters_on_meta():
            meta = t5()
        exported = export_from_file(meta, path, masks, example, verify=False, progress=False).model
    else:  # a copy zeroed module by module; in place, the tied tensor itself is zeroed (one place suffices)
        exported = export(model, masks, example, inplace=source == "inplace").model
    assert exported.model.shared.embedding_dim < 64  # the residual width went
    for length in (7, 11):
        with torch.no_grad():
            assert relative_error(exported(**t5_tokens(length)), masked(**t5_tokens(length))) <= RTOL
