"""``benchmarks/sharded.py --small`` end to end (2 CPU processes under FSDP2), so the memory benchmark cannot rot:
every rank reports every phase, and the export it measures was verified."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import sharded


def test_sharded_benchmark_measures_every_rank_and_phase(capsys) -> None:
    result = sharded.main(["--small", "--timeout", "300"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "phase" not in line]
    assert sorted((cells[0].strip(), cells[1].strip()) for cells in rows) == sorted(
        (str(rank), phase) for rank in (0, 1) for phase in sharded.PHASES
    )
    for cells in rows:
        peak, ratio, start, seconds = (float(cell.strip().rstrip("x")) for cell in cells[2:])
        assert peak > 0 and ratio > 0 and seconds >= 0 and peak >= start  # a phase's peak includes where it began
    records = result["records"]
    assert [r["rank"] for r in records] == [0, 1]
    for record in records:
        report = record["report"]
        assert report["verified_batches"] == 1 and report["max_relative_error"] <= 1e-5  # the export was verified
        assert record["pruned_params"] < record["params"]
        assert 0 < record["shard_bytes"] < record["params"] * 4  # each rank holds a part of the model, not all of it
    assert sum(r["shard_bytes"] for r in records) == records[0]["params"] * 4  # the two parts make the fp32 model
    assert records[0]["pruned_params"] == records[1]["pruned_params"]  # every rank built the same smaller model
    summary = result["summary"]
    assert "export_seconds" in summary and "load average" in summary and " cores, torch " in summary
    assert summary in out
