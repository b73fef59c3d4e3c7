"""The manifest: shard URL specs, and the checks made on a split before anything streams."""
import logging

import pytest

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.manifest import manifest_url

def test_url_specs_stream_the_same_episodes_as_the_root(shard_root, small, fingerprint, batches):
    base = dict(root=str(shard_root), **small)
    specs = {"natural": f"pipe:cat {shard_root}/natural/{{shard}}",
             "medical": f"{shard_root}/medical/{{split}}-{{000000..000000}}.tar"}
    via_root = [fingerprint(t) for b in batches(EpisodicDataModule(**base), 2) for t in b]
    elsewhere = EpisodicDataModule(**{**base, "root": "/none", "urls": specs})
    via_urls = [fingerprint(t) for b in batches(elsewhere, 2) for t in b]
    assert via_root == via_urls
    assert manifest_url("pipe:curl -sfL https://host/natural/{shard}") == "pipe:curl -sfL https://host/natural/manifest.json"


def test_a_brace_pattern_naming_missing_shards_is_an_error(shard_root, small):
    dm = EpisodicDataModule(root=str(shard_root), urls={"natural": f"{shard_root}/natural/{{split}}-{{000000..000003}}.tar"}, **small)
    with pytest.raises(ValueError, match="names 4 shards but the manifest lists 1"):
        dm.setup("fit")


def test_unknown_domain_names_the_available_ones(shard_root, small):
    dm = EpisodicDataModule(domains=["natural", "satellite"], root=str(shard_root), **small)
    with pytest.raises(ValueError, match=r"unknown domain 'satellite'.*\['medical', 'natural'\]"):
        dm.setup("fit")


def test_missing_manifest_names_the_prepare_command(shard_root, tmp_path_factory, small):
    with pytest.raises(FileNotFoundError, match="python -m metacontrastive prepare synthetic --domain natural"):
        EpisodicDataModule(root=str(tmp_path_factory.mktemp("empty")), **small).setup("fit")  # nothing prepared yet
    (shard_root / "natural" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="python -m metacontrastive prepare synthetic --domain natural"):
        EpisodicDataModule(root=str(shard_root), **small).setup("fit")
    with pytest.raises(FileNotFoundError, match="prepare"):
        EpisodicDataModule(root=str(shard_root), urls={"natural": f"{shard_root}/natural/{{shard}}"}, **small).setup("fit")


def test_more_ways_than_classes_is_an_error_with_both_numbers(shard_root, small):
    with pytest.raises(ValueError, match="6-way episodes need 6 classes.*has 5 classes"):
        EpisodicDataModule(root=str(shard_root), **{**small, "ways": 6}).setup("fit")


def test_small_classes_are_dropped_with_a_counting_warning(tmp_path, caplog, write_domain, small, batches):
    write_domain(tmp_path, "natural", short=2)
    dm = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **small)
    with caplog.at_level(logging.WARNING, logger="metacontrastive.data.manifest"):
        dm.setup("fit")
    assert "dropped 2 of 5 classes with fewer than shots + queries = 4 samples" in caplog.text
    assert dm.split("train")[0].usable == [0, 1, 2]
    assert {c for b in batches(dm, 4) for t in b for c in t.classes} == {"natural thing 0", "natural thing 1", "natural thing 2"}
