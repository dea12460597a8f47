"""`finetune="pruned"` under real DDP (2 CPU processes, gloo), run as scripts in subprocesses: every
rank shrinks its module, DDP wraps it again, training goes on at the pruned size, the ranks end
identical, `pruned.ckpt` loads into the bare network, and a run resumed after the shrink ends as an
uninterrupted one. A rank that differs or fails at the shrink stops every rank."""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from processes import run_script

from lightning_prune import ConfigurationError, PruneExportCallback, load_pruned
from lightning_prune.lightning.demo import DigitsCNN

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_pruned_run.py")


def run(out, *flags: str) -> subprocess.CompletedProcess:
    # a hang would time out here (start-up included)
    return run_script(SCRIPT, out, *flags, timeout=240)


def network() -> torch.nn.Module:
    return DigitsCNN(width=8, batch_norm=False).net


def records(out, name: str) -> list[dict]:
    return [torch.load(out / f"{name}-rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_every_rank_fine_tunes_the_smaller_model(uninterrupted) -> None:
    dense = sum(p.numel() for p in DigitsCNN(width=8, batch_norm=False).parameters())
    for shrunk, end in zip(records(uninterrupted, "shrink"), records(uninterrupted, "end"), strict=True):
        assert shrunk["params"] == end["params"] < 0.5 * dense
        assert shrunk["wrapped"] and end["wrapped"] and shrunk["optimized"] and end["optimized"]
        assert shrunk["net"].keys() == end["net"].keys()
        # every layer trained on after the shrink
        assert all(not torch.equal(shrunk["net"][k], end["net"][k]) for k in end["net"])


def test_the_ranks_end_with_the_same_network_and_it_is_the_export(uninterrupted) -> None:
    """Each rank reads other batches: the networks stay identical only if DDP all-reduces the new
    parameters' gradients (the wrapper of the full-size module would not)."""
    rank0, rank1 = (record["net"] for record in records(uninterrupted, "end"))
    assert_equal(rank0, rank1)
    assert_equal(rank0, torch.load(uninterrupted / "exported-rank0.pt", weights_only=True))
    assert sorted(os.listdir(uninterrupted / "export")) == ["masked.ckpt", "pruned.ckpt"]  # written once
    assert_equal(rank0, load_pruned(uninterrupted / "export" / "pruned.ckpt", network()).state_dict())


def test_resume_after_the_shrink_equals_an_uninterrupted_run(uninterrupted, tmp_path) -> None:
    checkpoint = uninterrupted / "ckpt" / "epoch=1.ckpt"  # taken after the shrink (end of epoch 0)
    result = run(tmp_path, f"resume={checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (record["net"] for record in records(tmp_path, "end"))
    assert_equal(rank0, rank1)
    resumed = torch.load(tmp_path / "export" / "pruned.ckpt", weights_only=True)["state_dict"]
    whole = torch.load(uninterrupted / "export" / "pruned.ckpt", weights_only=True)["state_dict"]
    assert resumed.keys() == whole.keys()
    for key, tensor in whole.items():
        assert torch.allclose(resumed[key], tensor, rtol=1e-5, atol=1e-6), key


def test_a_rank_whose_model_differs_stops_every_rank(tmp_path) -> None:
    result = run(tmp_path, "diverge")
    assert result.returncode != 0
    for rank in (0, 1):
        message = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert "ranks [1] built a pruned model that differs from rank 0's" in message
        assert "HINT: change the module the same way on every rank" in message
    assert os.listdir(tmp_path / "export") == []


def test_a_rank_that_fails_to_shrink_stops_every_rank(tmp_path) -> None:
    result = run(tmp_path, "rank1fails")
    assert result.returncode != 0
    assert (tmp_path / "error-rank1.txt").read_text() == "RuntimeError: the user's shrink function failed"
    message = (tmp_path / "error-rank0.txt").read_text()
    assert "rank 1 could not build the pruned model (RuntimeError: the user's shrink function failed)" in message
    assert os.listdir(tmp_path / "export") == []


def test_other_multi_process_strategies_are_refused(tmp_path) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", default_root_dir=tmp_path, logger=False)
    message = "cannot run under DDPStrategy started by `ddp_spawn` or `ddp_fork`.*HINT: use strategy='ddp'"
    with pytest.raises(ConfigurationError, match=message):
        PruneExportCallback(finetune="pruned")._resizing.check_strategy(trainer)
    PruneExportCallback(finetune="masked")._resizing.check_strategy(trainer)  # the masked fine-tune runs there
    # Lightning builds no CPU trainer with FSDPStrategy, so the strategy alone stands in a trainer's place
    fsdp = SimpleNamespace(strategy=pl.strategies.FSDPStrategy())
    message = "single device, under DDP \\(strategy='ddp'\\) and under ModelParallelStrategy \\(FSDP2\\) only; the trainer uses FSDPStrategy"
    with pytest.raises(ConfigurationError, match=message):
        PruneExportCallback(finetune="pruned")._resizing.check_strategy(fsdp)
    model_parallel = pl.Trainer(
        accelerator="cpu", devices=2, strategy=pl.strategies.ModelParallelStrategy(), logger=False
    )
    PruneExportCallback(finetune="pruned")._resizing.check_strategy(
        model_parallel
    )  # FSDP2: tests/test_sharded_pruned.py
