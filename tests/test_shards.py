"""Streaming shards back: counted skips of corrupt images, truncated and unreadable shards."""
import logging
import tarfile

import pytest

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.shards import RecordStream

def test_corrupt_images_are_skipped_counted_and_logged(tmp_path, caplog, write_domain, small, batches):
    write_domain(tmp_path, "natural", corrupt={3, 17})
    dm = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **small)
    split = dm.split("train")[0]
    stream = RecordStream(split.urls, 8, seed=0, resampled=False)
    with caplog.at_level(logging.WARNING, logger="metacontrastive.data.shards"):
        records = list(stream)
    assert len(records) == 5 * 8 - 2 and stream.read == 5 * 8 and stream.skips.count == 2
    assert caplog.text.count("skipped a corrupt sample") == 2
    assert len(batches(dm, 2)) == 2  # training streams go on
    with pytest.raises(OSError):
        list(RecordStream(split.urls, 8, seed=0, resampled=False, strict=True))
    strict = EpisodicDataModule(domains=["natural"], root=str(tmp_path), strict_decode=True, **small)
    with pytest.raises(OSError):
        batches(strict, 4)


def test_a_truncated_shard_is_skipped_and_counted(tmp_path, write_domain, small):
    write_domain(tmp_path, "natural", maxcount=10)
    shard = tmp_path / "natural" / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cuts a member's header or data in half
    urls = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **small).split("train")[0].urls
    stream = RecordStream(urls, 8, seed=0, resampled=False)
    assert 30 < len(list(stream)) < 40
    assert stream.skips.count >= 1  # the read error; a sample cut short before its image is one more
    with pytest.raises((tarfile.ReadError, ValueError)):  # whichever the cut meets first
        list(RecordStream(urls, 8, seed=0, resampled=False, strict=True))


def test_unreadable_shards_stop_a_resampled_stream(tmp_path):
    stream = RecordStream([str(tmp_path / "missing-000000.tar")], 8, seed=0, resampled=True)
    with pytest.raises(RuntimeError, match="read no sample"):
        next(iter(stream))
