"""bench/ablations.py: tables over seeds built from separate invocations (--merge), --set overrides and --tag."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from metacontrastive.evaluation import Result
from metacontrastive.reporting import mean_over_seeds

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "ablations.py"


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method: str, acc: float) -> Result:
    return Result(domain="natural", conditioning="natural", method=method, ways=2, shots=5, queries=10, episodes=300,
                  images=600, acc=acc, acc_ci95=0.01, f1=acc, f1_ci95=0.01, ms_per_episode=1.0)


def _write_seed(folder: Path, seed: int, accs: dict[str, float]) -> Path:
    folder.mkdir(parents=True)
    runs = [{"seed": seed, "preset": "full", "steps": 300, "fit_s": 10.0, "val": {}}]
    (folder / "runs.json").write_text(json.dumps({"runs": runs, "results": [_row(m, a).as_dict() for m, a in accs.items()]}))
    return folder


def test_merged_seeds_give_the_mean_and_the_spread_across_seeds(ablations, tmp_path, monkeypatch):
    a = _write_seed(tmp_path / "s0", 0, {"pixels": 0.60, "full/dcmcl": 0.70})
    b = _write_seed(tmp_path / "s1", 1, {"pixels": 0.62, "full/dcmcl": 0.80})
    rows, timings = ablations.merged([str(a), str(b)])
    assert [t["seed"] for t in timings] == [0, 1] and len(rows) == 4
    assert [seed for seed, _ in rows] == [0, 0, 1, 1]  # results without a seed take their file's only seed
    table = {r.method: r for r in mean_over_seeds([r for _, r in rows])}
    assert table["full/dcmcl"].acc == pytest.approx(0.75)
    # t(0.975, 1 degree of freedom) * stdev(0.7, 0.8) / sqrt(2): the interval across seeds replaces the episode CI
    assert table["full/dcmcl"].acc_ci95 == pytest.approx(12.7062 * 0.0707107 / 2 ** 0.5, rel=1e-4)

    out = tmp_path / "table"
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--seeds", "", "--merge", str(a), "--merge", str(b),
                                      "--out", str(out)])
    ablations.main()
    table_md = (out / "results.md").read_text()
    assert table_md.startswith("300 training steps per preset; mean over seeds 0, 1") and "(Student t across seeds)" in table_md
    written = json.loads((out / "runs.json").read_text())["results"]
    assert [(r["seed"], r["method"]) for r in written] == [(0, "pixels"), (0, "full/dcmcl"), (1, "pixels"), (1, "full/dcmcl")]


def test_paired_differences_are_taken_seed_by_seed(ablations):
    rows = [(seed, _row(f"{preset}/dcmcl", acc)) for seed, preset, acc in
            [(0, "maml", 0.90), (0, "full", 0.85), (1, "maml", 0.70), (1, "full", 0.66), (2, "maml", 0.80), (2, "full", 0.77),
             (0, "contrastive", 0.5)]]  # contrastive: one seed, nothing to pair
    lines = ablations.paired(rows, "maml").splitlines()
    assert len(lines) == 3 and lines[2].startswith("| full/dcmcl | natural | 5 | -4.0 ± ")
    # differences -5, -4, -3: mean -4, t(2) * 1 / sqrt(3) = 2.5, while the seeds' own spread is 10 points
    assert "-4.0 ± 2.5 | 0: -5.0, 1: -4.0, 2: -3.0 |" in lines[2]


def test_merging_a_seed_twice_or_nothing_is_an_error(ablations, tmp_path, monkeypatch):
    a = _write_seed(tmp_path / "s0", 0, {"pixels": 0.6})
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--seeds", "", "--merge", str(a), "--merge", str(a),
                                      "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="the same"):
        ablations.main()
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--seeds", "", "--out", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="nothing to tabulate"):
        ablations.main()
    with pytest.raises(SystemExit, match="no runs.json"):
        ablations.merged([str(tmp_path / "missing")])


def test_a_row_no_seed_changes_keeps_the_episode_ci(ablations):
    row = _row("pixels", 0.6)
    assert mean_over_seeds([row]) == [row]
    assert mean_over_seeds([row, dataclasses.replace(row, ms_per_episode=2.0)])[0].acc_ci95 == 0.01
    assert mean_over_seeds([row, dataclasses.replace(row, acc=0.62)])[0].acc_ci95 > 0.1  # t(1) * 0.014 / sqrt(2)


def test_set_overrides_come_last_and_reach_the_config(ablations, tmp_path, monkeypatch):
    monkeypatch.chdir(SCRIPT.parents[1])
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--config", "conf/real.yaml", "--set", "data.queries=7",
                                      "--set", "data.augment=[natural]", "--out", str(tmp_path)])
    args = ablations.parse_args()
    argv = ablations.fit_args("contrastive", 3, args)
    assert argv[-2:] == ["--data.queries=7", "--data.augment=[natural]"]  # after conf/real.yaml's queries: 10
    cli = ablations.MetaCLI(ablations.MetaContrastiveModule, ablations.EpisodicDataModule, run=False, args=argv)
    assert cli.config.data.queries == 7 and cli.config.data.augment == ["natural"] and cli.config.seed_everything == 3
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--set", "data.queries"])
    with pytest.raises(SystemExit):
        ablations.parse_args()


def test_a_tag_names_a_recipe_change_and_pairs_it_with_untagged_runs(ablations, tmp_path, monkeypatch):
    before = tmp_path / "before"
    before.mkdir()
    runs = [{"seed": s, "preset": "contrastive", "steps": 150, "fit_s": 1.0, "val": {}} for s in (0, 1)]
    results = [{"seed": s, **_row(m, a).as_dict()} for s, m, a in
               [(0, "pixels", 0.6), (0, "contrastive/dcmcl", 0.65), (1, "pixels", 0.6), (1, "contrastive/dcmcl", 0.61)]]
    (before / "runs.json").write_text(json.dumps({"runs": runs, "results": results}))
    trained = []  # stands in for training and scoring: this test is about names and pairing, not accuracy

    def fake_train(preset, seed, args):
        trained.append((preset, seed))
        data = SimpleNamespace(episode_sets=lambda *a, **k: None)
        return SimpleNamespace(model=None, datamodule=data, trainer=SimpleNamespace(callback_metrics={}))

    def fake_evaluate(model, sets, methods, progress):
        seed = trained[-1][1]
        return [_row(m, 0.6 if m == "pixels" else {0: 0.70, 1: 0.64}[seed]) for m in methods]

    monkeypatch.setattr(ablations, "train", fake_train)
    monkeypatch.setattr(ablations, "evaluate", fake_evaluate)
    out = tmp_path / "coco"
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--presets", "contrastive", "--tag", "+coco", "--seeds", "0,1",
                                      "--methods", "dcmcl", "--merge", str(before), "--versus", "contrastive",
                                      "--out", str(out)])
    ablations.main()
    assert trained == [("contrastive", 0), ("contrastive", 1)]  # the tag renames the rows, not the preset trained
    presets = [(r["seed"], r["preset"]) for r in json.loads((out / "runs.json").read_text())["runs"]]
    assert presets == [(0, "contrastive"), (1, "contrastive"), (0, "contrastive+coco"), (1, "contrastive+coco")]
    lines = (out / "paired.md").read_text().splitlines()
    assert len(lines) == 3 and lines[2].startswith("| contrastive+coco/dcmcl | natural | 5 | +4.0 ± ")
    assert lines[2].endswith("| 0: +5.0, 1: +3.0 |")
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--tag", "a/b"])
    with pytest.raises(SystemExit):
        ablations.parse_args()
