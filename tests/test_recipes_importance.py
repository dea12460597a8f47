"""Importance and schedule recipes as users combine them (issue 17): global ranking on a schedule
prunes the asked amount, frozen layers under Taylor, a measure that cannot rank (bn_scale on an
untrained model), and schedule mistakes caught before the first training step."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from helpers import export_and_check, randomize
from torch import nn
from user_modules import PLClassifier, loaders, quiet_trainer

from lightning_prune import (
    ChannelGraph,
    ConfigurationError,
    PruneExportCallback,
    apply_masks,
    verify_equivalence,
)
from lightning_prune.core.graph.importance import group_scores, importance_masks

CONVS = ("model.0.0", "model.1.0", "model.2.0", "model.3.0")
WIDTHS = (24, 32, 40, 16)  # 112 channel groups, one family per conv: 56 of them at sparsity 0.5


def network() -> nn.Sequential:
    def block(inputs: int, outputs: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU())

    widths = (3, *WIDTHS)
    blocks = [block(a, b) for a, b in zip(widths, widths[1:], strict=False)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTHS[-1], 4))


class Classifier(PLClassifier):
    def __init__(self) -> None:
        super().__init__(network=network())


class FrozenBackbone(Classifier):
    """Transfer learning as users write it: the first two blocks frozen, the optimizer given the rest."""

    def __init__(self) -> None:
        super().__init__()
        for block in self.model[:2]:
            block.requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


class NeverTrains(Classifier):
    """Its first training step fails the test: the errors must come before it."""

    def training_step(self, batch, batch_idx):
        raise AssertionError("a training step ran before the configuration error was found")


def fit(tmp_path, module=None, max_epochs=4, max_steps=-1, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = module if module is not None else Classifier()
    callback = PruneExportCallback(export_dir=str(tmp_path / "out"), verify_batches=1, **kwargs)
    trainer = quiet_trainer(
        pl, tmp_path, [callback], max_epochs=max_epochs, max_steps=max_steps, limit_train_batches=2, limit_val_batches=1
    )
    trainer.fit(module, *loaders("tuple"))
    return callback, module


def pruned_groups(masks) -> list[int]:
    return [int((~masks[layer]).sum()) if layer in masks else 0 for layer in CONVS]


# -------------------------------------------------- global ranking on a schedule
@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("ramp", ["cubic", "linear"])
@pytest.mark.parametrize("pruner", ["taylor", "l1"])
def test_global_ranking_on_a_schedule_prunes_the_asked_amount(tmp_path, pruner, ramp, round_to) -> None:
    """After the last step, 56 of the 112 groups (half), exactly, or within round_to / 2 when each
    layer's width is rounded to a multiple of round_to, however the earlier steps spread them."""
    schedule = {"start_epoch": 1, "end_epoch": 3, "steps": 3, "ramp": ramp}
    callback, module = fit(tmp_path, pruner=pruner, ranking="global", schedule=schedule, round_to=round_to)
    pruned = pruned_groups(callback.masks)
    assert callback.steps_done == 3
    assert abs(sum(pruned) - 56) <= round_to // 2, pruned
    assert all((width - lost) % round_to == 0 for width, lost in zip(WIDTHS, pruned, strict=True)), pruned
    exported = callback.exported_network
    assert [exported[i][0].out_channels for i in range(4)] == [w - p for w, p in zip(WIDTHS, pruned, strict=True)]
    assert verify_equivalence(module.model, exported, torch.randn(4, 3, 8, 8)).passed


def chain() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1)]
    return randomize(nn.Sequential(*layers))


def test_a_family_an_earlier_global_step_overpruned_counts_towards_the_total() -> None:
    model = chain()
    graph = ChannelGraph.from_model(model, torch.randn(1, 3, 4, 4))
    earlier = {"0": torch.arange(8) >= 6}  # layer 0 lost 6 of 8 in an earlier step (its share is 4)
    masks = importance_masks(graph, model, "l1", {"0": 0.5, "3": 0.5}, ranking="global", previous=earlier)
    assert not bool((masks["0"] & ~earlier["0"]).any())  # masks only grow
    assert int((~masks["0"]).sum()) + int((~masks["3"]).sum()) == 12  # half of 8 + 16, not 6 + 8


def test_global_rounding_stays_near_the_asked_amount() -> None:
    """Rounding every layer down would prune up to 7 more groups per layer; nearest keeps the total."""
    torch.manual_seed(0)
    model = network()
    graph = ChannelGraph.from_model(model, torch.randn(1, 3, 8, 8))
    for seed in range(4):
        randomize(model, seed)
        sparsity = dict.fromkeys((name.removeprefix("model.") for name in CONVS), 0.45)
        masks = importance_masks(graph, model, "l1", sparsity, ranking="global", round_to=8)
        pruned = [int((~masks[layer]).sum()) if layer in masks else 0 for layer in sparsity]
        asked = sum(int(0.45 * width) for width in WIDTHS)  # 10 + 14 + 18 + 7 = 49
        assert abs(sum(pruned) - asked) <= 4 and all((w - p) % 8 == 0 for w, p in zip(WIDTHS, pruned, strict=True))


# -------------------------------------------------- frozen layers
def test_taylor_keeps_frozen_layers_and_says_so(tmp_path) -> None:
    with pytest.warns(
        UserWarning, match=r"leaves the channels of \['model\.0\.0', 'model\.1\.0'\] unpruned: these layers are frozen"
    ):
        callback, module = fit(
            tmp_path, FrozenBackbone(), max_epochs=2, pruner="taylor", ranking="global", prune_on_epoch=1, round_to=1
        )
    pruned = pruned_groups(callback.masks)
    assert pruned[:2] == [0, 0] and sum(pruned) > 0  # the trainable layers give up the amount
    exported = callback.exported_network
    assert [exported[0][0].out_channels, exported[1][0].out_channels] == [24, 32]
    frozen = {name for name, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen == {"0.0.weight", "0.1.weight", "0.1.bias", "1.0.weight", "1.1.weight", "1.1.bias"}
    assert {name for name, p in exported.named_parameters() if not p.requires_grad} == frozen
    assert verify_equivalence(module.model, exported, torch.randn(4, 3, 8, 8)).passed


def test_magnitude_measures_score_frozen_weights_as_they_are() -> None:
    model = randomize(network())
    graph = ChannelGraph.from_model(model, torch.randn(1, 3, 8, 8))
    trainable = {m: group_scores(graph, model, m) for m in ("l1", "l2", "fpgm", "bn_scale")}
    model.requires_grad_(False)
    assert {m: group_scores(graph, model, m) for m in trainable} == trainable


@pytest.mark.parametrize("head_bias", [True, False])
def test_export_keeps_requires_grad(head_bias) -> None:
    """A frozen block, a frozen norm scale and a frozen head, into whose bias the constants of
    layer 3's pruned channels (their live BatchNorm shifts) are folded: a new bias when it had none."""
    model = network()
    model[6] = nn.Linear(16, 4, bias=head_bias)
    randomize(model)
    for frozen in (model[1], model[3][1].weight, model[6]):
        frozen.requires_grad_(False)
    example = torch.randn(2, 3, 8, 8)
    masks = {"0.0": torch.arange(24) % 3 > 0, "1.0": torch.arange(32) % 2 > 0, "3.0": torch.arange(16) >= 4}
    result = export_and_check(apply_masks(model, masks), masks, example)  # exact to 1e-5
    assert result.model[1][0].out_channels < 32 and result.model[6].in_features == 12
    assert result.model[6].bias is not None  # the folded constants
    frozen = {"1.0.weight", "1.1.weight", "1.1.bias", "3.1.weight", "6.weight", "6.bias"}
    assert {name for name, p in result.model.named_parameters() if not p.requires_grad} == frozen


# -------------------------------------------------- a measure that cannot rank
def test_bn_scale_on_an_untrained_model_prunes_each_layer_its_share(tmp_path) -> None:
    """Every scale is 1: global ranking used to take every channel but one from the first layers."""
    with pytest.warns(
        UserWarning,
        match=r"importance='bn_scale' cannot rank the channels of \['model\.0\.0', 'model\.1\.0', 'model\.2\.0', 'model\.3\.0'\]",
    ):
        callback, module = fit(tmp_path, max_epochs=1, pruner="bn_scale", ranking="global", round_to=1)
    assert pruned_groups(callback.masks) == [12, 16, 20, 8]
    assert verify_equivalence(module.model, callback.exported_network, torch.randn(4, 3, 8, 8)).passed


def test_ranked_layers_give_no_warning() -> None:
    model = randomize(network())
    graph = ChannelGraph.from_model(model, torch.randn(1, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importance_masks(graph, model, "bn_scale", {"0.0": 0.5, "1.0": 0.5}, ranking="global")


# -------------------------------------------------- schedule mistakes before training
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param(
            {"pruner": "l1", "schedule": {"start_epoch": 1, "end_epoch": 5, "steps": 3}},
            r"`PruneExportCallback\(schedule=\{'start_epoch': 1, 'end_epoch': 5, 'steps': 3\}\)` has 'end_epoch': 5, "
            r"but the trainer's max_epochs=4 runs epochs 0 to 3: only 2 of its 3 steps would run",
            id="schedule_end_beyond_max_epochs",
        ),
        pytest.param(
            {"pruner": "l1", "schedule": {"start_epoch": 4, "end_epoch": 6, "steps": 2}},
            r"has 'start_epoch': 4, but the trainer's max_epochs=4 runs epochs 0 to 3: only 0 of its 2 steps",
            id="schedule_start_beyond_max_epochs",
        ),
        pytest.param(
            {"pruner": "l1", "prune_on_epoch": 4},
            r"`PruneExportCallback\(prune_on_epoch=4\)` is not an epoch of this run: the trainer's max_epochs=4 runs epochs 0 to 3",
            id="prune_on_epoch_beyond_max_epochs",
        ),
    ],
)
def test_schedule_mistakes_are_found_before_training(tmp_path, kwargs, error) -> None:
    with pytest.raises(ConfigurationError, match=error):
        fit(tmp_path, NeverTrains(), max_epochs=4, **kwargs)
    assert not (tmp_path / "out" / "masked.ckpt").exists()


def test_a_max_steps_trainer_is_checked_when_it_ends(tmp_path) -> None:
    """max_epochs=-1: how many epochs run is not known in setup; the end of the run says what happened,
    naming the schedule's start, not `prune_on_epoch`."""
    schedule = {"start_epoch": 2, "end_epoch": 3, "steps": 2}  # max_steps=2 ends in epoch 0
    with pytest.warns(UserWarning, match=r"training ended before pruning \(see the schedule's 'start_epoch'\)"):
        callback, _ = fit(tmp_path, max_epochs=None, max_steps=2, pruner="l1", schedule=schedule)
    assert callback.masks is None


def test_a_schedule_of_several_steps_needs_its_end_epoch() -> None:
    with pytest.raises(ConfigurationError, match=r"needs 'end_epoch', the epoch of the last of its 3 steps"):
        PruneExportCallback(schedule={"start_epoch": 1, "steps": 3})
    assert PruneExportCallback(schedule={"start_epoch": 2, "steps": 1}).schedule.end_epoch == 2
