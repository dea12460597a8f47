"""Files: what leaves the process, each written atomically and checked before it lands.

- :mod:`~lightning_prune.core.files.atomic`: a temporary name that names its writer, then a rename;
- :mod:`~lightning_prune.core.files.checkpoint`: the weights-only compressed checkpoint;
- :mod:`~lightning_prune.core.files.capture`, :mod:`~lightning_prune.core.files.deploy`: ONNX and
  ``torch.export`` files.
"""
