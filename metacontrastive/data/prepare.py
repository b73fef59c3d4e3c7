"""``python -m metacontrastive prepare CONVERTER ...``: write a domain's shards and manifest.

Converters:
    synthetic: the deterministic demo domains (``metacontrastive.data.synthetic``).
"""
from __future__ import annotations

import argparse
import time

from metacontrastive.data.synthetic import GENERATORS, write_synthetic

__all__ = ["build_parser", "main"]


def _fractions(text: str) -> tuple[float, float, float]:
    parts = tuple(float(x) for x in text.split(","))
    if len(parts) != 3 or abs(sum(parts) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"--class-split needs three fractions that sum to 1, got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m metacontrastive prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="converter", required=True)
    syn = sub.add_parser("synthetic", help="deterministic demo shards")
    syn.add_argument("--domain", required=True, help=f"comma-separated, from {sorted(GENERATORS)}")
    syn.add_argument("--out", default="data/shards", help="shards root (default: data/shards)")
    syn.add_argument("--per-class", type=int, default=60, help="images per class")
    syn.add_argument("--size", type=int, default=32, help="image side in pixels")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--class-split", type=_fractions, default=(0.6, 0.2, 0.2), help="train,val,test class fractions")
    syn.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    syn.add_argument("--overwrite", action="store_true", help="replace existing shards of the domain")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.converter == "synthetic":
        for domain in args.domain.split(","):
            start = time.perf_counter()
            path = write_synthetic(domain, args.out, args.per_class, args.size, args.seed, args.class_split,
                                   args.maxcount, args.overwrite)
            print(f"{domain}: wrote {path} in {time.perf_counter() - start:.1f}s")
