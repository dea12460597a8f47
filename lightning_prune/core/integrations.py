"""Integrations with libraries the package does not depend on, loaded once the library is.

The stage that holds an integration registers it here by module name (the shrink stage registers
its Hugging Face and torchvision adapters), so a lower stage that meets a library's layers (mask
collection meeting transformers' ``Conv1D``) loads it without importing upward:

>>> import sys
>>> register_integration("a_library_nobody_imported", "some.adapter")
>>> load_integrations()  # the library is not in sys.modules: nothing is imported
>>> "some.adapter" in sys.modules
False
"""

from __future__ import annotations

import importlib
import sys

INTEGRATIONS: dict[str, str] = {}
"""Library -> our module that registers shrinkers, updaters and prunable layers for it."""


def register_integration(library: str, module: str) -> None:
    """Have ``module`` imported (it registers itself) by :func:`load_integrations` once ``library`` is."""
    INTEGRATIONS[library] = module


def load_integrations() -> None:
    """Import the integration of every library in :data:`INTEGRATIONS` that has been imported (its
    shrinkers and updaters register themselves); the package itself never imports those libraries."""
    for library, module in list(INTEGRATIONS.items()):
        if library in sys.modules and module not in sys.modules:
            importlib.import_module(module)


__all__ = ["INTEGRATIONS", "load_integrations", "register_integration"]
