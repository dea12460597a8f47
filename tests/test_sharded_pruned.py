"""`finetune="pruned"` under FSDP2 (ModelParallelStrategy, fully_shard per block and on the whole network): after
the shrink every rank holds the smaller layers, sharded again, and training goes on at the pruned size. Each run
is a real Trainer on 2 CPU processes with gloo, in a subprocess (tests/sharded_run.py, flag `pruned`)."""

from __future__ import annotations

import pytest
import torch
from sharded_run import Net, ShardedDigits, gathered, loaders, one_rank_trainer
from test_sharded import records, relative_error, run
from torch.distributed.fsdp import FSDPModule, fully_shard

from lightning_prune import ConfigurationError, PruneExportCallback, load_pruned

DENSE = sum(p.numel() for p in Net().parameters())


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """Three epochs, the shrink after the first, a distributed checkpoint kept at every epoch."""
    out = tmp_path_factory.mktemp("pruned")
    result = run(out, "l1", "pruned", "every_epoch")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def small_network(out, state: dict) -> Net:
    """The bare network at the pruned size (as pruned.ckpt records it) holding ``state``."""
    network = load_pruned(out / "export" / "pruned.ckpt", Net())
    network.load_state_dict(state)
    return network.eval()


def test_training_goes_on_at_the_pruned_size_on_layers_sharded_again(pruned_run) -> None:
    for record in records(pruned_run):
        shrink = record["shrink"]
        assert shrink is not None, "the spy never saw the shrink"
        assert shrink["params"] < DENSE and record["params_at_end"] == shrink["params"]
        for name, (full, local) in shrink["sizes"].items():
            assert local is not None, f"{name} is not a DTensor after the shrink"
            assert local < full, f"{name} is not sharded across the ranks ({local} of {full} here)"
        for name, value in shrink[
            "weights"
        ].items():  # trained on after the shrink (a bias before a norm has no gradient)
            if name.endswith(".weight"):
                assert not torch.equal(record["masked"][name], value), f"{name} did not change after the shrink"


def test_the_shrink_under_fsdp2_computes_what_the_masked_network_did(pruned_run) -> None:
    rank0 = records(pruned_run)[0]
    shrink, state = rank0["shrink"], dict(rank0["shrink"]["before"])  # the dense weights just before the prune
    for layer, keep in rank0["masks"].items():  # the whole pruned channel zeroed: filter, bias, the norm it feeds
        conv = layer.removeprefix("model.")
        for name in (
            f"{conv}.weight",
            f"{conv}.bias",
            f"{conv.replace('conv', 'bn')}.weight",
            f"{conv.replace('conv', 'bn')}.bias",
        ):
            state[name] = state[name] * keep.view(-1, *[1] * (state[name].ndim - 1))
    masked = Net()
    masked.load_state_dict(state)
    unseen = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = masked.eval()(unseen)
        assert relative_error(expected, small_network(pruned_run, shrink["weights"])(unseen)) <= 1e-5


def test_every_rank_exports_the_same_network_and_pruned_ckpt_loads_into_the_bare_net(pruned_run) -> None:
    rank0, rank1 = records(pruned_run)
    assert rank0["exported"].keys() == rank1["exported"].keys()
    assert all(torch.equal(v, rank1["exported"][k]) for k, v in rank0["exported"].items())
    small = load_pruned(pruned_run / "export" / "pruned.ckpt", Net())
    assert sum(p.numel() for p in small.parameters()) == rank0["params_at_end"] < DENSE
    assert small.state_dict().keys() == rank0["exported"].keys()
    assert all(torch.equal(v, rank0["exported"][k]) for k, v in small.state_dict().items())
    assert all(torch.equal(v, rank0["masked"][k]) for k, v in small.state_dict().items())  # the trained small net


@pytest.mark.parametrize("form", ["distributed", "full"])
def test_resume_from_a_checkpoint_taken_after_the_shrink(pruned_run, tmp_path, form) -> None:
    """A distributed checkpoint directory, or one file of full tensors (`save_distributed_checkpoint=False`)."""
    flags = ("full_file",) if form == "full" else ()
    first = pruned_run
    if form == "full":
        first = tmp_path / "first"
        result = run(first, "l1", "pruned", "every_epoch", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
    after = next(path for path in (first / "ckpt").iterdir() if path.name.startswith("epoch=1"))
    assert after.is_dir() == (form == "distributed")  # the small sharded module's checkpoint
    resumed = tmp_path / "resumed"
    result = run(resumed, "l1", "pruned", f"resume={after}", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted, again = records(first)[0], records(resumed)[0]
    assert again["params_at_end"] == uninterrupted["params_at_end"] < DENSE
    assert again["exported"].keys() == uninterrupted["exported"].keys()
    for key, value in uninterrupted["exported"].items():
        torch.testing.assert_close(again["exported"][key], value, rtol=1e-5, atol=1e-6)
    small = load_pruned(resumed / "export" / "pruned.ckpt", Net())
    assert all(torch.equal(v, again["exported"][k]) for k, v in small.state_dict().items())


class ShardsItself(ShardedDigits):
    """A user's module that makes the LightningModule itself the FSDP unit."""

    def configure_model(self) -> None:
        fully_shard(self, mesh=self.device_mesh["data_parallel"])


def test_a_sharding_the_shrink_cannot_redo_is_refused_before_training(tmp_path) -> None:
    callback = PruneExportCallback(pruner="l1", prune_on_epoch=1, finetune="pruned", export_dir=str(tmp_path))
    trainer = one_rank_trainer(tmp_path, [callback], max_epochs=2)
    with pytest.raises(ConfigurationError, match="ShardsItself itself is an FSDP unit.*HINT: shard `self.model`"):
        trainer.fit(ShardsItself(), *loaders())
    assert trainer.global_step == 0


class BlocksKeptWhole(ShardedDigits):
    """Each block sharded with its parameters kept whole between forward and backward."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=False)
        fully_shard(self.model, mesh=mesh)


def fit_in_one_process(tmp_path, module: ShardedDigits, finetune: str) -> PruneExportCallback:
    """A real ModelParallelStrategy run in this process (one rank: the shards are whole, still DTensors)."""
    callback = PruneExportCallback(pruner="l1", prune_on_epoch=1, finetune=finetune, export_dir=str(tmp_path))
    trainer = one_rank_trainer(tmp_path, [callback], max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, *loaders())
    return callback


def test_each_unit_is_sharded_again_with_its_own_settings(tmp_path) -> None:
    module = BlocksKeptWhole()
    fit_in_one_process(tmp_path, module, "pruned")
    units = {name for name, unit in module.named_modules() if isinstance(unit, FSDPModule)}
    assert units == {"model", "model.blocks.0", "model.blocks.1"}
    # half of 16 channels: the prune read and held the shards (validation had left the blocks whole), so
    # no pruned channel was kept for a norm's nonzero constant
    assert [block.conv1.weight.shape[0] for block in module.model.blocks] == [8, 8]
    for block in module.model.blocks:  # reshard_after_forward=False carried over (the default would reshard)
        assert block._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is None


def test_masks_are_held_on_the_shards_of_a_unit_that_validation_left_whole(tmp_path) -> None:
    module = BlocksKeptWhole()
    callback = fit_in_one_process(tmp_path, module, "masked")
    state = gathered(module.model)
    for layer, keep in callback.masks.items():
        name = layer.removeprefix("model.")
        for tensor in (f"{name}.weight", f"{name}.bias", f"{name.replace('conv', 'bn')}.bias"):
            assert torch.count_nonzero(state[tensor][~keep]) == 0, tensor
