"""What the feature cache of frozen towers buys, measured in one run: frozen pretrained towers (EfficientNet-Lite0
+ MiniLM by default) trained through the real Trainer with and without the cache, the cache's build time,
``evaluate`` of every method on two domains, and the size of a checkpoint with and without the frozen weights.

- ``step``: ms per training meta-step (time between consecutive training batches, so loading and decoding
  count), ``--warmup`` untimed steps then ``--steps`` timed ones, uncached and cached, and their ratio;
- ``tail``: the cached meta-step with the image tower cut at each of ``--tails`` (``model.encoder.tail``: the cache
  holds the trunk's activations and the tail runs on them every step) and the inner loop on the tail's FiLM
  (``adapt_scope=tail_film``, the ``intower`` preset's), against the pooled-cache step;
- ``build``: seconds to build the cache of every split the run uses (once; later runs read it);
- ``evaluate``: seconds for ``--episodes`` test episodes x every method x the two domains, from the cache;
- ``checkpoint``: MB of the checkpoint the run writes (frozen pretrained towers named, not stored) and of the
  same state with every tensor stored.

Shards: ``--root`` (needs two labelled domains with train, val and test classes, e.g. from ``prepare imagefolder``),
or by default synthetic natural + medical demo shards written at ``--size`` px to a temporary folder.

Usage:
    python bench/feature_cache.py [--root DIR --domains a,b] [--size 128] [--steps 5] [--episodes 600]
        [--tails head,last_stage] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from metacontrastive.cli import intra_op_threads
from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.synthetic import write_synthetic
from metacontrastive.evaluation import evaluate, methods_for
from metacontrastive.models.clip import EncoderConfig
from metacontrastive.module import MetaContrastiveModule


class _StepTimer(L.Callback):
    """Wall time between consecutive training batch starts: the step with its data loading."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.starts = warmup, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, module) -> None:
        self.starts.append(time.perf_counter())

    def ms_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])][self.warmup:]
        return 1000.0 * sum(gaps) / max(len(gaps), 1)


def _module(args, tail: str = "none") -> MetaContrastiveModule:
    """The benchmark's model; with a ``tail`` the tower is cut there and the inner loop adapts the tail's FiLM."""
    torch.manual_seed(0)
    encoder = EncoderConfig(image_tower=args.tower, text_tower="minilm", freeze_image=True, freeze_text=True,
                            image_size=args.size, tail=tail)
    scope = {"adapt_scope": "tail_film"} if tail != "none" else {}
    return MetaContrastiveModule(domains=args.domains, encoder=encoder, meta_engine=args.engine, **scope)


def _datamodule(args, root: str, cache: str) -> EpisodicDataModule:
    return EpisodicDataModule(domains=args.domains, root=root, ways=4, shots=5, queries=10, tasks_per_batch=4,
                              steps_per_epoch=args.warmup + args.steps, val_episodes=2, feature_cache=cache)


def _fit(args, root: str, cache: str, logs: Path, tail: str = "none") -> tuple[float, float, MetaContrastiveModule, EpisodicDataModule, Path]:
    """Train warmup + steps meta-steps; (ms per step, seconds the cache took to build, module, data, checkpoint)."""
    module, dm = _module(args, tail), _datamodule(args, root, cache)
    timer = _StepTimer(args.warmup)
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
                        inference_mode=False, callbacks=[timer], enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, dm)
    setup_s = timer.starts[0] - start  # what happens before the first step: the cache build, on a cold cache
    ckpt = logs / f"{cache}-{tail}.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=False)
    return timer.ms_per_step(), setup_s, module, dm, ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="shards root (default: synthetic demo shards in a temporary folder)")
    parser.add_argument("--domains", default="natural,medical", help="two labelled domains under --root")
    parser.add_argument("--tower", default="efficientnet-lite0", help="the frozen image tower")
    parser.add_argument("--size", type=int, default=128, help="image side, decoded and run at")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--episodes", type=int, default=600, help="evaluation episodes per domain")
    parser.add_argument("--engine", default="func", choices=("func", "l2l"), help="meta engine (conf/pretrained.yaml's: func)")
    parser.add_argument("--tails", default="head,last_stage", help="cuts of the tower whose cached step is timed too ('' for none)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the available cores)")
    parser.add_argument("--out", default="bench/results", help="folder for the markdown table")
    args = parser.parse_args()
    args.domains = [d.strip() for d in args.domains.split(",")]
    torch.set_num_threads(intra_op_threads(args.threads, 0))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = str(Path(tmp) / "shards")
            for domain in args.domains:
                write_synthetic(domain, root, per_class=30, size=args.size, seed=0)
        logs = Path(tmp)
        plain_ms, _, _, _, plain_ckpt = _fit(args, root, "off", logs)
        cold_ms, build_s, _, _, _ = _fit(args, root, "on", logs)  # builds the cache before its first step
        cached_ms, warm_s, module, dm, ckpt = _fit(args, root, "on", logs)  # reads the cache built above
        # the untimed warm-up steps come after the trunk cache's build, so the build is not in the step time
        tail_ms = {tail: _fit(args, root, "on", logs, tail)[0] for tail in filter(None, args.tails.split(","))}
        dm.setup("test")
        dm.attach(module.model.frozen_image_tower(module.towers_adapt), progress=False)
        sets = dm.episode_sets("test", [5], args.episodes, labelled_only=True)
        start = time.perf_counter()
        results = evaluate(module, sets, methods_for(module), progress=True)
        evaluate_s = time.perf_counter() - start
        full_mb = sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20
        report = {
            "tower": args.tower, "size": args.size, "threads": torch.get_num_threads(),
            "step_ms_uncached": round(plain_ms, 1), "step_ms_cached": round(cached_ms, 1),
            "speedup": round(plain_ms / cached_ms, 1), "cache_build_s": round(build_s - warm_s, 1),
            "step_ms_cached_tail": {t: round(ms, 1) for t, ms in tail_ms.items()},
            "tail_over_pooled": {t: round(ms / cached_ms, 2) for t, ms in tail_ms.items()},
            "evaluate_s": round(evaluate_s, 1), "evaluate_episodes": sum(len(s) for s in sets), "methods": len(methods_for(module)),
            "ms_per_episode": {r.method: round(r.ms_per_episode, 2) for r in results if r.domain == args.domains[0]},
            "checkpoint_mb": round(ckpt.stat().st_size / 2**20, 1), "checkpoint_mb_uncached_run": round(plain_ckpt.stat().st_size / 2**20, 1),
            "state_dict_mb_all_tensors": round(full_mb, 1),
        }
    print(json.dumps(report))
    lines = ["| measurement | value |", "|---|---|",
             f"| meta-step, uncached (ms) | {report['step_ms_uncached']} |",
             f"| meta-step, cached (ms) | {report['step_ms_cached']} |",
             f"| speed-up | {report['speedup']}x |",
             *[f"| meta-step, cached trunk, tail={t}, inner loop on its FiLM (ms) | {ms} ({report['tail_over_pooled'][t]}x the pooled-cache step) |"
               for t, ms in report["step_ms_cached_tail"].items()],
             f"| cache build, every split (s) | {report['cache_build_s']} |",
             f"| evaluate: {report['evaluate_episodes']} episodes x {report['methods']} methods (s) | {report['evaluate_s']} |",
             f"| checkpoint (MB) | {report['checkpoint_mb']} (all tensors: {report['state_dict_mb_all_tensors']}) |"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_cache.md").write_text(
        f"Frozen {args.tower} + MiniLM at {args.size} px, 4 tasks of 4-way (5 + 10), {report['threads']} threads\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
