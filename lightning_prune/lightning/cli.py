"""The ``lightning-prune`` command: LightningCLI with the callback and the demo data available.

lightning-prune fit --config configs/quickstart.yaml
"""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI


def main(args: list[str] | None = None) -> None:
    """Run LightningCLI; model and data classes come from the config (``class_path``)."""
    LightningCLI(args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
