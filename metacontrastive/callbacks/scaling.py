"""ScalingCallback: throughput per device and in total, the step split into waiting for data and computing,
peak memory and world size, and the samples the data pipeline dropped; a summary at the end of ``fit``.

The step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (compute: forward, backward,
optimiser) and the wait from the previous ``on_train_batch_end`` to this ``on_train_batch_start``
(fetching the next meta-batch, plus Lightning's own bookkeeping); gaps that hold a validation run are
left out. Logged every ``log_every_n_steps`` steps as ``scaling/*``, with the data module's dropped samples
(``data/dropped/<domain>`` and ``data/dropped/<domain>/<reason>``: undecodable images, samples without an
image, caption or label, unreadable shards) when it counts them.
"""
from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["ScalingCallback", "peak_memory_gib"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator peak on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class ScalingCallback(Callback):
    """Throughput, data wait and memory of a training run (see the module docstring).

    Args:
        log_every_n_steps: steps between logged windows (default: the trainer's ``log_every_n_steps``).
        warmup_steps: first steps left out of the end-of-fit summary (start-up, caches, compilation).
    """

    def __init__(self, log_every_n_steps: int | None = None, warmup_steps: int = 2) -> None:
        self.log_every_n_steps, self.warmup_steps = log_every_n_steps, warmup_steps
        self._last_end: float | None = None
        self._start = 0.0
        self._wait: float | None = None
        self._window = self._zero()
        self._total = self._zero()

    @staticmethod
    def _zero() -> dict[str, float]:
        return {"steps": 0, "wait": 0.0, "compute": 0.0, "tasks": 0, "samples": 0}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._start = time.perf_counter()
        self._wait = self._start - self._last_end if self._last_end is not None else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the step's kernels belong to the step, not to the next wait
        now = time.perf_counter()
        self._last_end = now
        if self._wait is None:  # the first step of a fit or after validation: no clean wait to measure
            return
        step = {"steps": 1, "wait": self._wait, "compute": now - self._start, "tasks": len(batch),
                "samples": sum(t.size for t in batch)}
        for key, value in step.items():
            self._window[key] += value
            if trainer.global_step > self.warmup_steps:
                self._total[key] += value
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if self._window["steps"] >= every:
            pl_module.log_dict({**self._metrics(self._window, trainer, pl_module), **self._dropped(trainer)},
                               rank_zero_only=True)
            self._window = self._zero()

    @staticmethod
    def _dropped(trainer: L.Trainer) -> dict[str, float]:
        dropped = getattr(trainer.datamodule, "dropped", None)
        if dropped is None:
            return {}
        out = {}
        for domain, reasons in dropped().items():
            out[f"data/dropped/{domain}"] = float(sum(reasons.values()))
            out.update({f"data/dropped/{domain}/{reason}": float(n) for reason, n in reasons.items()})
        return out

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # the next gap holds this validation run, not data loading

    def _metrics(self, window: dict[str, float], trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        seconds = window["wait"] + window["compute"]
        world = trainer.world_size
        return {
            "scaling/step_ms": 1000.0 * seconds / window["steps"],
            "scaling/data_wait_frac": window["wait"] / seconds,
            "scaling/samples_per_s": window["samples"] / seconds,
            "scaling/tasks_per_s": window["tasks"] / seconds,
            "scaling/samples_per_s_total": world * window["samples"] / seconds,  # ranks run in lockstep under DDP
            "scaling/peak_mem_gib": peak_memory_gib(pl_module.device),
            "scaling/world_size": float(world),
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._total["steps"]:
            return
        m = self._metrics(self._total, trainer, pl_module)
        self.summary = m
        _print(
            f"throughput over {int(self._total['steps'])} steps on {int(m['scaling/world_size'])} device(s): "
            f"{m['scaling/step_ms']:.0f} ms/step, {m['scaling/tasks_per_s']:.1f} tasks/s and "
            f"{m['scaling/samples_per_s']:.0f} images/s per device ({m['scaling/samples_per_s_total']:.0f} in total), "
            f"{100 * m['scaling/data_wait_frac']:.0f}% of the step waiting for data, peak memory {m['scaling/peak_mem_gib']:.2f} GiB"
        )


@rank_zero_only
def _print(text: str) -> None:
    print(text)
