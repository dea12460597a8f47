"""The core: channel masks in, a physically smaller and exactly equivalent model out. PyTorch only.

The data flows masks -> trace -> graph -> plan -> shrink -> verify -> checkpoint:

- :mod:`~lightning_prune.core.graph.masks`: every mask source turned into ``{layer: keep-vector}``;
- :mod:`~lightning_prune.core.trace.tracer`: one real forward pass recorded under a ``TorchFunctionMode``;
- :mod:`~lightning_prune.core.trace.op_rules`: the table of op rules the tracer dispatches to (extend it
  with :func:`~lightning_prune.register_op_rule`);
- :mod:`~lightning_prune.core.graph.channel_graph`: the immutable graph of coupled channel groups;
- :mod:`~lightning_prune.core.graph.plan`: what each layer keeps, folds and why;
- :mod:`~lightning_prune.core.shrink.registry`: one shrink function per module type, in a registry (extend it
  with :func:`~lightning_prune.register_shrinker`);
- :mod:`~lightning_prune.core.export`, :mod:`~lightning_prune.core.verify.equivalence`,
  :mod:`~lightning_prune.core.files.checkpoint`, :mod:`~lightning_prune.core.files.deploy`: the pipeline's ends.

Nothing here imports Lightning; :mod:`lightning_prune.lightning` is the glue on top.
"""
