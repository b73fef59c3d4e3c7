"""Task streams: the training meta-batches and the fixed evaluation episodes.

Training: ``DomainTaskStream`` chains one domain's shards, shuffle buffer, sampler and task building into an
infinite stream; ``MetaBatchStream`` draws meta-batches from every domain's stream, the domain of each task
picked by ``domain_schedule``. Each (rank, worker) pair seeds its own streams from ``(seed, rank, worker,
epoch at start)``, so episodes are reproducible for a seed (with the same number of ranks and workers)
and differ across ranks and workers; a worker keeps its streams from one epoch to the next.

Evaluation: ``EvaluationPool`` decodes one domain's split once, in shard order (every record, or the first
``per_class`` of each class when memory is short); ``FixedEpisodes`` draws a seeded list of episodes from
it, seeded by ``(seed, domain, shape)`` alone, so every run, training seed and method sees the same image
ids in the same order. ``Interleaved`` and ``MetaBatches`` turn per-domain episode lists into the
mixed-domain meta-batches of the validation and test loaders.
"""
from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from metacontrastive.data.episodes import (
    CaptionSampler, EpisodeSampler, EpisodeShape, Task, augment, episodes, make_caption_task, make_task, mix_seed,
)
from metacontrastive.data.features import FeatureSpec, FeatureStream, attach_features
from metacontrastive.data.manifest import DomainSplit
from metacontrastive.data.shards import DROP_REASONS, Record, RecordStream

__all__ = [
    "DOMAIN_SAMPLING",
    "PROMPTS",
    "Prompts",
    "class_templates",
    "DomainSampling",
    "DomainTaskStream",
    "EvaluationPool",
    "FixedEpisodes",
    "Interleaved",
    "MetaBatchStream",
    "MetaBatches",
    "StreamOptions",
    "VariableEpisodes",
    "VariableShape",
    "domain_schedule",
]

DOMAIN_SAMPLING = ("round_robin", "uniform", "proportional")
DomainSampling = Literal[DOMAIN_SAMPLING]  # the allowed values, for LightningCLI, written once above
PROMPTS = ("one", "all")
Prompts = Literal[PROMPTS]


def class_templates(split: DomainSplit, prompts: str, rng: random.Random | None = None) -> list[str]:
    """The templates that turn a class of ``split`` into prompts: all of them (``all``: prompt ensembling), or
    one (``one``): drawn from ``rng`` for a training task, the first for a fixed evaluation episode."""
    if prompts == "all":
        return list(split.templates)
    return [rng.choice(split.templates) if rng is not None else split.templates[0]]


@dataclass(frozen=True)
class StreamOptions:
    """How a training stream reads a domain's shards (the data module's settings, passed down as one).

    Attributes:
        image_size: side length images are decoded at.
        shuffle_buffer: raw samples held for shuffling.
        reservoir: records kept per class by the episode sampler.
        strict: raise on a corrupt sample instead of skipping it.
        augment: domains whose training images are augmented (``episodes.augment``).
        prompts: ``one`` template per class and task, or ``all`` of them (see ``class_templates``).
        cached: the feature files of each domain whose training split streams cached tower features instead
            of images (``metacontrastive.data.features``).
        spec: what those features were made for.
    """

    image_size: int
    shuffle_buffer: int
    reservoir: int
    strict: bool
    augment: tuple[str, ...]
    prompts: str
    cached: dict[str, list[str]] = field(default_factory=dict)
    spec: FeatureSpec | None = None


class DomainTaskStream:
    """One domain's infinite stream of training tasks.

    Shuffled shards -> class filter -> shuffle buffer -> decode -> sampler -> ``Task``. It holds at most
    ``max_buffered`` records: the shuffle buffer plus ``reservoir`` per usable class (labelled) or one
    task in progress (caption-only), whatever the size of the domain.

    Args:
        split: the domain's training split.
        shape: the task shape.
        options: how the shards are read.
        seed: seeds shard order, shuffle, episode draws and prompt templates.
        counts: counters of dropped samples by reason (``shards.DROP_REASONS``), in shared memory when the
            stream runs in a DataLoader worker.
    """

    def __init__(self, split: DomainSplit, shape: EpisodeShape, options: StreamOptions, seed: int,
                 counts: torch.Tensor | None = None) -> None:
        self.split, self.shape = split, shape
        buffer = options.shuffle_buffer
        labels, where = (set(split.usable) if split.labelled else None), f"domain {split.name!r} train"
        files = options.cached.get(split.name)
        self.features_of = options.spec.tower if files else None
        if files:  # the frozen image tower's features, computed once: no image is decoded
            self.records: RecordStream | FeatureStream = FeatureStream(
                [Path(f) for f in files], options.spec, mix_seed(seed, 0), resampled=True, shuffle_buffer=buffer,
                labels=labels, where=where, counts=counts)
        else:
            self.records = RecordStream(split.urls, options.image_size, mix_seed(seed, 0), resampled=True,
                                        shuffle_buffer=buffer, labels=labels, strict=options.strict, where=where,
                                        expected=split.num_samples, counts=counts)
        self._rng = random.Random(mix_seed(seed, 1))
        self.prompts = options.prompts
        self._augment = torch.Generator().manual_seed(mix_seed(seed, 2)) if split.name in options.augment else None
        if split.labelled:
            self.sampler: EpisodeSampler | CaptionSampler = EpisodeSampler(shape.ways, shape.per_class, options.reservoir,
                                                                           self._rng)
            self.max_buffered = buffer + options.reservoir * len(split.usable)
        else:
            self.sampler = CaptionSampler(shape.caption_size)
            self.max_buffered = buffer + shape.caption_size
        patience = 2 * (split.num_samples + buffer)  # a sound split forms a task within one pass
        self._draws = episodes(iter(self.records), self.sampler, patience)

    def buffered(self) -> int:
        """Records held now: the shuffle buffer plus the sampler's."""
        return self.records.buffered + self.sampler.buffered()

    def __iter__(self) -> DomainTaskStream:
        return self

    def __next__(self) -> Task:
        split = self.split
        if not split.labelled:
            task = make_caption_task(split.name, split.domain_id, next(self._draws), self.shape.support_size,
                                     self.features_of)
        else:
            classes, groups = next(self._draws)
            names = [split.classes[c] for c in classes]
            task = make_task(split.name, split.domain_id, names, groups, self.shape.shots,
                             class_templates(split, self.prompts, self._rng), self.features_of)
        if self._augment is not None:
            task.support_images = augment(task.support_images, self._augment)
            task.query_images = augment(task.query_images, self._augment)
        return task


def domain_schedule(mode: str, weights: Sequence[float], tasks: int, rng: random.Random, batch_index: int) -> list[int]:
    """The domain index of each task of one meta-batch.

    ``round_robin`` cycles through the domains across consecutive meta-batches; ``uniform`` and
    ``proportional`` draw each task's domain at random with ``weights``. With two or more domains and
    tasks, a meta-batch always mixes domains (the alignment term needs two): a random draw that
    lands on one domain has one task, picked at random, redrawn from the others.

    Args:
        mode: one of ``DOMAIN_SAMPLING``.
        weights: one per domain (``uniform``: equal; ``proportional``: train samples); unused by round robin.
        tasks: tasks per meta-batch.
        rng: the random source.
        batch_index: the meta-batch's index in this rank's stream (round robin's position).
    """
    n = len(weights)
    if mode == "round_robin":
        return [(batch_index * tasks + t) % n for t in range(tasks)]
    if mode not in DOMAIN_SAMPLING:
        raise ValueError(f"domain_sampling must be one of {DOMAIN_SAMPLING}, not {mode!r}")
    ids = rng.choices(range(n), weights=weights, k=tasks)
    if n > 1 and tasks > 1 and len(set(ids)) == 1:
        others = [d for d in range(n) if d != ids[0]]
        ids[rng.randrange(tasks)] = rng.choices(others, weights=[weights[d] for d in others])[0]
    return ids


class MetaBatchStream(IterableDataset):
    """Meta-batches of ``tasks_per_batch`` tasks from infinite per-domain streams, ``batches`` per epoch
    split over the DataLoader workers.

    Args:
        splits: the training split of every domain, in domain-id order.
        shape: the task shape.
        tasks_per_batch: tasks per meta-batch.
        domain_sampling: how tasks pick their domain (see ``domain_schedule``).
        batches: meta-batches per epoch, over all workers of this rank.
        options: how each domain stream reads its shards.
        seed: the run's data seed.
        rank: this process's global rank.
        epoch: the epoch the stream starts at (a resumed run draws new episodes).
        dropped: (workers, domains, len(DROP_REASONS)) counters of dropped samples, in shared memory so that
            the main process reads what the workers dropped (default: private ones).
    """

    def __init__(self, splits: list[DomainSplit], shape: EpisodeShape, tasks_per_batch: int, domain_sampling: str,
                 batches: int, options: StreamOptions, seed: int, rank: int, epoch: int,
                 dropped: torch.Tensor | None = None) -> None:
        super().__init__()
        self.splits, self.shape, self.tasks_per_batch, self.domain_sampling = splits, shape, tasks_per_batch, domain_sampling
        self.batches, self.options, self.seed, self.rank, self.epoch = batches, options, seed, rank, epoch
        self.dropped = dropped if dropped is not None else torch.zeros(1, len(splits), len(DROP_REASONS), dtype=torch.long)
        proportional = domain_sampling == "proportional"
        self.weights = [float(s.num_samples) if proportional else 1.0 for s in splits]
        self.streams: list[DomainTaskStream] | None = None  # built in the worker that iterates, with:
        self._rng: random.Random | None = None  # the domain schedule's random source
        self._batch_index = 0  # the next meta-batch's index in this rank's stream

    def __len__(self) -> int:
        return self.batches

    def __getstate__(self) -> dict:
        return {**self.__dict__, "streams": None}  # live generators do not pickle; workers build their own

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.streams is None:
            seed = mix_seed(self.seed, self.rank, worker, self.epoch)
            counts = self.dropped[worker % len(self.dropped)]  # (domains, reasons): this worker's row
            self.streams = [DomainTaskStream(split, self.shape, self.options, mix_seed(seed, split.domain_id), counts[d])
                            for d, split in enumerate(self.splits)]
            self._rng = random.Random(seed)
            self._batch_index = worker  # this worker's meta-batches are worker, worker + workers, ...
        for _ in range(self.batches // workers + (worker < self.batches % workers)):
            ids = domain_schedule(self.domain_sampling, self.weights, self.tasks_per_batch, self._rng, self._batch_index)
            self._batch_index += workers
            yield [next(self.streams[i]) for i in ids]


Draw = list[tuple[int, list[int]]]  # one episode: (class id, indices into the pool's records of that class) per way


class EvaluationPool:
    """The decoded records of one domain's evaluation split, by class (caption-only: all under -1).

    Memory: every kept record is held decoded, 3 * image_size**2 bytes each (and its cached features, 4 * F).

    Args:
        split: the domain's split.
        image_size: side length images are decoded at.
        per_class: keep at most this many records per class (caption-only: in total), the first ones
            in shard order; None keeps the whole split.
        strict: raise on a corrupt sample instead of skipping and counting it.
        features: the split's cached tower features by sample key, and the tower that made them
            (``features.feature_table``, ``FeatureSpec.tower``): each record gets its own, and episodes carry them.
    """

    def __init__(self, split: DomainSplit, image_size: int, per_class: int | None = None, strict: bool = False,
                 features: tuple[dict[str, torch.Tensor], str] | None = None) -> None:
        self.split = split
        self.features_of = features[1] if features is not None else None
        self.records: dict[int, list[Record]] = {c: [] for c in split.counts} if split.labelled else {-1: []}
        stream = RecordStream(split.urls, image_size, seed=0, resampled=False,
                              labels=set(split.counts) if split.labelled else None, strict=strict,
                              where=f"domain {split.name!r} evaluation pool", expected=split.num_samples)
        full = 0
        for record in stream:
            group = self.records[record.label]
            if per_class is None or len(group) < per_class:
                group.append(record)
                full += len(group) == per_class
                if full == len(self.records):
                    break
        self.skips = stream.skips
        if features is not None:
            for group in self.records.values():
                attach_features(group, features[0], f"domain {split.name!r} evaluation pool")

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
        prompts: ``one`` (the first template) or ``all`` templates per class (see ``class_templates``).
    """

    variable = False  # every episode has ``shape``'s ways and shots

    def __init__(self, pool: EvaluationPool, shape: EpisodeShape, count: int, seed: int, prompts: str = "one") -> None:
        self.pool, self.shape, self.split, self.prompts = pool, shape, pool.split, prompts
        rng = random.Random(mix_seed(seed, zlib.crc32(self.split.name.encode()), *self._shape_key()))
        self.shots: list[list[int]] = []  # per episode, the support size of each of its classes
        self.draws: list[Draw] = [self._draw(rng) for _ in range(count)]

    def _shape_key(self) -> tuple[int, ...]:
        shape = self.shape
        return shape.ways, shape.shots, shape.queries, shape.support_size, shape.query_size

    def _draw(self, rng: random.Random) -> Draw:
        split, records = self.split, self.pool.records
        if not split.labelled:
            size = self.shape.caption_size
            if len(records[-1]) < size:
                raise ValueError(f"caption-only domain {split.name!r}: {len(records[-1])} decodable pairs, a task needs {size}")
            self.shots.append([self.shape.support_size])
            return [(-1, rng.sample(range(len(records[-1])), size))]
        per_class, ways = self.shape.per_class, self.shape.ways
        eligible = self.pool.classes_with(per_class)
        if len(eligible) < ways:
            raise ValueError(f"domain {split.name!r}: {len(eligible)} classes have {per_class} decodable samples, "
                             f"{ways}-way episodes need {ways}")
        self.shots.append([self.shape.shots] * ways)
        return [(c, rng.sample(range(len(records[c])), per_class)) for c in rng.sample(eligible, ways)]

    def distinct_images(self) -> int:
        """How many different images the episodes use (an image counts once however often it recurs)."""
        return len({(c, i) for draw in self.draws for c, indices in draw for i in indices})

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, i: int) -> Task:
        split, records = self.split, self.pool.records
        groups = [[records[c][j] for j in indices] for c, indices in self.draws[i]]
        features_of = self.pool.features_of
        if not split.labelled:
            return make_caption_task(split.name, split.domain_id, groups[0], self.shape.support_size, features_of)
        names = [split.classes[c] for c, _ in self.draws[i]]
        return make_task(split.name, split.domain_id, names, groups, self.shots[i], class_templates(split, self.prompts),
                         features_of)


@dataclass(frozen=True)
class VariableShape:
    """Bounds of variable-way, variable-shot episodes (Meta-Dataset's sampler, Triantafillou et al. 2020, scaled
    to small evaluation splits): ways uniform in [``min_ways``, ``max_ways``] (capped at the classes there are),
    the same number of queries per class (at most ``queries``, and at most half the smallest class drawn),
    a support budget and class-imbalanced supports in proportion to each class's size.

    Attributes:
        max_ways: most classes per episode (Meta-Dataset: 50).
        min_ways: fewest classes per episode (Meta-Dataset: 5).
        max_shots: most support images a class contributes to the budget (Meta-Dataset: 100).
        max_support: the largest support set (Meta-Dataset: 500).
        queries: most queries per class (Meta-Dataset: 10).
    """

    max_ways: int = 5
    min_ways: int = 2
    max_shots: int = 20
    max_support: int = 100
    queries: int = 10

    def __post_init__(self) -> None:
        if not 2 <= self.min_ways <= self.max_ways or self.max_shots < 1 or self.queries < 1:
            raise ValueError(f"variable episodes need 2 <= min_ways <= max_ways, max_shots >= 1 and queries >= 1; got {self}")
        if self.max_support < self.max_ways:
            raise ValueError(f"max_support={self.max_support} cannot give each of {self.max_ways} classes one shot")


class VariableEpisodes(FixedEpisodes):
    """Fixed, seeded variable-way variable-shot episodes of one domain (``VariableShape``): the Meta-Dataset
    protocol, where real, imbalanced data gives imbalanced support sets. Per episode: N ~ U[min_ways, max_ways]
    classes; q = min(queries, floor(|c|_min / 2)) queries per class; a support budget
    |S| = min(max_support, sum_c ceil(b * min(max_shots, |c| - q))), b ~ U(0, 1]; and class c's shots
    1 + floor(r_c * (|S| - N)), r_c proportional to exp(a_c) |c| with a_c ~ U[log 0.5, log 2], at most |c| - q.

    Args:
        pool: the domain's decoded evaluation split (labelled).
        variable: the bounds.
        count: episodes to draw.
        seed: the evaluation seed (mixed with the domain name and the bounds).
        prompts: as ``FixedEpisodes``.
    """

    variable = True

    def __init__(self, pool: EvaluationPool, variable: VariableShape, count: int, seed: int, prompts: str = "one") -> None:
        if not pool.split.labelled:
            raise ValueError(f"domain {pool.split.name!r}: variable-way episodes need labelled data")
        self.bounds = variable
        ways = min(variable.max_ways, len(pool.classes_with(2)))
        shape = EpisodeShape(max(ways, 2), 1, 1, 1, 1)  # the largest ways; shots and queries vary per episode
        super().__init__(pool, shape, count, seed, prompts)

    def _shape_key(self) -> tuple[int, ...]:
        b = self.bounds
        return 1 << 30, b.max_ways, b.min_ways, b.max_shots, b.max_support, b.queries  # 1 << 30: never a fixed shape's ways

    def _draw(self, rng: random.Random) -> Draw:
        b, records = self.bounds, self.pool.records
        eligible = self.pool.classes_with(2)  # a class needs a support and a query image
        if len(eligible) < b.min_ways:
            raise ValueError(f"domain {self.split.name!r}: {len(eligible)} classes have 2 decodable samples, variable "
                             f"episodes need at least min_ways={b.min_ways}")
        ways = rng.randint(b.min_ways, min(b.max_ways, len(eligible)))
        classes = rng.sample(eligible, ways)
        sizes = [len(records[c]) for c in classes]
        queries = max(1, min(b.queries, min(sizes) // 2))
        beta = 1.0 - rng.random()  # (0, 1]
        budget = min(b.max_support, sum(math.ceil(beta * min(b.max_shots, n - queries)) for n in sizes))
        weights = [math.exp(rng.uniform(math.log(0.5), math.log(2.0))) * n for n in sizes]
        shots = [min(n - queries, 1 + int(w / sum(weights) * (budget - ways))) for w, n in zip(weights, sizes)]
        self.shots.append(shots)
        return [(c, rng.sample(range(n), k + queries)) for c, n, k in zip(classes, sizes, shots)]
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
