"""A real Lightning run for the distributed tests: `python tests/ddp_run.py OUT DEVICES [FLAGS]`.

Prunes DigitsCNN with FPGM at fit start, fine-tunes a few steps (DDP on CPU with gloo when
DEVICES is 2), exports and verifies. Flags:

- `fail`: a user's shrink function that raises makes rank zero's export fail;
- `fullwrite`: rank zero's files are capped at 4 kB (RLIMIT_FSIZE, as on a full disk) just
  before the masked checkpoint is written;
- `gather`: export through the gathered full state (the sharded strategies' path);
- `spawn`: `ddp_spawn`; the launching process then records what its own callback holds.
- `recovery`: Taylor importance on a gradual schedule (two steps, epochs 1 and 2) with
  distillation; each rank records whether it holds the teacher.
- `activation`: activation importance at fit start, on 2 calibration batches per process; each rank
  records the positions and the summed squares it ranked with (the ranks' sums added) and its masks.
  With `late`, it prunes at epoch 2 instead, on the training steps of epochs 0 and 1; `stop` ends the
  run after epoch 0 with a checkpoint in OUT/ckpt, `resume` goes on from it.

On a PruneExportError each rank records it in OUT/error-rank<N>.txt and exits non-zero.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import warnings

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from helpers import ScoreSpy  # tests/ is this script's own folder
from torch.utils.data import DataLoader, DistributedSampler

from lightning_prune import PruneExportCallback, PruneExportError, register_shrinker
from lightning_prune.lightning.demo import DigitsCNN, DigitsDataModule


class InOrder(DigitsDataModule):
    """Batches in order: with two ranks, rank r takes samples r, r + 2, ...; together one step sees
    what a single process sees (Lightning's own distributed sampler would shuffle)."""

    def train_dataloader(self) -> DataLoader:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sampler = DistributedSampler(self.train_set, shuffle=False)
            return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=False)


def broken_shrink(module: torch.nn.Module, change: object) -> torch.nn.Module:
    raise RuntimeError("the user's shrink function failed")


class FullDisk(pl.Callback):
    """From the end of training on, rank zero cannot write more than 4 kB to a file."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, resource.RLIM_INFINITY))


class StopAfterFirstEpoch(pl.callbacks.ModelCheckpoint):
    """A checkpoint in OUT/ckpt after epoch 0, and the run stops there (an interruption)."""

    def __init__(self, out: str) -> None:
        super().__init__(dirpath=os.path.join(out, "ckpt"), save_last=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        trainer.should_stop = True


def main(out: str, devices: int, flags: list[str]) -> None:
    fail, gather, spawn = "fail" in flags, "gather" in flags, "spawn" in flags
    warnings.filterwarnings("ignore")
    if fail:  # only export calls shrink functions: rank zero fails after fine-tuning
        register_shrinker(torch.nn.Linear)(broken_shrink)
    pl.seed_everything(0, verbose=False)
    recovery = "recovery" in flags
    gradual = {"pruner": "taylor", "schedule": {"start_epoch": 1, "end_epoch": 2, "steps": 2}, "distill": True}
    activation, late, stop, resume = ("activation" in flags, "late" in flags, "stop" in flags, "resume" in flags)
    pruner = {"pruner": "activation", "calibration_batches": 2} if activation else {"pruner": "fpgm"}
    if late:
        pruner = {"pruner": "activation", "prune_on_epoch": 2}
    callback = (ScoreSpy if activation else PruneExportCallback)(
        **(gradual if recovery else pruner),
        export_dir=os.path.join(out, "export"),
        gather_full_state=gather,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=("ddp_spawn" if spawn else "ddp") if devices > 1 else "auto",
        **({"max_epochs": 3, "limit_train_batches": 2} if recovery or late else {"max_steps": 4}),
        limit_val_batches=1,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=stop,
        default_root_dir=out,
        callbacks=[FullDisk(), callback]
        if "fullwrite" in flags
        else [callback, *([StopAfterFirstEpoch(out)] if stop else [])],
    )
    try:  # the same global batch of 64 in both layouts: 64 on one process, 32 on each of two
        trainer.fit(
            DigitsCNN(width=8, lr=0.05, batch_norm=False),
            datamodule=InOrder(batch_size=64 // devices),
            ckpt_path=os.path.join(out, "ckpt", "last.ckpt") if resume else None,
        )
    except PruneExportError as err:
        with open(os.path.join(out, f"error-rank{trainer.global_rank}.txt"), "w") as handle:
            handle.write(str(err))
        raise
    if stop:  # interrupted before the pruning step: nothing exported
        return
    name = "main" if spawn else f"rank{trainer.global_rank}"  # under ddp_spawn this is the launching process
    with open(os.path.join(out, f"report-{name}.txt"), "w") as handle:
        handle.write(f"{callback.report['params_exported']} {callback.report['path']}")
    if recovery:
        with open(os.path.join(out, f"teacher-{name}.txt"), "w") as handle:
            handle.write(str(callback._distiller.teacher is not None))
    if activation:
        with open(os.path.join(out, f"activation-{name}.json"), "w") as handle:
            masks = {k: v.int().tolist() for k, v in callback.masks.items()}
            sums = {layer: float(total.sum()) for layer, total in callback.sums.items()}
            json.dump({"counts": callback.seen[-1][1], "sums": sums, "masks": masks}, handle)
    if spawn:
        torch.save(callback.exported_network.state_dict(), os.path.join(out, "exported-network-main.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
