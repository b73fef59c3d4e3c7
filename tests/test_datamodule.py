"""EpisodicDataModule: episode correctness, seeding across ranks and workers, fixed evaluation episodes,
configuration errors and caption-only domains."""
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.tasks import MetaBatchStream
from metacontrastive.module import MetaContrastiveModule

def test_tasks_are_well_formed_episodes(shard_root, small, batches):
    dm = EpisodicDataModule(root=str(shard_root), **small)
    dm.setup("fit")
    for batch in batches(dm, 3):
        assert len(batch) == 4 and {t.domain for t in batch} == {"natural", "medical"}
        for task in batch:
            assert task.support_images.shape == (6, 3, 8, 8) and task.query_images.shape == (6, 3, 8, 8)
            assert torch.bincount(task.support_labels).tolist() == [2, 2, 2]  # exactly K per support class
            assert set(task.query_labels.tolist()) <= set(task.support_labels.tolist())
            assert task.texts == [f"a photo of a {name}" for name in task.classes] and len(set(task.classes)) == 3
            assert task.domain_id == dm.domains.index(task.domain)


def test_episodes_are_reproducible_for_a_seed(shard_root, small, fingerprint, batches):
    def run(seed):
        dm = EpisodicDataModule(root=str(shard_root), seed=seed, **small)
        return [fingerprint(t) for b in batches(dm, 3) for t in b]

    assert run(0) == run(0)
    assert not set(run(0)) & set(run(1))


def test_a_stream_goes_on_across_epochs(shard_root, small, fingerprint):
    dm = EpisodicDataModule(root=str(shard_root), **small)
    loader = dm.train_dataloader()
    epochs = [[fingerprint(t) for b in loader for t in b] for _ in range(2)]
    assert len(epochs[0]) == len(epochs[1]) == 4 * 4
    assert not set(epochs[0]) & set(epochs[1])


def test_two_ranks_with_two_workers_never_share_an_episode(shard_root, small, fingerprint, batches):
    def rank_episodes(rank):
        dm = EpisodicDataModule(root=str(shard_root), num_workers=2, **{**small, "steps_per_epoch": 6})
        dm.trainer = SimpleNamespace(global_rank=rank, current_epoch=0, global_step=0)  # the rank comes from the trainer
        loader = dm.train_dataloader()
        assert isinstance(loader.dataset, MetaBatchStream) and loader.dataset.rank == rank
        batches = list(loader)
        _shutdown_workers_and_reset_iterator(loader)  # as Lightning does at teardown; gc would wait 5 s per loader
        assert len(batches) == len(loader) == 6  # steps_per_epoch, split over the workers
        return [fingerprint(t) for b in batches for t in b]

    seen = rank_episodes(0) + rank_episodes(1)
    assert len(seen) == 2 * 6 * 4 and len(set(seen)) == len(seen)
    assert rank_episodes(1) == seen[24:]  # reproducible with workers too


@pytest.mark.parametrize("mode", ["round_robin", "uniform", "proportional"])
def test_every_meta_batch_mixes_domains(shard_root, mode, small, batches):
    dm = EpisodicDataModule(root=str(shard_root), domain_sampling=mode, **{**small, "tasks_per_batch": 2})
    assert all({t.domain for t in b} == {"natural", "medical"} for b in batches(dm, 4))


def test_fixed_validation_episodes_are_identical_across_instances_and_training_seeds(shard_root, small, fingerprint):
    def val(seed):
        dm = EpisodicDataModule(root=str(shard_root), seed=seed, **small)
        dm.setup("validate")
        return [[(fingerprint(t), t.domain) for t in b] for b in dm.val_dataloader()]

    first, second = val(0), val(5)
    assert first == second
    assert sum(len(b) for b in first) == 2 * 6
    assert all({d for _, d in b} == {"natural", "medical"} for b in first)


def test_configuration_errors_are_raised_at_construction():
    with pytest.raises(ValueError, match="cannot mix 2 domains"):
        EpisodicDataModule(tasks_per_batch=1)
    with pytest.raises(ValueError, match="reservoir=3"):
        EpisodicDataModule(reservoir=3, shots=2, queries=2)


@pytest.mark.parametrize("options, message", [
    (dict(domains=["natural"], tasks_per_batch=0), r"data.tasks_per_batch=0: use 1 or more"),
    (dict(shots=0), r"ways >= 2, shots >= 1 and queries >= 1; got 5-way 0-shot"),
    (dict(ways=1), r"got 1-way"),
    (dict(queries=-3), r"got 5-way 5-shot -3-query"),
    (dict(eval_ways=1), r"data.eval_ways=1: use 2 or more"),
    (dict(val_episodes=0), r"data.val_episodes=0: use 1 or more"),
    (dict(steps_per_epoch=0), r"data.steps_per_epoch=0"),
    (dict(image_size=4), r"data.image_size=4: use 8 or more"),
    (dict(num_workers=-1), r"data.num_workers=-1: use 0 or more"),
    (dict(augment=["satellite"]), r"data.augment=\['satellite'\]: augmentation applies to training domains"),
])
def test_meaningless_data_settings_are_refused_naming_option_and_range(options, message):
    with pytest.raises(ValueError, match=message):
        EpisodicDataModule(**options)


def test_a_split_whose_classes_are_all_too_small_stops_the_run(tmp_path, write_domain, small):
    write_domain(tmp_path, "natural", per_class=3)  # 3 images per class: shots + queries = 4 cannot be drawn
    with pytest.raises(ValueError, match=r"val split: .* 5 classes and 0 with that many"):
        EpisodicDataModule(domains=["natural"], root=str(tmp_path), **small).setup("validate")


def test_caption_only_domains_give_caption_tasks_the_model_trains_on(tmp_path, write_domain, small, batches):
    write_domain(tmp_path, "natural")
    write_domain(tmp_path, "web", labelled=False)
    dm = EpisodicDataModule(domains=["natural", "web"], root=str(tmp_path), support_size=6, query_size=4,
                            **{**small, "tasks_per_batch": 2})
    dm.setup("fit")
    batch = batches(dm, 1)[0]
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


def test_batches_are_pinned_for_a_cuda_trainer_unless_told(shard_root, small, batches):
    dm = EpisodicDataModule(root=str(shard_root), **small)
    assert not dm.train_dataloader().pin_memory  # no trainer, or a CPU one: pinning only costs a copy
    on_gpu = SimpleNamespace(global_rank=0, current_epoch=0, global_step=0,
                             strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    dm.trainer = on_gpu
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory
    told = EpisodicDataModule(root=str(shard_root), pin_memory=False, **small)
    told.trainer = on_gpu
    assert not told.train_dataloader().pin_memory
    # what pinning does to a task (Task.pin_memory maps every tensor the same way)
    task = batches(EpisodicDataModule(root=str(shard_root), **small), 1)[0][0]
    mapped = task.map_tensors(torch.Tensor.double)
    for name in ("support_images", "support_labels", "query_images", "query_labels"):
        assert getattr(mapped, name).dtype == torch.float64
        torch.testing.assert_close(getattr(mapped, name), getattr(task, name).double())
    assert (mapped.texts, mapped.classes, mapped.domain) == (task.texts, task.classes, task.domain)
