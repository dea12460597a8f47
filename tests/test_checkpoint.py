"""load_pruned maps a checkpoint onto the module it was saved from, the network inside it, or a wrapper of it."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from helpers import randomize
from torch import nn

from lightning_prune import CheckpointError, export, load_pruned, save_pruned
from lightning_prune.core.files.checkpoint import FORMAT

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
PRUNED = (
    "conv1",
    "layer1.0.conv1",
    "layer2.0.conv1",
    "layer3.1.conv1",
    "layer4.0.conv1",
)  # conv1 is tied to the residuals: kept


class Classifier(pl.LightningModule):
    """What users write: the network as ``self.model``, plus a loss whose class weights are a buffer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.model = torchvision.models.resnet18(num_classes=num_classes)
        self.criterion = nn.CrossEntropyLoss(weight=torch.linspace(0.5, 1.5, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return self.criterion(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def half_masks(prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    widths = {"conv1": 64, "layer1.0.conv1": 64, "layer2.0.conv1": 128, "layer3.1.conv1": 256, "layer4.0.conv1": 512}
    return {prefix + name: torch.randperm(widths[name], generator=generator) < widths[name] // 2 for name in PRUNED}


@pytest.fixture(scope="module")
def exported_module():
    torch.manual_seed(0)
    module = Classifier()
    randomize(module.model, seed=3)
    return export(module, half_masks("model."), IMAGES)


@pytest.fixture
def module_checkpoint(tmp_path, exported_module):
    path = tmp_path / "pruned.ckpt"
    save_pruned(path, exported_module)
    return path


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IMAGES)


def test_the_bare_network_loads_a_lightning_module_checkpoint(module_checkpoint, exported_module) -> None:
    network = load_pruned(module_checkpoint, torchvision.models.resnet18(num_classes=10))
    small = exported_module.model.model
    assert {k: v.shape for k, v in network.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    assert network.layer1[0].conv1.out_channels < 64 and network.layer4[0].conv1.out_channels < 512
    expected = outputs(exported_module.model.model)
    assert torch.allclose(outputs(network), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(outputs(network), expected)


def test_the_module_it_was_saved_from_loads_it_as_before(module_checkpoint, exported_module) -> None:
    module = load_pruned(module_checkpoint, Classifier())
    assert torch.equal(outputs(module), outputs(exported_module.model))
    assert torch.equal(module.criterion.weight, torch.linspace(0.5, 1.5, 10))


def test_an_explicit_prefix(module_checkpoint, exported_module) -> None:
    network = load_pruned(module_checkpoint, torchvision.models.resnet18(num_classes=10), prefix="model")
    assert torch.equal(outputs(network), outputs(exported_module.model.model))
    module = load_pruned(module_checkpoint, Classifier(), prefix="")
    assert torch.equal(outputs(module), outputs(exported_module.model))


def test_a_bare_network_checkpoint_loads_into_the_wrapper(tmp_path) -> None:
    torch.manual_seed(0)
    network = randomize(torchvision.models.resnet18(num_classes=10), seed=4)
    result = export(network, half_masks(seed=1), IMAGES)
    save_pruned(tmp_path / "net.ckpt", result)
    module = load_pruned(tmp_path / "net.ckpt", Classifier())
    assert torch.equal(outputs(module.model), outputs(result.model))
    assert torch.equal(module.criterion.weight, torch.linspace(0.5, 1.5, 10))  # outside the network: untouched
    again = load_pruned(tmp_path / "net.ckpt", Classifier(), prefix="model")
    assert torch.equal(outputs(again), outputs(result.model))


def test_network_prefix_is_stored_and_older_checkpoints_still_load(
    tmp_path, exported_module, module_checkpoint
) -> None:
    save_pruned(tmp_path / "named.ckpt", exported_module, network_prefix="model")
    assert torch.load(tmp_path / "named.ckpt", weights_only=True)["network_prefix"] == "model"
    network = load_pruned(tmp_path / "named.ckpt", torchvision.models.resnet18(num_classes=10))
    assert torch.equal(outputs(network), outputs(exported_module.model.model))
    old = torch.load(module_checkpoint, weights_only=True)
    assert old["format"] == FORMAT == "lightning-prune/1" and "network_prefix" not in old


def test_network_prefix_must_name_a_submodule(tmp_path, exported_module) -> None:
    with pytest.raises(
        CheckpointError,
        match=r"save_pruned\('.*x\.ckpt', network_prefix='net'\): the exported Classifier has no submodule 'net'",
    ):
        save_pruned(tmp_path / "x.ckpt", exported_module, network_prefix="net")
    assert not os.path.exists(tmp_path / "x.ckpt")


def test_the_network_loads_only_its_keys_and_strictly(module_checkpoint) -> None:
    with pytest.raises(
        CheckpointError,
        match=r"pruned\.ckpt' does not fit the model: 'fc\.weight' has shape \(10, 512\) in the checkpoint, \(5, 512\) in the model",
    ):
        load_pruned(module_checkpoint, torchvision.models.resnet18(num_classes=5))


def test_another_architecture_names_the_first_layer_and_the_prefix_hint(module_checkpoint) -> None:
    with pytest.raises(
        CheckpointError,
        match=r"Checkpoint '.*pruned\.ckpt' does not fit the VGG: it changes layer 'model\.layer1\.0\.conv1', which the model does not have, "
        r"and no attribute prefix maps .* pass prefix='<attribute>'",
    ):
        load_pruned(module_checkpoint, torchvision.models.vgg11(num_classes=10))


def test_an_empty_prefix_keeps_the_names(module_checkpoint) -> None:  # a prefix that fits nothing: the bad-input table
    with pytest.raises(
        CheckpointError,
        match=r"does not fit the ResNet with prefix='': it changes layer 'model\.layer1\.0\.conv1', which the model does not have\. Check the prefix",
    ):
        load_pruned(module_checkpoint, torchvision.models.resnet18(num_classes=10), prefix="")


class Pair(nn.Module):
    """A teacher and a student of the same shape: a bare-network checkpoint fits either."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x) - self.teacher(x)


def small_network() -> nn.Sequential:
    return Pair().student


def test_an_ambiguous_prefix_asks_for_one(tmp_path) -> None:
    network = randomize(Pair().student, seed=5)
    result = export(network, {"0": torch.arange(8) < 5}, IMAGES)
    save_pruned(tmp_path / "pruned.ckpt", result)
    with pytest.raises(
        CheckpointError,
        match=r"pruned\.ckpt' fits the Pair in 2 ways: prefix='student' .*, prefix='teacher' .*\. Pass prefix= to choose one",
    ):
        load_pruned(tmp_path / "pruned.ckpt", Pair())
    pair = load_pruned(tmp_path / "pruned.ckpt", Pair(), prefix="teacher")
    assert pair.teacher[0].out_channels == 5 and pair.student[0].out_channels == 8
    assert torch.equal(outputs(pair.teacher), outputs(result.model))


def test_a_directory_without_a_checkpoint(tmp_path) -> None:  # one holding pruned.ckpt: the bad-input table
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        CheckpointError, match=r"empty' is a directory, not a checkpoint file\. Pass the path of the pruned\.ckpt file"
    ):
        load_pruned(empty, torchvision.models.resnet18(num_classes=10))


def test_the_changed_layers_pick_the_network(tmp_path) -> None:
    result = export(randomize(Pair(), seed=6), {"student.0": torch.arange(8) < 3}, IMAGES)
    save_pruned(tmp_path / "pruned.ckpt", result)
    network = load_pruned(tmp_path / "pruned.ckpt", small_network())
    assert network[0].out_channels == 3
    assert torch.equal(outputs(network), outputs(result.model.student))


def test_stored_network_prefix_breaks_a_tie(tmp_path) -> None:
    result = export(randomize(Pair(), seed=7), {}, IMAGES)  # nothing changed: both halves fit a bare network
    save_pruned(tmp_path / "plain.ckpt", result)
    with pytest.raises(
        CheckpointError,
        match=r"plain\.ckpt' fits the Sequential in 2 ways: prefix='student' \(the network inside the saved module\), prefix='teacher'",
    ):
        load_pruned(tmp_path / "plain.ckpt", small_network())
    save_pruned(tmp_path / "named.ckpt", result, network_prefix="teacher")
    network = load_pruned(tmp_path / "named.ckpt", small_network())
    assert torch.equal(outputs(network), outputs(result.model.teacher))
