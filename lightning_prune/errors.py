"""The package's one exception family.

Every message names the layer (or file) at fault, what was expected, what was found and,
where there is one, what to do about it.
"""

from __future__ import annotations


class PruneExportError(Exception):
    """Base class of every error this package raises on bad input or a failed export."""


class MaskError(PruneExportError, ValueError):
    """A mask names a layer the model lacks, has the wrong shape, or holds non-binary values."""


class PrunedToZeroError(PruneExportError, ValueError):
    """A layer would be left with no channels at all."""


class InplaceDictError(PruneExportError, ValueError):
    """An ``inplace_dict`` names unknown layers or disagrees with the traced graph."""


class ExampleInputError(PruneExportError, ValueError):
    """The model rejected the example input during tracing."""


class VerificationError(PruneExportError):
    """The exported model does not compute what the masked model computes."""


class CheckpointError(PruneExportError):
    """A compressed checkpoint is missing, truncated, unsafe, or made for another architecture."""


class ConfigurationError(PruneExportError, ValueError):
    """A callback or CLI argument is outside what is supported."""
