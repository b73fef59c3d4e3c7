"""DCMCL's test-time inner loop of a trained study run, swept on the validation classes: does adapting longer, or
with a larger step, help where one meta-learned step changed nothing?

The run is the study's (``bench/study.py``): its ``last.ckpt`` is loaded, or, if it has none, the run is trained
with the study's options (``--steps``: training steps). Its ``dcmcl`` is scored on the study's validation episodes
of the near domains for every ``--inner-steps`` x ``--lr-scale`` (the inner learning rate the run was trained with,
times the scale), beside its own un-adapted ``prototype``, which one inner step was measured to equal. Recipes are
chosen on these episodes, never on test episodes.
Printed: a table of accuracy ± 95% interval per domain and shots; written: ``--out``/inner_sweep.md and .json.

Usage:
    python bench/inner_sweep.py [--preset intower] [--seed 0] [--inner-steps 1,5,20] [--lr-scale 1,10,100] [--episodes 50]
        [--shots 5,20] [study options: --work runs/study --domains ...]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from metacontrastive.evaluation import EvalOptions, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402  (the study's runs, episodes and settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--preset", default="intower", help="the study preset whose run is swept")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed")
    parser.add_argument("--inner-steps", default="1,5,20", help="comma-separated test-time inner steps")
    parser.add_argument("--lr-scale", default="1,10,100", help="comma-separated factors on the run's inner learning rate")
    own, rest = parser.parse_known_args()
    if {"-h", "--help"} & set(rest):
        print(parser.format_help() + "\nand the study's options (bench/study.py):\n")  # then the study's help
    sys.argv = [sys.argv[0], "--split", "val", "--presets", own.preset, "--seeds", str(own.seed),
                "--episodes", "50", "--shots", "5,20", "--out", "results/inner_sweep", *rest]
    args = study.parse_args()
    # the run's arguments go to LightningCLI as a list, while sys.argv holds the sweep's own: on purpose
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    module, datamodule, _ = study.train(own.preset, own.seed, args)
    near = {d.name for d in args.domains if d.near}  # the far domains have no validation classes
    sets = [s for s in study.episode_sets(module, datamodule, args) if s.pool.split.name in near]
    base_lr = module.learner.lr
    rows = [r.as_dict() | {"steps": 0, "lr_scale": 0.0} for r in evaluate(module, sets, ["prototype"], progress=False)]
    for scale in [float(s) for s in own.lr_scale.split(",")]:
        module.learner.lr = base_lr * scale
        for steps in [int(s) for s in own.inner_steps.split(",")]:
            start = time.perf_counter()
            results = evaluate(module, sets, ["dcmcl"], EvalOptions(inner_steps=steps), progress=False)
            rows += [r.as_dict() | {"steps": steps, "lr_scale": scale} for r in results]
            print(f"dcmcl, {steps} step(s), inner lr x{scale:g}: {time.perf_counter() - start:.0f}s", flush=True)
    module.learner.lr = base_lr
    study.write_sweep(rows, {"method": lambda r: r["method"], "steps": lambda r: str(r["steps"] or "-"),
                             "inner lr x": lambda r: f"{r['lr_scale']:g}" if r["lr_scale"] else "-"},
                      f"{own.preset} seed {own.seed}, validation classes, {args.episodes} episodes, inner lr of the run "
                      f"{base_lr:g}", args.out, "inner_sweep")

if __name__ == "__main__":
    main()
