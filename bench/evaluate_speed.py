"""What each few-shot evaluation method costs per episode, on synthetic episodes of the real feature sizes.

The episodes are built by hand as the tests build them (no data, no network): 5-way 5-shot 15-query tasks whose
tower features have the sizes of the frozen pretrained towers (MiniLM's 384-d sentence features; EfficientNet-Lite0
cut before its head conv, ``--tail head``: 320 x 4 x 4 trunk activations of 128-px images, or its 1280-d pooled
features, ``--tail none``), drawn around a random mean per class, so that the methods that iterate to convergence
(``linear_probe``, ``feature_probe``) do a realistic amount of work. The model behind ``finetune``, ``dcmcl`` and the
in-tower methods is a ``MetaContrastiveModule`` with the study's ``intower`` options (``--tail none``: the default
encoder options) on the real EfficientNet-Lite0 (its trunk never runs: the activations are given) and a stand-in
text tower of MiniLM's size, so its tail, FiLM and heads have the real shapes.

Each method is warmed up on one chunk (not timed), then ``metacontrastive.evaluation.predict`` is timed on
``--episodes`` episodes in chunks of ``--chunk``, as ``evaluate`` calls it. Printed: wall and CPU
milliseconds per episode per method, their sums, and what the wall time makes for 600 episodes x the methods
x 2 domains (the headline protocol); ``--json`` writes them to a file. ``--before`` reads such a file of an earlier
implementation (``docs/speed/evaluate_before.json``: this script run on the commit before the in-tower matmul path,
on the 2-core development CPU) and prints each method's speed-up against it. On a machine busy with other jobs the wall
times move with the load (printed too), and a thread pool larger than the free cores can make them many
times slower: compare CPU times, or measure with ``--threads 1``.

Usage:
    python bench/evaluate_speed.py [--episodes 100] [--chunk 50] [--methods all] [--tail head] [--threads N]
        [--json out.json] [--before docs/speed/evaluate_before.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from metacontrastive.data.episodes import Task
from metacontrastive.evaluation import Episode, EvalOptions, methods_for, predict
from metacontrastive.models.clip import EncoderConfig
from metacontrastive.models.towers import build_towers
from metacontrastive.module import MetaContrastiveModule


class _StandIn(nn.Module):
    """A tower that only declares its output size: the benchmark hands the model its features."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim, self.frozen = out_dim, True

    def forward(self, x):
        raise RuntimeError("the benchmark gives the model its tower features; no tower runs")


# the study's intower preset (conf/pretrained.yaml, then conf/study/intower.yaml), as far as the encoder and the
# inner loop go
INTOWER = dict(image_tower="efficientnet-lite0", freeze_image=True, freeze_text=True, image_size=128, tail="head",
               residual_image_head=True, center_support=True, embed_dim=1280)


def build_module(image_dim: int, text_dim: int, tail: str) -> MetaContrastiveModule:
    """A ``MetaContrastiveModule`` whose text tower outputs ``text_dim``: with ``tail`` ``head`` or ``last_stage``,
    the study's intower model on EfficientNet-Lite0 cut there; with ``none``, the default options and an image
    tower that outputs ``image_dim``."""
    torch.manual_seed(0)
    if tail == "none":
        towers = lambda *args, **kwargs: (_StandIn(image_dim), _StandIn(text_dim))  # noqa: E731
        encoder, options = EncoderConfig(), {}
    else:
        towers = lambda image_tower, text_tower, *args: (build_towers(image_tower, "tiny", *args)[0], _StandIn(text_dim))  # noqa: E731
        encoder = EncoderConfig(**{**INTOWER, "tail": tail})
        options = dict(adapt_scope="tail_film", align_weight=0.0, meta_engine="func", prototype_prompts=10.0)
    with mock.patch("metacontrastive.models.clip.build_towers", towers):
        return MetaContrastiveModule(domains=["natural", "medical"], encoder=encoder, **options).eval()


def build_episodes(module: MetaContrastiveModule, count: int, ways: int, shots: int, queries: int, image_size: int,
                   image_dim: int, text_dim: int, seed: int = 0) -> list[Episode]:
    """``count`` episodes of the shape, conditioned on domain row 0, with features around a mean per class (trunk
    activations of EfficientNet-Lite at ``image_size`` px for a model with a tail)."""
    tail = module.model.image_tail
    if tail is not None:  # a cut tower: the features are the trunk's activations (C, h, w), 1/32 of the image side
        image_dim = (tail.in_channels, image_size // 32, image_size // 32)
    else:
        image_dim = (image_dim,)
    g = torch.Generator().manual_seed(seed)
    support_labels = torch.arange(ways).repeat_interleave(shots)  # (S,)
    query_labels = torch.arange(ways).repeat_interleave(queries)  # (Q,)
    labels = torch.cat([support_labels, query_labels])  # (S + Q,)
    episodes = []
    for i in range(count):
        means = torch.randn(ways, *image_dim, generator=g).relu()  # (N, ...) post-activation features are >= 0
        h_image = (means[labels] + torch.randn(len(labels), *image_dim, generator=g)).relu()  # (S + Q, ...)
        h_text = torch.randn(ways, text_dim, generator=g)  # (N, F_T)
        images = torch.rand(len(labels), 3, image_size, image_size, generator=g)  # (S + Q, 3, H, W)
        task = Task("natural", 0, [f"a photo of a kind {i}-{c}" for c in range(ways)], images[: len(support_labels)],
                    support_labels, images[len(support_labels):], query_labels, [f"kind {i}-{c}" for c in range(ways)])
        with torch.no_grad():  # what ``Episode.of`` computes, from the given features
            view = module.view_of(task, 0, features=(h_image, h_text))
            h_model = view.features()[0]  # (S + Q, F_I) what FiLM and the heads read
            pooled = view.tower_pooled() if tail is not None else h_image  # (S + Q, F_I) the tower's own
            z_image = module.model.embed_image(h_model, 0)  # (S + Q, D)
            episodes.append(Episode(task, pooled, h_text, z_image, view.texts(), module.model.scale(), 0, module, view,
                                    h_model, h_image if tail is not None else None))
    return episodes


def time_method(method: str, episodes: list[Episode], chunk: int, opts: EvalOptions) -> tuple[float, float]:
    """Wall and CPU (this process, all threads) milliseconds per episode of ``predict(method, ...)`` over
    ``episodes`` in chunks, after one warm-up chunk."""
    predict(method, episodes[:chunk], opts)
    wall, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(episodes), chunk):
        predict(method, episodes[first:first + chunk], opts)
    return 1000.0 * (time.perf_counter() - wall) / len(episodes), 1000.0 * (time.process_time() - cpu) / len(episodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=100, help="timed episodes per method")
    parser.add_argument("--chunk", type=int, default=50, help="episodes per predict call (evaluate's chunk)")
    parser.add_argument("--methods", default="all", help="comma-separated method names, or all (every method the model can run)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=128, help="side of the raw images (only pixels reads them)")
    parser.add_argument("--image-dim", type=int, default=1280, help="image tower features (EfficientNet-Lite0: 1280)")
    parser.add_argument("--text-dim", type=int, default=384, help="text tower features (MiniLM: 384)")
    parser.add_argument("--tail", default="head", choices=("head", "last_stage", "none"),
                        help="where the model's image tower is cut (none: pooled features, no in-tower methods)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--before", type=Path, default=None, help="a --json file of an earlier implementation: print "
                        "each method's speed-up against it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = build_module(args.image_dim, args.text_dim, args.tail)
    methods = methods_for(module) if args.methods == "all" else args.methods.split(",")
    episodes = build_episodes(module, max(args.episodes, args.chunk), args.ways, args.shots, args.queries,
                              args.image_size, args.image_dim, args.text_dim)[: args.episodes]
    before = json.loads(args.before.read_text()) if args.before else None
    print(f"{args.ways}-way {args.shots}-shot {args.queries}-query, tail {args.tail}, text features {args.text_dim}, "
          f"{args.episodes} episodes in chunks of {args.chunk}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    ratio = lambda new, old: f"{old / new:7.2f}x" if old else ""  # noqa: E731  (speed-up: old time / new time)
    print(f"  {'method':<16} {'wall ms':>8} {'cpu ms':>8}" + (f" {'before':>8} {'speed-up':>8}" if before else "")
          + "  per episode")
    ms, cpu = {}, {}
    for method in methods:
        ms[method], cpu[method] = time_method(method, episodes, args.chunk, EvalOptions())
        old = before["ms_per_episode"].get(method) if before else None
        print(f"  {method:<16} {ms[method]:8.1f} {cpu[method]:8.1f}"
              + (f" {old or float('nan'):8.1f} {ratio(ms[method], old):>8}" if before else ""), flush=True)
    total = sum(ms.values())
    old_total = sum(before["ms_per_episode"].get(m, 0.0) for m in ms) if before else None
    print(f"  {'all':<16} {total:8.1f} {sum(cpu.values()):8.1f}" + (f" {old_total:8.1f} {ratio(total, old_total):>8}"
          if before else "") + f"  600 episodes x {len(ms)} methods x 2 domains: {1.2 * total:.0f} s wall"
          + (f" (before: {1.2 * old_total:.0f} s)" if before else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"ms_per_episode": ms, "cpu_ms_per_episode": cpu, "total_s_600x2": 1.2 * total,
                                         "threads": torch.get_num_threads(), "chunk": args.chunk, "tail": args.tail,
                                         "episodes": args.episodes, "shots": args.shots}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
