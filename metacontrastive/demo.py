"""A model to look at, for the notebooks: a checkpoint, or a short demo run on the synthetic shards."""
from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.manifest import available_domains
from metacontrastive.data.synthetic import write_synthetic
from metacontrastive.module import MetaContrastiveModule

__all__ = ["load_or_train"]


def load_or_train(ckpt: str | None, root: str | Path, domains: list[str] | None = None, steps: int = 150,
                  **data_options) -> tuple[MetaContrastiveModule, EpisodicDataModule]:
    """The model of ``ckpt``, or one trained for ``steps`` on ``domains`` (demo shards written if missing).

    Args:
        ckpt: a checkpoint path, or None for a demo run (seed 0, the default configuration, no logs).
        root: the shards root.
        domains: training domains of the demo run (default: natural, medical); with a checkpoint, its own.
        steps: training steps of the demo run.
        data_options: more ``EpisodicDataModule`` arguments (episodes, test domains, ...).

    Returns:
        (the module in eval mode, a data module over its domains).
    """
    if ckpt:
        module = MetaContrastiveModule.load_from_checkpoint(ckpt, map_location="cpu")
        domains = module.domains
    else:
        domains = domains or ["natural", "medical"]
    for domain in dict.fromkeys(domains + data_options.get("test_domains", [])):
        if domain not in available_domains(root):
            write_synthetic(domain, root)
    data = EpisodicDataModule(domains=domains, root=str(root), **data_options)
    if not ckpt:
        L.seed_everything(0)
        module = MetaContrastiveModule(domains=domains)
        trainer = L.Trainer(max_steps=steps, inference_mode=False, logger=False, enable_checkpointing=False,
                            default_root_dir=tempfile.mkdtemp(prefix="demo-"), enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, datamodule=data)
    return module.eval(), data
