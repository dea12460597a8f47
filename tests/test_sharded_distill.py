"""Distillation under fully sharded training (FSDP2: ModelParallelStrategy with fully_shard) on 2 CPU
processes with gloo: the teacher a frozen copy sharded as the network is, its term added to the loss,
and kept across a resume from a distributed checkpoint (or a single-file one). Each run is a real
Trainer in a subprocess (tests/sharded_run.py, case `taylor-distill`: a two-step Taylor schedule at
epochs 1 and 2, so the checkpoint of epoch 0 lies between the steps)."""

from __future__ import annotations

import pytest
import torch
from sharded_run import Net
from test_sharded import masked_network, records, relative_error, run

from lightning_prune import CheckpointError, load_pruned
from lightning_prune.lightning.sharding import TEACHER_PREFIX, load_teacher_shards

PER_EPOCH = 3  # training steps per epoch in sharded_run.py
WEIGHT = 0.5  # the default distillation weight


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run per (case, flags), on demand (several tests read each)."""
    done: dict[tuple[str, ...], object] = {}

    def get(case: str, *flags: str):
        key = (case, *flags)
        if key not in done:
            out = tmp_path_factory.mktemp(case)
            result = run(out, case, *flags)
            assert result.returncode == 0, result.stderr[-3000:]
            done[key] = out
        return done[key]

    return get


def test_the_distillation_term_is_added_to_the_loss_from_the_first_pruning_step(finished) -> None:
    plain, distilled = records(finished("taylor")), records(finished("taylor-distill", "every_epoch"))
    for without, with_teacher in zip(plain, distilled, strict=True):  # each rank's own losses
        assert without["teacher"] is None and with_teacher["teacher"] is not None
        assert with_teacher["losses"][:PER_EPOCH] == without["losses"][:PER_EPOCH]  # dense: no teacher yet
        (loss, term), (plain_loss, _) = with_teacher["losses"][PER_EPOCH], without["losses"][PER_EPOCH]
        assert term > 0  # the pruned student differs from its dense teacher
        assert loss == pytest.approx(plain_loss + WEIGHT * term, rel=1e-5)  # the same weights, the term added
        assert all(term is not None and term > 0 for _, term in with_teacher["losses"][PER_EPOCH:])


def test_the_teacher_is_sharded_frozen_and_the_dense_network(finished) -> None:
    rank0, rank1 = records(finished("taylor-distill", "every_epoch"))
    teacher, other = rank0["teacher"], rank1["teacher"]
    assert teacher["frozen"] and not teacher["training"] and other["frozen"] and not other["training"]
    for name, (local, full) in teacher["sizes"].items():
        assert local is not None and local < full, name  # a DTensor, each rank holding a shard of it
        assert local + other["sizes"][name][0] == full, name  # the two shards make it whole
    dense = rank0["dense"]  # the gathered network (and rank zero's buffers) just before the first step
    assert dense is not None and teacher["state"].keys() == dense.keys()
    assert all(torch.equal(teacher["state"][k], v) for k, v in dense.items())
    assert all(torch.equal(other["state"][k], v) for k, v in dense.items())  # the same teacher on both ranks


def test_export_equals_the_gathered_masked_network(finished) -> None:
    out = finished("taylor-distill", "every_epoch")
    rank0, rank1 = records(out)
    assert all(torch.equal(v, rank1["exported"][k]) for k, v in rank0["exported"].items())
    small = load_pruned(out / "export" / "pruned.ckpt", Net()).eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in Net().parameters())
    unseen = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert relative_error(masked_network(rank0["masked"])(unseen), small(unseen)) <= 1e-5
    for layer, keep in rank0["masks"].items():  # held on the shards
        assert torch.count_nonzero(rank0["masked"][f"{layer.removeprefix('model.')}.weight"][~keep]) == 0


def resumes_as_uninterrupted(uninterrupted, resumed) -> None:
    """The resumed run ends as the uninterrupted one did, with the same teacher and distillation terms."""
    whole, again = records(uninterrupted)[0], records(resumed)[0]
    assert again["losses"] == whole["losses"][PER_EPOCH:]  # each step's loss and term, the teacher's included
    assert all(torch.equal(v, again["teacher"]["state"][k]) for k, v in whole["teacher"]["state"].items())
    assert all(torch.equal(whole["masks"][k], again["masks"][k]) for k in whole["masks"])
    for key, value in whole["exported"].items():
        torch.testing.assert_close(again["exported"][key], value, rtol=1e-5, atol=1e-6)


def test_resume_from_a_distributed_checkpoint_between_the_steps_equals_an_uninterrupted_run(finished, tmp_path) -> None:
    first = finished("taylor-distill", "every_epoch")
    between = first / "ckpt" / "epoch=0-step=3.ckpt"  # after step 1 (the teacher made), before step 2
    assert between.is_dir()
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(between)).read_metadata().state_dict_metadata
    assert f"state_dict.{TEACHER_PREFIX}stem.0.weight" in saved  # the teacher's shards, beside the module's
    state = next(v for k, v in torch.load(between / "meta.pt", weights_only=False)["callbacks"].items() if "Prune" in k)
    assert state["steps_done"] == 1 and "teacher" not in state  # rank zero's metadata holds no teacher tensor
    result = run(tmp_path, "taylor-distill", f"resume={between}")
    assert result.returncode == 0, result.stderr[-3000:]
    resumes_as_uninterrupted(first, tmp_path)


def test_resume_from_a_single_file_checkpoint_between_the_steps_equals_an_uninterrupted_run(finished, tmp_path) -> None:
    first = finished("taylor-distill", "every_epoch", "full_file")
    between = first / "ckpt" / "epoch=0-step=3.ckpt"
    assert between.is_file()
    state = next(v for k, v in torch.load(between, weights_only=False)["callbacks"].items() if "Prune" in k)
    assert state["teacher"]["stem.0.weight"].shape == (8, 1, 3, 3)  # whole tensors, gathered on rank zero
    result = run(tmp_path, "taylor-distill", "full_file", f"resume={between}")
    assert result.returncode == 0, result.stderr[-3000:]
    resumes_as_uninterrupted(first, tmp_path)


def test_a_checkpoint_without_the_teacher_shards_it_names_is_refused(tmp_path) -> None:
    import pytorch_lightning as pl
    from torch.distributed.checkpoint import save

    network = Net()
    save({"state_dict": {f"model.{k}": v for k, v in network.state_dict().items()}}, checkpoint_id=tmp_path / "ckpt")
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.ckpt_path = str(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt' says the distillation teacher's shards are in it \(keys"):
        load_teacher_shards(trainer, Net(), TEACHER_PREFIX)
