"""The package's one exception family.

Every message names the layer (or file) at fault, what was expected, what was found and,
where there is one, what to do about it.
"""

from __future__ import annotations

from lightning_prune.core.inplace_format import format_inplace_dict


class PruneExportError(Exception):
    """Base class of every error this package raises on bad input or a failed export."""


class MaskError(PruneExportError, ValueError):
    """A mask names a layer the model lacks, has the wrong shape, or holds non-binary values."""


class PrunedToZeroError(PruneExportError, ValueError):
    """A layer would be left with no channels at all."""


class InplaceDictError(PruneExportError, ValueError):
    """An ``inplace_dict`` names unknown layers or disagrees with the traced graph."""


class InplaceDictMismatchError(InplaceDictError):
    """Every entry of an ``inplace_dict`` the traced graph contradicts, reported at once.

    ``problems``: key -> what is wrong (wrong producer, wrong order, missing producer, unknown
    name) and what the trace has. ``corrected``: the dict with each wrong entry replaced by the
    trace's and unknown keys dropped, ready for :func:`~lightning_prune.format_inplace_dict`, so a
    hand-written dict is fixed in one pass.
    """

    def __init__(self, problems: dict[str, str], corrected: dict[str, tuple[str | int | None, ...]]) -> None:
        self.problems = dict(problems)
        self.corrected = dict(corrected)
        count = len(self.problems)
        fixed = {key: value for key, value in self.corrected.items() if key in self.problems}
        lines = [
            f"inplace_dict has {count} wrong entr{'y' if count == 1 else 'ies'}, all listed; the error's "
            "`corrected` dict has each fixed (print it with format_inplace_dict):"
        ]
        lines += [f"  {message}" for message in self.problems.values()]
        if fixed:
            lines.append("Corrected entries:")
            lines += [f"  {line.strip()}" for line in format_inplace_dict(fixed).splitlines()[1:-1]]
        lines.append("Fix the entries or pass inplace_dict='auto'.")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple:  # picklable (errors travel between ranks)
        return (type(self), (self.problems, self.corrected))


class ExampleInputError(PruneExportError, ValueError):
    """The model rejected the example input during tracing."""


class VerificationError(PruneExportError):
    """The exported model does not compute what the masked model computes."""


class CheckpointError(PruneExportError):
    """A compressed checkpoint is missing, truncated, unsafe, or made for another architecture."""


class ConfigurationError(PruneExportError, ValueError):
    """A callback or CLI argument is outside what is supported."""
