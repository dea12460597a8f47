"""Activation-based importance (``pruner="activation"``, issue 22): what a channel carries on real
batches, as the layers reading it see it. The measure picks the channel that carries more where
magnitude picks the other; in real Trainer runs it records only training forward passes (or the
calibration batches of a fit-start prune, without moving the training data's order), covers heads,
MLP and residual width of a language model and a CNN's convs, survives a resume mid-accumulation,
and leaves no hook behind."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch
from helpers import ScoreSpy
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from user_modules import CausalLM, Images, PLClassifier, Sentences, quiet_trainer

from lightning_prune import ChannelGraph, ConfigurationError, PruneExportCallback, verify_equivalence
from lightning_prune.core.graph.activation import ActivationScores
from lightning_prune.core.graph.importance import group_scores, importance_masks


def two_channels(conv: bool) -> tuple[nn.Module, torch.Tensor]:
    """Hidden channel 0 has the larger filter but reads an input near zero; channel 1 the smaller
    filter on a large input. The layer after reads both alike."""
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Conv2d(2, 1, 1))
        x = torch.randn(16, 2, 4, 4) * torch.tensor([10.0, 1e-3]).view(1, 2, 1, 1)
    else:
        model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        x = torch.randn(16, 2) * torch.tensor([10.0, 1e-3])
    with torch.no_grad():
        first = model[0].weight.view(2, 2)
        first.copy_(torch.tensor([[0.0, 5.0], [1.0, 0.0]]))
        model[0].bias.zero_()
        model[2].weight.fill_(1.0)
    return model, x


@pytest.mark.parametrize("conv", [False, True])
def test_activation_keeps_the_channel_that_carries_more_where_magnitude_keeps_the_other(conv) -> None:
    model, x = two_channels(conv)
    graph = ChannelGraph.from_model(model, x[:1])
    scores = ActivationScores()
    model.train()
    scores.attach(graph, model)
    model(x)
    model.eval()
    model(x)  # evaluation mode (validation): not recorded
    scores.detach()
    model.train()
    model(x)  # no hook any more
    assert not model[2]._forward_pre_hooks
    assert scores.counts == {"2": x.numel() // 2}  # the input layer reads no prunable channel: not watched
    activation = importance_masks(graph, model, "activation", {"0": 0.5}, activations=scores)
    magnitude = importance_masks(graph, model, "l2", {"0": 0.5})
    assert activation["0"].tolist() == [False, True]
    assert magnitude["0"].tolist() == [True, False]


def test_a_group_no_recorded_layer_reads_is_scored_as_l2() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    graph = ChannelGraph.from_model(model, torch.randn(1, 4))
    scores = ActivationScores()
    scores.attach(graph, model)
    model(torch.randn(8, 4))
    scores.detach()
    del scores.sums["4"], scores.counts["4"]  # as if the last layer never ran
    measured, l2 = group_scores(graph, model, "activation", activations=scores), group_scores(graph, model, "l2")
    read_by_2 = set(scores.per_root(graph, model))
    assert read_by_2 and all(measured[root] == l2[root] for root in set(measured) - read_by_2)
    assert set(measured) == set(l2) and any(measured[root] != l2[root] for root in read_by_2)
    with pytest.raises(ValueError, match="importance='activation' needs batches"):
        group_scores(graph, model, "activation", activations=ActivationScores())


class _BatchLogic:
    """The inputs of every training batch, and whether a hook of ours is on the module at each epoch."""

    def __init__(self) -> None:
        self.inputs, self.hooked = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.inputs.append((batch["input_ids"] if isinstance(batch, dict) else batch[0]).clone())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.hooked.append(any(m._forward_pre_hooks for m in pl_module.modules()))


class BatchLog(_BatchLogic, pl.Callback):
    pass


class LBatchLog(_BatchLogic, L.Callback):
    pass


def lm_fit(tmp_path, callback, max_epochs=2):
    pl.seed_everything(0, verbose=False)
    log = LBatchLog()
    module = CausalLM(arch="llama")
    train = DataLoader(Sentences(48, length=8, seed=0), batch_size=8, shuffle=True)  # a shuffle draws from the RNG
    trainer = quiet_trainer(L, tmp_path, [callback, log], max_epochs=max_epochs, limit_train_batches=3)
    trainer.fit(module, train)
    return module, log


def test_one_shot_at_fit_start_prunes_heads_mlp_and_residual_width_of_a_language_model(tmp_path) -> None:
    common = {"sparsity": 0.5, "op_types": ["Linear", "Embedding"], "verify_batches": 1, "round_to": 1}
    callback = ScoreSpy(pruner="activation", calibration_batches=2, export_dir=str(tmp_path / "a"), **common)
    module, log = lm_fit(tmp_path / "a", callback)
    # two calibration batches of 8 sequences of 8 tokens, before any training step
    assert callback.seen == [(1, dict.fromkeys(callback.seen[0][1], 2 * 8 * 8))]
    assert "model.model.layers.0.mlp.down_proj" in callback.seen[0][1] and "model.lm_head" in callback.seen[0][1]
    assert log.hooked == [False, False] and not any(m._forward_pre_hooks for m in module.modules())
    network = callback.exported_network
    config = network.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (16, 32, 2)
    ids = torch.randint(0, 50, (2, 8))
    assert verify_equivalence(module.model, network, ids).passed
    # the calibration read its batches from a fresh iterator and put the RNG back: training saw the same data
    _, plain = lm_fit(tmp_path / "b", PruneExportCallback(pruner="l2", export_dir=str(tmp_path / "b"), **common))
    assert len(log.inputs) == len(plain.inputs) == 6
    assert all(torch.equal(a, b) for a, b in zip(log.inputs, plain.inputs, strict=True))


def cnn_fit(tmp_path, callback, max_epochs=4, ckpt_path=None, checkpoints=False, stop_after=None):
    pl.seed_everything(0, verbose=False)
    module = PLClassifier(lr=0.05)
    log = BatchLog()
    extra = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)] if checkpoints else []

    class StopAfter(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            trainer.should_stop = trainer.should_stop or (stop_after and trainer.current_epoch + 1 >= stop_after)

    train = DataLoader(Images("tuple", 48, seed=0), batch_size=16)
    val = DataLoader(Images("tuple", 16, seed=1), batch_size=16)
    trainer = quiet_trainer(
        pl,
        tmp_path,
        [callback, log, *extra, StopAfter()],
        max_epochs=max_epochs,
        enable_checkpointing=checkpoints,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return module, log


def test_a_schedule_ranks_each_step_on_the_training_steps_before_it(tmp_path) -> None:
    schedule = {"start_epoch": 1, "end_epoch": 2, "steps": 2}
    callback = ScoreSpy(
        pruner="activation", sparsity=0.5, schedule=schedule, export_dir=str(tmp_path / "out"), round_to=1, distill=True
    )
    module, log = cnn_fit(tmp_path, callback)
    # one epoch: 3 batches of 16 images of 8x8 through the second conv (not the validation, the sanity check,
    # nor the teacher, a copy of the network made at step 1 with the hooks on it)
    positions = 48 * 8 * 8
    assert callback.seen == [(1, {"model.3": positions, "model.8": 48}), (2, {"model.3": positions, "model.8": 48})]
    assert log.hooked == [True, True, False, False]  # only while a step is still to come
    assert not any(m._forward_pre_hooks for m in module.modules())
    assert callback.exported_network[0].out_channels == 4 and callback.exported_network[3].out_channels == 8
    assert verify_equivalence(module.model, callback.exported_network, torch.randn(4, 3, 8, 8)).passed


def test_a_resume_mid_accumulation_ranks_on_the_same_sums(tmp_path) -> None:
    def make(root):
        return ScoreSpy(pruner="activation", sparsity=0.5, prune_on_epoch=2, export_dir=str(root / "out"), round_to=1)

    whole_callback = make(tmp_path / "a")
    whole, _ = cnn_fit(tmp_path / "a", whole_callback, max_epochs=3)
    first = make(tmp_path / "b")
    cnn_fit(tmp_path / "b", first, max_epochs=3, checkpoints=True, stop_after=1)  # stops after epoch 0
    assert first.steps_done == 0 and first.activations.counts["model.3"] == 48 * 8 * 8
    saved = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert (
        next(v for k, v in saved.items() if k.startswith("ScoreSpy"))["activation"]["counts"]["model.3"] == 48 * 8 * 8
    )
    resumed_callback = make(tmp_path / "b")
    resumed, _ = cnn_fit(
        tmp_path / "b", resumed_callback, max_epochs=3, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt"
    )
    assert resumed_callback.seen == whole_callback.seen == [(1, {"model.3": 2 * 48 * 64, "model.8": 2 * 48})]
    for layer, total in whole_callback.sums.items():
        assert torch.allclose(total, resumed_callback.sums[layer], rtol=1e-5), layer
    assert all(torch.equal(whole_callback.masks[k], resumed_callback.masks[k]) for k in whole_callback.masks)
    for name, value in whole.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[name].float(), atol=1e-6), name


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"pruner": "activation", "calibration_batches": 0}, r"calibration_batches=0\)` must be an int >= 1"),
        ({"pruner": "activation", "calibration_batches": "8"}, r"calibration_batches='8'\)` must be an int >= 1"),
        ({"pruner": "l2", "calibration_batches": 8}, r"calibration_batches=8\)` is read by `pruner='activation'`"),
    ],
)
def test_bad_calibration_batches(arguments, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PruneExportCallback(**arguments)


class NoImages(IterableDataset):
    """A stream that turns out empty (its length unknown, so Lightning starts training)."""

    def __iter__(self):
        return iter(())


def test_a_fit_start_prune_with_no_training_batch_says_so(tmp_path) -> None:
    callback = PruneExportCallback(pruner="activation", export_dir=str(tmp_path / "out"), example_input=[1, 3, 8, 8])
    trainer = quiet_trainer(pl, tmp_path, [callback], max_epochs=1)
    empty = DataLoader(NoImages(), batch_size=16)
    with pytest.raises(ConfigurationError, match=r"calibration_batches=8\)` found no training batches"):
        trainer.fit(PLClassifier(), empty)
