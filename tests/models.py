"""Small in-repo models for the seed's patterns and for every op family the tracer understands."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ConcatNet(nn.Module):
    """A concat of a pruned producer, an unpruned one and the network input, into a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.pruned = cbr(3, 16)
        self.unpruned = cbr(3, 8)
        self.head = nn.Conv2d(16 + 8 + 3, 10, 1)

    def forward(self, x):
        return self.head(torch.cat([self.pruned(x), self.unpruned(x), x], dim=1)).mean((2, 3))


class DepthwiseNet(nn.Module):
    """MobileNetV2-style inverted residual: expand, depthwise, project, residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.expand = cbr(16, 48, 1)
        self.depthwise = nn.Sequential(nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False), nn.BatchNorm2d(48), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.head(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(scale))))


class SENet(nn.Module):
    """A conv block gated by a squeeze-and-excitation branch."""

    def __init__(self) -> None:
        super().__init__()
        self.body = cbr(3, 32)
        self.se = SqueezeExcite(32, 8)
        self.head = nn.Conv2d(32, 6, 3, padding=1)

    def forward(self, x):
        return self.head(self.se(self.body(x)))


class Conv2dBetween3d(nn.Module):
    """The seed's ``decoder3.convs.0.downsample.conv1``: a Conv2d on a 5D tensor folded to 4D."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.depth = depth
        self.conv3d_in = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8 * depth, 12, 1)
        self.bn = nn.BatchNorm2d(12)
        self.conv3d_out = nn.Conv3d(3, 4, 3, padding=1)

    def forward(self, volume):
        b, _, d, h, w = volume.shape
        x = self.conv3d_in(volume)
        x = F.relu(self.bn(self.conv1(x.reshape(b, -1, h, w))))
        return self.conv3d_out(x.view(b, -1, d, h, w))  # channels recomputed, depth fixed


class UnprunedLast(nn.Module):
    """The last conv's channels are the model's output: they must survive any mask."""

    def __init__(self) -> None:
        super().__init__()
        self.features = cbr(3, 16)
        self.last = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.last(self.features(x))


class ShuffleChunkNet(nn.Module):
    """ShuffleNetV2's chunk, concat and channel shuffle (view/transpose/view), then stack."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 64)
        self.branch = cbr(32, 32, 1)
        self.head = nn.Conv2d(64, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        left, right = x.chunk(2, dim=1)
        x = torch.cat([left, self.branch(right)], dim=1)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return torch.stack([self.head(x), self.head(x.flip(-1))], dim=1)


class OpsNet(nn.Module):
    """Conv1d, ConvTranspose2d, GroupNorm, InstanceNorm, PReLU, channels-last LayerNorm, flatten
    into Linear, interpolation, functional calls, a reused module, in-place ops, dict in and out,
    and Python control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.prelu = nn.PReLU(16)
        self.up = nn.ConvTranspose2d(16, 12, 2, stride=2)
        self.inorm = nn.InstanceNorm2d(12, affine=True)
        self.shared = nn.Conv2d(12, 12, 1)
        self.ln = nn.LayerNorm(12)
        self.mlp = nn.Linear(12, 20)
        self.seq_conv = nn.Conv1d(20, 10, 3, padding=1)
        self.fc = nn.Linear(10 * 4, 7)
        self.aux = nn.Conv2d(16, 6, 1)

    def forward(self, inputs):
        x = self.prelu(self.gn(self.conv(inputs["image"])))
        aux = F.interpolate(self.aux(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        y = F.relu(self.inorm(self.up(x)))
        y = self.shared(y)
        y = self.shared(F.relu(y))  # the same layer twice
        if inputs["scale"] > 0:  # control flow on a Python value
            y = y * inputs["scale"]
        y = y.mul_(0.5).add_(1.0)  # in-place ops
        tokens = self.ln(y.flatten(2).transpose(1, 2))  # (B, HW, C): channels-last LayerNorm
        tokens = F.gelu(F.linear(tokens, self.mlp.weight, self.mlp.bias))  # functional call
        seq = self.seq_conv(tokens.transpose(1, 2))  # (B, 20, HW)
        pooled = F.adaptive_avg_pool1d(seq, 4)
        return {"logits": self.fc(pooled.flatten(1)), "aux": aux.sum(1)}


class ConvBnReluUnit(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True) -> None:
        super().__init__()
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
        self.cbr_unit = nn.Sequential(*layers, *([nn.ReLU()] if relu else []))

    def forward(self, x):
        return self.cbr_unit(x)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.convbnrelu1 = ConvBnReluUnit(cin, cout, 3, stride)
        self.convbn2 = ConvBnReluUnit(cout, cout, 3, 1, relu=False)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.convbn2(self.convbnrelu1(x))
        residual = self.downsample(x)
        out += residual
        return F.relu(out)


class PyramidPooling(nn.Module):
    def __init__(self, channels: int, levels: int = 2) -> None:
        super().__init__()
        self.path_module_list = nn.ModuleList(ConvBnReluUnit(channels, channels, 1) for _ in range(levels))

    def forward(self, x):
        h, w = x.shape[2:]
        out = x
        for level, path in enumerate(self.path_module_list):
            pooled = F.adaptive_avg_pool2d(x, 2**level)
            out = out + F.interpolate(path(pooled), size=(h, w), mode="bilinear", align_corners=False)
        return out / 2.0


class FeatureExtraction(nn.Module):
    """The seed's HSMNet feature extractor in miniature: stem, residual blocks with downsample,
    pyramid pooling, upconv + concat ``iconv`` layers and projections."""

    def __init__(self) -> None:
        super().__init__()
        self.convbnrelu1_1 = ConvBnReluUnit(3, 8, 3, 2)
        self.convbnrelu1_2 = ConvBnReluUnit(8, 8)
        self.res_block3 = nn.Sequential(ResidualBlock(8, 16, 2))
        self.res_block5 = nn.Sequential(ResidualBlock(16, 24, 2))
        self.pyramid_pooling = PyramidPooling(24)
        self.upconv5 = nn.Sequential(nn.Upsample(scale_factor=2), ConvBnReluUnit(24, 16))
        self.iconv4 = ConvBnReluUnit(16 + 16, 16)
        self.proj5 = ConvBnReluUnit(24, 8, 1)
        self.proj4 = ConvBnReluUnit(16, 8, 1)

    def forward(self, x):
        x = self.convbnrelu1_2(self.convbnrelu1_1(x))
        conv3 = self.res_block3(x)
        conv5 = self.pyramid_pooling(self.res_block5(conv3))
        concat4 = torch.cat((self.upconv5(conv5), conv3), dim=1)
        return self.proj5(conv5), self.proj4(self.iconv4(concat4))


class SeedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.feature_extraction = FeatureExtraction()

    def forward(self, x):
        return self.feature_extraction(x)


SEED_INPLACE_DICT = {
    "feature_extraction.convbnrelu1_1.cbr_unit.0": (None,),
    "feature_extraction.convbnrelu1_1.cbr_unit.1": ("feature_extraction.convbnrelu1_1.cbr_unit.0",),
    "feature_extraction.convbnrelu1_2.cbr_unit.0": ("feature_extraction.convbnrelu1_1.cbr_unit.0",),
    "feature_extraction.convbnrelu1_2.cbr_unit.1": ("feature_extraction.convbnrelu1_2.cbr_unit.0",),
    "feature_extraction.res_block3.0.convbnrelu1.cbr_unit.0": ("feature_extraction.convbnrelu1_2.cbr_unit.0",),
    "feature_extraction.res_block3.0.convbnrelu1.cbr_unit.1": ("feature_extraction.res_block3.0.convbnrelu1.cbr_unit.0",),
    "feature_extraction.res_block3.0.convbn2.cbr_unit.0": ("feature_extraction.res_block3.0.convbnrelu1.cbr_unit.0",),
    "feature_extraction.res_block3.0.convbn2.cbr_unit.1": ("feature_extraction.res_block3.0.convbn2.cbr_unit.0",),
    "feature_extraction.res_block3.0.downsample.0": ("feature_extraction.convbnrelu1_2.cbr_unit.0",),
    "feature_extraction.res_block3.0.downsample.1": ("feature_extraction.res_block3.0.downsample.0",),
    "feature_extraction.res_block5.0.convbnrelu1.cbr_unit.0": ("feature_extraction.res_block3.0.downsample.0",),
    "feature_extraction.res_block5.0.convbnrelu1.cbr_unit.1": ("feature_extraction.res_block5.0.convbnrelu1.cbr_unit.0",),
    "feature_extraction.res_block5.0.convbn2.cbr_unit.0": ("feature_extraction.res_block5.0.convbnrelu1.cbr_unit.0",),
    "feature_extraction.res_block5.0.convbn2.cbr_unit.1": ("feature_extraction.res_block5.0.convbn2.cbr_unit.0",),
    "feature_extraction.res_block5.0.downsample.0": ("feature_extraction.res_block3.0.downsample.0",),
    "feature_extraction.res_block5.0.downsample.1": ("feature_extraction.res_block5.0.downsample.0",),
    "feature_extraction.pyramid_pooling.path_module_list.0.cbr_unit.0": ("feature_extraction.res_block5.0.downsample.0",),
    "feature_extraction.pyramid_pooling.path_module_list.0.cbr_unit.1": (
        "feature_extraction.pyramid_pooling.path_module_list.0.cbr_unit.0",
    ),
    "feature_extraction.pyramid_pooling.path_module_list.1.cbr_unit.0": ("feature_extraction.res_block5.0.downsample.0",),
    "feature_extraction.pyramid_pooling.path_module_list.1.cbr_unit.1": (
        "feature_extraction.pyramid_pooling.path_module_list.1.cbr_unit.0",
    ),
    "feature_extraction.upconv5.1.cbr_unit.0": ("feature_extraction.pyramid_pooling.path_module_list.1.cbr_unit.0",),
    "feature_extraction.upconv5.1.cbr_unit.1": ("feature_extraction.upconv5.1.cbr_unit.0",),
    "feature_extraction.iconv4.cbr_unit.0": ("feature_extraction.upconv5.1.cbr_unit.0", "feature_extraction.res_block3.0.downsample.0"),
    "feature_extraction.iconv4.cbr_unit.1": ("feature_extraction.iconv4.cbr_unit.0",),
    "feature_extraction.proj5.cbr_unit.0": ("feature_extraction.pyramid_pooling.path_module_list.1.cbr_unit.0",),
    "feature_extraction.proj5.cbr_unit.1": ("feature_extraction.proj5.cbr_unit.0",),
    "feature_extraction.proj4.cbr_unit.0": ("feature_extraction.iconv4.cbr_unit.0",),
    "feature_extraction.proj4.cbr_unit.1": ("feature_extraction.proj4.cbr_unit.0",),
}
"""Hand-written in the seed's style (the residual sum named by its downsample producer, the
pyramid sum by its last path); only the layers to shrink are keys."""
