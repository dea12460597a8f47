"""Issue 17's smaller surprises: ``input_key`` with a keyword ``forward``, and two layers sharing one weight.

A dict batch's ``input_key`` is passed by name when the module's ``forward`` takes that name (or
``**kwargs``), else positionally; layers sharing one weight (``b.weight = a.weight``) are one
pruning decision and come back from export, the callback and the checkpoint still tied.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import RTOL, relative_error
from test_callback_everyday import VAL
from torch.utils.data import DataLoader, Dataset
from user_modules import PLClassifier, images

from lightning_prune import ConfigurationError, PruneExportCallback
from lightning_prune.core.batches import split_batch

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
    trainer = pl.Trainer(
        max_steps=6,
        limit_val_batches=3,
        default_root_dir=tmp_path,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
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
