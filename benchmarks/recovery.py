"""Held-out accuracy against parameters kept for each accuracy-recovery recipe of the callback.

The task: scikit-learn's shipped 8x8 digits (nothing downloaded), made harder so that it does not
saturate near 99%: fixed Gaussian noise (std 0.8 on pixels in [-1, 1]) and only 600 training images,
the other 1,197 held out. Every seed trains the same dense
student for ``--dense-epochs`` epochs once; each recipe then starts from that checkpoint and gets
the same ``--epochs`` of training (pruning happens inside that budget), SGD with momentum and a
cosine learning rate over those epochs:

  one-shot FPGM, masked     ``pruner="fpgm"`` at the start, then masked fine-tuning (the 0.1 recipe)
  gradual                   ``pruner="fpgm"``, ``schedule`` of 3 steps over the first half, cubic ramp
  gradual + Taylor          the same with ``pruner="taylor"``
  gradual + distill         gradual FPGM with ``distill=True`` (weight 0.5, temperature 4)
  gradual + distill, pruned the same with ``finetune="pruned"`` (the smaller model trains after the last step)

Budgets are channel sparsities chosen to keep about 50%, 30% and 15% of the parameters; the
table gives the parameters actually kept (the first conv's input and the classifier's outputs
are not pruned). Accuracy: mean and spread (max - min) over the seeds, of the exported model on
the held-out set. Step time: median milliseconds per training step after the last pruning step,
masked (gradual + distill) against pruned-size (gradual + distill, pruned).

    python benchmarks/recovery.py                 # 3 seeds, the table in docs/recipes.md
    python benchmarks/recovery.py --seeds 1 --epochs 4 --dense-epochs 4   # a quick look
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune.lightning.callback as callback_module
from lightning_prune import PruneExportCallback

SPARSITY = {"50%": 0.3, "30%": 0.47, "15%": 0.64}  # channel sparsity -> about this share of params kept


def task(seed: int = 1234, train: int = 600, noise: float = 0.8):
    """scikit-learn's shipped 8x8 digits in [-1, 1], with fixed Gaussian noise of std ``noise`` added and
    only ``train`` images to learn from; the other 1,197 are held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    generator = torch.Generator().manual_seed(seed)
    x = x + noise * torch.randn(x.shape, generator=generator)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=generator)
    x, y = x[order], y[order]
    return TensorDataset(x[:train], y[:train]), TensorDataset(x[train:], y[train:])


def student() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.05, epochs: int = 8) -> None:
        super().__init__()
        self.lr, self.epochs = lr, epochs
        self.model = student()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs)]  # per epoch


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append((trainer.current_epoch, time.perf_counter() - self._start))


def trainer(epochs: int, callbacks, root: str) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        deterministic=True,
    )


def accuracy(network: nn.Module, data: TensorDataset) -> float:
    network.eval()
    with torch.no_grad():
        return float((network(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean())


def recipes(sparsity: float, epochs: int) -> dict[str, dict]:
    half = max(epochs // 2, 3)
    gradual = {"schedule": {"start_epoch": 1, "end_epoch": half, "steps": 3}}  # Taylor needs an epoch of gradients
    return {
        "one-shot FPGM, masked": {"pruner": "fpgm"},
        "gradual": {"pruner": "fpgm", **gradual},
        "gradual + Taylor": {"pruner": "taylor", **gradual},
        "gradual + distill": {"pruner": "fpgm", "distill": True, **gradual},
        "gradual + distill, pruned": {"pruner": "fpgm", "distill": True, "finetune": "pruned", **gradual},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--dense-epochs", type=int, default=20)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    # the export report's latency timing (a few seconds per run) is not what this benchmark measures
    callback_module.compare_models = lambda *args, **kwargs: {}
    train, held_out = task()
    loader = lambda: DataLoader(train, batch_size=32, shuffle=True)
    results: dict[tuple[str, str], list[float]] = {}
    kept: dict[tuple[str, str], list[float]] = {}
    steps: dict[tuple[str, str], list[float]] = {}
    dense_accuracy = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for seed in range(args.seeds):
            L.seed_everything(seed, verbose=False)
            dense = Classifier(epochs=args.dense_epochs)
            trainer(args.dense_epochs, [], root).fit(dense, loader())
            dense_accuracy.append(accuracy(dense.model, held_out))
            print(f"seed {seed} dense: acc {dense_accuracy[-1]:.3f}", flush=True)
            dense_params = sum(p.numel() for p in dense.model.parameters())
            for budget, sparsity in SPARSITY.items():
                for name, options in recipes(sparsity, args.epochs).items():
                    L.seed_everything(100 + seed, verbose=False)
                    module = Classifier(epochs=args.epochs)
                    module.load_state_dict(dense.state_dict())
                    callback = PruneExportCallback(
                        sparsity=sparsity, export_dir=f"{root}/out", verify_batches=1, **options
                    )
                    timer = StepTimer()
                    trainer(args.epochs, [callback, timer], root).fit(module, loader())
                    network = callback.exported_network
                    results.setdefault((budget, name), []).append(accuracy(network, held_out))
                    kept.setdefault((budget, name), []).append(
                        sum(p.numel() for p in network.parameters()) / dense_params
                    )
                    last = callback._steps.epoch_of(callback._steps.steps)
                    after = [t for epoch, t in timer.times if epoch >= last + 1]
                    steps.setdefault((budget, name), []).append(1000 * statistics.median(after or [0.0]))
                    line = f"seed {seed} {budget} {name}: acc {results[(budget, name)][-1]:.3f}"
                    print(
                        f"{line} kept {kept[(budget, name)][-1]:.3f} step {steps[(budget, name)][-1]:.2f} ms",
                        flush=True,
                    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, torch {torch.__version__}"
    )
    print(f"seeds {args.seeds}, dense {args.dense_epochs} epochs, then {args.epochs} epochs per recipe; "
          f"{time.perf_counter() - started:.0f} s in all")  # fmt: skip
    print(f"dense student: {statistics.mean(dense_accuracy):.3f} ± {spread(dense_accuracy):.3f} held-out accuracy\n")
    names = list(recipes(0.5, args.epochs))
    print("| recipe | " + " | ".join(f"~{b} params kept" for b in SPARSITY) + " |")
    print("|---|" + "---|" * len(SPARSITY))
    for name in names:
        cells = []
        for budget in SPARSITY:
            acc, share = results[(budget, name)], statistics.mean(kept[(budget, name)])
            cells.append(f"{statistics.mean(acc):.3f} ± {spread(acc):.3f} ({share:.0%})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nmedian ms per training step after the last pruning step (mean over seeds):\n")
    print("| fine-tune | " + " | ".join(f"~{b}" for b in SPARSITY) + " |")
    print("|---|" + "---|" * len(SPARSITY))
    for name, label in (("gradual + distill", "masked"), ("gradual + distill, pruned", "pruned size")):
        print(f"| {label} | " + " | ".join(f"{statistics.mean(steps[(b, name)]):.2f}" for b in SPARSITY) + " |")


def spread(values: list[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
