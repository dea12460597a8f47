"""LightningModules and data written the way users write them, not the way the package's demo does.

Each module exists for both Lightning namespaces (``pytorch_lightning`` and ``lightning.pytorch``):
the logic lives in a mixin, the namespaces only supply the base class. Batches come as a tensor,
a tuple ``(x, y)`` or a dict ``{"pixel_values": x, "labels": y}``. Data are generated: labels
come from a fixed random projection, so a small network learns them in a few steps.
"""

from __future__ import annotations

import lightning.pytorch as L
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

NAMESPACES = {"pytorch_lightning": pl, "lightning.pytorch": L}
BATCH_KINDS = ("tensor", "tuple", "dict")


def quiet_trainer(namespace, root, callbacks, **settings):
    """A real ``namespace.Trainer`` writing under ``root``, with no logger, checkpoints, progress bar or
    model summary unless ``settings`` ask for them."""
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return namespace.Trainer(default_root_dir=root, callbacks=callbacks, **{**quiet, **settings})


def images(count: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, 8, 8, generator=generator)
    projection = torch.randn(3 * 8 * 8, 4, generator=torch.Generator().manual_seed(123))
    return x, (x.flatten(1) @ projection).argmax(1)


class Images(Dataset):
    """Generated 3x8x8 images in one of three batch layouts."""

    def __init__(self, kind: str, count: int = 96, seed: int = 0) -> None:
        self.kind = kind
        self.x, self.y = images(count, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        if self.kind == "tensor":
            return self.x[index]
        if self.kind == "tuple":
            return self.x[index], self.y[index]
        return {"pixel_values": self.x[index], "labels": self.y[index]}


def loaders(kind: str, batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(Images(kind, 96, seed=0), batch_size=batch_size, shuffle=True),
        DataLoader(Images(kind, 48, seed=1), batch_size=batch_size),
    )


def small_cnn(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 4),
    )


class _ClassifierLogic:
    """A user's classifier: ``self.model`` is the network; the batch layout decides the steps."""

    def __init__(self, kind: str = "tuple", width: int = 8, network: nn.Module | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.kind = kind
        self.lr = lr
        self.model = network if network is not None else small_cnn(width)
        self.steps_run = 0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    def _loss(self, batch) -> torch.Tensor:
        if self.kind == "tensor":  # no labels: a self-supervised style objective
            return self(batch).logsumexp(1).mean()
        x, y = batch if self.kind == "tuple" else (batch["pixel_values"], batch["labels"])
        return F.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class PLClassifier(_ClassifierLogic, pl.LightningModule):
    pass


class LClassifier(_ClassifierLogic, L.LightningModule):
    pass


CLASSIFIERS = {"pytorch_lightning": PLClassifier, "lightning.pytorch": LClassifier}


class _DataLogic:
    def __init__(self, kind: str = "tuple", batch_size: int = 16) -> None:
        super().__init__()
        self.kind, self.batch_size = kind, batch_size

    def train_dataloader(self) -> DataLoader:
        return loaders(self.kind, self.batch_size)[0]

    def val_dataloader(self) -> DataLoader:
        return loaders(self.kind, self.batch_size)[1]


class PLData(_DataLogic, pl.LightningDataModule):
    pass


class LData(_DataLogic, L.LightningDataModule):
    pass


DATAMODULES = {"pytorch_lightning": PLData, "lightning.pytorch": LData}


def small_mlp() -> nn.Sequential:
    """Linear layers only: the default ``op_types=['Conv2d']`` selects nothing."""
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 4))


VOCAB = 64


class Sentences(Dataset):
    """Token sequences of one length, labelled for next-token prediction (``labels`` = ``input_ids``)."""

    def __init__(self, count: int, length: int = 8, seed: int = 0) -> None:
        self.ids = torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def tiny_causal_lm(arch: str = "llama", tie: bool = True) -> nn.Module:
    """A tiny Hugging Face causal LM; ``tie`` shares the LM head's weight with the token embedding."""
    import transformers

    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_head=4, n_inner=64, n_layer=2, n_positions=32, tie_word_embeddings=tie
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config)


class CausalLM(L.LightningModule):
    """A user's language model: ``self.model`` is the Hugging Face model, which computes its own loss."""

    def __init__(self, arch: str = "llama", tie: bool = True, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_causal_lm(arch, tie)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
