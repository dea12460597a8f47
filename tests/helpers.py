"""Shared test helpers: randomised statistics, random and group masks, numeric checks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_prune import ChannelGraph, PruneExportCallback, apply_masks, export, verify_equivalence
from lightning_prune.core.graph.masks import Masks, zero_pruned_parameters
from lightning_prune.core.graph.prunable import channel_tensors, is_prunable, out_channels

RTOL = 1e-5
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
"""A timm ViT built small (``timm.create_model`` keywords): 4 heads of 8, 2 blocks, 16 patches of 32 x 32 images."""
TIMM_SWIN = {
    "img_size": 32,
    "patch_size": 4,
    "window_size": 4,
    "embed_dim": 16,
    "depths": (2, 1),
    "num_heads": (2, 4),
    "dynamic_img_size": True,
}
"""timm's Swin V1 and V2 built small: two stages of 2 and 4 heads, 4 x 4 windows, 32 x 32 images."""


def images(batch: int, seed: int, size: int = 64) -> torch.Tensor:
    """``batch`` random 3-channel ``size`` x ``size`` images, the same for the same seed."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``|got - expected| / |expected|``, in float64."""
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).norm() / expected.norm())


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, example: Any = None) -> nn.Module:
    """Trained-like norms and biases: with beta=0 and mean=0 a wrong export would still pass.

    With ``example``, each BatchNorm's running statistics are then set from the activations that
    reach it on that input, perturbed at random (mean by up to 0.2 std, variance by 0.8-1.25x), as
    training leaves them. Purely random statistics let the signal die in deep depthwise networks:
    an EfficientNet's or MobileNet's logits then differ by 1e-7 between two images, and an
    exactness check on them tests only the constants."""
    generator = torch.Generator().manual_seed(seed)

    def fill(tensor: torch.Tensor, low: float, high: float) -> None:
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(module, "weight", None) is not None:
                fill(module.weight, 0.5, 1.5)
            if getattr(module, "bias", None) is not None:
                fill(module.bias, -0.5, 0.5)
            if getattr(module, "running_mean", None) is not None:
                fill(module.running_mean, -0.5, 0.5)
                fill(module.running_var, 0.5, 2.0)
        elif is_prunable(module):  # biases of conv/linear; an attention's in_proj_bias, bias_k, bias_v
            for item in channel_tensors(module):
                tensor = getattr(module, item.name)
                if not item.is_weight:
                    fill(tensor, -0.2, 0.2)
                elif not tensor.any():  # a zero-initialised classifier (torchvision's ViT head): output ignores input
                    fill(tensor, -0.05, 0.05)
        for name, parameter in module.named_parameters(recurse=False):
            if name in ("q_bias", "v_bias"):  # timm's BEiT, EVA, Swin V2: the qkv bias is a cat of them (and zeros)
                fill(parameter, -0.2, 0.2)
    if example is not None:
        _calibrate_batch_norms(model, example, seed)
    return model.eval()


@torch.no_grad()
def _calibrate_batch_norms(model: nn.Module, example: Any, seed: int = 0) -> nn.Module:
    """One eval-mode pass in which each BatchNorm, just before it runs, takes its input's statistics,
    perturbed at random (see :func:`randomize`)."""
    generator = torch.Generator().manual_seed(seed + 1)

    def calibrate(module: nn.modules.batchnorm._BatchNorm, args: tuple) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, correction=0)
        shift = (torch.rand(mean.shape, generator=generator) - 0.5) * 0.4
        scale = torch.exp((torch.rand(var.shape, generator=generator) - 0.5) * 2 * math.log(1.25))
        module.running_mean.copy_(mean + shift * var.sqrt())
        module.running_var.copy_(var * scale + module.eps)

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    handles = [norm.register_forward_pre_hook(calibrate) for norm in norms]
    try:
        model.eval()(*example) if isinstance(example, tuple) else model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return model


def random_masks(model: nn.Module, fraction: float = 0.5, seed: int = 0, skip: tuple[str, ...] = ()) -> Masks:
    """Prune ``floor(fraction * C)`` random output channels of every conv and linear layer."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in model.named_modules():
        if is_prunable(module) and name not in skip:
            count = out_channels(module)
            keep = torch.ones(count, dtype=torch.bool)
            keep[torch.randperm(count, generator=generator)[: int(count * fraction)]] = False
            masks[name] = keep
    return masks


@torch.no_grad()
def zero_norm_affine(model: nn.Module, masks: Masks, example_input: Any) -> nn.Module:
    """The second variant: the masked model with the parameters pruned channels reach (norms, position embeddings) zeroed too."""
    masked = apply_masks(model, masks)
    zero_pruned_parameters(masked, ChannelGraph.from_model(masked, example_input).channel_parameter_keep(masks, masked))
    return masked


def export_and_check(reference: nn.Module, masks: Masks, example_input: Any):
    """Export ``reference`` (already masked) and assert it is exact; returns the export result."""
    result = export(reference, masks, example_input)
    report = verify_equivalence(reference, result.model, example_input, rtol=RTOL)
    assert report.passed, f"export differs from the masked model:\n{report}\nnotes: {[str(n) for n in result.notes]}"
    return result


class ScoreSpy(PruneExportCallback):
    """The callback, recording at each pruning step what ``pruner="activation"`` scores from, once the ranks'
    sums are added: ``seen``, a list of ``(step, positions summed per layer)``, and ``sums``, the last step's."""

    def _prune(self, trainer, pl_module, step=1):
        original = self.activations.per_root

        def per_root(graph, model, weighted=True):
            self.seen = [*getattr(self, "seen", []), (step, dict(self.activations.counts))]
            self.sums = {k: v.clone() for k, v in self.activations.sums.items()}
            return original(graph, model, weighted)

        self.activations.per_root = per_root
        try:
            super()._prune(trainer, pl_module, step)
        finally:
            del self.activations.per_root
