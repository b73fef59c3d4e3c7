"""Checkpoints: never a model with non-finite weights among the best or as last.ckpt; last.ckpt keeps the
whole state; a checkpoint the user names that is missing, truncated, corrupt or not this project's is one
line (``BadInput``) that names it and another one, before anything is built."""
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metacontrastive.callbacks.checkpoints import FiniteModelCheckpoint, ResumeCheckpoint, finite_weights
from metacontrastive.cli import evaluate_main, main
from metacontrastive.errors import BadInput
from metacontrastive.runs import check_checkpoint


class _Saving:
    """The parts of a Trainer that the callbacks read, recording the checkpoints they save."""

    def __init__(self, module, folder):
        self.lightning_module, self.global_step, self.saved, self.weights_only = module, 6, [], []
        self.state = SimpleNamespace(stage="train")
        self.sanity_checking, self.checkpoint_callback, self.is_global_zero = False, None, True
        self.log_dir, self.default_root_dir = str(folder), str(folder)

    def save_checkpoint(self, path, weights_only=None):
        self.saved.append(path)
        self.weights_only.append(weights_only)


def test_a_model_with_non_finite_weights_is_never_best(tmp_path):
    module = torch.nn.Linear(2, 2)
    trainer = _Saving(module, tmp_path)
    callback = FiniteModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    assert not callback.check_monitor_top_k(trainer, torch.tensor(float("nan")))
    assert callback.check_monitor_top_k(trainer, torch.tensor(0.5))  # finite weights, finite score: kept
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    assert not finite_weights(module)
    assert not callback.check_monitor_top_k(trainer, torch.tensor(0.9))


def test_last_checkpoint_is_written_on_schedule_and_interruption_never_with_non_finite_weights(tmp_path):
    module = torch.nn.Linear(2, 2)
    trainer = _Saving(module, tmp_path)
    callback = ResumeCheckpoint(every_n_steps=3, every_minutes=60)
    callback.on_train_batch_end(trainer, module, None, None, 0)  # step 6: a multiple of 3
    trainer.global_step = 7
    callback.on_train_batch_end(trainer, module, None, None, 0)  # not due
    callback.on_exception(trainer, module, KeyboardInterrupt())
    assert trainer.saved == [tmp_path / "checkpoints" / "last.ckpt"] * 2
    assert trainer.weights_only == [False] * 2  # the optimiser and loops too, which a resume needs
    with torch.no_grad():
        module.bias[0] = float("nan")
    callback.on_exception(trainer, module, KeyboardInterrupt())
    assert len(trainer.saved) == 2  # the previous last.ckpt stays


# ---------------------------------------------------------------- a checkpoint file the user names

@pytest.fixture(scope="module")
def trained(fit_args_in, tmp_path_factory):
    """The ``last.ckpt`` of a one-step run of the default configuration on the demo shards."""
    logs = tmp_path_factory.mktemp("logs")
    main([*fit_args_in(logs), "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"])
    return logs / "dcmcl" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture
def bad(trained, tmp_path):
    """A function of a kind (truncated, text, empty, flipped, foreign): a bad checkpoint of that kind in
    ``<tmp>/run/checkpoints/``, beside a good copy, ``good.ckpt``."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    data = trained.read_bytes()
    shutil.copy(trained, folder / "good.ckpt")

    def make(kind: str) -> Path:
        path = folder / f"{kind}.ckpt"
        if kind == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif kind == "text":
            path.write_text("version https://git-lfs.github.com/spec/v1\n")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "flipped":  # one byte of the weights changed: torch still loads it, the zip checksum tells
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            path.write_bytes(bytes(flipped))
        elif kind == "foreign":  # a sound file of torch.save that no fit wrote
            torch.save({"weights": torch.zeros(2)}, path)
        return path
    return make


REASONS = {"truncated": "truncated", "text": "not a zip archive", "empty": "an empty file",
           "flipped": "fails its checksum", "foreign": "not a checkpoint of this project"}


def test_a_checkpoint_a_fit_wrote_passes_the_check(trained):
    assert check_checkpoint(trained) == trained


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_bad_checkpoint_is_one_line_naming_it_the_reason_and_another_one(bad, kind):
    path = bad(kind)
    with pytest.raises(BadInput) as info:
        check_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and REASONS[kind] in message
    assert "pass another one, e.g." in message and "good.ckpt" in message
    assert "\n" not in message


def test_a_missing_checkpoint_alone_in_its_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(BadInput, match="no checkpoint at .*missing.ckpt; train one with `make train`"):
        check_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_evaluate_test_validate_and_fit_refuse_a_bad_checkpoint_before_building_anything(bad, fit_args, kind):
    path = bad(kind)
    with pytest.raises(BadInput, match=f"{path.name} is not a readable checkpoint"):
        evaluate_main(["--ckpt", str(path)])
    for command in ("test", "validate", "fit"):
        with pytest.raises(BadInput, match=f"{path.name} is not a readable checkpoint"):
            main([command, *fit_args[1:], "--ckpt_path", str(path)])


def test_a_bad_last_checkpoint_names_the_best_one_beside_it(trained, fit_args, tmp_path):
    run = tmp_path / "dcmcl" / "version_0"
    shutil.copytree(trained.parent.parent, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    best = next(p.name for p in last.parent.glob("step*.ckpt"))
    with pytest.raises(BadInput, match=rf"last.ckpt is not a readable checkpoint \(truncated.*e\.g\. .*{re.escape(best)}"):
        main(["test", *fit_args[1:], "--ckpt_path", "last"])


def test_the_command_line_ends_a_bad_checkpoint_with_one_line_and_status_2(bad):
    path = bad("truncated")
    result = subprocess.run([sys.executable, "-m", "metacontrastive", "evaluate", "--ckpt", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path} is not a readable checkpoint"), result.stderr
    assert "Traceback" not in result.stderr
