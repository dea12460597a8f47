"""The graph stage: masks from every source, the immutable graph of coupled channel groups, and the plan.

- :mod:`~lightning_prune.core.graph.prunable`, :mod:`~lightning_prune.core.graph.masks`: which layers a
  mask prunes, and every mask source turned into ``{layer: keep-vector}``;
- :mod:`~lightning_prune.core.graph.channel_graph`: coupled groups and blocked channels, from a trace;
- :mod:`~lightning_prune.core.graph.inplace_dict`: the seed's dict inferred from, and checked against, it;
- :mod:`~lightning_prune.core.graph.plan` and :mod:`~lightning_prune.core.graph.changes`: what each
  layer keeps, folds and why;
- :mod:`~lightning_prune.core.graph.groups`, :mod:`~lightning_prune.core.graph.importance`,
  :mod:`~lightning_prune.core.graph.pruners`, :mod:`~lightning_prune.core.graph.hold`: masks chosen per
  coupled group, by our importance measures or NNI's pruners, and held while fine-tuning.
"""
