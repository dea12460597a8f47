"""compare_latency: interleaved, budgeted, restoring modes; latency_is_noise on interquartile ranges."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_prune.core.verify import report
from lightning_prune.core.verify.report import (
    Latency,
    compare_latency,
    count_macs,
    count_params,
    latency_is_noise,
    measure_latency,
)


class Recorder(nn.Module):
    """Appends its name to a shared log on every call, with the grad and training state it saw;
    ``cost`` seconds pass on the fake clock per call."""

    def __init__(self, name: str, log: list, clock: FakeClock | None = None, cost: float = 0.0) -> None:
        super().__init__()
        self.name, self.log, self.clock, self.cost = name, log, clock, cost
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, torch.is_grad_enabled(), self.training, self.linear.training))
        if self.clock is not None:
            self.clock.now += self.cost
        return self.linear(x)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(report, "_clock", fake)
    return fake


X = torch.randn(1, 2)


def test_rounds_interleave_with_alternating_order(clock) -> None:
    log: list = []
    models = {"a": Recorder("a", log, clock, 0.001), "b": Recorder("b", log, clock, 0.002)}
    times = compare_latency(models, X, rounds=4, repeats=3, warmup=2, budget_s=100.0)
    names = [entry[0] for entry in log]
    assert names[:4] == ["a", "a", "b", "b"]  # warm-up
    assert names[4:] == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert times["a"].samples == times["b"].samples == 12
    assert times["a"].median_ms == pytest.approx(1.0) and times["b"].median_ms == pytest.approx(2.0)
    assert times["a"].spread_ms == pytest.approx(0.0, abs=1e-9)


def test_timed_calls_run_in_eval_mode_without_grad_and_modes_come_back(clock) -> None:
    log: list = []
    training = Recorder("t", log, clock, 0.001).train()
    mixed = Recorder("m", log, clock, 0.001).train()
    mixed.linear.eval()  # a frozen part inside a training model keeps its own mode
    frozen = Recorder("f", log, clock, 0.001).eval()
    compare_latency({"t": training, "m": mixed, "f": frozen}, X, rounds=1, repeats=5, budget_s=10.0)
    assert all(
        grad is False and not model_training and not child_training for _, grad, model_training, child_training in log
    )
    assert training.training and training.linear.training
    assert mixed.training and not mixed.linear.training
    assert not frozen.training and not frozen.linear.training


def test_modes_come_back_when_a_model_fails(clock) -> None:
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    good, broken = nn.Linear(2, 2).train(), Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        compare_latency({"good": good, "broken": broken}, X)
    assert good.training and broken.training


def test_the_budget_cuts_repeats_of_slow_models_but_keeps_five_samples(clock) -> None:
    log: list = []
    models = {"fast": Recorder("fast", log, clock, 0.001), "slow": Recorder("slow", log, clock, 1.0)}
    times = compare_latency(models, X, rounds=5, repeats=5, warmup=2, budget_s=3.0)
    assert times["slow"].samples == 5  # 25 calls would take 25 s: cut to one per round, never below 5
    assert times["fast"].samples == 25  # 25 ms fits its share
    assert times["slow"].median_ms == pytest.approx(1000.0)


def test_few_rounds_still_give_five_samples(clock) -> None:
    log: list = []
    times = compare_latency({"slow": Recorder("slow", log, clock, 2.0)}, X, rounds=2, repeats=5, warmup=0, budget_s=0.5)
    assert times["slow"].samples == 6  # ceil(5 / 2) per round
    assert [entry[0] for entry in log].count("slow") == 1 + 6  # one untimed call even with warmup=0


def test_rounds_stop_once_the_budget_is_spent(clock) -> None:
    class Slowing(Recorder):
        """Cheap at warm-up, then much slower: the estimate was wrong, the budget still holds."""

        def forward(self, x):
            self.cost = 0.001 if len(self.log) < 2 else 1.0
            return super().forward(x)

    log: list = []
    times = compare_latency({"s": Slowing("s", log, clock)}, X, rounds=5, repeats=5, warmup=2, budget_s=3.0)
    assert times["s"].samples == 5  # the first round gave 5 samples and spent the budget


def test_default_arguments_give_25_samples_each() -> None:
    times = compare_latency({"dense": nn.Linear(32, 32), "small": nn.Linear(32, 4)}, torch.randn(2, 32))
    for latency in times.values():
        assert latency.samples == 25 and 0 < latency.q1_ms <= latency.median_ms <= latency.q3_ms


def test_bad_arguments() -> None:
    assert compare_latency({}, X) == {}
    with pytest.raises(ValueError, match="rounds >= 1, repeats >= 1, warmup >= 0 and budget_s > 0; got 0, 5, 2, 3.0"):
        compare_latency({"a": nn.Linear(2, 2)}, X, rounds=0)


def test_latency_is_noise_when_the_interquartile_ranges_overlap() -> None:
    base = Latency(median_ms=10.0, q1_ms=9.0, q3_ms=11.0, samples=25)
    assert latency_is_noise(base, Latency(11.5, 10.9, 12.0, 25))
    assert latency_is_noise(base, Latency(10.0, 9.5, 10.5, 25))  # one range inside the other
    assert latency_is_noise(base, Latency(11.5, 11.0, 12.0, 25))  # touching
    assert latency_is_noise(Latency(11.5, 11.0, 12.0, 25), base)
    assert not latency_is_noise(base, Latency(6.0, 5.0, 8.9, 25))
    assert not latency_is_noise(Latency(6.0, 5.0, 8.9, 25), base)
    assert base.spread_ms == 2.0


def test_latency_of_timings() -> None:
    latency = Latency.of([0.004, 0.001, 0.003, 0.002, 0.005, 0.006])
    assert latency == Latency(median_ms=3.5, q1_ms=2.25, q3_ms=4.75, samples=6)
    assert Latency.of([0.002]) == Latency(2.0, 2.0, 2.0, 1)
    with pytest.raises(ValueError, match="at least one timing"):
        Latency.of([])


def test_measure_latency_is_the_median_in_seconds(clock) -> None:
    log: list = []
    model = Recorder("m", log, clock, 0.25).train()
    assert measure_latency(model, X, repeats=10, warmup=2) == pytest.approx(0.25)
    assert len(log) == 12 and model.training
    assert measure_latency(model, X, repeats=1, warmup=0) == pytest.approx(0.25)  # at least 5 samples


def test_counts_are_unchanged() -> None:
    conv = nn.Conv2d(3, 8, 3)
    assert count_params(conv) == 8 * 3 * 9 + 8
    assert count_macs(conv, torch.randn(1, 3, 10, 10)) == 8 * 8 * 8 * 27
    assert math.isfinite(measure_latency(conv, torch.randn(1, 3, 10, 10)))


def _vit_macs(image: int, patch: int, layers: int, dim: int, mlp: int, classes: int, batch: int = 1) -> int:
    """Hand count for torchvision's VisionTransformer: patch conv, per block qkv / q@k^T / attn@v /
    out projection / MLP, and the head on the class token."""
    patches = (image // patch) ** 2
    tokens = patches + 1
    conv = patches * dim * 3 * patch * patch
    block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * mlp
    return batch * (conv + layers * block + dim * classes)


def test_count_macs_counts_attention_of_a_tiny_vision_transformer() -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    # 4 patches + class token = 5 tokens of width 8: conv 4*8*768, qkv 5*8*24, q@k^T 5*5*8, attn@v 5*5*8,
    # out projection 5*8*8, MLP 2*5*8*16, head 8*3
    assert count_macs(model, torch.randn(1, 3, 32, 32)) == 24576 + 960 + 200 + 200 + 320 + 1280 + 24 == 27560
    assert count_macs(model, torch.randn(2, 3, 32, 32)) == 2 * 27560


def test_count_macs_of_vit_b_16_at_a_small_image_matches_the_hand_count() -> None:
    from torchvision.models import vit_b_16

    model = vit_b_16(weights=None, image_size=64).train()
    assert count_macs(model, torch.randn(1, 3, 64, 64)) == _vit_macs(64, 16, 12, 768, 3072, 1000)
    assert model.training and model.encoder.layers[0].training  # the mode comes back
    assert torch.backends.mha.get_fastpath_enabled()  # and so does the fused attention path


def test_count_macs_counts_the_fused_eval_attention_of_nn_transformer_layers() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    # 2 x 5 tokens: in-projection 10*16*48, q@k^T and attn@v 2 * 2*5*5*16, out projection 10*16*16, feed-forward 2*10*16*32
    assert count_macs(layer, torch.randn(2, 5, 16)) == 7680 + 1600 + 2560 + 10240


def test_count_macs_of_scaled_dot_product_attention_and_matmul() -> None:
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v) + (q @ k.transpose(-1, -2)) @ v

    q = torch.randn(2, 3, 7, 4)  # batch 2, 3 heads, 7 tokens, head dim 4
    # sdpa: q@k^T and attn@v, 2*3*7*7*4 each; then the same two products written out
    assert count_macs(Attention(), (q, q, q)) == 4 * (2 * 3 * 7 * 7 * 4)


@pytest.mark.parametrize(
    "layer, shape, expected",
    [
        pytest.param(
            nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (1, 4, 5, 5), 4 * 25 * 3 * 9, id="conv_transpose_grouped"
        ),
        pytest.param(nn.ConvTranspose2d(4, 6, 3), (1, 4, 5, 5), 4 * 25 * 6 * 9, id="conv_transpose"),
        pytest.param(nn.Conv2d(8, 12, 3, groups=4), (1, 8, 6, 6), 12 * 4 * 4 * 2 * 9, id="grouped_conv"),
        pytest.param(nn.Conv2d(8, 8, 3, groups=8), (1, 8, 6, 6), 8 * 4 * 4 * 9, id="depthwise_conv"),
        pytest.param(nn.Conv1d(3, 5, 2), (2, 3, 9), 2 * 5 * 8 * 3 * 2, id="conv1d"),
        pytest.param(nn.Linear(6, 4, bias=False), (3, 2, 6), 3 * 2 * 4 * 6, id="linear_3d_no_bias"),
    ],
)
def test_count_macs_of_conv_variants(layer: nn.Module, shape: tuple[int, ...], expected: int) -> None:
    assert count_macs(layer, torch.randn(shape)) == expected
