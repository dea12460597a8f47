"""Real DDP on CPU (2 processes, gloo) through a Lightning Trainer, run as scripts in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from processes import run_script

from lightning_prune import load_pruned, verify_equivalence
from lightning_prune.lightning.demo import DigitsCNN, DigitsDataModule

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_run.py")


def run(out, devices: int, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, out, devices, *flags, timeout=timeout)


def masked_module(path) -> DigitsCNN:
    module = DigitsCNN(width=8, batch_norm=False)
    module.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    return module.eval()


@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory):
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    results = run(two, 2), run(one, 1)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return two, one


def test_ddp_writes_each_file_once_and_every_rank_sees_the_result(two_and_one) -> None:
    two, _ = two_and_one
    assert sorted(os.listdir(two / "export")) == ["masked.ckpt", "pruned.ckpt"]  # no temporary files left
    reports = [(two / f"report-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert reports[0] == reports[1] and reports[0].endswith(str(two / "export" / "pruned.ckpt"))


def test_ddp_export_equals_the_masked_model(two_and_one) -> None:
    two, _ = two_and_one
    data = DigitsDataModule()
    data.setup()
    images = next(iter(data.val_dataloader()))[0]
    small = load_pruned(two / "export" / "pruned.ckpt", DigitsCNN(width=8, batch_norm=False))
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(
        p.numel() for p in DigitsCNN(width=8, batch_norm=False).parameters()
    )
    assert verify_equivalence(masked_module(two / "export" / "masked.ckpt"), small, images).passed


def test_ddp_checkpoint_loads_into_the_bare_network(two_and_one) -> None:
    two, _ = two_and_one
    module = load_pruned(two / "export" / "pruned.ckpt", DigitsCNN(width=8, batch_norm=False)).eval()
    network = load_pruned(two / "export" / "pruned.ckpt", DigitsCNN(width=8, batch_norm=False).net).eval()
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(network(images), module(images))


def test_ddp_spawn_results_reach_the_launching_process(tmp_path) -> None:
    result = run(tmp_path, 2, "spawn")
    assert result.returncode == 0, result.stderr[-3000:]
    params, path = (tmp_path / "report-main.txt").read_text().split()
    assert path == str(tmp_path / "export" / "pruned.ckpt")
    network = load_pruned(path, DigitsCNN(width=8, batch_norm=False).net)
    assert int(params) == sum(p.numel() for p in network.parameters())
    held = torch.load(
        tmp_path / "exported-network-main.pt", weights_only=True
    )  # what the launching process's callback holds
    assert held.keys() == network.state_dict().keys()
    assert all(torch.equal(held[k], v) for k, v in network.state_dict().items())


def test_failed_masked_checkpoint_write_reaches_every_rank(tmp_path) -> None:
    result = run(tmp_path, 2, "fullwrite", timeout=180)  # a hang would time out here (start-up included)
    assert result.returncode != 0
    for rank in (0, 1):
        message = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert f"Could not write the masked checkpoint '{tmp_path / 'export' / 'masked.ckpt'}'" in message
    assert os.listdir(tmp_path / "export") == []  # no partial file left behind


def test_one_and_two_processes_export_the_same_model(two_and_one) -> None:
    two, one = two_and_one
    a = torch.load(two / "export" / "pruned.ckpt", weights_only=True)
    b = torch.load(one / "export" / "pruned.ckpt", weights_only=True)
    assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in b["masks"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, tensor in b["state_dict"].items():  # the same steps; only float summation order differs
        assert torch.allclose(a["state_dict"][key], tensor, rtol=1e-5, atol=1e-6), key


def test_rank_zero_failure_reaches_every_rank(tmp_path) -> None:
    result = run(tmp_path, 2, "fail", timeout=180)  # a hang would time out here (start-up included)
    assert result.returncode != 0
    for rank in (0, 1):
        message = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert "RuntimeError: the user's shrink function failed" in message
        assert "masked checkpoint is kept" in message
    assert sorted(os.listdir(tmp_path / "export")) == ["masked.ckpt"]


def test_gathered_full_state_path_exports_the_same(tmp_path, two_and_one) -> None:
    """The path sharded strategies take (gather, rebuild from hyper-parameters, export), run under DDP."""
    result = run(tmp_path, 2, "gather")
    assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(tmp_path / "export" / "pruned.ckpt", weights_only=True)["state_dict"]
    b = torch.load(two_and_one[0] / "export" / "pruned.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_gradual_taylor_with_distillation_under_ddp(tmp_path) -> None:
    """Taylor scores gathered on each rank, a two-step schedule and a teacher on every rank: both
    ranks end with the same exported model, which equals the masked one."""
    result = run(tmp_path, 2, "recovery")
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [(tmp_path / f"report-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert reports[0] == reports[1]
    assert [(tmp_path / f"teacher-rank{rank}.txt").read_text() for rank in (0, 1)] == ["True", "True"]
    data = DigitsDataModule()
    data.setup()
    images = next(iter(data.val_dataloader()))[0]
    small = load_pruned(tmp_path / "export" / "pruned.ckpt", DigitsCNN(width=8, batch_norm=False))
    dense = DigitsCNN(width=8, batch_norm=False)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in dense.parameters())
    assert verify_equivalence(masked_module(tmp_path / "export" / "masked.ckpt"), small, images).passed


def test_activation_importance_adds_every_ranks_batches_under_ddp(tmp_path) -> None:
    """Two ranks, each calibrating on its half of the samples, rank on the sums of both: what one
    process calibrating on all of them ranks on, and so the same masks."""
    two, one = tmp_path / "two", tmp_path / "one"
    for out, devices in ((two, 2), (one, 1)):
        out.mkdir()
        result = run(out, devices, "activation")
        assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((two / f"activation-rank{rank}.json").read_text()) for rank in (0, 1)]
    single = json.loads((one / "activation-rank0.json").read_text())
    assert ranks[0] == ranks[1]
    assert ranks[0]["counts"] == single["counts"]  # every rank's positions, not half of them
    assert ranks[0]["sums"].keys() == single["sums"].keys()
    for layer, total in single["sums"].items():
        assert abs(ranks[0]["sums"][layer] - total) <= 1e-4 * total, layer
    assert ranks[0]["masks"] == single["masks"]


def test_activation_sums_resume_mid_accumulation_under_ddp(tmp_path) -> None:
    """Interrupted after epoch 0 of the two it accumulates over, the resumed run ranks on the sums an
    uninterrupted one does: the checkpoint keeps every rank's share, not rank zero's batches alone."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for out, flags in ((whole, ["late"]), (parts, ["late", "stop"]), (parts, ["late", "resume"])):
        out.mkdir(exist_ok=True)
        result = run(out, 2, "activation", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = json.loads((whole / "activation-rank0.json").read_text())
    resumed = [json.loads((parts / f"activation-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert resumed[0] == resumed[1]
    assert resumed[0]["counts"] == uninterrupted["counts"]
    for layer, total in uninterrupted["sums"].items():
        assert abs(resumed[0]["sums"][layer] - total) <= 1e-4 * total, layer
    assert resumed[0]["masks"] == uninterrupted["masks"]
