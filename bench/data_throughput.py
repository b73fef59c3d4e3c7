"""How fast the episodic loader delivers against how fast training consumes, measured in one run.

The data module and the model come from conf/default.yaml through the real CLI parser, so the episode
shape (5-way 5-shot 15-query, 4 tasks per meta-batch) and the model are the defaults. The script times:

- the training DataLoader with 0, 1 and 2 workers: meta-batches, episodes and images per second
  after the first meta-batch (time to first batch, which fills the reservoirs, is printed apart);
- the real ``MetaContrastiveModule`` training step (forward, backward, gradient clipping, AdamW) in a
  Lightning ``Trainer`` fed meta-batches prepared in advance, so that only training is timed; with
  torch's default intra-op threads and with one thread, on the quiet machine and again under load
  (``--load`` other processes multiplying matrices with torch's default thread pool, as other training
  jobs do), because on a small machine busy with other jobs the thread pool can make the step many
  times slower;

and prints the ratio loader rate / training rate against the faster of the two training rates (the
conservative ratio; target: at least 3 with 2 workers). Both run on the same machine, one after the
other; on a shared machine the numbers move with the load, which is printed too.

Usage:
    python bench/data_throughput.py [--root data/shards] [--batches 40] [--train-steps 6] [--load N]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator
from torch.utils.data import DataLoader

from metacontrastive.cli import MetaCLI
from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.manifest import available_domains
from metacontrastive.data.synthetic import write_synthetic
from metacontrastive.module import MetaContrastiveModule


def _build(root: str, extra: list[str]) -> MetaCLI:
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # this script's own flags are not the CLI's
    args = ["-c", "conf/default.yaml", f"--data.root={root}", "--trainer.logger=false", *extra]
    return MetaCLI(MetaContrastiveModule, EpisodicDataModule, run=False, args=args,
                   trainer_defaults={"inference_mode": False}, save_config_kwargs={"overwrite": True})


def _loader_rate(dm: EpisodicDataModule, batches: int) -> tuple[float, float]:
    """Seconds to the first meta-batch, and meta-batches per second after it."""
    start = time.perf_counter()
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches / (time.perf_counter() - start)
    _shutdown_workers_and_reset_iterator(loader)  # free the cores before the next measurement
    return first, rate


@contextlib.contextmanager
def _busy(processes: int):
    """``processes`` other torch jobs (matrix products, torch's default threads) for the duration of the block:
    the load of a shared machine."""
    job = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a"
    jobs = [subprocess.Popen([sys.executable, "-c", job]) for _ in range(processes)]
    try:
        yield
    finally:
        for job in jobs:
            job.kill()
            job.wait()


class _StepTimer(L.Callback):
    """Wall time of each training step (batch start to batch end, optimizer step included)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def _train_rate(cli: MetaCLI, batches: list, steps: int, warmup: int, threads: int) -> float:
    """Training steps per second of the configured module on ready meta-batches, with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    timer = _StepTimer()
    trainer = L.Trainer(accelerator=cli.trainer.accelerator, devices=1, max_steps=warmup + steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, inference_mode=False, callbacks=[timer],
                        gradient_clip_val=cli.trainer.gradient_clip_val)
    trainer.fit(cli.model, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    timed = timer.times[warmup:]
    return len(timed) / sum(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="shards root (default: write the demo shards to a temp dir)")
    parser.add_argument("--batches", type=int, default=40, help="meta-batches timed per worker setting")
    parser.add_argument("--train-steps", type=int, default=6, help="training steps timed (after one warm-up step)")
    parser.add_argument("--load", type=int, default=1,
                        help="other torch jobs beside the loaded training measurement (0: quiet only)")
    parser.add_argument("--out", default="bench/results", help="folder for the markdown table")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None or not {"natural", "medical"} <= set(available_domains(root)):
            root = tmp
            for domain in ("natural", "medical"):
                write_synthetic(domain, root)  # the `make data` defaults: 60 images per class, 32 px

        rates = {}
        for workers in (0, 1, 2):
            cli = _build(root, [f"--data.num_workers={workers}", f"--data.steps_per_epoch={args.batches + 8}"])
            cli.datamodule.setup("fit")
            rates[workers] = _loader_rate(cli.datamodule, args.batches)

        cli = _build(root, [])
        dm = cli.datamodule
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        batches = [next(it) for _ in range(1 + args.train_steps)]
        default_threads = torch.get_num_threads()
        threads = sorted({default_threads, 1}, reverse=True)
        trains = {(0, t): _train_rate(cli, batches, args.train_steps, 1, t) for t in threads}
        if args.load:
            with _busy(args.load):
                trains |= {(args.load, t): _train_rate(cli, batches, args.train_steps, 1, t) for t in threads}
        train = max(rate for (load, _), rate in trains.items() if load == 0)  # the quiet machine's

    hp = dm.hparams
    images = hp.ways * (hp.shots + hp.queries)
    print(f"machine: {os.cpu_count()} CPU cores (shared with other jobs; load average {os.getloadavg()[0]:.1f}), "
          f"torch {torch.__version__} (default {default_threads} intra-op threads), "
          f"training on {cli.trainer.strategy.root_device}")
    print(f"episode: {hp.ways}-way {hp.shots}-shot {hp.queries}-query ({images} images of {hp.image_size} px), "
          f"{hp.tasks_per_batch} tasks per meta-batch, domains {dm.domains}")
    for (load, threads), rate in trains.items():
        print(f"training (conf/default.yaml, MetaContrastiveModule.training_step + backward + AdamW, {args.train_steps} steps, "
              f"intra-op threads {threads}, {load} other torch jobs beside it): {rate:.3f} steps/s = "
              f"{rate * hp.tasks_per_batch:.2f} episodes/s")
    print(f"{'workers':>7} {'first batch s':>13} {'batches/s':>10} {'episodes/s':>11} {'images/s':>9} {'loader/train':>13}"
          f"  (against the faster training rate, {train:.3f} steps/s)")
    lines = ["# Loader rate against training rate (conf/default.yaml, CPU)", "",
             f"Load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before the run.", "",
             "| other torch jobs beside training | intra-op threads | training steps/s |", "|---|---|---|",
             *[f"| {load} | {t} | {rate:.3f} |" for (load, t), rate in trains.items()], "",
             "| loader workers | first batch s | meta-batches/s | images/s | loader / training |", "|---|---|---|---|---|"]
    for workers, (first, rate) in rates.items():
        episodes = rate * hp.tasks_per_batch
        print(f"{workers:>7} {first:>13.2f} {rate:>10.2f} {episodes:>11.1f} {episodes * images:>9.0f} {rate / train:>12.1f}x")
        lines.append(f"| {workers} | {first:.2f} | {rate:.2f} | {episodes * images:.0f} | {rate / train:.1f} |")
    for (load, threads), rate in trains.items():
        print(json.dumps({"measure": "train_rate", "other_jobs": load, "threads": threads, "steps_per_s": rate}))
    for workers, (first, rate) in rates.items():
        print(json.dumps({"measure": "loader_rate", "workers": workers, "first_batch_s": first, "batches_per_s": rate,
                          "loader_vs_train": rate / train}))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "data_throughput-cpu.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"table: {path}")


if __name__ == "__main__":
    main()
