"""Export timing and size over torchvision models; prints markdown tables.

    python benchmarks/export_zoo.py                 # a representative set at 224x224
    python benchmarks/export_zoo.py --all --size 64 # the whole test zoo

Each model: randomised BN statistics, random 50% masks on every conv and hidden linear layer,
one 3xSxS input. "export s" is trace plus rebuild (no verification), the median of --repeats
runs; "verify s" is one masked-vs-exported comparison. Where torch-pruning is installed,
resnet50 and densenet201 are also pruned by Torch-Pruning's MetaPruner at the same ratio and
its graph build plus prune step is timed in the same run, interleaved with ours (medians).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import random_masks, randomize

from lightning_prune import apply_masks, export, verify_equivalence
from lightning_prune.core.verify.report import count_macs, count_params

DEFAULT = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "densenet201",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
    "convnext_tiny",
    "resnext50_32x4d",
    "vgg16_bn",
]
DEPTH = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121", "densenet169", "densenet201"]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def build(name: str):
    model = randomize(torchvision.models.get_model(name, weights=None))
    classifier = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1:]
    return model, random_masks(model, skip=tuple(classifier))


def zoo_row(name: str, size: int, repeats: int) -> str:
    model, masks = build(name)
    example = torch.randn(1, 3, size, size)
    seconds, result = timed(lambda: export(model, masks, example), repeats)
    reference = apply_masks(model, masks)
    verify_seconds, report = timed(lambda: verify_equivalence(reference, result.model, example), 1)
    p0, p1 = count_params(model), count_params(result.model)
    m0, m1 = count_macs(model, example), count_macs(result.model, example)
    return (
        f"| {name} | {seconds:.3f} | {verify_seconds:.3f} | {p0 / 1e6:.2f}M | {p1 / 1e6:.2f}M ({p1 / p0:.0%}) "
        f"| {m0 / 1e9:.3f}G | {m1 / 1e9:.3f}G ({m1 / m0:.0%}) | {report.max_relative_error:.1e} |"
    )


def torch_pruning_once(name: str, size: int) -> float | None:
    """Seconds for Torch-Pruning's MetaPruner graph build plus one 50% prune step, or None if not installed."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    example = torch.randn(1, 3, size, size)
    model = randomize(torchvision.models.get_model(name, weights=None))
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    start = time.perf_counter()
    with torch.enable_grad():  # Torch-Pruning traces through autograd
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.RandomImportance(), pruning_ratio=0.5, ignored_layers=ignored
        )
        pruner.step()
    return time.perf_counter() - start


def side_by_side(name: str, size: int, repeats: int) -> tuple[float, float | None]:
    """Median seconds of ours and Torch-Pruning's, runs interleaved so machine drift hits both alike."""
    model, masks = build(name)
    example = torch.randn(1, 3, size, size)
    ours, theirs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        export(model, masks, example)
        ours.append(time.perf_counter() - start)
        theirs.append(torch_pruning_once(name, size))
    return statistics.median(ours), None if theirs[0] is None else statistics.median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every model of the test zoo")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    names = DEFAULT
    if args.all:
        from test_zoo import SEGMENTATION, ZOO

        names = [n for n in ZOO if n not in SEGMENTATION]
    print("| model | export s | verify s | params before | params after | MACs before | MACs after | rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        print(zoo_row(name, args.size, args.repeats), flush=True)

    print("\n| model | lightning-prune export s | Torch-Pruning graph + prune s |")
    print("|---|---|---|")
    for name in ("resnet50", "densenet201"):
        ours, theirs = side_by_side(name, args.size, max(args.repeats, 5))
        print(f"| {name} | {ours:.3f} | {'not installed' if theirs is None else f'{theirs:.3f}'} |", flush=True)

    print("\n| model | depth (conv layers) | export s | export s per conv layer |")
    print("|---|---|---|---|")
    for name in DEPTH:
        model, masks = build(name)
        example = torch.randn(1, 3, args.size, args.size)
        seconds, _ = timed(lambda m=model, k=masks, x=example: export(m, k, x), args.repeats)
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        print(f"| {name} | {convs} | {seconds:.3f} | {seconds / convs * 1e3:.2f} ms |", flush=True)


if __name__ == "__main__":
    main()
