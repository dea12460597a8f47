"""Export time, size and peak memory on transformers at 50% heads and 50% MLP width; prints a markdown table.

    python benchmarks/transformer_export.py                        # vit_b_16, swin_t, bert-base, llama-1.1b; 3 repeats
    python benchmarks/transformer_export.py --models vit_b_16 --repeats 5
    python benchmarks/transformer_export.py --profile llama-1.1b   # phases of one export: time, cProfile, RSS timeline

Models (random init, no download): torchvision ``vit_b_16`` and ``swin_t`` (1x3x224x224), BERT-base
(``BertModel(BertConfig())``, input_ids and attention mask 1x128) and a LLaMA-architecture model of
1.1B parameters (``LlamaForCausalLM``: hidden 2048, 22 layers, 32 heads, 4 key/value heads, MLP 5632,
vocabulary 32000; input_ids 1x32). Norms and biases are randomised (``tests/helpers.randomize``).

Masks: ``group_masks(ChannelGraph.from_model(model, x), 0.5, model=model)`` (L1 per coupled group),
computed once per model and variant, outside the timing. Two variants:

- ``all``: every coupled group may go, so half the heads, half the MLP width and half the embedding
  (residual) width, wherever the tracer couples them (LLaMA's: the token embedding's columns, every
  ``o_proj`` and ``down_proj``, each RMSNorm rescaled to stay exact, the LM head's columns);
- ``heads+mlp``: ``layers=`` the query/key/value and first MLP layers only, so the embedding width stays.

"export s" times ``lightning_prune.export(model, masks, x, whole_channel=True)``, trace included
(``whole_channel=True``: the norm and bias parameters a pruned channel feeds are zeroed too, so no
constant keeps it; this is what the test suite exports). Torch-Pruning 1.6.1 runs where installed:
``MetaPruner`` (L1 group importance, ``pruning_ratio=0.5``, ``num_heads`` given per attention,
``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio=0.5``, classifier/LM head
ignored, as its ViT and LLM examples do), its graph build plus prune step timed, then the
attributes its examples patch by hand (head counts, ``hidden_dim``) set outside the timing; a model it
fails on shows the error; its LLaMA run gets a tensor input, as its LLM example passes, and
``use_cache=False`` (its trace fails on the key/value cache otherwise). It prunes the embedding width too, so it compares with ``all``.

Every run is a fresh subprocess, the tools interleaved within each repeat (ours ``all``, ours
``heads+mlp``, Torch-Pruning, per model), so the shared machine's drifting load falls on all alike.
Peak memory is the process's peak RSS during the export or prune step (``/proc/self/clear_refs``
resets the high-water mark just before it, so model building and mask computation do not count;
``ru_maxrss`` where that reset is refused), divided by the model's fp32 parameter bytes: "peak x" is
the whole process (model, Python and torch included), "+x" what the step added on top of what was
resident before it. Export time is the median over repeats with [min-max].
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

MODELS = ["vit_b_16", "swin_t", "bert-base", "llama-1.1b"]
VARIANTS = ["all", "heads+mlp"]
INNER = {  # the query/key/value projections and the MLP's first layers: what `heads+mlp` may prune
    "vit_b_16": r"\.self_attention$|\.mlp\.0$",
    "swin_t": r"\.attn\.qkv$|\.mlp\.0$",
    "bert-base": r"\.attention\.self\.(query|key|value)$|\.intermediate\.dense$",
    "llama-1.1b": r"\.self_attn\.[qkv]_proj$|\.mlp\.(gate|up)_proj$",
}
SKIP: dict[tuple[str, str], str] = {}  # (model, tool): why it is not run
LLAMA = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
)


def build(name: str) -> tuple[nn.Module, Any]:
    """The model (seeded, randomised norms and biases, eval mode) and its example input."""
    from helpers import randomize

    torch.manual_seed(0)
    if name in ("vit_b_16", "swin_t"):
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        example: Any = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    elif name == "bert-base":
        import transformers

        model = transformers.BertModel(transformers.BertConfig())
        ids = torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(1))
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    elif name == "llama-1.1b":
        import transformers

        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
        example = {"input_ids": torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(1))}
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    return randomize(model).eval(), example


def embedding_width(name: str, model: nn.Module) -> int | str:
    """The residual-stream width the model's first layer writes."""
    if name == "vit_b_16":
        return model.conv_proj.out_channels
    if name == "swin_t":  # four stages, each its own width
        widths = [model.features[0][0].out_channels] + [model.features[i].reduction.out_features for i in (2, 4, 6)]
        return "/".join(map(str, widths))
    if name == "bert-base":
        return model.embeddings.word_embeddings.embedding_dim
    return model.model.embed_tokens.embedding_dim


def memory_mb() -> tuple[float, float]:
    """(resident, peak resident) of this process in MiB."""
    fields = {}
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith(("VmRSS", "VmHWM")):
                fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return fields.get("VmRSS", peak), peak


def reset_peak() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


def fp32_mb(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) * 4 / 2**20


def masks_for(name: str, variant: str, model: nn.Module, example: Any, cache: str) -> dict[str, torch.Tensor]:
    """50% group masks for ``variant``, computed once and kept in ``cache`` for the later repeats."""
    from lightning_prune import ChannelGraph, group_masks

    path = os.path.join(cache, f"{name}-{variant}.pt".replace("+", "_"))
    if os.path.exists(path):
        return torch.load(path)
    graph = ChannelGraph.from_model(model, example)
    layers = None
    if variant == "heads+mlp":
        layers = [layer for layer in graph.producers if re.search(INNER[name], layer)]
    masks = group_masks(graph, 0.5, model=model, layers=layers)
    torch.save(masks, path)
    return masks


def run_ours(name: str, variant: str, cache: str, stats: bool) -> dict[str, Any]:
    from lightning_prune import export
    from lightning_prune.core.verify.report import count_macs, count_params

    model, example = build(name)
    masks = masks_for(name, variant, model, example, cache)
    before_mb, _ = memory_mb()
    reset = reset_peak()
    start = time.perf_counter()
    result = export(model, masks, example, whole_channel=True)
    seconds = time.perf_counter() - start
    _, peak_mb = memory_mb()
    small = result.model
    heads = result.plan.heads
    row = {
        "seconds": seconds,
        "peak_mb": peak_mb,
        "before_mb": before_mb,
        "fp32_mb": fp32_mb(model),
        "peak_reset": reset,
        "params": (count_params(model), count_params(small)),
        "heads": (sum(c.query_before - c.query for c in heads.values()), sum(c.query_before for c in heads.values())),
        "embedding": (embedding_width(name, model), embedding_width(name, small)),
    }
    if stats:  # not timed: the MAC count is a forward pass of each
        row["macs"] = (count_macs(model, example), count_macs(small, example))
    return row


def torch_pruning_setup(name: str, model: nn.Module) -> tuple[dict[nn.Module, int], list[nn.Module], Any]:
    """Torch-Pruning's per-model settings, as its examples give them: heads per attention layer, the
    layers it must leave, and the attributes to set by hand after pruning."""
    if name == "vit_b_16":
        attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]

        def fix(pruner: Any) -> None:
            model.hidden_dim = model.conv_proj.out_channels
            for m in attention:
                m.num_heads = pruner.num_heads[m]
                m.head_dim = m.embed_dim // m.num_heads

        return {m: m.num_heads for m in attention}, [model.heads.head], fix
    if name == "swin_t":
        from torchvision.models.swin_transformer import ShiftedWindowAttention

        attention = [m for m in model.modules() if isinstance(m, ShiftedWindowAttention)]

        def fix(pruner: Any) -> None:
            for m in attention:
                m.num_heads = pruner.num_heads[m.qkv]

        return {m.qkv: m.num_heads for m in attention}, [model.head], fix
    if name == "bert-base":
        attention = [m for n, m in model.named_modules() if n.endswith("attention.self")]

        def fix(pruner: Any) -> None:
            for m in attention:
                m.num_attention_heads = pruner.num_heads[m.query]
                m.attention_head_size = m.query.out_features // m.num_attention_heads
                m.all_head_size = m.query.out_features

        heads = {}
        for m in attention:
            heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads, m.value: m.num_attention_heads})
        return heads, [model.pooler.dense], fix
    config = model.config
    attention = [m for n, m in model.named_modules() if n.endswith("self_attn")]

    def fix(pruner: Any) -> None:
        for m in attention:
            m.num_key_value_groups = (m.q_proj.out_features // m.head_dim) // (m.k_proj.out_features // m.head_dim)
        config.hidden_size = model.lm_head.in_features

    heads = {}
    for m in attention:
        heads.update(
            {
                m.q_proj: config.num_attention_heads,
                m.k_proj: config.num_key_value_heads,
                m.v_proj: config.num_key_value_heads,
            }
        )
    return heads, [model.lm_head], fix


def run_torch_pruning(name: str, stats: bool) -> dict[str, Any]:
    import torch_pruning as tp

    from lightning_prune.core.verify.report import count_macs, count_params

    model, example = build(name)
    p0, embedding0, size = count_params(model), embedding_width(name, model), fp32_mb(model)
    m0 = count_macs(model, example) if stats else None
    heads, ignored, fix = torch_pruning_setup(name, model)
    initial_heads = dict(heads)  # the pruner updates the dict it is given
    inputs: Any = example if isinstance(example, torch.Tensor) else dict(example)
    if name == "llama-1.1b":  # as its LLM example: a tensor input, and no cache (its trace fails on the cache)
        model.config.use_cache = False
        inputs = example["input_ids"]
    before_mb, _ = memory_mb()
    reset = reset_peak()
    start = time.perf_counter()
    with torch.enable_grad():  # Torch-Pruning traces through autograd
        pruner = tp.pruner.MetaPruner(
            model,
            inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=ignored,
            num_heads=heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=0.5,
        )
        pruner.step()
    seconds = time.perf_counter() - start
    _, peak_mb = memory_mb()
    fix(pruner)
    heads_after = dict(pruner.num_heads)
    del pruner
    row = {
        "seconds": seconds,
        "peak_mb": peak_mb,
        "before_mb": before_mb,
        "fp32_mb": size,
        "peak_reset": reset,
        "params": (p0, count_params(model)),
        "embedding": (embedding0, embedding_width(name, model)),
        "heads": _torch_pruning_heads(name, initial_heads, heads_after),
    }
    try:
        with torch.no_grad():
            model.eval()(**example) if isinstance(example, dict) else model.eval()(example)
    except Exception as err:  # pruned, but the model no longer runs: say so
        row["runs"] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
    if stats and "runs" not in row:
        row["macs"] = (m0, count_macs(model, example))
    return row


def _torch_pruning_heads(name: str, before: dict, after: dict) -> tuple[int, int]:
    """(query heads removed, query heads before): BERT and LLaMA list (query, key, value) per attention."""
    query = list(before)[::3] if name in ("bert-base", "llama-1.1b") else list(before)
    return sum(before[m] - after.get(m, before[m]) for m in query), sum(before[m] for m in query)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore")
    try:
        if args.worker == "torch-pruning":
            row = run_torch_pruning(args.model, args.stats)
        else:
            row = run_ours(args.model, args.worker, args.cache, args.stats)
    except Exception as err:
        traceback.print_exc()
        row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:140] if str(err) else ''}"}
    print("RESULT " + json.dumps(row), flush=True)


def spawn(model: str, tool: str, args: argparse.Namespace, cache: str, stats: bool) -> dict[str, Any]:
    """One run in a fresh interpreter: its result row, or why there is none."""
    command = [sys.executable, __file__, "--worker", tool, "--models", model, "--cache", cache]
    command += ["--threads", str(args.threads)] + (["--stats"] if stats else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {args.timeout} s (stopped)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:140]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def ratio(pair: tuple[float, float] | None, unit: float, suffix: str) -> str:
    if pair is None:
        return "-"
    return f"{pair[0] / unit:.2f}{suffix} -> {pair[1] / unit:.2f}{suffix} ({pair[1] / pair[0]:.0%})"


def table(rows: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    lines = [
        "| model | tool | export s, median [min-max] | params | MACs | embedding width | heads removed "
        "| peak RSS / fp32 params (+ added) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, tool), runs in rows.items():
        good = [r for r in runs if "error" not in r]
        label = {"all": "lightning-prune, all", "heads+mlp": "lightning-prune, heads+mlp"}.get(tool, tool)
        if not good:
            why = runs[0]["error"] if (model, tool) in SKIP else f"failed: {runs[0]['error']}"
            lines.append(f"| {model} | {label} | {why} | | | | | |")
            continue
        seconds = [r["seconds"] for r in good]
        first = good[0]
        peak = max(r["peak_mb"] for r in good)
        added = max(r["peak_mb"] - r["before_mb"] for r in good)
        note = "" if len(good) == len(runs) else f" ({len(runs) - len(good)} failed)"
        time_cell = f"{statistics.median(seconds):.2f} [{min(seconds):.2f}-{max(seconds):.2f}]{note}"
        if "runs" in first:
            time_cell += f"; pruned model fails: {first['runs']}"
        width = first["embedding"]
        cells = [
            model,
            label,
            time_cell,
            ratio(first["params"], 1e6, "M"),
            ratio(first.get("macs"), 1e9, "G"),
            f"{width[0]} -> {width[1]}",
            f"{first['heads'][0]} of {first['heads'][1]}",
            f"{peak / first['fp32_mb']:.2f}x (+{added / first['fp32_mb']:.2f}x) of {first['fp32_mb'] / 1024:.2f} GiB",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as stream:
        cpu = next(line.split(":", 1)[1].strip() for line in stream if line.startswith("model name"))
    try:
        from importlib.metadata import version

        tp = version("torch-pruning")
    except Exception:
        tp = "not installed"
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, torch-pruning {tp}"
    )


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def profile(name: str, threads: int) -> None:
    """One export of ``name`` with its phases timed (the functions ``export`` calls, wrapped here),
    a cProfile of the whole, and a sampled RSS timeline (every 50 ms) with each phase's peak."""
    import cProfile
    import pstats

    import lightning_prune.core.export as ex
    from lightning_prune.core.graph.channel_graph import ChannelGraph

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore")
    model, example = build(name)
    with tempfile.TemporaryDirectory() as cache:
        masks = masks_for(name, "all", model, example, cache)
    size = fp32_mb(model)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), memory_mb()[0]))
            time.sleep(0.05)

    phases: list[tuple[str, float, float]] = []

    def timed(label: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases.append((label, start, time.perf_counter()))

        return wrapper

    patched = {
        "collect_masks": "masks",
        "unwrapped_copy": "copy (unwrapped_copy)",
        "zero_pruned_channels": "zero pruned channels",
        "zero_pruned_parameters": "zero pruned parameters",
        "plan": "plan",
        "shrink_model": "shrink",
        "_checked": "check (forward of the export)",
        "unshare_tensors": "unshare tensors",
        "model_output": "forward of the given model",
    }
    originals = {attr: getattr(ex, attr) for attr in patched}
    original_trace = ChannelGraph.from_model
    for attr, label in patched.items():
        setattr(ex, attr, timed(label, originals[attr]))
    ChannelGraph.from_model = timed("trace (ChannelGraph.from_model)", original_trace)
    thread = threading.Thread(target=sample, daemon=True)
    before = memory_mb()[0]
    reset_peak()
    thread.start()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    ex.export(model, masks, example, whole_channel=True)
    profiler.disable()
    total = time.perf_counter() - start
    stop.set()
    thread.join()
    for attr in patched:
        setattr(ex, attr, originals[attr])
    ChannelGraph.from_model = original_trace
    peak = memory_mb()[1]
    print(f"{name}: export {total:.1f} s; fp32 params {size / 1024:.2f} GiB; RSS before {before / size:.2f}x, ")
    print(f"peak {peak / size:.2f}x (+{(peak - before) / size:.2f}x); load average {load()}\n")
    print("| phase (in order) | s | RSS at end / fp32 | peak RSS in phase / fp32 |")
    print("|---|---|---|---|")
    for label, t0, t1 in sorted(phases, key=lambda p: p[1]):
        inside = [m for t, m in samples if t0 <= t <= t1] or [m for t, m in samples if t <= t1][-1:]
        end = next((m for t, m in samples if t >= t1), samples[-1][1] if samples else 0.0)
        print(f"| {label} | {t1 - t0:.2f} | {end / size:.2f}x | {max(inside, default=0) / size:.2f}x |")
    print("\ncProfile, top 25 by cumulative time:")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    print("cProfile, top 20 by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=MODELS, help=",".join(MODELS))
    parser.add_argument("--variants", type=lambda s: s.split(","), default=VARIANTS, help=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one run before it is stopped")
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--profile", metavar="MODEL", help="profile one export of MODEL instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--stats", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.model = args.models[0]
        worker(args)
        return
    if args.profile:
        profile(args.profile, args.threads)
        return
    torch.set_num_threads(args.threads)
    print(f"<!-- {machine()} -->")
    print(f"<!-- load average at start (1/5/15 min): {load()} -->", flush=True)
    tools = list(args.variants)
    if not args.no_torch_pruning:
        tools.append("torch-pruning")
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {(m, t): [] for m in args.models for t in tools}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        for repeat in range(args.repeats):
            for model in args.models:
                for tool in tools:
                    if (model, tool) in SKIP:
                        rows[(model, tool)] = [{"error": SKIP[(model, tool)]}]
                        continue
                    if repeat and all("error" in r for r in rows[(model, tool)]):
                        continue  # it failed on the first repeat: no need to fail again
                    row = spawn(model, tool, args, cache, stats=repeat == 0)
                    rows[(model, tool)].append(row)
                    shown = row.get("error") or f"{row['seconds']:.2f} s"
                    print(f"<!-- repeat {repeat + 1} {model} {tool}: {shown}; load {load()} -->", flush=True)
    print()
    print(table(rows))
    print(f"\n<!-- {time.perf_counter() - started:.0f} s in all; load average at end (1/5/15 min): {load()} -->")


if __name__ == "__main__":
    main()
