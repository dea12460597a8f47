"""Export time and peak memory, ours against Torch-Pruning interleaved; and a 7B-shaped LLaMA from disk.

    python benchmarks/export_speed.py                      # 7 models x (ours, ours inplace, Torch-Pruning), 3 repeats
    python benchmarks/export_speed.py --models resnet50 --repeats 5
    python benchmarks/export_speed.py --from-disk 7b       # write a random bf16 7B-shaped LLaMA, export it from disk

Models (random init, no download; norms and biases randomised, ``tests/helpers.randomize``):
resnet50, mobilenet_v2, convnext_tiny, densenet121 and vit_b_16 (1x3x224x224), BERT-base (1x128) and
a 1.1B LLaMA (TinyLlama's shape, fp32, 1x32 tokens), as ``benchmarks/transformer_export.py`` builds
them. Masks: 50% L1 group masks over every coupled group (``group_masks``; ViT: heads and width),
computed once, outside the timing. "ours" times ``export(model, masks, x, whole_channel=True)``
(exact; the model is not touched, so ``function_change`` is measured when read, which this does not),
"ours inplace" the same with ``inplace=True`` (it consumes the model, as Torch-Pruning does, so export
measures ``function_change`` first: one forward of the masks alone); both remove what Torch-Pruning
removes (whole channels). "ours default" is ``export(model, masks, x)``: the masked model's own
function, what a pruned channel carries folded into constants where that is exact, else kept (ResNet50
and ConvNeXt then keep more than Torch-Pruning: default exports are not the same network).
Torch-Pruning 1.6: ``MetaPruner`` graph build plus one step at ``pruning_ratio=0.5`` (L1 group
importance; heads as its examples give them), classifier ignored.

"forward": after the timed step, the same model built again and run once on the example (warm,
no grad, the least of 3): the unit a tool's time is given in ("/ forward"). An exact export runs
the masked model once as it traces it and the exported model once (the self-check), in place once more
(the masks' own output, for ``function_change``); Torch-Pruning runs one forward with autograd.

Every run is a fresh process, the tools interleaved within each repeat; peak RSS is the process's
high-water mark during the step (reset just before it through ``/proc/self/clear_refs``), over the
model's fp32 parameter bytes. Times: median [min-max] over repeats, with the load average; "/ Torch-Pruning"
is the median over repeats of each repeat's ratio (the machine's speed drifts between repeats, not within one).
``--threads`` is every process's torch thread count. ``--warm``: each process runs its tool once, untimed,
before the timed run (first kernel calls, lazy imports and caches are then not in the time).

``--from-disk 7b``: LLaMA-2-7B's shape (32 layers, hidden 4096, 32 query / 8 key-value heads, MLP
11008, vocabulary 32000) with random bf16 weights, written as safetensors under ``--dir`` one tensor
at a time (13.5 GB), then exported by ``export_from_file`` in a fresh process with 50% group masks
(half the key-value groups with their query heads, half the MLP width, random per layer), every block
checked against its masked block in float32; the file is deleted afterwards.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]
import transformer_export as tx  # noqa: E402  (the transformers' builds, Torch-Pruning setup, memory helpers)

CNNS = ["resnet50", "mobilenet_v2", "convnext_tiny", "densenet121"]
MODELS = [*CNNS, "vit_b_16", "bert-base", "llama-1.1b"]
TOOLS = ["ours", "ours inplace", "ours default", "torch-pruning"]
SEVEN_B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=11008,
    vocab_size=32000,
)


def build(name: str) -> tuple[nn.Module, Any]:
    if name not in CNNS:
        return tx.build(name)
    import torchvision
    from helpers import randomize

    torch.manual_seed(0)
    example = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return randomize(torchvision.models.get_model(name, weights=None)).eval(), example


def masks_for(name: str, model: nn.Module, example: Any, cache: str) -> dict[str, torch.Tensor]:
    from lightning_prune import ChannelGraph, group_masks

    path = os.path.join(cache, f"{name}.pt")
    if not os.path.exists(path):
        torch.save(group_masks(ChannelGraph.from_model(model, example), 0.5, model=model), path)
    return torch.load(path)


def run(name: str, tool: str, cache: str) -> dict[str, Any]:
    if tool == "torch-pruning":
        row = tx.run_torch_pruning(name, False) if name not in CNNS else _torch_pruning_cnn(*build(name))
    else:
        row = _ours(name, tool, cache)
    return {**row, "forward": _forward_seconds(name)}


def _forward_seconds(name: str) -> float:
    """One forward of the dense model on its example: warm, no grad, the least of 3."""
    gc.collect()  # what the step made is gone before the second model is built
    model, example = build(name)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model(**example) if isinstance(example, dict) else model(example)
        times.append(time.perf_counter() - start)
    return min(times)


def _ours(name: str, tool: str, cache: str) -> dict[str, Any]:
    from lightning_prune import export

    model, example = build(name)
    size = tx.fp32_mb(model)

    masks = masks_for(name, model, example, cache)
    before, _ = tx.memory_mb()
    tx.reset_peak()
    start = time.perf_counter()
    whole = tool != "ours default"
    result = export(model, masks, example, whole_channel=whole, inplace=tool == "ours inplace", progress=False)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mb": tx.memory_mb()[1],
        "before_mb": before,
        "fp32_mb": size,
        "phases": result.timings,
    }


def _torch_pruning_cnn(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    import torch_pruning as tp

    ignored = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    size = tx.fp32_mb(model)  # before the step shrinks it
    before, _ = tx.memory_mb()
    tx.reset_peak()
    start = time.perf_counter()
    with torch.enable_grad():  # Torch-Pruning traces through autograd
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=ignored,
        )
        pruner.step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": tx.memory_mb()[1], "before_mb": before, "fp32_mb": size}


def spawn(args: list[str], timeout: int) -> dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": f"exit {done.returncode}: {(done.stderr.strip().splitlines() or ['no output'])[-1][:160]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def table(rows: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    lines = [
        "| model | tool | s, median [min-max] | / Torch-Pruning | / forward | peak RSS / fp32 (+ added) | ours: phases (median run) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, tool), runs in rows.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            lines.append(f"| {model} | {tool} | failed: {runs[0]['error']} | | | | |")
            continue
        seconds = sorted(r["seconds"] for r in good)
        median = statistics.median(seconds)
        # per repeat, against Torch-Pruning's run of the same repeat: the machine's drift between repeats cancels
        theirs = rows.get((model, "torch-pruning"), [])
        pairs = zip(runs, theirs, strict=False)
        ratios = [a["seconds"] / b["seconds"] for a, b in pairs if "error" not in a and "error" not in b]
        versus = f"{statistics.median(ratios):.2f}x" if ratios and tool != "torch-pruning" else ""
        size = good[0]["fp32_mb"]
        peak = max(r["peak_mb"] for r in good) / size
        added = max(r["peak_mb"] - r["before_mb"] for r in good) / size
        middle = min(good, key=lambda r: abs(r["seconds"] - median))
        phases = ", ".join(f"{k} {v:.2f}" for k, v in middle.get("phases", {}).items())
        cell = f"{median:.2f} [{seconds[0]:.2f}-{seconds[-1]:.2f}]"
        forward = statistics.median(r["forward"] for r in good)
        unit = f"{median / forward:.1f} ({forward:.3f} s)"
        lines.append(f"| {model} | {tool} | {cell} | {versus} | {unit} | {peak:.2f}x (+{added:.2f}x) | {phases} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- 7B from disk
def llama_skeleton(config: dict) -> nn.Module:
    import transformers

    from lightning_prune.core.weights import parameters_on_meta

    with parameters_on_meta():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, use_cache=False))
    return model.to(torch.bfloat16).eval()


def write_random_safetensors(model: nn.Module, path: str) -> float:
    """Random bf16 weights for ``model``'s state dict (norm weights in [0.5, 1.5]), one tensor at a time."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_meta}
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with open(path + ".tmp", "wb") as stream:
        stream.write(len(text).to_bytes(8, "little") + text)
        for key, shape in shapes.items():
            if key.endswith("norm.weight"):
                tensor = torch.rand(shape, generator=generator) + 0.5
            else:
                tensor = torch.randn(shape, generator=generator) * 0.02
            stream.write(tensor.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
    os.replace(path + ".tmp", path)
    return time.perf_counter() - start


def llama_group_masks(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """50% group masks by construction: per layer, half the key-value groups (each with its query heads)
    and half the MLP channels (gate and up share them), chosen at random."""
    generator = torch.Generator().manual_seed(seed)
    heads, groups = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, mlp = config["hidden_size"] // heads, config["intermediate_size"]
    masks = {}
    for layer in range(config["num_hidden_layers"]):
        kept = torch.zeros(groups, dtype=torch.bool)
        kept[torch.randperm(groups, generator=generator)[: groups // 2]] = True
        prefix = f"model.layers.{layer}"
        masks[f"{prefix}.self_attn.q_proj"] = kept.repeat_interleave(heads // groups * head_dim)
        for name in ("k_proj", "v_proj"):
            masks[f"{prefix}.self_attn.{name}"] = kept.repeat_interleave(head_dim)
        channels = torch.zeros(mlp, dtype=torch.bool)
        channels[torch.randperm(mlp, generator=generator)[: mlp // 2]] = True
        masks[f"{prefix}.mlp.gate_proj"] = masks[f"{prefix}.mlp.up_proj"] = channels
    return masks


def from_disk_worker(path: str, config: dict) -> dict[str, Any]:
    from lightning_prune.core.from_file import export_from_file

    skeleton = llama_skeleton(config)
    masks = llama_group_masks(config)
    example = {"input_ids": torch.randint(0, config["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(1))}
    before, _ = tx.memory_mb()
    tx.reset_peak()
    start = time.perf_counter()
    result = export_from_file(skeleton, path, masks, example)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in result.model.parameters())
    errors = [error for _, error in result.blocks if error is not None]
    return {
        "seconds": seconds,
        "peak_mb": tx.memory_mb()[1],
        "before_mb": before,
        "bf16_mb": sum(p.numel() for p in skeleton.parameters()) * 2 / 2**20,
        "pruned_mb": params * 2 / 2**20,
        "phases": result.timings,
        "blocks_compared": len(errors),
        "blocks": len(result.blocks),
        "max_block_error": max(errors, default=None),
    }


def from_disk(directory: str, timeout: int, layers: int) -> None:
    config = {**SEVEN_B, "num_hidden_layers": layers}
    path = os.path.join(directory, "llama-7b-shaped.safetensors")
    try:
        seconds = write_random_safetensors(llama_skeleton(config), path)
        print(
            f"<!-- wrote {os.path.getsize(path) / 2**30:.2f} GiB in {seconds:.0f} s; load {tx.load()} -->", flush=True
        )
        row = spawn(["--worker", "from-disk", "--path", path, "--layers", str(layers)], timeout)
    finally:
        if os.path.exists(path):
            os.remove(path)
    print(json.dumps(row, indent=1))
    if "error" not in row:
        print(
            f"\n| 7B-shaped LLaMA, bf16, from disk | {row['seconds']:.0f} s | peak RSS {row['peak_mb'] / 1024:.2f} GiB "
            f"({row['peak_mb'] / row['bf16_mb']:.2f}x the dense bf16 weights, {row['peak_mb'] / row['pruned_mb']:.2f}x "
            f"the pruned) | blocks compared {row['blocks_compared']} of {row['blocks']}, max relative error "
            f"{row['max_block_error']:.1e} (float32 from the bf16 weights) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=MODELS)
    parser.add_argument("--tools", type=lambda s: s.split(","), default=TOOLS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--from-disk", choices=["7b"], help="the 7B-shaped LLaMA from disk instead")
    parser.add_argument("--dir", default="/tmp", help="where --from-disk writes its file (deleted after)")
    parser.add_argument("--layers", type=int, default=32, help="--from-disk: layers (32: the 7B; fewer for a trial)")
    parser.add_argument("--warm", action="store_true", help="each process runs its tool once untimed first")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore")
    if args.worker:
        try:
            if args.worker == "from-disk":
                row = from_disk_worker(args.path, {**SEVEN_B, "num_hidden_layers": args.layers})
            else:
                if args.warm:  # once untimed: first kernel calls, lazy imports and caches are not in the timing
                    run(args.models[0], args.worker, args.cache)
                    gc.collect()
                row = run(args.models[0], args.worker, args.cache)
        except Exception as err:
            traceback.print_exc()
            row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"}
        print("RESULT " + json.dumps(row), flush=True)
        return
    print(f"<!-- {tx.machine()}; load at start {tx.load()} -->", flush=True)
    if args.from_disk:
        from_disk(args.dir, args.timeout, args.layers)
        return
    import tempfile

    rows: dict[tuple[str, str], list[dict[str, Any]]] = {(m, t): [] for m in args.models for t in args.tools}
    with tempfile.TemporaryDirectory() as cache:
        for repeat in range(args.repeats):
            for model in args.models:
                for tool in args.tools:
                    options = ["--threads", str(args.threads), *(["--warm"] if args.warm else [])]
                    row = spawn(["--worker", tool, "--models", model, "--cache", cache, *options], args.timeout)
                    rows[(model, tool)].append(row)
                    shown = row.get("error") or f"{row['seconds']:.2f} s"
                    print(f"<!-- repeat {repeat + 1} {model} {tool}: {shown}; load {tx.load()} -->", flush=True)
    print()
    print(table(rows))
    print(f"\n<!-- load at end {tx.load()} -->")


if __name__ == "__main__":
    main()
