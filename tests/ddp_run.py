"""A real Lightning run for the distributed tests: `python tests/ddp_run.py OUT DEVICES [fail]`.

Prunes DigitsCNN with FPGM at fit start, fine-tunes a few steps (DDP on CPU with gloo when
DEVICES is 2), exports and verifies. With `fail`, a disagreeing inplace_dict makes rank zero's
export fail; each rank then records the error it got in OUT/error-rank<N>.txt and exits non-zero.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from lightning_prune import PruneExportCallback, PruneExportError
from lightning_prune.demo import DigitsCNN, DigitsDataModule


class InOrder(DigitsDataModule):
    """Batches in order: with two ranks, rank r takes samples r, r + 2, ...; together one step sees
    what a single process sees (Lightning's own distributed sampler would shuffle)."""

    def train_dataloader(self) -> DataLoader:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sampler = DistributedSampler(self.train_set, shuffle=False)
            return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=False)


def main(out: str, devices: int, fail: bool, gather: bool) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    callback = PruneExportCallback(
        pruner="fpgm", export_dir=os.path.join(out, "export"), gather_full_state=gather,
        inplace_dict={"net.3": ("net.7",)} if fail else "auto",
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_steps=4, limit_val_batches=1, use_distributed_sampler=False, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=out, callbacks=[callback],
    )
    try:  # the same global batch of 64 in both layouts: 64 on one process, 32 on each of two
        trainer.fit(DigitsCNN(width=8, lr=0.05, batch_norm=False), datamodule=InOrder(batch_size=64 // devices))
    except PruneExportError as err:
        with open(os.path.join(out, f"error-rank{trainer.global_rank}.txt"), "w") as handle:
            handle.write(str(err))
        raise
    with open(os.path.join(out, f"report-rank{trainer.global_rank}.txt"), "w") as handle:
        handle.write(f"{callback.report['params_exported']} {callback.report['path']}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "fail" in sys.argv[3:], "gather" in sys.argv[3:])
