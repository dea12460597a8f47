"""When and what :class:`~lightning_prune.PruneExportCallback` prunes, and the hold that keeps it pruned.

Each pruning step of the schedule takes masks from the chosen source (our importance measures over
coupled groups, NNI's per-layer pruners, a pruner object, given masks, or the model's own zeros),
aligns them within each coupled group, gives every rank rank zero's masks, and holds them while
training goes on. Taylor importance accumulates the gradients of the steps before each pruning step,
activation importance the forward passes of those steps (hooks on the module only while a step is still
to come), or, for a step with none before it (at fit start), of ``calibration_batches`` training batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_prune.core.errors import ConfigurationError, MaskError
from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.groups import group_masks
from lightning_prune.core.graph.hold import MaskHold
from lightning_prune.core.graph.importance import importance_masks
from lightning_prune.core.graph.masks import Masks, collect_masks, make_pruning_permanent
from lightning_prune.core.graph.pruners import layers_to_prune, masks_from_pruner, nni_masks
from lightning_prune.core.trace.records import call_model
from lightning_prune.core.verify.batches import split_batch
from lightning_prune.lightning.checks import NNI_NAMES
from lightning_prune.lightning.compat import info
from lightning_prune.lightning.data import first_batches
from lightning_prune.lightning.inputs import example_input, prepare
from lightning_prune.lightning.schedule import Schedule
from lightning_prune.lightning.sharding import ShardedModule, check_sharded_settings, read_sharded, shards_registered
from lightning_prune.lightning.state import PruneState

CALIBRATION_BATCHES = 8  # `pruner="activation"` at fit start: training batches run forward to score on


class Pruning:
    """The pruning steps of one callback: ``settings`` is the callback (its arguments and public
    properties are read), ``state`` its :class:`~lightning_prune.lightning.state.PruneState`, and
    ``config_argument`` the argument the ``config_list`` came from (named in errors)."""

    def __init__(self, settings: Any, state: PruneState, config_argument: str) -> None:
        self.settings, self.state, self.config_argument = settings, state, config_argument

    @property
    def steps(self) -> Schedule:
        """The schedule in effect (a one-shot prune is a schedule of one step)."""
        return Schedule.of(self.settings.schedule, self.settings.prune_on_epoch)

    def pruner_object(self) -> Any:
        """The pruner object the user built, or ``None``."""
        pruner = self.settings.pruner
        return None if pruner is None or isinstance(pruner, str) else pruner

    def source(self) -> str:
        """Where the masks come from, in words."""
        if self.settings.pruner_name is not None:
            return f"{self.settings.pruner_name} pruner"
        if self.pruner_object() is not None:
            return f"{type(self.settings.pruner).__name__} pruner"
        return "given masks" if self.settings.mask_source is not None else "masks read from the model"

    def setup(self, trainer: Any, pl_module: Any) -> None:
        """Read a pruner object's masks before it is unwrapped, and check the sources against the model
        (and, under a fully sharded strategy, against what it supports)."""
        check_sharded_settings(self.settings, trainer)
        pruner = self.pruner_object()
        if self.state.masks is None and self.state.pruner_votes is None and pruner is not None:
            # NNI wraps the model as soon as a pruner is built on it: read its masks and unwrap now,
            # before a checkpoint is restored into the plain layers and optimizers see them.
            bound = getattr(pruner, "bound_model", pl_module)
            prefix = next((name for name, module in pl_module.named_modules() if module is bound), "")
            votes = masks_from_pruner(pruner, bound)
            self.state.pruner_votes = {f"{prefix}.{k}" if prefix else k: v for k, v in votes.items()}
        if self.settings.pruner_name is not None:
            layers_to_prune(pl_module, self.settings.config_list, self.config_argument)
        if self.settings.mask_source is not None:
            try:
                collect_masks(self.settings.mask_source, pl_module)
            except MaskError as err:
                raise ConfigurationError(f"`PruneExportCallback(masks=...)` does not fit the model: {err}") from err
        self.state.graph = None

    def graph(self, trainer: Any, pl_module: Any) -> ChannelGraph:
        """The module's channel graph, traced once and kept until the layers change."""
        if self.state.graph is None:
            example = example_input(trainer, pl_module, self.settings.example_input, self.settings.input_key)
            if read_sharded(trainer, pl_module):  # traced shard by shard, on rank zero's example on every rank
                self.state.graph = ShardedModule(pl_module).graph(trainer.strategy.broadcast(example, src=0))
            else:
                self.state.graph = ChannelGraph.from_model(pl_module, example)
        return self.state.graph

    def due(self, epoch: int) -> list[int]:
        """The steps whose epoch has come (at most one, except after a skipped epoch)."""
        return self.steps.due(epoch, self.state.steps_done)

    def take(self, trainer: Any, pl_module: Any, step: int) -> None:
        """Pruning step ``step``: choose the masks, hold them, and say how much was pruned."""
        masks, graph, chosen = self._choose(trainer, pl_module, step)
        masks = trainer.strategy.broadcast(masks, src=0)  # every rank holds rank zero's masks
        pruned = sum(int((~keep).sum()) for keep in masks.values())
        if pruned == 0 and step == self.steps.steps:
            raise ConfigurationError(
                f"PruneExportCallback: nothing to prune. The {self.source()} chose layers {chosen or 'none'}, but none "
                "of their pruned channels can be removed: each is tied to the model's input or output, or reaches an "
                "op that keeps its channels (see the warnings above). HINT: target other layers (`op_types`, `op_names`)."
            )
        self.state.masks, self.state.steps_done = masks, step
        self.state.taylor.reset()
        self.state.activations.reset()
        self.hold(trainer, pl_module, graph)
        self.watch(trainer, pl_module)
        total = sum(int(labels.numel()) for labels in graph.producers.values())
        where = f" (step {step} of {self.steps.steps})" if self.steps.steps > 1 else ""
        info(
            trainer,
            f"PruneExportCallback: pruned {pruned} of {total} channels in {len(masks)} layers ({self.source()}){where}.",
        )

    def _choose(self, trainer: Any, pl_module: Any, step: int) -> tuple[Masks, ChannelGraph, list[str]]:
        """This step's masks, the graph they were made on, and the layers the source chose."""
        settings = self.settings
        if settings.importance is not None:
            graph = self.graph(trainer, pl_module)
            fraction = self.steps.fraction(step)
            ratios = self._layer_sparsity(pl_module)
            if settings.importance == "activation" and not self.state.activations.recorded:
                self._calibrate(trainer, pl_module, graph)
            with self._readable(trainer, pl_module) as model:
                masks = importance_masks(
                    graph,
                    model,
                    settings.importance,
                    {layer: ratio * fraction for layer, ratio in ratios.items()},
                    ranking=settings.ranking,
                    min_channels=settings.min_channels,
                    previous=self.state.masks,  # each step's masks contain the previous step's
                    round_to=settings.rounding,
                    taylor=self.state.taylor,
                    activations=self.state.activations,
                )
            return masks, graph, sorted(ratios)
        votes = self._votes(pl_module)  # may make torch.nn.utils.prune's reparametrisation permanent
        self.state.graph = None  # so the graph is traced on the plain layers
        graph = self.graph(trainer, pl_module)
        masks = votes
        if settings.group_consistent and votes:
            # a named pruner's amount is rounded down to hardware-friendly widths; yours is kept, and
            # export adds channels back to the multiple instead
            round_to = settings.rounding if settings.pruner_name is not None else 1
            with self._readable(trainer, pl_module) as model:
                masks = group_masks(graph, None, model=model, votes=votes, layers=votes.keys(), round_to=round_to)
        return masks, graph, sorted(votes)

    @contextmanager
    def _readable(self, trainer: Any, pl_module: Any) -> Iterator[Any]:
        """The module as scores read it: itself, or a sharded one a module at a time (collective)."""
        if not read_sharded(trainer, pl_module):
            yield pl_module
            return
        with ShardedModule(pl_module).weights() as model:
            yield model

    def _layer_sparsity(self, pl_module: Any) -> dict[str, float]:
        """Each targeted layer's fraction from the config (the last entry naming a layer wins, as in NNI)."""
        config_list = self.settings.config_list
        selected = layers_to_prune(pl_module, config_list, self.config_argument)
        ratios: dict[str, float] = {}
        for entry in config_list:
            ratio = entry.get("sparse_ratio", entry.get("sparsity"))
            if entry.get("exclude") or ratio is None:
                continue
            try:
                ratios.update(dict.fromkeys(layers_to_prune(pl_module, [entry], self.config_argument), float(ratio)))
            except ConfigurationError:
                continue  # this entry selects nothing; the whole config was checked above
        return {layer: ratios[layer] for layer in selected if layer in ratios}

    def _votes(self, pl_module: Any) -> Masks:
        """Masks as the chosen source gives them, layer by layer."""
        if self.settings.pruner_name is not None:
            return nni_masks(pl_module, NNI_NAMES[self.settings.pruner_name], self.settings.config_list)
        if self.state.pruner_votes is not None:
            return self.state.pruner_votes
        if self.settings.mask_source is not None:
            return collect_masks(self.settings.mask_source, pl_module)
        votes = collect_masks(pl_module)
        make_pruning_permanent(pl_module)
        return votes

    def accumulate(self, trainer: Any, pl_module: Any) -> None:
        """Before an optimizer step: add its gradients to the Taylor scores while a step is still to come."""
        if self.settings.importance == "taylor" and self.state.steps_done < self.steps.steps:
            self.state.taylor.accumulate(self.graph(trainer, pl_module), pl_module)  # complete, unscaled gradients

    def watch(self, trainer: Any, pl_module: Any) -> None:
        """``pruner="activation"``: record the training steps' activations while a pruning step is still to come;
        otherwise (another measure, the schedule done) no hook is on the module."""
        settings, state = self.settings, self.state
        if settings.importance == "activation" and state.steps_done < self.steps.steps and not state.shrunk:
            state.activations.attach(self.graph(trainer, pl_module), pl_module)
        else:
            state.activations.detach()

    def stop(self) -> None:
        """Training is over: no activation hook stays on the module."""
        self.state.activations.detach()

    def _calibrate(self, trainer: Any, pl_module: Any, graph: ChannelGraph) -> None:
        """A step with no training step recorded before it (at fit start): ``calibration_batches`` forward passes
        on the first training batches, in evaluation mode and without gradients. The batches come from a fresh
        iterator with the global RNG saved and restored, so training then sees its data in the same order."""
        count = self.settings.calibration_batches
        batches = first_batches(trainer, count, training=True)
        if not batches:
            raise ConfigurationError(
                f"`PruneExportCallback(pruner='activation', calibration_batches={count})` found no training batches "
                "to measure activations on before pruning. HINT: give the trainer training data, or prune later "
                "(`prune_on_epoch=1`), when the training steps' own forward passes are recorded."
            )
        activations, training = self.state.activations, pl_module.training
        attached = activations.attached
        activations.attach(graph, pl_module)
        pl_module.eval()
        try:
            with torch.no_grad(), activations.calibrating(), trainer.precision_plugin.forward_context():
                for batch in batches:
                    inputs = split_batch(batch, pl_module.forward, self.settings.input_key)[0]
                    call_model(pl_module, prepare(trainer, pl_module, inputs))
        finally:
            pl_module.train(training)
            if not attached:
                activations.detach()

    def hold(self, trainer: Any, pl_module: Any, graph: ChannelGraph | None = None) -> None:
        """Hold the masks on the module's parameters (whole channels: filters, biases, norms) and apply them."""
        if graph is None:
            self.state.graph = None  # the layers may have changed since it was traced
            graph = self.graph(trainer, pl_module)
        shards_registered(trainer, pl_module)  # FSDP2: hold the shards, not a gathered copy a validation left
        self.state.hold = MaskHold.build(pl_module, self.state.masks, graph=graph)
        self.state.hold.apply()


__all__ = ["Pruning"]
