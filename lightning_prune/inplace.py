"""Reading ``inplace_dict`` files safely (YAML or JSON; no code runs)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Union

from lightning_prune.errors import InplaceDictError
from lightning_prune.graph import InplaceDict


def load_inplace_dict(source: Union[InplaceDict, str, os.PathLike]) -> InplaceDict:
    """An ``inplace_dict`` from a dict, or from a YAML/JSON file (lists become tuples, ``null`` is None)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise InplaceDictError(f"inplace_dict file '{path}' does not exist.")
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            data: Any = json.loads(text) if path.endswith(".json") else _yaml_load(text)
        except (ValueError, OSError) as err:
            raise InplaceDictError(f"inplace_dict file '{path}' could not be parsed: {err}") from err
        if not isinstance(data, Mapping):
            raise InplaceDictError(f"inplace_dict file '{path}' must hold a mapping of layer -> list; found {type(data).__name__}.")
        source = data
    if not isinstance(source, Mapping):
        raise InplaceDictError(f"inplace_dict must be a dict or a path; got {type(source).__name__}.")
    return {str(k): tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in source.items()}


def _yaml_load(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from err
