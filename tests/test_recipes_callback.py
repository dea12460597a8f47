"""The recovery recipes as users combine them (issue 17): what pruned-size fine-tuning writes loads,
ddp_spawn with a schedule and distillation, causal LMs with tied embeddings, fast_dev_run, and a
schedule cut short by EarlyStopping."""

from __future__ import annotations

import hashlib
import os

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from user_modules import CausalLM, Images, PLClassifier, Sentences, quiet_trainer, small_cnn

from lightning_prune import CheckpointError, PruneExportCallback, load_pruned, load_pruned_module, verify_equivalence
from lightning_prune.core.verify.report import count_macs, count_params, format_report
from lightning_prune.lightning.distill import distill_loss

RTOL = 1e-5


def images() -> tuple[DataLoader, DataLoader]:
    return DataLoader(Images("tuple", 48, seed=0), batch_size=16), DataLoader(
        Images("tuple", 16, seed=1), batch_size=16
    )


def sentences() -> tuple[DataLoader, DataLoader]:
    return DataLoader(Sentences(16, seed=0), batch_size=8), DataLoader(Sentences(8, seed=1), batch_size=8)


def trainer(namespace, tmp_path, callbacks, max_epochs: int = 2, checkpoints: bool = False, logger=False, **kwargs):
    return quiet_trainer(
        namespace,
        tmp_path,
        callbacks,
        max_epochs=max_epochs,
        logger=logger,
        enable_checkpointing=checkpoints,
        num_sanity_val_steps=0,
        **kwargs,
    )


def last_checkpoint(namespace, tmp_path):
    return namespace.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last=True)


def same_outputs(a: torch.nn.Module, b: torch.nn.Module, inputs) -> bool:
    return verify_equivalence(a.eval(), b.eval(), inputs, rtol=RTOL).passed


# ----------------------------------------------------------- finetune="pruned"
def test_pruned_size_checkpoints_load_into_the_bare_network_and_the_module(tmp_path) -> None:
    """pruned.ckpt describes the shrink from the original network, with the fine-tuned weights;
    Lightning's last.ckpt taken after the shrink loads through load_pruned_module."""
    pl.seed_everything(0, verbose=False)
    module = PLClassifier()
    callback = PruneExportCallback(
        pruner="l1", prune_on_epoch=2, finetune="pruned", round_to=1, export_dir=str(tmp_path / "out")
    )
    run = trainer(pl, tmp_path, [callback, last_checkpoint(pl, tmp_path)], max_epochs=3, checkpoints=True)
    run.fit(module, *images())
    x = torch.randn(4, 3, 8, 8)
    path = callback.report["path"]
    assert module.model[0].out_channels == 4  # fine-tuned at the pruned size
    bare = load_pruned(path, small_cnn())
    assert bare[0].out_channels == 4 and same_outputs(module.model, bare, x)
    assert same_outputs(module, load_pruned(path, PLClassifier()), x)
    assert same_outputs(module, load_pruned_module(path, PLClassifier), x)
    assert same_outputs(module.model, callback.exported_network, x)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert same_outputs(module, load_pruned_module(last, PLClassifier), x)
    assert same_outputs(module.model, load_pruned(last, small_cnn()), x)
    assert same_outputs(module, load_pruned_module(tmp_path / "out" / "masked.ckpt", PLClassifier), x)
    before_shrink = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"  # dense: load_from_checkpoint is the call
    with pytest.raises(
        CheckpointError, match=r"Lightning checkpoint of the model at its full size .*load_from_checkpoint\(path\)"
    ):
        load_pruned_module(before_shrink, PLClassifier)


def test_the_report_after_a_pruned_size_fine_tune_compares_with_the_full_size_model(tmp_path) -> None:
    """The final export runs on the already-small module: its dense column must still be the original
    network's (counted at the shrink, carried through a resume), and no latency is claimed for a dense
    model that no longer exists."""
    pl.seed_everything(0, verbose=False)
    full = PLClassifier()
    full_params, full_macs = count_params(full), count_macs(full, torch.randn(1, 3, 8, 8))
    callback = PruneExportCallback(
        pruner="l1", prune_on_epoch=1, finetune="pruned", round_to=1, export_dir=str(tmp_path / "out")
    )
    trainer(pl, tmp_path, [callback, last_checkpoint(pl, tmp_path)], checkpoints=True).fit(PLClassifier(), *images())
    first = callback.report
    assert (first["params_dense"], first["macs_dense"]) == (full_params, full_macs)
    assert first["params_exported"] < full_params and first["macs_exported"] < full_macs
    assert not [key for key in first if key.startswith("latency_") and "_dense" in key]
    assert [key for key in first if key.startswith("latency_") and key.endswith("_exported_ms")]

    resumed = PruneExportCallback(
        pruner="l1", prune_on_epoch=1, finetune="pruned", round_to=1, export_dir=str(tmp_path / "again")
    )
    trainer(pl, tmp_path, [resumed], max_epochs=3).fit(
        PLClassifier(), *images(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert (resumed.report["params_dense"], resumed.report["macs_dense"]) == (full_params, full_macs)
    assert resumed.report["params_exported"] == first["params_exported"]


def test_pruned_size_checkpoint_of_a_language_model_loads(tmp_path) -> None:
    pytest.importorskip("transformers")
    L.seed_everything(0, verbose=False)
    module = CausalLM(tie=False)
    callback = PruneExportCallback(
        pruner="l1", op_types=["Linear"], prune_on_epoch=1, finetune="pruned", export_dir=str(tmp_path / "out")
    )
    trainer(L, tmp_path, [callback, last_checkpoint(L, tmp_path)], checkpoints=True, limit_train_batches=2).fit(
        module, *sentences()
    )
    ids = {"input_ids": torch.randint(0, 64, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    path = callback.report["path"]
    assert any("head(s) removed" in note for note in callback.report["notes"])  # the shrink's notes are kept
    rebuilt = load_pruned_module(path, CausalLM)
    assert rebuilt.model.config.num_attention_heads < 4 and same_outputs(module.model, rebuilt.model, ids)
    assert same_outputs(module.model, load_pruned(path, CausalLM(tie=False).model), ids)
    assert same_outputs(module.model, load_pruned_module(tmp_path / "ckpt" / "last.ckpt", CausalLM).model, ids)


# ------------------------------------------------------------------ ddp_spawn
def test_ddp_spawn_with_schedule_and_distillation(tmp_path) -> None:
    callback = PruneExportCallback(
        pruner="l1",
        round_to=1,
        schedule={"start_epoch": 1, "end_epoch": 2, "steps": 2},
        distill=True,
        export_dir=str(tmp_path / "out"),
        verify_batches=1,
    )
    run = trainer(
        pl,
        tmp_path,
        [callback],
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        strategy="ddp_spawn",
        devices=2,
        accelerator="cpu",
    )
    run.fit(PLClassifier(), *images())
    report = callback.report  # in the launching process
    assert report["path"] == str(tmp_path / "out" / "pruned.ckpt") and report["schedule_complete"]
    exported = callback.exported_model
    assert not {"on_load_checkpoint", "training_step"} & set(vars(exported))  # none of our hooks
    assert not any(m._forward_hooks for m in exported.modules())
    masked = PLClassifier()
    masked.load_state_dict(torch.load(tmp_path / "out" / "masked.ckpt", weights_only=False)["state_dict"])
    assert callback.exported_network[0].out_channels == 4
    assert same_outputs(masked.model, callback.exported_network, torch.randn(4, 3, 8, 8))


# ------------------------------------------------------ tied language models
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_with_tied_embeddings_is_the_network(tmp_path, arch: str) -> None:
    transformers = pytest.importorskip("transformers")
    L.seed_everything(0, verbose=False)
    module = CausalLM(arch=arch, tie=True)
    layers = ["Linear"] if arch == "llama" else ["Conv1D"]
    callback = PruneExportCallback(
        pruner="l1", op_types=layers, prune_on_epoch=1, distill=True, export_dir=str(tmp_path / "out")
    )
    run = trainer(L, tmp_path, [callback], limit_train_batches=2)
    run.fit(module, *sentences())
    assert run.current_epoch == 2 and callback._distiller.last_loss > 0  # distilled through epoch 1
    network = callback.exported_network
    assert isinstance(network, transformers.PreTrainedModel) and network.get_output_embeddings() is not None
    assert network.get_output_embeddings().weight is network.get_input_embeddings().weight  # still tied
    ids = torch.randint(0, 64, (2, 5))
    assert same_outputs(module.model, network, {"input_ids": ids})
    assert torch.equal(
        network.generate(ids, max_new_tokens=4, do_sample=False),
        module.model.generate(ids, max_new_tokens=4, do_sample=False),
    )


def test_distillation_matches_a_language_model_over_its_vocabulary() -> None:
    student, teacher = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    expected = F.kl_div(
        F.log_softmax(student.reshape(-1, 64) / 2, -1),
        F.softmax(teacher.reshape(-1, 64) / 2, -1),
        reduction="batchmean",
    )
    assert torch.allclose(distill_loss(student, teacher, 2.0, dim=-1), expected * 4)


# --------------------------------------------------------------- fast_dev_run
def test_fast_dev_run_leaves_a_real_runs_files(tmp_path) -> None:
    out = str(tmp_path / "out")
    pl.seed_everything(0, verbose=False)
    trainer(pl, tmp_path, [PruneExportCallback(pruner="l1", export_dir=out)], max_epochs=1).fit(
        PLClassifier(), *images()
    )
    written = {name: hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest() for name in os.listdir(out)}
    assert sorted(written) == ["masked.ckpt", "pruned.ckpt"]
    dry = PruneExportCallback(pruner="l1", export_dir=out)
    module = PLClassifier()
    quiet_trainer(pl, tmp_path, [dry], fast_dev_run=True, logger=True, enable_checkpointing=True).fit(module, *images())
    now = {name: hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest() for name in os.listdir(out)}
    assert now == written
    assert dry.report["path"] is None and dry.report["max_relative_error"] <= RTOL  # verified in memory
    assert same_outputs(module.model, dry.exported_network, torch.randn(4, 3, 8, 8))


# -------------------------------------------------------------- EarlyStopping
class EpochMasks(pl.Callback):
    """The pruning masks in effect at the start of each training epoch (``None`` before the first step)."""

    def __init__(self) -> None:
        self.at_start: list[dict[str, torch.Tensor] | None] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        masks = next(c for c in trainer.callbacks if isinstance(c, PruneExportCallback)).masks
        self.at_start.append(None if masks is None else {k: v.clone() for k, v in masks.items()})


def test_early_stopping_mid_schedule_says_so_in_the_report(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    callback = PruneExportCallback(
        pruner="l1", round_to=1, schedule={"start_epoch": 1, "end_epoch": 4, "steps": 4}, export_dir=str(tmp_path)
    )
    stop = pl.callbacks.EarlyStopping(monitor="val_loss", stopping_threshold=1e9)  # stops once min_epochs allow
    logger = pl.loggers.CSVLogger(tmp_path, name="logs")
    epochs = EpochMasks()
    with pytest.warns(UserWarning, match="after 1 of the schedule's 4 pruning steps"):
        run = trainer(pl, tmp_path, [callback, stop, epochs], max_epochs=6, min_epochs=2, logger=logger)
        run.fit(PLClassifier(), *images())
    report = callback.report
    assert (report["schedule_complete"], report["pruning_steps_done"], report["pruning_steps_planned"]) == (False, 1, 4)
    # the run stopped after epoch 1, so step 2 (due at epoch 2) is not taken: what is exported was fine-tuned
    first, second = epochs.at_start
    assert first is None and second.keys() == callback.masks.keys()
    assert all(torch.equal(second[k], callback.masks[k]) for k in second)
    assert "| pruning steps | | 1 of 4: schedule NOT complete" in format_report(report)
    assert torch.load(report["path"], weights_only=True)["report"]["schedule_complete"] is False
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    column = logged[0].split(",").index("prune/pruning_steps_done")
    assert [row.split(",")[column] for row in logged[1:] if row.split(",")[column]] == ["1.0"]
