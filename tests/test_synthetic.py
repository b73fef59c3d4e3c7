"""The synthetic demo domains: deterministic, class-disjoint, enough classes for 5-way episodes."""
import json

import pytest
import torch

from metacontrastive.data.manifest import read_manifest, split_urls
from metacontrastive.data.shards import RecordStream
from metacontrastive.data.synthetic import GENERATORS, write_synthetic


def _records(root, domain, split):
    manifest = read_manifest(domain, root)
    return list(RecordStream(split_urls(root, domain, split, manifest), image_size=16, seed=0, resampled=False))


@pytest.mark.parametrize("domain", sorted(GENERATORS))
def test_splits_are_class_disjoint_with_five_classes_each(domain, tmp_path):
    write_synthetic(domain, tmp_path, per_class=2, size=16)
    manifest = read_manifest(domain, tmp_path)
    splits = {s: set(info["classes"]) for s, info in manifest["splits"].items()}
    assert set(splits) == {"train", "val", "test"}
    assert all(len(c) >= 5 for c in splits.values())
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    for record in _records(tmp_path, domain, "val"):
        name = manifest["classes"][record.label]
        assert name in splits["val"]
        assert record.text.endswith(name) or f" {name} " in record.text  # the caption names the class


def test_same_seed_same_images_other_seed_other_images(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_synthetic("natural", tmp_path / name, per_class=2, size=16, seed=seed)
    a, b, c = (_records(tmp_path / n, "natural", "train") for n in "abc")
    assert [r.key for r in a] == [r.key for r in b]
    assert all(torch.equal(x.image, y.image) and x.text == y.text for x, y in zip(a, b))
    assert not all(torch.equal(x.image, y.image) for x, y in zip(a, c))


def test_captions_follow_the_issue_examples(tmp_path):
    write_synthetic("medical", tmp_path, per_class=1, size=16)
    manifest = json.loads((tmp_path / "medical" / "manifest.json").read_text())
    assert "a nodule in the left upper lobe" in manifest["classes"]
    assert manifest["templates"][0].format(label="a nodule in the left upper lobe") == \
        "a chest radiograph showing a nodule in the left upper lobe"


def test_unknown_domain_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"no synthetic generator for domain 'histology'.*medical.*natural"):
        write_synthetic("histology", tmp_path)
