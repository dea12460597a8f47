"""PruneExportCallback in real Trainer runs: prune, hold, export, verify, save, log, resume, CLI."""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_prune import (
    CheckpointError,
    PruneExportCallback,
    PruneExportError,
    load_pruned,
    load_pruned_module,
    register_shrinker,
    verify_equivalence,
)
from lightning_prune.lightning.demo import DigitsCNN, DigitsDataModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fit(
    tmp_path,
    callback,
    module=None,
    logger=False,
    max_epochs=2,
    ckpt_path=None,
    extra_callbacks=(),
    shuffle=True,
    **kwargs,
):
    pl.seed_everything(0, verbose=False)
    module = module or DigitsCNN(width=8)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=[*extra_callbacks, callback],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(extra_callbacks),
        **kwargs,
    )
    trainer.fit(module, datamodule=DigitsDataModule(shuffle=shuffle), ckpt_path=ckpt_path)
    return trainer, module


def val_images():
    data = DigitsDataModule()
    data.setup()
    return next(iter(data.val_dataloader()))[0]


def test_pruner_by_name_exports_exact_smaller_model(tmp_path) -> None:
    callback = PruneExportCallback(pruner="fpgm", sparsity=0.5, export_dir=str(tmp_path / "out"))
    _, module = fit(tmp_path, callback)
    images = val_images()
    assert verify_equivalence(module, callback.exported_model, images).passed
    report = callback.report
    assert report["params_exported"] < 0.5 * report["params_dense"]
    assert report["top1_agreement"] == 1.0 and report["accuracy_masked"] == report["accuracy_exported"]
    assert os.path.isfile(tmp_path / "out" / "masked.ckpt") and os.path.isfile(tmp_path / "out" / "pruned.ckpt")
    reloaded = load_pruned(tmp_path / "out" / "pruned.ckpt", DigitsCNN(width=8)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images), callback.exported_model(images))
    from_class = load_pruned_module(tmp_path / "out" / "pruned.ckpt", DigitsCNN).eval()
    with torch.no_grad():
        assert torch.equal(from_class(images), callback.exported_model(images))
    payload = torch.load(tmp_path / "out" / "pruned.ckpt", weights_only=True)
    # a named pruner rounds to multiples of 8 by default: the 8-channel first conv stays whole, 16 -> 8
    assert payload["hyper_parameters"]["width"] == 8 and set(payload["masks"]) == {"net.3", "net.7"}
    small = callback.exported_model
    assert (small.net[0].out_channels, small.net[3].out_channels, small.net[7].out_channels) == (8, 8, 8)


def test_round_to_one_prunes_narrow_layers_too(tmp_path) -> None:
    callback = PruneExportCallback(pruner="fpgm", sparsity=0.5, round_to=1)
    fit(tmp_path, callback)
    assert set(callback.masks) == {"net.0", "net.3", "net.7"}
    assert callback.exported_model.net[0].out_channels == 4


def test_masks_hold_whole_channels_through_finetuning(tmp_path) -> None:
    callback = PruneExportCallback(pruner="l1", sparsity=0.5)
    _, module = fit(tmp_path, callback)
    keys = set(DigitsCNN(width=8).state_dict())
    assert set(module.state_dict()) == keys  # no wrapper names
    for layer, keep in callback.masks.items():
        conv = module.get_submodule(layer)
        assert conv.weight[~keep].abs().sum() == 0
        batch_norm = module.net[int(layer.split(".")[1]) + 1]
        assert batch_norm.weight[~keep].abs().sum() == 0 and batch_norm.bias[~keep].abs().sum() == 0
        assert conv.weight[keep].abs().sum() > 0


def test_users_nni_pruner_object(tmp_path) -> None:
    from nni.compression.pruning import FPGMPruner

    module = DigitsCNN(width=8)
    pruner = FPGMPruner(module.net, [{"sparsity": 0.5, "op_types": ["Conv2d"], "op_names": ["0", "3"]}])
    callback = PruneExportCallback(pruner=pruner)
    fit(tmp_path, callback, module=module)
    assert set(callback.masks) == {"net.0", "net.3"}
    assert callback.exported_model.net[0].out_channels == 4 and callback.exported_model.net[3].out_channels == 8
    assert not any(hasattr(m, "_nni_wrapper") for m in module.modules())


def test_masks_from_a_file(tmp_path) -> None:
    keep = {"net.3": torch.arange(16) % 2 == 0}
    torch.save(keep, tmp_path / "masks.pt")
    callback = PruneExportCallback(pruner=None, masks=str(tmp_path / "masks.pt"))
    fit(tmp_path, callback)
    assert callback.exported_model.net[3].out_channels == 8
    assert torch.equal(callback.masks["net.3"], keep["net.3"])


def test_resume_gives_the_same_export(tmp_path) -> None:
    straight = PruneExportCallback(pruner="fpgm", export_dir=str(tmp_path / "a"))
    fit(tmp_path / "a", straight, max_epochs=3, shuffle=False)  # a fixed batch order: resuming cannot replay shuffles
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    first = PruneExportCallback(pruner="fpgm", export_dir=str(tmp_path / "b"))
    fit(tmp_path / "b", first, max_epochs=2, extra_callbacks=[checkpoint], shuffle=False)
    middle = sorted(glob.glob(str(tmp_path / "ckpt" / "epoch=0*.ckpt")))[0]
    resumed = PruneExportCallback(pruner="fpgm", export_dir=str(tmp_path / "c"))
    fit(
        tmp_path / "c",
        resumed,
        max_epochs=3,
        ckpt_path=middle,
        extra_callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
        shuffle=False,
    )
    assert all(torch.equal(straight.masks[k], resumed.masks[k]) for k in straight.masks)
    a, b = straight.exported_model.state_dict(), resumed.exported_model.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


class BrokenShrinkConv(torch.nn.Conv2d):
    """A user's own layer whose registered shrink function fails: export fails after fine-tuning."""


@register_shrinker(BrokenShrinkConv)
def _broken_shrink(module, change):
    raise RuntimeError("the user's shrink function failed")


def broken_module() -> DigitsCNN:
    module = DigitsCNN(width=8)
    old = module.net[3]
    module.net[3] = BrokenShrinkConv(old.in_channels, old.out_channels, 3, padding=1, bias=False)
    return module


def test_failed_export_raises_clearly_and_keeps_the_masked_checkpoint(tmp_path) -> None:
    callback = PruneExportCallback(pruner="fpgm", round_to=1, export_dir=str(tmp_path / "out"))
    with pytest.raises(
        PruneExportError,
        match=r"RuntimeError: the user's shrink function failed The masked checkpoint is kept at '.*masked\.ckpt'",
    ):
        fit(tmp_path, callback, module=broken_module())
    masked = torch.load(tmp_path / "out" / "masked.ckpt", weights_only=False)
    conv = masked["state_dict"]["net.0.weight"]
    assert (conv.flatten(1).abs().sum(1) == 0).sum() == 4  # the fine-tuned masked weights are there
    assert not os.path.exists(tmp_path / "out" / "pruned.ckpt")


def test_on_failure_warn_does_not_raise(tmp_path) -> None:
    callback = PruneExportCallback(pruner="fpgm", on_failure="warn")
    with pytest.warns(UserWarning, match="export failed: RuntimeError: the user's shrink function failed"):
        fit(tmp_path, callback, module=broken_module())
    assert callback.exported_model is None


def test_metrics_reach_csv_and_tensorboard(tmp_path) -> None:
    csv_logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    tb_logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    callback = PruneExportCallback(pruner="fpgm")
    fit(tmp_path, callback, logger=[csv_logger, tb_logger])
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as handle:
        rows = list(csv.DictReader(handle))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("prune/") and v}
    assert logged["prune/params_exported"] == callback.report["params_exported"]
    assert logged["prune/max_relative_error"] <= 1e-5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb_logger.log_dir)
    events.Reload()
    assert "prune/params_exported" in events.Tags()["scalars"]
    assert events.Scalars("prune/params_dense")[-1].value == callback.report["params_dense"]


def test_yaml_config_through_the_command(tmp_path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"""
seed_everything: 0
trainer:
  max_epochs: 2
  limit_train_batches: 4
  limit_val_batches: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_prune.PruneExportCallback
      init_args: {{pruner: l2, sparsity: 0.5, export_dir: {tmp_path / "out"}}}
model:
  class_path: lightning_prune.lightning.demo.DigitsCNN
  init_args: {{width: 8}}
data:
  class_path: lightning_prune.lightning.demo.DigitsDataModule
""")
    command = os.path.join(os.path.dirname(sys.executable), "lightning-prune")
    result = subprocess.run([command, "fit", "--config", str(config)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    small = load_pruned(tmp_path / "out" / "pruned.ckpt", DigitsCNN(width=8))
    assert small.net[3].out_channels == 8


@pytest.mark.parametrize("script", ["quickstart", "seed_workflow", "model_pruning"])
def test_examples_run(script, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", f"{script}.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_checkpoint_for_another_architecture(tmp_path) -> None:
    callback = PruneExportCallback(pruner="fpgm", export_dir=str(tmp_path / "out"))
    fit(tmp_path, callback)
    with pytest.raises(
        CheckpointError,
        match=r"pruned\.ckpt' was made from a model whose 'net\.3\.weight' has 16 entries along dim 0; this model's has 32",
    ):
        load_pruned(tmp_path / "out" / "pruned.ckpt", DigitsCNN(width=16))


@pytest.mark.parametrize("config", ["resnet18", "mobilenet_v2"])
def test_recipe_configs_parse_and_run_one_step(config, tmp_path) -> None:
    """The shipped recipes run as written, shortened to a few steps."""
    from lightning_prune.lightning.cli import main

    main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", f"{config}.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks.init_args.prune_on_epoch=0",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert os.path.isfile(tmp_path / "pruned" / "pruned.ckpt")
