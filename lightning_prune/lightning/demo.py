"""Models and data that need nothing downloaded: scikit-learn's shipped handwritten digits.

Used by the quickstart, the LightningCLI configs and the tests.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 1,797 8x8 digits, split 1,437 train / 360 held out; optionally resized
    to ``image_size`` and repeated to ``channels`` (for torchvision backbones)."""

    def __init__(
        self, batch_size: int = 64, image_size: int = 8, channels: int = 1, seed: int = 0, shuffle: bool = True
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = (images - 0.5) / 0.5
        if self.hparams.image_size != 8:
            images = F.interpolate(images, size=self.hparams.image_size, mode="bilinear", align_corners=False)
        images = images.repeat(1, self.hparams.channels, 1, 1)
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.hparams.seed))
        cut = len(labels) - 360
        self.train_set = TensorDataset(images[order[:cut]], labels[order[:cut]])
        self.val_set = TensorDataset(images[order[cut:]], labels[order[cut:]])

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=self.hparams.shuffle)

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=360)


class Classifier(pl.LightningModule):
    """Cross-entropy training and accuracy logging around ``self.net``."""

    net: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @override
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    @override
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)


class DigitsCNN(Classifier):
    """A small CNN (conv-BN-ReLU x3, global pooling, linear) for 8x8 digits.

    ``batch_norm=False`` swaps each BatchNorm for an identity (the convs then get biases): a
    model whose DDP training matches single-process training step for step, since CPU DDP has
    no synchronised BatchNorm.
    """

    def __init__(self, width: int = 32, lr: float = 0.05, num_classes: int = 10, batch_norm: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=not batch_norm),
            norm(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=not batch_norm),
            norm(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=not batch_norm),
            norm(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )
        self.example_input_array = torch.zeros(1, 1, 8, 8)


class TorchvisionClassifier(Classifier):
    """A torchvision classification builder (``weights=None``), e.g. ``resnet18`` or ``mobilenet_v2``."""

    def __init__(self, arch: str = "resnet18", num_classes: int = 10, lr: float = 0.05, image_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        import torchvision

        self.net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        self.example_input_array = torch.zeros(1, 3, image_size, image_size)
