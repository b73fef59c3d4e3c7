"""The feature cache of frozen towers (``metacontrastive.data.features``): built once, read back exactly, stale
caches refused or rebuilt, shared by concurrent builders, and used by training, validation and checkpoints."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.features import (
    FeatureSpec, FeatureStream, StaleCache, build_split, feature_folder, read_shard, shard_features_path, source_id,
)
from metacontrastive.errors import BadInput
from metacontrastive.models.clip import EncoderConfig
from metacontrastive.module import MetaContrastiveModule

DOMAINS = ["natural", "medical"]


@pytest.fixture
def sharded(tmp_path, write_domain):
    """Two random domains written 10 samples to a shard, so that every split has several shards."""
    for domain in DOMAINS:
        write_domain(tmp_path, domain, maxcount=10)
    return tmp_path


def _module(seed: int = 0, **encoder) -> MetaContrastiveModule:
    torch.manual_seed(seed)
    return MetaContrastiveModule(domains=DOMAINS, encoder=EncoderConfig(freeze_image=True, **encoder), domain_dropout=0.0)


def _datamodule(root, small, **kwargs) -> EpisodicDataModule:
    dm = EpisodicDataModule(domains=DOMAINS, root=str(root), **{**small, **kwargs})
    dm.setup("fit")
    return dm


def _mtimes(dm) -> dict:
    return {p: p.stat().st_mtime_ns for files in dm.cached.values() for p in files}


def test_features_are_the_towers_own_and_a_second_attach_reads_them_without_recomputing(sharded, small):
    module = _module()
    dm = _datamodule(sharded, small)
    dm.attach(module.model.frozen_image_tower(), progress=False)
    assert set(dm.cached) == {(d, s) for d in DOMAINS for s in ("train", "val")}
    split = dm.split("train")[0]
    assert [p.name for p in dm.cached[("natural", "train")]] == [shard_features_path(p.parent, u).name
                                                                   for u, p in zip(split.urls, dm.cached[("natural", "train")])]
    # an evaluation episode carries its images and their cached features: the tower's exactly
    task = dm.fixed_episodes("val")[0]
    with torch.no_grad():
        expected = module.model.image_tower(torch.cat([task.support_images, task.query_images]))
    assert torch.equal(torch.cat([task.support_features, task.query_features]), expected)
    assert task.features_of == module.model.image_tower_id
    # training tasks stream features and decode no image
    train_task = next(iter(dm.train_dataloader()))[0]
    assert train_task.support_images is None and train_task.support_features.shape[1] == module.model.image_tower.out_dim
    before = _mtimes(dm)
    again = _datamodule(sharded, small)
    again.attach(module.model.frozen_image_tower(), progress=False)
    assert _mtimes(again) == before  # a hit: nothing rebuilt


def test_other_weights_or_another_image_size_get_a_cache_of_their_own(sharded, small):
    first, other = _module(seed=0), _module(seed=1)
    a = _datamodule(sharded, small)
    a.attach(first.model.frozen_image_tower(), progress=False)
    b = _datamodule(sharded, small)
    b.attach(other.model.frozen_image_tower(), progress=False)
    c = _datamodule(sharded, {**small, "image_size": 12})
    c.attach(first.model.frozen_image_tower(), progress=False)
    folders = {files[0].parent for dm in (a, b, c) for files in [dm.cached[("natural", "train")]]}
    assert len(folders) == 3
    # a model handed features made by another tower refuses them
    task = a.fixed_episodes("val")[0]
    with pytest.raises(BadInput, match="rebuild the feature cache"):
        other.view_of(task, 0)


def test_a_rewritten_shard_or_a_file_of_another_spec_is_rebuilt_and_refused_when_only_read(sharded, small, write_domain):
    module = _module()
    dm = _datamodule(sharded, small)
    dm.attach(module.model.frozen_image_tower(), progress=False)
    split, files = dm.split("train")[0], dm.cached[("natural", "train")]
    spec = dm.spec
    # another version of the first shard: its feature file no longer matches it
    shard = split.urls[0]
    data = bytearray(open(shard, "rb").read())
    data[-1] ^= 1  # the tar's zero padding: the samples are unchanged, the bytes are not
    open(shard, "wb").write(bytes(data))
    from metacontrastive.data.features import source_id
    with pytest.raises(StaleCache, match="another version of its shard"):
        read_shard(files[0], spec, source_id(shard))
    # a feature file of another spec in its place is refused by the reader of training streams
    wrong = FeatureSpec("someothertower", spec.image_size)
    other = torch.load(files[1], weights_only=True)
    torch.save({**other, "spec": wrong.folder}, files[1])
    with pytest.raises(StaleCache, match="was made for"):
        list(FeatureStream(files, spec, seed=0, resampled=False))
    # building again rebuilds exactly those two, and the cache reads back
    before = {p: p.stat().st_mtime_ns for p in files}
    build_split(split, "train", module.model.image_tower, spec, files[0].parent, progress=False)
    changed = [p for p in files if p.stat().st_mtime_ns != before[p]]
    assert changed == files[:2]
    assert read_shard(files[1], spec, source_id(split.urls[1]))["spec"] == spec.folder


def test_concurrent_builders_share_the_shards_and_build_each_once(sharded, small, tmp_path):
    """Two processes build one split's cache at once (as DDP ranks do): every shard is built by one of them."""
    dm = _datamodule(sharded, small)
    split = dm.split("train")[0]
    torch.manual_seed(0)
    module = _module()
    tower_file = tmp_path / "tower.pt"
    torch.save(module.model.image_tower, tower_file)
    spec = FeatureSpec(module.model.image_tower_id, 8)
    folder = feature_folder(sharded, "natural", spec)
    script = textwrap.dedent(f"""
        import sys, time, torch
        import metacontrastive.data.features as features
        from metacontrastive.data.manifest import DomainSplit
        built = []
        compute = features._compute
        def slow(url, *args):
            built.append(url)
            time.sleep(0.3)  # long enough for the other process to find the lock
            return compute(url, *args)
        features._compute = slow
        split = DomainSplit(*{tuple([split.name, split.domain_id, split.urls, split.classes, split.usable, split.counts,
                                     split.templates, split.num_samples])!r})
        tower = torch.load({str(tower_file)!r}, weights_only=False)
        features.build_split(split, "train", tower, features.FeatureSpec({spec.tower!r}, 8), __import__("pathlib").Path({str(folder)!r}),
                             progress=False)
        print("\\n".join(built))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(outputs[0] + outputs[1]) == sorted(split.urls)  # each shard once, by one process
    assert all(outputs)  # both did some of the work
    assert not list(folder.glob("*.lock"))


def test_a_shard_another_process_finished_between_look_and_claim_is_not_built_again(sharded, small, monkeypatch):
    """The window the concurrent test can hit: a shard looked stale, then its builder wrote it and let go of its
    lock before this process claimed it. The claim must look again instead of building it a second time."""
    import metacontrastive.data.features as features
    dm = _datamodule(sharded, small)
    split = dm.split("train")[0]
    module = _module()
    spec = FeatureSpec(module.model.image_tower_id, 8)
    folder = feature_folder(sharded, "natural", spec)
    build_split(split, "train", module.model.image_tower, spec, folder, progress=False)  # the other process's work
    built, claimed, claim, fresh = [], set(), features._claim, features._is_fresh

    def looks(path, *args):  # stale until claimed: the other process finished just before our claim
        return path in claimed and fresh(path, *args)

    def claiming(lock):
        claimed.add(lock.with_suffix(".pt"))
        return claim(lock)

    monkeypatch.setattr(features, "_is_fresh", looks)
    monkeypatch.setattr(features, "_claim", claiming)
    monkeypatch.setattr(features, "_compute", lambda url, *a: built.append(url))
    build_split(split, "train", module.model.image_tower, spec, folder, progress=False)
    assert len(claimed) == len(split.urls) and built == []
    assert not list(folder.glob("*.lock"))


def test_training_on_cached_features_equals_training_on_images(sharded, small):
    """The same meta-batch gives the same outer loss and gradients from images and from their cached features."""
    module = _module()
    cached = _datamodule(sharded, small)
    cached.attach(module.model.frozen_image_tower(), progress=False)
    plain = _datamodule(sharded, small, feature_cache="off")
    plain.attach(module.model.frozen_image_tower(), progress=False)
    assert not plain.cached
    results = []
    for dm in (cached, plain):
        tasks = [dm.fixed_episodes("val")[i] for i in range(4)]
        assert all(t.cached for t in tasks) == (dm is cached)
        module.zero_grad()
        loss = module.meta_step(tasks, "train")
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))


def test_a_trainable_tower_or_support_norm_turns_the_cache_off_and_on_refuses(sharded, small):
    trainable = MetaContrastiveModule(domains=DOMAINS)
    dm = _datamodule(sharded, small)
    dm.attach(trainable.model.frozen_image_tower(), progress=False)
    assert not dm.cached
    with pytest.raises(BadInput, match="data.feature_cache=on, but the image tower trains"):
        _datamodule(sharded, small, feature_cache="on").attach(trainable.model.frozen_image_tower(), progress=False)
    normed = _module(support_norm=True)
    with pytest.raises(BadInput, match="support_norm"):
        _datamodule(sharded, small, feature_cache="on").attach(normed.model.frozen_image_tower(), progress=False)
    # an augmented training domain reads its images; its validation split is still cached
    augmented = _datamodule(sharded, small, augment=["natural"])
    augmented.attach(_module().model.frozen_image_tower(), progress=False)
    assert ("natural", "train") not in augmented.cached and ("natural", "val") in augmented.cached


def test_images_are_decoded_at_the_towers_input_size_unless_told_otherwise(sharded, small, caplog):
    module = _module(image_size=12)
    dm = _datamodule(sharded, {**small, "image_size": None}, feature_cache="off")
    dm.attach(module.model.frozen_image_tower(), progress=False)
    assert dm.image_size == 12
    assert dm.fixed_episodes("val")[0].support_images.shape[-1] == 12
    told = _datamodule(sharded, small, feature_cache="off")  # image_size=8
    with caplog.at_level("WARNING"):
        told.attach(module.model.frozen_image_tower(), progress=False)
    assert told.image_size == 8 and "data.image_size=8, but the image tower runs at 12 px" in caplog.text


def test_a_checkpoint_names_its_frozen_pretrained_tower_and_reloads_it_from_the_package(tmp_path):
    """A frozen pretrained tower is not stored: the checkpoint holds its weights digest, loading rebuilds it from its
    name, and a tower with other weights is refused."""
    encoder = EncoderConfig(image_tower="efficientnet-lite0", freeze_image=True, image_size=32)
    module = MetaContrastiveModule(domains=DOMAINS, encoder=encoder)
    with torch.no_grad():
        module.model.head_image.net[0].weight.add_(1.0)  # a trained part, to see it come back
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": "2.5.0"}
    module.on_save_checkpoint(checkpoint)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("model.image_tower.")]
    assert [k for k in checkpoint["state_dict"] if k.startswith("model.text_tower.")]  # the tiny text tower trains
    assert checkpoint["frozen_towers"] == {"image_tower": module.model.digest("image_tower")}
    path = tmp_path / "slim.ckpt"
    torch.save(checkpoint, path)
    full = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert path.stat().st_size < 0.5 * full  # lite0's 4.6M parameters are most of it
    loaded = MetaContrastiveModule.load_from_checkpoint(path)
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({**checkpoint, "frozen_towers": {"image_tower": "0" * 64}}, path)
    with pytest.raises(BadInput, match="install the weights it was trained with"):
        MetaContrastiveModule.load_from_checkpoint(path)
