"""How a compressed checkpoint's names land on the model it is loaded into.

A checkpoint saved from a LightningModule holding ``self.model`` names its layers ``model.0``, ...;
loaded into the bare network those names lose the prefix, and a checkpoint of the bare network
loaded into a wrapper gains one. :func:`find_mapping` finds the one mapping under which every
changed layer and every state-dict key fits the model, or says why none (or several) do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_prune.core.errors import CheckpointError


@dataclass(frozen=True)
class NameMapping:
    """How checkpoint names land on the model: ``strip`` removes ``prefix.`` from them (the model is the
    network that was at ``prefix``), ``add`` loads them into the model's submodule ``prefix``."""

    mode: str  # "same", "strip" or "add"
    prefix: str = ""

    def local(self, name: str) -> str | None:
        """The name relative to the module loaded into; None for a name outside the network."""
        if self.mode != "strip":
            return name
        if name == self.prefix:
            return ""
        return name[len(self.prefix) + 1 :] if name.startswith(self.prefix + ".") else None

    def target(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.prefix) if self.mode == "add" else model

    def describe(self) -> str:
        return {
            "same": "as saved",
            "strip": f"prefix={self.prefix!r} (the network inside the saved module)",
            "add": f"prefix={self.prefix!r} (the network inside this model)",
        }[self.mode]


def _misfit(
    mapping: NameMapping, layers: list[str], keys: list[str], modules: set[str], model_keys: set[str]
) -> str | None:
    """Why the checkpoint's names do not fit the model under ``mapping`` (None when they do).

    Shapes are not looked at here: a fitting model of another size gets the precise shape error later."""

    def full(local: str) -> str:
        if mapping.mode != "add":
            return local
        return f"{mapping.prefix}.{local}" if local else mapping.prefix

    for layer in layers:
        local = mapping.local(layer)
        if local is None or full(local) not in modules:
            return f"it changes layer '{layer}', which the model does not have"
    mapped = set()
    for key in keys:
        local = mapping.local(key)
        if local is None:
            continue
        owner = full(local).rpartition(".")[0]
        if owner not in modules:
            return f"its state_dict key '{key}' belongs to no module of the model"
        mapped.add(full(local))
    if not mapped:
        return f"none of its state_dict keys start with '{mapping.prefix}.'"
    scope = mapping.prefix + "." if mapping.mode == "add" else ""
    missing = sorted(k for k in model_keys if k.startswith(scope) and k not in mapped)
    return f"the model's '{missing[0]}' is not in it" if missing else None


def find_mapping(data: dict[str, Any], model: nn.Module, path: str, prefix: str | None) -> NameMapping:
    """The mapping of the checkpoint ``data`` (read from ``path``) onto ``model``: as ``prefix`` says, else the
    one that fits; a :class:`CheckpointError` naming the file when none or several do."""
    layers, keys = list(data["layers"]), list(data["state_dict"])
    modules = {name for name, _ in model.named_modules()}
    model_keys = set(model.state_dict())
    # explicit: the checkpoint's names start with prefix., or this model holds the network at prefix
    if prefix is not None:
        if prefix == "":
            candidates = [NameMapping("same")]
        else:
            candidates = (
                [NameMapping("strip", prefix)] if any(n.startswith(prefix + ".") for n in layers + keys) else []
            )
            if prefix in modules:
                candidates.append(NameMapping("add", prefix))
        if not candidates:
            raise CheckpointError(
                f"Checkpoint '{path}' does not fit prefix={prefix!r}: none of its names start with '{prefix}.' "
                f"({'first layer' if layers else 'first key'} '{(layers or keys)[0]}') and the {type(model).__name__} has no submodule {prefix!r}. "
                f"Pass the attribute path of the network inside the LightningModule (e.g. prefix='model'), or leave prefix out."
            )
        reasons = [_misfit(c, layers, keys, modules, model_keys) for c in candidates]
        if None in reasons:
            return candidates[reasons.index(None)]
        raise CheckpointError(
            f"Checkpoint '{path}' does not fit the {type(model).__name__} with prefix={prefix!r}: {reasons[0]}. "
            f"Check the prefix, or leave it out to have it found."
        )
    same = NameMapping("same")
    first = _misfit(same, layers, keys, modules, model_keys)
    if first is None:
        return same
    names = layers or keys
    strips = {name.rsplit(".", depth)[0] for name in names for depth in range(1, name.count(".") + 1)}
    if layers:  # every changed layer must lie inside the network
        strips = {p for p in strips if all(n == p or n.startswith(p + ".") for n in layers)}
    candidates = [NameMapping("strip", p) for p in sorted(strips)]
    candidates += [NameMapping("add", name) for name in sorted(modules) if name]
    fits = [c for c in candidates if _misfit(c, layers, keys, modules, model_keys) is None]
    stored = data.get("network_prefix")
    preferred = [c for c in fits if c.mode == "strip" and c.prefix == stored]
    if len(fits) == 1 or preferred:
        return (preferred or fits)[0]
    if not fits:
        raise CheckpointError(
            f"Checkpoint '{path}' does not fit the {type(model).__name__}: {first}, and no attribute prefix maps its "
            f"names onto the model. Pass the module it was saved from, or the network inside it built with the same "
            f"configuration; if the network sits under another attribute, pass prefix='<attribute>'."
        )
    raise CheckpointError(
        f"Checkpoint '{path}' fits the {type(model).__name__} in {len(fits)} ways: "
        + ", ".join(c.describe() for c in fits)
        + f". Pass prefix= to choose one (e.g. prefix={fits[0].prefix!r})."
    )


__all__ = ["NameMapping", "find_mapping"]
