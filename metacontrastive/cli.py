"""The command line: ``python -m metacontrastive {fit,validate,test} ...`` (LightningCLI) and
``python -m metacontrastive prepare ...`` (shard converters, see ``metacontrastive.data.prepare``).

The model's ``domains`` are linked to the data module's, so a run names its domains once:
``--data.domains=[natural,medical]``.
"""
from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.module import MetaContrastiveModule

__all__ = ["MetaCLI", "main"]


class MetaCLI(LightningCLI):
    """LightningCLI with the data module's domains linked into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.domains", "model.domains")


def main(args: list[str] | None = None) -> MetaCLI | None:
    """Entry point; ``args`` defaults to ``sys.argv[1:]``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "prepare":
        from metacontrastive.data.prepare import main as prepare_main

        prepare_main(argv[1:])
        return None
    return MetaCLI(
        MetaContrastiveModule,
        EpisodicDataModule,
        trainer_defaults={"inference_mode": False},  # evaluation adapts on support sets: it needs autograd
        save_config_kwargs={"overwrite": True},
        args=args,
    )
