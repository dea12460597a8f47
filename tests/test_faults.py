"""Faults lose nothing: killed writers, full disks, truncated and hostile files."""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from lightning_prune import (
    CheckpointError,
    InplaceDictError,
    MaskError,
    collect_masks,
    export,
    load_pruned,
    save_pruned,
)
from lightning_prune.core.files.atomic import atomic_save, remove_stale_temporaries, temporary_path

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
    atomic_save({"version": 1000, "weights": torch.full((10,), 1000.0)}, path)  # whatever the kill left is cleaned up
    assert os.listdir(tmp_path) == ["model.ckpt"] and intact(path) == 1000


def part_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".part"))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path) -> None:
    path = tmp_path / "model.ckpt"
    atomic_save({"version": 1, "weights": torch.full((10,), 1.0)}, path)
    writer = subprocess.Popen([sys.executable, WRITER, str(path), "stall"], stdout=subprocess.PIPE, text=True)
    try:
        temporary = writer.stdout.readline().strip()  # printed mid-write, a megabyte in
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
    assert writer.returncode == -signal.SIGKILL
    assert re.fullmatch(rf"\.tmp-.+-{writer.pid}-[0-9a-f]+\.part", os.path.basename(temporary))
    assert part_files(tmp_path) == [os.path.basename(temporary)] and os.path.getsize(temporary) > 1_000_000
    assert intact(path) == 1  # the kill landed mid-write: the old file is whole
    atomic_save({"version": 2, "weights": torch.full((10,), 2.0)}, path)
    assert os.listdir(tmp_path) == ["model.ckpt"] and intact(path) == 2


def test_temporary_path_names_the_writer_beside_the_target(tmp_path) -> None:
    first, second = temporary_path(tmp_path / "a.ckpt"), temporary_path(str(tmp_path / "a.ckpt"))
    assert os.path.dirname(first) == str(tmp_path) and first != second
    assert re.fullmatch(rf"\.tmp-[A-Za-z0-9._-]+-{os.getpid()}-[0-9a-f]{{16}}\.part", os.path.basename(first))


def age(path, hours: float) -> None:
    stamp = os.stat(path).st_mtime - hours * 3600
    os.utime(path, (stamp, stamp))


def test_live_writers_files_are_kept_and_dead_ones_removed(tmp_path) -> None:
    ours = temporary_path(tmp_path / "model.ckpt")  # this process: alive
    open(ours, "wb").close()
    age(ours, 100)  # even when old
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        other = os.path.basename(ours).replace(f"-{os.getpid()}-", f"-{sleeper.pid}-")
        (tmp_path / other).write_bytes(b"partial")
        assert remove_stale_temporaries(tmp_path) == []
        atomic_save({"version": 1, "weights": torch.ones(10)}, tmp_path / "model.ckpt")
        assert part_files(tmp_path) == sorted([os.path.basename(ours), other])
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
    assert remove_stale_temporaries(tmp_path) == [str(tmp_path / other)]  # its writer is gone now
    assert part_files(tmp_path) == [os.path.basename(ours)]


def test_other_hosts_and_old_formats_are_removed_only_after_a_day(tmp_path) -> None:
    names = [".tmp-otherhost-1234-0123456789abcdef.part", ".tmp-ab_c12x9.part", ".masked-4242.ckpt.part"]
    unrelated = [".tmp-notes.txt", "weights.part", ".tmp-two-words.part", "model.ckpt"]
    for name in names + unrelated:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == []  # a few seconds old: perhaps still being written
    for name in names + unrelated:
        age(tmp_path / name, 23)
    assert remove_stale_temporaries(tmp_path) == []
    for name in names + unrelated:
        age(tmp_path / name, 2)
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(str(tmp_path / n) for n in names)
    assert sorted(os.listdir(tmp_path)) == sorted(unrelated)


def test_cleaning_a_missing_directory_is_nothing(tmp_path) -> None:
    assert remove_stale_temporaries(tmp_path / "absent") == []


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
    build = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    result = export(build(), {"0": torch.arange(8) < 3}, torch.randn(1, 3, 8, 8))
    save_pruned(tmp_path / "pruned.ckpt", result)
    return tmp_path / "pruned.ckpt", build


def test_corrupted_checkpoint(saved) -> None:
    path, build = saved
    data = bytearray(path.read_bytes())
    data[100:400] = random.Random(0).randbytes(300)  # garbles the pickled record inside the zip
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"^Checkpoint '.*pruned\.ckpt' could not be loaded safely \(weights_only=True\): \S"
    ) as caught:
        load_pruned(path, build())
    assert caught.value.__cause__ is not None  # torch's own reason is kept


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
