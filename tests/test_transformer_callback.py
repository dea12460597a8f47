"""Vision transformers through the callback: a user's own ``nn.TransformerEncoder`` network and a
timm ViT in a user LightningModule, pruned by our group-level importance, fine-tuned with whole
heads and the embedding width held at zero, exported, verified, and reloaded without Lightning."""

from __future__ import annotations

import pytest
import timm
import torch
from test_callback_everyday import VAL, run
from torch import nn
from user_modules import CLASSIFIERS

from lightning_prune import PruneExportCallback, load_pruned, verify_equivalence
from lightning_prune.core.verify.report import count_params


class TinyViT(nn.Module):
    """2x2 patches of a 3x8x8 image, a class token, a position embedding and torch's encoder."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, width, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.position = nn.Parameter(torch.randn(1, 17, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.position
        return self.head(self.norm(self.encoder(tokens))[:, 0])


def timm_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=2,
        embed_dim=32,
        depth=2,
        num_heads=4,
        num_classes=4,
    )


def heads(network: nn.Module) -> list[int]:
    return [m.num_heads for m in network.modules() if hasattr(m, "num_heads") and not isinstance(m, TinyViT)]


@pytest.mark.parametrize("build", [pytest.param(TinyViT, id="torch_encoder"), pytest.param(timm_vit, id="timm_vit")])
def test_heads_go_through_the_callback(tmp_path, build) -> None:
    torch.manual_seed(0)
    network = build()
    before = heads(network)
    module = CLASSIFIERS["lightning.pytorch"]("tuple", network=network, lr=0.01)
    callback = PruneExportCallback(
        pruner="l1", sparsity=0.5, op_types=["Conv2d", "Linear", "MultiheadAttention"], export_dir=str(tmp_path / "out")
    )
    run(tmp_path, callback, namespace="lightning.pytorch", module=module)

    exported = callback.exported_network
    report = callback.report
    assert report["verified_batches"] == 3 and report["max_relative_error"] <= 1e-5
    assert verify_equivalence(module.model, exported, VAL).passed  # held masks: the trained model is the masked one
    assert count_params(exported) < 0.5 * count_params(module.model)
    assert all(after < first for after, first in zip(heads(exported), before, strict=True))
    reloaded = load_pruned(report["path"], build())  # the bare network, without Lightning
    assert heads(reloaded) == heads(exported)
    assert verify_equivalence(exported, reloaded, VAL).max_relative_error == 0.0
