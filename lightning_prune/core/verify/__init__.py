"""Verification: the exported model computes what the masked one does, and what it costs.

- :mod:`~lightning_prune.core.verify.equivalence`: outputs compared on an input or on batches;
- :mod:`~lightning_prune.core.verify.batches`: the model input inside a tensor, tuple or dict batch;
- :mod:`~lightning_prune.core.verify.report`: params, MACs, latency and the summary table;
- :mod:`~lightning_prune.core.verify.selfcheck`: export's own check, at batch 1 against the traced output;
- :mod:`~lightning_prune.core.verify.retries`: what export keeps after that check fails, in one retry.
"""
