"""What the recovery benchmarks share: the recipes, the loop over seeds, budgets and recipes, the table.

The recipes (:func:`recipes`), each from the dense checkpoint with the same training steps, in
``EPOCHS`` epochs, pruning inside them:

  one-shot, masked                 ``pruner="l2"`` at the start, then masked fine-tuning
  one-shot + distill               the same with ``distill=`` (each benchmark says which)
  gradual                          ``pruner="l2"``, ``schedule`` of 3 steps at epochs 1 to 3, cubic ramp
  gradual + Taylor                 the same with ``pruner="taylor"``
  gradual + distill                gradual L2 with the same ``distill=``
  one-shot + distill, pruned size  one-shot + distill with ``finetune="pruned"`` (the smaller model trains)
  one-shot, activation             ``pruner="activation"`` at the start (scored on 8 training batches), masked
  one-shot + distill, activation   the same with ``distill=``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

from lightning_prune import PruneExportCallback

EPOCHS = 8  # every recipe trains this many epochs
Table = dict[tuple[str, str], dict[str, list[float]]]


@contextmanager
def threads(count: int) -> Iterator[None]:
    """Torch's intra-op threads inside the block: a sum split over another number of threads rounds
    differently, and a network trained from those sums ends elsewhere (the image task's dense model: 0.828
    held-out accuracy on one thread, 0.857 on two), so each benchmark fixes how many it trains on."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet() -> None:
    """No warnings or Lightning info lines, for a benchmark run as a script (the recipes' callbacks
    time no latency: ``measure_latency=False``)."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_prune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def recipes(distill: bool | Mapping[str, Any] = True) -> dict[str, dict[str, Any]]:
    """The recipes, each the callback's arguments beyond the budget's ``sparsity``. Every recipe trains
    ``EPOCHS`` epochs; one-shot prunes at the start, a schedule at the start of epochs 1, 2 and 3
    (Taylor needs gradients first); ``distill`` is the callback's ``distill=``."""
    one_shot, distill = {"pruner": "l2"}, {"distill": distill if isinstance(distill, bool) else dict(distill)}
    gradual = {"schedule": {"start_epoch": 1, "end_epoch": 3, "steps": 3}}
    return {
        "one-shot, masked": one_shot,
        "one-shot + distill": {**one_shot, **distill},
        "gradual": {**one_shot, **gradual},
        "gradual + Taylor": {"pruner": "taylor", **gradual},
        "gradual + distill": {**one_shot, **distill, **gradual},
        "one-shot + distill, pruned size": {**one_shot, **distill, "finetune": "pruned"},
        "one-shot, activation": {"pruner": "activation"},
        "one-shot + distill, activation": {"pruner": "activation", **distill},
    }


def trainer(root: str, callbacks: list[L.Callback], **limits: int) -> L.Trainer:
    """A quiet Trainer: no logger, checkpoints, progress bar or sanity check."""
    return L.Trainer(
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        **limits,
    )


def params(network: nn.Module) -> int:
    """Distinct parameters (a tied weight counted once)."""
    return sum(p.numel() for p in {id(p): p for p in network.parameters()}.values())


def run_recipes(
    fit: Callable[[int, str, L.Callback], tuple[nn.Module, Mapping[str, float]]],
    recipes: Mapping[str, Mapping[str, Any]],
    budgets: Mapping[str, float],
    seeds: Iterable[int],
    dense: nn.Module,
    common: Mapping[str, Any],
) -> Table:
    """Every recipe at every budget for every seed: ``fit(seed, recipe name, callback)`` trains from the
    dense checkpoint and returns the exported network and its scores by split (``{"test": ...}``, and
    ``"validation"`` where the benchmark has one); the table holds each split's scores and the share of
    the dense model's parameters kept."""
    table: Table = {}
    dense_params = params(dense)
    for seed in seeds:
        for budget, sparsity in budgets.items():
            for name, options in recipes.items():
                L.seed_everything(100 + seed, verbose=False)
                callback = PruneExportCallback(sparsity=sparsity, measure_latency=False, **common, **options)
                with threads(1):  # the same numbers whatever `--jobs` and the machine's cores
                    network, scores = fit(seed, name, callback)
                row = table.setdefault((budget, name), {"kept": []})
                for split, score in scores.items():
                    row.setdefault(split, []).append(score)
                row["kept"].append(params(network) / dense_params)
                shown = ", ".join(f"{split} {score:.3f}" for split, score in scores.items())
                print(f"seed {seed} ~{budget} {name}: {shown} (kept {row['kept'][-1]:.1%})", flush=True)
    return table


def spread(values: list[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else 0.0


def spread_table(table: Table, what: str, split: str = "test", lower_is_better: bool = False) -> str:
    """A markdown table of one split's scores: recipes down, budgets across, ``mean ± spread (share of
    params kept)`` in each cell, and the gap to the first recipe (one-shot) with ``*`` where it exceeds
    both spreads."""
    budgets = list(dict.fromkeys(budget for budget, _ in table))
    names = list(dict.fromkeys(name for _, name in table))
    lines = [
        f"| recipe ({what}) | " + " | ".join(f"~{b} params kept" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for name in names:
        cells = []
        for budget in budgets:
            score, kept = table[(budget, name)][split], table[(budget, name)]["kept"]
            cell = f"{statistics.mean(score):.3f} ± {spread(score):.3f} ({statistics.mean(kept):.0%})"
            base = table[(budget, names[0])][split]
            if name != names[0]:
                gap = statistics.mean(base) - statistics.mean(score)
                gap = gap if lower_is_better else -gap
                beyond = len(score) > 1 and abs(gap) > max(spread(base), spread(score))
                cell += f", {gap:+.3f}{'*' if beyond else ''}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------- the runs shared out over processes
Unit = tuple[int, str]  # (seed, budget): what one job runs for every recipe


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser``'s arguments, with ``--jobs`` (default: one process per core, at most two) and a job's own
    hidden ones (its share of the runs, the file its table goes to)."""
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes sharing the runs")
    parser.add_argument("--units", help=argparse.SUPPRESS)  # a job's share: "seed:budget,..."
    parser.add_argument("--table-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    return args


def run_benchmark(
    args: argparse.Namespace,
    script: str,
    options: list[Any],
    root: str,
    fit: Callable[[int, str, L.Callback], tuple[nn.Module, Mapping[str, float]]],
    every_recipe: Mapping[str, Mapping[str, Any]],
    sparsity: Mapping[str, float],
    dense: L.LightningModule,
    common: Mapping[str, Any],
) -> Table:
    """The benchmark's table: :func:`run_recipes` for the recipes ``--recipes`` names (default: all of
    ``every_recipe``) at every (seed, budget) of ``args`` (``--seeds`` from ``--first-seed``, ``--budgets``; a
    job: its ``--units``), here or, with ``--jobs`` above 1, shared out over that many processes of ``script``
    given ``options`` (the script's own arguments its jobs need; the recipes and the dense model's file,
    ``dense``'s state, are added). The tables are merged in the order one process makes them; every run is
    seeded on its own and trains on one thread, so the table is the same whatever the number of jobs."""
    if args.units:
        units = [(int(seed), budget) for seed, budget in (unit.split(":") for unit in args.units.split(","))]
    else:
        units = [(seed, b) for seed in range(args.first_seed, args.first_seed + args.seeds) for b in args.budgets]
    if args.jobs > 1 and len(units) > 1:
        options = [*options, "--dense-cache", _dense_file(args, root, dense)]
        options += ["--recipes", *args.recipes] if args.recipes else []
        return _in_parallel(script, options, units, args.jobs, root)
    chosen = {name: recipe for name, recipe in every_recipe.items() if name in (args.recipes or [name])}
    done = [run_recipes(fit, chosen, {budget: sparsity[budget]}, [seed], dense.model, common) for seed, budget in units]
    if args.table_out:
        Path(args.table_out).write_text(json.dumps([[[*key, row] for key, row in table.items()] for table in done]))
    return merged(done)


def _dense_file(args: argparse.Namespace, root: str, dense: nn.Module) -> str:
    """Where the jobs load the dense model from: ``--dense-cache`` if it exists, else a file under ``root``."""
    if not (args.dense_cache and os.path.exists(args.dense_cache)):
        args.dense_cache = f"{root}/dense.pt"
        torch.save(dense.state_dict(), args.dense_cache)
    return args.dense_cache


def _in_parallel(script: str, options: list[Any], units: list[Unit], jobs: int, root: str) -> Table:
    shares = [units[job::jobs] for job in range(min(jobs, len(units)))]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # every run trains on one thread (run_recipes)
    running = []
    for job, share in enumerate(shares):
        out = f"{root}/table{job}.json"
        command = [sys.executable, script, *map(str, options), "--jobs", "1", "--table-out", out]
        command += ["--units", ",".join(f"{seed}:{budget}" for seed, budget in share)]
        running.append((share, out, subprocess.Popen(command, env=environment)))
    done: dict[Unit, Table] = {}
    for share, out, process in running:
        if process.wait() != 0:
            raise SystemExit(f"the job running {share} failed (exit {process.returncode}); its output is above")
        for unit, rows in zip(share, json.loads(Path(out).read_text()), strict=True):
            done[unit] = {(budget, name): row for budget, name, row in rows}
    return merged([done[unit] for unit in units])


def merged(tables: list[Table]) -> Table:
    """One table of several, each row's lists joined in the order given (seeds in order)."""
    joined: Table = {}
    for table in tables:
        for key, row in table.items():
            for column, values in row.items():
                joined.setdefault(key, {}).setdefault(column, []).extend(values)
    return joined
