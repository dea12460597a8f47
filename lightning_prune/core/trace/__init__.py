"""Tracing: one real forward pass recorded under a ``TorchFunctionMode``, channel labels moved by op rules.

- :mod:`~lightning_prune.core.trace.records`: what a pass records (``Rep``, ``ChannelTrace``, ``OpCall``);
- :mod:`~lightning_prune.core.trace.bookkeeping`: the labels each tensor carries, the API rules use;
- :mod:`~lightning_prune.core.trace.op_rules`: op name -> rule (:func:`~lightning_prune.register_op_rule`);
- :mod:`~lightning_prune.core.trace.tracer`: runs the model and dispatches each call to its rule.
"""
