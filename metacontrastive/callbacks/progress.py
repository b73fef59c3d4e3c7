"""StepProgressBar: Lightning's Rich progress bar with a true epoch count for a run bounded by ``max_steps``.

A run given ``trainer.max_steps`` and no ``max_epochs`` (``conf/default.yaml``) has ``trainer.max_epochs == -1``,
"no epoch limit", which Lightning's bar shows as ``Epoch 2/-2`` (it prints ``max_epochs - 1``). This bar
shows the last epoch the run reaches, from ``max_steps`` and the optimiser steps per epoch, in Lightning's
0-based numbering: ``Epoch 0/2`` ... ``Epoch 2/2`` for 300 steps of 100. It also shows the run's version as
the integer it is (``v_num: 0``; Lightning's Rich bar prints every number as ``0.000``).
"""
from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["StepProgressBar", "last_epoch"]


def last_epoch(trainer: L.Trainer) -> int | None:
    """The 0-based index of the last training epoch ``trainer`` runs, or None when nothing bounds it.

    The sooner of ``max_epochs`` and the epoch in which ``max_steps`` optimiser steps are done (a step that
    the module skips, e.g. a non-finite one, is not counted, so such a run can take an epoch more).
    """
    bounds = []
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        bounds.append(trainer.max_epochs - 1)
    batches = trainer.num_training_batches
    if trainer.max_steps is not None and trainer.max_steps >= 0 and 0 < batches < math.inf:
        steps_per_epoch = math.ceil(batches / max(trainer.accumulate_grad_batches, 1))
        bounds.append(math.ceil(trainer.max_steps / steps_per_epoch) - 1)
    return max(min(bounds), 0) if bounds else None


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training description counts the epochs ``max_steps`` allows (module docstring)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        if isinstance(items.get("v_num"), int):
            items["v_num"] = str(items["v_num"])  # the bar formats numbers as metrics, with 3 decimals
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        last = last_epoch(self.trainer)
        description = f"Epoch {current_epoch}" + (f"/{last}" if last is not None else "")
        # padded as Lightning pads it, so that the bar does not flicker between training and validation
        return f"{description:{len(self.validation_description)}}"
