"""Train every ablation preset with the same budget and score them on the same test episodes.

For each seed and each preset in conf/ablations/ (plain contrastive, + conditioning, + MAML, full
method, projection baseline) this script trains with conf/default.yaml, any --config files (the recipe
the preset changes, e.g. conf/real.yaml), then the preset, and scores the last checkpoint with
``metacontrastive.evaluation`` on the fixed, seeded test episodes of every domain: the same episodes for every preset, method and seed.
Rows are ``<preset>/<method>`` (the ``pixels`` floor once); with several seeds, the table shows the
mean over seeds and a t-interval across them. Files in --out: results.json, results.csv, results.md and
accuracy_vs_shots.png for the table (``metacontrastive.reporting``), runs.json with every seed's rows,
training times and last validation accuracies. --merge adds the runs.json of earlier invocations (other
seeds, trained in another session or on another machine) to the table, so a three-seed table can be
built one seed at a time. --set KEY=VALUE overrides any option after the preset (the held-out test domain
of the real recipe, say) without a config file of its own. --tag names a change of recipe in the table
(``contrastive+coco``), so that --versus contrastive pairs it with earlier, untagged runs of the same seeds.

Usage:
    python bench/ablations.py --root data/shards --out bench/results/ablations [--steps 300] [--episodes 600]
    python bench/ablations.py --seeds 0,1,2 --methods dcmcl,prototype --presets contrastive,full
    python bench/ablations.py --root /tmp/realshards --config conf/real.yaml --set data.augment=[natural] \
        --set data.test_domains=[natural,braintest] --steps 150 --episodes 300 --seeds 0
    python bench/ablations.py --seeds 2 --merge out/seed0 --merge out/seed1 --out out/seeds012
    python bench/ablations.py --seeds "" --merge out/seed0 --merge out/seed1 --out out/seeds01  # table only
    python bench/ablations.py --seeds "" --merge out/seed0 --merge out/seed1 --versus contrastive --out out/paired
    python bench/ablations.py --presets contrastive --tag +coco --domains natural,medical,coco --merge out/seeds01 \
        --seeds 0,1 --versus contrastive --out out/coco  # a recipe change, paired with the untagged runs
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import scipy.stats

from metacontrastive.cli import MetaCLI
from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.evaluation import METHODS, Result, evaluate
from metacontrastive.module import MetaContrastiveModule
from metacontrastive.reporting import EPISODE_CI, markdown_table, mean_over_seeds, write_results

PRESETS = ("contrastive", "conditioned", "maml", "full", "projection")


def fit_args(preset: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The CLI arguments of one training run: the recipe (default + --config files), the preset's changes to it,
    this script's budget and seed, then the --set overrides (last, so they win)."""
    configs = ["-c", "conf/default.yaml"]
    for extra in args.config:
        configs += ["-c", extra]
    configs += ["-c", f"conf/ablations/{preset}.yaml"]
    overrides = [
        f"--data.domains=[{args.domains}]", f"--data.root={args.root}", f"--trainer.max_steps={args.steps}",
        f"--trainer.logger.init_args.save_dir={args.out}", f"--trainer.logger.init_args.version=seed{seed}",
        "--trainer.enable_progress_bar=false", f"--seed_everything={seed}", f"--data.seed={seed}",
    ]
    return configs + overrides + [f"--{setting}" for setting in args.set]


def train(preset: str, seed: int, args: argparse.Namespace) -> MetaCLI:
    cli = MetaCLI(MetaContrastiveModule, EpisodicDataModule, run=False, args=fit_args(preset, seed, args),
                  trainer_defaults={"inference_mode": False}, save_config_kwargs={"overwrite": True})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def paired(rows: list[tuple[int, Result]], versus: str) -> str:
    """Markdown: each preset's accuracy minus ``versus``'s, method by method, on the same test episodes and
    seeds: the mean difference ± its 95% t-interval across seeds, and the difference in each seed. Pairing
    removes what a seed does to both presets alike, so it separates presets that the table's intervals cannot."""
    acc = {(seed, r.method, r.domain, r.shots): r.acc for seed, r in rows}
    lines = ["| preset - " + versus + " | domain | shots | difference (points) | per seed |", "|---|---|---|---|---|"]
    for method, domain, shots in dict.fromkeys((m, d, k) for _, m, d, k in acc):
        preset, _, kind = method.partition("/")
        seeds = sorted(s for s, m, d, k in acc if (m, d, k) == (method, domain, shots)
                       and (s, f"{versus}/{kind}", d, k) in acc)
        if preset == versus or not kind or len(seeds) < 2:
            continue
        diff = [100 * (acc[s, method, domain, shots] - acc[s, f"{versus}/{kind}", domain, shots]) for s in seeds]
        t = scipy.stats.t.ppf(0.975, len(diff) - 1)
        each = ", ".join(f"{s}: {d:+.1f}" for s, d in zip(seeds, diff))
        lines.append(f"| {method} | {domain} | {shots} | {statistics.mean(diff):+.1f} ± "
                     f"{t * statistics.stdev(diff) / len(diff) ** 0.5:.1f} | {each} |")
    return "\n".join(lines) + "\n"


def merged(dirs: list[str]) -> tuple[list[tuple[int, Result]], list[dict]]:
    """The (seed, result) rows and training records of earlier invocations' ``runs.json`` (for --merge)."""
    rows, timings = [], []
    for d in dirs:
        path = Path(d) / "runs.json"
        if not path.is_file():
            raise SystemExit(f"--merge {d}: no runs.json there; give the --out folder of an earlier bench/ablations.py run")
        runs = json.loads(path.read_text())
        seeds = sorted({t["seed"] for t in runs["runs"]})
        for r in runs["results"]:
            seed = r.pop("seed", seeds[0] if len(seeds) == 1 else None)  # older files: one seed each, results unmarked
            if seed is None:
                raise SystemExit(f"--merge {d}: its results do not say their seed and it holds seeds {seeds}")
            rows.append((seed, Result(**r)))
        timings += runs["runs"]
    return rows, timings


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a CLI override applied last, e.g. data.test_domains=[natural,braintest] (repeatable)")
    parser.add_argument("--tag", default="", help="appended to this invocation's preset names (e.g. +coco after a "
                        "change of recipe), so that --merge and --versus pair it with the untagged runs")
    parser.add_argument("--merge", action="append", default=[], metavar="DIR",
                        help="add the runs of an earlier invocation's --out DIR (its runs.json) to the table (repeatable)")
    parser.add_argument("--versus", metavar="PRESET", help="also tabulate every preset's paired difference from this "
                        "one over seeds (paired.md)")
    args = parser.parse_args()
    for setting in args.set:
        if "=" not in setting or setting.startswith("-"):
            parser.error(f"--set {setting!r}: write KEY=VALUE, e.g. --set data.augment=[natural]")
    if "/" in args.tag:
        parser.error(f"--tag {args.tag!r}: a tag may not contain '/', which separates preset and method")
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shots, methods = [int(k) for k in args.shots.split(",")], args.methods.split(",")
    rows, timings = merged(args.merge)
    for seed in (int(s) for s in args.seeds.split(",") if s):
        for n, preset in enumerate(args.presets.split(",")):
            start = time.perf_counter()
            cli = train(preset, seed, args)
            fit_s = time.perf_counter() - start
            sets = cli.datamodule.episode_sets("test", shots, args.episodes, labelled_only=True)
            extra = ["pixels"] if n == 0 else []  # the floor needs no model: once per seed is enough
            results = evaluate(cli.model, sets, extra + methods, progress=False)  # the last weights, as last.ckpt
            label = preset + args.tag
            rows += [(seed, dataclasses.replace(r, method=r.method if r.method == "pixels" else f"{label}/{r.method}"))
                     for r in results]
            val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/acc")}
            timings.append({"seed": seed, "preset": label, "steps": args.steps, "fit_s": fit_s, "val": val})
            print(f"seed {seed} {label}: trained {args.steps} steps in {fit_s:.0f}s")
    if not rows:
        raise SystemExit("nothing to tabulate: give --seeds to train, or --merge earlier results")
    runs = [(t["seed"], t["preset"]) for t in timings]
    if len(set(runs)) < len(runs):
        raise SystemExit(f"the same (seed, preset) twice among {runs}: merge each seed's runs once")
    table = mean_over_seeds([r for _, r in rows])
    seeds = sorted({t["seed"] for t in timings})
    steps = ", ".join(map(str, sorted({t.get("steps", args.steps) for t in timings})))
    seeds_note = (f"mean over seeds {', '.join(map(str, seeds))} ± the 95% t-interval across seeds" if len(seeds) > 1
                  else f"seed {seeds[0]}, ± the 95% CI over episodes")
    note = f"{steps} training steps per preset; {seeds_note}."
    ci = "Student t across seeds" if len(seeds) > 1 else EPISODE_CI
    write_results(table, out, vars(args), sum(t["fit_s"] for t in timings), note, ci)
    (out / "runs.json").write_text(json.dumps({"runs": timings, "results": [{"seed": s, **r.as_dict()} for s, r in rows]},
                                              indent=2))
    print(note + "\n\n" + markdown_table(table, ci))
    if args.versus:
        (out / "paired.md").write_text(paired(rows, args.versus))
        print(f"Paired with {args.versus} over seeds (same episodes):\n\n" + (out / "paired.md").read_text())
    print(f"wrote {out}/results.json, results.csv, results.md, accuracy_vs_shots.png and runs.json"
          + (" and paired.md" if args.versus else ""))


if __name__ == "__main__":
    main()
