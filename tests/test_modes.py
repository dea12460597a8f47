"""Tracing and exporting leave every submodule in the train/eval mode it had (a frozen norm stays frozen)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune import ChannelGraph, export


def frozen_backbone() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.LayerNorm(6))
    model.train()
    model[1].eval()  # the user froze this norm's statistics
    return model


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def test_tracing_restores_each_submodules_mode() -> None:
    model = frozen_backbone()
    before = modes(model)
    ChannelGraph.from_model(model, torch.randn(2, 3, 8, 8))
    assert modes(model) == before and before["1"] is False and before[""] is True


def test_the_exported_model_keeps_each_submodules_mode() -> None:
    model = frozen_backbone()
    small = export(model, {"0": torch.arange(8) < 4}, torch.randn(2, 3, 8, 8)).model
    assert small[0].out_channels == 4
    assert modes(small) == modes(model)
