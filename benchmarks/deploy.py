"""Does pruning make the deployed network faster? Params, MACs and CPU latency, dense against exported.

    python benchmarks/deploy.py                          # seven torchvision models, round_to 1/8/16/32 (~25 min, 2 cores)
    python benchmarks/deploy.py --quick                  # resnet50 and mobilenet_v2, round_to 1/8, shorter timings
    python benchmarks/deploy.py --ranking global --models mobilenet_v2,efficientnet_b0 --round-to 1,8
    python benchmarks/deploy.py --models resnet50 --round-to 1,8 --onnx-exporter dynamo

Each model (torchvision, ``weights=None``, randomised norm statistics, one 3x224x224 input) is
pruned at 50% for each ``round_to``: by default with group masks, ``group_masks(ChannelGraph.from_model(m,
x), 0.5, model=m, round_to=r)``, which prunes half of every family of coupled channels; with
``--ranking global`` by ``importance_masks(..., "l1", ranking="global")``, half of all groups chosen
across families by score, which leaves ragged widths. The norms' affine parameters of pruned channels
are zeroed (whole channels, so nothing is kept for a constant) and the model exported. Where
``torch-pruning`` is installed its MetaPruner (L1 magnitude, ratio 0.5, the classifier ignored,
``global_pruning`` with ``--ranking global``; for vit_b_16 whole heads, as in
``benchmarks/transformer_export.py``) prunes a copy of the same model at each ``--tp-round-to``
(none and 8 by default); a model it fails on is reported and left out.

Latency: eval mode, no grad, batch 1 and batch 8, in torch eager and in ONNX Runtime (CPU
provider), every variant of one model timed in the same interleaved rounds
(:func:`lightning_prune.core.verify.report.compare_latency`: the order alternates per round, so the machine's
drifting load falls on every variant alike). Each cell is the median in ms with the interquartile
range; "x" columns are the latency ratio exported/dense, to read against the MAC ratio. ONNX files
come from torch's TorchScript exporter by default (5x faster to export than the dynamo exporter
that :func:`lightning_prune.core.files.deploy.save_onnx` uses; ``--onnx-exporter dynamo`` times those files
instead). Both runtimes use ``--threads`` intra-op threads, 1 by default: on a machine whose
cores other processes share, two spinning OpenMP threads on two busy cores made torch eager 100x
slower (mobilenet_v2 at 64x64: 1.6 s a call with 2 threads, 14 ms with 1), which measures the
neighbours, not the network. Every exported network is checked against its masked model, and every
ONNX file against its network, before it is timed.

Three tables: every variant of every model; per variant, geometric means over the models; per
model, ours (round_to 8, the callback's default) against each Torch-Pruning variant in params and
latency/MAC. The figures measured on this project's machine, and what they say, are in
docs/measured.md ("Measured speed-up on CPU"); ``benchmarks/latency_breakdown.py`` splits the time by kind of layer.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import randomize, zero_norm_affine
from transformer_export import torch_pruning_setup

from lightning_prune import ChannelGraph, VerificationError, export, group_masks, verify_equivalence
from lightning_prune.core.files.deploy import OnnxRuntimeModel, save_onnx
from lightning_prune.core.graph.importance import importance_masks
from lightning_prune.core.verify.report import Latency, compare_latency, count_macs, count_params

MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "regnet_y_800mf", "densenet121", "vit_b_16"]
QUICK_MODELS = ["resnet50", "mobilenet_v2"]
ROUND_TO = [1, 8, 16, 32]
TIMINGS = [("eager", 1), ("eager", 8), ("ort", 1), ("ort", 8)]


def build_variants(
    name: str, round_tos: list[int], size: int, torch_pruning_round_tos: list[int | None], ranking: str = "uniform"
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``{"dense": model, "r=1": exported, ..., "tp": pruned, "tp r=8": ...}`` and notes (why a variant is missing).

    ``ranking="uniform"`` prunes half of every family of coupled groups (``group_masks``); ``"global"`` prunes
    the same number of groups chosen across all families by L1 score, which leaves ragged widths."""
    torch.manual_seed(0)
    model = build(name)
    example = torch.randn(1, 3, size, size)
    graph = ChannelGraph.from_model(model, example)
    variants: dict[str, nn.Module] = {"dense": model}
    notes: dict[str, str] = {}
    for round_to in round_tos:
        if ranking == "uniform":
            masks = group_masks(graph, 0.5, model=model, round_to=round_to)
        else:
            sparsity = dict.fromkeys(graph.producers, 0.5)
            masks = importance_masks(graph, model, "l1", sparsity, ranking=ranking, round_to=round_to)
        reference = zero_norm_affine(model, masks, example)
        result = export(reference, masks, example)
        check = verify_equivalence(reference, result.model, example)
        if not check.passed:
            raise SystemExit(f"{name} round_to={round_to}: the export differs from the masked model:\n{check}")
        variants[f"r={round_to}"] = result.model.eval()
    for round_to in torch_pruning_round_tos:
        tag = "tp" if round_to is None else f"tp r={round_to}"
        try:
            variants[tag] = torch_pruned(name, model, example, round_to, global_pruning=ranking == "global")
        except ImportError:
            notes[tag] = "not installed (pip install torch-pruning)"
        except Exception as err:  # a model it cannot prune: say so, go on
            notes[tag] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return variants, notes


def build(name: str) -> nn.Module:
    """A torchvision model with random weights and trained-like (randomised) norm statistics and biases."""
    return randomize(torchvision.models.get_model(name, weights=None)).eval()


def torch_pruned(
    name: str, model: nn.Module, example: torch.Tensor, round_to: int | None, global_pruning: bool
) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning at ratio 0.5 with L1 magnitude, its classifier left, as its
    examples set it up (for vit_b_16: heads per attention, whole heads pruned, the attributes set after)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    heads, fix = {}, None
    if name == "vit_b_16":
        heads, ignored, fix = torch_pruning_setup(name, pruned)
    else:
        ignored = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1:]
    with torch.enable_grad(), warnings.catch_warnings():  # Torch-Pruning traces through autograd
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            pruned,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=ignored,
            round_to=round_to,
            global_pruning=global_pruning,
            **(
                dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5)
                if heads
                else {}
            ),
        )
        pruner.step()
    if fix is not None:
        fix(pruner)
    with torch.no_grad():
        pruned.eval()(example)
    return pruned


def onnx_file(model: nn.Module, example: torch.Tensor, directory: str, tag: str, exporter: str) -> str:
    path = os.path.join(directory, f"{tag}.onnx")
    if exporter == "dynamo":
        return save_onnx(model, example, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(
            model.eval(),
            (example,),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    with open(path, "wb") as stream:
        stream.write(buffer.getvalue())
    return path


def onnx_runtimes(
    variants: dict[str, nn.Module],
    size: int,
    directory: str,
    exporter: str,
    threads: int | None = None,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    notes: dict[str, str] | None = None,
) -> dict[str, nn.Module]:
    """Each variant as an ONNX Runtime session, checked against the network at batch 2 (1e-4 relative).

    A TorchScript-exported file ONNX Runtime refuses is exported again with the dynamo exporter, and
    ``notes`` says so."""
    example = torch.randn(1, 3, size, size)
    check = torch.randn(2, 3, size, size)
    sessions = {}
    for tag, model in variants.items():
        name = tag.replace("=", "").replace("-", "_")
        try:
            session = OnnxRuntimeModel(
                onnx_file(model, example, directory, name, exporter), providers=providers, threads=threads
            )
        except VerificationError as err:
            if exporter == "dynamo":
                raise
            session = OnnxRuntimeModel(
                onnx_file(model, example, directory, name, "dynamo"), providers=providers, threads=threads
            )
            if notes is not None:
                notes[f"{tag} onnx"] = (
                    f"dynamo exporter (ONNX Runtime refused the TorchScript export: {str(err)[:160]}...)"
                )
        report = verify_equivalence(model, session, check, rtol=1e-4)
        if not report.passed:
            raise SystemExit(f"{tag}: the ONNX file differs from the network:\n{report}")
        sessions[tag] = session
    return sessions


def time_all(
    models: dict[str, nn.Module], batch: int, size: int, budget_s: float, device: str = "cpu"
) -> dict[str, Latency]:
    example = torch.randn(batch, 3, size, size, device=device)
    return compare_latency(models, example, rounds=6, repeats=3, warmup=2, budget_s=budget_s)


def cell(latency: Latency) -> str:
    return f"{latency.median_ms:.1f} [{latency.spread_ms:.1f}]"


def run_model(name: str, args: argparse.Namespace, directory: str) -> list[dict[str, Any]]:
    started = time.perf_counter()
    variants, notes = build_variants(name, args.round_to, args.size, args.tp_round_to, args.ranking)
    example = torch.randn(1, 3, args.size, args.size)
    rows = [
        {"model": name, "variant": tag, "params": count_params(m), "macs": count_macs(m, example)}
        for tag, m in variants.items()
    ]
    sessions = onnx_runtimes(variants, args.size, directory, args.onnx_exporter, args.threads, notes=notes)
    prepared = time.perf_counter() - started
    for runtime, batch in TIMINGS:
        models = variants if runtime == "eager" else sessions
        budget = args.budget * (3 if batch > 1 else 1)
        with torch.no_grad():
            times = time_all(models, batch, args.size, budget)
        for row in rows:
            row[f"{runtime}_b{batch}"] = times[row["variant"]]
    for tag, note in notes.items():
        print(f"<!-- {name}: {tag} {note} -->", flush=True)
    timed = time.perf_counter() - started - prepared
    print(f"<!-- {name}: built, exported, checked in {prepared:.0f} s; timed in {timed:.0f} s -->", flush=True)
    return rows


def table(rows: list[dict[str, Any]], timings: list[tuple[str, int]] = TIMINGS) -> str:
    head = "| model | variant | params M | GMACs | MAC x |" + "".join(f" {r} b{b} ms [IQR] | x |" for r, b in timings)
    lines = [head, "|" + "---|" * (5 + 2 * len(timings))]
    dense: dict[str, dict[str, Any]] = {}
    for row in rows:
        base = dense.setdefault(row["model"], row)
        cells = [
            row["model"],
            row["variant"],
            f"{row['params'] / 1e6:.2f}",
            f"{row['macs'] / 1e9:.2f}",
            f"{row['macs'] / base['macs']:.2f}",
        ]
        for runtime, batch in timings:
            key = f"{runtime}_b{batch}"
            cells += [cell(row[key]), f"{row[key].median_ms / base[key].median_ms:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], timings: list[tuple[str, int]] = TIMINGS) -> str:
    """Per variant, over models: geometric mean of latency ratio / MAC ratio (1.0: the speed-up the MACs promise)."""
    dense = {row["model"]: row for row in rows if row["variant"] == "dense"}
    tags = list(dict.fromkeys(row["variant"] for row in rows if row["variant"] != "dense"))
    lines = [
        "| variant | models | MAC x |" + "".join(f" {r} b{b} x | lat/MAC |" for r, b in timings),
        "|" + "---|" * (3 + 2 * len(timings)),
    ]
    for tag in tags:
        own = [row for row in rows if row["variant"] == tag]
        mac = _geomean(row["macs"] / dense[row["model"]]["macs"] for row in own)
        cells = [tag, str(len(own)), f"{mac:.2f}"]
        for runtime, batch in timings:
            key = f"{runtime}_b{batch}"
            lat = _geomean(row[key].median_ms / dense[row["model"]][key].median_ms for row in own)
            cells += [f"{lat:.2f}", f"{lat / mac:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versus(rows: list[dict[str, Any]], ours: str, timings: list[tuple[str, int]] = TIMINGS) -> str:
    """Per model: ``ours`` against each Torch-Pruning variant in params (% of dense) and latency/MAC ratio."""
    dense = {row["model"]: row for row in rows if row["variant"] == "dense"}
    theirs = list(dict.fromkeys(row["variant"] for row in rows if row["variant"].startswith("tp")))
    by_key = {(row["model"], row["variant"]): row for row in rows}
    tags = [ours, *theirs]
    lines = [
        f"| model | params % ({' / '.join(tags)}) |"
        + "".join(f" {r} b{b} lat/MAC ({' / '.join(tags)}) |" for r, b in timings),
        "|" + "---|" * (2 + len(timings)),
    ]
    for model, base in dense.items():
        present = [by_key.get((model, tag)) for tag in tags]
        cells = [model, " / ".join(f"{100 * r['params'] / base['params']:.1f}" if r else "-" for r in present)]
        for runtime, batch in timings:
            key = f"{runtime}_b{batch}"
            cells.append(
                " / ".join(
                    f"{(r[key].median_ms / base[key].median_ms) / (r['macs'] / base['macs']):.2f}" if r else "-"
                    for r in present
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            cpu = next(line.split(":", 1)[1].strip() for line in stream if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {onnxruntime.__version__}, load average {load[0]:.1f}"
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", type=lambda s: s.split(","), default=None, help=f"comma-separated (default: {','.join(MODELS)})"
    )
    parser.add_argument(
        "--round-to", type=lambda s: [int(v) for v in s.split(",")], default=None, help="default 1,8,16,32"
    )
    parser.add_argument(
        "--quick", action="store_true", help="resnet50 and mobilenet_v2, round_to 1 and 8, a third of the timing budget"
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--budget", type=float, default=4.0, help="seconds per batch-1 timing of one model's variants (x3 at batch 8)"
    )
    parser.add_argument("--onnx-exporter", choices=["torchscript", "dynamo"], default="torchscript")
    parser.add_argument(
        "--tp-round-to",
        type=lambda s: [None if v == "none" else int(v) for v in s.split(",")] if s else [],
        default=None,
        help="Torch-Pruning's round_to values, 'none' for no rounding (default none,8; '' for no Torch-Pruning rows)",
    )
    parser.add_argument(
        "--ranking",
        choices=["uniform", "global"],
        default="uniform",
        help="uniform: half of every family of groups; global: half of all groups by L1 score (ragged widths)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and ONNX Runtime intra-op threads (default 1: see the module docstring)",
    )
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args(argv)
    args.models = args.models or (QUICK_MODELS if args.quick else MODELS)
    args.round_to = args.round_to or ([1, 8] if args.quick else ROUND_TO)
    args.tp_round_to = [None, 8] if args.tp_round_to is None else args.tp_round_to
    if args.quick:
        args.budget /= 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"<!-- {machine()} -->", flush=True)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models:
            rows += run_model(name, args, directory)
    print(table(rows))
    print()
    print(summary(rows))
    ours = "r=8" if 8 in args.round_to else f"r={args.round_to[0]}"
    if any(row["variant"].startswith("tp") for row in rows):
        print()
        print(versus(rows, ours))
    print(f"\n<!-- {time.perf_counter() - started:.0f} s in all; load average now {os.getloadavg()[0]:.1f} -->")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(
                [{k: (v.__dict__ if isinstance(v, Latency) else v) for k, v in row.items()} for row in rows],
                stream,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
