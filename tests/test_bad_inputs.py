"""Every row of docs/bad-inputs.md: the bad input, the exception type and the message it gets."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_prune
from lightning_prune import PruneExportCallback, collect_masks, export, export_from_file, load_pruned, save_pruned

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"
IMAGE = torch.randn(1, 3, 8, 8)


def model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def wide_model() -> nn.Sequential:
    """:func:`model` with 16 channels where it has 8."""
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))


def keep(count: int = 8) -> torch.Tensor:
    return torch.arange(count) < 4


def write(tmp: Path, name: str, content) -> str:
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    return str(path)


def checkpoint(tmp: Path) -> str:
    path = tmp / "pruned.ckpt"
    save_pruned(path, export(model(), {"0": keep()}, IMAGE))
    return str(path)


def from_file(tmp: Path, name: str, content, masks: dict | None = None):
    """Export a skeleton of :func:`model` on the meta device from ``content`` written as ``name`` (a path if a Path)."""
    with torch.device("meta"):
        skeleton = model()
    path = content if isinstance(content, Path) else write(tmp, name, content)
    return export_from_file(skeleton, path, masks, IMAGE)


def without(name: str) -> dict[str, torch.Tensor]:
    state = model().state_dict()
    del state[name]
    return state


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


CASES = {
    "callback-pruner-name": lambda t: PruneExportCallback(pruner="magic"),
    "callback-pruner-object": lambda t: PruneExportCallback(pruner=object()),
    "callback-sparsity": lambda t: PruneExportCallback(sparsity=1.5),
    "callback-sparsity-type": lambda t: PruneExportCallback(sparsity="0.5"),
    "callback-pruner-and-masks": lambda t: PruneExportCallback(pruner="fpgm", masks={"0": keep()}),
    "callback-config-list-ratio": lambda t: PruneExportCallback(
        config_list=[{"op_types": ["Conv2d"], "sparse_ratio": 1.5}]
    ),
    "callback-config-list-entry": lambda t: PruneExportCallback(config_list=["Conv2d"]),
    "callback-config-list-and-op-names": lambda t: PruneExportCallback(
        config_list=[{"sparse_ratio": 0.5}], op_names=["0"]
    ),
    "callback-op-types-string": lambda t: PruneExportCallback(op_types="Conv2d"),
    "callback-inplace-dict-contents": lambda t: PruneExportCallback(inplace_dict=write(t, "d.json", "{oops")),
    "callback-verify-batches": lambda t: PruneExportCallback(verify_batches=-1),
    "callback-measure-latency": lambda t: PruneExportCallback(measure_latency="no"),
    "callback-input-key": lambda t: PruneExportCallback(input_key=3),
    "callback-example-input": lambda t: PruneExportCallback(example_input="an image"),
    "callback-round-to": lambda t: PruneExportCallback(round_to=0),
    "callback-deploy-formats": lambda t: PruneExportCallback(deploy_formats=["tflite"]),
    "callback-group-consistent": lambda t: PruneExportCallback(group_consistent="yes"),
    "callback-on-failure": lambda t: PruneExportCallback(on_failure="ignore"),
    "callback-prune-on-epoch": lambda t: PruneExportCallback(prune_on_epoch=-1),
    "callback-rtol": lambda t: PruneExportCallback(rtol=0),
    "callback-inplace-dict-file": lambda t: PruneExportCallback(inplace_dict=str(t / "nope.yaml")),
    "callback-mask-file": lambda t: PruneExportCallback(pruner=None, masks=str(t / "nope.pt")),
    "callback-ranking": lambda t: PruneExportCallback(ranking="best"),
    "callback-min-channels": lambda t: PruneExportCallback(min_channels=0),
    "callback-finetune": lambda t: PruneExportCallback(finetune="small"),
    "callback-distill-value": lambda t: PruneExportCallback(distill={"weight": -1}),
    "callback-distill-keys": lambda t: PruneExportCallback(distill={"alpha": 0.5}),
    "callback-distill-teacher": lambda t: PruneExportCallback(distill={"teacher": "best"}),
    "callback-schedule-steps": lambda t: PruneExportCallback(schedule={"start_epoch": 1, "steps": 0}),
    "callback-schedule-epochs": lambda t: PruneExportCallback(schedule={"start_epoch": 1, "end_epoch": 2, "steps": 5}),
    "callback-schedule-no-end": lambda t: PruneExportCallback(schedule={"start_epoch": 1, "steps": 3}),
    "callback-schedule-ramp": lambda t: PruneExportCallback(schedule={"start_epoch": 1, "steps": 2, "ramp": "exp"}),
    "callback-schedule-pruner": lambda t: PruneExportCallback(
        pruner="nni-fpgm", schedule={"start_epoch": 1, "end_epoch": 2, "steps": 2}
    ),
    "callback-schedule-and-prune-on-epoch": lambda t: PruneExportCallback(
        prune_on_epoch=2, schedule={"start_epoch": 1, "end_epoch": 2, "steps": 2}
    ),
    "callback-calibration-batches": lambda t: PruneExportCallback(pruner="activation", calibration_batches=0),
    "callback-calibration-batches-pruner": lambda t: PruneExportCallback(pruner="l2", calibration_batches=8),
    "callback-taylor-at-start": lambda t: PruneExportCallback(pruner="taylor"),
    "mask-unknown-layer": lambda t: collect_masks({"9": keep()}, model()),
    "mask-shape": lambda t: collect_masks({"0": keep(7)}, model()),
    "mask-non-binary": lambda t: collect_masks({"0": torch.full((8,), 0.5)}, model()),
    "mask-not-prunable": lambda t: collect_masks({"1": keep()}, model()),
    "mask-partial-filter": lambda t: collect_masks(
        {"0": {"weight": torch.ones(8, 3, 3, 3).index_fill_(3, torch.tensor([0]), 0)}}, model()
    ),
    "mask-nni-no-weight": lambda t: collect_masks({"0": {"bias": torch.ones(8)}}, model()),
    "mask-source-type": lambda t: collect_masks([keep()], model()),
    "mask-file-missing": lambda t: collect_masks(t / "missing.pt", model()),
    "mask-file-pickle": lambda t: collect_masks(write(t, "evil.pt", {"0": Evil()}), model()),
    "mask-all-pruned": lambda t: export(model(), {"0": torch.zeros(8, dtype=torch.bool)}, IMAGE),
    "inplace-unknown-key": lambda t: export(model(), {}, IMAGE, inplace_dict={"9": ("0",)}),
    "inplace-unknown-producer": lambda t: export(model(), {}, IMAGE, inplace_dict={"3": ("ghost",)}),
    "inplace-disagrees": lambda t: export(model(), {}, IMAGE, inplace_dict={"3": (None,)}),
    "inplace-bad-entry": lambda t: export(model(), {}, IMAGE, inplace_dict={"3": (2.5,)}),
    "inplace-json-broken": lambda t: export(model(), {}, IMAGE, inplace_dict=write(t, "d.json", "{oops")),
    "inplace-yaml-python-tag": lambda t: export(
        model(), {}, IMAGE, inplace_dict=write(t, "d.yaml", "'3': !!python/object/apply:os.system ['true']")
    ),
    "inplace-not-a-mapping": lambda t: export(
        model(), {}, IMAGE, inplace_dict=write(t, "d.json", json.dumps([["3", "0"]]))
    ),
    "example-input-shape": lambda t: export(model(), {}, torch.randn(1, 5, 8, 8)),
    "example-input-type": lambda t: export(model(), {}, "an image"),
    "pretrained-no-config": lambda t: lightning_prune.from_pretrained(t),
    "pretrained-pickle": lambda t: lightning_prune.from_pretrained(
        Path(write(t, "config.json", '{"model_type": "gpt2"}')).parent, write(t, "pytorch_model.bin", {})
    ),
    "mask-embedding-rows": lambda t: collect_masks(
        {"embed": torch.ones(50, dtype=torch.bool)}, nn.ModuleDict({"embed": nn.Embedding(50, 16)})
    ),
    "checkpoint-missing": lambda t: load_pruned(t / "missing.ckpt", model()),
    "checkpoint-truncated": lambda t: load_pruned(
        write(t, "cut.ckpt", Path(checkpoint(t)).read_bytes()[:300]), model()
    ),
    "checkpoint-foreign": lambda t: load_pruned(write(t, "plain.ckpt", model().state_dict()), model()),
    "checkpoint-lightning-full-size": lambda t: load_pruned(
        write(t, "last.ckpt", {"state_dict": model().state_dict(), "callbacks": {}}), model()
    ),
    "checkpoint-architecture": lambda t: load_pruned(checkpoint(t), wide_model()),
    "checkpoint-pickle": lambda t: load_pruned(
        write(t, "evil.ckpt", {"format": "lightning-prune/1", "x": Evil()}), model()
    ),
    "checkpoint-directory": lambda t: (checkpoint(t), load_pruned(t, model())),
    "checkpoint-prefix": lambda t: load_pruned(checkpoint(t), model(), prefix="backbone"),
    "inplace-several-wrong": lambda t: export(model(), {}, IMAGE, inplace_dict={"1": ("3",), "3": (None,)}),
    "from-file-missing": lambda t: from_file(t, "", t / "missing.safetensors", {"0": keep()}),
    "from-file-no-masks": lambda t: from_file(t, "w.pt", model().state_dict()),
    "from-file-lacks-tensor": lambda t: from_file(t, "partial.pt", without("3.weight"), {"0": keep()}),
    "from-file-shape": lambda t: from_file(
        t,
        "wide.pt",
        wide_model().state_dict(),
        {"0": keep()},
    ),
    "from-file-not-state-dict": lambda t: from_file(t, "list.pt", [torch.zeros(2)], {"0": keep()}),
    "from-file-not-weights": lambda t: from_file(t, "notes.txt", "not weights", {"0": keep()}),
    "inplace-python-code": lambda t: export(
        model(), {}, IMAGE, inplace_dict=write(t, "d.py", "inplace_dict = __import__('os').system('true')")
    ),
}


def doc_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            rows[cells[0].strip("`")] = (cells[3].strip("`"), cells[4].strip("`"))
    return rows


def test_the_table_and_the_cases_are_the_same_list() -> None:
    assert len(doc_rows()) >= 20
    assert sorted(doc_rows()) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_the_documented_error(case, tmp_path) -> None:
    error_name, excerpt = doc_rows()[case]
    error = getattr(lightning_prune, error_name)
    with pytest.raises(error) as caught:
        CASES[case](tmp_path)
    message = str(caught.value).replace(str(tmp_path), "<dir>")
    assert excerpt in message, f"{case}: {excerpt!r} not in {message!r}"
    assert isinstance(caught.value, lightning_prune.PruneExportError)
