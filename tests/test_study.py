"""The study driver (``bench/study.py``, ``make study``) end to end on tiny image folders it writes itself: convert,
cache, train two presets for two seeds, score every kind of method, and write the table, the verdict and the plots;
a second call reuses the shards and the trained runs."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _study():
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))  # worker processes import the study's jobs by module name
    spec = importlib.util.spec_from_file_location("study", ROOT / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _folder(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8) + np.uint8(20 * c)  # a brightness per class
            Image.fromarray(pixels).save(root / name / f"{i:03d}.jpg")


@pytest.mark.slow
def test_the_study_trains_scores_and_judges_on_tiny_folders(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _folder(data / "cifar10-test", ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse"], 8, 0)
    _folder(data / "brain-tumor-mri" / "Testing", ["glioma", "notumor", "pituitary"], 8, 1)
    study = _study()
    argv = ["study", "--data", str(data), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--domains", "natural,mri", "--presets", "recipe,intower", "--finetune-presets", "recipe,intower", "--seeds", "0,1", "--steps", "2",
            "--episodes", "3", "--shots", "1", "--ways", "2", "--eval-ways", "2", "--size", "32", "--per-class", "8",
            "--variable", "--methods", "pixels,feature_centroid,feature_probe,projection,tail_finetune,tail_film,prototype,finetune,dcmcl",
            "--set", "model.encoder.image_size=32", "--set", "data.shots=1", "--set", "data.queries=2",
            "--set", "data.val_episodes=2", "--set", "data.steps_per_epoch=2", "--set", "threads=1"]
    monkeypatch.setattr(sys, "argv", argv)
    study.main()
    out = tmp_path / "out"
    for name in ("results.md", "results.json", "verdict.md", "f1.md", "accuracy_vs_shots.png", "paired_differences.png"):
        assert (out / name).is_file(), name
    payload = json.loads((out / "results.json").read_text())
    assert {r["seed"] for r in payload["per_seed"]} == {None, 0, 1}  # None: the untrained methods, scored once
    rows = payload["per_seed"]
    # the methods that train nothing are scored once; finetune only for the presets that ask for it
    for method in ("feature_centroid", "tail_finetune", "tail_film"):
        assert len([r for r in rows if r["method"] == method and r["domain"] == "mri" and r["shots"] == 1]) == 1
    assert {r["method"] for r in rows if r["method"].endswith("/finetune")} == {"intower/finetune", "recipe/finetune"}
    # the far domain (never trained on) is also scored from the blend of the known domains
    assert {r["domain"] for r in rows if r["method"].endswith("@blend")} == {"mri"}
    assert {r["conditioning"] for r in rows if r["method"].endswith("@blend")} == {"blend"}
    judged = {(d["method"], d["domain"], d["shots"]) for d in payload["verdict"]}
    assert judged == {(m, d, k) for m in ("intower/dcmcl", "recipe/dcmcl") for d in ("natural", "mri") for k in (1, 0)} | {
        ("intower/dcmcl@blend", "mri", 1), ("intower/dcmcl@blend", "mri", 0)}
    for decision in payload["verdict"]:
        assert len(decision["per_seed"]) == 2 and decision["best_baseline"].rpartition("/")[2] in study.BASELINES
    assert "intower/dcmcl" in (out / "verdict.md").read_text()
    assert [run["trained"] for run in payload["runs"]] == [True] * 4
    assert payload["timings"]["convert_s"] > 0 and payload["timings"]["jobs_reused"] == 0
    first = {(r["seed"], r["method"], r["domain"], r["shots"]): r["acc"] for r in rows}
    # a second call converts nothing and runs no job again: it reads each finished job's scores, and starts no process
    run_elsewhere, handed = study._run_elsewhere, []
    monkeypatch.setattr(study, "_run_elsewhere", lambda jobs, a: handed.extend(jobs) or run_elsewhere(jobs, a))
    study.main()
    assert handed == []
    again = json.loads((out / "results.json").read_text())
    assert again["timings"]["convert_s"] == 0 and again["timings"]["jobs_reused"] == 6  # 2 untrained + 2 x 2 runs
    assert first == {(r["seed"], r["method"], r["domain"], r["shots"]): r["acc"] for r in again["per_seed"]}
    # a study killed during a job resumes there: that job alone runs again, from its run's last.ckpt
    args = study.parse_args()
    lost = study.Job("intower", 1)
    study.scores_path(lost, args).unlink()
    study.main()
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["timings"]["jobs_reused"] == 5 and handed == [lost]  # only the lost job got a process
    assert [run["trained"] for run in resumed["runs"]] == [True, True, True, False]  # intower seed 1: loaded, not trained
    assert first == {(r["seed"], r["method"], r["domain"], r["shots"]): r["acc"] for r in resumed["per_seed"]}
    # the sweep of the test-time inner loop loads a run of the study and scores its validation classes
    sweep = _bench("inner_sweep")
    options = (argv[1:argv.index("--presets")] + argv[argv.index("--steps"):argv.index("--episodes")]
               + argv[argv.index("--ways"):argv.index("--variable")] + argv[argv.index("--set"):])
    runs = sorted((tmp_path / "work" / "logs" / "intower").iterdir())
    monkeypatch.setattr(sys, "argv", ["inner_sweep", "--preset", "intower", "--seed", "1", "--inner-steps", "1,3",
                                      "--lr-scale", "1,10", "--episodes", "2", "--shots", "1", *options,
                                      "--out", str(tmp_path / "sweep")])
    sweep.main()
    swept = json.loads((tmp_path / "sweep" / "inner_sweep.json").read_text())
    assert {(r["method"], r["steps"], r["lr_scale"]) for r in swept} == {("prototype", 0, 0.0)} | {
        ("dcmcl", k, lr) for k in (1, 3) for lr in (1.0, 10.0)}
    assert {r["domain"] for r in swept} == {"natural"}  # the far domain has no validation classes
    assert sorted((tmp_path / "work" / "logs" / "intower").iterdir()) == runs  # loaded: no run trained for the sweep
    # the sweep of the trained baselines' settings scores each config of the untrained model's in-tower methods
    monkeypatch.setattr(sys, "argv", ["baseline_sweep", "--methods", "tail_finetune,tail_film", "--configs",
                                      "tail_finetune_steps=1,tail_film_steps=1", "--episodes", "2", "--shots", "1",
                                      *options, "--out", str(tmp_path / "baselines")])
    _bench("baseline_sweep").main()
    swept = json.loads((tmp_path / "baselines" / "baseline_sweep.json").read_text())
    assert {(r["method"], r["config"], r["domain"]) for r in swept} == {
        (m, c, "natural") for m in ("tail_finetune", "tail_film") for c in ("defaults", "tail_finetune_steps=1, tail_film_steps=1")}


def test_a_run_trained_under_other_settings_is_another_run_never_loaded_for_these(tmp_path, monkeypatch):
    study = _study()
    base = ["study", "--work", str(tmp_path), "--data", str(tmp_path / "data")]
    version = lambda *extra: study.run_version(study.fit_args("intower", 0, _parsed(study, monkeypatch, base + list(extra))))  # noqa: E731
    assert version() == version() and version().startswith("seed0-")
    assert version("--steps", "7") != version()  # before: seed0 for both, and the 300-step run was loaded
    assert version("--set", "model.lr=1e-3") != version() and version("--size", "64") != version()
    assert version("--episodes", "3") == version()  # scoring settings do not retrain


def test_the_grid_starts_with_its_longest_jobs(tmp_path, monkeypatch):
    study = _study()
    base = ["study", "--work", str(tmp_path), "--data", str(tmp_path / "data"), "--domains", "natural,mri",
            "--presets", "maml,recipe,intower", "--seeds", "0,1"]
    names = [job.name for job in study.grid(_parsed(study, monkeypatch, base))]
    # finetune (scored for recipe by default) is the costliest method: those runs first, then the untrained jobs
    assert names == ["recipe-seed0", "recipe-seed1", "untrained-natural", "untrained-mri", "maml-seed0",
                     "intower-seed0", "maml-seed1", "intower-seed1"]
    names = [job.name for job in study.grid(_parsed(study, monkeypatch, base + ["--methods", "prototype,dcmcl"]))]
    assert names == [f"{p}-seed{s}" for s in (0, 1) for p in ("maml", "recipe", "intower")]  # no finetune, nothing untrained


def _parsed(study, monkeypatch, argv: list[str]):
    monkeypatch.setattr(sys, "argv", argv)
    return study.parse_args()


def _bench(name: str):
    """A script of bench/, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_grid_submitted_through_submitit_gives_the_rows_of_one_process(tmp_path, monkeypatch):
    """The same grid in the local launcher's worker processes, and submitted through submitit (its local executor:
    the jobs, pickled, that ``--launcher slurm`` submits as arrays, run here): the same rows."""
    data = tmp_path / "data"
    _folder(data / "cifar10-test", ["airplane", "automobile", "bird", "cat", "deer", "dog"], 6, 0)
    _folder(data / "brain-tumor-mri" / "Testing", ["glioma", "notumor"], 6, 1)
    study = _study()
    common = ["--data", str(data), "--domains", "natural,mri", "--presets", "recipe", "--seeds", "0,1",
              "--steps", "1", "--episodes", "2", "--shots", "1", "--ways", "2", "--eval-ways", "2", "--size", "32",
              "--per-class", "6", "--methods", "feature_centroid,tail_film,prototype,dcmcl", "--decide", "recipe/dcmcl",
              "--set", "model.encoder.image_size=32", "--set", "data.shots=1", "--set", "data.queries=2",
              "--set", "data.val_episodes=1", "--set", "data.steps_per_epoch=1"]
    tables = []
    for name, extra in (("local", ["--jobs", "2", "--threads", "1"]), ("grid", ["--threads", "1", "--launcher", "submitit-local"])):
        monkeypatch.setattr(sys, "argv", ["study", *common, "--work", str(tmp_path / name), "--out", str(tmp_path / f"out-{name}"),
                                          *extra])
        study.main()
        payload = json.loads((tmp_path / f"out-{name}" / "results.json").read_text())
        assert payload["timings"]["jobs_reused"] == 0 and len(payload["runs"]) == 2
        tables.append({(r["seed"], r["method"], r["domain"], r["shots"]): r["acc"] for r in payload["per_seed"]})
    assert tables[0] == tables[1] and len(tables[0]) > 0
    assert len(list((tmp_path / "grid" / "submitit").glob("*/*_result.pkl"))) == 4  # submitit ran the 4 jobs
