"""A real fully sharded run for the sharded tests: `python tests/sharded_run.py OUT CASE [FLAGS]`.

A user's own LightningModule keeps its network in `self.model` and shards it with torch's
`fully_shard` in `configure_model` (each residual block, then the whole network), trained with
`Trainer(strategy=ModelParallelStrategy(data_parallel_size=2), devices=2, accelerator="cpu")` on
plain loaders given to `fit`. CASE picks the callback: `l1`, `fpgm`, `l2`, `bn_scale` (one-shot at
epoch 1), `taylor` (a two-step schedule at epochs 1 and 2, global ranking), `taylor-distill` (the same
with distillation) or `masks` (given masks; one is on `model.head.2`, in the root's shard group, which
the validation loop before the pruning step leaves gathered). Flags: `resume=PATH` resumes from a
(sharded) checkpoint; `every_epoch` keeps a checkpoint of every epoch; `full_file` makes those single
files of full tensors (the strategy's `save_distributed_checkpoint=False`); `fail` makes a user's
shrink function raise (in the export, on every rank); `rank1_fails`: rank 1 raises just before the
pruning step, which rank 0 enters alone; `shard_at=layer|network` shards each conv and linear layer, or only the whole network,
instead of each residual block; `pruned` fine-tunes at the pruned size (`finetune="pruned"`,
three epochs: the shrink after the first) and records what the module held right after the shrink
(OUT/rank<N>.pt's "shrink").

Each rank writes OUT/rank<N>.pt: its exported network's state dict, the full (gathered) masked
network's state dict at the end, the masks, the coupled groups the callback traced, the Taylor sums
before each epoch's pruning step, each step's loss (and distillation term), and its report; with
distillation, the gathered network before the first pruning step and what the teacher is (its gathered
state, its local and full sizes, frozen or not). On a PruneExportError, OUT/error-rank<N>.txt.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import ModelParallelStrategy
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset
from user_modules import quiet_trainer

from lightning_prune import PruneExportCallback, PruneExportError, register_shrinker
from lightning_prune.core.sharded import is_dtensor, whole


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.conv2, self.bn2 = nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Net(nn.Module):
    """A residual CNN for 8x8 digits: the network a user would write."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class ShardedDigits(pl.LightningModule):
    """``shard_at``: what ``configure_model`` shards before the whole network: each residual block
    (``"block"``), each conv and linear layer (``"layer"``), or nothing (``"network"``)."""

    def __init__(self, width: int = 8, lr: float = 0.05, shard_at: str = "block") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Net(width)

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        kinds = {"block": (Block,), "layer": (nn.Conv2d, nn.Linear), "network": ()}[self.hparams.shard_at]
        for module in self.model.modules():
            if isinstance(module, kinds):
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self(images), labels), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def one_rank_trainer(root, callbacks: list, **settings) -> pl.Trainer:
    """A real ModelParallelStrategy Trainer in this process (one rank: each shard is whole, still a DTensor)."""
    return quiet_trainer(
        pl, root, callbacks, accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), **settings
    )


def loaders() -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    train = TensorDataset(images[:1200], labels[:1200])
    val = TensorDataset(images[1200:1328], labels[1200:1328])
    return DataLoader(train, batch_size=32, shuffle=False), DataLoader(val, batch_size=32)


def callback_for(case: str, out: str, flags: list[str]) -> PruneExportCallback:
    common = {"export_dir": os.path.join(out, "export"), "verify_batches": 2}
    if "pruned" in flags:
        common["finetune"] = "pruned"
    if case.startswith("taylor"):
        schedule = {"start_epoch": 1, "end_epoch": 2, "steps": 2}
        distill = case == "taylor-distill"
        return PruneExportCallback(
            pruner="taylor", sparsity=0.5, schedule=schedule, ranking="global", distill=distill, **common
        )
    if case == "masks":
        keep = torch.tensor([True, False] * 8)
        masks = {"model.blocks.0.conv1": keep, "model.blocks.1.conv1": keep.roll(1)}
        masks["model.head.2"] = torch.tensor([True, True, False, False] * 8)  # the root's shard group
        return PruneExportCallback(masks=masks, prune_on_epoch=1, **common)
    return PruneExportCallback(pruner=case, sparsity=0.5, prune_on_epoch=1, **common)


class TaylorSpy(pl.Callback):
    """Before each epoch's end (so before a pruning step there), the Taylor sums this rank accumulated,
    and the gathered network before the first step; after each training step, its loss and distillation term."""

    def __init__(self, pruning: PruneExportCallback) -> None:
        self.pruning, self.totals, self.losses, self.dense = pruning, [], [], None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        totals = self.pruning._state.taylor.totals
        self.totals.append(None if totals is None else totals.copy())
        if self.pruning.masks is None and self.pruning.distill is not None:  # what the teacher is copied from
            self.dense = gathered(pl_module.model)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        distiller = self.pruning._distiller
        term = distiller.last_loss if distiller is not None and distiller.teacher is not None else None
        self.losses.append((float(outputs["loss"]), term))


def gathered(network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state dict, each sharded tensor gathered whole (collective)."""
    return {name: whole(t).detach().clone() for name, t in network.state_dict().items()}


def teacher_record(teacher: nn.Module | None) -> dict | None:
    """What the teacher is: its gathered state, each parameter's local and full sizes, frozen or not."""
    if teacher is None:
        return None
    parameters = dict(teacher.named_parameters())
    return {
        "state": gathered(teacher),
        "sizes": {k: (p.to_local().numel() if is_dtensor(p) else None, p.numel()) for k, p in parameters.items()},
        "frozen": not any(p.requires_grad for p in parameters.values()),
        "training": any(m.training for m in teacher.modules()),
    }


class Rank1Fails(pl.Callback):
    """Rank 1 raises just before the callback's pruning step (at the end of epoch 0), rank 0 goes on into it."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 1 and trainer.current_epoch == 0:
            raise RuntimeError("rank 1 failed before the pruning step")


class ShrinkSpy(pl.Callback):
    """`finetune="pruned"`: the gathered masked weights at the last validation before the shrink (before
    the epoch's end, where the shrink comes), and right after the shrink (this spy's hooks run after the
    pruning callback's) the parameter count, each parameter's full and local sizes (``None``: not a
    DTensor) and the gathered weights."""

    def __init__(self, pruning: PruneExportCallback) -> None:
        self.pruning, self.before, self.seen = pruning, None, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruning.finetune == "pruned" and not self.pruning.shrunk:
            self.before = gathered(pl_module.model)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.seen is None and self.before is not None and self.pruning.shrunk:
            self.seen = {
                "params": sum(p.numel() for p in pl_module.parameters()),
                "sizes": {
                    n: (p.numel(), p.to_local().numel() if isinstance(p, DTensor) else None)
                    for n, p in pl_module.model.named_parameters()
                },
                "before": self.before,
                "weights": gathered(pl_module.model),
            }


def broken_shrink(module: nn.Module, change: object) -> nn.Module:
    raise RuntimeError("the user's shrink function failed")


def main(out: str, case: str, flags: list[str]) -> None:
    warnings.filterwarnings("ignore")
    if "fail" in flags:
        register_shrinker(nn.Conv2d)(broken_shrink)
    pl.seed_everything(0, verbose=False)
    resume = next((f.split("=", 1)[1] for f in flags if f.startswith("resume=")), None)
    callback = callback_for(case, out, flags)
    checkpoints = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint="full_file" not in flags
        ),
        max_epochs=4 if case.startswith("taylor") else 3 if "pruned" in flags else 2,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing="every_epoch" in flags,
        default_root_dir=out,
        callbacks=[
            spy := TaylorSpy(callback),
            *([Rank1Fails()] if "rank1_fails" in flags else []),
            callback,
            shrink := ShrinkSpy(callback),
            *([checkpoints] if "every_epoch" in flags else []),
        ],
    )
    shard_at = next((f.split("=", 1)[1] for f in flags if f.startswith("shard_at=")), "block")
    module = ShardedDigits(shard_at=shard_at)
    train, val = loaders()
    try:
        trainer.fit(module, train, val, ckpt_path=resume)
    except PruneExportError as err:
        with open(os.path.join(out, f"error-rank{trainer.global_rank}.txt"), "w") as handle:
            handle.write(str(err))
        raise
    sharded_at_end = all(is_dtensor(p) for p in module.parameters())  # the export left no layer gathered
    masked = gathered(module.model)
    teacher = teacher_record(callback._distiller.teacher if callback._distiller is not None else None)
    graph = callback._state.graph  # what the callback traced on the sharded module
    record = {
        "groups": sorted(sorted(group) for group in graph.group_members().values()) if graph is not None else None,
        "taylor": spy.totals,
        "losses": spy.losses,
        "dense": spy.dense,
        "teacher": teacher,
        "params_at_end": sum(p.numel() for p in module.parameters()),
        "sharded_at_end": sharded_at_end,
        "shrink": shrink.seen,
        "exported": callback.exported_network.state_dict(),
        "masked": masked,
        "masks": callback.masks,
        "report": {k: v for k, v in callback.report.items() if isinstance(v, (int, float, str, type(None)))},
    }
    torch.save(record, os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
