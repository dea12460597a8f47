"""The callback on the paths Lightning users take every day, with their own modules and data.

Both Lightning namespaces, loaders given to ``fit`` and DataModules, tensor, tuple and dict
batches, every precision Lightning offers on CPU, a user's own masks and pruners, resuming from a
dense checkpoint, the bare network, a callback reused for a second fit, and errors that are found
before any training step runs.
"""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torch import nn
from user_modules import BATCH_KINDS, CLASSIFIERS, DATAMODULES, NAMESPACES, Images, PLClassifier, loaders, small_mlp

from lightning_prune import ConfigurationError, PruneExportCallback, load_pruned, verify_equivalence

VAL = Images("tuple", 48, seed=1).x


def run(
    tmp_path,
    callback,
    *,
    namespace="pytorch_lightning",
    kind="tuple",
    module=None,
    datamodule=False,
    max_steps=6,
    ckpt_path=None,
    callbacks=(),
    **trainer_kwargs,
):
    lightning = NAMESPACES[namespace]
    lightning.seed_everything(0, verbose=False)
    module = module if module is not None else CLASSIFIERS[namespace](kind)
    trainer_kwargs = {"logger": False, "enable_checkpointing": False, **trainer_kwargs}
    trainer = lightning.Trainer(
        max_steps=max_steps,
        limit_val_batches=2,
        default_root_dir=tmp_path,
        callbacks=[*callbacks, *([callback] if callback else [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    if datamodule:
        trainer.fit(module, datamodule=DATAMODULES[namespace](kind), ckpt_path=ckpt_path)
    else:
        train, val = loaders(kind)
        trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, module


def assert_exact_and_smaller(callback, module) -> None:
    network = callback.exported_network
    assert network is not None and network is callback.exported_model.model
    assert verify_equivalence(module.model.float(), network.float(), VAL.to(next(network.parameters()).device)).passed
    assert sum(p.numel() for p in network.parameters()) < 0.6 * sum(p.numel() for p in module.model.parameters())


@pytest.mark.parametrize("kind", BATCH_KINDS)
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_loaders_passed_to_fit(tmp_path, namespace, kind) -> None:
    """No DataModule, no example_input_array: the example and verification batches come from the loaders."""
    callback = PruneExportCallback(pruner="l1", export_dir=str(tmp_path / "out"))
    _, module = run(tmp_path, callback, namespace=namespace, kind=kind)
    assert_exact_and_smaller(callback, module)
    report = callback.report
    assert report["verified_batches"] == 3 and report["max_relative_error"] <= 1e-5
    assert report["top1_agreement"] == 1.0
    assert ("accuracy_exported" in report) == (kind != "tensor")  # targets only where the batch has labels
    assert os.path.isfile(report["path"])


@pytest.mark.parametrize("kind", BATCH_KINDS)
def test_datamodule_batches(tmp_path, kind) -> None:
    callback = PruneExportCallback(pruner="fpgm", export_dir=str(tmp_path / "out"))
    _, module = run(tmp_path, callback, namespace="lightning.pytorch", kind=kind, datamodule=True)
    assert_exact_and_smaller(callback, module)
    assert callback.report["verified_batches"] == 3


class ForwardX(PLClassifier):
    """forward(x): a dict batch's keys do not name its parameter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class NeverTrains(PLClassifier):
    """A module whose first training step fails the test: errors must come before it."""

    def training_step(self, batch, batch_idx):
        raise AssertionError("a training step ran before the configuration error was found")


class ForwardXNeverTrains(ForwardX, NeverTrains):
    pass


@pytest.mark.parametrize("example_input", [None, "shape", "tensor", "dict"])
def test_dict_batches_with_input_key(tmp_path, example_input) -> None:
    example = {"shape": [1, 3, 8, 8], "tensor": torch.zeros(1, 3, 8, 8), "dict": {"x": torch.zeros(1, 3, 8, 8)}}.get(
        example_input
    )
    callback = PruneExportCallback(pruner="l2", input_key="pixel_values", example_input=example)
    _, module = run(tmp_path, callback, module=ForwardX("dict"), kind="dict")
    assert_exact_and_smaller(callback, module)
    assert callback.report["verified_batches"] == 3 and "accuracy_exported" in callback.report


def test_dict_batch_verified_on_the_example_alone(tmp_path) -> None:
    callback = PruneExportCallback(pruner="l2", example_input=[2, 3, 8, 8], verify_batches=0)
    _, module = run(tmp_path, callback, module=ForwardX("dict"), kind="dict")
    assert_exact_and_smaller(callback, module)
    assert callback.report["verified_batches"] == 1


def test_own_masks_with_the_default_pruner(tmp_path) -> None:
    keep = torch.arange(16) % 4 != 0  # 4 of 16 pruned: not what FPGM at 50% would give
    callback = PruneExportCallback(masks={"model.3": keep})
    _, module = run(tmp_path, callback)
    assert set(callback.masks) == {"model.3"} and torch.equal(callback.masks["model.3"], keep)
    assert callback.exported_network[3].out_channels == 12 and callback.exported_network[0].out_channels == 8


def test_users_nni_pruner_keeps_its_amount(tmp_path) -> None:
    from nni.compression.pruning import L1NormPruner

    module = PLClassifier()
    pruner = L1NormPruner(module.model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.25}])
    callback = PruneExportCallback(pruner=pruner)
    run(tmp_path, callback, module=module)
    network = callback.exported_network
    assert (network[0].out_channels, network[3].out_channels) == (6, 12)  # 25% pruned, not the default 50%
    optimizer_params = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimizer_params for p in module.parameters())  # unwrapped before the optimizer was built


def test_model_pruning_keeps_its_amount(tmp_path) -> None:
    from pytorch_lightning.callbacks import ModelPruning

    module = PLClassifier()
    pruning = ModelPruning(
        "ln_structured",
        amount=0.3,
        parameters_to_prune=[(module.model[3], "weight")],
        pruning_dim=0,
        pruning_norm=1,
        apply_pruning=lambda epoch: epoch == 0,
        use_global_unstructured=False,
        verbose=0,
    )
    callback = PruneExportCallback(pruner=None, prune_on_epoch=1)
    run(tmp_path, callback, module=module, callbacks=[pruning], max_steps=12)
    assert callback.exported_network[3].out_channels == 11  # round(0.3 * 16) = 5 pruned, not 8
    assert not hasattr(module.model[3], "weight_orig")  # the reparametrisation was made permanent


def l1_top_half(weight: torch.Tensor) -> set[int]:
    norms = weight.flatten(1).abs().sum(1)
    return set(norms.argsort(descending=True)[: len(norms) // 2].tolist())


def test_resume_from_a_dense_checkpoint_ranks_the_trained_weights(tmp_path) -> None:
    dense_trainer, _ = run(tmp_path / "dense", None, max_steps=12)  # trained without the callback
    dense_trainer.save_checkpoint(tmp_path / "dense.ckpt")
    trained = torch.load(tmp_path / "dense.ckpt", weights_only=False)["state_dict"]["model.0.weight"]
    fresh = PLClassifier()
    assert l1_top_half(trained) != l1_top_half(fresh.model[0].weight.detach())  # the test can tell them apart
    callback = PruneExportCallback(pruner="l1", round_to=1, export_dir=str(tmp_path / "out"))  # 8 channels: prune them
    run(tmp_path / "resumed", callback, module=fresh, ckpt_path=str(tmp_path / "dense.ckpt"), max_steps=18)
    kept = set(callback.masks["model.0"].nonzero().flatten().tolist())
    assert kept == l1_top_half(trained)


def test_resume_from_a_checkpoint_taken_before_pruning(tmp_path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    first = PruneExportCallback(pruner="fpgm", prune_on_epoch=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    run(tmp_path / "a", first, max_steps=18, callbacks=[checkpoint], enable_checkpointing=True)
    before = str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt")
    assert torch.load(before, weights_only=False)["callbacks"][first.state_key]["masks"] is None
    resumed = PruneExportCallback(pruner="fpgm", prune_on_epoch=2)
    _, module = run(tmp_path / "b", resumed, max_steps=18, ckpt_path=before)
    assert_exact_and_smaller(resumed, module)


@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-mixed", "bf16-true", "16-true", "16-mixed"])
def test_precisions(tmp_path, precision) -> None:
    callback = PruneExportCallback(pruner="l1")
    _, module = run(tmp_path, callback, precision=precision)
    trained = next(module.parameters()).dtype
    network = callback.exported_network
    assert next(network.parameters()).dtype == trained  # the export keeps the training precision
    expected = {torch.float64: "float64"}.get(trained, "float32")  # half precisions are verified in float32
    assert callback.report["verified_dtype"] == expected and callback.report["max_relative_error"] <= 1e-5
    reloaded = load_pruned(callback.report["path"], small_cnn_like(trained))
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), network.state_dict().values(), strict=True)
    )


def small_cnn_like(dtype: torch.dtype) -> nn.Module:
    return PLClassifier().model.to(dtype)


def test_the_bare_network_loads_from_the_checkpoint(tmp_path) -> None:
    module = PLClassifier(network=torchvision.models.resnet18(num_classes=4))
    callback = PruneExportCallback(pruner="l1", export_dir=str(tmp_path / "out"))
    run(tmp_path, callback, module=module, max_steps=2)
    assert callback.report["network_prefix"] == "model"
    network = load_pruned(tmp_path / "out" / "pruned.ckpt", torchvision.models.resnet18(num_classes=4)).eval()
    whole = load_pruned(
        tmp_path / "out" / "pruned.ckpt", PLClassifier(network=torchvision.models.resnet18(num_classes=4))
    ).eval()
    with torch.no_grad():
        expected = callback.exported_network.eval()(VAL)
        assert torch.equal(network(VAL), expected) and torch.equal(whole(VAL), expected)


def test_one_callback_two_fits(tmp_path) -> None:
    callback = PruneExportCallback(pruner="l1")
    run(tmp_path / "a", callback, module=PLClassifier(width=8))
    first_masks = dict(callback.masks)
    _, wider = run(tmp_path / "b", callback, module=PLClassifier(width=16))  # another model: starts afresh
    assert callback.masks["model.0"].numel() == 16
    assert_exact_and_smaller(callback, wider)
    again = PLClassifier(width=8)
    run(tmp_path / "c", callback, module=again)
    masks = dict(callback.masks)
    run(tmp_path / "d", callback, module=again)  # the same model again: it goes on with its masks
    assert all(torch.equal(masks[k], callback.masks[k]) for k in masks) and first_masks.keys() == masks.keys()
    assert_exact_and_smaller(callback, again)


def tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )


@pytest.mark.parametrize(
    ("kwargs", "module", "kind", "error"),
    [
        pytest.param(
            {"export_dir": "{tmp}/file/sub"},
            None,
            "tuple",
            r"export_dir='.*file/sub'\)` cannot be written: (NotADirectoryError|FileExistsError)",
            id="export_dir_under_a_file",
        ),
        pytest.param(
            {"config_list": [{"op_names": ["model.99"], "sparse_ratio": 0.5}]},
            None,
            "tuple",
            r"`config_list` names layer 'model\.99' \(op_names\), which the model does not have\. Did you mean 'model\.8'",
            id="config_list_missing_layer",
        ),
        pytest.param(
            {"op_names": ["net.99"]},
            None,
            "tuple",
            r"names layer 'net\.99' \(op_names\), which the model does not have",
            id="op_names_missing_layer",
        ),
        pytest.param(
            {"op_types": ["Conv3d"]},
            None,
            "tuple",
            r"selects no layer of the model, so nothing would be pruned\. The model's prunable layer types are \['Conv2d', 'Linear'\]",
            id="op_types_matching_nothing",
        ),
        pytest.param(
            {},
            "mlp",
            "tuple",
            r"selects no layer .* prunable layer types are \['Linear'\]\. HINT: set `op_types` \(e\.g\. \['Linear'\]\)",
            id="mlp_with_default_op_types",
        ),
        pytest.param(
            {},
            "vit",
            "tuple",
            r"nothing to prune\. The fpgm pruner chose layers \['model\.conv_proj'\]",
            id="vit_with_default_op_types",
        ),
        pytest.param(
            {},
            "forward_x",
            "dict",
            r"Cannot tell the model input in a dict batch with keys \['labels', 'pixel_values'\]: the model's forward takes \(x\)\. Set `input_key=`",
            id="dict_batch_unmatched",
        ),
        pytest.param(
            {"masks": {"model.9": torch.ones(4, dtype=torch.bool)}},
            None,
            "tuple",
            r"`PruneExportCallback\(masks=\.\.\.\)` does not fit the model: Mask given for layer 'model\.9'",
            id="masks_for_a_missing_layer",
        ),
        pytest.param(
            {"inplace_dict": {"model.3": ("model.30",)}},
            None,
            "tuple",
            r"inplace_dict=\.\.\.\)` does not fit the model: .*\n  inplace_dict\['model\.3'\] names 'model\.30', which is not a layer",
            id="inplace_dict_unknown_layer",
        ),
        pytest.param(
            {"inplace_dict": {"model.3": ("model.8",), "model.8": ("model.0",)}},
            None,
            "tuple",
            r"(?s)inplace_dict has 2 wrong entries, all listed.*\['model\.3'\] = \('model\.8',\) disagrees.*"
            r"\['model\.8'\] = \('model\.0',\) disagrees.*Corrected entries:\n  'model\.3': \('model\.0',\),\n  'model\.8': \('model\.3',\),",
            id="inplace_dict_disagrees_with_the_graph",
        ),
    ],
)
def test_configuration_errors_come_before_training(tmp_path, kwargs, module, kind, error) -> None:
    (tmp_path / "file").write_text("a file, not a directory")
    kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
    network = {"mlp": small_mlp, "vit": tiny_vit}.get(module, lambda: None)()
    user_module = (ForwardXNeverTrains if module == "forward_x" else NeverTrains)(kind, network=network)
    with pytest.raises(ConfigurationError, match=error):
        run(tmp_path, PruneExportCallback(**kwargs), module=user_module, kind=kind)
    assert not os.path.exists(tmp_path / "pruned" / "masked.ckpt")


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".tmp-elsewhere-1-0123456789abcdef.part"  # another host's writer, long gone
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    callback = PruneExportCallback(pruner="l1", export_dir=str(out))
    run(tmp_path, callback)
    assert sorted(os.listdir(out)) == ["masked.ckpt", "pruned.ckpt"]


def test_the_core_imports_without_lightning() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lightning_prune; from lightning_prune import export_pruned_model, load_pruned; "
        "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'torchmetrics', 'nni') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_deployable_files_and_speed_in_the_report(tmp_path) -> None:
    import onnxruntime

    callback = PruneExportCallback(
        pruner="l1", deploy_formats=["onnx", "pt2"], whole_channel=True, round_to=4, export_dir=str(tmp_path / "out")
    )
    _, module = run(tmp_path, callback, module=PLClassifier(width=16))
    report = callback.report
    assert sorted(os.listdir(tmp_path / "out")) == ["masked.ckpt", "pruned.ckpt", "pruned.onnx", "pruned.pt2"]
    assert (
        report["deploy"]["onnx"]["max_relative_error"] <= 1e-4 and report["deploy"]["pt2"]["max_relative_error"] <= 1e-5
    )
    assert {"latency_b1_dense_ms", "latency_b16_exported_iqr_ms", "latency_b16_per_mac"} <= set(report)
    assert report["function_change"] <= 1e-6  # the mask hold had zeroed the whole channels already
    network = callback.exported_network
    assert [network[0].out_channels, network[3].out_channels] == [8, 16]  # 50% of 16 and 32: multiples of 4
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "pruned.onnx"))
    name = session.get_inputs()[0].name
    with torch.no_grad():
        expected = callback.exported_model.eval()(VAL[:5]).numpy()
    got = session.run(None, {name: VAL[:5].numpy()})[0]
    assert abs(got - expected).max() <= 1e-4 * abs(expected).max()


def test_a_report_without_latency_has_the_sizes_and_the_errors(tmp_path) -> None:
    callback = PruneExportCallback(pruner="l1", measure_latency=False, export_dir=str(tmp_path / "out"))
    run(tmp_path, callback, module=PLClassifier(width=16))
    report = callback.report
    assert not [key for key in report if key.startswith("latency_")]
    assert report["params_exported"] < report["params_dense"] and report["macs_exported"] < report["macs_dense"]
    assert report["max_relative_error"] <= 1e-5
