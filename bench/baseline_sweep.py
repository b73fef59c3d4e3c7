"""The per-episode trained baselines' solver settings, swept on the validation classes: how many steps (and what
learning rate) do ``projection``, ``finetune``, ``tail_finetune`` and ``tail_film`` need?

Those four methods are most of what ``evaluate`` costs (README, Speed), and their cost is their number of Adam steps.
Fewer steps are only a speed-up if they score the same: here each ``--configs`` entry (``EvalOptions`` fields) is
scored on the study's validation episodes of the near domains, beside the defaults, and the time each took is
printed. The untrained baselines are scored on the study's untrained model (``--baseline-tail``), ``finetune`` on
the run of ``--finetune-preset`` (loaded, or trained with the study's options). Recipes are chosen on these
episodes, never on test episodes.
Printed: a table of accuracy ± 95% interval per domain and shots, and seconds per config; written: ``--out``/
baseline_sweep.md and .json.

Usage:
    python bench/baseline_sweep.py [--methods tail_finetune,tail_film] [--configs "tail_film_steps=10,tail_film_lr=2e-3;..."]
        [--finetune-preset recipe] [--seed 0] [study options: --work runs/study --episodes 50 --shots 5,20 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

from metacontrastive.evaluation import EvalOptions, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402  (the study's runs, episodes and settings)

UNTRAINED = ("projection", "tail_finetune", "tail_film")


def parse_config(text: str) -> dict:
    """``"tail_film_steps=10,tail_film_lr=2e-3"`` -> the EvalOptions fields it sets, typed as the defaults are."""
    fields = {f.name: type(getattr(EvalOptions(), f.name)) for f in dataclasses.fields(EvalOptions)}
    config = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in fields or fields[name] not in (int, float):
            raise SystemExit(f"--configs: {name!r} is not a numeric EvalOptions field; choose from "
                             f"{[n for n, t in fields.items() if t in (int, float)]}")
        config[name] = fields[name](float(value)) if fields[name] is int else float(value)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--methods", default="tail_finetune,tail_film", help=f"from {list(UNTRAINED) + ['finetune']}")
    parser.add_argument("--configs", default="", help="';'-separated configs, each ','-separated EvalOptions "
                        "field=value (the defaults are always scored first)")
    parser.add_argument("--finetune-preset", default="recipe", help="the study preset whose run finetune adapts")
    parser.add_argument("--seed", type=int, default=0, help="that run's seed")
    own, rest = parser.parse_known_args()
    if {"-h", "--help"} & set(rest):
        print(parser.format_help() + "\nand the study's options (bench/study.py):\n")  # then the study's help
    methods = own.methods.split(",")
    configs = [{}] + [parse_config(c) for c in own.configs.split(";") if c.strip()]
    sys.argv = [sys.argv[0], "--split", "val", "--presets", own.finetune_preset, "--seeds", str(own.seed),
                "--episodes", "50", "--shots", "5,20", "--out", "results/baseline_sweep", *rest]
    args = study.parse_args()
    # the runs' arguments go to LightningCLI as a list, while sys.argv holds the sweep's own: on purpose
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    near = {d.name for d in args.domains if d.near}  # the far domains have no validation classes
    models = {}  # which model -> (module, its validation episode sets), built once: each build loads the cache
    for which, wanted in (("untrained", set(methods) & set(UNTRAINED)), ("finetune", "finetune" in methods)):
        if wanted:
            module, datamodule = study.untrained(args) if which == "untrained" else \
                study.train(own.finetune_preset, own.seed, args)[:2]
            models[which] = module, [s for s in study.episode_sets(module, datamodule, args) if s.pool.split.name in near]
    rows = []
    for config in configs:
        opts = EvalOptions(**config)
        label = ", ".join(f"{k}={v:g}" for k, v in config.items()) or "defaults"
        for which, (module, sets) in models.items():
            scored = [m for m in methods if (m == "finetune") == (which == "finetune")]
            for method in scored:
                start = time.perf_counter()
                results = evaluate(module, sets, [method], opts, progress=False)
                seconds = time.perf_counter() - start
                rows += [r.as_dict() | {"config": label, "seconds": seconds} for r in results]
                print(f"{method}, {label}: {seconds:.0f}s", flush=True)
    study.write_sweep(rows, {"method": lambda r: r["method"], "config": lambda r: r["config"],
                             "seconds": lambda r: f"{r['seconds']:.0f}"},
                      f"validation classes, {args.episodes} episodes per domain and shots; finetune on "
                      f"{own.finetune_preset} seed {own.seed}", args.out, "baseline_sweep")


if __name__ == "__main__":
    main()
