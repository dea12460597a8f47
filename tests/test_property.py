"""Random small conv nets (residual adds, concats, grouped and depthwise convs) with random masks export exactly."""

from __future__ import annotations

import torch
from helpers import apply_masks, export_and_check, randomize
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from torch import nn

BLOCKS = st.lists(
    st.tuples(
        st.sampled_from(["conv", "residual", "concat", "grouped", "depthwise"]),
        st.integers(2, 6),
        st.sampled_from([1, 3]),
    ),
    min_size=1,
    max_size=5,
)


class RandomNet(nn.Module):
    def __init__(self, blocks: list[tuple[str, int, int]]) -> None:
        super().__init__()
        self.kinds = [kind for kind, _, _ in blocks]
        self.layers = nn.ModuleList()
        channels = 3
        for kind, width, kernel in blocks:
            out = 2 * width
            if kind == "residual":
                layer = nn.Sequential(
                    nn.Conv2d(channels, channels, kernel, padding=kernel // 2), nn.BatchNorm2d(channels)
                )
            elif kind == "concat":
                layer = nn.ModuleList(
                    [nn.Conv2d(channels, out, kernel, padding=kernel // 2), nn.Conv2d(channels, width, 1)]
                )
                out += width
            elif kind == "grouped" and channels % 2 == 0:
                layer = nn.Sequential(
                    nn.Conv2d(channels, out, kernel, padding=kernel // 2, groups=2), nn.BatchNorm2d(out)
                )
            elif kind == "depthwise":
                layer = nn.Sequential(
                    nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.BatchNorm2d(channels)
                )
                out = channels
            else:
                layer = nn.Sequential(nn.Conv2d(channels, out, kernel, padding=kernel // 2), nn.BatchNorm2d(out))
                self.kinds[len(self.layers)] = "conv"
            self.layers.append(layer)
            channels = out if kind != "residual" else channels
        self.head = nn.Linear(channels, 3)

    def forward(self, x):
        for kind, layer in zip(self.kinds, self.layers, strict=True):
            if kind == "residual":
                x = torch.relu(x + layer(x))
            elif kind == "concat":
                x = torch.cat([torch.relu(layer[0](x)), layer[1](x)], dim=1)
            else:
                x = torch.relu(layer(x))
        return self.head(x.mean((2, 3)))


@seed(20261127)
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=BLOCKS, mask_seed=st.integers(0, 2**16), keep_fraction=st.floats(0.2, 0.9))
def test_random_nets_export_exactly(blocks, mask_seed, keep_fraction) -> None:
    torch.manual_seed(mask_seed)
    model = randomize(RandomNet(blocks), seed=mask_seed)
    generator = torch.Generator().manual_seed(mask_seed)
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            keep = torch.rand(module.out_channels, generator=generator) < keep_fraction
            keep[torch.randint(module.out_channels, (1,), generator=generator)] = True  # never an empty layer
            masks[name] = keep
    example = torch.randn(2, 3, 8, 8, generator=generator)
    export_and_check(apply_masks(model, masks), masks, example)
