"""Run folders and resume through the real entry point: a run killed mid-epoch goes on in its own folder from
its last checkpoint without replaying the episodes it trained on; Ctrl-C leaves a checkpoint; the same seed
gives the same losses; bad run settings are one clear line."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metacontrastive.cli import main
from metacontrastive.errors import BadInput
from metacontrastive.runs import UNTRAINED, check_ckpt_path, resolve_run

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture
def run_args(fit_args, tmp_path):
    """The default configuration with a checkpoint every 3 steps and the episode log, plus the env to run it."""
    config = yaml.safe_load(Path(fit_args[2]).read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ResumeCheckpoint"):
            callback["init_args"]["every_n_steps"] = 3
    config["trainer"]["callbacks"].append({"class_path": "episode_log.EpisodeLog"})
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(config))
    args = [sys.executable, "-m", "metacontrastive", *fit_args[:2], str(conf), *fit_args[3:],
            "--data.steps_per_epoch=40", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false"]
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MC_EPISODE_LOG": str(tmp_path / "episodes.txt")}
    return args, env, tmp_path


def _episodes(path):
    lines = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return [(int(step), fingerprint) for step, fingerprint in lines]


def _wait_for(predicate, process, timeout=300):
    start = time.monotonic()
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_in_place_without_replaying_episodes(run_args):
    args, env, tmp = run_args
    first = subprocess.Popen([*args, "--trainer.max_steps=30"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp / "dcmcl" / "version_0" / "checkpoints" / "last.ckpt"
    _wait_for(lambda: last.exists() and any(step >= 8 for step, _ in _episodes(tmp / "episodes.txt")), first)
    first.send_signal(signal.SIGKILL)  # no chance to save anything: the last step checkpoint is what remains
    first.wait()
    consumed = _episodes(tmp / "episodes.txt")
    saved_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert saved_step >= 3 and saved_step % 3 == 0

    (tmp / "episodes.txt").rename(tmp / "before.txt")
    resumed = subprocess.run([*args, "--ckpt_path", "last", "--trainer.max_steps=16"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _episodes(tmp / "episodes.txt")
    assert after[0][0] == saved_step  # the global step goes on from the checkpoint
    assert not {f for _, f in after} & {f for _, f in consumed}  # nothing the killed run trained on comes back
    assert sorted(p.name for p in (tmp / "dcmcl").iterdir()) == ["version_0"]  # logs go on in the same folder
    events = EventAccumulator(str(tmp / "dcmcl" / "version_0"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert max(steps) >= 15 and min(steps) < saved_step  # one curve, before and after the resume


@pytest.mark.slow
def test_ctrl_c_leaves_a_checkpoint_to_resume_from(run_args):
    args, env, tmp = run_args
    process = subprocess.Popen([*args, "--trainer.max_steps=200"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    _wait_for(lambda: any(step >= 4 for step, _ in _episodes(tmp / "episodes.txt")), process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    last = tmp / "dcmcl" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.exists(), err[-3000:]
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step >= 4 and "interrupted at step" in out + err


def _losses(run):
    events = EventAccumulator(str(run))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_first_ten_losses(fit_args_in, tmp_path):
    for name in ("a", "b"):
        main([*fit_args_in(tmp_path / name), "--trainer.max_steps=10", "--trainer.log_every_n_steps=1",
              "--trainer.enable_progress_bar=false", "--data.steps_per_epoch=10"])
    first, second = _losses(tmp_path / "a" / "dcmcl" / "version_0"), _losses(tmp_path / "b" / "dcmcl" / "version_0")
    assert len(first) == 10 and first == second


def test_resume_without_a_run_to_resume_says_how_to_start_one(fit_args):
    with pytest.raises(BadInput, match="--ckpt_path last: no checkpoints/last.ckpt under .*start the run first"):
        main([*fit_args, "--ckpt_path", "last"])


def test_a_new_run_into_a_folder_with_checkpoints_is_refused(fit_args, tmp_path):
    (tmp_path / "dcmcl" / "mine" / "checkpoints").mkdir(parents=True)
    with pytest.raises(BadInput, match=r"already holds checkpoints: resume it with --ckpt_path last"):
        main([*fit_args, "--run", "mine"])


def test_test_without_a_checkpoint_is_refused(fit_args):
    with pytest.raises(BadInput, match="test scores a trained model: pass --ckpt_path"):
        main(["test", *fit_args[1:]])


def test_untrained_scores_a_fresh_model_and_names_no_file_to_check():
    config = Namespace(ckpt_path=UNTRAINED, run=None, trainer=Namespace(logger=None))
    check_ckpt_path(config.ckpt_path)  # neither it nor "last" is read as a file
    check_ckpt_path("last")
    resolve_run(config, "test")
    assert config.ckpt_path is None


def test_an_unwritable_log_folder_is_one_line(fit_args, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(BadInput, match=r"cannot write logs to .*file.*--trainer.logger.init_args.save_dir"):
        main([*fit_args, f"--trainer.logger.init_args.save_dir={blocked / 'logs'}"])


def test_a_run_failing_before_its_first_step_leaves_no_folder(fit_args, tmp_path):
    with pytest.raises(ValueError, match="20-way episodes need 20 classes"):
        main([*fit_args, "--data.ways=20"])  # the demo's train splits have 18 and 15 classes
    assert not (tmp_path / "dcmcl").exists() or not any((tmp_path / "dcmcl").iterdir())
