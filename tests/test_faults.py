"""Faults lose nothing: killed writers, full disks, truncated and hostile files."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from lightning_prune import CheckpointError, InplaceDictError, MaskError, collect_masks, export, load_pruned, save_pruned
from lightning_prune.checkpoint import atomic_save

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_writer.py")


def intact(path) -> int:
    """The version of a complete checkpoint at ``path`` (fails on a partial one)."""
    data = torch.load(path, weights_only=True)
    assert bool((data["weights"] == data["version"]).all())
    return data["version"]


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45])
def test_sigkill_during_write_leaves_old_or_new_never_partial(tmp_path, delay) -> None:
    path = tmp_path / "model.ckpt"
    writer = subprocess.Popen([sys.executable, WRITER, str(path), "loop"], stdout=subprocess.PIPE, text=True)
    try:
        first = int(writer.stdout.readline())  # one complete write is on disk
        time.sleep(delay)  # then kill it somewhere inside a later write
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
    assert writer.returncode == -signal.SIGKILL
    assert intact(path) >= first


def test_failed_write_raises_and_keeps_the_previous_file(tmp_path) -> None:
    path = tmp_path / "model.ckpt"
    atomic_save({"version": 1, "weights": torch.full((10,), 1.0)}, path)
    result = subprocess.run([sys.executable, WRITER, str(path), "full"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert f"Could not write '{path}'" in result.stdout and "previous file, if any, is unchanged" in result.stdout
    assert intact(path) == 1
    assert os.listdir(tmp_path) == ["model.ckpt"]  # the temporary file was removed


@pytest.fixture
def saved(tmp_path):
    build = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))  # noqa: E731
    result = export(build(), {"0": torch.arange(8) < 3}, torch.randn(1, 3, 8, 8))
    save_pruned(tmp_path / "pruned.ckpt", result)
    return tmp_path / "pruned.ckpt", build


def test_truncated_checkpoint(saved) -> None:
    path, build = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"Checkpoint '.*pruned\.ckpt' could not be loaded safely"):
        load_pruned(path, build())


def test_corrupted_checkpoint(saved) -> None:
    path, build = saved
    data = bytearray(path.read_bytes())
    data[100:400] = os.urandom(300)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"Checkpoint '.*pruned\.ckpt'"):
        load_pruned(path, build())


class Payload:
    """Runs code when unpickled: what a hostile file carries."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickles_are_refused_and_never_run(tmp_path) -> None:
    marker = tmp_path / "payload-ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "lightning-prune/1", "state_dict": {}, "evil": Payload(str(marker))}, hostile)
    with open(tmp_path / "hostile.pkl", "wb") as handle:
        pickle.dump({"0": Payload(str(marker))}, handle)
    with pytest.raises(CheckpointError, match=r"hostile\.pt' could not be loaded safely \(weights_only=True\)"):
        load_pruned(hostile, nn.Conv2d(3, 8, 3))
    with pytest.raises(MaskError, match=r"hostile\.pt' could not be loaded safely"):
        collect_masks(hostile)
    with pytest.raises(MaskError, match=r"hostile\.pkl' could not be loaded safely"):
        collect_masks(tmp_path / "hostile.pkl")
    yaml_file = tmp_path / "inplace.yaml"
    yaml_file.write_text(f"'0': !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(InplaceDictError, match=r"inplace\.yaml' could not be parsed"):
        export(nn.Sequential(nn.Conv2d(3, 8, 3)), {}, torch.randn(1, 3, 8, 8), inplace_dict=yaml_file)
    assert not marker.exists()
