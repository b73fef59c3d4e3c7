"""End to end through the real entry point: `python -m metacontrastive fit` on tiny shards."""
import math
import subprocess
import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metacontrastive.cli import main

FAST = ["--data.ways=5", "--data.shots=2", "--data.queries=3", "--data.image_size=16",
        "--data.steps_per_epoch=3", "--data.val_episodes=2", "--data.tasks_per_batch=2"]


@pytest.mark.slow
def test_fit_writes_events_checkpoint_and_config(demo_root, tmp_path):
    cmd = [sys.executable, "-m", "metacontrastive", "fit", "-c", "conf/default.yaml",
           "--data.domains=[natural,medical]", f"--data.root={demo_root}", "--trainer.max_steps=7", "--trainer.log_every_n_steps=1",
           f"--trainer.logger.init_args.save_dir={tmp_path}", "--model.inner_lr=0.05", *FAST]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "dcmcl" / "version_0"
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/align", "train/query_loss/natural", "train/query_loss/medical",
                "val/acc/natural", "val/acc/medical", "val/acc"}
    assert expected <= tags, expected - tags
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))
    assert len(events.Scalars("val/acc")) == 3  # one per 3-step epoch, and one when max_steps ends mid-epoch
    assert (run / "checkpoints" / "last.ckpt").exists()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["inner_lr"] == 0.05 and config["trainer"]["max_steps"] == 7
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["domains"] == ["natural", "medical"]  # linked from data.domains


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
def test_ddp_on_two_cpu_processes_evaluates_every_domain_once(demo_root, tmp_path):
    """Two gloo ranks: every validation episode of both domains is counted once, batches mix domains."""
    cmd = [sys.executable, "-m", "metacontrastive", "fit", "-c", "conf/default.yaml",
           "--data.domains=[natural,medical]", f"--data.root={demo_root}", "--trainer.max_steps=2",
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
           f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.val_episodes=4", *FAST[:-2],
           "--data.steps_per_epoch=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "dcmcl" / "version_0"))
    events.Reload()
    for domain in ("natural", "medical"):
        assert [e.value for e in events.Scalars(f"val/episodes/{domain}")] == [4.0]
    assert events.Scalars("val/align")[-1].value > 0  # each rank's batches hold both domains
