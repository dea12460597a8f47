"""Small in-repo models for the seed's patterns and for every op family the tracer understands."""

from __future__ import annotations

import numpy as np
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
        self.depthwise = nn.Sequential(
            nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False), nn.BatchNorm2d(48), nn.ReLU6()
        )
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
    "feature_extraction.res_block3.0.convbnrelu1.cbr_unit.1": (
        "feature_extraction.res_block3.0.convbnrelu1.cbr_unit.0",
    ),
    "feature_extraction.res_block3.0.convbn2.cbr_unit.0": ("feature_extraction.res_block3.0.convbnrelu1.cbr_unit.0",),
    "feature_extraction.res_block3.0.convbn2.cbr_unit.1": ("feature_extraction.res_block3.0.convbn2.cbr_unit.0",),
    "feature_extraction.res_block3.0.downsample.0": ("feature_extraction.convbnrelu1_2.cbr_unit.0",),
    "feature_extraction.res_block3.0.downsample.1": ("feature_extraction.res_block3.0.downsample.0",),
    "feature_extraction.res_block5.0.convbnrelu1.cbr_unit.0": ("feature_extraction.res_block3.0.downsample.0",),
    "feature_extraction.res_block5.0.convbnrelu1.cbr_unit.1": (
        "feature_extraction.res_block5.0.convbnrelu1.cbr_unit.0",
    ),
    "feature_extraction.res_block5.0.convbn2.cbr_unit.0": ("feature_extraction.res_block5.0.convbnrelu1.cbr_unit.0",),
    "feature_extraction.res_block5.0.convbn2.cbr_unit.1": ("feature_extraction.res_block5.0.convbn2.cbr_unit.0",),
    "feature_extraction.res_block5.0.downsample.0": ("feature_extraction.res_block3.0.downsample.0",),
    "feature_extraction.res_block5.0.downsample.1": ("feature_extraction.res_block5.0.downsample.0",),
    "feature_extraction.pyramid_pooling.path_module_list.0.cbr_unit.0": (
        "feature_extraction.res_block5.0.downsample.0",
    ),
    "feature_extraction.pyramid_pooling.path_module_list.0.cbr_unit.1": (
        "feature_extraction.pyramid_pooling.path_module_list.0.cbr_unit.0",
    ),
    "feature_extraction.pyramid_pooling.path_module_list.1.cbr_unit.0": (
        "feature_extraction.res_block5.0.downsample.0",
    ),
    "feature_extraction.pyramid_pooling.path_module_list.1.cbr_unit.1": (
        "feature_extraction.pyramid_pooling.path_module_list.1.cbr_unit.0",
    ),
    "feature_extraction.upconv5.1.cbr_unit.0": ("feature_extraction.pyramid_pooling.path_module_list.1.cbr_unit.0",),
    "feature_extraction.upconv5.1.cbr_unit.1": ("feature_extraction.upconv5.1.cbr_unit.0",),
    "feature_extraction.iconv4.cbr_unit.0": (
        "feature_extraction.upconv5.1.cbr_unit.0",
        "feature_extraction.res_block3.0.downsample.0",
    ),
    "feature_extraction.iconv4.cbr_unit.1": ("feature_extraction.iconv4.cbr_unit.0",),
    "feature_extraction.proj5.cbr_unit.0": ("feature_extraction.pyramid_pooling.path_module_list.1.cbr_unit.0",),
    "feature_extraction.proj5.cbr_unit.1": ("feature_extraction.proj5.cbr_unit.0",),
    "feature_extraction.proj4.cbr_unit.0": ("feature_extraction.iconv4.cbr_unit.0",),
    "feature_extraction.proj4.cbr_unit.1": ("feature_extraction.proj4.cbr_unit.0",),
}
"""Hand-written in the seed's style (the residual sum named by its downsample producer, the
pyramid sum by its last path); only the layers to shrink are keys."""


# --------------------------------------------------------------------------------------------
# The seed page's own network, HSMNet (high-res-stereo), in miniature: the same module names, so
# the page's hand-written inplace_dict applies as written, and the same forward: a 2D residual
# feature extractor with pyramid pooling and concat-upsampling (`iconv`), four projections, cost
# volumes built the CPU way (`new_empty(...).fill_(0.)`, then one slice assignment per
# disparity), 3D conv decoders, and a 2D conv over the reshaped 5D volume (`projfeat3d`).
# Widths are the original's divided by 4, decoders have 2 blocks instead of 5-6.


class HSMConvBnRelu(nn.Module):
    """``conv2DBatchNormRelu``: ``cbr_unit`` = conv, BN, LeakyReLU(0.1)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None) -> None:
        super().__init__()
        padding = k // 2 if padding is None else padding
        self.cbr_unit = nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True)
        )

    def forward(self, x):
        return self.cbr_unit(x)


class HSMConvBn(nn.Module):
    """``conv2DBatchNorm``: ``cb_unit`` = conv, BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cb_unit = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.cb_unit(x)


class HSMResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.convbnrelu1 = HSMConvBnRelu(cin, cout, 3, stride)
        self.convbn2 = HSMConvBn(cout, cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.convbn2(self.convbnrelu1(x))
        residual = self.downsample(x)
        out += residual
        return out


class HSMPyramidPooling(nn.Module):
    """ICNet-style sum of pooled, convolved and upsampled paths."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.path_module_list = nn.ModuleList(HSMConvBnRelu(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        h, w = x.shape[2:]
        sizes = [(int(h / p), int(w / p)) for p in np.linspace(1, min(h, w) // 2, 4, dtype=int)][::-1]
        pp_sum = x
        for module, size in zip(self.path_module_list, sizes, strict=True):
            out = module(F.avg_pool2d(x, size, stride=size, padding=0))
            pp_sum = pp_sum + 0.25 * F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return F.relu(pp_sum / 2.0, inplace=True)


class HSMFeatures(nn.Module):
    """HSMNet's ``unet`` feature extractor."""

    def __init__(self) -> None:
        super().__init__()
        self.convbnrelu1_1 = HSMConvBnRelu(3, 4, 3, 2)
        self.convbnrelu1_2 = HSMConvBnRelu(4, 4)
        self.convbnrelu1_3 = HSMConvBnRelu(4, 8)
        self.res_block3 = nn.Sequential(HSMResidualBlock(8, 16, 2))
        self.res_block5 = nn.Sequential(HSMResidualBlock(16, 32, 2))
        self.res_block6 = nn.Sequential(HSMResidualBlock(32, 32, 2))
        self.res_block7 = nn.Sequential(HSMResidualBlock(32, 32, 2))
        self.pyramid_pooling = HSMPyramidPooling(32)
        self.upconv6 = nn.Sequential(nn.Upsample(scale_factor=2), HSMConvBnRelu(32, 16))
        self.iconv5 = HSMConvBnRelu(48, 32)
        self.upconv5 = nn.Sequential(nn.Upsample(scale_factor=2), HSMConvBnRelu(32, 16))
        self.iconv4 = HSMConvBnRelu(48, 32)
        self.upconv4 = nn.Sequential(nn.Upsample(scale_factor=2), HSMConvBnRelu(32, 16))
        self.iconv3 = HSMConvBnRelu(32, 16)
        self.proj6 = HSMConvBnRelu(32, 8, 1)
        self.proj5 = HSMConvBnRelu(32, 4, 1)
        self.proj4 = HSMConvBnRelu(32, 4, 1)
        self.proj3 = HSMConvBnRelu(16, 4, 1)

    def forward(self, x):
        conv1 = self.convbnrelu1_3(self.convbnrelu1_2(self.convbnrelu1_1(x)))
        pool1 = F.max_pool2d(conv1, 3, 2, 1)
        conv3 = self.res_block3(pool1)
        conv4 = self.res_block5(conv3)
        conv5 = self.res_block6(conv4)
        conv6 = self.pyramid_pooling(self.res_block7(conv5))
        conv5 = self.iconv5(torch.cat((conv5, self.upconv6(conv6)), dim=1))
        conv4 = self.iconv4(torch.cat((conv4, self.upconv5(conv5)), dim=1))
        conv3 = self.iconv3(torch.cat((conv3, self.upconv4(conv4)), dim=1))
        return self.proj6(conv6), self.proj5(conv5), self.proj4(conv4), self.proj3(conv3)


def sep_conv3d(cin: int, cout: int, k: int, stride, pad: int, bias: bool = False) -> nn.Sequential:
    if bias:
        return nn.Sequential(nn.Conv3d(cin, cout, k, stride, pad, bias=True))
    return nn.Sequential(nn.Conv3d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm3d(cout))


class ProjFeat3d(nn.Module):
    """A 2D conv over a 5D volume viewed as 4D: channels stay channels, depth becomes height."""

    def __init__(self, cin: int, cout: int, stride) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, cout, 1, stride=stride[:2], bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        b, c, d, h, w = x.size()
        x = self.bn(self.conv1(x.view(b, c, d, h * w)))
        return x.view(b, -1, d // self.stride[0], h, w)


class SepConv3dBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride=(1, 1, 1)) -> None:
        super().__init__()
        self.downsample = None if cin == cout and stride == (1, 1, 1) else ProjFeat3d(cin, cout, stride)
        self.conv1 = sep_conv3d(cin, cout, 3, stride, 1)
        self.conv2 = sep_conv3d(cout, cout, 3, (1, 1, 1), 1)

    def forward(self, x):
        out = F.relu(self.conv1(x), inplace=True)
        if self.downsample:
            x = self.downsample(x)
        return F.relu(x + self.conv2(out), inplace=True)


class DecoderBlock(nn.Module):
    def __init__(
        self, nconvs: int, cin: int, channels: int, stride=(1, 1, 1), up: bool = False, pool: bool = False
    ) -> None:
        super().__init__()
        strides = [stride] + [(1, 1, 1)] * (nconvs - 1)
        self.convs = nn.Sequential(
            *[SepConv3dBlock(cin if i == 0 else channels, channels, strides[i]) for i in range(nconvs)]
        )
        self.classify = nn.Sequential(
            sep_conv3d(channels, channels, 3, (1, 1, 1), 1),
            nn.ReLU(inplace=True),
            sep_conv3d(channels, 1, 3, (1, 1, 1), 1, bias=True),
        )
        self.up = None
        if up:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=(2, 2, 2), mode="trilinear", align_corners=False),
                sep_conv3d(channels, channels // 2, 3, (1, 1, 1), 1),
                nn.ReLU(inplace=True),
            )
        self.pool = pool
        if pool:
            self.pool_convs = nn.ModuleList(sep_conv3d(channels, channels, 1, (1, 1, 1), 0) for _ in range(4))

    def forward(self, fvl):
        fvl = self.convs(fvl)
        if self.pool:
            fvl_out = fvl
            _, _, d, h, w = fvl.shape
            for i, pool_size in enumerate(np.linspace(1, min(d, h, w) // 2, 4, dtype=int)):
                kernel = (int(d / pool_size), int(h / pool_size), int(w / pool_size))
                out = self.pool_convs[i](F.avg_pool3d(fvl, kernel, stride=kernel))
                fvl_out = fvl_out + 0.25 * F.interpolate(out, size=(d, h, w), mode="trilinear", align_corners=False)
            fvl = F.relu(fvl_out / 2.0, inplace=True)
        if self.up is not None:
            fvl = self.up(fvl)
            costl = fvl
        else:
            costl = self.classify(fvl)
        return fvl, costl.squeeze(1)


class DisparityRegression(nn.Module):
    def __init__(self, maxdisp: int, divisor: int) -> None:
        super().__init__()
        self.register_buffer("disp", torch.arange(maxdisp // divisor, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.divisor = divisor

    def forward(self, x):
        disp = self.disp.repeat(x.size(0), 1, x.size(2), x.size(3))
        return torch.sum(x * disp, 1) * self.divisor


class HSMNetLike(nn.Module):
    """HSMNet at level 1 (all four decoders), evaluated with ``clean=-1``; input: (left, right)."""

    def __init__(self, maxdisp: int = 128) -> None:
        super().__init__()
        self.maxdisp = maxdisp
        self.feature_extraction = HSMFeatures()
        self.decoder6 = DecoderBlock(2, 8, 8, up=True, pool=True)
        self.decoder5 = DecoderBlock(2, 8, 8, up=True, pool=True)
        self.decoder4 = DecoderBlock(2, 8, 8, up=True)
        self.decoder3 = DecoderBlock(2, 8, 8, stride=(2, 1, 1))
        self.disp_reg8 = DisparityRegression(maxdisp, 16)

    @staticmethod
    def feature_vol(refimg_fea, targetimg_fea, maxdisp: int):
        """The difference cost volume, built the CPU way: a fresh tensor, one slice write per disparity."""
        b, c, h, width = refimg_fea.shape
        cost = refimg_fea.new_empty(b, c, maxdisp, h, width).fill_(0.0)
        for i in range(maxdisp):
            feata = refimg_fea[:, :, :, i:width]
            featb = targetimg_fea[:, :, :, : width - i]
            cost[:, :c, i, :, i:] = torch.abs(feata - featb)
        return cost.contiguous()

    def forward(self, left, right):
        nsample = left.shape[0]
        conv4, conv3, conv2, conv1 = self.feature_extraction(torch.cat([left, right], 0))
        feat6 = self.feature_vol(conv4[:nsample], conv4[nsample:], self.maxdisp // 64)
        feat5 = self.feature_vol(conv3[:nsample], conv3[nsample:], self.maxdisp // 32)
        feat4 = self.feature_vol(conv2[:nsample], conv2[nsample:], self.maxdisp // 16)
        feat3 = self.feature_vol(conv1[:nsample], conv1[nsample:], self.maxdisp // 8)
        feat6_2x, _ = self.decoder6(feat6)
        feat5_2x, _ = self.decoder5(torch.cat((feat6_2x, feat5), dim=1))
        feat4_2x, _ = self.decoder4(torch.cat((feat5_2x, feat4), dim=1))
        _, cost3 = self.decoder3(torch.cat((feat4_2x, feat3), dim=1))
        cost3 = F.interpolate(cost3, [left.size(2), left.size(3)], mode="bilinear", align_corners=False)
        pred3 = self.disp_reg8(F.softmax(cost3, 1))
        return pred3, torch.squeeze(pred3)
