"""AlignmentCallback: how the domains sit in the shared space, on a fixed probe set per domain.

Every N validation epochs it embeds the first ``probe_size`` images of each labelled validation domain
(conditioned on the domain's own row, no adaptation) and logs:

- ``align/mmd/<a>-<b>`` and ``align/coral/<a>-<b>``: the discrepancies of ``metacontrastive.losses``
  between each pair of domains (what the alignment regulariser pushes down);
- ``align/alignment/<domain>`` and ``align/uniformity/<domain>``: Wang & Isola's (2020) alignment of
  same-class images (lower: tighter classes) and uniformity (lower: more spread; near 0: collapse);
- with a TensorBoard logger, every ``projector_every_n_epochs``, the embedding projector with the
  domain and class of each point and its image as a thumbnail.
"""
from __future__ import annotations

import itertools

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from metacontrastive.losses import alignment, coral, mmd_rbf, uniformity

__all__ = ["AlignmentCallback", "alignment_metrics", "probe_embeddings"]


def probe_embeddings(pl_module: L.LightningModule, datamodule, probe_size: int, split: str = "val") -> dict:
    """The first ``probe_size`` records of each labelled domain of ``split``, embedded by the model.

    Returns:
        ``{domain: {"z": (n, D), "labels": (n,), "images": (n, 3, H, W), "classes": [names]}}``.
    """
    out = {}
    device = pl_module.device
    for s in datamodule.split(split):
        if not s.labelled:
            continue
        groups = list(datamodule.pool(s, split).records.values())
        # classes in turn (the i-th record of each class, then the next), so that every class is in the probe
        records = [group[i] for i in range(max(map(len, groups))) for group in groups if i < len(group)][:probe_size]
        images = torch.stack([r.image for r in records]).float().div(255.0)  # (n, 3, H, W)
        labels = torch.tensor([r.label for r in records])
        with torch.no_grad():
            model, row = pl_module.model, pl_module.domain_row(s.name)
            if records[0].features is not None:  # the pool carries the frozen tower's cached features
                h = torch.stack([r.features for r in records]).to(device)  # (n, F_I), or trunk activations
                z = model.encode_image(None, row, cached=(h, datamodule.spec.tower))  # (n, D)
            else:
                z = model.encode_image(images.to(device), row)  # (n, D)
        out[s.name] = {"z": z.cpu(), "labels": labels, "images": images, "classes": [s.classes[i] for i in labels]}
    return out


def alignment_metrics(probes: dict) -> dict[str, float]:
    """The ``align/*`` metrics of the module docstring from ``probe_embeddings``' output."""
    metrics = {}
    for name, probe in probes.items():
        metrics[f"align/alignment/{name}"] = float(alignment(probe["z"], probe["labels"]))
        metrics[f"align/uniformity/{name}"] = float(uniformity(probe["z"]))
    for a, b in itertools.combinations(probes, 2):
        metrics[f"align/mmd/{a}-{b}"] = float(mmd_rbf(probes[a]["z"], probes[b]["z"]))
        metrics[f"align/coral/{a}-{b}"] = float(coral(probes[a]["z"], probes[b]["z"]))
    return metrics


class AlignmentCallback(Callback):
    """Alignment diagnostics between and within domains (see the module docstring).

    Args:
        every_n_epochs: run after every N-th validation epoch.
        probe_size: images per domain (the first ones of each class of its validation split, classes in turn).
        projector_every_n_epochs: write the embedding projector every N-th validation epoch (0: never).
    """

    def __init__(self, every_n_epochs: int = 1, probe_size: int = 200, projector_every_n_epochs: int = 0) -> None:
        if every_n_epochs < 1 or probe_size < 2 or projector_every_n_epochs < 0:
            raise ValueError("AlignmentCallback: every_n_epochs >= 1, probe_size >= 2, projector_every_n_epochs >= 0")
        self.every_n_epochs, self.probe_size, self.projector_every_n_epochs = every_n_epochs, probe_size, projector_every_n_epochs

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or epoch % self.every_n_epochs or not trainer.is_global_zero:
            return
        probes = probe_embeddings(pl_module, trainer.datamodule, self.probe_size)
        pl_module.log_dict(alignment_metrics(probes), rank_zero_only=True)
        if self.projector_every_n_epochs and epoch % self.projector_every_n_epochs == 0:
            self._projector(trainer, probes)

    @staticmethod
    def _projector(trainer: L.Trainer, probes: dict) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or not probes:
            return
        metadata = [[name, cls] for name, probe in probes.items() for cls in probe["classes"]]
        logger.experiment.add_embedding(
            torch.cat([p["z"] for p in probes.values()]), metadata=metadata, metadata_header=["domain", "class"],
            label_img=torch.cat([p["images"] for p in probes.values()]), global_step=trainer.global_step, tag="probe",
        )
