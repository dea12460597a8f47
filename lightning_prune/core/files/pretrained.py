"""A pruned Hugging Face model back from its ``save_pretrained`` directory, with no original config at hand.

Where no config describes an exported model (widths that differ per layer, BERT-style models that
derive ``head_dim`` from ``hidden_size``, a corrected norm), its config keeps the original sizes and
says how to shrink a model built from them (``lightning_prune_shrink``: plain JSON, per changed
layer its kept sizes, per attention its head counts). ``exported.save_pretrained(directory)`` writes
both with the weights; :func:`from_pretrained` builds the model from the config, shrinks it as the
record says and loads the weights: it reads ``config.json`` and safetensors only (no pickle), and runs
no code from the directory (the class is the one ``transformers`` names in ``architectures``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from lightning_prune.core.errors import CheckpointError
from lightning_prune.core.files.checkpoint import replay_shrink


def from_pretrained(directory: str | os.PathLike, model_class: type[nn.Module] | None = None) -> nn.Module:
    """Rebuild the pruned model that ``exported.save_pretrained(directory)`` wrote, in eval mode.

    ``model_class`` is the ``transformers`` class (``OPTForCausalLM``, or an ``AutoModelFor...``);
    by default the config's ``architectures`` names it. Raises :class:`CheckpointError` naming the
    directory when it holds no config or weights, names no class ``transformers`` has, or holds
    weights that do not fit the shrunk model.
    """
    import transformers
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(
            f"'{directory}' holds no config.json: pass the directory exported.save_pretrained(...) wrote."
        )
    files = _weight_files(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    model = _build(config, model_class, directory)
    record = getattr(config, "lightning_prune_shrink", None)
    if record is not None:
        replay_shrink(model, record["layers"], record["heads"], directory)
    names = _saved_names(model)
    state = {}
    for name in files:
        state.update({names.get(key, key): value for key, value in load_file(os.path.join(directory, name)).items()})
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a size mismatch: the record and the weights come from different exports
        raise CheckpointError(f"The weights in '{directory}' do not fit the model its config builds: {err}") from err
    tied = {key for key in missing if _tied(model, key, state)}
    if unexpected or set(missing) - tied:
        what = (
            f"'{unexpected[0]}' is not in the model" if unexpected else f"'{sorted(set(missing) - tied)[0]}' is missing"
        )
        raise CheckpointError(f"The weights in '{directory}' do not fit the model its config builds: {what}.")
    return model.eval()


def _build(config: Any, model_class: type[nn.Module] | None, directory: str) -> nn.Module:
    import transformers

    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise CheckpointError(
                f"The config in '{directory}' names no transformers class in 'architectures' ({names}); "
                "pass model_class=, e.g. transformers.AutoModelForCausalLM."
            )
    if hasattr(model_class, "from_config"):  # the Auto classes, and every PreTrainedModel (no weights init'd twice)
        return model_class.from_config(config)
    return model_class(config)


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as stream:
            return sorted(set(json.load(stream)["weight_map"].values()))
    if os.path.isfile(os.path.join(directory, "model.safetensors")):
        return ["model.safetensors"]
    raise CheckpointError(
        f"'{directory}' holds no model.safetensors: save with exported.save_pretrained(directory) "
        "(safetensors, the default; a pickled pytorch_model.bin is not read)."
    )


def _saved_names(model: nn.Module) -> dict[str, str]:
    """Name in the saved files -> name in the model: ``save_pretrained`` writes some weights under
    their original checkpoint names (GPT-NeoX's ``lm_head`` as ``embed_out``); renamings only."""
    own = model.state_dict()
    try:
        from transformers.modeling_utils import revert_weight_conversion
    except ImportError:  # a transformers release without weight conversions saves the model's own names
        return {}
    by_tensor = {id(tensor): key for key, tensor in own.items()}
    reverted = revert_weight_conversion(model, dict(own))
    return {saved: by_tensor[id(tensor)] for saved, tensor in reverted.items() if id(tensor) in by_tensor}


def _tied(model: nn.Module, key: str, state: dict) -> bool:
    """Whether ``key`` is a tensor ``save_pretrained`` left out because another saved name holds it."""
    tensor = model.state_dict(keep_vars=True).get(key)
    return any(
        other in state for other, held in model.state_dict(keep_vars=True).items() if held is tensor and other != key
    )


__all__ = ["from_pretrained"]
