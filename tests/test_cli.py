"""End to end through the real entry point: `python -m metacontrastive fit` on tiny shards."""
import csv
import json
import math
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from metacontrastive.callbacks.progress import StepProgressBar, last_epoch
from metacontrastive.cli import MetaCLI, evaluate_main, main, quiet_library_warnings
from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.errors import BadInput
from metacontrastive.evaluation import METHODS
from metacontrastive.intower import TAIL_METHODS
from metacontrastive.module import MetaContrastiveModule
from metacontrastive.reporting import FILES

PYTHON_M = [sys.executable, "-m", "metacontrastive"]
# What a run printed before it was made quiet: Lightning's log line for every last.ckpt that ResumeCheckpoint saved
# without saying weights_only, two warnings of Lightning's that quiet_library_warnings ignores, and the Rich bar's
# "Epoch 2/-2" for a run bounded by max_steps.
NOISE = ["`weights_only` was not set", "`isinstance(treespec, LeafSpec)` is deprecated",
         "Your `IterableDataset` has `__len__` defined"]


def _noise(output: str) -> list[str]:
    """The lines of ``output`` that hold one of ``NOISE`` or a negative epoch count."""
    return [line for line in output.splitlines() if any(n in line for n in NOISE) or re.search(r"Epoch \d+/-\d", line)]


def test_fast_dev_run_of_the_default_configuration(fit_args):
    """One training and one validation step of the real entry point and the real default configuration."""
    cmd = [*PYTHON_M, *fit_args, "--trainer.fast_dev_run=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final validation accuracy natural" in result.stdout and "final validation accuracy medical" in result.stdout
    assert not _noise(result.stdout + result.stderr)


@pytest.fixture(scope="module")
def fitted(fit_args_in, tmp_path_factory):
    """A short run of the default configuration through the real entry point: (run folder, stdout, stderr)."""
    logs = tmp_path_factory.mktemp("logs")
    cmd = [*PYTHON_M, *fit_args_in(logs), "--trainer.max_steps=7", "--trainer.log_every_n_steps=1", "--model.inner_lr=0.05"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return logs / "dcmcl" / "version_0", result.stdout, result.stderr


def _events(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


@pytest.mark.slow
def test_fit_writes_events_checkpoint_and_config(fitted):
    run, *_ = fitted
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
    run, *_ = fitted
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
    run, stdout, _ = fitted
    assert f"run folder: {run}" in stdout
    assert "best checkpoint: " in stdout and "final validation accuracy natural: " in stdout
    assert "make eval CKPT=" in stdout and "make tensorboard" in stdout
    assert "ms/step" in stdout and "waiting for data" in stdout  # the ScalingCallback's summary


@pytest.mark.slow
def test_fit_prints_no_library_noise_and_a_true_epoch_count(fitted):
    _, stdout, stderr = fitted
    assert not _noise(stdout + stderr)
    assert "Epoch 2/2" in stdout  # 7 steps of 3 per epoch: epochs 0, 1 and 2 (Lightning counts from 0)
    assert "v_num: 0" in stdout and "v_num: 0.000" not in stdout  # the run's version, not a metric


@pytest.mark.slow
def test_evaluate_writes_the_table_files_beside_the_checkpoint(fitted):
    run, *_ = fitted
    cmd = [*PYTHON_M, "evaluate", "--ckpt", str(run / "checkpoints" / "last.ckpt"),
           "--ways", "3", "--shots", "1,2", "--queries", "3", "--episodes", "4", "--holdout-domain", "medical"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not _noise(result.stdout + result.stderr)
    assert {p.name for p in run.iterdir()} >= set(FILES)
    data = json.loads((run / "results.json").read_text())
    assert set(data) == {"settings", "seconds", "results"}
    rows = data["results"]
    # domains x shots x methods: every method but the two that need a cut image tower, which evaluate says it left out
    assert len(rows) == 2 * 2 * (len(METHODS) - len(TAIL_METHODS))
    assert "tail_finetune, tail_film left out" in result.stdout
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


def test_quiet_library_warnings_ignores_two_of_lightnings_and_nothing_else():
    leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead."
    sized = "Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading ..."
    ours = "val domain 'natural': accuracy after adaptation, 20.0% +- 0.0, is at chance (20.0%)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn_explicit(leaf, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(sized, UserWarning, "data.py", 123, module="lightning.pytorch.utilities.data")
        warnings.warn_explicit(sized, UserWarning, "x.py", 1, module="metacontrastive.data.tasks")  # not Lightning's
        warnings.warn_explicit(ours, UserWarning, "module.py", 489, module="metacontrastive.module")
        warnings.warn_explicit(leaf.replace("LeafSpec", "Other"), FutureWarning, "_pytree.py", 21,
                               module="lightning.pytorch.utilities._pytree")
    assert [str(w.message) for w in caught] == [sized, ours, leaf.replace("LeafSpec", "Other")]


def _trainer(**kwargs):
    return SimpleNamespace(**{"max_epochs": -1, "max_steps": -1, "num_training_batches": 100,
                              "accumulate_grad_batches": 1, **kwargs})


def test_the_last_epoch_is_where_max_steps_or_max_epochs_ends_the_run():
    assert last_epoch(_trainer(max_steps=300)) == 2  # 300 steps of 100: epochs 0, 1, 2
    assert last_epoch(_trainer(max_steps=301)) == 3  # one step into a fourth epoch
    assert last_epoch(_trainer(max_steps=7, num_training_batches=3)) == 2
    assert last_epoch(_trainer(max_steps=300, accumulate_grad_batches=4)) == 11  # 25 optimiser steps per epoch
    assert last_epoch(_trainer(max_steps=300, max_epochs=2)) == 1  # max_epochs comes first
    assert last_epoch(_trainer(max_epochs=5)) == 4
    assert last_epoch(_trainer()) is None  # nothing bounds the run
    assert last_epoch(_trainer(max_steps=300, num_training_batches=float("inf"))) is None


def test_the_progress_bar_says_epoch_2_of_2_where_lightnings_says_2_of_minus_2():
    bar = StepProgressBar()
    bar._trainer = _trainer(max_steps=300)
    assert bar._get_train_description(2).strip() == "Epoch 2/2"


@pytest.mark.parametrize("enabled", [True, False])
def test_the_cli_puts_in_the_step_progress_bar_unless_the_bar_is_off(fit_args, enabled):
    cli = MetaCLI(MetaContrastiveModule, EpisodicDataModule, run=False,
                  args=[*fit_args[1:], f"--trainer.enable_progress_bar={str(enabled).lower()}"])
    bars = [c for c in cli.trainer.callbacks if isinstance(c, StepProgressBar)]
    assert len(bars) == (1 if enabled else 0)
