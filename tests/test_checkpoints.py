"""Checkpoints a run resumes from: never a model with non-finite weights among the best or as last.ckpt."""
from types import SimpleNamespace

import torch

from metacontrastive.callbacks.checkpoints import FiniteModelCheckpoint, ResumeCheckpoint, finite_weights


class _Saving:
    """The parts of a Trainer that the callbacks read, recording the checkpoints they save."""

    def __init__(self, module, folder):
        self.lightning_module, self.global_step, self.saved = module, 6, []
        self.state = SimpleNamespace(stage="train")
        self.sanity_checking, self.checkpoint_callback, self.is_global_zero = False, None, True
        self.log_dir, self.default_root_dir = str(folder), str(folder)

    def save_checkpoint(self, path):
        self.saved.append(path)


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
    with torch.no_grad():
        module.bias[0] = float("nan")
    callback.on_exception(trainer, module, KeyboardInterrupt())
    assert len(trainer.saved) == 2  # the previous last.ckpt stays
