"""Reading ``inplace_dict`` files safely (YAML, JSON or the seed's Python literal; no code runs).

The seed page writes its dict as Python source, ``inplace_dict = {'layer': (None,), ...}``,
comments included. A ``.py`` or ``.txt`` file holding that text is read with :mod:`ast` as a
literal, so it is never executed:

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "seed.py")
>>> _ = open(path, "w").write("inplace_dict = {\\n    'conv1': (None,),  # the input\\n    'bn1': ('conv1',),\\n}\\n")
>>> load_inplace_dict(path)
{'conv1': (None,), 'bn1': ('conv1',)}
"""

from __future__ import annotations

import ast
import json
import os
import textwrap
from collections.abc import Mapping
from typing import Any, Union

from lightning_prune.errors import InplaceDictError
from lightning_prune.graph import InplaceDict

PYTHON_SUFFIXES = (".py", ".txt")


def load_inplace_dict(source: Union[InplaceDict, str, os.PathLike]) -> InplaceDict:
    """An ``inplace_dict`` from a dict, or from a YAML/JSON file (lists become tuples, ``null`` is
    None), or a ``.py``/``.txt`` file with the seed's Python text (``inplace_dict = {...}``)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise InplaceDictError(f"inplace_dict file '{path}' does not exist.")
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            if path.endswith(".json"):
                data: Any = json.loads(text)
            elif path.endswith(PYTHON_SUFFIXES):
                data = parse_python_inplace_dict(text)
            else:
                data = _yaml_load(text)
        except (ValueError, OSError) as err:
            raise InplaceDictError(f"inplace_dict file '{path}' could not be parsed: {err}") from err
        if not isinstance(data, Mapping):
            raise InplaceDictError(f"inplace_dict file '{path}' must hold a mapping of layer -> list; found {type(data).__name__}.")
        source = data
    if not isinstance(source, Mapping):
        raise InplaceDictError(f"inplace_dict must be a dict or a path; got {type(source).__name__}.")
    return {str(k): tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in source.items()}


def parse_python_inplace_dict(text: str) -> Any:
    """The dict literal in ``text``: ``inplace_dict = {...}`` (or a bare ``{...}``), indented or not,
    comments allowed. Only literals are accepted (:func:`ast.literal_eval`): nothing runs."""
    try:
        tree = ast.parse(textwrap.dedent(text))
    except SyntaxError as err:
        raise ValueError(f"not Python source: {err}") from err
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "inplace_dict" for t in node.targets):
            return ast.literal_eval(node.value)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Dict):
            return ast.literal_eval(node.value)
    raise ValueError("no `inplace_dict = {...}` assignment or dict literal found")


def _yaml_load(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from err
