"""Held-out accuracy of a pruned small ResNet for each accuracy-recovery recipe of the callback.

The task, generated (nothing downloaded): 32x32 RGB images in 10 classes, five shapes (disk, square,
triangle, ring, cross) each either solid or striped; every image draws the shape's position, size and
rotation, the stripes' period (3 pixels or more) and angle, its own foreground and background colours,
a distractor blob and pixel noise (:func:`shapes`). ``--train`` training images (seed 0) and
``--held-out`` held-out ones (seed 1), the same whatever the recipe seed.

The network: a ResNet of a stem (16 channels) and three basic blocks (32, 64, 64 channels, stride 2
each, a 1x1 projection on every shortcut), 0.15M parameters. A user's LightningModule trains it
(SGD, momentum 0.9, weight decay 5e-4, cosine learning rate per step): the dense model
``--dense-epochs`` over the training images at learning rate 0.1 (seed 0), then every recipe of
``recovery_common.recipes`` starts from that checkpoint and gets the same ``--steps`` steps of 64
images (drawn by the seed) in 8 epochs, pruning inside them, at learning rate ``--lr``; distillation
with the defaults, the teacher the dense checkpoint (``distill={"teacher": "fit_start"}``).

Budgets are the channel sparsities that keep about 50%, 30% and 15% of the parameters (the stem's input and
the classifier's outputs are not pruned; ``round_to=1``, as the layers are 16 to 64 wide); the table
gives the share actually kept. Accuracy: mean and spread (max - min) over the seeds, of the exported
model on the held-out images.

The seeds and budgets are shared out over ``--jobs`` processes (default: one per core, at most two), as
``recovery_lm.py`` does; the table is the same whatever the number of jobs.

    python benchmarks/recovery.py                       # 3 seeds: the table in docs/recipes.md
    python benchmarks/recovery.py --seeds 1 --train 2000 --dense-epochs 2 --steps 16   # a quick look
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
from recovery_common import EPOCHS, parse_arguments, quiet, recipes, run_benchmark, spread_table, threads, trainer

SPARSITY = {"50%": 0.3, "30%": 0.46, "15%": 0.61}  # channel sparsity -> about this share of params kept
DISTILL = {"teacher": "fit_start"}  # the defaults, the teacher the dense checkpoint (docs/recipes.md: why)


def shapes(count: int, seed: int, size: int = 32) -> TensorDataset:
    """``count`` images (``(3, size, size)`` in about [-1, 1]) of the 10 classes, in equal numbers."""
    g = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(count, *shape, generator=g)

    labels = torch.arange(count) % 10
    labels = labels[torch.randperm(count, generator=g)]
    axis = torch.linspace(-1, 1, size)
    y, x = axis[None, :, None], axis[None, None, :]
    cx, cy, radius, angle = (
        uniform(-0.3, 0.3, 1, 1),
        uniform(-0.3, 0.3, 1, 1),
        uniform(0.45, 0.7, 1, 1),
        uniform(0, 6.3, 1, 1),
    )
    u = ((x - cx) * angle.cos() + (y - cy) * angle.sin()) / radius
    v = (-(x - cx) * angle.sin() + (y - cy) * angle.cos()) / radius
    r = (u**2 + v**2).sqrt()
    masks = torch.stack(
        [
            r <= 1,  # disk
            (u.abs() <= 0.8) & (v.abs() <= 0.8),  # square
            (v >= -0.5) & (v + 3**0.5 * u.abs() <= 1),  # triangle
            (r >= 0.55) & (r <= 1),  # ring
            ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1)),  # cross
        ],
        1,
    ).float()
    mask = masks[torch.arange(count), labels % 5]
    period, tilt = uniform(0.4, 0.7, 1, 1), uniform(0, 6.3, 1, 1)  # stripes 3 pixels or wider
    stripes = (torch.sin(2 * math.pi * (u * tilt.cos() + v * tilt.sin()) / period) > 0).float()
    mask = torch.where((labels >= 5)[:, None, None], mask * stripes, mask)
    foreground, background = uniform(0, 1, 3, 1, 1), uniform(0, 1, 3, 1, 1)
    close = (foreground - background).abs().mean((1, 2, 3)) < 0.25
    background[close] = 1 - foreground[close]
    images = background + (foreground - background) * mask[:, None]
    bx, by, br = uniform(-1, 1, 1, 1), uniform(-1, 1, 1, 1), uniform(0.06, 0.15, 1, 1)  # a distractor blob
    blob = (((x - bx) ** 2 + (y - by) ** 2).sqrt() <= br).float()[:, None]
    images = images + (uniform(0, 1, 3, 1, 1) - images) * blob
    images = images + 0.08 * torch.randn(images.shape, generator=g)
    return TensorDataset(images * 2 - 1, labels)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def resnet(widths: tuple[int, ...] = (16, 32, 64), classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    for cin, cout in zip(widths, widths[1:], strict=False):
        layers.append(Block(cin, cout))
    layers.append(Block(widths[-1], widths[-1]))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes))


class Classifier(L.LightningModule):
    """A user's image classifier: ``self.model`` is the network."""

    def __init__(self, lr: float = 0.1, steps: int = 1000) -> None:
        super().__init__()
        self.lr, self.steps = lr, steps
        self.model = resnet()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def accuracy(network: nn.Module, data: TensorDataset) -> float:
    network.eval()
    with torch.no_grad():
        hits = sum(int((network(x).argmax(1) == y).sum()) for x, y in DataLoader(data, batch_size=500))
    return hits / len(data)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="to split the seeds over processes")
    parser.add_argument("--train", type=int, default=16000, help="training images")
    parser.add_argument("--held-out", type=int, default=2000, help="held-out images")
    parser.add_argument("--dense-epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=128, help="training steps per recipe, pruning included")
    parser.add_argument("--lr", type=float, default=0.02, help="the recipes' peak learning rate")
    parser.add_argument("--budgets", nargs="*", default=list(SPARSITY), choices=list(SPARSITY))
    parser.add_argument("--recipes", nargs="*", default=None, help="recipe names (default: all)")
    parser.add_argument("--dense-cache", help="load the dense model from this file, or save it there once trained")
    args = parse_arguments(parser, argv)
    started = time.perf_counter()
    train, held_out = shapes(args.train, seed=0), shapes(args.held_out, seed=1)
    batch = 64
    per_epoch = max(args.steps // EPOCHS, 1)

    with tempfile.TemporaryDirectory() as root:
        L.seed_everything(0, verbose=False)
        dense_steps = args.dense_epochs * math.ceil(args.train / batch)
        dense = Classifier(lr=0.1, steps=dense_steps)
        if args.dense_cache and os.path.exists(args.dense_cache):
            dense.load_state_dict(torch.load(args.dense_cache, weights_only=True))
        else:
            loader = DataLoader(train, batch_size=batch, shuffle=True)
            with threads(1):  # the table's dense model (recovery_common.threads: why)
                trainer(root, [], max_epochs=args.dense_epochs).fit(dense, loader)
            if args.dense_cache:
                torch.save(dense.state_dict(), args.dense_cache)
        dense_accuracy = accuracy(dense.model, held_out)
        if not args.units:  # a job's share: its runs' lines, and the table to its file
            print(f"dense: {dense_accuracy:.3f} held-out accuracy", flush=True)

        def fit(seed: int, name: str, callback: L.Callback) -> tuple[nn.Module, dict[str, float]]:
            module = Classifier(lr=args.lr, steps=per_epoch * EPOCHS)
            module.load_state_dict(dense.state_dict())
            sampler = RandomSampler(train, num_samples=per_epoch * batch, generator=torch.Generator().manual_seed(seed))
            trainer(root, [callback], max_epochs=EPOCHS).fit(module, DataLoader(train, batch, sampler=sampler))
            network = callback.exported_network
            return network, {"test": accuracy(network, held_out)}

        options = ["--train", args.train, "--held-out", args.held_out, "--dense-epochs", args.dense_epochs]
        options += ["--steps", args.steps, "--lr", args.lr]
        common = {"round_to": 1, "export_dir": f"{root}/out", "verify_batches": 1}
        table = run_benchmark(args, __file__, options, root, fit, recipes(DISTILL), SPARSITY, dense, common)
    if args.units:
        return {"dense": dense_accuracy, "table": table}
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {args.jobs} job(s), each run on one thread, "
        f"torch {torch.__version__}; load {os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.0f} s in all"
    )
    print(
        f"{args.train} training images, {args.held_out} held out; dense {args.dense_epochs} epochs, then "
        f"{per_epoch * EPOCHS} steps of {batch} images per recipe; dense model {dense_accuracy:.3f}\n"
    )
    print(spread_table(table, "held-out accuracy"))
    return {"dense": dense_accuracy, "table": table}


if __name__ == "__main__":
    quiet()
    main()
