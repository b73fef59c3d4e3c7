"""Task streams: domain schedules, bounded-memory training streams, and fixed evaluation episodes drawn
from the whole split, seeded per domain; the data module's evaluation-only domains, validation subsets and
capped ways."""
import gc
import logging
import random
from collections import Counter

import lightning as L
import numpy as np
import pytest
from PIL import Image

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.episodes import EpisodeShape
from metacontrastive.data.manifest import domain_split, read_manifest
from metacontrastive.data.shards import DomainWriter, Record
from metacontrastive.data.synthetic import write_synthetic
from metacontrastive.data.tasks import DomainTaskStream, StreamOptions, VariableShape, domain_schedule
from metacontrastive.module import MetaContrastiveModule


def _write(root, domain, splits, per_class=12, size=8):
    """A domain with the given classes per split: ``{"train": 5, "test": 4}``; random images."""
    rng = np.random.default_rng(len(domain))
    names = [f"{domain} {split} {c}" for split, n in splits.items() for c in range(n)]
    with DomainWriter(root, domain, names, ["a photo of a {label}"], "test") as writer:
        for split, n in splits.items():
            for c in range(n):
                label = names.index(f"{domain} {split} {c}")
                for j in range(per_class):
                    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                    writer.write(split, f"{domain}-{split}-{c}-{j}", image, f"a photo of a {names[label]}", label)
    return root


def test_round_robin_cycles_domains_across_batches():
    rng = random.Random(0)
    assert domain_schedule("round_robin", [1, 1, 1], 4, rng, 0) == [0, 1, 2, 0]
    assert domain_schedule("round_robin", [1, 1, 1], 4, rng, 1) == [1, 2, 0, 1]


@pytest.mark.parametrize("mode", ["uniform", "proportional", "round_robin"])
def test_every_meta_batch_mixes_domains(mode):
    rng = random.Random(0)
    weights = [1.0, 99.0] if mode == "proportional" else [1.0, 1.0]  # skewed: one domain would often fill a batch
    assert all(len(set(domain_schedule(mode, weights, 2, rng, b))) == 2 for b in range(500))


def test_proportional_sampling_follows_the_weights():
    rng = random.Random(0)
    counts = Counter(d for b in range(2000) for d in domain_schedule("proportional", [1.0, 3.0, 6.0], 8, rng, b))
    shares = [counts[d] / 16000 for d in range(3)]
    assert shares == pytest.approx([0.1, 0.3, 0.6], abs=0.02)


def test_domain_schedule_rejects_unknown_modes():
    with pytest.raises(ValueError, match="round_robin"):
        domain_schedule("random", [1.0, 1.0], 2, random.Random(0), 0)


def test_domain_ten_times_larger_than_the_buffers_streams_with_bounded_memory(tmp_path):
    write_synthetic("medical", tmp_path, per_class=60, size=8)  # 15 train classes, 900 train records
    shape = EpisodeShape(ways=3, shots=2, queries=2, support_size=6, query_size=6)
    split = domain_split("medical", 0, "train", read_manifest("medical", tmp_path), str(tmp_path), None,
                         shape.ways, shape.per_class, shape.caption_size)
    shuffle_buffer, reservoir = 16, 4
    bound = shuffle_buffer + reservoir * len(split.usable)  # 16 + 4 * 15 = 76 records
    assert split.num_samples >= 10 * bound
    stream = DomainTaskStream(split, shape, StreamOptions(8, shuffle_buffer, reservoir, strict=False, augment=(), prompts="one"), seed=0)
    assert stream.max_buffered == bound
    def live_records() -> int:
        gc.collect()
        return sum(type(o) is Record for o in gc.get_objects())

    before = live_records()  # records that earlier tests in the same process still hold
    peak, tasks = 0, 0
    while stream.records.read < 2 * split.num_samples:  # two full passes over the domain
        next(stream)
        tasks += 1
        peak = max(peak, stream.buffered())
        if tasks % 40 == 0:  # nothing else holds this stream's decoded records: count the live ones
            assert live_records() - before <= reservoir * len(split.usable) + 1
    assert peak <= bound
    assert stream.records.read >= 20 * bound
    print(f"bounded memory: peak {peak} buffered records (bound {bound}) while {stream.records.read} records "
          f"streamed into {tasks} tasks")


SMALL = dict(ways=3, shots=1, queries=2, image_size=8, tasks_per_batch=2, val_episodes=4, test_episodes=4)


def test_episodes_draw_from_the_whole_split_and_count_the_images_they_use(tmp_path):
    _write(tmp_path, "natural", {"train": 3, "val": 3, "test": 4}, per_class=50)
    dm = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **{**SMALL, "test_episodes": 300, "ways": 4})
    (episodes,) = dm.episode_sets("test")
    assert len(episodes.pool) == 200  # every test image, not the 40 per class that training reservoirs keep
    assert episodes.distinct_images() == 200  # 300 episodes of 12 images reach all of them
    capped = EpisodicDataModule(domains=["natural"], root=str(tmp_path), eval_pool=10, **{**SMALL, "ways": 4})
    (few,) = capped.episode_sets("test", count=300)
    assert len(few.pool) == 40 and few.distinct_images() == 40


def test_a_domains_episodes_do_not_depend_on_the_other_domains(tmp_path):
    _write(tmp_path, "natural", {"train": 3, "val": 3, "test": 3})
    _write(tmp_path, "medical", {"train": 3, "val": 3, "test": 3})
    both = EpisodicDataModule(domains=["natural", "medical"], root=str(tmp_path), **SMALL).episode_sets("test")
    alone = EpisodicDataModule(domains=["medical", "natural"], test_domains=["medical"], root=str(tmp_path),
                               **SMALL).episode_sets("test")
    assert both[1].split.name == alone[0].split.name == "medical"
    assert both[1].draws == alone[0].draws
    assert both[0].draws != both[1].draws


def test_an_evaluation_split_with_few_classes_is_evaluated_with_all_of_them(tmp_path, caplog):
    _write(tmp_path, "natural", {"train": 5, "val": 2, "test": 2})
    dm = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **{**SMALL, "ways": 5})
    with caplog.at_level(logging.WARNING):
        (episodes,) = dm.episode_sets("val")
    assert episodes.shape.ways == 2 and len(episodes[0].classes) == 2
    assert "evaluated 2-way, not 5-way" in caplog.text


def test_evaluation_only_domains_get_ids_after_the_training_ones_and_the_unknown_row(tmp_path):
    _write(tmp_path, "natural", {"train": 3, "val": 3, "test": 3})
    _write(tmp_path, "brain", {"test": 4})  # every class at test time: a held-out domain
    dm = EpisodicDataModule(domains=["natural"], test_domains=["natural", "brain"], root=str(tmp_path), **SMALL)
    assert dm.domain_ids == {"natural": 0, "brain": 1} and dm.evaluation_only == ["brain"]
    module = MetaContrastiveModule(domains=["natural"])
    assert module.domain_row("brain") == module.model.unknown_domain
    trainer = L.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    assert metrics["test/episodes/brain"] == 4 and metrics["test/episodes/natural"] == 4
    assert 0.0 <= metrics["test/acc/brain"] <= 1.0 and "test/f1/brain" in metrics


def test_fit_validates_on_a_subset_of_domains(tmp_path):
    _write(tmp_path, "natural", {"train": 3, "val": 3, "test": 3})
    _write(tmp_path, "medical", {"train": 3, "test": 3})  # too few classes for a val split of its own
    with pytest.raises(ValueError, match="has no 'val' split"):
        EpisodicDataModule(domains=["natural", "medical"], root=str(tmp_path), **SMALL).setup("fit")
    dm = EpisodicDataModule(domains=["natural", "medical"], val_domains=["natural"], root=str(tmp_path),
                            **{**SMALL, "steps_per_epoch": 2})
    trainer = L.Trainer(accelerator="cpu", max_steps=2, inference_mode=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MetaContrastiveModule(domains=["natural", "medical"]), datamodule=dm)
    assert trainer.global_step == 2
    assert "val/acc/natural" in trainer.callback_metrics and "val/acc/medical" not in trainer.callback_metrics


def test_stage_domain_lists_must_be_distinct_and_non_empty():
    with pytest.raises(ValueError, match=r"data.test_domains=\['natural', 'natural'\]: name at least one domain, each once"):
        EpisodicDataModule(test_domains=["natural", "natural"])
    with pytest.raises(ValueError, match=r"data.val_domains=\[\]: name at least one domain"):
        EpisodicDataModule(val_domains=[])


def _write_imbalanced(root, sizes, size=8):
    """A test-only domain whose classes hold ``sizes`` images each (imbalanced, as real far-domain data is)."""
    rng = np.random.default_rng(0)
    names = [f"lesion {c}" for c in range(len(sizes))]
    with DomainWriter(root, "skin", names, ["a dermoscopy image of {label}"], "test") as writer:
        for c, n in enumerate(sizes):
            for j in range(n):
                image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                writer.write("test", f"skin-{c}-{j}", image, f"a dermoscopy image of {names[c]}", c)
    return root


def test_variable_episodes_draw_ways_and_imbalanced_shots_within_their_bounds(tmp_path):
    sizes = [6, 12, 30, 60, 90, 120]
    _write_imbalanced(tmp_path, sizes)
    bounds = VariableShape(max_ways=5, min_ways=2, max_shots=20, max_support=40, queries=5)
    dm = EpisodicDataModule(domains=["skin"], root=str(tmp_path), test_domains=["skin"], **{**SMALL, "ways": 2})
    dm.setup("test")
    (fixed, variable) = dm.episode_sets("test", [1], count=200, variable=bounds)
    assert variable.variable and not fixed.variable
    ways, share = Counter(), {c: [] for c in range(len(sizes))}
    for i in range(len(variable)):
        task = variable[i]
        n = len(task.classes)
        ways[n] += 1
        assert bounds.min_ways <= n <= bounds.max_ways
        shots, queries = task.support_labels.bincount(minlength=n).tolist(), task.query_labels.bincount(minlength=n).tolist()
        assert min(shots) >= 1 and sum(shots) <= bounds.max_support
        classes = [c for c, _ in variable.draws[i]]
        assert queries == [max(1, min(bounds.queries, min(sizes[c] for c in classes) // 2))] * n  # balanced queries
        for c, k in zip(classes, shots):
            assert k + queries[0] <= sizes[c]
            share[c].append(k / sum(shots))
    assert set(ways) == set(range(2, 6))  # every allowed way occurs
    mean_share = [float(np.mean(share[c])) for c in range(len(sizes))]
    assert mean_share[0] < mean_share[2] < mean_share[5]  # a class with more images gives more shots
    again = EpisodicDataModule(domains=["skin"], root=str(tmp_path), test_domains=["skin"], **{**SMALL, "ways": 2})
    again.setup("test")
    assert again.episode_sets("test", [1], count=200, variable=bounds)[1].draws == variable.draws  # seeded
