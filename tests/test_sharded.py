"""Fully sharded training (FSDP2: Lightning's ModelParallelStrategy with torch's fully_shard) on 2 CPU
processes with gloo, each run a real Trainer in a subprocess (tests/sharded_run.py)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from helpers import randomize
from processes import run_script
from sharded_run import Net, ShardedDigits, loaders, one_rank_trainer

from lightning_prune import ConfigurationError, PruneExportCallback, load_pruned
from lightning_prune.core.graph.channel_graph import ChannelGraph

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_run.py")


def run(out, case: str, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, out, case, *flags, timeout=timeout)


def records(out) -> list[dict]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def masked_network(state: dict) -> Net:
    network = Net()
    network.load_state_dict(state)
    return network.eval()


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run per case, on demand (several tests read each)."""
    done: dict[str, object] = {}

    def get(case: str):
        if case not in done:
            out = tmp_path_factory.mktemp(case)
            result = run(out, case)
            assert result.returncode == 0, result.stderr[-3000:]
            done[case] = out
        return done[case]

    return get


CASES = [
    pytest.param("l1", id="l1"),
    pytest.param("l2", id="l2"),
    pytest.param("fpgm", id="fpgm"),
    pytest.param("bn_scale", id="bn_scale"),
    pytest.param("taylor", id="taylor-schedule-global"),
    pytest.param("activation", id="activation"),
    pytest.param("masks", id="given-masks"),
]


@pytest.mark.parametrize("case", CASES)
def test_export_equals_the_gathered_masked_network(finished, case) -> None:
    out = finished(case)
    rank0, rank1 = records(out)
    assert rank0["masks"].keys() == rank1["masks"].keys() and rank0["masks"]
    assert all(torch.equal(rank0["masks"][k], rank1["masks"][k]) for k in rank0["masks"])
    assert rank0["exported"].keys() == rank1["exported"].keys()
    assert all(torch.equal(v, rank1["exported"][k]) for k, v in rank0["exported"].items())  # the same on each rank
    assert rank0["sharded_at_end"] and rank1["sharded_at_end"]  # the export's forward left no layer gathered
    small = load_pruned(out / "export" / "pruned.ckpt", Net()).eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in Net().parameters())
    assert all(torch.equal(v, rank0["exported"][k]) for k, v in small.state_dict().items())
    unseen = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert relative_error(masked_network(rank0["masked"])(unseen), small(unseen)) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_masks_are_held_on_the_shards(finished, case) -> None:
    rank0, _ = records(finished(case))
    masked = rank0["masked"]
    for layer, keep in rank0["masks"].items():
        name = layer.removeprefix("model.")
        assert torch.count_nonzero(masked[f"{name}.weight"][~keep]) == 0  # gathered pruned filters: exactly zero
        assert torch.count_nonzero(masked[f"{name}.bias"][~keep]) == 0
        norm = name.replace("conv", "bn")  # the norm each pruned conv feeds
        assert torch.count_nonzero(masked[f"{norm}.weight"][~keep]) == 0
        assert torch.count_nonzero(masked[f"{norm}.bias"][~keep]) == 0
        assert torch.count_nonzero(masked[f"{name}.weight"][keep]) > 0  # what is kept trained on


def test_the_sharded_trace_gives_the_unsharded_graph(finished) -> None:
    rank0, rank1 = records(finished("l1"))
    module = ShardedDigits()
    unsharded = ChannelGraph.from_model(module, torch.randn(2, 1, 8, 8))
    expected = sorted(sorted(group) for group in unsharded.group_members().values())
    assert rank0["groups"] == expected and rank1["groups"] == expected


def test_taylor_scores_come_from_the_sharded_gradients_the_same_on_every_rank(finished) -> None:
    rank0, rank1 = records(finished("taylor"))
    sums = [(a, b) for a, b in zip(rank0["taylor"], rank1["taylor"], strict=True) if a is not None]
    assert sums, "no Taylor sums were accumulated before a pruning step"
    for a, b in sums:
        assert a.shape == b.shape and a.any()
        assert (a == b).all()  # reduced across the ranks: identical, not each rank's half


def test_resume_from_a_sharded_checkpoint_mid_schedule_equals_an_uninterrupted_run(tmp_path, finished) -> None:
    first = tmp_path / "first"
    result = run(first, "taylor", "every_epoch")
    assert result.returncode == 0, result.stderr[-3000:]
    between = sorted((first / "ckpt").iterdir())
    # saved at the end of epoch 0, after the pruning step taken there (step 1), before step 2 (end of epoch 1)
    middle = next(path for path in between if path.name.startswith("epoch=0"))
    assert middle.is_dir()  # a distributed checkpoint: one directory, a shard per rank
    states = torch.load(middle / "meta.pt", weights_only=False)["callbacks"]
    assert [s["steps_done"] for k, s in states.items() if k.startswith("PruneExportCallback")] == [1]
    resumed = tmp_path / "resumed"
    result = run(resumed, "taylor", f"resume={middle}")
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted, again = records(finished("taylor"))[0], records(resumed)[0]
    assert all(torch.equal(uninterrupted["masks"][k], again["masks"][k]) for k in uninterrupted["masks"])
    assert again["exported"].keys() == uninterrupted["exported"].keys()
    for key, value in uninterrupted["exported"].items():
        torch.testing.assert_close(again["exported"][key], value, rtol=1e-5, atol=1e-6)


def test_a_failing_export_ends_every_rank_with_its_error_and_keeps_the_training(tmp_path) -> None:
    result = run(tmp_path, "l1", "fail", timeout=240)  # a hang raises TimeoutExpired: the test fails
    assert result.returncode != 0
    for rank in (0, 1):
        message = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert "the user's shrink function failed" in message and "masked.ckpt" in message
    assert sorted(os.listdir(tmp_path / "export")) == ["masked.ckpt"]  # the training is kept, no partial file


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        pytest.param({"pruner": "nni-l1", "sparsity": 0.5}, "pruner='nni-l1'", id="nni-pruner"),
        pytest.param({"pruner": None}, "masks read from the model's own zeros", id="masks-read-from-the-model"),
    ],
)
def test_what_sharded_training_cannot_do_is_refused_before_training(tmp_path, arguments, match) -> None:
    module = ShardedDigits()
    randomize(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = PruneExportCallback(export_dir=str(tmp_path / "export"), **arguments)
    trainer = one_rank_trainer(tmp_path, [callback], max_steps=2)
    with pytest.raises(ConfigurationError, match=match) as caught:
        trainer.fit(module, *loaders())
    assert "ModelParallelStrategy" in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # refused before any step


def test_a_rank_failing_before_the_pruning_step_ends_the_rank_that_entered_it(tmp_path) -> None:
    # rank 0 alone enters the collective gathers; a hang (until gloo's 30-minute timeout) would raise
    # TimeoutExpired at 240 s and fail the test
    result = run(tmp_path, "l1", "rank1_fails", timeout=240)
    assert result.returncode != 0
    assert "rank 1 failed before the pruning step" in result.stderr
    assert "remote worker crashing" in result.stderr  # rank 0's gather fails at once, naming the cause
    assert not (tmp_path / "export" / "pruned.ckpt").exists()


@pytest.mark.parametrize(
    "shard_at", [pytest.param("layer", id="each-layer"), pytest.param("network", id="whole-network")]
)
def test_any_sharding_granularity_gives_the_same_masks_and_export(tmp_path, finished, shard_at) -> None:
    result = run(tmp_path, "l1", f"shard_at={shard_at}")
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = records(tmp_path)
    per_block = records(finished("l1"))[0]  # the same run, each residual block sharded
    assert rank0["sharded_at_end"] and rank1["sharded_at_end"]
    for record in (rank0, rank1):
        assert record["masks"].keys() == per_block["masks"].keys()
        assert all(torch.equal(record["masks"][k], per_block["masks"][k]) for k in per_block["masks"])
        assert all(torch.equal(v, record["exported"][k]) for k, v in rank0["exported"].items())
    unseen = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    small = load_pruned(tmp_path / "export" / "pruned.ckpt", Net()).eval()
    with torch.no_grad():
        assert relative_error(masked_network(rank0["masked"])(unseen), small(unseen)) <= 1e-5
