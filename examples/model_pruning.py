"""Lightning's ModelPruning (structured L1 on conv filters) followed by this callback.

ModelPruning zeroes filters but never shrinks a layer; its checkpoints stay full size. Here it
prunes after the first epoch; PruneExportCallback (pruner=None) then picks the masks up from the
``torch.nn.utils.prune`` buffers, holds them through fine-tuning, and exports a smaller model.

    python examples/model_pruning.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelPruning

from lightning_prune import PruneExportCallback
from lightning_prune.lightning.demo import DigitsCNN, DigitsDataModule


def main(root: str) -> dict:
    pl.seed_everything(0, verbose=False)
    module = DigitsCNN()
    convs = [(module.net[i], "weight") for i in (0, 3, 7)]
    pruning = ModelPruning(
        pruning_fn="ln_structured",
        amount=0.5,
        parameters_to_prune=convs,
        pruning_dim=0,
        pruning_norm=1,
        apply_pruning=lambda epoch: epoch == 0,
        use_global_unstructured=False,
        verbose=0,
    )
    callback = PruneExportCallback(pruner=None, prune_on_epoch=1, group_consistent=False)
    trainer = pl.Trainer(
        max_epochs=3,
        default_root_dir=root,
        callbacks=[pruning, callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=DigitsDataModule())
    print(callback.exported_model.net)
    print(f"params {callback.report['params_dense']:,} -> {callback.report['params_exported']:,}")
    assert callback.report["params_exported"] < 0.6 * callback.report["params_dense"]
    return callback.report


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(), "lightning-prune-model-pruning"))
