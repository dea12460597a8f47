"""The core: channel masks in, a physically smaller and exactly equivalent model out. PyTorch only.

The data flows masks -> trace -> graph -> plan -> shrink -> verify -> files; each stage is a
subpackage that imports only the stages below it (``lint-imports`` checks it, see
``docs/architecture.md``):

- :mod:`~lightning_prune.core.files`: the weights-only checkpoint, ONNX and ``torch.export`` files;
- :mod:`~lightning_prune.core.export`: the pipeline in one function (:func:`~lightning_prune.export`);
- :mod:`~lightning_prune.core.verify`: exported == masked, on an input or on batches; the report;
- :mod:`~lightning_prune.core.shrink`: one shrink function per module type, in a registry (extend it
  with :func:`~lightning_prune.register_shrinker`), and the attention and library adapters;
- :mod:`~lightning_prune.core.graph`: masks from every source, the immutable graph of coupled
  channel groups, and the plan (what each layer keeps, folds and why);
- :mod:`~lightning_prune.core.trace`: one real forward pass recorded under a ``TorchFunctionMode``,
  with its table of op rules (extend it with :func:`~lightning_prune.register_op_rule`);
- the base every stage may import: :mod:`~lightning_prune.core.errors`,
  :mod:`~lightning_prune.core.modules`, :mod:`~lightning_prune.core.integrations`,
  :mod:`~lightning_prune.core.inplace_format`.

Nothing here imports Lightning; :mod:`lightning_prune.lightning` is the glue on top.
"""
