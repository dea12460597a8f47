"""The accuracy-recovery benchmarks end to end at their smallest (one seed, one budget, a few steps), so they cannot rot:
every recipe trains a user's LightningModule through the callback, exports, and scores."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import recovery
import recovery_lm

SPLITS = ["test", "validation"]
RECIPES = [
    "one-shot, masked",
    "one-shot + distill",
    "gradual",
    "gradual + Taylor",
    "gradual + distill",
    "one-shot + distill, pruned size",
    "one-shot, activation",
    "one-shot + distill, activation",
]


def check(result: dict, kept: dict[str, tuple[float, float]], score: tuple[float, float]) -> None:
    table = result["table"]
    assert sorted(table) == sorted((budget, name) for budget in kept for name in RECIPES)
    for (budget, name), row in table.items():
        assert len(row["test"]) == 1 and score[0] <= row["test"][0] <= score[1], (budget, name, row)
        low, high = kept[budget]
        assert low <= row["kept"][0] <= high, (budget, name, row)
    for budget in kept:  # the same widths, whether fine-tuned masked or at the pruned size
        assert (
            table[(budget, "one-shot + distill")]["kept"] == table[(budget, "one-shot + distill, pruned size")]["kept"]
        )


def test_language_model_benchmark(capsys) -> None:
    torch.manual_seed(0)
    argv = ["--seeds", "1", "--dense-steps", "4", "--steps", "8", "--held-out", "8", "--batch-size", "4"]
    argv += ["--budgets", "30%", "--jobs", "1"]
    result = recovery_lm.main(argv)
    # bits per byte: below 8 (uniform over bytes) + slack for an untrained model's sharper logits
    check(result, {"30%": (0.25, 0.35)}, (0.5, 9.0))
    assert all(0.5 <= score <= 9.0 for score in result["dense"].values()) and sorted(result["dense"]) == SPLITS
    for row in result["table"].values():  # every run scored on both splits; the table shows test
        assert sorted(row) == ["kept", *SPLITS] and 0.5 <= row["validation"][0] <= 9.0
    out = capsys.readouterr().out
    assert "| recipe (bits per byte, test) | ~30% params kept |" in out
    assert "Python " in out and "MB validation" in out and "MB test" in out


def test_language_model_jobs_give_the_table_of_one_process() -> None:
    """``--jobs 2`` shares the (seed, budget) runs out over two processes of the script; every run is seeded
    on its own, so the merged table is the one a single process makes, row for row and in its order."""
    argv = ["--seeds", "1", "--dense-steps", "4", "--steps", "8", "--held-out", "8", "--batch-size", "4"]
    argv += ["--recipes", "one-shot, masked", "gradual"]
    one, shared = recovery_lm.main([*argv, "--jobs", "1"]), recovery_lm.main([*argv, "--jobs", "2"])
    assert (
        list(shared["table"])
        == list(one["table"])
        == [(budget, name) for budget in ("50%", "30%") for name in ("one-shot, masked", "gradual")]
    )
    for key, row in one["table"].items():
        assert shared["table"][key].keys() == row.keys()
        for column, values in row.items():
            assert shared["table"][key][column] == pytest.approx(values, rel=1e-6), (key, column)
    assert one["table"][("50%", "gradual")]["test"] != one["table"][("30%", "gradual")]["test"]


def test_language_model_splits_are_disjoint() -> None:
    train, validation, test = recovery_lm.corpus()
    assert min(len(train), len(validation), len(test)) > 100_000
    sample = validation[:4000]  # a validation file's opening lines appear in neither other split
    assert sample not in train and sample not in test


def test_vision_benchmark(capsys) -> None:
    torch.manual_seed(0)
    argv = ["--seeds", "1", "--train", "200", "--held-out", "100", "--dense-epochs", "1", "--steps", "8"]
    argv += ["--budgets", "30%"]
    result = recovery.main(argv)
    check(result, {"30%": (0.25, 0.35)}, (0.0, 1.0))
    assert 0.0 <= result["dense"] <= 1.0
    assert "| recipe (held-out accuracy) | ~30% params kept |" in capsys.readouterr().out
