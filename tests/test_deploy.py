"""Deployable files: pruned.onnx in real ONNX Runtime and pruned.pt2 through torch.export.load, both checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import onnx
import onnxruntime
import pytest
import pytorch_lightning as pl
import torch
import torchvision
from helpers import images, random_masks, randomize, relative_error
from torch import nn

from lightning_prune import CheckpointError, ConfigurationError, VerificationError, export_pruned_model
from lightning_prune.core.files.deploy import (
    DEPLOY_FORMATS,
    OnnxRuntimeModel,
    check_deployed,
    save_deployables,
    save_onnx,
    save_pt2,
)


@pytest.fixture(scope="module", params=[pytest.param(n, id=n) for n in ("resnet18", "mobilenet_v2")])
def pruned(request) -> nn.Module:
    """The exported (physically smaller) network of a torchvision model at random 50% masks."""
    torch.manual_seed(0)
    model = randomize(torchvision.models.get_model(request.param, weights=None), example=images(2, 0))
    small = export_pruned_model(model, random_masks(model, 0.5), images(2, 0))
    assert sum(p.numel() for p in small.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    return small.eval()


def test_pruned_torchvision_models_deploy_to_onnx_and_pt2(pruned: nn.Module, tmp_path) -> None:
    report = save_deployables(pruned, images(2, 0), tmp_path, DEPLOY_FORMATS, batches=[(images(5, 1), None)])
    assert sorted(os.listdir(tmp_path)) == ["pruned.onnx", "pruned.pt2"]  # no temporaries left behind
    for fmt, rtol in (("onnx", 1e-4), ("pt2", 1e-5)):
        entry = report[fmt]
        assert entry["path"] == str(tmp_path / f"pruned.{fmt}") and entry["size_bytes"] == os.path.getsize(
            entry["path"]
        )
        assert entry["batches"] == 1 and entry["batch_sizes"] == [5] and entry["dynamic_batch"] is True
        assert entry["max_relative_error"] <= rtol == entry["rtol"]

    # ONNX: every input and output has a symbolic batch axis; real ONNX Runtime, a batch size the export never saw
    graph = onnx.load(report["onnx"]["path"]).graph
    assert all(v.type.tensor_type.shape.dim[0].dim_param for v in [*graph.input, *graph.output])
    session = onnxruntime.InferenceSession(report["onnx"]["path"], providers=["CPUExecutionProvider"])
    x = images(7, 2)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = pruned(x)
    assert got.shape == (7, 1000) and relative_error(torch.from_numpy(got), expected) <= 1e-4

    # pt2: a fresh interpreter with neither lightning_prune nor torchvision runs it at another batch size
    x = images(3, 3)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        """
        import sys, torch
        program = torch.export.load(sys.argv[1])
        torch.save(program.module()(torch.load(sys.argv[2])), sys.argv[3])
        assert not {"lightning_prune", "torchvision", "helpers"} & set(sys.modules), sorted(sys.modules)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, report["pt2"]["path"], str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        expected = pruned(x)
    assert relative_error(torch.load(tmp_path / "y.pt"), expected) <= 1e-5


class TwoInputs(nn.Module):
    """Keyword inputs, a nested dict/tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.side = nn.Linear(5, 6)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> dict:
        features = self.conv(image) + self.side(extra)
        return {"logits": features, "aux": (features.sigmoid(), image.mean((1, 2, 3)))}


@pytest.mark.parametrize("as_dict", [pytest.param(True, id="dict_inputs"), pytest.param(False, id="tuple_inputs")])
def test_dict_and_tuple_inputs_and_nested_outputs(tmp_path, as_dict: bool) -> None:
    model = randomize(TwoInputs())

    def inputs(batch: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        image, extra = torch.randn(batch, 3, 10, 10, generator=g), torch.randn(batch, 5, generator=g)
        return {"extra": extra, "image": image} if as_dict else (image, extra)  # a dict in another order than forward's

    report = save_deployables(
        model, inputs(1, 0), tmp_path, batches=[(inputs(4, 1), None), inputs(2, 2) if as_dict else (inputs(2, 2), None)]
    )
    assert report["onnx"]["batch_sizes"] == report["pt2"]["batch_sizes"] == [4, 2]
    assert report["onnx"]["dynamic_batch"] and report["pt2"]["dynamic_batch"]  # a batch of one is widened for tracing
    graph = onnx.load(report["onnx"]["path"]).graph
    assert [v.name for v in graph.input] == ["image", "extra"] and len(graph.output) == 3
    assert all(v.type.tensor_type.shape.dim[0].dim_param for v in [*graph.input, *graph.output])
    again = check_deployed(report["pt2"]["path"], model, [(inputs(3, 3), None)])
    assert again["batches"] == 1 and again["max_relative_error"] <= 1e-5 and again["format"] == "pt2"


def test_a_lightning_module_exports_what_its_forward_computes(tmp_path) -> None:
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = randomize(
                nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).log_softmax(-1)

    module = Module().train()
    report = save_deployables(module, torch.randn(2, 3, 8, 8), tmp_path, batches=[torch.randn(6, 3, 8, 8)])
    assert module.training and module.model[1].training  # exported in eval mode, modes restored
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = module.eval()(x)
    assert relative_error(torch.export.load(report["pt2"]["path"]).module()(x), expected) <= 1e-5
    assert relative_error(OnnxRuntimeModel(report["onnx"]["path"])(x), expected) <= 1e-4


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
        ),
        seed,
    )


def test_save_onnx_and_save_pt2_write_checkable_files(tmp_path) -> None:
    model, x = small_net(0), torch.randn(2, 3, 8, 8)
    onnx_path = save_onnx(model, x, tmp_path / "net.onnx", opset=18)
    pt2_path = save_pt2(model, x, tmp_path / "net.pt2")
    assert onnx.load(onnx_path).opset_import[0].version == 18
    assert check_deployed(onnx_path, model, [torch.randn(9, 3, 8, 8)])["max_relative_error"] <= 1e-4
    single = OnnxRuntimeModel(onnx_path, threads=1)
    assert single.session.get_session_options().intra_op_num_threads == 1
    with torch.no_grad():
        assert relative_error(single(x), model.eval()(x)) <= 1e-4
    assert check_deployed(pt2_path, model, [torch.randn(9, 3, 8, 8)], rtol=0.0)["max_relative_error"] == 0.0
    os.rename(pt2_path, tmp_path / "net.bin")  # format= names a file named otherwise
    assert check_deployed(tmp_path / "net.bin", model, [x], format="pt2")["format"] == "pt2"
    assert sorted(os.listdir(tmp_path)) == ["net.bin", "net.onnx"]


@pytest.mark.parametrize("fmt", DEPLOY_FORMATS)
def test_a_file_checked_against_another_model_fails_naming_the_file(tmp_path, fmt: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    path = (save_onnx if fmt == "onnx" else save_pt2)(small_net(0), x, tmp_path / f"pruned.{fmt}")
    assert check_deployed(path, small_net(0), [x, (x * 2, None)])["batches"] == 2  # the same weights pass
    with pytest.raises(
        VerificationError,
        match=rf"Deployed file '.*pruned\.{fmt}' differs from the model on batch 0: max relative error .*, "
        r"expected at most rtol 0\.0001.*another model",
    ):
        check_deployed(path, small_net(1), [x], rtol=1e-4)


class Noisy(nn.Module):
    """Noise left on at inference: the file's draws cannot match the model's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


@pytest.mark.parametrize("fmt", DEPLOY_FORMATS)
def test_a_file_that_fails_its_check_never_replaces_the_previous_one(tmp_path, fmt: str) -> None:
    (tmp_path / f"pruned.{fmt}").write_bytes(b"previous")
    with pytest.raises(VerificationError, match=rf"Deployed file '.*pruned\.{fmt}' differs from the model on batch 0"):
        save_deployables(Noisy(), torch.randn(2, 4), tmp_path, [fmt])
    assert (tmp_path / f"pruned.{fmt}").read_bytes() == b"previous"
    assert os.listdir(tmp_path) == [f"pruned.{fmt}"]


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:  # a code path chosen by the batch size: export cannot keep the batch symbolic
            return self.linear(x).relu()
        return self.linear(x)


def test_a_model_that_fixes_its_batch_is_exported_static_with_a_warning(tmp_path) -> None:
    model = FixedBatch()
    with pytest.warns(UserWarning, match=r"FixedBatch was exported with a fixed batch size of 4 \(UserError"):
        report = save_deployables(model, torch.randn(4, 8), tmp_path, ["pt2"])
    assert report["pt2"]["dynamic_batch"] is False
    with pytest.raises(
        VerificationError, match=r"'.*pruned\.pt2' failed to run on batch 0 \(batch size 3\).*fixed batch size"
    ):
        check_deployed(report["pt2"]["path"], model, [torch.randn(3, 8)])


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x  # data-dependent Python control flow


@pytest.mark.parametrize("save", [save_onnx, save_pt2], ids=["onnx", "pt2"])
def test_a_model_torch_export_cannot_capture_gets_a_configuration_error(tmp_path, save) -> None:
    with pytest.raises(
        ConfigurationError, match=r"torch\.export could not capture the Branchy on the example input: .*data-dependent"
    ):
        save(Branchy(), torch.randn(2, 4), tmp_path / "x")
    assert os.listdir(tmp_path) == []


class Spectrum(nn.Module):
    """An op torch.export captures and torch's ONNX exporter cannot translate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh(x @ x.mT)


def test_an_op_without_an_onnx_translation_fails_onnx_and_leaves_pt2_possible(tmp_path) -> None:
    x = torch.randn(2, 4, 4)
    with pytest.raises(
        ConfigurationError, match=r"torch's ONNX exporter could not convert the Spectrum: .*formats=\['pt2'\]"
    ):
        save_deployables(Spectrum(), x, tmp_path, ["onnx", "pt2"])
    assert os.listdir(tmp_path) == []
    assert save_deployables(Spectrum(), x, tmp_path, ["pt2"])["pt2"]["max_relative_error"] <= 1e-5


def test_unknown_formats_are_refused_before_anything_is_written(tmp_path) -> None:
    model, x = small_net(0), torch.randn(2, 3, 8, 8)
    with pytest.raises(ConfigurationError, match=r"unknown deploy format 'tflite'; expected some of 'onnx', 'pt2'"):
        save_deployables(model, x, tmp_path, ["pt2", "tflite"])
    with pytest.raises(ConfigurationError, match=r"unknown deploy format \(none given\)"):
        save_deployables(model, x, tmp_path, [])
    assert os.listdir(tmp_path) == []
    path = save_pt2(model, x, tmp_path / "pruned.pt2")
    with pytest.raises(
        ConfigurationError, match=r"Unknown deploy format 'tflite' for '.*pruned\.pt2'; expected one of onnx, pt2"
    ):
        check_deployed(path, model, [x], format="tflite")
    (tmp_path / "model.bin").write_bytes(b"\x08\x07")
    with pytest.raises(ConfigurationError, match=r"Cannot tell the format of '.*model\.bin'.*Pass format='onnx'"):
        check_deployed(tmp_path / "model.bin", model, [x])


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_optional_packages_are_named_with_the_install_hint(tmp_path, monkeypatch, missing: str) -> None:
    model, x = small_net(0), torch.randn(2, 3, 8, 8)
    existing = save_onnx(model, x, tmp_path / "pruned.onnx")
    monkeypatch.setitem(sys.modules, missing, None)  # the import fails as if the package were not installed
    hint = rf"{missing}, which could not be imported\. Install them with: pip install 'lightning-prune\[deploy\]'"
    with pytest.raises(
        ConfigurationError, match=rf"save_deployables\(formats=\['onnx'\]\) needs the optional package {hint}"
    ):
        save_deployables(model, x, tmp_path / "out", ["pt2", "onnx"])
    assert not (tmp_path / "out").exists()
    if missing == "onnxruntime":
        with pytest.raises(
            ConfigurationError, match=rf"check_deployed\('.*pruned\.onnx'\) needs the optional package {hint}"
        ):
            check_deployed(existing, model, [x])
    else:
        with pytest.raises(
            ConfigurationError, match=rf"save_onnx\('.*again\.onnx'\) needs the optional package {hint}"
        ):
            save_onnx(model, x, tmp_path / "again.onnx")
    assert save_deployables(model, x, tmp_path / "pt2_only", ["pt2"])["pt2"]["batches"] == 1  # pt2 needs torch alone


def test_a_failed_write_raises_and_keeps_the_previous_file(tmp_path) -> None:
    """A full disk, as the checkpoint fault test makes one: the writer's file size is capped (RLIMIT_FSIZE)."""
    path = tmp_path / "pruned.pt2"
    path.write_bytes(b"previous")
    script = textwrap.dedent(
        """
        import resource, signal, sys, torch
        from lightning_prune.core.files.deploy import save_pt2
        from lightning_prune.core.errors import CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            save_pt2(torch.nn.Linear(512, 512), torch.randn(2, 512), sys.argv[1])  # a 1 MB file
        except CheckpointError as err:
            print(err)
            sys.exit(3)
        """
    )
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr[-2000:]
    assert re.match(rf"Could not write '{re.escape(str(path))}': .*The previous file, if any, is unchanged", run.stdout)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["pruned.pt2"]
    (tmp_path / "taken").write_bytes(b"a file where the directory should be")
    with pytest.raises(
        CheckpointError, match=r"Could not write '.*taken/pruned\.pt2': .*Pass a directory that can be created"
    ):
        save_deployables(small_net(0), torch.randn(2, 3, 8, 8), tmp_path / "taken", ["pt2"])


def test_bad_batches_and_missing_files(tmp_path) -> None:
    model, x = small_net(0), torch.randn(2, 3, 8, 8)
    path = save_pt2(model, x, tmp_path / "pruned.pt2")
    with pytest.raises(ConfigurationError, match=r"check_deployed\('.*pruned\.pt2'\) got no batches"):
        check_deployed(path, model, [])
    with pytest.raises(
        ConfigurationError,
        match=r"must be \(inputs, target\).*got a tuple of length 3. Wrap a tuple of positional inputs",
    ):
        check_deployed(path, model, [(x, x, x)])
    with pytest.raises(VerificationError, match=r"Deployed file '.*gone\.pt2' does not exist"):
        check_deployed(tmp_path / "gone.pt2", model, [x])
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(VerificationError, match=r"ONNX Runtime could not load '.*broken\.onnx'"):
        check_deployed(tmp_path / "broken.onnx", model, [x])
    with pytest.raises(
        VerificationError, match=r"'.*pruned\.pt2' gives 1 output tensors on batch 0; the model gives 2"
    ):
        check_deployed(path, TwoOutputs(model), [x])


class TwoOutputs(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple:
        y = self.inner(x)
        return y, y


def test_onnx_runtime_latency_is_reported_when_asked(tmp_path) -> None:
    model = small_net(0).train()
    report = save_deployables(model, torch.randn(2, 3, 8, 8), tmp_path, ["onnx"], latency_budget_s=0.5)["onnx"]
    assert {
        "latency_ms",
        "latency_iqr_ms",
        "torch_latency_ms",
        "torch_latency_iqr_ms",
        "latency_within_noise",
    } <= report.keys()
    assert report["latency_ms"] > 0 and report["torch_latency_ms"] > 0 and model.training


def test_layer_norm_keeping_its_divisor_loads_from_the_torchscript_onnx_exporter(tmp_path) -> None:
    """ConvNeXt's channels-first norm becomes a PrunedLayerNorm; torch.onnx's legacy exporter (dynamo=False,
    what many users still call) wrote its movedim as a Transpose with a negative perm ONNX Runtime refused."""
    from torchvision.models.convnext import LayerNorm2d

    model = randomize(nn.Sequential(nn.Conv2d(3, 16, 3), LayerNorm2d(16), nn.Conv2d(16, 4, 1)))
    keep = torch.arange(16) % 2 == 0
    small = export_pruned_model(model, {"0": keep}, images(2, 0), whole_channel=True).eval()
    assert type(small[1]).__name__ == "PrunedLayerNorm"
    path = tmp_path / "legacy.onnx"
    torch.onnx.export(small, (images(1, 0),), str(path), dynamo=False, dynamic_axes={"x": {0: "b"}}, input_names=["x"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(3, 4)
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert relative_error(torch.from_numpy(got), small(x)) <= 1e-5
