"""Issue 17's smaller surprises: ``input_key`` with a keyword ``forward``, and two layers sharing one weight.

A dict batch's ``input_key`` is passed by name when the module's ``forward`` takes that name (or
``**kwargs``), else positionally; layers sharing one weight (``b.weight = a.weight``) are one
pruning decision and come back from export, the callback and the checkpoint still tied.
"""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import RTOL, randomize, relative_error, zero_norm_affine
from test_callback_everyday import VAL, run
from torch import nn
from torch.utils.data import DataLoader, Dataset
from user_modules import PLClassifier, images, quiet_trainer

from lightning_prune import ConfigurationError, PruneExportCallback, export, load_pruned, save_pruned
from lightning_prune.core.verify.batches import split_batch

# ------------------------------------------------------------------ input_key with keyword forwards


class ImageBatches(Dataset):
    """Dict samples ``{"image": x, "label": y}``: the key names no parameter of the usual ``forward(x)``."""

    def __init__(self, count: int, seed: int) -> None:
        self.x, self.y = images(count, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[index], "label": self.y[index]}


class KeywordInputs(PLClassifier):
    """``forward(**inputs)``, called by its users as ``self(image=...)``."""

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs["image"])

    def _loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(self(image=batch["image"]), batch["label"])


class ImageParameter(PLClassifier):
    """``forward(image)``: the batch key names the parameter."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def _loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(self(image=batch["image"]), batch["label"])


@pytest.mark.parametrize("module_class", [KeywordInputs, ImageParameter])
def test_input_key_with_a_keyword_forward(tmp_path, module_class) -> None:
    callback = PruneExportCallback(pruner="l1", input_key="image", export_dir=str(tmp_path / "out"))
    pl.seed_everything(0, verbose=False)
    module = module_class()
    trainer = quiet_trainer(pl, tmp_path, [callback], max_steps=6, limit_val_batches=3)
    train = DataLoader(ImageBatches(96, seed=0), batch_size=16, shuffle=True)
    trainer.fit(module, train, DataLoader(ImageBatches(48, seed=1), batch_size=16))
    report = callback.report
    assert report["verified_batches"] == 3 and report["max_relative_error"] <= RTOL
    assert "accuracy_exported" in report  # the "label" key was read as the target
    with torch.no_grad():
        expected, got = module.eval()(image=VAL), callback.exported_model.eval()(image=VAL)
    assert relative_error(got, expected) <= RTOL
    assert callback.exported_network[3].out_channels == 8  # 16 -> 8


def _kwargs_forward(**inputs): ...


def _image_forward(image, label=None): ...


def _positional_forward(x): ...


def _positional_only_forward(image, /): ...


@pytest.mark.parametrize(
    ("forward", "by_name"),
    [(_kwargs_forward, True), (_image_forward, True), (_positional_forward, False), (_positional_only_forward, False)],
)
def test_input_key_is_passed_by_name_where_forward_takes_it(forward, by_name) -> None:
    """One rule for ``input_key``: by name when ``forward`` accepts that keyword, else positionally;
    the rest of the batch (here the label) is never passed."""
    batch = {"image": torch.ones(2, 3), "label": torch.zeros(2)}
    inputs, target = split_batch(batch, forward, input_key="image")
    assert target is batch["label"]
    if by_name:
        assert inputs.keys() == {"image"} and inputs["image"] is batch["image"]
    else:
        assert inputs is batch["image"]


def test_input_key_missing_from_the_batch() -> None:
    with pytest.raises(
        ConfigurationError, match=r"`input_key='pixels'` is not a key of the batch; its keys are \['image', 'label'\]"
    ):
        split_batch({"image": torch.ones(2, 3), "label": torch.zeros(2)}, _kwargs_forward, input_key="pixels")


# ------------------------------------------------------------------ two layers sharing one weight


class SharedWeight(nn.Module):
    """Two convolutions with one weight (their biases and norms their own) on two views of the stem."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Conv2d(8, width, 3, padding=1)
        self.b = nn.Conv2d(8, width, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(width), nn.BatchNorm2d(width)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a = F.relu(self.bn_a(self.a(x))).mean((2, 3))
        b = F.relu(self.bn_b(self.b(x.flip(-1)))).mean((2, 3))
        return self.head(torch.cat([a, b], 1))


def _assert_tied(network: nn.Module, width: int) -> None:
    assert network.a.weight is network.b.weight
    assert network.a.out_channels == network.b.out_channels == network.bn_b.num_features == width
    assert network.a.weight.shape[0] == network.b.bias.shape[0] == width


def test_export_keeps_a_shared_weight_tied_with_the_union_of_the_masks() -> None:
    model = randomize(SharedWeight(), seed=3)
    keep_a = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # 6 kept
    keep_b = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # 5 kept, 3 shared
    result = export(model, {"a": keep_a, "b": keep_b}, VAL[:4])
    _assert_tied(result.model, int((keep_a | keep_b).sum()))  # one decision: the union, 8 channels
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # the masked reference zeroes the rows either mask prunes, in the one shared weight
        masked = copy.deepcopy(model)
        masked.a.weight[~(keep_a & keep_b)] = 0
        masked.a.bias[~keep_a], masked.b.bias[~keep_b] = 0, 0
        assert relative_error(result.model(VAL), masked(VAL)) <= RTOL
    notes = [str(n) for n in result.notes]
    assert (
        "a: 2 channel(s) kept (it shares its weight with ['b'], whose masks keep them; layers sharing a weight keep the union)"
        in notes
    )
    assert (
        "b: 3 channel(s) kept (it shares its weight with ['a'], whose masks keep them; layers sharing a weight keep the union)"
        in notes
    )


def test_export_of_one_sharers_mask_prunes_both_and_reloads_tied(tmp_path) -> None:
    model = randomize(SharedWeight(), seed=4)
    keep = torch.arange(16) % 4 != 0  # 12 kept
    result = export(model, {"a": keep}, VAL[:4])
    _assert_tied(result.model, 12)
    with torch.no_grad():
        masked = copy.deepcopy(model)
        masked.a.weight[~keep], masked.a.bias[~keep] = 0, 0
        assert relative_error(result.model(VAL), masked(VAL)) <= RTOL
    save_pruned(tmp_path / "pruned.ckpt", result)
    loaded = load_pruned(tmp_path / "pruned.ckpt", SharedWeight())
    _assert_tied(loaded, 12)
    with torch.no_grad():
        assert relative_error(loaded.eval()(VAL), result.model(VAL)) <= RTOL


def test_whole_channel_export_of_a_shared_weight_stays_tied() -> None:
    model = randomize(SharedWeight(), seed=5)
    masks = {"b": torch.arange(16) % 4 != 1}
    result = export(model, masks, VAL[:4], whole_channel=True)
    _assert_tied(result.model, 12)
    reference = zero_norm_affine(model, masks, VAL[:4])  # b's bias and both norms zeroed on the pruned channels
    assert reference.a.weight is reference.b.weight
    with torch.no_grad():
        assert relative_error(result.model(VAL), reference.eval()(VAL)) <= RTOL


def test_callback_prunes_a_shared_weight_once_and_its_checkpoint_reloads_tied(tmp_path) -> None:
    callback = PruneExportCallback(pruner="l1", sparsity=0.5, export_dir=str(tmp_path / "out"))
    _, module = run(tmp_path, callback, module=PLClassifier(network=SharedWeight()))
    assert module.model.a.weight is module.model.b.weight  # the user's model keeps its tie while fine-tuning
    assert callback.report["max_relative_error"] <= RTOL
    network = callback.exported_network
    _assert_tied(network, 8)
    with torch.no_grad():
        assert relative_error(network.eval()(VAL), module.model.eval()(VAL)) <= RTOL
    loaded = load_pruned(callback.report["path"], PLClassifier(network=SharedWeight()))
    _assert_tied(loaded.model, 8)
    with torch.no_grad():
        assert relative_error(loaded.model.eval()(VAL), network(VAL)) <= RTOL
