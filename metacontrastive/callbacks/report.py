"""RunReport: what a run shows besides its curves.

- At the first training step, a grid of one episode's support and query images (TensorBoard
  ``episode/support`` and ``episode/query``, one row per class), so that a wrong decode or split shows
  (a validation episode's when training streams cached tower features instead of images).
- At the end of ``fit``: the hyperparameters with the final validation metrics (TensorBoard's HPARAMS
  tab; set the logger's ``default_hp_metric: false`` so that only this entry is written), and a printed
  summary: the run folder, the best checkpoint, the final validation accuracy per domain and the next
  commands.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid

__all__ = ["RunReport"]


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class RunReport(Callback):
    """Episode grid at the start, hyperparameters with final metrics and a printed summary at the end."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        logger = _tensorboard(trainer)
        if trainer.global_step != 0 or batch_idx != 0 or logger is None or not trainer.is_global_zero:
            return
        task = next((t for t in batch if t.labelled), batch[0])
        if task.support_images is None:  # training streams cached features: show a validation episode's images
            datamodule = getattr(trainer, "datamodule", None)
            task = next((t for t in getattr(datamodule, "fixed_episodes", lambda _: [])("val") if t.labelled), None)
            if task is None or task.support_images is None:
                return
        for name, images, labels in (("support", task.support_images, task.support_labels),
                                     ("query", task.query_images, task.query_labels)):
            order = torch.argsort(labels.cpu(), stable=True)  # one row per class
            per_row = max(int(torch.bincount(labels.cpu()).max()), 1)
            logger.experiment.add_image(f"episode/{name}", make_grid(images[order].float().cpu(), nrow=per_row, pad_value=1.0),
                                        trainer.global_step)
        logger.experiment.add_text("episode/classes", f"{task.domain}: " + " | ".join(task.texts[:20]), trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank takes part
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        logger = _tensorboard(trainer)
        if logger is not None and metrics:
            logger.log_hyperparams(pl_module.hparams, {f"hp/{k}": v for k, v in metrics.items()})
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") or ""
        last = Path(checkpoint.dirpath) / "last.ckpt" if checkpoint is not None and checkpoint.dirpath else None
        lines = [f"run folder: {log_dir}"]
        if best:
            lines.append(f"best checkpoint: {best} ({checkpoint.monitor} = {float(checkpoint.best_model_score):.4f})")
        for key in sorted(k for k in metrics if k.startswith("val/acc/")):
            ci = metrics.get(key.replace("val/acc/", "val/acc_ci95/"), float("nan"))
            lines.append(f"final validation accuracy {key[len('val/acc/'):]}: {100 * metrics[key]:.1f}% +- {100 * ci:.1f}")
        ckpt = best or (str(last) if last is not None and last.exists() else "")
        lines.append("next: `make tensorboard` to see the curves" + (f", `make eval CKPT={ckpt}` for the few-shot table" if ckpt else ""))
        print("\n".join(lines))
