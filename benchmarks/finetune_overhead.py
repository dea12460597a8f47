"""Masked fine-tuning step time: unmasked training, this callback's mask hold, NNI's wrapped model.

    python benchmarks/finetune_overhead.py [--arch resnet18] [--steps 30]

All three train the same torchvision model on the shipped digits (resized to 32x32, 3 channels),
batch 64, SGD, on this machine's device; the table gives the median over --rounds interleaved runs of each run's median step time (forward, backward,
optimizer step and, where it applies, the mask hold) over the timed steps after a warm-up.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_prune import PruneExportCallback
from lightning_prune.lightning.demo import DigitsDataModule, TorchvisionClassifier


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.start = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)


class NoExport(PruneExportCallback):
    """The callback's pruning and mask hold only: the export at the end is not what is timed here."""

    def on_train_end(self, trainer, pl_module):
        pass


def run(module: pl.LightningModule, callbacks: list, steps: int, warmup: int) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        max_steps=steps + warmup,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(module, datamodule=DigitsDataModule(image_size=32, channels=3))
    return statistics.median(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    base = TorchvisionClassifier(args.arch, image_size=32)

    from nni.compression.pruning import L1NormPruner

    wrapped = copy.deepcopy(base)
    L1NormPruner(wrapped, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]).compress()  # stays wrapped: masks in forward
    times: dict[str, list[float]] = {"unmasked": [], "held": [], "nni": []}
    for _ in range(args.rounds):  # interleaved rounds, so drift on a shared machine hits all three alike
        times["unmasked"].append(run(copy.deepcopy(base), [], args.steps, args.warmup))
        times["held"].append(run(copy.deepcopy(base), [NoExport(pruner="l1", sparsity=0.5)], args.steps, args.warmup))
        times["nni"].append(run(copy.deepcopy(wrapped), [], args.steps, args.warmup))
    unmasked, held, nni = (statistics.median(times[k]) for k in ("unmasked", "held", "nni"))
    hold_alone = hold_seconds(copy.deepcopy(base))

    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, device "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {args.arch}, batch 64, 32x32\n"
    )
    print("| training | median step ms | overhead vs unmasked |")
    print("|---|---|---|")
    for name, seconds in (
        ("unmasked", unmasked),
        ("PruneExportCallback (mask hold)", held),
        ("NNI 3.0 wrapped model", nni),
    ):
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / unmasked - 1:+.1%} |")
    print(
        f"| the mask hold alone (zero grads + zero weights, timed in isolation) | {hold_alone * 1e3:.1f} "
        f"| {hold_alone / unmasked:+.1%} |"
    )


def hold_seconds(module: pl.LightningModule, repeats: int = 50) -> float:
    """The hold's own cost per step, free of the step-to-step noise of a whole training step."""
    from lightning_prune.core.graph.hold import MaskHold
    from lightning_prune.core.graph.prunable import is_prunable

    masks = {
        n: torch.arange(m.weight.shape[0]) % 2 == 0
        for n, m in module.named_modules()
        if is_prunable(m) and n != "net.fc"
    }
    hold = MaskHold.build(module, masks, module.example_input_array)
    for parameter in module.parameters():
        parameter.grad = torch.randn_like(parameter)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hold.zero_grads()
        hold.apply()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
