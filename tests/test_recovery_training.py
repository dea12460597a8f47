"""Recovery while training, in real Trainer runs: the gradual schedule (masks only grow, held
channels stay zero, a resumed run equals an uninterrupted one), distillation from the dense model
(the loss really is added), and fine-tuning at the pruned size (the parameters really shrink)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from user_modules import Images, PLClassifier, quiet_trainer

from lightning_prune import ConfigurationError, PruneExportCallback, load_pruned, load_pruned_module, verify_equivalence
from lightning_prune.lightning.demo import DigitsCNN
from lightning_prune.lightning.schedule import Schedule


def data() -> tuple[DataLoader, DataLoader]:
    """Unshuffled: an interrupted run sees the same batches as an uninterrupted one."""
    return DataLoader(Images("tuple", 48, seed=0), batch_size=16), DataLoader(
        Images("tuple", 16, seed=1), batch_size=16
    )


class Recorder(pl.Callback):
    """What the training looks like at the start of every epoch and at every loss."""

    def __init__(self, pruning: PruneExportCallback) -> None:
        self.pruning = pruning
        self.masks, self.params, self.zero, self.losses, self.optimized = [], [], [], [], []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        masks = self.pruning.masks
        self.masks.append({k: v.clone() for k, v in masks.items()} if masks else {})
        self.params.append(sum(p.numel() for p in pl_module.parameters()))
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.optimized.append(all(id(p) in optimized for p in pl_module.parameters()))
        if masks and not self.pruning.shrunk:
            norm_of = {"model.0": "model.1", "model.3": "model.4"}  # the BatchNorm each conv feeds
            self.zero.append(
                all(not pl_module.get_submodule(k).weight[~v].any() for k, v in masks.items())
                and all(not pl_module.get_submodule(norm_of[k]).weight[~v].any() for k, v in masks.items())
            )

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.losses.append(float(loss.detach()))


class StopAfter(pl.Callback):
    """An interruption after ``epochs`` epochs (a run that has ``max_epochs`` for the whole schedule)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = trainer.should_stop or trainer.current_epoch + 1 >= self.epochs


def fit(tmp_path, callback, max_epochs=4, ckpt_path=None, checkpoints=False, module=None, stop_after=None):
    pl.seed_everything(0, verbose=False)
    module = module if module is not None else PLClassifier(lr=0.05)
    recorder = Recorder(callback)
    extra = (
        [pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last=True)] if checkpoints else []
    )
    trainer = quiet_trainer(
        pl,
        tmp_path,
        [callback, recorder, *extra, *([StopAfter(stop_after)] if stop_after else [])],
        max_epochs=max_epochs,
        enable_checkpointing=checkpoints,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, *data(), ckpt_path=ckpt_path)
    return module, recorder


def pruning(tmp_path, **kwargs) -> PruneExportCallback:
    # the toy network's layers are 8 and 16 wide: no rounding, so the tests count what the schedule chose
    return PruneExportCallback(export_dir=str(tmp_path / "out"), verify_batches=1, round_to=1, **kwargs)


def test_the_schedule_ramps() -> None:
    cubic = Schedule.from_argument({"start_epoch": 1, "end_epoch": 4, "steps": 4})
    linear = Schedule.from_argument({"start_epoch": 2, "end_epoch": 8, "steps": 4, "ramp": "linear"})
    assert [cubic.epoch_of(k) for k in range(1, 5)] == [1, 2, 3, 4]
    assert [linear.epoch_of(k) for k in range(1, 5)] == [2, 4, 6, 8]
    assert [linear.fraction(k) for k in range(1, 5)] == [0.25, 0.5, 0.75, 1.0]
    assert cubic.fraction(1) > linear.fraction(1) and cubic.fraction(4) == 1.0
    assert cubic.due(epoch=2, done=0) == [1, 2] and cubic.due(epoch=2, done=2) == []


@pytest.mark.parametrize("ramp", ["cubic", "linear"])
def test_gradual_masks_only_grow_and_stay_zero(tmp_path, ramp) -> None:
    schedule = {"start_epoch": 1, "end_epoch": 3, "steps": 3, "ramp": ramp}
    callback = pruning(tmp_path, pruner="fpgm", sparsity=0.75, schedule=schedule)
    module, recorder = fit(tmp_path, callback, max_epochs=5)
    pruned = [sum(int((~k).sum()) for k in masks.values()) for masks in recorder.masks]
    assert pruned[0] == 0 and pruned[1] < pruned[2] < pruned[3] == pruned[4] == 18  # 75% of 8 + 16
    for before, after in zip(recorder.masks[1:], recorder.masks[2:], strict=False):
        assert all(not bool((after[k] & ~keep).any()) for k, keep in before.items())  # only grow
    assert all(recorder.zero)  # filters and the BN scales they feed held at zero between steps
    assert callback.steps_done == 3
    assert verify_equivalence(module.model, callback.exported_network, torch.randn(4, 3, 8, 8)).passed
    assert (callback.exported_network[0].out_channels, callback.exported_network[3].out_channels) == (2, 4)


class TaylorSpy(PruneExportCallback):
    """Records the Taylor sums each pruning step ranks by."""

    def _prune(self, trainer, pl_module, step=1):
        self.seen = [*getattr(self, "seen", []), (step, self.taylor.steps, self.taylor.totals.copy())]
        super()._prune(trainer, pl_module, step)


def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path) -> None:
    """Taylor scores half accumulated, the schedule half done and the teacher: all in the checkpoint."""

    def make():
        return TaylorSpy(
            export_dir=str(tmp_path / "out"),
            verify_batches=1,
            pruner="taylor",
            schedule={"start_epoch": 1, "end_epoch": 3, "steps": 2},
            distill=True,
        )

    whole_callback = make()
    whole, _ = fit(tmp_path / "a", whole_callback, max_epochs=5)
    first = make()
    fit(tmp_path / "b", first, max_epochs=5, checkpoints=True, stop_after=2)  # stops between the two steps
    assert first.steps_done == 1 and first.taylor.steps == 3  # epoch 1's gradients, for step 2
    resumed_callback = make()
    resumed, _ = fit(tmp_path / "b", resumed_callback, max_epochs=5, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt")
    assert resumed_callback.steps_done == 2
    (step, count, totals), (whole_step, whole_count, whole_totals) = resumed_callback.seen[0], whole_callback.seen[1]
    assert (step, count) == (whole_step, whole_count) == (2, 6)  # epochs 1 and 2, across the interruption
    assert torch.allclose(torch.from_numpy(totals), torch.from_numpy(whole_totals), rtol=1e-5)
    for name, value in whole.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[name].float(), atol=1e-6), name


def test_distillation_adds_its_loss_after_the_first_step(tmp_path) -> None:
    plain_module, plain = fit(tmp_path / "a", pruning(tmp_path, prune_on_epoch=1))
    callback = pruning(tmp_path, prune_on_epoch=1, distill={"weight": 2.0, "temperature": 2.0})
    module, distilled = fit(tmp_path / "b", callback)
    per_epoch = 3
    # epoch 0 (dense, no teacher yet): identical losses; afterwards the distillation term is in the loss
    assert distilled.losses[:per_epoch] == plain.losses[:per_epoch]
    assert all(d > p for d, p in zip(distilled.losses[per_epoch:], plain.losses[per_epoch:], strict=True))
    assert not torch.allclose(module.model[8].weight, plain_module.model[8].weight)  # so the gradients differed
    assert callback._distiller.teacher is not None and callback._distiller.last_loss > 0
    assert "training_step" not in vars(module)  # the module's own step is back after fit
    assert callback._distiller.teacher[0].weight.abs().sum(dim=(1, 2, 3)).min() > 0  # the teacher is dense


def test_distillation_teacher_from_fit_start(tmp_path) -> None:
    """A schedule from epoch 1 fine-tunes the dense network for an epoch first: by default the teacher is
    the network after that epoch; with ``"teacher": "fit_start"`` it is the weights fit began with."""
    schedule = {"start_epoch": 1, "end_epoch": 2, "steps": 2}
    teachers = {}
    for teacher in ("first_step", "fit_start"):
        pl.seed_everything(0, verbose=False)
        module = PLClassifier(lr=0.05)
        start = {k: v.clone() for k, v in module.model.state_dict().items()}
        callback = pruning(tmp_path, pruner="l1", schedule=schedule, distill={"teacher": teacher})
        fit(tmp_path / teacher, callback, module=module)
        state = callback._distiller.teacher.state_dict()
        teachers[teacher] = all(torch.equal(state[k], v) for k, v in start.items())
    assert teachers == {"first_step": False, "fit_start": True}


def test_distillation_errors(tmp_path) -> None:
    class Manual(PLClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ConfigurationError, match="manual optimization"):
        fit(tmp_path, pruning(tmp_path, distill=True), module=Manual())

    class Twice(PLClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + 0 * self.model(batch[0]).sum()

    with pytest.raises(ConfigurationError, match="ran 2 times in one training step"):
        fit(tmp_path, pruning(tmp_path, distill=True), module=Twice())


def test_finetune_at_the_pruned_size(tmp_path) -> None:
    schedule = {"start_epoch": 1, "end_epoch": 2, "steps": 2}
    callback = pruning(tmp_path, schedule=schedule, finetune="pruned")
    module, recorder = fit(tmp_path, callback, max_epochs=4)
    dense = recorder.params[0]
    assert recorder.params[1] == dense and recorder.params[3] < 0.5 * dense  # physically smaller from step 2 on
    assert all(recorder.optimized)  # the optimizer holds the module's parameters, the new ones included
    assert module.model[0].out_channels == 4 and module.model[3].out_channels == 8
    report = callback.report
    assert report["max_relative_error"] == 0.0 and report["params_exported"] == recorder.params[3]
    assert verify_equivalence(module.model, callback.exported_network, torch.randn(4, 3, 8, 8)).passed


def test_finetune_at_the_pruned_size_resumes(tmp_path) -> None:
    def make():
        return pruning(tmp_path, pruner="l1", prune_on_epoch=1, finetune="pruned", distill=True)

    whole, _ = fit(tmp_path / "a", make(), max_epochs=4)
    fit(tmp_path / "b", make(), max_epochs=2, checkpoints=True)  # the checkpoint holds the small model
    resumed_callback = make()
    resumed, _ = fit(tmp_path / "b", resumed_callback, max_epochs=4, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt")
    assert resumed_callback.shrunk and resumed.model[0].out_channels == 4
    for name, value in whole.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name], atol=1e-6), name


def test_the_recovery_recipe_runs_from_yaml(tmp_path) -> None:
    """configs/recovery.yaml through LightningCLI, its schedule shortened to fit three short epochs."""
    import os

    import yaml

    from lightning_prune.lightning.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "recovery.yaml")) as handle:
        config = yaml.safe_load(handle)
    trainer = config["trainer"]
    trainer.update(
        max_epochs=3, limit_train_batches=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    options = trainer["callbacks"][0]["init_args"]
    assert options["schedule"]["steps"] > 1 and options["distill"] and options["finetune"] == "pruned"
    options["schedule"] = {"start_epoch": 1, "end_epoch": 2, "steps": 2, "ramp": "cubic"}
    path = tmp_path / "recovery.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    pruned, masked = tmp_path / "pruned" / "pruned.ckpt", tmp_path / "pruned" / "masked.ckpt"
    # the pruned-size fine-tune's files load into the freshly built network and into the LightningModule
    network = load_pruned(pruned, DigitsCNN(width=32).net).eval()
    module = load_pruned_module(pruned, DigitsCNN).eval()
    assert sum(p.numel() for p in network.parameters()) < 0.6 * sum(p.numel() for p in DigitsCNN(width=32).parameters())
    images = torch.randn(4, 1, 8, 8)
    assert verify_equivalence(module, network, images).passed
    last = load_pruned_module(masked, DigitsCNN).eval()  # the Lightning checkpoint taken at the pruned size
    assert verify_equivalence(last, network, images).passed
