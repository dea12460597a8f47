"""Peak memory per rank of the callback under fully sharded training (FSDP2), on 2 CPU processes.

    python benchmarks/sharded.py            # a 0.51B LLaMA-shaped model, fp32; about 12 GB of RAM in all
    python benchmarks/sharded.py --small    # a tiny one (the test suite runs this)

The model is Hugging Face's ``LlamaForCausalLM`` with random weights in fp32: hidden 1280, 24 layers,
20 query / 4 key-value heads, MLP 3584, vocabulary 32000, an untied LM head (the exact count is
printed). A user's LightningModule applies ``fully_shard`` to each decoder layer and then to the
whole model in ``configure_model``; a real ``Trainer`` fine-tunes it with
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` on 2 CPU processes (gloo),
plain SGD (no optimizer state, so the step's figure is the sharded training's own), batches of one
sequence of 32 random tokens, two steps. ``PruneExportCallback(pruner="l1", sparsity=0.5,
op_types=["Linear"], prune_on_epoch=0, verify_batches=1)`` prunes when training starts (trace,
scores, hold), holds the masks through the steps, and at the end writes the masked (distributed)
checkpoint, exports from the shards on every rank, verifies and writes ``pruned.ckpt``.

Each rank measures its own process: the peak RSS during each phase (the high-water mark reset through
``/proc/self/clear_refs`` as the phase starts; a callback before ours opens the phase, one after ours
closes it), the RSS when the phase began, and its seconds. Phases: ``prune`` (``on_train_start``),
``step 1``, ``step 2`` (batch start to batch end: forward, backward, hold, optimizer step) and
``export`` (``on_train_end``: masked checkpoint, export, verification, ``pruned.ckpt``). "x fp32"
divides by the whole model's fp32 parameter bytes. Also printed: each rank's own shard (its part of the
parameters when training starts), the pruned model's size and the callback's report. The run is one fresh process per rank, launched by
this script, which prints the table, the machine and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

FULL = {
    "hidden_size": 1280,
    "num_hidden_layers": 24,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "intermediate_size": 3584,
    "vocab_size": 32000,
    "sequence": 32,
    "batch": 1,
}
SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 100,
    "sequence": 8,
    "batch": 2,
}
STEPS = 2
PHASES = ["prune", *(f"step {n}" for n in range(1, STEPS + 1)), "export"]
GIB = 2**30


class Phases:
    """Each phase's peak RSS, starting RSS and seconds in this process (Linux's ``VmHWM``, reset at the start)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.shard_bytes = 0  # this rank's own part of the parameters, when training starts
        self._current: tuple[str, float, float] | None = None

    def open(self, name: str) -> None:
        """Start phase ``name``: reset the high-water mark to what is resident now."""
        from transformer_export import memory_mb, reset_peak

        if not reset_peak():
            raise SystemExit("this benchmark needs /proc/self/clear_refs (Linux) to reset the peak RSS per phase")
        self._current = (name, memory_mb()[0], time.perf_counter())

    def close(self) -> None:
        """End the open phase: its peak RSS since :meth:`open`."""
        from transformer_export import memory_mb

        assert self._current is not None, "a phase closed that never opened"
        name, before, start = self._current
        seconds = time.perf_counter() - start
        self.rows.append({"phase": name, "before_mb": before, "peak_mb": memory_mb()[1], "seconds": seconds})
        self._current = None

    def callbacks(self) -> tuple[Any, Any]:
        """Two Lightning callbacks: put the first before the callback measured and the second after it."""
        import pytorch_lightning as pl
        from typing_extensions import override

        phases = self

        class Opens(pl.Callback):
            @override
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                from lightning_prune.core.sharded import is_dtensor

                local = [p.to_local() if is_dtensor(p) else p for p in pl_module.parameters()]
                phases.shard_bytes = sum(t.numel() * t.element_size() for t in local)
                phases.open("prune")

            @override
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                phases.open(f"step {trainer.global_step + 1}")

            @override
            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                phases.open("export")

        class Closes(pl.Callback):
            @override
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                phases.close()

            @override
            def on_train_batch_end(
                self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
            ) -> None:
                phases.close()

            @override
            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                phases.close()

        return Opens(), Closes()


def worker(out: str, config: dict[str, int]) -> None:
    """One rank's run (Lightning starts the second rank by running this same command again)."""
    import pytorch_lightning as pl
    import torch
    import transformers
    from pytorch_lightning.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader

    from lightning_prune import PruneExportCallback

    class ShardedLlama(pl.LightningModule):
        """A user's module: ``self.model`` the Hugging Face model, sharded layer by layer in ``configure_model``."""

        def __init__(self, config: dict[str, int]) -> None:
            super().__init__()
            self.save_hyperparameters()
            sizes = {k: v for k, v in config.items() if k not in ("sequence", "batch")}
            self.model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    module = ShardedLlama(config)
    params = sum(p.numel() for p in module.parameters())
    ids = torch.randint(0, config["vocab_size"], (8 * config["batch"], config["sequence"]))
    samples = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    phases = Phases()
    opens, closes = phases.callbacks()
    callback = PruneExportCallback(
        pruner="l1",
        sparsity=0.5,
        op_types=["Linear"],
        prune_on_epoch=0,
        verify_batches=1,
        export_dir=os.path.join(out, "export"),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
        callbacks=[opens, callback, closes],
    )
    trainer.fit(module, DataLoader(samples, batch_size=config["batch"]))
    network = callback.exported_network
    report = callback.report
    record = {
        "rank": trainer.global_rank,
        "params": params,
        "shard_bytes": phases.shard_bytes,
        "pruned_params": sum(p.numel() for p in network.parameters()),
        "pruned_bytes": sum(p.numel() * p.element_size() for p in network.parameters()),
        "phases": phases.rows,
        "report": {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as handle:
        json.dump(record, handle)


def machine() -> str:
    """The machine, as the table's caption gives it."""
    import lightning
    import torch
    import transformers

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"transformers {transformers.__version__}"
    )


def table(records: list[dict[str, Any]]) -> str:
    """Rank x phase: peak RSS, peak over the model's fp32 bytes, RSS at the phase's start, seconds."""
    fp32 = records[0]["params"] * 4
    lines = [
        "| rank | phase | peak RSS GiB | peak / fp32 model | RSS at start GiB | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for record in records:
        for row in record["phases"]:
            peak = row["peak_mb"] * 2**20
            cells = [record["rank"], row["phase"], f"{peak / GIB:.2f}", f"{peak / fp32:.2f}x"]
            cells += [f"{row['before_mb'] / 1024:.2f}", f"{row['seconds']:.1f}"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def summary(records: list[dict[str, Any]], config: dict[str, int], loads: tuple[str, str]) -> str:
    """What the table is about: the model, the shards, the pruned model, the callback's report, the machine."""
    first = records[0]
    report = first["report"]
    fp32 = first["params"] * 4
    shards = ", ".join(f"rank {r['rank']} {r['shard_bytes'] / GIB:.2f} GiB" for r in records)
    return "\n".join(
        [
            f"model: LlamaForCausalLM {json.dumps(config)}: {first['params']:,} parameters, fp32 {fp32 / GIB:.2f} GiB",
            f"own shard: {shards}",
            f"pruned model: {first['pruned_params']:,} parameters, {first['pruned_bytes'] / GIB:.2f} GiB "
            f"({first['pruned_bytes'] / fp32:.2f}x), built on every rank",
            f"callback report: export_seconds {report.get('export_seconds', float('nan')):.1f}, "
            f"verified_batches {report.get('verified_batches')}, "
            f"max_relative_error {report.get('max_relative_error', float('nan')):.2e}",
            f"machine: {machine()}; load average (1/5/15 min) {loads[0]} at start, {loads[1]} at end",
        ]
    )


def run(out: str, small: bool, timeout: int) -> list[dict[str, Any]]:
    """Run both ranks (a fresh process each) and read what each wrote."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, os.path.abspath(__file__), "--worker", out, *(["--small"] if small else [])]
    with open(os.path.join(out, "log.txt"), "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env, check=False)
    if result.returncode != 0:
        with open(os.path.join(out, "log.txt")) as log:
            raise SystemExit(f"the sharded run failed (exit {result.returncode}):\n{log.read()[-4000:]}")
    return [json.load(open(os.path.join(out, f"rank{rank}.json"))) for rank in (0, 1)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table; the records, the table and the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny model (seconds), as the test suite runs it")
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--keep", metavar="DIR", help="write the run's files here and keep them")
    parser.add_argument("--timeout", type=int, default=3600)
    args = parser.parse_args(argv)
    config = SMALL if args.small else FULL
    if args.worker:
        worker(args.worker, config)
        return {}
    from transformer_export import load

    out = args.keep or tempfile.mkdtemp(prefix="sharded-benchmark-")
    os.makedirs(out, exist_ok=True)
    start = load()
    try:
        records = run(out, args.small, args.timeout)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    text, about = table(records), summary(records, config, (start, load()))
    print(text, about, sep="\n\n")
    return {"records": records, "table": text, "summary": about}


if __name__ == "__main__":
    main()
