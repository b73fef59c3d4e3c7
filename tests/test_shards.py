"""Streaming shards back: every dropped sample counted by reason and named, truncated and unreadable shards,
full passes checked against the manifest, counts that reach the main process from DataLoader workers, and the
writer's stale staging folders."""
import logging
import os
import tarfile

import pytest
import webdataset as wds

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.shards import DomainWriter, RecordStream


def test_corrupt_images_are_dropped_counted_and_named(tmp_path, caplog, write_domain, small, batches):
    write_domain(tmp_path, "natural", corrupt={3, 17})
    dm = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **small)
    split = dm.split("train")[0]
    stream = RecordStream(split.urls, 8, seed=0, resampled=False)
    with caplog.at_level(logging.WARNING, logger="metacontrastive.data.shards"):
        records = list(stream)
    assert len(records) == 5 * 8 - 2 and stream.read == 5 * 8
    assert stream.skips.by_reason() == {"undecodable image": 2}
    assert stream.skips.examples["undecodable image"] == ["natural-train-00-003", "natural-train-02-001"]
    assert "dropped natural-train-00-003 (undecodable image" in caplog.text
    assert len(batches(dm, 2)) == 2  # training streams go on
    with pytest.raises(OSError):
        list(RecordStream(split.urls, 8, seed=0, resampled=False, strict=True))
    strict = EpisodicDataModule(domains=["natural"], root=str(tmp_path), strict_decode=True, **small)
    with pytest.raises(OSError):
        batches(strict, 4)


def _write_raw(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def test_samples_without_image_caption_or_label_are_counted_by_reason(tmp_path):
    good = {"png": b"\x89PNG not read: filtered out first", "txt": "a caption", "cls": 0}
    _write_raw(tmp_path / "part-000000.tar", [
        {"__key__": "no-image", "txt": "a caption", "cls": 0},
        {"__key__": "no-caption", "png": good["png"], "cls": 0},
        {"__key__": "no-label", "png": good["png"], "txt": "a caption"},
        {"__key__": "bad-label", "png": good["png"], "txt": "a caption", "cls": b"seven"},
    ])
    stream = RecordStream([str(tmp_path / "part-000000.tar")], 8, seed=0, resampled=False, labels={0})
    assert list(stream) == []
    assert stream.skips.by_reason() == {"no image": 1, "no caption": 1, "no label": 1, "bad label": 1}
    assert stream.skips.examples == {
        "no label": ["no-label"], "bad label": ["bad-label"], "no image": ["no-image"], "no caption": ["no-caption"]}


def test_a_truncated_shard_is_named_and_the_pass_falls_short_of_the_manifest(tmp_path, caplog, write_domain, small):
    write_domain(tmp_path, "natural", maxcount=10)
    shard = tmp_path / "natural" / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cuts a member's header or data in half
    split = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **small).split("train")[0]
    stream = RecordStream(split.urls, 8, seed=0, resampled=False, expected=split.num_samples)
    with caplog.at_level(logging.WARNING, logger="metacontrastive.data.shards"):
        assert 30 < len(list(stream)) < 40
    assert stream.skips.count >= 1  # the read error; a sample cut short before its image is one more
    assert f"read {stream.read} of the 40 samples the manifest lists" in caplog.text
    if "unreadable shard" in stream.skips.by_reason():
        assert stream.skips.examples["unreadable shard"][0].endswith("train-000001.tar")
    with pytest.raises((tarfile.ReadError, ValueError)):  # whichever the cut meets first
        list(RecordStream(split.urls, 8, seed=0, resampled=False, strict=True))


def test_a_pass_short_of_the_manifest_is_an_error_when_strict(tmp_path, write_domain, small):
    write_domain(tmp_path, "natural")
    split = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **small).split("train")[0]
    with pytest.raises(RuntimeError, match=r"read 40 of the 41 samples the manifest lists"):
        list(RecordStream(split.urls, 8, seed=0, resampled=False, strict=True, expected=41))
    assert len(list(RecordStream(split.urls, 8, seed=0, resampled=False, strict=True, expected=40))) == 40


def test_unreadable_shards_stop_a_resampled_stream(tmp_path):
    stream = RecordStream([str(tmp_path / "missing-000000.tar")], 8, seed=0, resampled=True)
    with pytest.raises(RuntimeError, match="read no sample"):
        next(iter(stream))


def test_drops_in_loader_workers_reach_the_data_module(tmp_path, write_domain, small):
    write_domain(tmp_path, "natural", corrupt={3, 17})
    dm = EpisodicDataModule(domains=["natural"], root=str(tmp_path), num_workers=2, **{**small, "steps_per_epoch": 40})
    loader = dm.train_dataloader()
    for _ in loader:  # 40 meta-batches over two workers: several passes over the 40 training samples
        pass
    dropped = dm.dropped()["natural"]["undecodable image"]
    assert dropped >= 2 * 2  # each worker meets both broken images at least once


def test_a_writer_removes_staging_left_by_a_killed_write_and_spares_a_live_one(tmp_path):
    dead = tmp_path / ".natural.partial-dead"
    dead.mkdir()
    (dead / ".writer-pid").write_text("999999999")  # no such process
    alive = tmp_path / ".natural.partial-alive"
    alive.mkdir()
    (alive / ".writer-pid").write_text(str(os.getpid()))
    with DomainWriter(tmp_path, "natural", ["a"], ["a {label}"], "test") as writer:
        writer.write("train", "k0", b"\x89PNG", "a a", 0)
    assert not dead.exists() and alive.exists()
    assert list(tmp_path.glob(".natural.partial-*")) == [alive]
    assert sorted(p.name for p in (tmp_path / "natural").iterdir()) == ["manifest.json", "train-000000.tar"]
