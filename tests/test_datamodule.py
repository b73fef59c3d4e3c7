"""EpisodicDataModule: episode correctness, seeding across ranks and workers, fixed evaluation episodes,
shard specs, the checks made before streaming and the handling of corrupt shards."""
import hashlib
import logging
import tarfile
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator
from PIL import Image

from metacontrastive.data.datamodule import EpisodicDataModule, MetaBatchStream
from metacontrastive.data.shards import SPLITS, DomainWriter, RecordStream
from metacontrastive.data.sources import manifest_url
from metacontrastive.module import MetaContrastiveModule

SMALL = dict(ways=3, shots=2, queries=2, tasks_per_batch=4, image_size=8, shuffle_buffer=16, reservoir=6,
             steps_per_epoch=4, val_episodes=6, test_episodes=6)


def _write_domain(root, domain, *, classes=5, per_class=8, short=0, labelled=True, corrupt=(), maxcount=1000):
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
                    caption = f"a photo of a {names[label]}" if labelled else f"{domain} {split} {(c * per_class + j) // 3}"
                    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                    if split == "train" and train_index in corrupt:
                        image = b"\x89PNG broken"  # written as they are: bytes that do not decode
                    writer.write(split, f"{domain}-{split}-{c:02d}-{j:03d}", image, caption, label)
                    train_index += split == "train"
    return root / domain


@pytest.fixture
def root(tmp_path):
    _write_domain(tmp_path, "natural")
    _write_domain(tmp_path, "medical")
    return tmp_path


def _fingerprint(task):
    images = torch.cat([task.support_images, task.query_images])  # (S + Q, 3, H, W)
    return hashlib.sha1(images.numpy().tobytes() + repr(task.texts).encode()).hexdigest()


def _batches(dm, n):
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_tasks_are_well_formed_episodes(root):
    dm = EpisodicDataModule(root=str(root), **SMALL)
    dm.setup("fit")
    for batch in _batches(dm, 3):
        assert len(batch) == 4 and {t.domain for t in batch} == {"natural", "medical"}
        for task in batch:
            assert task.support_images.shape == (6, 3, 8, 8) and task.query_images.shape == (6, 3, 8, 8)
            assert torch.bincount(task.support_labels).tolist() == [2, 2, 2]  # exactly K per support class
            assert set(task.query_labels.tolist()) <= set(task.support_labels.tolist())
            assert task.texts == [f"a photo of a {name}" for name in task.classes] and len(set(task.classes)) == 3
            assert task.domain_id == dm.domains.index(task.domain)


def test_episodes_are_reproducible_for_a_seed(root):
    def run(seed):
        dm = EpisodicDataModule(root=str(root), seed=seed, **SMALL)
        return [_fingerprint(t) for b in _batches(dm, 3) for t in b]

    assert run(0) == run(0)
    assert not set(run(0)) & set(run(1))


def test_a_stream_goes_on_across_epochs(root):
    dm = EpisodicDataModule(root=str(root), **SMALL)
    loader = dm.train_dataloader()
    epochs = [[_fingerprint(t) for b in loader for t in b] for _ in range(2)]
    assert len(epochs[0]) == len(epochs[1]) == 4 * 4
    assert not set(epochs[0]) & set(epochs[1])


def test_two_ranks_with_two_workers_never_share_an_episode(root):
    def rank_episodes(rank):
        dm = EpisodicDataModule(root=str(root), num_workers=2, **{**SMALL, "steps_per_epoch": 6})
        dm.trainer = SimpleNamespace(global_rank=rank, current_epoch=0)  # the rank comes from the trainer
        loader = dm.train_dataloader()
        assert isinstance(loader.dataset, MetaBatchStream) and loader.dataset.rank == rank
        batches = list(loader)
        _shutdown_workers_and_reset_iterator(loader)  # as Lightning does at teardown; gc would wait 5 s per loader
        assert len(batches) == len(loader) == 6  # steps_per_epoch, split over the workers
        return [_fingerprint(t) for b in batches for t in b]

    seen = rank_episodes(0) + rank_episodes(1)
    assert len(seen) == 2 * 6 * 4 and len(set(seen)) == len(seen)
    assert rank_episodes(1) == seen[24:]  # reproducible with workers too


@pytest.mark.parametrize("mode", ["round_robin", "uniform", "proportional"])
def test_every_meta_batch_mixes_domains(root, mode):
    dm = EpisodicDataModule(root=str(root), domain_sampling=mode, **{**SMALL, "tasks_per_batch": 2})
    assert all({t.domain for t in b} == {"natural", "medical"} for b in _batches(dm, 4))


def test_fixed_validation_episodes_are_identical_across_instances_and_training_seeds(root):
    def val(seed):
        dm = EpisodicDataModule(root=str(root), seed=seed, **SMALL)
        dm.setup("validate")
        return [[(_fingerprint(t), t.domain) for t in b] for b in dm.val_dataloader()]

    first, second = val(0), val(5)
    assert first == second
    assert sum(len(b) for b in first) == 2 * 6
    assert all({d for _, d in b} == {"natural", "medical"} for b in first)


def test_url_specs_stream_the_same_episodes_as_the_root(root):
    base = dict(root=str(root), **SMALL)
    specs = {"natural": f"pipe:cat {root}/natural/{{shard}}", "medical": f"{root}/medical/{{split}}-{{000000..000000}}.tar"}
    via_root = [_fingerprint(t) for b in _batches(EpisodicDataModule(**base), 2) for t in b]
    via_urls = [_fingerprint(t) for b in _batches(EpisodicDataModule(**{**base, "root": "/none", "urls": specs}), 2) for t in b]
    assert via_root == via_urls
    assert manifest_url("pipe:curl -sfL https://host/natural/{shard}") == "pipe:curl -sfL https://host/natural/manifest.json"


def test_a_brace_pattern_naming_missing_shards_is_an_error(root):
    dm = EpisodicDataModule(root=str(root), urls={"natural": f"{root}/natural/{{split}}-{{000000..000003}}.tar"}, **SMALL)
    with pytest.raises(ValueError, match="names 4 shards but the manifest lists 1"):
        dm.setup("fit")


def test_unknown_domain_names_the_available_ones(root):
    dm = EpisodicDataModule(domains=["natural", "satellite"], root=str(root), **SMALL)
    with pytest.raises(ValueError, match=r"unknown domain 'satellite'.*\['medical', 'natural'\]"):
        dm.setup("fit")


def test_missing_manifest_names_the_prepare_command(root, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="python -m metacontrastive prepare synthetic --domain natural"):
        EpisodicDataModule(root=str(tmp_path_factory.mktemp("empty")), **SMALL).setup("fit")  # nothing prepared yet
    (root / "natural" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="python -m metacontrastive prepare synthetic --domain natural"):
        EpisodicDataModule(root=str(root), **SMALL).setup("fit")
    with pytest.raises(FileNotFoundError, match="prepare"):
        EpisodicDataModule(root=str(root), urls={"natural": f"{root}/natural/{{shard}}"}, **SMALL).setup("fit")


def test_more_ways_than_classes_is_an_error_with_both_numbers(root):
    with pytest.raises(ValueError, match="6-way episodes need 6 classes.*has 5 classes"):
        EpisodicDataModule(root=str(root), **{**SMALL, "ways": 6}).setup("fit")


def test_small_classes_are_dropped_with_a_counting_warning(tmp_path, caplog):
    _write_domain(tmp_path, "natural", short=2)
    dm = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **SMALL)
    with caplog.at_level(logging.WARNING, logger="metacontrastive.data.sources"):
        dm.setup("fit")
    assert "dropped 2 of 5 classes with fewer than shots + queries = 4 samples" in caplog.text
    assert dm.split("train")[0].usable == [0, 1, 2]
    assert {c for b in _batches(dm, 4) for t in b for c in t.classes} == {"natural thing 0", "natural thing 1", "natural thing 2"}


def test_configuration_errors_are_raised_at_construction():
    with pytest.raises(ValueError, match="cannot mix 2 domains"):
        EpisodicDataModule(tasks_per_batch=1)
    with pytest.raises(ValueError, match="reservoir=3"):
        EpisodicDataModule(reservoir=3, shots=2, queries=2)


def test_corrupt_images_are_skipped_counted_and_logged(tmp_path, caplog):
    _write_domain(tmp_path, "natural", corrupt={3, 17})
    dm = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **SMALL)
    split = dm.split("train")[0]
    stream = RecordStream(split.urls, 8, seed=0, resampled=False)
    with caplog.at_level(logging.WARNING, logger="metacontrastive.data.shards"):
        records = list(stream)
    assert len(records) == 5 * 8 - 2 and stream.read == 5 * 8 and stream.skips.count == 2
    assert caplog.text.count("skipped a corrupt sample") == 2
    assert len(_batches(dm, 2)) == 2  # training streams go on
    with pytest.raises(OSError):
        list(RecordStream(split.urls, 8, seed=0, resampled=False, strict=True))
    strict = EpisodicDataModule(domains=["natural"], root=str(tmp_path), strict_decode=True, **SMALL)
    with pytest.raises(OSError):
        _batches(strict, 4)


def test_a_truncated_shard_is_skipped_and_counted(tmp_path):
    _write_domain(tmp_path, "natural", maxcount=10)
    shard = tmp_path / "natural" / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cuts a member's header or data in half
    urls = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **SMALL).split("train")[0].urls
    stream = RecordStream(urls, 8, seed=0, resampled=False)
    assert 30 < len(list(stream)) < 40
    assert stream.skips.count >= 1  # the read error; a sample cut short before its image is one more
    with pytest.raises((tarfile.ReadError, ValueError)):  # whichever the cut meets first
        list(RecordStream(urls, 8, seed=0, resampled=False, strict=True))


def test_unreadable_shards_stop_a_resampled_stream(tmp_path):
    stream = RecordStream([str(tmp_path / "missing-000000.tar")], 8, seed=0, resampled=True)
    with pytest.raises(RuntimeError, match="read no sample"):
        next(iter(stream))


def test_caption_only_domains_give_caption_tasks_the_model_trains_on(tmp_path):
    _write_domain(tmp_path, "natural")
    _write_domain(tmp_path, "web", labelled=False)
    dm = EpisodicDataModule(domains=["natural", "web"], root=str(tmp_path), support_size=6, query_size=4,
                            **{**SMALL, "tasks_per_batch": 2})
    dm.setup("fit")
    batch = _batches(dm, 1)[0]
    web = next(t for t in batch if t.domain == "web")
    assert web.classes == [] and web.support_images.shape[0] == 6 and web.query_images.shape[0] == 4
    labels = torch.cat([web.support_labels, web.query_labels])
    assert len(set(web.texts)) == len(web.texts) and sorted(set(labels.tolist())) == list(range(len(web.texts)))
    assert len(web.texts) < 10  # captions repeat, and identical captions share a label
    module = MetaContrastiveModule(domains=["natural", "web"], domain_dropout=0.0)
    module.log = lambda *args, **kwargs: None
    assert torch.isfinite(module.meta_step(batch, "train"))
    val = next(iter(dm.val_dataloader()))
    assert {t.domain for t in val} == {"natural", "web"}
    module.meta_step(val, "val")
    assert not module.episode_scores["val"]["web"]["acc"].update_called  # no accuracy for caption-only tasks
