"""What each few-shot evaluation method costs per episode, on synthetic episodes of the real feature sizes.

The episodes are built by hand as the tests build them (no data, no towers, no network): 5-way 5-shot
15-query tasks whose tower features have the sizes of the frozen pretrained towers (EfficientNet-Lite0's
1280-d pooled image features, MiniLM's 384-d sentence features), drawn around a random mean per class, so
that the methods that iterate to convergence (``linear_probe``, ``feature_probe``) do a realistic amount of
work. The model behind ``finetune`` and ``dcmcl`` is a ``MetaContrastiveModule`` with the default encoder
options whose towers are stand-ins of those output sizes (they never run: the features are given), so its
FiLM and heads have the real shapes.

Each method is warmed up on one chunk (not timed), then ``metacontrastive.evaluation.predict`` is timed on
``--episodes`` episodes in chunks of ``--chunk``, as ``evaluate`` calls it. Printed: wall and CPU
milliseconds per episode per method, their sums, and what the wall time makes for 600 episodes x the methods
x 2 domains (the headline protocol); ``--json`` adds one JSON line. On a machine busy with other jobs the wall
times move with the load (printed too), and a thread pool larger than the free cores can make them many
times slower: compare CPU times, or measure with ``--threads 1``.

Usage:
    python bench/evaluate_speed.py [--episodes 100] [--chunk 50] [--methods all] [--threads N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from unittest import mock

import torch
from torch import nn

from metacontrastive.data.episodes import Task
from metacontrastive.evaluation import Episode, EvalOptions, methods_for, predict
from metacontrastive.models.clip import EncoderConfig
from metacontrastive.module import MetaContrastiveModule


class _StandIn(nn.Module):
    """A tower that only declares its output size: the benchmark hands the model its features."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim, self.frozen = out_dim, True

    def forward(self, x):
        raise RuntimeError("the benchmark gives the model its tower features; no tower runs")


def build_module(image_dim: int, text_dim: int) -> MetaContrastiveModule:
    """A ``MetaContrastiveModule`` with the default options whose towers output ``image_dim`` / ``text_dim``."""
    torch.manual_seed(0)
    towers = lambda *args, **kwargs: (_StandIn(image_dim), _StandIn(text_dim))  # noqa: E731
    with mock.patch("metacontrastive.models.clip.build_towers", towers):
        return MetaContrastiveModule(domains=["natural", "medical"], encoder=EncoderConfig()).eval()


def build_episodes(module: MetaContrastiveModule, count: int, ways: int, shots: int, queries: int, image_size: int,
                   image_dim: int, text_dim: int, seed: int = 0) -> list[Episode]:
    """``count`` episodes of the shape, conditioned on domain row 0, with features around a mean per class."""
    g = torch.Generator().manual_seed(seed)
    support_labels = torch.arange(ways).repeat_interleave(shots)  # (S,)
    query_labels = torch.arange(ways).repeat_interleave(queries)  # (Q,)
    labels = torch.cat([support_labels, query_labels])  # (S + Q,)
    episodes = []
    for i in range(count):
        means = torch.randn(ways, image_dim, generator=g).relu()  # (N, F_I) pooled post-activation features are >= 0
        h_image = (means[labels] + torch.randn(len(labels), image_dim, generator=g)).relu()  # (S + Q, F_I)
        h_text = torch.randn(ways, text_dim, generator=g)  # (N, F_T)
        images = torch.rand(len(labels), 3, image_size, image_size, generator=g)  # (S + Q, 3, H, W)
        task = Task("natural", 0, [f"a photo of a kind {i}-{c}" for c in range(ways)], images[: len(support_labels)],
                    support_labels, images[len(support_labels):], query_labels, [f"kind {i}-{c}" for c in range(ways)])
        with torch.no_grad():  # what ``Episode.of`` computes, from the given features
            view = module.view_of(task, 0, features=(h_image, h_text))
            z_image = module.model.embed_image(h_image, 0)  # (S + Q, D)
            episodes.append(Episode(task, h_image, h_text, z_image, view.texts(), module.model.scale(), 0, module, view))
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
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = build_module(args.image_dim, args.text_dim)
    methods = methods_for(module) if args.methods == "all" else args.methods.split(",")
    episodes = build_episodes(module, max(args.episodes, args.chunk), args.ways, args.shots, args.queries,
                              args.image_size, args.image_dim, args.text_dim)[: args.episodes]
    print(f"{args.ways}-way {args.shots}-shot {args.queries}-query, features {args.image_dim}/{args.text_dim}, "
          f"{args.episodes} episodes in chunks of {args.chunk}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"  {'method':<16} {'wall ms':>8} {'cpu ms':>8}  per episode")
    ms, cpu = {}, {}
    for method in methods:
        ms[method], cpu[method] = time_method(method, episodes, args.chunk, EvalOptions())
        print(f"  {method:<16} {ms[method]:8.1f} {cpu[method]:8.1f}", flush=True)
    total = sum(ms.values())
    print(f"  {'all':<16} {total:8.1f} {sum(cpu.values()):8.1f}  600 episodes x {len(ms)} methods x 2 domains: "
          f"{1.2 * total:.0f} s wall")
    if args.json:
        print(json.dumps({"ms_per_episode": ms, "cpu_ms_per_episode": cpu, "total_s_600x2": 1.2 * total,
                          "threads": torch.get_num_threads(), "chunk": args.chunk, "episodes": args.episodes}))


if __name__ == "__main__":
    main()
