"""On a machine with a CUDA GPU: the quickstart's fine-tune-then-export on the GPU, checked.

    python benchmarks/gpu_check.py

Trains DigitsCNN on the GPU, prunes 50% with FPGM, fine-tunes masked, exports and verifies; then
checks that the exported model's parameters and the verification ran on the GPU, and that the
GPU export matches the masked model and reloads from the checkpoint to the same outputs.
Exits 2 with a message where no CUDA device is present.
"""

from __future__ import annotations

import sys
import tempfile
import warnings

import pytorch_lightning as pl
import torch

from lightning_prune import PruneExportCallback, load_pruned_module, verify_equivalence
from lightning_prune.callback import format_report
from lightning_prune.demo import DigitsCNN, DigitsDataModule


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device on this machine: nothing to check")
        return 2
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    callback = PruneExportCallback(pruner="fpgm", sparsity=0.5, prune_on_epoch=4)
    trainer = pl.Trainer(accelerator="cuda", devices=1, max_epochs=8, default_root_dir=tempfile.mkdtemp(),
                         callbacks=[callback], logger=False, enable_progress_bar=False, enable_checkpointing=False)
    module = DigitsCNN()
    data = DigitsDataModule()
    trainer.fit(module, datamodule=data)
    report, small = callback.report, callback.exported_model
    images = next(iter(data.val_dataloader()))[0].cuda()
    on_gpu = next(small.parameters()).is_cuda and report["device"].startswith("cuda")
    same = verify_equivalence(module.cuda().eval(), small, images).passed
    reloaded = load_pruned_module(report["path"], DigitsCNN).cuda().eval()
    with torch.no_grad():
        reload_equal = torch.equal(reloaded(images), small(images))
    print(torch.cuda.get_device_name(0))
    print(format_report(report))
    print(f"export and verification on the GPU: {on_gpu}; GPU export == masked: {same}; reload equal: {reload_equal}")
    return 0 if on_gpu and same and reload_equal else 1


if __name__ == "__main__":
    sys.exit(main())
