"""The Lightning glue: :class:`~lightning_prune.PruneExportCallback`, its argument checks, the
``lightning-prune`` command (LightningCLI) and the demo models and data. Thin over :mod:`lightning_prune.core`."""
