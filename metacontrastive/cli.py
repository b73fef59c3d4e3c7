"""The command line: ``python -m metacontrastive {fit,validate,test} ...`` (LightningCLI) and
``python -m metacontrastive evaluate ...`` (the few-shot protocol on a checkpoint).
(``python -m metacontrastive prepare ...``, the shard converters, is dispatched in ``__main__.py``.)

The model's ``domains`` are linked to the data module's, so a run names its domains once:
``--data.domains=[natural,medical]``. The checkpoint a command names is checked before anything is built
(``metacontrastive.runs.check_checkpoint``), and the output holds the project's own warnings, not the two
of Lightning's that it cannot act on (``quiet_library_warnings``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from metacontrastive.callbacks.progress import StepProgressBar
from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.manifest import ROOT
from metacontrastive.data.tasks import VariableShape
from metacontrastive.errors import BadInput
from metacontrastive.evaluation import METHODS, EvalOptions, evaluate, methods_for
from metacontrastive.module import MetaContrastiveModule
from metacontrastive.reporting import log_to_tensorboard, markdown_table, write_results
from metacontrastive.runs import check_checkpoint, check_ckpt_path, resolve_run, run_folder

__all__ = ["MetaCLI", "available_cores", "evaluate_main", "intra_op_threads", "main", "quiet_library_warnings"]


def quiet_library_warnings() -> None:
    """Ignore the warnings of Lightning that this project cannot act on, by their message, and nothing else:

    - Lightning 2.6's ``utilities/_pytree.py`` builds torch's ``LeafSpec``, which torch 2.14 deprecates
      (a FutureWarning on every fit; Lightning's to change, not ours).
    - Lightning warns of any ``IterableDataset`` with a ``__len__`` that its length may be wrong with loader
      workers. ``MetaBatchStream`` (``data/tasks.py``) splits its batches among the workers, so its length is
      exact, and the progress bar and ``max_steps`` epochs need it.
    - Lightning counts the modules in eval mode when training starts: a frozen tower (``Tower.freeze``) stays in
      eval mode on purpose (its BatchNorm statistics and dropout fixed), so every run on pretrained towers would
      print it.
    """
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined",
                            module=r"lightning\.pytorch\.")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training",
                            module=r"lightning\.pytorch\.")


def available_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup (container) CPU quota, read from
    ``cpu_max`` (cgroup v2: "<quota> <period>" or "max <period>")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def intra_op_threads(requested: int | None, workers: int, local_ranks: int = 1) -> int:
    """torch's intra-op threads for a training process: ``requested``, else the available cores shared among
    the local ranks, less one per loader worker (which decode images at the same time), at least 1. torch's
    own default (every core) oversubscribes a small or busy machine, where a step can get several times slower."""
    if requested is not None:
        return requested
    return max(1, available_cores() // max(local_ranks, 1) - workers)


class MetaCLI(LightningCLI):
    """LightningCLI with the data module's domains linked into the model, and run folders that a later
    command can name or resume (``--run``, ``--ckpt_path last``: see ``metacontrastive.runs``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.domains", "model.domains")
        parser.add_argument("--run", type=Optional[str], default=None,
                            help="the run folder: a name under <save_dir>/<name>/ or a path (default: the next version_N)")
        parser.add_argument("--threads", type=Optional[int], default=None,
                            help="torch intra-op threads (default: the available cores per local rank less the loader "
                                 "workers, at least 1; OMP_NUM_THREADS, when set, is kept)")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads a --ckpt_path file here, for the model's hyperparameters: a bad one is one line
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            config = self.config[self.subcommand]
            resolve_run(config, self.subcommand)
            if config.get("threads") is not None or "OMP_NUM_THREADS" not in os.environ:
                workers = config["data"].get("num_workers", 0) if self.subcommand == "fit" else 0
                torch.set_num_threads(intra_op_threads(config.get("threads"), workers,
                                                       int(os.environ.get("LOCAL_WORLD_SIZE", 1))))

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        # Lightning's default bar (Rich, when installed) reads a run bounded by max_steps as "Epoch 2/-2"
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if (_RICH_AVAILABLE and config.get("enable_progress_bar") is not False
                and not any(isinstance(c, ProgressBar) for c in [*given, *callbacks])):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def main(args: list[str] | None = None) -> MetaCLI:
    """Run LightningCLI on ``args`` (default: the command line)."""
    quiet_library_warnings()
    return MetaCLI(
        MetaContrastiveModule,
        EpisodicDataModule,
        trainer_defaults={"inference_mode": False},  # evaluation adapts on support sets: it needs autograd
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"need comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text!r}")
    return values


def _evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m metacontrastive evaluate",
        description="Score every few-shot method on the same seeded test episodes of a checkpoint's domains. "
                    "Data settings (shard root, image size, evaluation seed) come from the run's config.yaml "
                    "beside the checkpoint unless given here.")
    p.add_argument("--ckpt", required=True, help="a checkpoint, e.g. logs/dcmcl/version_0/checkpoints/last.ckpt")
    p.add_argument("--domains", type=_names, default=None,
                   help="comma-separated domains to test (default: the run's test domains); a domain the model "
                        "was not trained on is conditioned on the unknown embedding")
    p.add_argument("--holdout-domain", action="append", default=[], metavar="NAME",
                   help="a domain evaluated through the unknown embedding even if the model knows it (repeatable)")
    p.add_argument("--ways", type=int, default=5, help="classes per episode, capped per domain at its test classes (5)")
    p.add_argument("--shots", type=_ints, default=[1, 5], help="comma-separated support sizes per class (1,5)")
    p.add_argument("--queries", type=int, default=15, help="queries per class (15)")
    p.add_argument("--episodes", type=int, default=600, help="episodes per domain and shots (600)")
    p.add_argument("--methods", type=_names, default=["all"], help=f"comma-separated, from {list(METHODS)}, or all")
    p.add_argument("--inner-steps", type=int, default=None, help="dcmcl inner steps (default: the model's eval_inner_steps)")
    p.add_argument("--root", default=None, help="shards root (default: the run's data.root)")
    p.add_argument("--seed", type=int, default=None, help="episode seed (default: the run's data.eval_seed)")
    p.add_argument("--out", default=None, help="folder for the results (default: the run folder)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    p.add_argument("--chunk", type=int, default=50, help="episodes scored together (memory vs speed)")
    p.add_argument("--variable", action="store_true",
                   help="also variable-way, variable-shot episodes per domain (Meta-Dataset's sampler: 2 to --ways "
                        "classes, imbalanced supports of up to 20 per class and 100 in all, up to --queries per class)")
    p.add_argument("--feature-cache", choices=("auto", "on", "off"), default=None,
                   help="the frozen image tower's feature cache (default: the run's data.feature_cache)")
    return p


def evaluate_main(argv: list[str] | None = None) -> list:
    """``python -m metacontrastive evaluate``: the few-shot table of a checkpoint, written beside it."""
    args = _evaluate_parser().parse_args(argv)
    quiet_library_warnings()
    methods = args.methods
    unknown = [m for m in methods if m not in METHODS and m != "all"]
    if unknown:
        raise BadInput(f"evaluate: unknown methods {unknown}; choose from {list(METHODS)} or all")
    ckpt = check_checkpoint(args.ckpt)  # before the model and the data are built
    run = run_folder(ckpt)
    config_file = run / "config.yaml"
    data = (yaml.safe_load(config_file.read_text()) or {}).get("data", {}) if config_file.exists() else {}
    if not data:
        print(f"evaluate: no config.yaml beside {ckpt}; using the data module's defaults and --root")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    module = MetaContrastiveModule.load_from_checkpoint(ckpt, map_location=device)
    if methods == ["all"]:
        methods = methods_for(module)
        if len(methods) < len(METHODS):
            print(f"evaluate: {', '.join(m for m in METHODS if m not in methods)} left out: they adapt inside the image "
                  "tower, and this model's is not cut (model.encoder.tail)")
    domains = list(dict.fromkeys((args.domains or data.get("test_domains") or module.domains) + args.holdout_domain))
    shots, queries = args.shots, args.queries
    datamodule = EpisodicDataModule(
        domains=module.domains, root=args.root or data.get("root", ROOT), urls=data.get("urls"),
        test_domains=domains, ways=args.ways, shots=max(shots), queries=queries,
        image_size=data.get("image_size"), reservoir=max(shots) + queries, eval_pool=data.get("eval_pool"),
        eval_seed=args.seed if args.seed is not None else data.get("eval_seed", 0),
        strict_decode=data.get("strict_decode", False), prompts=data.get("prompts", "one"),
        feature_cache=args.feature_cache or data.get("feature_cache", "auto"), feature_dir=data.get("feature_dir"),
    )
    skipped = [split.name for split in datamodule.split("test") if not split.labelled]
    if skipped:
        print(f"evaluate: skipping caption-only domains {skipped} (few-shot classification needs labels)")
    # the image size of the tower, and its cached features (built here for test splits the run never cached)
    datamodule.attach(module.model.frozen_image_tower(module.towers_adapt), device)
    variable = VariableShape(max_ways=max(args.ways, 2), queries=queries) if args.variable else None
    sets = datamodule.episode_sets("test", shots, args.episodes, labelled_only=True, variable=variable)
    if not sets:
        raise BadInput(f"evaluate: no labelled test domain among {domains}; pass --domains with one that has "
                       f"class labels")
    options = EvalOptions(inner_steps=args.inner_steps)
    start = time.perf_counter()
    results = evaluate(module, sets, methods, options, holdout=args.holdout_domain, chunk=args.chunk)
    seconds = time.perf_counter() - start
    out = Path(args.out) if args.out else run
    settings = {"checkpoint": str(ckpt), "domains": domains, "holdout": args.holdout_domain, "ways": args.ways,
                "shots": shots, "variable": dataclasses.asdict(variable) if variable else None, "queries": queries,
                "episodes": args.episodes, "methods": methods, "feature_cache": datamodule.hparams.feature_cache,
                "eval_seed": datamodule.hparams.eval_seed, "root": datamodule.hparams.root, "device": str(device),
                "dcmcl_inner_steps": module.eval_steps if args.inner_steps is None else args.inner_steps,
                "options": dataclasses.asdict(options)}
    paths = write_results(results, out, settings, seconds)
    log_to_tensorboard(results, out)
    print(markdown_table(results))
    print(f"evaluated {sum(len(s) for s in sets)} episodes x {len(methods)} methods in {seconds:.1f}s; wrote "
          + ", ".join(str(p) for p in paths) + f" and TensorBoard events in {out}")
    return results
