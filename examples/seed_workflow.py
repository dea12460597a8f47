"""The seed's own workflow, automated: your NNI FPGMPruner plus a hand-written inplace_dict.

The seed page builds an FPGMPruner over the layers to prune, then writes an inplace_dict naming
which layer feeds which. Here the dict is generated from one forward pass, printed for review
(edit it as the seed advises), and handed to the callback with the pruner; the callback checks
the dict against the traced graph, fine-tunes with the masks held, exports and verifies.

    python examples/seed_workflow.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import pytorch_lightning as pl
import torch

from lightning_prune import PruneExportCallback, format_inplace_dict, infer_inplace_dict
from lightning_prune.lightning.demo import DigitsCNN, DigitsDataModule


def main(root: str) -> dict:
    from nni.compression.pruning import FPGMPruner

    pl.seed_everything(0, verbose=False)
    module = DigitsCNN()
    # the seed's config_list, NNI 2.x style ("sparsity" is accepted for "sparse_ratio")
    config_list = [{"sparsity": 0.5, "op_types": ["Conv2d"], "op_names": ["0", "3", "7"]}]
    pruner = FPGMPruner(module.net, config_list)

    inplace_dict = infer_inplace_dict(module, module.example_input_array)
    print(format_inplace_dict(inplace_dict))  # review and edit, as the seed recommends

    callback = PruneExportCallback(pruner=pruner, inplace_dict=inplace_dict)
    trainer = pl.Trainer(
        max_epochs=3,
        default_root_dir=root,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=DigitsDataModule())
    small = callback.exported_model
    print(small.net)
    print(
        f"params {callback.report['params_dense']:,} -> {callback.report['params_exported']:,}, "
        f"max relative error {callback.report['max_relative_error']:.1e}"
    )
    assert small.net[3].out_channels < 64 and callback.report["max_relative_error"] <= 1e-5
    assert not any(hasattr(m, "_nni_wrapper") for m in module.modules()), "the pruner's wrappers were removed"
    return callback.report


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(), "lightning-prune-seed"))
