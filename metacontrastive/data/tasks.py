"""Fixed evaluation episodes: seeded tasks drawn from a whole evaluation split, identical for every method.

``EvaluationPool`` decodes one domain's split once, in shard order (every record, or the first
``per_class`` of each class when memory is short); ``FixedEpisodes`` draws a seeded list of episodes
from it, seeded by ``(seed, domain, shape)`` alone, so every run, training seed and method sees the same
image ids in the same order. ``Interleaved`` and ``MetaBatches`` turn per-domain episode lists into the
mixed-domain meta-batches of the validation and test loaders.
"""
from __future__ import annotations

import random
import zlib
from typing import Sequence

from torch.utils.data import Dataset

from metacontrastive.data.episodes import EpisodeShape, Task, make_caption_task, make_task, mix_seed
from metacontrastive.data.shards import Record, RecordStream
from metacontrastive.data.sources import DomainSplit

__all__ = ["EvaluationPool", "FixedEpisodes", "Interleaved", "MetaBatches"]

Draw = list[tuple[int, list[int]]]  # one episode: (class id, indices into the pool's records of that class) per way


class EvaluationPool:
    """The decoded records of one domain's evaluation split, by class (caption-only: all under -1).

    Memory: every kept record is held decoded, 3 * image_size**2 bytes each.

    Args:
        split: the domain's split.
        image_size: side length images are decoded at.
        per_class: keep at most this many records per class (caption-only: in total), the first ones
            in shard order; None keeps the whole split.
        strict: raise on a corrupt sample instead of skipping and counting it.
    """

    def __init__(self, split: DomainSplit, image_size: int, per_class: int | None = None, strict: bool = False) -> None:
        self.split = split
        self.records: dict[int, list[Record]] = {c: [] for c in split.counts} if split.labelled else {-1: []}
        stream = RecordStream(split.urls, image_size, seed=0, resampled=False,
                              labels=set(split.counts) if split.labelled else None, strict=strict,
                              where=f"domain {split.name!r} evaluation pool")
        full = 0
        for record in stream:
            group = self.records[record.label]
            if per_class is None or len(group) < per_class:
                group.append(record)
                full += len(group) == per_class
                if full == len(self.records):
                    break
        self.skipped = stream.skips.count

    def __len__(self) -> int:
        return sum(len(group) for group in self.records.values())

    def classes_with(self, count: int) -> list[int]:
        """Class ids holding at least ``count`` decoded records."""
        return sorted(c for c, group in self.records.items() if c >= 0 and len(group) >= count)


class FixedEpisodes(Dataset):
    """A fixed, seeded list of one domain's tasks, drawn from an ``EvaluationPool``.

    Args:
        pool: the domain's decoded evaluation split.
        shape: the task shape.
        count: episodes to draw.
        seed: the evaluation seed; mixed with the domain name and the shape, so that the episodes of a
            domain do not depend on which other domains are evaluated beside it.
    """

    def __init__(self, pool: EvaluationPool, shape: EpisodeShape, count: int, seed: int) -> None:
        self.pool, self.shape, self.split = pool, shape, pool.split
        shape_key = (shape.ways, shape.shots, shape.queries, shape.support_size, shape.query_size)
        rng = random.Random(mix_seed(seed, zlib.crc32(self.split.name.encode()), *shape_key))
        self.draws: list[Draw] = [self._draw(rng) for _ in range(count)]

    def _draw(self, rng: random.Random) -> Draw:
        split, records = self.split, self.pool.records
        if not split.labelled:
            size = self.shape.caption_size
            if len(records[-1]) < size:
                raise ValueError(f"caption-only domain {split.name!r}: {len(records[-1])} decodable pairs, a task needs {size}")
            return [(-1, rng.sample(range(len(records[-1])), size))]
        per_class, ways = self.shape.per_class, self.shape.ways
        eligible = self.pool.classes_with(per_class)
        if len(eligible) < ways:
            raise ValueError(f"domain {split.name!r}: {len(eligible)} classes have {per_class} decodable samples, "
                             f"{ways}-way episodes need {ways}")
        return [(c, rng.sample(range(len(records[c])), per_class)) for c in rng.sample(eligible, ways)]

    def distinct_images(self) -> int:
        """How many different images the episodes use (an image counts once however often it recurs)."""
        return len({(c, i) for draw in self.draws for c, indices in draw for i in indices})

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, i: int) -> Task:
        split, records = self.split, self.pool.records
        groups = [[records[c][j] for j in indices] for c, indices in self.draws[i]]
        if not split.labelled:
            return make_caption_task(split.name, split.domain_id, groups[0], self.shape.support_size)
        names = [split.classes[c] for c, _ in self.draws[i]]
        return make_task(split.name, split.domain_id, names, groups, self.shape.shots, split.templates[0])


class Interleaved(Dataset):
    """Several domains' episode lists interleaved: episode ``i`` comes from list ``i % len(lists)`` while
    every list has one left, so consecutive episodes mix domains."""

    def __init__(self, lists: Sequence[Dataset]) -> None:
        self.index = [(d, i) for i in range(max(map(len, lists), default=0)) for d in range(len(lists)) if i < len(lists[d])]
        self.lists = list(lists)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Task:
        d, j = self.index[i]
        return self.lists[d][j]


class MetaBatches(Dataset):
    """Consecutive groups of ``size`` tasks of a task dataset (the last group may be smaller).

    Loader items are whole meta-batches, so that under DDP the sampler splits groups, not tasks, across
    ranks, and each rank's batches mix domains (it pads by repeating groups when they do not divide evenly).
    """

    def __init__(self, tasks: Dataset, size: int) -> None:
        self.tasks, self.size = tasks, size

    def __len__(self) -> int:
        return -(-len(self.tasks) // self.size)

    def __getitem__(self, i: int) -> list[Task]:
        return [self.tasks[j] for j in range(i * self.size, min((i + 1) * self.size, len(self.tasks)))]
