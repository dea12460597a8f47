"""lightning-prune: export channel-pruned PyTorch models as genuinely smaller networks, exactly."""

from typing import Any

from lightning_prune.core.errors import (
    CheckpointError,
    ConfigurationError,
    ExampleInputError,
    InplaceDictError,
    InplaceDictMismatchError,
    MaskError,
    PrunedToZeroError,
    PruneExportError,
    VerificationError,
)
from lightning_prune.core.export import ExportResult, export, export_pruned_model
from lightning_prune.core.files.checkpoint import load_pruned, load_pruned_module, save_pruned
from lightning_prune.core.files.deploy import check_deployed, save_deployables, save_onnx, save_pt2
from lightning_prune.core.files.pretrained import from_pretrained
from lightning_prune.core.from_file import export_from_file
from lightning_prune.core.graph.channel_graph import ChannelGraph
from lightning_prune.core.graph.groups import group_masks
from lightning_prune.core.graph.inplace_dict import infer_inplace_dict
from lightning_prune.core.graph.masks import apply_masks, collect_masks
from lightning_prune.core.inplace_format import format_inplace_dict
from lightning_prune.core.shrink.registry import PrunedLayerNorm, register_shrinker, shrink_parameters
from lightning_prune.core.trace.op_rules import register_op_rule
from lightning_prune.core.verify.equivalence import EquivalenceReport, verify_equivalence
from lightning_prune.core.weights import parameters_on_meta

__all__ = [
    "ChannelGraph",
    "CheckpointError",
    "ConfigurationError",
    "PruneExportCallback",
    "load_pruned",
    "load_pruned_module",
    "parameters_on_meta",
    "save_pruned",
    "EquivalenceReport",
    "ExampleInputError",
    "ExportResult",
    "InplaceDictError",
    "InplaceDictMismatchError",
    "MaskError",
    "PruneExportError",
    "PrunedLayerNorm",
    "PrunedToZeroError",
    "VerificationError",
    "apply_masks",
    "check_deployed",
    "collect_masks",
    "export",
    "export_from_file",
    "export_pruned_model",
    "format_inplace_dict",
    "from_pretrained",
    "group_masks",
    "infer_inplace_dict",
    "register_op_rule",
    "register_shrinker",
    "save_deployables",
    "save_onnx",
    "save_pt2",
    "shrink_parameters",
    "verify_equivalence",
]


def __getattr__(name: str) -> Any:
    """The Lightning callback is imported on first use, so the core works without Lightning."""
    if name == "PruneExportCallback":
        from lightning_prune.lightning.callback import PruneExportCallback

        return PruneExportCallback
    raise AttributeError(f"module 'lightning_prune' has no attribute {name!r}")
