"""Shared fixtures: tiny demo shards written once per session, small hand-made domains, and the real default
configuration with tiny limits."""
from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

# before torch is imported: tests run in parallel (pytest-xdist, `make test`) and start subprocesses, and torch
# processes that wait actively for work spin against each other on a small machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# under pytest-xdist each worker and the processes its tests start (fit, evaluate, DDP ranks, the README's commands)
# take the worker's share of the cores: with the full pool each, they oversubscribed the cores (the suite on 2 cores:
# 286 s in one run with the full pool in subprocesses, 227 to 266 s in five with this)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_SHARE = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_SHARE))

import numpy as np
import pytest
import torch
from PIL import Image

from metacontrastive.data.manifest import SPLITS
from metacontrastive.data.shards import DomainWriter
from metacontrastive.data.synthetic import write_synthetic

CONF = Path(__file__).resolve().parents[1] / "conf"

# Limits that make the default run train and validate in seconds on a CPU (5-way so that the demo's 6
# validation and test classes of natural and 5 of medical all serve).
TINY = ["--data.ways=5", "--data.shots=2", "--data.queries=3", "--data.image_size=16", "--data.steps_per_epoch=3",
        "--data.val_episodes=2", "--data.tasks_per_batch=2"]


def pytest_configure(config):
    """Under pytest-xdist, each worker takes its share of the cores (its subprocesses too: ``OMP_NUM_THREADS``)."""
    if _WORKERS > 1:
        torch.set_num_threads(_SHARE)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Synthetic natural + medical shards at 16 px, 24 images per class (enough for 5-way 5-shot 5-query)."""
    root = tmp_path_factory.mktemp("shards")
    for domain in ("natural", "medical"):
        write_synthetic(domain, root, per_class=24, size=16, seed=0)
    return root


@pytest.fixture(scope="session")
def fit_args_in(demo_root):
    """A function of a log folder: ``fit`` on the real ``conf/default.yaml`` and the demo shards, with tiny
    limits and logs in that folder; append ``--trainer.max_steps=N`` or any override."""
    def fit_args(logs) -> list[str]:
        return ["fit", "-c", str(CONF / "default.yaml"), "--data.domains=[natural,medical]", f"--data.root={demo_root}",
                f"--trainer.logger.init_args.save_dir={logs}", *TINY]
    return fit_args


@pytest.fixture
def fit_args(fit_args_in, tmp_path):
    """``fit_args_in(tmp_path)``."""
    return fit_args_in(tmp_path)


def write_random_domain(root, domain, *, classes=5, per_class=8, short=0, labelled=True, corrupt=(), maxcount=1000):
    """Class-disjoint train/val/test splits of ``classes`` classes of ``per_class`` random 8 px images; the
    last ``short`` train classes get 3 images; train samples whose index is in ``corrupt`` get image bytes
    that do not decode. Caption-only data (``labelled=False``) repeats each caption three times."""
    rng = np.random.default_rng(zlib.crc32(domain.encode()))
    names = [f"{domain} thing {i}" for i in range(3 * classes)] if labelled else []
    train_index = 0
    with DomainWriter(root, domain, names, ["a photo of a {label}"], "test", maxcount=maxcount) as writer:
        for s, split in enumerate(SPLITS):
            for c in range(classes):
                for j in range(3 if split == "train" and c >= classes - short else per_class):
                    label = s * classes + c if labelled else None
                    pair = (c * per_class + j) // 3  # caption-only: three images share each caption
                    caption = f"a photo of a {names[label]}" if labelled else f"{domain} {split} {pair}"
                    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                    if split == "train" and train_index in corrupt:
                        image = b"\x89PNG broken"  # written as they are: bytes that do not decode
                    writer.write(split, f"{domain}-{split}-{c:02d}-{j:03d}", image, caption, label)
                    train_index += split == "train"
    return root / domain


@pytest.fixture
def write_domain():
    """``write_random_domain``, for tests that build their own domains."""
    return write_random_domain


@pytest.fixture
def shard_root(tmp_path):
    """Two small random domains, natural and medical: 5 classes per split, 8 images per class."""
    write_random_domain(tmp_path, "natural")
    write_random_domain(tmp_path, "medical")
    return tmp_path


@pytest.fixture
def small() -> dict:
    """Data module settings for the small random domains: 3-way 2-shot 2-query tasks of 8 px images."""
    return dict(ways=3, shots=2, queries=2, tasks_per_batch=4, image_size=8, shuffle_buffer=16, reservoir=6,
                steps_per_epoch=4, val_episodes=6, test_episodes=6)


def _fingerprint(task) -> str:
    images = torch.cat([task.support_images, task.query_images])  # (S + Q, 3, H, W)
    return hashlib.sha1(images.numpy().tobytes() + repr(task.texts).encode()).hexdigest()


def _batches(dm, n: int) -> list:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


@pytest.fixture
def fingerprint():
    """A task's identity: a hash of its images and texts."""
    return _fingerprint


@pytest.fixture
def batches():
    """The first ``n`` training meta-batches of a data module."""
    return _batches
