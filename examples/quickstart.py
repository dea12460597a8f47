"""Quickstart: train a small CNN on scikit-learn's shipped digits, prune 50% of its channels with
FPGM (scored over coupled groups), fine-tune with the masks held, export a physically smaller model, verify it
computes what the masked model computes, save it, and reload it from the compressed checkpoint.

    python examples/quickstart.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import pytorch_lightning as pl
import torch

from lightning_prune import PruneExportCallback, load_pruned_module
from lightning_prune.lightning.demo import DigitsCNN, DigitsDataModule


def main(root: str) -> dict:
    pl.seed_everything(0, verbose=False)
    callback = PruneExportCallback(pruner="fpgm", sparsity=0.5, prune_on_epoch=6)
    trainer = pl.Trainer(
        max_epochs=12,
        accelerator="auto",
        devices=1,
        default_root_dir=root,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=pl.loggers.CSVLogger(root, name="quickstart"),
    )
    data = DigitsDataModule()
    trainer.fit(DigitsCNN(), datamodule=data)
    report = callback.report

    # Reload the small model from the weights-only checkpoint and check it against the export.
    reloaded = load_pruned_module(report["path"], DigitsCNN).to(callback.exported_model.device).eval()
    images = next(iter(data.val_dataloader()))[0].to(callback.exported_model.device)
    with torch.no_grad():
        assert torch.equal(reloaded(images), callback.exported_model(images)), "reloaded model differs"
    fewer = 1 - report["params_exported"] / report["params_dense"]
    print(
        f"\n{fewer:.0%} fewer parameters; held-out accuracy masked {report['accuracy_masked']:.4f}, "
        f"exported {report['accuracy_exported']:.4f}; checkpoint: {report['path']}"
    )
    assert fewer >= 0.4 and report["accuracy_masked"] == report["accuracy_exported"]
    return report


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(), "lightning-prune-quickstart"))
