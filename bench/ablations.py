"""Train every ablation preset with the same step budget and compare few-shot accuracy per domain.

For each preset in conf/ablations/ (plain contrastive, + conditioning, + MAML, full method, projection
baseline) this script trains with conf/default.yaml plus the preset, then tests the last checkpoint on
the fixed, seeded test episodes (identical for every method) and prints a table of mean accuracy with
its 95% confidence interval. It also writes ablations.csv and ablations.png to --out.

Usage:
    python bench/ablations.py --root data/shards --out bench/results/ablations [--steps 300] [--test-episodes 600]
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metacontrastive.cli import MetaCLI  # noqa: E402
from metacontrastive.data.datamodule import EpisodicDataModule  # noqa: E402
from metacontrastive.module import MetaContrastiveModule  # noqa: E402

PRESETS = ("contrastive", "conditioned", "maml", "full", "projection")


def run_preset(preset: str, args: argparse.Namespace) -> dict:
    overrides = [
        "-c", "conf/default.yaml", "-c", f"conf/ablations/{preset}.yaml",
        f"--data.domains=[{args.domains}]", f"--data.root={args.root}", f"--data.test_episodes={args.test_episodes}",
        f"--trainer.max_steps={args.steps}", f"--trainer.logger.init_args.save_dir={args.out}",
        "--trainer.enable_progress_bar=false", f"--seed_everything={args.seed}",
    ]
    cli = MetaCLI(MetaContrastiveModule, EpisodicDataModule, run=False, args=overrides,
                  trainer_defaults={"inference_mode": False}, save_config_kwargs={"overwrite": True})
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - start
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/acc")}
    (test,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="last", verbose=False)
    return {"preset": preset, "fit_s": fit_s, **val, **{k: float(v) for k, v in test.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/shards")
    parser.add_argument("--domains", default="natural,medical")
    parser.add_argument("--out", default="bench/results/ablations")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--presets", default=",".join(PRESETS))
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    domains = args.domains.split(",")

    rows = [run_preset(p, args) for p in args.presets.split(",")]

    print(f"\n5-way 5-shot 15-query, {args.steps} training steps each; test: {args.test_episodes} fixed episodes "
          f"per domain (accuracy % +- 95% CI); val: the last validation ({rows[0].get('val/episodes/' + domains[0], '?')} episodes)")
    header = f"{'preset':<12}" + "".join(f"{'test ' + d:>22}{'val ' + d:>14}" for d in domains) + f"{'fit s':>8}"
    print(header)
    for r in rows:
        cells = "".join(f"{100 * r[f'test/acc/{d}']:>14.1f} +- {100 * r[f'test/acc_ci95/{d}']:<4.1f}"
                        f"{100 * r.get(f'val/acc/{d}', float('nan')):>14.1f}" for d in domains)
        print(f"{r['preset']:<12}{cells}{r['fit_s']:>8.0f}")

    with open(Path(args.out) / "ablations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(domains)
    for i, d in enumerate(domains):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [100 * r[f"test/acc/{d}"] for r in rows], width,
               yerr=[100 * r[f"test/acc_ci95/{d}"] for r in rows], capsize=3, label=d)
    ax.set_xticks([j + width * (len(domains) - 1) / 2 for j in range(len(rows))], [r["preset"] for r in rows])
    ax.axhline(100 / 5, color="grey", linestyle="--", linewidth=1, label="chance (5-way)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"5-way 5-shot accuracy after adaptation, {args.test_episodes} episodes per domain")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(args.out) / "ablations.png", dpi=120)
    print(f"wrote {args.out}/ablations.csv and ablations.png")


if __name__ == "__main__":
    main()
