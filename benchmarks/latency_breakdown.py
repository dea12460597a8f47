"""Why does latency fall less than MACs on depthwise networks? Time per kind of layer, dense against exported.

    python benchmarks/latency_breakdown.py                                  # mobilenet_v2, efficientnet_b0, regnet_y_800mf, resnet50
    python benchmarks/latency_breakdown.py --models mobilenet_v2 --batch 1 --round-to 1

Each model is pruned as ``benchmarks/deploy.py`` prunes it (50% group masks, whole channels, one
``round_to``) and both networks are timed layer by layer, in the same interleaved rounds:

- torch eager: forward hooks around every leaf module (1 thread, so the hooks time the kernels);
  what runs between modules (residual adds, SE multiplies, flatten) is its own row;
- ONNX Runtime (CPU provider, all graph optimisations): its profiler's per-node kernel times, each
  node classed by op type and, for convolutions, by the optimised graph's kernel and groups.

Per kind of layer: the dense network's time and share, the exported network's, their ratio, and the
ratio of the work the layers do (MACs; output elements where a layer has none). The last line weighs
each kind's work ratio by its share of the dense time: the latency ratio the network would show if
every kind of layer sped up exactly as its own work shrank. Where that matches the measured ratio,
the runtime delivers the pruning; the distance from the MAC ratio is the network's make-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable

import onnx
import onnxruntime
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from deploy import build_variants, machine, onnx_file

from lightning_prune.core.verify.report import count_macs

MODELS = ["mobilenet_v2", "efficientnet_b0", "regnet_y_800mf", "resnet50"]
BETWEEN = "between modules"


def conv_kind(kernel: tuple[int, ...], groups: int, in_per_group: int) -> str:
    if groups > 1 and in_per_group == 1:
        return "depthwise conv"
    if groups > 1:
        return "grouped conv"
    return "1x1 conv" if all(k == 1 for k in kernel) else "kxk conv"


def module_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return conv_kind(module.kernel_size, module.groups, module.in_channels // module.groups)
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.GELU)):
        return "activation"
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)):
        return "pooling"
    return "other modules"


class LeafTimer:
    """Per leaf module, seconds spent in its forward over the calls since the last :meth:`take`."""

    def __init__(self, model: nn.Module) -> None:
        self.leaves = {name: m for name, m in model.named_modules() if not list(m.children())}
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in self.leaves.items():
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._leave(name)))

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object) -> None:
            self._start[name] = time.perf_counter()

        return hook

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            self.seconds[name] += time.perf_counter() - self._start[name]

        return hook

    def take(self) -> dict[str, float]:
        taken, self.seconds = dict(self.seconds), defaultdict(float)
        return taken


def leaf_work(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Per leaf module: its MACs, or the elements it writes where it does none."""
    inputs: dict[str, tuple] = {}
    outputs: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # returns None: keeps the output
            inputs.setdefault(name, args)
            outputs.setdefault(name, output.numel())

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if not list(m.children())]
    with torch.no_grad():
        model(example)
    for handle in handles:
        handle.remove()
    work = {}
    for name, args in inputs.items():
        macs = count_macs(model.get_submodule(name), *args)
        work[name] = float(macs or outputs[name])
    return work


def eager_breakdown(
    dense: nn.Module, pruned: nn.Module, example: torch.Tensor, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """``{"dense"|"pruned": {kind: [seconds per round]}}``, the two interleaved round by round."""
    models = {"dense": dense, "pruned": pruned}
    timers = {tag: LeafTimer(m) for tag, m in models.items()}
    kinds = {tag: {n: module_kind(m) for n, m in timers[tag].leaves.items()} for tag in models}
    result: dict[str, dict[str, list[float]]] = {tag: defaultdict(list) for tag in models}
    with torch.no_grad():
        for tag, model in models.items():  # warm-up
            model(example)
            timers[tag].take()
        for round_index in range(rounds):
            for tag in sorted(models, reverse=round_index % 2 == 1):
                start = time.perf_counter()
                models[tag](example)
                total = time.perf_counter() - start
                per_leaf = timers[tag].take()
                per_kind: dict[str, float] = defaultdict(float)
                for name, seconds in per_leaf.items():
                    per_kind[kinds[tag][name]] += seconds
                per_kind[BETWEEN] = total - sum(per_leaf.values())
                for kind, seconds in per_kind.items():
                    result[tag][kind].append(seconds)
    return result


def eager_work(dense: nn.Module, pruned: nn.Module, example: torch.Tensor) -> dict[str, dict[str, float]]:
    out = {}
    for tag, model in (("dense", dense), ("pruned", pruned)):
        per_kind: dict[str, float] = defaultdict(float)
        for name, work in leaf_work(model, example).items():
            per_kind[module_kind(model.get_submodule(name))] += work
        out[tag] = per_kind
    return out


def ort_breakdown(
    dense: nn.Module, pruned: nn.Module, example: torch.Tensor, rounds: int, directory: str
) -> dict[str, dict[str, list[float]]]:
    """ONNX Runtime's profiler: per round, each kind's summed kernel time (seconds)."""
    result: dict[str, dict[str, list[float]]] = {}
    sessions, kinds = {}, {}
    for tag, model in (("dense", dense), ("pruned", pruned)):
        path = onnx_file(model, example[:1], directory, tag, "torchscript")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.optimized_model_filepath = os.path.join(directory, f"{tag}.optimized.onnx")
        onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])  # writes the optimised graph
        kinds[tag] = _onnx_node_kinds(options.optimized_model_filepath)
        sessions[tag] = path
        result[tag] = defaultdict(list)
    feed = example.numpy()
    for round_index in range(rounds):
        for tag in sorted(sessions, reverse=round_index % 2 == 1):
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(directory, f"{tag}-{round_index}")
            session = onnxruntime.InferenceSession(sessions[tag], options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            for _ in range(2):  # warm-up, profiled too: dropped below
                session.run(None, {name: feed})
            profile = session.end_profiling()
            with open(profile) as stream:
                events = [e for e in json.load(stream) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            os.remove(profile)
            calls = defaultdict(list)
            for event in events:
                calls[event["name"][: -len("_kernel_time")]].append(event["dur"] * 1e-6)
            per_kind: dict[str, float] = defaultdict(float)
            for node, durations in calls.items():
                per_kind[kinds[tag].get(node, "other ops")] += durations[-1]  # the second, warm, run
            for kind, seconds in per_kind.items():
                result[tag][kind].append(seconds)
    return result


def _onnx_node_kinds(path: str) -> dict[str, str]:
    graph = onnx.load(path).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    kinds = {}
    for node in graph.node:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("Conv", "FusedConv"):
            weight = shapes.get(node.input[1], (0, 0, 1, 1))
            kinds[node.name] = conv_kind(tuple(weight[2:]), int(attributes.get("group", 1)), weight[1])
        elif node.op_type in ("ReorderInput", "ReorderOutput"):
            kinds[node.name] = "layout reorder"
        elif node.op_type in ("Gemm", "MatMul"):
            kinds[node.name] = "linear"
        else:
            kinds[node.name] = node.op_type
    return kinds


def table(title: str, times: dict[str, dict[str, list[float]]], work: dict[str, dict[str, float]] | None) -> str:
    dense_total = statistics.median([sum(v) for v in zip(*times["dense"].values(), strict=True)])
    pruned_total = statistics.median([sum(v) for v in zip(*times["pruned"].values(), strict=True)])
    lines = [
        f"{title}",
        "| kind | dense ms | share | exported ms | time x | work x |",
        "|---|---|---|---|---|---|",
    ]
    expected = 0.0
    kinds = sorted(
        set(times["dense"]) | set(times["pruned"]), key=lambda k: -statistics.median(times["dense"].get(k, [0]))
    )
    for kind in kinds:
        dense_ms = statistics.median(times["dense"].get(kind, [0.0])) * 1e3
        pruned_ms = statistics.median(times["pruned"].get(kind, [0.0])) * 1e3
        share = dense_ms / (dense_total * 1e3)
        ratio = f"{pruned_ms / dense_ms:.2f}" if dense_ms > 0 else "-"
        work_ratio = None
        if work is not None and work["dense"].get(kind):
            work_ratio = work["pruned"].get(kind, 0.0) / work["dense"][kind]
            expected += share * work_ratio
        elif work is not None:
            expected += share * (pruned_ms / dense_ms if dense_ms else 0.0)  # no work counted: as measured
        work_cell = f"{work_ratio:.2f}" if work_ratio is not None else "-"
        lines.append(f"| {kind} | {dense_ms:.1f} | {share:.0%} | {pruned_ms:.1f} | {ratio} | {work_cell} |")
    lines.append(
        f"| **total** | {dense_total * 1e3:.1f} | 100% | {pruned_total * 1e3:.1f} | {pruned_total / dense_total:.2f} | |"
    )
    if work is not None:
        lines.append(f"\nlatency ratio if each kind sped up as its work shrank: {expected:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--ranking", choices=["uniform", "global"], default="uniform")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"<!-- {machine()} -->")
    for name in args.models:
        variants, _ = build_variants(name, [args.round_to], args.size, [], args.ranking)
        dense, pruned = variants["dense"], variants[f"r={args.round_to}"]
        example = torch.randn(args.batch, 3, args.size, args.size)
        macs = count_macs(pruned, example[:1]) / count_macs(dense, example[:1])
        print(f"\n## {name}: MAC ratio {macs:.2f}, batch {args.batch}, round_to={args.round_to}, {args.ranking}\n")
        work = eager_work(dense, pruned, example[:1])
        print(table("torch eager", eager_breakdown(dense, pruned, example, args.rounds), work))
        with tempfile.TemporaryDirectory() as directory:
            print()
            ort = ort_breakdown(dense, pruned, example, args.rounds, directory)
            print(table("ONNX Runtime (norms and activations fused into the convs)", ort, work))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
