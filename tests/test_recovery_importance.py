"""Our own group-level importance: each measure ranks what it says it ranks, coupled groups are scored
as one, global ranking moves channels between layers, minimum widths and skipped layers hold, and
masks only grow. Core functions first, then real Trainer runs of each measure."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from user_modules import PLClassifier, loaders

from lightning_prune import ChannelGraph, ConfigurationError, PruneExportCallback, verify_equivalence
from lightning_prune.core.graph.importance import TaylorScores, group_scores, importance_masks

IMAGE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def chain() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
    )
    return nn.Sequential(*model, nn.ReLU(), nn.Conv2d(16, 4, 1))


class Residual(nn.Module):
    """Two convs added together: their channels form one coupled group each."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.a(x) + self.b(x)))


def kept(masks, layer, size):
    return int(masks[layer].sum()) if layer in masks else size


@pytest.mark.parametrize("importance", ["l1", "l2", "fpgm"])
def test_magnitude_measures_drop_the_filters_they_call_least_important(importance) -> None:
    model = chain()
    with torch.no_grad():
        model[0].weight.normal_()
        model[0].weight[[1, 5]] = 0.01 * model[0].weight[[1, 5]]  # tiny filters, close to the others' median too
    graph = ChannelGraph.from_model(model, IMAGE)
    masks = importance_masks(graph, model, importance, {"0": 0.25})
    assert (~masks["0"]).nonzero().flatten().tolist() == [1, 5]


def test_bn_scale_ranks_by_the_norm_the_channel_feeds() -> None:
    model = chain()
    with torch.no_grad():
        model[1].weight.fill_(1.0)
        model[1].weight[[2, 6]] = 0.05
    masks = importance_masks(ChannelGraph.from_model(model, IMAGE), model, "bn_scale", {"0": 0.25})
    assert (~masks["0"]).nonzero().flatten().tolist() == [2, 6]


def test_coupled_channels_are_scored_and_pruned_as_one() -> None:
    model = Residual()
    with torch.no_grad():
        model.a.weight[3] *= 0.01  # small in one member only: the group's mean still ranks it lowest
        model.b.weight[3] *= 0.01
    graph = ChannelGraph.from_model(model, torch.randn(1, 3, 4, 4))
    masks = importance_masks(graph, model, "l1", {"a": 0.125, "b": 0.125})
    assert torch.equal(masks["a"], masks["b"]) and not bool(masks["a"][3]) and int(masks["a"].sum()) == 7


def test_taylor_scores_follow_the_gradient() -> None:
    model = chain()
    graph = ChannelGraph.from_model(model, IMAGE)
    scores = TaylorScores()
    with torch.no_grad():
        model[3].weight[:, [0, 7]] = 0.0  # channels 0 and 7 of layer 0 reach nothing: no loss change
        model[4].weight.fill_(1.0)
    for _ in range(2):
        model.zero_grad()
        model(IMAGE).square().sum().backward()
        scores.accumulate(graph, model)
    group = group_scores(graph, model, "taylor", scores)
    first_layer = {c: group[int(graph.root[int(label)])] for c, label in enumerate(graph.producers["0"])}
    assert scores.steps == 2 and sorted(first_layer, key=first_layer.get)[:2] in ([0, 7], [7, 0])
    with pytest.raises(ValueError, match="needs gradients"):
        group_scores(graph, model, "taylor", TaylorScores())


def test_global_ranking_takes_more_from_the_layer_that_matters_less() -> None:
    model = chain()
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(0.1, 0.2, 8))  # layer 0 feeds small scales
        model[4].weight.copy_(torch.linspace(1.0, 2.0, 16))
    graph = ChannelGraph.from_model(model, IMAGE)
    uniform = importance_masks(graph, model, "bn_scale", {"0": 0.5, "3": 0.5})
    ranked = importance_masks(graph, model, "bn_scale", {"0": 0.5, "3": 0.5}, ranking="global")
    assert (kept(uniform, "0", 8), kept(uniform, "3", 16)) == (4, 8)
    assert kept(ranked, "0", 8) + kept(ranked, "3", 16) == 12  # the same amount in all
    assert kept(ranked, "0", 8) == 1 and kept(ranked, "3", 16) == 11  # taken where the scales are small
    floor = importance_masks(graph, model, "bn_scale", {"0": 0.5, "3": 0.5}, ranking="global", min_channels=3)
    assert kept(floor, "0", 8) == 3 and kept(floor, "3", 16) == 9


def test_skipped_layers_and_minimum_width() -> None:
    model = chain()
    graph = ChannelGraph.from_model(model, IMAGE)
    masks = importance_masks(graph, model, "l2", {"3": 0.9}, min_channels=4)  # layer 0 not listed: skipped
    assert "0" not in masks and kept(masks, "3", 16) == 4


def test_masks_only_grow() -> None:
    model = chain()
    graph = ChannelGraph.from_model(model, IMAGE)
    first = importance_masks(graph, model, "l1", {"0": 0.25, "3": 0.25})
    with torch.no_grad():  # the scores change completely between steps
        model[0].weight.copy_(model[0].weight.flip(0))
        model[3].weight.copy_(model[3].weight.flip(0))
    second = importance_masks(graph, model, "fpgm", {"0": 0.5, "3": 0.5}, previous=first)
    for layer, keep in first.items():
        assert not bool((second[layer] & ~keep).any())  # nothing pruned before comes back
    assert (kept(second, "0", 8), kept(second, "3", 16)) == (4, 8)


def fit(tmp_path, max_epochs=3, callback_class=PruneExportCallback, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = PLClassifier()
    # the toy network's layers are 8 and 16 wide: no rounding, so the tests count what the measures chose
    callback = callback_class(export_dir=str(tmp_path / "out"), verify_batches=1, round_to=1, **kwargs)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    train, val = loaders("tuple")
    trainer.fit(module, train, val)
    return callback, module


@pytest.mark.parametrize(
    ("pruner", "extra"),
    [
        ("l1", {}),
        ("l2", {"ranking": "global"}),
        ("fpgm", {"min_channels": 6}),
        ("bn_scale", {}),
        ("taylor", {"prune_on_epoch": 1}),
        ("nni-l1", {}),
    ],
)
def test_each_measure_in_a_real_fit(tmp_path, pruner, extra) -> None:
    callback, module = fit(tmp_path, pruner=pruner, **extra)
    network = callback.exported_network
    widths = (network[0].out_channels, network[3].out_channels)
    expected = {"ranking": None, "min_channels": (6, 8)}.get(next(iter(extra), ""), (4, 8))
    if expected is not None:
        assert widths == expected
    if "min_channels" not in extra:
        assert sum(widths) == 12  # half of 8 + 16, however it is spread
    assert verify_equivalence(module.model, network, torch.randn(4, 3, 8, 8)).passed
    assert callback.steps_done == 1


def test_taylor_needs_training_steps_before_it_prunes() -> None:
    with pytest.raises(ConfigurationError, match="Taylor importance is measured from the gradients"):
        PruneExportCallback(pruner="taylor")
    with pytest.raises(ConfigurationError, match="'start_epoch' >= 1"):
        PruneExportCallback(pruner="taylor", schedule={"start_epoch": 0, "end_epoch": 2, "steps": 3})


def test_taylor_scores_come_from_the_epoch_before_the_step(tmp_path) -> None:
    """The accumulated steps are those of the epoch before pruning; they are cleared after it."""
    seen = []

    class Spy(PruneExportCallback):
        def _prune(self, trainer, pl_module, step=1):
            seen.append(self.taylor.steps)
            super()._prune(trainer, pl_module, step)

    callback, _ = fit(
        tmp_path, callback_class=Spy, pruner="taylor", schedule={"start_epoch": 1, "end_epoch": 2, "steps": 2}
    )
    assert seen == [3, 3] and callback.taylor.steps == 0
