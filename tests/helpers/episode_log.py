"""A callback for the resume tests: appends ``<global step> <task fingerprint>`` for every training task to the
file named by ``MC_EPISODE_LOG``, flushed at once, so that a test can read what a killed run trained on."""
import hashlib
import os

import torch
from lightning.pytorch.callbacks import Callback


class EpisodeLog(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(os.environ["MC_EPISODE_LOG"], "a") as log:
            for task in batch:
                images = torch.cat([task.support_images, task.query_images]).cpu().numpy().tobytes()
                log.write(f"{trainer.global_step} {hashlib.sha1(images).hexdigest()}\n")
            log.flush()
