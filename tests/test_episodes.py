"""Episodic task sampling: task building, episode shapes, samplers and seeds."""
import random

import pytest
import torch

from metacontrastive.data.episodes import (
    CaptionSampler, EpisodeSampler, EpisodeShape, episodes, make_caption_task,
    make_task, mix_seed,
)
from metacontrastive.data.shards import Record


def _record(label, i, text=None, size=4):
    image = torch.full((3, size, size), (label * 16 + i) % 256, dtype=torch.uint8)
    return Record(image, text or f"caption {label} {i}", label, f"k{label}-{i}")


def test_make_task_orders_support_then_query_per_class():
    groups = [[_record(c, i) for i in range(5)] for c in (7, 3, 9)]
    task = make_task("natural", 0, ["seven", "three", "nine"], groups, shots=2, templates=["a photo of a {label}"])
    assert task.support_images.shape == (6, 3, 4, 4) and task.query_images.shape == (9, 3, 4, 4)
    assert task.support_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert task.query_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert task.texts == ["a photo of a seven", "a photo of a three", "a photo of a nine"]
    assert task.classes == ["seven", "three", "nine"] and task.labelled
    assert task.support_images.dtype == torch.float32 and 0 <= task.support_images.min() <= task.support_images.max() <= 1
    # the support set is each class's first two records, the query set the rest
    assert torch.equal(task.support_images[2], groups[1][0].image.float() / 255)
    assert torch.equal(task.query_images[3], groups[1][2].image.float() / 255)


def test_make_caption_task_shares_labels_between_identical_captions():
    texts = ["a cat", "a dog", "a cat", "a bird", "a dog", "a fish"]
    records = [_record(-1, i, text) for i, text in enumerate(texts)]
    task = make_caption_task("web", 1, records, support_size=4)
    assert task.texts == ["a cat", "a dog", "a bird", "a fish"]
    assert task.classes == [] and not task.labelled
    assert task.support_labels.tolist() == [0, 1, 0, 2] and task.query_labels.tolist() == [1, 3]
    labels = torch.cat([task.support_labels, task.query_labels])
    assert [task.texts[i] for i in labels] == texts


def test_episode_sampler_bounds_reservoirs_and_never_repeats_a_record():
    rng = random.Random(0)
    sampler = EpisodeSampler(ways=3, per_class=4, capacity=6, rng=rng)
    stream = [_record(c, i) for _ in range(3) for c in range(5) for i in range(10)]  # three passes
    rng.shuffle(stream)
    draws = list(_take(episodes(iter(stream), sampler, patience=1000), 8))
    assert max(len(s) for s in sampler.reservoirs.values()) <= 6 and sampler.buffered() <= 5 * 6
    for classes, groups in draws:
        assert len(set(classes)) == 3 and all(len(g) == 4 for g in groups)
        assert all(r.label == c for c, g in zip(classes, groups) for r in g)
        keys = [r.key for g in groups for r in g]
        assert len(set(keys)) == len(keys)  # passes bring records back; an episode still holds each once


def test_caption_sampler_skips_a_repeated_record_within_a_task():
    sampler = CaptionSampler(size=3)
    a, b, c = (_record(-1, i) for i in range(3))
    (batch,) = _take(episodes(iter([a, b, a, c]), sampler, patience=10), 1)
    assert [r.key for r in batch] == [a.key, b.key, c.key]


def test_episodes_give_up_after_patience_records_without_a_task():
    sampler = EpisodeSampler(ways=3, per_class=2, capacity=2, rng=random.Random(0))
    only_two_classes = (_record(i % 2, i) for i in range(10_000))
    with pytest.raises(RuntimeError, match="without forming a task"):
        next(episodes(only_two_classes, sampler, patience=50))


def test_episode_shape_rejects_impossible_tasks():
    with pytest.raises(ValueError, match="1-way"):
        EpisodeShape(1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="support_size"):
        EpisodeShape(2, 1, 1, 0, 2)


def test_mix_seed_is_stable_and_separates_its_inputs():
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2)
    seeds = {mix_seed(0, rank, worker, 0) for rank in range(8) for worker in range(8)}
    assert len(seeds) == 64


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]
