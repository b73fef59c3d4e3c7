"""End to end through the real entry point: `python -m metacontrastive fit` on tiny shards."""
import csv
import json
import math
import subprocess
import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from metacontrastive.cli import evaluate_main, main
from metacontrastive.errors import BadInput
from metacontrastive.reporting import FILES

PYTHON_M = [sys.executable, "-m", "metacontrastive"]


def test_fast_dev_run_of_the_default_configuration(fit_args):
    """One training and one validation step of the real entry point and the real default configuration."""
    cmd = [*PYTHON_M, *fit_args, "--trainer.fast_dev_run=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final validation accuracy natural" in result.stdout and "final validation accuracy medical" in result.stdout


@pytest.fixture(scope="module")
def fitted(fit_args_in, tmp_path_factory):
    """A short run of the default configuration through the real entry point: (run folder, its stdout)."""
    logs = tmp_path_factory.mktemp("logs")
    cmd = [*PYTHON_M, *fit_args_in(logs), "--trainer.max_steps=7", "--trainer.log_every_n_steps=1", "--model.inner_lr=0.05"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return logs / "dcmcl" / "version_0", result.stdout


def _events(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


@pytest.mark.slow
def test_fit_writes_events_checkpoint_and_config(fitted):
    run, _ = fitted
    events = _events(run)
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/align", "train/query_loss/natural", "train/query_loss/medical",
                "val/acc/natural", "val/acc/medical", "val/acc", "val/f1/natural", "val/f1_ci95/medical"}
    assert expected <= tags, expected - tags
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))
    assert len(events.Scalars("val/acc")) == 3  # one per 3-step epoch, and one when max_steps ends mid-epoch
    assert (run / "checkpoints" / "last.ckpt").exists()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["inner_lr"] == 0.05 and config["trainer"]["max_steps"] == 7
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["domains"] == ["natural", "medical"]  # linked from data.domains


@pytest.mark.slow
def test_default_callbacks_write_their_tags(fitted):
    run, _ = fitted
    events = _events(run)
    scalars = set(events.Tags()["scalars"])
    for domain in ("natural", "medical"):
        for method in ("zero_shot", "prototype", "pixels", "dcmcl"):
            assert f"fewshot/{method}/acc/{domain}" in scalars
        assert {f"align/alignment/{domain}", f"align/uniformity/{domain}"} <= scalars
    assert {"align/mmd/natural-medical", "align/coral/natural-medical"} <= scalars
    assert {"scaling/step_ms", "scaling/data_wait_frac", "scaling/samples_per_s", "scaling/samples_per_s_total",
            "scaling/tasks_per_s", "scaling/peak_mem_gib", "scaling/world_size"} <= scalars
    assert 0.0 <= events.Scalars("scaling/data_wait_frac")[-1].value <= 1.0
    assert events.Scalars("data/dropped/natural")[-1].value == 0.0  # the demo shards are sound: nothing dropped
    assert {"episode/support", "episode/query"} <= set(events.Tags()["images"])
    plugins = {v.tag: v.metadata.plugin_data.plugin_name
               for f in run.glob("events.out.tfevents.*") for ev in EventFileLoader(str(f)).Load() for v in ev.summary.value}
    assert plugins.get("_hparams_/experiment") == "hparams"  # hyperparameters with the final metrics
    assert "hp/val/acc" in scalars
    assert (run / "projector_config.pbtxt").exists()  # the embedding projector, on the last validation epoch


@pytest.mark.slow
def test_fit_ends_with_a_summary_of_the_run(fitted):
    run, stdout = fitted
    assert f"run folder: {run}" in stdout
    assert "best checkpoint: " in stdout and "final validation accuracy natural: " in stdout
    assert "make eval CKPT=" in stdout and "make tensorboard" in stdout
    assert "ms/step" in stdout and "waiting for data" in stdout  # the ScalingCallback's summary


@pytest.mark.slow
def test_evaluate_writes_the_table_files_beside_the_checkpoint(fitted):
    run, _ = fitted
    cmd = [*PYTHON_M, "evaluate", "--ckpt", str(run / "checkpoints" / "last.ckpt"),
           "--ways", "3", "--shots", "1,2", "--queries", "3", "--episodes", "4", "--holdout-domain", "medical"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in run.iterdir()} >= set(FILES)
    data = json.loads((run / "results.json").read_text())
    assert set(data) == {"settings", "seconds", "results"}
    rows = data["results"]
    assert len(rows) == 2 * 2 * 8  # domains x shots x methods
    assert set(rows[0]) == {"domain", "conditioning", "method", "ways", "shots", "queries", "episodes", "images",
                            "acc", "acc_ci95", "f1", "f1_ci95", "ms_per_episode"}
    assert {(r["domain"], r["conditioning"]) for r in rows} == {("natural", "natural"), ("medical", "unknown")}
    assert all(0.0 <= r["acc"] <= 1.0 and r["episodes"] == 4 for r in rows)
    with open(run / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    table = (run / "results.md").read_text()
    assert "| dcmcl |" in table and "medical 3-way 2-shot, via unknown" in table
    events = _events(run)
    assert "evaluate/natural/1shot/dcmcl/acc" in events.Tags()["scalars"]


def test_evaluate_without_a_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(BadInput, match="no checkpoint at .*make train"):
        evaluate_main(["--ckpt", str(tmp_path / "missing.ckpt")])


def test_print_config_shows_linked_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "conf/default.yaml", "--model.inner_lr=0.05", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["inner_lr"] == 0.05
    assert config["trainer"]["inference_mode"] is False
    assert config["data"]["ways"] == 5


def test_missing_shards_name_the_prepare_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare synthetic --domain natural"):
        main(["fit", "-c", "conf/default.yaml", f"--data.root={tmp_path}", "--trainer.max_steps=1",
              f"--trainer.logger.init_args.save_dir={tmp_path}"])


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_evaluates_every_domain_once(fit_args, tmp_path):
    """Two gloo ranks: every validation episode of both domains is counted once, batches mix domains."""
    cmd = [*PYTHON_M, *fit_args, "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.devices=2",
           "--trainer.strategy=ddp", "--data.val_episodes=4", "--data.tasks_per_batch=4", "--data.steps_per_epoch=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    events = _events(tmp_path / "dcmcl" / "version_0")
    for domain in ("natural", "medical"):
        assert [e.value for e in events.Scalars(f"val/episodes/{domain}")] == [4.0]
    assert events.Scalars("val/align")[-1].value > 0  # each rank's batches hold both domains


def test_intra_op_threads_share_the_available_cores_among_ranks_and_loader_workers(monkeypatch):
    import metacontrastive.cli as cli

    monkeypatch.setattr(cli, "available_cores", lambda: 16)
    assert cli.intra_op_threads(None, workers=0) == 16
    assert cli.intra_op_threads(None, workers=2) == 14
    assert cli.intra_op_threads(None, workers=2, local_ranks=4) == 2
    assert cli.intra_op_threads(None, workers=8, local_ranks=4) == 1  # never below one
    assert cli.intra_op_threads(3, workers=8, local_ranks=4) == 3  # asked for


def test_available_cores_are_the_affinity_capped_by_a_cgroup_quota(tmp_path, monkeypatch):
    import os

    from metacontrastive.cli import available_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert available_cores(cpu_max) == 4  # no quota
    cpu_max.write_text("250000 100000\n")
    assert available_cores(cpu_max) == 2  # 2.5 cores of quota
    cpu_max.write_text("50000 100000\n")
    assert available_cores(cpu_max) == 1  # half a core: still one thread
    assert available_cores(tmp_path / "absent") == 4  # no cgroup v2 file
