"""Test-split bits per byte of a pruned byte-level LLaMA for each accuracy-recovery recipe of the callback.

The corpus: the Python standard library's own source, the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (``site-packages`` left out), read as bytes; a file is a test file
when the CRC-32 of its path relative to that folder is 0 mod 10, a validation file when it is 1 mod 10,
a training file otherwise, so the split is fixed by the file names alone (it changes only with the
Python version, which the output names). Training takes random windows of ``--context`` bytes from the
training files; a score is the mean next-byte cross-entropy, in bits, over fixed windows of the
validation or the test files. Settings (the learning rate after pruning, per recipe, in ``LR``) are
chosen on validation (``--split validation --lr ...``); the table reports test.

The model: Hugging Face's ``LlamaForCausalLM`` built from a config (no download): vocabulary 256
(bytes), hidden 128, 4 layers of 8 heads (key/value heads 8), MLP 384, tied embedding, 0.89M
parameters. A user's LightningModule trains it (AdamW, weight decay 0.1); the dense model trains
``--dense-steps`` steps once (seed 0, learning rate 3e-3, warmup and cosine decay), then every recipe
starts from that checkpoint and gets the same ``--steps`` in 8 epochs (the same number of tokens;
pruning happens inside them), its learning rate with cosine decay, for each seed (the seed draws
the training windows): the recipes of ``recovery_common.recipes``, distilling with ``DISTILL``.

Pruned: the attention heads, the MLP width and the residual width (``op_types=["Linear", "Embedding"]``:
the embedding's columns, every projection reading or writing the residual stream, the RMSNorm weights),
each losing the channel sparsity that keeps about 50% and 30% of the parameters; the table gives the
share actually kept. Bits per byte: mean and spread (max - min) over the seeds, of the exported model.

The seeds and budgets are shared out over ``--jobs`` processes (default: one per core, at most two),
each on one thread after the dense model is trained once; every run is seeded on its own, so the table
is the same whatever the number of jobs.

    python benchmarks/recovery_lm.py                      # 3 seeds: the table in docs/recipes.md
    python benchmarks/recovery_lm.py --seeds 1 --dense-steps 200 --steps 40   # a quick look
    python benchmarks/recovery_lm.py --seeds 1 --split validation --lr 2e-3   # choosing a learning rate
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(__file__))
from recovery_common import EPOCHS, parse_arguments, quiet, recipes, run_benchmark, spread_table, trainer

# per token, over the 256 bytes; the teacher is the dense checkpoint the fit starts from (docs/recipes.md: why)
DISTILL = {"weight": 4.0, "temperature": 1.0, "teacher": "fit_start"}
SPARSITY = {"50%": 0.3, "30%": 0.45}  # channel sparsity of heads, MLP and residual -> about this share of params kept
OP_TYPES = ["Linear", "Embedding"]
# each recipe's learning rate after pruning, chosen on validation (seed 0) from 5e-4, 1e-3 and 2e-3; the activation
# start with distillation also from 7e-4, 1.5e-3 and 3e-3 (docs/recipes.md, "What was tried")
LR = {**dict.fromkeys(recipes(), 1e-3), "one-shot + distill, activation": 2e-3}


def corpus(stdlib: str | None = None) -> tuple[bytes, bytes, bytes]:
    """The standard library's ``.py`` sources as (training, validation, test) bytes, split by file name:
    the CRC-32 of a file's path is 0 mod 10 for the test files, 1 mod 10 for the validation files."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    splits: tuple[list[bytes], list[bytes], list[bytes]] = ([], [], [])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith("site-packages/"):
            continue
        crc = zlib.crc32(relative.encode()) % 10
        splits[2 if crc == 0 else 1 if crc == 1 else 0].append(path.read_bytes())
    train, validation, test = (b"\n".join(files) for files in splits)
    return train, validation, test


class Windows(Dataset):
    """``count`` windows of ``context`` bytes at offsets drawn from ``seed``: labelled for next-byte prediction."""

    def __init__(self, data: bytes, count: int, context: int, seed: int) -> None:
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(data) - context, (count,), generator=generator)
        self.context = context

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.offsets[index])
        ids = self.data[start : start + self.context].long()
        return {"input_ids": ids, "labels": ids}


def byte_llama(context: int = 64) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=384,
        num_hidden_layers=4,
        max_position_embeddings=context,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


class ByteLM(L.LightningModule):
    """A user's language model: ``self.model`` computes its own loss from ``labels``."""

    def __init__(self, lr: float = 3e-3, steps: int = 1000, warmup: int = 0, context: int = 64) -> None:
        super().__init__()
        self.lr, self.steps, self.warmup = lr, steps, warmup
        self.model = byte_llama(context)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, betas=(0.9, 0.95))

        def factor(step: int) -> float:
            if step < self.warmup:
                return (step + 1) / self.warmup
            progress = min((step - self.warmup) / max(self.steps - self.warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def bits_per_byte(network: nn.Module, data: Windows, batch_size: int = 64) -> float:
    network.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size):
            loss = network(**batch).loss
            total, count = total + float(loss) * len(batch["input_ids"]), count + len(batch["input_ids"])
    return total / count / math.log(2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="to split the seeds over processes")
    parser.add_argument("--dense-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=200, help="training steps per recipe, pruning included")
    parser.add_argument("--lr", type=float, help="every recipe's peak learning rate (default: each its own, LR)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=512, help="validation windows, and as many test windows")
    parser.add_argument("--split", default="test", choices=["test", "validation"], help="the split the table shows")
    parser.add_argument("--dense-cache", help="load the dense model from this file, or save it there once trained")
    parser.add_argument("--budgets", nargs="*", default=list(SPARSITY), choices=list(SPARSITY))
    parser.add_argument("--recipes", nargs="*", default=None, help="recipe names (default: all)")
    args = parse_arguments(parser, argv)
    started = time.perf_counter()
    train_bytes, validation_bytes, test_bytes = corpus()
    splits = {
        "validation": Windows(validation_bytes, args.held_out, args.context, seed=54321),
        "test": Windows(test_bytes, args.held_out, args.context, seed=12345),
    }
    per_epoch = args.steps // EPOCHS

    def loader(seed: int, steps: int) -> DataLoader:
        return DataLoader(Windows(train_bytes, steps * args.batch_size, args.context, seed), batch_size=args.batch_size)

    def scores(network: nn.Module) -> dict[str, float]:
        return {split: bits_per_byte(network, windows) for split, windows in splits.items()}

    with tempfile.TemporaryDirectory() as root:
        L.seed_everything(0, verbose=False)
        dense = ByteLM(lr=3e-3, steps=args.dense_steps, warmup=args.dense_steps // 20, context=args.context)
        if args.dense_cache and os.path.exists(args.dense_cache):
            dense.load_state_dict(torch.load(args.dense_cache, weights_only=True))
        else:
            trainer(max_steps=args.dense_steps, callbacks=[], root=root).fit(dense, loader(10_000, args.dense_steps))
            if args.dense_cache:
                torch.save(dense.state_dict(), args.dense_cache)
        dense_scores = scores(dense.model)
        if not args.units:  # a job's share: its runs' lines, and the table to its file
            print(
                f"dense: {dense_scores['test']:.3f} bits per byte on test, {dense_scores['validation']:.3f} on validation"
            )

        def fit(seed: int, name: str, callback: L.Callback) -> tuple[nn.Module, dict[str, float]]:
            module = ByteLM(lr=args.lr or LR[name], steps=per_epoch * EPOCHS, context=args.context)
            module.load_state_dict(dense.state_dict())
            epochs = trainer(max_epochs=EPOCHS, callbacks=[callback], root=root)
            epochs.fit(module, loader(seed, per_epoch))
            network = callback.exported_network
            return network, scores(network)

        options = ["--dense-steps", args.dense_steps, "--steps", args.steps, "--batch-size", args.batch_size]
        options += ["--context", args.context, "--held-out", args.held_out, "--split", args.split]
        options += ["--lr", args.lr] if args.lr else []
        common = {"op_types": OP_TYPES, "export_dir": f"{root}/out", "verify_batches": 1}
        table = run_benchmark(args, __file__, options, root, fit, recipes(DISTILL), SPARSITY, dense, common)
    if args.units:
        return {"dense": dense_scores, "table": table}
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {args.jobs} job(s), each run on one thread, "
        f"torch {torch.__version__}, Python {platform.python_version()}; load {os.getloadavg()[0]:.1f}; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    sizes = (len(data) / 1e6 for data in (train_bytes, validation_bytes, test_bytes))
    print(
        "corpus: {:.1f} MB training, {:.1f} MB validation, {:.1f} MB test; ".format(*sizes)
        + f"dense {args.dense_steps} steps, then {per_epoch * EPOCHS} steps per recipe "
        f"({args.batch_size} x {args.context} bytes each); dense model {dense_scores[args.split]:.3f} bits per byte "
        f"on {args.split}\n"
    )
    print(spread_table(table, f"bits per byte, {args.split}", split=args.split, lower_is_better=True))
    return {"dense": dense_scores, "table": table}


if __name__ == "__main__":
    quiet()
    main()
