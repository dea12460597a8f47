"""What a model's input is inside a training batch: a tensor, a tuple ``(inputs, target, ...)``, or a dict.

One rule for every layout, in :func:`~lightning_prune.core.trace.call_model`'s convention (a tensor
is passed positionally, a tuple as positional arguments, a dict as keywords):

- a tensor batch is the input;
- a tuple or list batch is ``(input, target, ...)``: its first item is the input, whatever its form;
- a dict batch (the Hugging Face convention, ``{"pixel_values": ..., "labels": ...}``) is matched to
  the parameters of the model's ``forward``: the keys it names are passed as keywords, so
  ``call_model(model, inputs)`` calls ``model(**inputs)`` (every key when ``forward`` takes ``**kwargs``);
- with ``input_key``, only ``batch[input_key]`` is passed: by that name when ``forward`` takes it as a
  keyword (a parameter of that name, or ``**kwargs``), else positionally, as ``forward``'s first input.

>>> import torch
>>> def forward(pixel_values, labels=None): ...
>>> inputs, target = split_batch({"pixel_values": torch.ones(2, 3), "labels": torch.zeros(2), "id": [0, 1]}, forward)
>>> sorted(inputs), target.shape
(['labels', 'pixel_values'], torch.Size([2]))
>>> split_batch({"image": torch.ones(2, 3), "label": torch.zeros(2)}, lambda x: x, input_key="image")[0].shape
torch.Size([2, 3])
>>> list(split_batch({"image": torch.ones(2, 3), "label": torch.zeros(2)}, lambda **inputs: 0, input_key="image")[0])
['image']
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_prune.core.errors import ConfigurationError

TARGET_KEYS = ("labels", "label", "targets", "target", "y")
"""Keys of a dict batch read as the target (for accuracy), in this order."""


def split_batch(batch: Any, forward: Callable[..., Any], input_key: str | None = None) -> tuple[Any, Any]:
    """``(model input, target or None)`` from one batch, in the form :func:`~lightning_prune.core.trace.records.call_model` takes.

    A tensor is the input itself; a tuple or list is ``(input, target, ...)``; a dict is matched
    to ``forward``'s parameters; with ``input_key``, ``batch[input_key]`` alone, as a keyword
    (``{input_key: value}``) when ``forward`` accepts that name, else as the bare value. Raises
    :class:`~lightning_prune.core.errors.ConfigurationError` naming the keys when a dict cannot be matched.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        return _split_dict(batch, forward, input_key)
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0], batch[1] if len(batch) > 1 else None
    raise ConfigurationError(
        f"Cannot tell the model input in a batch of type {type(batch).__name__}; "
        "batches must be a tensor, a tuple (inputs, target, ...) or a dict. Set `example_input=`."
    )


def _split_dict(batch: Mapping, forward: Callable[..., Any], input_key: str | None) -> tuple[Any, Any]:
    target = next((batch[k] for k in TARGET_KEYS if k in batch), None)
    if input_key is not None:
        if input_key not in batch:
            raise ConfigurationError(
                f"`input_key={input_key!r}` is not a key of the batch; its keys are {sorted(map(str, batch))}."
            )
        parameters = _parameters(forward)
        by_name = parameters is None or input_key in parameters
        return ({input_key: batch[input_key]} if by_name else batch[input_key]), target
    parameters = _parameters(forward)
    if parameters is None:  # forward(**kwargs): every key is an input
        return dict(batch), target
    inputs = {k: v for k, v in batch.items() if k in parameters}
    missing = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty and name not in inputs]
    if not inputs or missing:
        raise ConfigurationError(
            f"Cannot tell the model input in a dict batch with keys {sorted(map(str, batch))}: the model's forward takes "
            f"({', '.join(parameters)}). Set `input_key=` to the key holding the input, or `example_input=`."
        )
    return inputs, target


def _parameters(forward: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """Named parameters of ``forward`` that a keyword can fill, or None when it takes ``**kwargs``."""
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        return {}
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in parameters if p.kind in keyword}


__all__ = ["TARGET_KEYS", "split_batch"]
