"""The seed's own workflow, automated: your NNI FPGMPruner plus a hand-written inplace_dict.

The seed page builds an FPGMPruner over the layers to prune, then writes an inplace_dict naming
which layer feeds which. Here the dict is generated from one forward pass, printed for review
(edit it as the seed advises), and handed to the callback with the pruner; the callback checks
the dict against the traced graph, fine-tunes with the masks held, exports and verifies.

Without Lightning (`core_workflow`), NNI's masks zero only the filters: the BatchNorm after each
pruned filter still adds its shift, a constant that a zero-padded conv cannot absorb, so an
exact export keeps those channels. `whole_channel=True` zeroes the whole channel first (filter,
bias, the norm it feeds): the export is as small as the masks say, and `function_change` says
how much that changed the model (fine-tune afterwards, as the callback does, to win it back).

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


def core_workflow() -> None:
    from nni.compression.pruning import FPGMPruner

    from lightning_prune import export
    from lightning_prune.core.verify.report import count_params as count

    module = DigitsCNN()
    with torch.no_grad():  # a trained network's norms: shifts and scales that are not the defaults
        for norm in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.uniform_(-0.5, 0.5)
    pruner = FPGMPruner(module.net, [{"sparse_ratio": 0.5, "op_types": ["Conv2d"]}])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    example = module.example_input_array
    exact = export(module, {f"net.{k}": v for k, v in masks.items()}, example)
    whole = export(module, {f"net.{k}": v for k, v in masks.items()}, example, whole_channel=True)
    print(f"NNI masks as given: {count(module):,} -> {count(exact.model):,} params (exact)")
    print(
        f"whole_channel=True: {count(module):,} -> {count(whole.model):,} params, "
        f"function change {whole.function_change:.2e} (relative)"
    )
    assert count(whole.model) < count(exact.model)


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
    core_workflow()
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(), "lightning-prune-seed"))
