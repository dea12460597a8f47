"""A real DDP run of `finetune="pruned"`: `python tests/ddp_pruned_run.py OUT [FLAGS]`.

DigitsCNN (width 8) trains dense for epoch 0, is pruned with FPGM at its end and shrunk, then
fine-tunes at the pruned size for epochs 1 and 2 (two steps each), with a checkpoint every epoch
in OUT/ckpt. Each rank records its network right after the shrink (OUT/shrink-rank<N>.pt) and at
the end of training (OUT/end-rank<N>.pt), with its parameter count, whether it is inside a DDP
wrapper and whether the optimizer holds its own parameters; rank zero saves the callback's exported network
(OUT/exported-rank0.pt). Flags:

- `resume=PATH`: resume from that checkpoint;
- `diverge`: rank one's weights are changed just before the shrink;
- `rank1fails`: rank one's shrink raises (a user's shrink function that fails, on that rank only).

On an error each rank records it in OUT/error-rank<N>.txt and exits non-zero.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytorch_lightning as pl
import torch
from ddp_run import InOrder, broken_shrink

from lightning_prune import PruneExportCallback, register_shrinker
from lightning_prune.lightning.demo import DigitsCNN


def holds_the_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, bool]:
    """Whether the module is inside a DDP wrapper, and the optimizer holds exactly its parameters."""
    wrapper = trainer.strategy.model
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    return {
        "wrapped": isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) and wrapper.module is pl_module,
        "optimized": optimized == {id(p) for p in pl_module.parameters()},
    }


class Recorder(pl.Callback):
    """The network right after the shrink (the start of epoch 1) and at the end of training."""

    def __init__(self, out: str) -> None:
        self.out = out

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        record = {
            "net": {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()},
            "params": sum(p.numel() for p in pl_module.parameters()),
            **holds_the_module(trainer, pl_module),
        }
        torch.save(record, os.path.join(self.out, f"{name}-rank{trainer.global_rank}.pt"))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.save(trainer, pl_module, "shrink")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module, "end")


class OnRankOne(pl.Callback):
    """A change on rank one only: its weights just before the shrink (`diverge`), or a shrink function that fails."""

    def __init__(self, flags: list[str]) -> None:
        self.flags = flags

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if "rank1fails" in self.flags and trainer.global_rank == 1:
            register_shrinker(torch.nn.Linear)(broken_shrink)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "diverge" in self.flags and trainer.global_rank == 1 and trainer.current_epoch == 0:
            with torch.no_grad():
                pl_module.net[-1].weight.add_(1.0)


def main(out: str, flags: list[str]) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    resume = next((flag.split("=", 1)[1] for flag in flags if flag.startswith("resume=")), None)
    callback = PruneExportCallback(
        pruner="fpgm", prune_on_epoch=1, finetune="pruned", export_dir=os.path.join(out, "export")
    )
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), filename="{epoch}", save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[OnRankOne(flags), callback, Recorder(out), checkpoints],
    )
    try:  # each rank reads its own half of every batch of 64
        trainer.fit(DigitsCNN(width=8, lr=0.05, batch_norm=False), datamodule=InOrder(batch_size=32), ckpt_path=resume)
    except Exception as err:
        with open(os.path.join(out, f"error-rank{trainer.global_rank}.txt"), "w") as handle:
            handle.write(f"{type(err).__name__}: {err}")
        raise
    if trainer.is_global_zero:
        torch.save(callback.exported_network.state_dict(), os.path.join(out, "exported-rank0.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
