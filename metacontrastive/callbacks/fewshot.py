"""FewShotEvalCallback: every N validation epochs, the evaluation protocol on a small fixed episode set."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from metacontrastive.data.tasks import FixedEpisodes
from metacontrastive.evaluation import METHODS, EvalOptions, evaluate

__all__ = ["FewShotEvalCallback"]


class FewShotEvalCallback(Callback):
    """Score few-shot methods on fixed validation episodes of every labelled validation domain.

    Logs ``fewshot/<method>/acc/<domain>`` and ``fewshot/<method>/f1/<domain>`` (with ``_<k>shot``
    appended when several shots are asked for), computed on global rank 0 with the protocol of
    ``metacontrastive.evaluation``: the same episodes every time, so the curves are comparable.

    Args:
        every_n_epochs: run after every N-th validation epoch.
        episodes: episodes per domain (and shots).
        methods: names from ``metacontrastive.evaluation.METHODS``.
        shots: support sizes to evaluate (default: the data module's ``shots``).
    """

    def __init__(self, every_n_epochs: int = 1, episodes: int = 20,
                 methods: list[str] = ["zero_shot", "prototype", "pixels", "dcmcl"],  # noqa: B006 - read-only, shown by the CLI
                 shots: list[int] | None = None) -> None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"FewShotEvalCallback: unknown methods {unknown}; choose from {list(METHODS)}")
        if every_n_epochs < 1 or episodes < 1:
            raise ValueError("FewShotEvalCallback: every_n_epochs and episodes must be at least 1")
        self.every_n_epochs, self.episodes, self.methods, self.shots = every_n_epochs, episodes, list(methods), shots
        self._sets: list[FixedEpisodes] | None = None

    def _episode_sets(self, datamodule) -> list[FixedEpisodes]:
        if self._sets is None:
            self._sets = datamodule.episode_sets("val", self.shots, self.episodes, labelled_only=True)
        return self._sets

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not trainer.is_global_zero:
            return
        several = len(self.shots or []) > 1
        for r in evaluate(pl_module, self._episode_sets(trainer.datamodule), self.methods, EvalOptions(), progress=False):
            suffix = f"_{r.shots}shot" if several else ""
            pl_module.log(f"fewshot/{r.method}/acc/{r.domain}{suffix}", r.acc, rank_zero_only=True)
            pl_module.log(f"fewshot/{r.method}/f1/{r.domain}{suffix}", r.f1, rank_zero_only=True)
