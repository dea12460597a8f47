"""Export time before and after a change to ``core/export.py``, in one process, interleaved; prints a markdown table.

    python benchmarks/selfcheck_speed.py --before 6fb0a23          # the four models, 3 repeats each
    python benchmarks/selfcheck_speed.py --before HEAD~1 --models swin_t --repeats 5

"before" is ``lightning_prune/core/export.py`` as it was at git revision ``--before``, loaded beside the
working tree's (everything else it imports is the working tree's); "after" is the working tree's.
Per model: the model, its example and its masks are built once, then each repeat runs before and after
one after the other (before first, then after first, in turn), so the machine's drifting load falls on
both alike; median [min-max] of the
repeats, the self-check's share (``ExportResult.timings["check"]``) and the retries it caused.

Models and masks as the export benchmarks build them (random init, norms and biases randomised):
``resnet50`` and ``mobilenet_v2`` (1x3x224x224) and ``vit_b_16`` (heads, MLP and embedding width) as in
``benchmarks/export_speed.py``; ``swin_t`` with heads and MLP (``benchmarks/transformer_export.py``'s
``heads+mlp``); ``resnet50@8``, resnet50 on a batch of 8 (a validation batch, as the callback traces
with). Every export is ``export(model, masks, x, whole_channel=True)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "tests")]
import export_speed  # noqa: E402  (the CNN and ViT builds and masks)
import transformer_export as tx  # noqa: E402  (swin_t, its heads+mlp masks)

MODELS = ["resnet50", "mobilenet_v2", "vit_b_16", "swin_t", "resnet50@8"]


def export_at(revision: str) -> Any:
    """``export`` as ``core/export.py`` defined it at ``revision``; where its result has no ``retries``,
    they are counted here (the calls of its ``_retry_overrides`` that kept something)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:lightning_prune/core/export.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    module = types.ModuleType(f"lightning_prune.core.export_at_{revision.replace('~', '_')}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:lightning_prune/core/export.py", "exec"), module.__dict__)
    retried = [0]
    if hasattr(module, "_retry_overrides"):
        inner = module._retry_overrides

        def counted(*args: Any) -> Any:
            kept = inner(*args)
            retried[0] += bool(kept)
            return kept

        module._retry_overrides = counted

    def export(*args: Any, **kwargs: Any) -> Any:
        retried[0] = 0
        result = module.export(*args, **kwargs)
        if not hasattr(result, "retries"):
            result.retries = retried[0]
        return result

    return export


def setup(name: str, cache: str) -> tuple[torch.nn.Module, Any, dict]:
    """The model, its example input and its masks."""
    if name == "swin_t":
        model, example = tx.build(name)
        return model, example, tx.masks_for(name, "heads+mlp", model, example, cache)
    base, _, batch = name.partition("@")
    model, example = export_speed.build(base)
    if batch:
        example = torch.randn(int(batch), *example.shape[1:], generator=torch.Generator().manual_seed(1))
    return model, example, export_speed.masks_for(base, model, example, cache)


def timed(export: Any, model: torch.nn.Module, example: Any, masks: dict) -> dict[str, float]:
    start = time.perf_counter()
    result = export(model, masks, example, whole_channel=True, progress=False)
    return {
        "seconds": time.perf_counter() - start,
        "check": result.timings.get("check", 0.0),
        "retries": result.retries,
        "params": sum(p.numel() for p in result.model.parameters()),
    }


def _cell(runs: list[dict[str, float]]) -> str:
    seconds = sorted(r["seconds"] for r in runs)
    return f"{statistics.median(seconds):.2f} [{seconds[0]:.2f}-{seconds[-1]:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of core/export.py to compare with")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    warnings.filterwarnings("ignore")
    from lightning_prune import export

    tools = {"before": export_at(args.before), "after": export}
    print(f"<!-- {tx.machine()}; {args.threads} thread(s); load at start {tx.load()} -->", flush=True)
    lines = ["| model | export s before | export s after | check s before / after | retries before / after |"]
    lines.append("|---|---|---|---|---|")
    cache = tempfile.mkdtemp()
    for name in args.models.split(","):
        model, example, masks = setup(name, cache)
        runs: dict[str, list[dict[str, float]]] = {tool: [] for tool in tools}
        for repeat in range(args.repeats):  # before first, then after first, and so on
            for tool in sorted(tools, reverse=bool(repeat % 2)):
                runs[tool].append(timed(tools[tool], model, example, masks))
        assert runs["before"][0]["params"] == runs["after"][0]["params"], f"{name}: the exports differ in size"

        checks = " / ".join(f"{statistics.median(r['check'] for r in runs[tool]):.2f}" for tool in tools)
        retries = " / ".join(f"{runs[tool][0]['retries']:g}" for tool in tools)
        lines.append(f"| {name} | {_cell(runs['before'])} | {_cell(runs['after'])} | {checks} | {retries} |")
        print(lines[-1], flush=True)
    print(f"<!-- load at end {tx.load()} -->\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
