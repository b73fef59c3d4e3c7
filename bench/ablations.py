"""Train every ablation preset with the same budget and score them on the same test episodes.

For each seed and each preset in conf/ablations/ (plain contrastive, + conditioning, + MAML, full
method, projection baseline) this script trains with conf/default.yaml, any --config files (the recipe
the preset changes, e.g. conf/real.yaml), then the preset, and scores the last checkpoint with
``metacontrastive.evaluation`` on the fixed, seeded test episodes of every domain: the same episodes for every preset, method and seed.
Rows are ``<preset>/<method>`` (the ``pixels`` floor once); with several seeds, the table shows the
mean over seeds and the spread across them. Files in --out: results.json, results.csv, results.md and
accuracy_vs_shots.png for the table (``metacontrastive.reporting``), runs.json with every seed's rows,
training times and last validation accuracies.

Usage:
    python bench/ablations.py --root data/shards --out bench/results/ablations [--steps 300] [--episodes 600]
    python bench/ablations.py --seeds 0,1,2 --methods dcmcl,prototype --presets contrastive,full
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from metacontrastive.cli import MetaCLI
from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.evaluation import METHODS, Result, evaluate
from metacontrastive.module import MetaContrastiveModule
from metacontrastive.reporting import markdown_table, write_results

PRESETS = ("contrastive", "conditioned", "maml", "full", "projection")


def train(preset: str, seed: int, args: argparse.Namespace) -> MetaCLI:
    # the recipe (default + --config files), then the preset's changes to it
    configs = ["-c", "conf/default.yaml"]
    for extra in args.config:
        configs += ["-c", extra]
    configs += ["-c", f"conf/ablations/{preset}.yaml"]
    overrides = [
        f"--data.domains=[{args.domains}]", f"--data.root={args.root}", f"--trainer.max_steps={args.steps}",
        f"--trainer.logger.init_args.save_dir={args.out}", f"--trainer.logger.init_args.version=seed{seed}",
        "--trainer.enable_progress_bar=false", f"--seed_everything={seed}", f"--data.seed={seed}",
    ]
    cli = MetaCLI(MetaContrastiveModule, EpisodicDataModule, run=False, args=configs + overrides,
                  trainer_defaults={"inference_mode": False}, save_config_kwargs={"overwrite": True})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def over_seeds(rows: list[Result]) -> list[Result]:
    """One row per (method, domain, shots): the mean over seeds; the CI becomes the spread across seeds
    (1.96 std / sqrt(seeds)) when there are several, else stays the episode CI."""
    groups: dict[tuple, list[Result]] = {}
    for r in rows:
        groups.setdefault((r.method, r.domain, r.shots), []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        ci = {k: 1.96 * statistics.stdev(getattr(r, k) for r in group) / len(group) ** 0.5 for k in ("acc", "f1")}
        out.append(dataclasses.replace(group[0], acc=statistics.mean(r.acc for r in group), acc_ci95=ci["acc"],
                                       f1=statistics.mean(r.f1 for r in group), f1_ci95=ci["f1"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/shards")
    parser.add_argument("--domains", default="natural,medical")
    parser.add_argument("--out", default="bench/results/ablations")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--shots", default="5", help="comma-separated shots to test")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--methods", default="dcmcl,zero_shot,prototype,finetune", help=f"from {list(METHODS)}")
    parser.add_argument("--config", action="append", default=[], help="the recipe: config files after conf/default.yaml and before the preset (repeatable)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shots, methods = [int(k) for k in args.shots.split(",")], args.methods.split(",")
    rows, timings = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        for n, preset in enumerate(args.presets.split(",")):
            start = time.perf_counter()
            cli = train(preset, seed, args)
            fit_s = time.perf_counter() - start
            sets = cli.datamodule.episode_sets("test", shots, args.episodes, labelled_only=True)
            extra = ["pixels"] if n == 0 else []  # the floor needs no model: once per seed is enough
            results = evaluate(cli.model, sets, extra + methods, progress=False)  # the last weights, as last.ckpt
            rows += [dataclasses.replace(r, method=r.method if r.method == "pixels" else f"{preset}/{r.method}")
                     for r in results]
            val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/acc")}
            timings.append({"seed": seed, "preset": preset, "fit_s": fit_s, "val": val})
            print(f"seed {seed} {preset}: trained {args.steps} steps in {fit_s:.0f}s")
    table = over_seeds(rows)
    seeds_note = (f"mean over seeds {args.seeds} ± 1.96 std / sqrt(seeds) across seeds" if "," in args.seeds
                  else f"seed {args.seeds}, ± the 95% CI over episodes")
    note = f"{args.steps} training steps per preset; {seeds_note}."
    write_results(table, out, vars(args), sum(t["fit_s"] for t in timings), note)
    (out / "runs.json").write_text(json.dumps({"runs": timings, "results": [r.as_dict() for r in rows]}, indent=2))
    print(note + "\n\n" + markdown_table(table))
    print(f"wrote {out}/results.json, results.csv, results.md, accuracy_vs_shots.png and runs.json")


if __name__ == "__main__":
    main()
