"""The seed's ``inplace_dict`` as Python text: its type and how it prints.

A base module (it imports nothing of the package) because the error that reports a wrong dict
prints the corrected entries in this format; inferring, loading and checking a dict live in
:mod:`lightning_prune.core.graph.inplace_dict`.

>>> print(format_inplace_dict({"conv1": (None,), "bn1": ("conv1",)}))
inplace_dict = {
    'conv1': (None,),
    'bn1': ('conv1',),
}
"""

from __future__ import annotations

InplaceDict = dict[str, tuple[str | int | None, ...]]
"""The seed's format: layer -> producers of its input channels, in concat order (``None``: the
network input, and ``(None,)`` alone, for a layer over a reshaped tensor or over no layer's
channels, "its input channels are not pruned"; an ``int``: that many channels from an unpruned
source)."""


def format_inplace_dict(inplace_dict: InplaceDict) -> str:
    """The dict as Python source, one layer per line, for review and hand-editing as the seed advises."""
    lines = ["inplace_dict = {"]
    lines += [f"    {key!r}: {tuple(value)!r}," for key, value in inplace_dict.items()]
    lines.append("}")
    return "\n".join(lines)


__all__ = ["InplaceDict", "format_inplace_dict"]
