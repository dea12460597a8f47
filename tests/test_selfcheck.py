"""The export's self-check: at batch 1 where that is valid, and one retry for every module a failure implicates."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import RTOL, randomize, relative_error
from torch import nn

from lightning_prune import apply_masks, export, register_shrinker, shrink_parameters
from lightning_prune.core.errors import VerificationError
from lightning_prune.core.from_file import export_from_file
from lightning_prune.core.verify.selfcheck import first_sample
from lightning_prune.core.weights import parameters_on_meta

EVEN = torch.arange(8) % 2 == 0


def exported(build: Callable[[], nn.Module], masks: dict, example: torch.Tensor, source: str, tmp_path) -> Any:
    """``export`` of ``build()`` (norms and biases randomised), or ``export_from_file`` of its weights
    saved under ``tmp_path`` into a skeleton ``build`` makes on meta; and the masked model."""
    model = randomize(build()).eval()
    if source == "copy":
        return export(model, masks, example, progress=False), apply_masks(model, masks)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with parameters_on_meta():
        skeleton = build().eval()
    return export_from_file(skeleton, path, masks, example, progress=False), apply_masks(model, masks)


class Window(nn.Module):
    """Attention whose head width comes from its input's width, as torchvision's Swin computes it: with
    heads pruned from ``qkv`` its view raises; keeping the channels of that view is enough."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(8, 3 * 8), nn.Linear(8, 8), 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attention = (q @ k.transpose(-2, -1)).softmax(-1)
        return x + self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))


class Squash(nn.Module):
    """Flattens its conv's output into a literal size: keeping the view it guessed (its output's) is not
    enough, so the second retry keeps the conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mix = nn.Conv2d(8, 8, 1), nn.Linear(8 * 4, 8 * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.mix(y.reshape(y.shape[0], 8 * 4)).view_as(x)


class Stack(nn.Module):
    """Three blocks running the same code, then a pair of layers whose channels can go."""

    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(block(), block(), block())
        pair = (nn.Linear(8, 8), nn.Linear(8, 2)) if block is Window else (nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1))
        self.tail = nn.Sequential(pair[0], nn.ReLU(), pair[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.blocks(x))


CASES = {  # block: (its pruned layer, its mask, example shape, retries; a retry per module took 3 and 6)
    Window: ("qkv", torch.arange(24) % 8 < 4, (4, 5, 8), 1),  # q, k and v of the first head
    Squash: ("conv", EVEN, (4, 8, 2, 2), 2),
}


@pytest.mark.parametrize("source", ["copy", "file"])
@pytest.mark.parametrize("block", [Window, Squash], ids=["window", "squash"])
def test_every_block_of_one_class_that_fixes_its_width_is_retried_at_once(tmp_path, source, block) -> None:
    """Each block raises in turn once pruned: the first failure keeps what all three guessed (one retry,
    as for Swin's twelve attention blocks; where that is not enough, a second keeps all their channels),
    and the tail still loses its channels."""
    layer, mask, shape, retries = CASES[block]
    masks = {f"blocks.{i}.{layer}": mask for i in range(3)} | {"tail.0": EVEN}
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    result, masked = exported(lambda: Stack(block), masks, example, source, tmp_path)
    assert result.retries == retries
    assert [getattr(result.model.blocks[i], layer).weight.shape[0] for i in range(3)] == [mask.numel()] * 3
    assert result.model.tail[0].weight.shape[0] == 4
    kept = {n.layer: n.reason for n in result.notes if n.action == "kept"}
    assert all(re.search(rf"'blocks\.{i}' .*raised RuntimeError", kept[f"blocks.{i}.{layer}"]) for i in range(3))
    other = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(result.model(other), masked(other)) <= RTOL


class SwappedConv(nn.Conv2d):
    """A user's layer whose registered shrink function keeps the right filters in the wrong order."""

    def __init__(self) -> None:
        super().__init__(3, 8, 3, padding=1)


@register_shrinker(SwappedConv)
def _reversed(module: SwappedConv, change) -> SwappedConv:
    shrink_parameters(module, change)
    module.weight.data = module.weight.data.flip(0)
    return module


class Swapped(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(SwappedConv(), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


@pytest.mark.parametrize("source", ["copy", "file"])
def test_a_shrinker_that_computes_wrongly_fails_the_check_at_batch_one(tmp_path, source) -> None:
    example = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(VerificationError, match=r"does not reproduce the masked one \(relative error .*every channel"):
        exported(Swapped, {"0": EVEN}, example, source, tmp_path)


BATCHES: list[int] = []


class Counted(nn.Sequential):
    """Records the batch of every forward (the masked model's trace, the exported model's checks);
    ``centred`` subtracts the batch mean in eval mode too, so a sample's output depends on the batch."""

    def __init__(self, centred: bool = False) -> None:
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.centred = centred

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        BATCHES.append(x.shape[0])
        y = super().forward(x)
        return y - y.mean(0, keepdim=True) if self.centred else y


@pytest.mark.parametrize("centred", [False, True])
def test_the_check_runs_at_batch_one_and_on_the_whole_example_where_the_batch_matters(centred) -> None:
    """Batch 1 against row 0 of the traced output; a model whose samples see each other fails that
    comparison, and the whole example then decides: no retry, and the export is exact."""
    model = randomize(Counted(centred)).eval()
    example = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    BATCHES.clear()
    result = export(model, {"0": EVEN}, example, progress=False)
    assert BATCHES == ([4, 1, 4] if centred else [4, 1])
    assert result.retries == 0 and result.model[0].out_channels == 4
    other = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(result.model(other), apply_masks(model, {"0": EVEN})(other)) <= RTOL


class Cached(nn.Module):
    """Caches a table sized by the batch it last saw, as a module caching positions does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
        self.table: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is None or self.table.shape[0] != x.shape[0]:
            self.table = torch.linspace(0.5, 1.5, x.shape[0]).view(-1, 1, 1, 1)
        return self.net(x) * self.table


def test_what_the_check_leaves_on_the_model_can_be_trained_through() -> None:
    """The check runs under inference mode; a tensor it leaves on the model (the batch-1 table) must not
    be an inference tensor, or the first backward through the exported model fails."""
    model = randomize(Cached())
    small = export(model, {"net.0": EVEN}, torch.randn(4, 3, 6, 6), progress=False).model
    assert small.table.shape[0] == 1 and not small.table.is_inference()
    small.train()
    small(torch.randn(1, 3, 6, 6)).square().mean().backward()
    assert small.net[0].weight.grad is not None and small.net[0].out_channels == 4


def test_first_sample_cuts_what_has_the_batch_and_refuses_what_cannot_be_cut() -> None:
    ids, positions = torch.zeros(3, 5, dtype=torch.long), torch.arange(5)[None]
    inputs, output = first_sample({"input_ids": ids, "position_ids": positions, "flag": True}, (torch.ones(3, 5, 7),))
    assert inputs["input_ids"].shape == (1, 5) and inputs["position_ids"] is positions and inputs["flag"] is True
    assert output[0].shape == (1, 5, 7)
    assert first_sample(ids, torch.tensor(0.5)) is None  # a loss: no sample to compare
    assert first_sample(ids, torch.ones(5, 3)) is None  # the output's dim 0 is not the batch
    assert first_sample(ids[:1], torch.ones(1, 5)) is None  # already one sample
