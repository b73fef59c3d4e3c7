"""Why a checkpoint adapts the way it does: what its text tower gives for the test classes, how far the inner
loop moves the class prompts, and how its image features compare with pixels.

For each test domain (the run's, or --domains), on --episodes fixed episodes of the test (or --split val)
split, it prints the mean of:

- ``h_text_cos`` / ``z_text_cos``: cosine between the class prompts of an episode, as tower features and as
  embeddings before adaptation (near 1: the text side cannot tell the classes apart);
- ``label_cos_adapted``: the same for the label embeddings after the inner steps;
- ``prompt_shift``: 1 - cosine between a label's embedding before and after the inner steps;
- ``support_loss_before`` / ``support_loss_after``: the support loss before the first and after the last step
  (against log(ways), the loss of a uniform guess);
- ``changed``: the fraction of query predictions the inner steps change;
- ``constant``: the fraction of episodes in which every query gets the same answer;
- ``image_cos``: cosine between query embeddings (near 1: collapse);
- the accuracy of ``pixels``, ``prototype``, ``zero_shot`` and ``dcmcl`` on the same episodes.

Usage:
    python bench/diagnose.py --ckpt logs/dcmcl/version_0/checkpoints/last.ckpt [--domains natural,brain] [--episodes 100]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.evaluation import Episode, evaluate
from metacontrastive.meta import adapt
from metacontrastive.metrics import mean_cosine
from metacontrastive.module import MetaContrastiveModule
from metacontrastive.runs import run_folder


def diagnose_task(module: MetaContrastiveModule, episode: Episode) -> dict[str, float]:
    view = episode.view
    with torch.no_grad():
        z_query, before = view.embed(view.query)  # (Q, D), (N, D) before any inner step
    with torch.enable_grad():
        clone = module.learner.clone()
        support_losses = adapt(clone, lambda parts: view.loss(view.support, parts)[0], module.eval_steps, first_order=True)
    with torch.no_grad():
        support_after = view.loss(view.support, clone.module)[0]
        z_query_after, after = view.embed(view.query, clone.module)
    predictions_before = view.query.texts[(z_query @ before.t()).argmax(dim=1)]
    predictions = view.query.texts[(z_query_after @ after.t()).argmax(dim=1)]
    return {
        "h_text_cos": float(mean_cosine(F.normalize(episode.h_text, dim=-1))),
        "z_text_cos": float(mean_cosine(episode.z_text)),
        "label_cos_adapted": float(mean_cosine(after)),
        "prompt_shift": float(1 - (before * after).sum(dim=1).mean()),
        "support_loss_before": float(support_losses[0]) if support_losses else float("nan"),
        "support_loss_after": float(support_after),
        "changed": float((predictions != predictions_before).float().mean()),
        "constant": float((predictions == predictions[0]).all()),
        "image_cos": float(mean_cosine(z_query_after)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--domains", default=None, help="comma-separated test domains (default: the run's)")
    parser.add_argument("--root", default=None)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--split", default="test", choices=("val", "test"), help="the split whose episodes to use")
    parser.add_argument("--out", default=None, help="write diagnose.json here (default: beside the checkpoint)")
    args = parser.parse_args()
    ckpt = Path(args.ckpt)
    config = yaml.safe_load((run_folder(ckpt) / "config.yaml").read_text())["data"]
    module = MetaContrastiveModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    domains = args.domains.split(",") if args.domains else (config.get("test_domains") or module.domains)
    datamodule = EpisodicDataModule(
        domains=module.domains, root=args.root or config["root"], **{f"{args.split}_domains": domains}, ways=args.ways,
        shots=args.shots, queries=config["queries"], image_size=config["image_size"], prompts=config.get("prompts", "one"),
        reservoir=max(config["reservoir"], args.shots + config["queries"]))
    report = {}
    for episodes in datamodule.episode_sets(args.split, count=args.episodes, labelled_only=True):
        name = episodes.split.name
        row = module.domain_row(name)
        rows = [diagnose_task(module, Episode.of(module, task, row)) for task in episodes]
        stats = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        stats["log_ways"] = math.log(episodes.shape.ways)
        results = evaluate(module, [episodes], ["pixels", "prototype", "zero_shot", "dcmcl"], progress=False)
        stats.update({f"acc_{r.method}": r.acc for r in results})
        report[name] = stats
        print(f"{name} ({episodes.shape.ways}-way {episodes.shape.shots}-shot, {len(episodes)} episodes, "
              f"conditioned on {'its own row' if row != module.model.unknown_domain else 'unknown'}):")
        for key, value in stats.items():
            print(f"  {key:>20} {value:8.3f}")
    out = Path(args.out) if args.out else run_folder(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
