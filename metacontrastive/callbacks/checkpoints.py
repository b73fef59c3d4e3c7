"""Checkpoints that a later run can resume from, and nothing a later run should not trust.

- ``FiniteModelCheckpoint``: Lightning's ``ModelCheckpoint`` that never keeps a model with non-finite
  weights, or a non-finite score, among its best.
- ``ResumeCheckpoint``: ``last.ckpt`` in the run's checkpoint folder every ``every_n_steps`` steps or
  ``every_minutes`` minutes, whichever comes first, and when the run is interrupted (Ctrl-C, SIGTERM as
  SLURM and most schedulers send before a kill, an exception); never a model with non-finite weights.
  Lightning writes checkpoints through an fsspec transaction (``_atomic_save``), so a kill in the middle
  of a write leaves the previous ``last.ckpt``. A run that fails before its first step leaves no run
  folder behind (unless it was resuming one).
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["FiniteModelCheckpoint", "ResumeCheckpoint", "finite_weights"]


def finite_weights(module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class FiniteModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose best models all have finite weights and a finite score."""

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is not None and not bool(torch.isfinite(current)):
            return False
        if not finite_weights(trainer.lightning_module):
            rank_zero_warn("the model's weights are not finite: not kept as a best checkpoint")
            return False
        return super().check_monitor_top_k(trainer, current)


class ResumeCheckpoint(Callback):
    """Write ``last.ckpt`` often enough that a killed run loses little (see the module docstring).

    Args:
        every_n_steps: steps between two ``last.ckpt``.
        every_minutes: minutes after which a step writes ``last.ckpt`` even between two of those.
    """

    def __init__(self, every_n_steps: int = 50, every_minutes: float = 5.0) -> None:
        if every_n_steps < 1 or every_minutes <= 0:
            raise ValueError("ResumeCheckpoint: every_n_steps >= 1 and every_minutes > 0")
        self.every_n_steps, self.every_minutes = every_n_steps, every_minutes
        self._saved_at = time.monotonic()
        self._resuming = False

    @staticmethod
    def folder(trainer: L.Trainer) -> Path:
        """Where ``last.ckpt`` goes: the checkpoint callback's folder, else ``<log dir>/checkpoints``."""
        callback = trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resuming = trainer.ckpt_path is not None
        self._saved_at = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        due = trainer.global_step % self.every_n_steps == 0 or time.monotonic() - self._saved_at > 60 * self.every_minutes
        if due and trainer.global_step > 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0 and not self._resuming:
            self._remove_empty_run(trainer)
            return
        path = self._save(trainer)
        if path is not None and trainer.is_global_zero:
            print(f"interrupted at step {trainer.global_step} ({type(exception).__name__}): saved {path}; "
                  f"resume in place with `make train RESUME=1` or `--ckpt_path last`", file=sys.stderr, flush=True)

    def _save(self, trainer: L.Trainer) -> Path | None:
        # every rank takes part (a collective under DDP); only rank 0 writes
        if trainer.state.stage is None or trainer.sanity_checking:
            return None
        if not finite_weights(trainer.lightning_module):
            rank_zero_warn(f"step {trainer.global_step}: the model's weights are not finite; last.ckpt keeps the previous state")
            return None
        path = self.folder(trainer) / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # all a resume needs; unsaid, Lightning logs its default each time
        self._saved_at = time.monotonic()
        return path

    @staticmethod
    def _remove_empty_run(trainer: L.Trainer) -> None:
        """A run that failed before its first step has nothing to resume: leave no folder behind."""
        log_dir = trainer.logger.log_dir if trainer.logger is not None else None  # no broadcast: rank 0 alone may be here
        folder = Path(log_dir) if log_dir else None
        if trainer.is_global_zero and folder is not None and folder.is_dir() and not any(folder.rglob("*.ckpt")):
            shutil.rmtree(folder, ignore_errors=True)
            print(f"the run failed before its first step: removed its folder {folder}", file=sys.stderr, flush=True)
