"""The cross-domain study (``make study``): does DCMCL help few-shot adaptation on pretrained towers, against what
people use today, on the near domains and on the far ones?

One command, from the raw folders of ``--data`` (``../shared/data``, see its README) to a table and plots, on the
far-domain protocol of BSCD-FSL (Guo et al. 2020):

1. **convert** each domain at ``--size`` px: the near domains (``natural`` CIFAR-10, ``aerial`` AID, ``textures``
   DTD) with class-disjoint train / val / test splits, trained on; the far domains (``skin`` HAM10000, 7 classes;
   ``mri``, the brain MRI ``Testing/`` folder, 4 classes) test-only with all their classes: no model trains on them,
   they are adapted from the ``unknown`` embedding (and, for ``dcmcl``, also from the blend of the known ones);
2. **cache** the frozen image tower's features of every split once (``metacontrastive.data.features``; the
   trunk's activations for a cut tower);
3. **score the untrained methods once** (pixels, the two feature baselines, the projection baseline and the two
   baselines that adapt inside the tower, ``tail_finetune`` and ``tail_film``) on the pretrained towers, cut at
   ``--baseline-tail``;
4. **train** every preset of ``--presets`` for every seed of ``--seeds`` on the frozen towers
   (``conf/pretrained.yaml``, then ``conf/ablations/<preset>.yaml``, then ``conf/study/<preset>.yaml`` if present;
   ``intower`` adapts the FiLM of the tower's head inside its inner loop) and score the methods that read its
   weights on the same seeded episodes: ``--episodes`` per domain and shots (1, 5, 20), ``--eval-ways`` classes
   (capped per domain: natural and textures have 2 test classes, MRI 4), 15 queries; ``--split val`` scores the
   validation classes of the training domains instead, to choose a recipe;
5. **report**: ``results.md`` (mean over seeds ± the 95% Student-t interval across seeds; a method that trains
   nothing keeps its episode interval), ``verdict.md``: each method of ``--decide`` against the best baseline of
   each domain and shots, paired over seeds (2-way cells flagged: they weigh less), ``results.json`` and plots
   (accuracy against shots per domain; the paired differences), and ``f1.md``: the second seed paper's claim, the
   projection's macro-F1 against the frozen features' own baselines. Training and evaluation times are in
   ``results.json``.

The study is a grid of independent jobs (the untrained methods on each domain; each preset for each seed), run in
``--jobs`` processes here or submitted through submitit (``--launcher slurm``). Everything that can be reused is:
converted shards and their manifests (``--work``), the feature cache (beside the shards), trained runs
(``--work``/logs/<preset>/seed<N>-<hash of what its training read>: a run whose ``last.ckpt`` exists is
evaluated, not retrained; other training settings or an edited preset make another run) and the scores of finished jobs
(``--work``/scores, per settings), so a killed study resumes at the jobs it had not finished; ``--retrain`` redoes
both.

Usage:
    python bench/study.py [--data ../shared/data] [--work runs/study] [--out results/study] [--seeds 0,1,2]
        [--presets recipe,intower,...] [--steps 300] [--episodes 600] [--shots 1,5,20] [--split test]
        [--variable] [--domains natural,aerial,textures,skin,mri]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import random
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import scipy.stats
import torch

from metacontrastive.cli import MetaCLI, available_cores, quiet_library_warnings
from metacontrastive.data import readers
from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.manifest import MANIFEST
from metacontrastive.data.prepare import write_domain
from metacontrastive.data.tasks import VariableShape
from metacontrastive.evaluation import METHODS, EvalOptions, Result, evaluate
from metacontrastive.module import MetaContrastiveModule
from metacontrastive.reporting import markdown_table, mean_over_seeds, plot_accuracy_vs_shots, write_results

# what the local launcher's process server imports once for every job (the slow imports above)
PRELOAD = ["matplotlib.pyplot", "scipy.stats", "torch", "metacontrastive.cli", "metacontrastive.data.datamodule",
           "metacontrastive.data.prepare", "metacontrastive.evaluation", "metacontrastive.module",
           "metacontrastive.reporting"]

PRESETS = ("contrastive", "conditioned", "maml", "full", "projection", "recipe", "intower")
# read no trained weight: scored once, on the untrained model with its tower cut (``--baseline-tail``)
UNTRAINED = ("pixels", "feature_centroid", "feature_probe", "projection", "tail_finetune", "tail_film")
TRAINED = ("zero_shot", "prototype", "linear_probe", "tip_adapter", "finetune", "dcmcl")
BASELINES = ("feature_centroid", "feature_probe", "finetune", "tip_adapter", "projection", "tail_finetune",
             "tail_film")  # what DCMCL must beat
CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass(frozen=True)
class Domain:
    """One domain of the study: where its images are and how they become shards.

    Attributes:
        name: the domain's name in the shards and the tables.
        folder: its image folder under ``--data``.
        template: the class prompt template.
        near: a domain close to ImageNet photographs (natural, aerial, textures), else far (skin, MRI).
        labels: readable class names for folder names (CamelCase folders are split into words).
        split: train, val, test fractions of the classes (seeded), or None for a test-only domain.
    """

    name: str
    folder: str
    template: str
    near: bool
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    split: tuple[float, float, float] | None = (0.6, 0.2, 0.2)


DOMAINS = (
    Domain("natural", "cifar10-test", "a photo of a {label}", near=True),
    Domain("aerial", "aid-aerial", "an aerial photograph of {label}", near=True),
    Domain("textures", "dtd-textures", "a photo of a {label} texture", near=True),
    Domain("skin", "ham10000-skin", "a dermoscopy image of {label}", near=False, split=None, labels={
        "akiec": "actinic keratosis", "bcc": "basal cell carcinoma", "bkl": "benign keratosis", "df": "dermatofibroma",
        "mel": "melanoma", "nv": "melanocytic nevus", "vasc": "vascular lesion"}),
    Domain("mri", "brain-tumor-mri/Testing", "a brain MRI showing {label}", near=False, split=None,
           labels={"notumor": "no tumor"}),
)


def _readable(name: str) -> str:
    """``DenseResidential`` -> ``dense residential``; other names unchanged."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower() if re.search(r"[a-z][A-Z]", name) else name


def convert(domain: Domain, args: argparse.Namespace) -> float:
    """Write ``domain``'s shards under ``--work``/shards unless shards of these settings exist; seconds taken."""
    source = (f"study:{domain.folder} size={args.size} per_class={args.per_class} split={domain.split} "
              f"seed={args.split_seed}")
    manifest = args.shards / domain.name / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text())["source"] == source:
        return 0.0
    start = time.perf_counter()
    items = readers.read_imagefolder(args.data / domain.folder)
    rng = random.Random(args.split_seed)
    by_class: dict[str, list] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    kept = []
    for folder_name, group in sorted(by_class.items()):
        chosen = rng.sample(group, min(len(group), args.per_class))  # a per-class cap keeps the imbalance below it
        kept += [dataclasses.replace(i, label=domain.labels.get(folder_name, _readable(folder_name))) for i in chosen]
    lists = None if domain.split is not None else {"test": sorted({i.label for i in kept})}
    write_domain(kept, domain.name, args.shards, source=source, templates=[domain.template],
                 class_fractions=domain.split or (0.6, 0.2, 0.2), class_lists=lists, size=args.size,
                 image_format="jpg", seed=args.split_seed, overwrite=True)
    return time.perf_counter() - start


def fit_args(preset: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The CLI arguments of one run: default + pretrained recipe, the ablation preset, the study's own settings of
    that preset (``conf/study/<preset>.yaml``), then the domains, budget and seed; its logs go to ``run_version``."""
    configs = [CONF / "default.yaml", CONF / "pretrained.yaml"]
    configs += [path for path in (CONF / "ablations" / f"{preset}.yaml", CONF / "study" / f"{preset}.yaml") if path.exists()]
    train = [d.name for d in args.domains if d.split is not None]
    run = [
        f"--data.domains=[{','.join(train)}]", f"--data.val_domains=[{','.join(train)}]",
        f"--data.test_domains=[{','.join(d.name for d in args.domains)}]",
        f"--data.ways={args.ways}", f"--data.eval_ways={args.eval_ways}", "--data.feature_cache=on",
        f"--trainer.max_steps={args.steps}", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--seed_everything={seed}", f"--data.seed={seed}",
        *([] if args.callbacks else ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]),
        *[f"--{s}" for s in args.set]]
    # what the run's weights depend on: the presets' contents (not their paths), these arguments, and how the shards
    # were converted; a run trained under other settings has another version, so it is never loaded for these
    trained_by = json.dumps([[path.read_text() for path in configs], run, args.size, args.per_class, args.split_seed])
    version = f"seed{seed}-{hashlib.sha1(trained_by.encode()).hexdigest()[:8]}"
    return [arg for path in configs for arg in ("-c", str(path))] + [
        f"--data.root={args.shards}", f"--trainer.logger.init_args.save_dir={args.work / 'logs'}",
        f"--trainer.logger.init_args.name={preset}", f"--trainer.logger.init_args.version={version}", *run]


def run_version(cli_args: list[str]) -> str:
    """The logger version (the run's folder under ``--work``/logs/<preset>) that ``fit_args`` chose."""
    prefix = "--trainer.logger.init_args.version="
    return next(a[len(prefix):] for a in cli_args if a.startswith(prefix))


def train(preset: str, seed: int, args: argparse.Namespace) -> tuple[MetaContrastiveModule, EpisodicDataModule, dict]:
    """Train one run (or load its finished ``last.ckpt``); the module, its data module and the run's record."""
    cli_args = fit_args(preset, seed, args)
    cli = MetaCLI(MetaContrastiveModule, EpisodicDataModule, run=False, args=cli_args,
                  trainer_defaults={"inference_mode": False}, save_config_kwargs={"overwrite": True})
    last = args.work / "logs" / preset / run_version(cli_args) / "checkpoints" / "last.ckpt"
    start = time.perf_counter()
    if last.exists() and not args.retrain:
        module = MetaContrastiveModule.load_from_checkpoint(last)
        trained = False
    else:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        module, trained = cli.model, True
        cli.trainer.save_checkpoint(last, weights_only=False)
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/acc")}
    record = {"preset": preset, "seed": seed, "steps": args.steps, "trained": trained,
              "fit_s": time.perf_counter() - start, "val": val}
    return module, cli.datamodule, record


def episode_sets(module: MetaContrastiveModule, datamodule: EpisodicDataModule, args: argparse.Namespace) -> list:
    """The ``--split`` episodes of every domain: the same for every run (seeded by the evaluation seed alone)."""
    datamodule.setup("validate" if args.split == "val" else "test")
    datamodule.attach(module.model.frozen_image_tower(module.towers_adapt), progress=False)
    variable = VariableShape(max_ways=args.eval_ways, max_shots=20, max_support=100, queries=10) if args.variable else None
    sets = datamodule.episode_sets(args.split, args.shots, args.episodes, labelled_only=True, variable=variable)
    return [s for s in sets if s.pool.split.name in args.score_domains]


def untrained(args: argparse.Namespace) -> tuple[MetaContrastiveModule, EpisodicDataModule]:
    """The model that the methods reading no trained weight are scored on: the pretrained towers of
    ``conf/pretrained.yaml`` untrained, the image tower cut at ``--baseline-tail`` (the tail methods need the cut;
    the others read the same features either way), so their rows do not depend on which preset runs first."""
    cli = MetaCLI(MetaContrastiveModule, EpisodicDataModule, run=False,
                  args=fit_args("baseline", 0, args) + [f"--model.encoder.tail={args.baseline_tail}"],
                  trainer_defaults={"inference_mode": False}, save_config_kwargs={"overwrite": True})
    return cli.model, cli.datamodule


def score(module: MetaContrastiveModule, sets: list, methods: list[str], prefix: str, args: argparse.Namespace) -> list[Result]:
    """Every method on every set, rows labelled ``<prefix>/<method>``; on the far domains ``dcmcl`` also from the
    blend of the known domain embeddings (``<prefix>/dcmcl@blend``) besides its ``unknown`` start."""
    label = (lambda r: f"{prefix}/{r.method}") if prefix else (lambda r: r.method)
    rows = [dataclasses.replace(r, method=label(r)) for r in evaluate(module, sets, methods, progress=True)]
    far = {d.name for d in args.domains if not d.near}
    if "dcmcl" in methods and module.model.domain is not None:
        far_sets = [s for s in sets if s.pool.split.name in far]
        rows += [dataclasses.replace(r, method=f"{label(r)}@blend")
                 for r in evaluate(module, far_sets, ["dcmcl"], progress=True, unseen="blend")]
    return rows


@dataclass(frozen=True)
class Job:
    """One independent piece of the study: the untrained methods on one domain (one job per domain: on every domain
    at once they would be the longest job), or one preset's run for one seed, trained (or loaded) and scored on
    every domain."""

    preset: str | None  # None: the untrained model
    seed: int | None = None
    domain: str | None = None  # only for the untrained jobs

    @property
    def name(self) -> str:
        return f"untrained-{self.domain}" if self.preset is None else f"{self.preset}-seed{self.seed}"


def grid(args: argparse.Namespace) -> list[Job]:
    """Every job of the study, the longest first, so that no worker idles through the last long job: the runs that
    also score ``finetune`` (on the default grid here 38 to 50 minutes each, one thread), then the untrained
    methods' jobs (9 to 17), then the other runs (2 to 27)."""
    untrained = [Job(None, domain=d) for d in args.score_domains] if any(m in UNTRAINED for m in args.methods) else []
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = [Job(preset, seed) for seed in seeds for preset in args.presets.split(",")]
    longest = [job for job in runs if scores_finetune(job.preset, args)]
    return longest + untrained + [job for job in runs if job not in longest]


def scores_finetune(preset: str, args: argparse.Namespace) -> bool:
    """Whether ``preset``'s runs are also scored with ``finetune`` (``--finetune-presets``)."""
    return "finetune" in args.methods and (args.finetune_presets == "all" or preset in args.finetune_presets.split(","))


# what a job's scores depend on, besides the job itself: a scores file made under other settings is not reused
_SCORED_BY = ("domains", "score_domains", "steps", "episodes", "shots", "split", "ways", "eval_ways", "variable", "methods",
              "baseline_tail", "size", "per_class", "split_seed", "set", "callbacks", "finetune_presets")


def scores_path(job: Job, args: argparse.Namespace) -> Path:
    """Where a finished job keeps its scores: ``--work``/scores/<settings hash>/<job>.json."""
    settings = {k: str(getattr(args, k)) for k in _SCORED_BY}
    settings["methods' settings"] = str(dataclasses.asdict(EvalOptions()))  # steps, rates: new defaults, new scores
    settings = json.dumps(settings, sort_keys=True)
    return args.work / "scores" / hashlib.sha1(settings.encode()).hexdigest()[:12] / f"{job.name}.json"


def finished(job: Job, args: argparse.Namespace) -> dict | None:
    """The payload a finished job left in ``scores_path`` (None: not finished, or ``--retrain``)."""
    path = scores_path(job, args)
    if not path.exists() or args.retrain:
        return None
    return {**json.loads(path.read_text()), "reused": True}


def run_job(job: Job, args: argparse.Namespace) -> dict:
    """Train or load, and score, one job; its record and rows (``Result.as_dict`` with its seed), also written to
    ``scores_path`` (atomically), so that a study that is run again, or was killed, skips the jobs it finished."""
    done = finished(job, args)
    if done is not None:
        return done
    path = scores_path(job, args)
    quiet_library_warnings()
    # each run's arguments go to LightningCLI as a list, while sys.argv holds the study's own: on purpose
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if job.preset is None:  # read no trained weight: scored once, on the untrained model
        module, datamodule = untrained(args)
        sets = [s for s in episode_sets(module, datamodule, args) if s.pool.split.name == job.domain]
        rows = score(module, sets, [m for m in args.methods if m in UNTRAINED], "", args)
        record = {"job": job.name, "evaluate_s": time.perf_counter() - start}
    else:
        module, datamodule, record = train(job.preset, job.seed, args)
        sets = episode_sets(module, datamodule, args)
        eval_start = time.perf_counter()
        trained = [m for m in args.methods if m in TRAINED and (m != "finetune" or scores_finetune(job.preset, args))]
        rows = score(module, sets, trained, job.preset, args)
        record.update(job=job.name, evaluate_s=time.perf_counter() - eval_start)
    payload = {"record": record, "rows": [{"seed": job.seed, **r.as_dict()} for r in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)  # a killed job leaves no scores file: it runs again
    return {**payload, "reused": False}


def _announce(job: Job, payload: dict) -> None:
    record = payload["record"]
    what = "reused" if payload["reused"] else (f"{'trained' if record.get('trained') else 'loaded'} in "
                                               f"{record['fit_s']:.0f}s, " if "fit_s" in record else "")
    print(f"{job.name}: {what}" + ("" if payload["reused"] else f"evaluated in {record['evaluate_s']:.0f}s"), flush=True)


def run_grid(jobs: list[Job], args: argparse.Namespace) -> list[dict]:
    """Every job's payload, in the order of ``jobs``: the finished ones read here, the others run in ``--jobs``
    worker processes of this machine (a fresh one per job) with their share of the cores, or through submitit
    (``--launcher slurm``: an array job per preset on the cluster; ``submitit-local``: the same submissions run by
    submitit on this machine)."""
    payloads = {job: finished(job, args) for job in jobs}
    for job, payload in payloads.items():
        if payload is not None:
            _announce(job, payload)
    todo = [job for job, payload in payloads.items() if payload is None]  # a process (or a submission) each
    if todo:
        payloads.update(zip(todo, _run_elsewhere(todo, args)))
    return [payloads[job] for job in jobs]


def _run_elsewhere(jobs: list[Job], args: argparse.Namespace) -> list[dict]:
    """The payloads of ``jobs``, in their order, each run in a process of its own: here or through submitit."""
    if args.launcher == "local":
        # with passive OpenMP waits and a share of the cores each, workers on a small machine do not spin against
        # each other (two active-waiting torch processes on 2 cores were measured at 8 s a training step instead of
        # 0.3 s); a fresh process per job hands each job's memory back (one process scoring the untrained jobs one
        # after another grew past 24 GiB). The fresh processes fork from a server that imported this file (torch,
        # Lightning) once and ran nothing: a spawned process spent about 7 s importing them, per job
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        context = multiprocessing.get_context("forkserver")
        if __name__ != "__main__":  # run as a script, the server imports the main file itself; imported as a module
            # (the tests), the server cannot import this file (bench/ is not on its path, and a failed preload is
            # silent), so it imports what this file imports: before, each job paid those 6 s again
            context.set_forkserver_preload(PRELOAD)
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, max_tasks_per_child=1) as pool:
            futures = {pool.submit(run_job, job, args): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                _announce(futures[future], future.result())
            return [f.result() for f in futures]
    import cloudpickle
    import submitit
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the jobs need this file, which is not a package
    executor = submitit.AutoExecutor(folder=args.work / "submitit" / "%j",
                                     cluster="slurm" if args.launcher == "slurm" else "local")
    cluster = {"slurm_partition": args.partition, "slurm_array_parallelism": args.array_parallelism} \
        if args.launcher == "slurm" else {}
    executor.update_parameters(timeout_min=args.timeout_min, cpus_per_task=args.threads or 1, mem_gb=args.mem_gb,
                               name="metacontrastive-study", **cluster)
    submitted: dict = {}
    for kind in dict.fromkeys(job.preset for job in jobs):  # an array per preset (the untrained jobs: one array)
        members = [job for job in jobs if job.preset == kind]
        for job, handle in zip(members, executor.map_array(run_job, members, [args] * len(members))):
            submitted[job] = handle
        print(f"submitted {len(members)} job(s) of {kind or 'untrained'}: {submitted[members[0]].job_id}", flush=True)
    for job, handle in submitted.items():
        _announce(job, handle.result())
    return [submitted[job].result() for job in jobs]


def _kind(label: str) -> str:
    """The method of a row label: ``full/dcmcl`` -> ``dcmcl``; ``feature_probe`` -> ``feature_probe``."""
    return label.rpartition("/")[2]


def verdict(rows: list[tuple[int, Result]], table: list[Result], method: str, args: argparse.Namespace) -> tuple[str, list]:
    """Markdown: per domain and shots, ``method`` (e.g. ``recipe/dcmcl``) against the best baseline (the highest
    mean among ``BASELINES`` rows of any preset), paired over seeds on the same episodes, and the verdict.

    Returns:
        The markdown and the rows (domain, shots, best baseline, mean difference, its interval, per seed).
    """
    acc = {(seed, r.method, r.domain, r.shots): r.acc for seed, r in rows}
    mean = {(r.method, r.domain, r.shots): r for r in table}
    near = {d.name: d.near for d in args.domains}
    lines = [f"| domain | shots | {method} | best baseline | baseline | difference (points) | per seed | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    out = []
    for (label, domain, shots), r in mean.items():
        if label != method:
            continue
        candidates = [m for (m, d, k) in mean if d == domain and k == shots and _kind(m) in BASELINES and m != method]
        if not candidates:
            continue
        best = max(candidates, key=lambda m: mean[m, domain, shots].acc)
        seeds = sorted(s for s, m, d, k in acc if (m, d, k) == (method, domain, shots))
        # a baseline scored once (it trains nothing) is the same in every seed
        base = {s: acc.get((s, best, domain, shots), next(a for (_, m, d, k), a in acc.items()
                                                           if (m, d, k) == (best, domain, shots))) for s in seeds}
        diff = [100 * (acc[s, method, domain, shots] - base[s]) for s in seeds]
        half = (scipy.stats.t.ppf(0.975, len(diff) - 1) * statistics.stdev(diff) / len(diff) ** 0.5) if len(diff) > 1 else float("nan")
        b = mean[best, domain, shots]
        apart = r.acc - r.acc_ci95 > b.acc + b.acc_ci95
        within = 100 * (r.acc - b.acc) >= -1.0
        verdict_text = (("wins: intervals apart" if apart else "level or below") if not near[domain] else
                        ("within 1 point or above" if within else "more than 1 point below"))
        if r.ways == 2:
            verdict_text += " (2-way: less weight)"
        lines.append(f"| {domain} | {shots if shots else 'variable'} | {100 * r.acc:.1f} ± {100 * r.acc_ci95:.1f} | {best} | "
                     f"{100 * b.acc:.1f} ± {100 * b.acc_ci95:.1f} | {statistics.mean(diff):+.1f} ± {half:.1f} | "
                     + ", ".join(f"{s}: {d:+.1f}" for s, d in zip(seeds, diff)) + f" | {verdict_text} |")
        out.append({"domain": domain, "shots": shots, "method": method, "best_baseline": best, "acc": r.acc,
                    "acc_ci95": r.acc_ci95, "baseline_acc": b.acc, "baseline_ci95": b.acc_ci95,
                    "difference": statistics.mean(diff), "difference_ci95": half, "per_seed": diff, "verdict": verdict_text})
    return "\n".join(lines) + "\n", out


def f1_claim(table: list[Result]) -> str:
    """Markdown: the second seed paper's claim, measured: macro-F1 of the projection trained on the frozen features
    (the ``projection`` preset's own embeddings, and the ``projection`` method's fresh heads) against the frozen
    features' nearest centroid and logistic regression."""
    rows = {(r.method, r.domain, r.shots): r for r in table}
    lines = ["| domain | shots | feature_centroid F1 | feature_probe F1 | projection preset (prototype) F1 | "
             "projection method F1 | best projection - best feature baseline (points) |", "|---|---|---|---|---|---|---|"]
    for (method, domain, shots), centroid in rows.items():
        if method != "feature_centroid":
            continue
        probe = rows.get(("feature_probe", domain, shots))
        preset = rows.get(("projection/prototype", domain, shots))
        fresh = rows.get(("projection", domain, shots))
        best_feature = max(centroid.f1, probe.f1 if probe else 0.0)
        best_projection = max([r.f1 for r in (preset, fresh) if r is not None], default=float("nan"))
        cells = [f"{100 * r.f1:.1f} ± {100 * r.f1_ci95:.1f}" if r is not None else "" for r in (centroid, probe, preset, fresh)]
        lines.append(f"| {domain} | {shots if shots else 'variable'} | " + " | ".join(cells)
                     + f" | {100 * (best_projection - best_feature):+.1f} |")
    return "\n".join(lines) + "\n"


def plot_differences(decisions: list[dict], path: Path) -> None:
    """A bar per domain and shots: DCMCL minus the best baseline, with the interval across seeds."""
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(decisions)), 4))
    labels = [f"{d['domain']}\n{d['shots'] if d['shots'] else 'var'}-shot" for d in decisions]
    ax.bar(range(len(decisions)), [d["difference"] for d in decisions], yerr=[d["difference_ci95"] for d in decisions],
           capsize=4, color=["tab:green" if d["difference"] > 0 else "tab:red" for d in decisions])
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xticks(range(len(decisions)), labels)
    ax.set_ylabel("accuracy difference (points)")
    ax.set_title(f"{decisions[0]['method']} minus the best baseline, paired over seeds" if decisions else "")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep(rows: list[dict], columns: dict[str, Callable[[dict], str]], title: str, out: Path, name: str) -> None:
    """A sweep's table on the validation classes (``bench/inner_sweep.py``, ``bench/baseline_sweep.py``): a line per
    config, ``columns`` (header: how a row shows it) then accuracy ± interval per domain and shots, printed and
    written to ``out``/``name``.md, the rows (``Result.as_dict`` and the config) to ``out``/``name``.json."""
    config = lambda r: tuple(show(r) for show in columns.values())  # noqa: E731
    cells = list(dict.fromkeys((r["domain"], r["shots"]) for r in rows))
    lines = [title, "", "| " + " | ".join(columns) + " | " + " | ".join(f"{d} {k}" for d, k in cells) + " |",
             "|" + "---|" * (len(columns) + len(cells))]
    for shown in dict.fromkeys(map(config, rows)):
        got = {(r["domain"], r["shots"]): r for r in rows if config(r) == shown}
        lines.append("| " + " | ".join(shown) + " | " + " | ".join(
            f"{100 * got[c]['acc']:.1f} ± {100 * got[c]['acc_ci95']:.1f}" if c in got else "-" for c in cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}/{name}.md, {name}.json")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="the raw image folders (see ../shared/data/README.md)")
    parser.add_argument("--work", default="runs/study", help="shards, feature cache and runs (reused by a later call)")
    parser.add_argument("--out", default="results/study", help="folder for the table, results.json and plots")
    parser.add_argument("--domains", default=",".join(d.name for d in DOMAINS), help="from " + ", ".join(d.name for d in DOMAINS))
    parser.add_argument("--score-domains", default=None, help="score only these of --domains (default: all; the "
                        "runs still train on every near domain of --domains)")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--episodes", type=int, default=600, help="test episodes per domain and shots")
    parser.add_argument("--shots", default="1,5,20")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="score the validation classes of the "
                        "training domains (to choose a recipe) or the test classes and the far domains (the verdict)")
    parser.add_argument("--ways", type=int, default=5, help="classes per training task")
    parser.add_argument("--eval-ways", type=int, default=5, help="classes per test episode, capped per domain")
    parser.add_argument("--variable", action="store_true", help="also variable-way variable-shot test episodes")
    parser.add_argument("--methods", default=",".join(UNTRAINED + TRAINED), help=f"from {list(METHODS)}")
    parser.add_argument("--decide", default="intower/dcmcl,intower/dcmcl@blend,recipe/dcmcl",
                        help="the methods judged against the best baseline, comma-separated (the plot shows the first)")
    parser.add_argument("--baseline-tail", default="head", choices=("head", "last_stage"),
                        help="where the untrained model's tower is cut for tail_finetune and tail_film")
    parser.add_argument("--size", type=int, default=128, help="image side of the shards")
    parser.add_argument("--per-class", type=int, default=300, help="images kept per class when converting")
    parser.add_argument("--split-seed", type=int, default=0, help="seeds the class splits and the per-class cap")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a CLI override for every run")
    parser.add_argument("--callbacks", action="store_true", help="train with conf/default.yaml's callbacks (diagnostics "
                        "in TensorBoard, checkpoints; slower)")
    parser.add_argument("--finetune-presets", default="recipe", help="presets whose runs are also scored "
                        "with finetune (the costliest method, about 0.1 s an episode on a CPU; 'all' for every preset)")
    parser.add_argument("--retrain", action="store_true", help="train runs again even where last.ckpt exists "
                        "(and score them again: the scores of finished jobs are not reused)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs run at once on this machine, each in its own "
                        "process with its share of the cores (default: one per core)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each job (default: the cores "
                        "shared among --jobs; on a cluster, the cores asked for each job)")
    parser.add_argument("--launcher", default="local", choices=("local", "slurm", "submitit-local"),
                        help="run the jobs here, or submit them through submitit: to SLURM (an array job per preset), "
                        "or to submitit's local executor (the cluster path on this machine)")
    parser.add_argument("--partition", default=None, help="the SLURM partition (--launcher slurm)")
    parser.add_argument("--timeout-min", type=int, default=240, help="time limit of each submitted job, minutes")
    parser.add_argument("--mem-gb", type=int, default=24, help="memory of each submitted job")
    parser.add_argument("--array-parallelism", type=int, default=64, help="jobs of one array that run at once")
    args = parser.parse_args()
    known = {d.name: d for d in DOMAINS}
    unknown = [d for d in args.domains.split(",") if d not in known]
    if unknown:
        parser.error(f"--domains: unknown {unknown}; the study knows {list(known)}")
    args.domains = [known[d] for d in args.domains.split(",")]
    args.score_domains = args.score_domains.split(",") if args.score_domains else [d.name for d in args.domains]
    if set(args.score_domains) - {d.name for d in args.domains}:
        parser.error(f"--score-domains: {sorted(set(args.score_domains) - {d.name for d in args.domains})} not in --domains")
    args.data, args.work, args.out = Path(args.data), Path(args.work), Path(args.out)
    args.shards = args.work / "shards"
    args.shots = [int(k) for k in args.shots.split(",")]
    args.methods = args.methods.split(",")
    cores = available_cores()
    args.jobs = args.jobs or (cores if args.launcher == "local" else 1)
    if args.threads is None and args.launcher == "local":
        args.threads = max(1, cores // args.jobs)
    if args.launcher == "slurm" and args.partition is None:
        parser.error("--launcher slurm needs --partition")
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"--methods: unknown {method!r}; choose from {list(METHODS)}")
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    timings: dict = {"convert_s": sum(convert(d, args) for d in args.domains)}
    jobs = grid(args)
    payloads = run_grid(jobs, args)
    fields = {f.name for f in dataclasses.fields(Result)}
    rows: list[tuple[int | None, Result]] = [(r["seed"], Result(**{k: v for k, v in r.items() if k in fields}))
                                             for p in payloads for r in p["rows"]]
    runs = [p["record"] for job, p in zip(jobs, payloads) if job.preset is not None]
    fresh = [(job, p["record"]) for job, p in zip(jobs, payloads) if not p["reused"]]  # what this call ran
    timings.update(evaluate_untrained_s=sum(r["evaluate_s"] for job, r in fresh if job.preset is None),
                   fit_s=sum(r["fit_s"] for job, r in fresh if job.preset is not None),
                   evaluate_trained_s=sum(r["evaluate_s"] for job, r in fresh if job.preset is not None),
                   jobs_reused=len(jobs) - len(fresh))
    table = mean_over_seeds([r for _, r in rows])
    timings["total_s"] = time.perf_counter() - start
    seeds = sorted({s for s, _ in rows if s is not None})
    note = (f"{args.steps} training steps per run, seeds {', '.join(map(str, seeds))}: mean over seeds ± the 95% Student-t "
            f"interval across seeds; methods that train nothing ({', '.join(UNTRAINED)}) ± "
            f"their 95% interval over episodes. Whole study: {timings['total_s'] / 60:.1f} minutes.")
    write_results(table, args.out, {k: str(v) for k, v in vars(args).items()}, timings["total_s"], note,
                  "Student t across seeds")
    judged = [verdict(rows, table, method, args) for method in args.decide.split(",")]
    decisions_md = "\n".join(md for md, _ in judged)
    decisions = [d for _, ds in judged for d in ds]
    (args.out / "verdict.md").write_text(decisions_md)
    (args.out / "f1.md").write_text(f1_claim(table))
    plot_differences(judged[0][1], args.out / "paired_differences.png")
    decided = args.decide.split(",")[0].split("/")[0]
    shown = set(UNTRAINED) | set(args.decide.split(",")) | {f"{decided}/tip_adapter", f"{decided}/finetune",
                                                           "recipe/finetune"}
    plot_accuracy_vs_shots([r for r in table if r.method in shown], args.out / "accuracy_vs_shots.png")
    payload = json.loads((args.out / "results.json").read_text())
    payload.update(timings=timings, runs=runs, verdict=decisions, per_seed=[{"seed": s, **r.as_dict()} for s, r in rows])
    (args.out / "results.json").write_text(json.dumps(payload, indent=2))
    print(note + "\n\n" + markdown_table(table, "Student t across seeds") + "\n" + decisions_md)
    print(f"wrote {args.out}/results.md, results.json, verdict.md, f1.md, accuracy_vs_shots.png, paired_differences.png")


if __name__ == "__main__":
    main()
