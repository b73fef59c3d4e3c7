"""The training command line: ``python -m metacontrastive {fit,validate,test} ...`` (LightningCLI).
(``python -m metacontrastive prepare ...``, the shard converters, is dispatched in ``__main__.py``.)

The model's ``domains`` are linked to the data module's, so a run names its domains once:
``--data.domains=[natural,medical]``.
"""
from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.module import MetaContrastiveModule

__all__ = ["MetaCLI", "main"]


class MetaCLI(LightningCLI):
    """LightningCLI with the data module's domains linked into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.domains", "model.domains")


def main(args: list[str] | None = None) -> MetaCLI:
    """Run LightningCLI on ``args`` (default: the command line)."""
    return MetaCLI(
        MetaContrastiveModule,
        EpisodicDataModule,
        trainer_defaults={"inference_mode": False},  # evaluation adapts on support sets: it needs autograd
        save_config_kwargs={"overwrite": True},
        args=args,
    )
