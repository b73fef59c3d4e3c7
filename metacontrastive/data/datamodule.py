"""EpisodicDataModule: streams each domain's shards and yields meta-batches of tasks that mix domains.

Training streams are infinite and resampled: each (rank, worker) pair seeds its own shard order,
shuffle buffer and episode draws from ``(seed, rank, worker, epoch at start)``, so episodes are
reproducible for a seed (with the same number of ranks and workers) and differ across ranks and
workers; a worker keeps its streams (and their filled reservoirs) from one epoch to the next.
Validation and test use a fixed set of episodes per domain, seeded by ``eval_seed`` alone, so they are
identical across runs, training seeds and methods.
A meta-batch is a ``list[Task]``.
"""
from __future__ import annotations

import random
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from metacontrastive.data.episodes import (
    DomainTaskStream, EpisodeShape, Task, domain_schedule, make_caption_task, make_task, mix_seed,
)
from metacontrastive.data.shards import Record, RecordStream
from metacontrastive.data.sources import DomainSplit, domain_split, read_manifest

__all__ = ["EpisodicDataModule", "FixedEpisodes", "MetaBatchStream"]


def _identity(batch):
    return batch


class MetaBatchStream(IterableDataset):
    """Meta-batches of ``tasks_per_batch`` tasks from infinite per-domain streams, ``batches`` per epoch
    split over the DataLoader workers.

    Args:
        splits: the training split of every domain, in domain-id order.
        shape: the task shape.
        tasks_per_batch: tasks per meta-batch.
        domain_sampling: how tasks pick their domain (see ``domain_schedule``).
        batches: meta-batches per epoch, over all workers of this rank.
        image_size: side length images are resized to.
        shuffle_buffer: raw samples each domain stream holds for shuffling.
        reservoir: records each domain stream keeps per class.
        seed: the run's data seed.
        rank: this process's global rank.
        epoch: the epoch the stream starts at (a resumed run draws new episodes).
        strict: raise on a corrupt sample instead of skipping it.
    """

    def __init__(self, splits: list[DomainSplit], shape: EpisodeShape, tasks_per_batch: int, domain_sampling: str,
                 batches: int, image_size: int, shuffle_buffer: int, reservoir: int, seed: int, rank: int, epoch: int,
                 strict: bool = False) -> None:
        super().__init__()
        self.splits, self.shape, self.tasks_per_batch, self.domain_sampling = splits, shape, tasks_per_batch, domain_sampling
        self.batches, self.image_size, self.shuffle_buffer, self.reservoir = batches, image_size, shuffle_buffer, reservoir
        self.seed, self.rank, self.epoch, self.strict = seed, rank, epoch, strict
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
            self.streams = [DomainTaskStream(split, self.shape, self.image_size, self.shuffle_buffer, self.reservoir,
                                             mix_seed(seed, split.domain_id), self.strict) for split in self.splits]
            self._rng = random.Random(seed)
            self._batch_index = worker  # this worker's meta-batches are worker, worker + workers, ...
        for _ in range(self.batches // workers + (worker < self.batches % workers)):
            ids = domain_schedule(self.domain_sampling, self.weights, self.tasks_per_batch, self._rng, self._batch_index)
            self._batch_index += workers
            yield [next(self.streams[i]) for i in ids]


class _MetaBatches(Dataset):
    """Consecutive groups of ``size`` tasks of a task dataset (the last group may be smaller).

    FixedEpisodes interleaves domains, so each group mixes them; under DDP the sampler splits groups,
    not tasks, across ranks (it pads by repeating groups when they do not divide evenly).
    """

    def __init__(self, tasks: Dataset, size: int) -> None:
        self.tasks, self.size = tasks, size

    def __len__(self) -> int:
        return -(-len(self.tasks) // self.size)

    def __getitem__(self, i: int) -> list[Task]:
        return [self.tasks[j] for j in range(i * self.size, min((i + 1) * self.size, len(self.tasks)))]


class FixedEpisodes(Dataset):
    """A fixed, seeded list of tasks per domain, interleaved across domains.

    Each domain's pool comes from one ordered pass over its split that stops once the pool is full: at
    most ``pool_per_class`` records per usable class, or the first ``caption_pool`` records of a
    caption-only domain. The draws are seeded by ``(seed, domain_id)`` only, so the episodes are the
    same in every run and for every method. Episode ``i`` belongs to domain ``i % len(splits)``, so
    consecutive episodes mix domains.

    Args:
        splits: one split of every domain, in domain-id order.
        shape: the task shape.
        episodes_per_domain: episodes drawn per domain.
        image_size: side length images are resized to.
        seed: the evaluation seed.
        pool_per_class: records kept per class (at least ``shape.per_class``).
        caption_pool: records kept per caption-only domain (at least ``shape.caption_size``).
        strict: raise on a corrupt sample instead of skipping it.
    """

    def __init__(self, splits: list[DomainSplit], shape: EpisodeShape, episodes_per_domain: int, image_size: int, seed: int,
                 pool_per_class: int, caption_pool: int, strict: bool = False) -> None:
        self.splits, self.shape = splits, shape
        per_class, captions = max(pool_per_class, shape.per_class), max(caption_pool, shape.caption_size)
        self.pools = [self._pool(s, image_size, per_class, captions, strict) for s in splits]
        per_domain = [self._draw(s, episodes_per_domain, random.Random(mix_seed(seed, split.domain_id)))
                      for s, split in enumerate(splits)]
        self.episodes = [episode for draws in zip(*per_domain) for episode in draws]

    @staticmethod
    def _pool(split: DomainSplit, image_size: int, per_class: int, caption_pool: int, strict: bool) -> dict[int, list[Record]]:
        """Records by class (caption-only: all under label -1) from one ordered pass, stopping once full."""
        pool: dict[int, list[Record]] = {c: [] for c in split.usable} if split.labelled else {-1: []}
        limit = per_class if split.labelled else caption_pool
        labels = set(split.usable) if split.labelled else None
        stream = RecordStream(split.urls, image_size, seed=0, resampled=False, labels=labels, strict=strict,
                              where=f"domain {split.name!r} evaluation pool")
        full = 0
        for record in stream:
            group = pool[record.label]
            if len(group) < limit:
                group.append(record)
                full += len(group) == limit
                if full == len(pool):
                    break
        return pool

    def _draw(self, s: int, count: int, rng: random.Random) -> list[tuple[int, list[tuple[int, list[int]]]]]:
        """``count`` episodes of domain ``s``, each ``(s, [(class, record indices), ...])``."""
        split, pool = self.splits[s], self.pools[s]
        if not split.labelled:
            size = self.shape.caption_size
            if len(pool[-1]) < size:
                raise ValueError(f"caption-only domain {split.name!r}: {len(pool[-1])} decodable pairs, a task needs {size}")
            return [(s, [(-1, rng.sample(range(len(pool[-1])), size))]) for _ in range(count)]
        per_class, ways = self.shape.per_class, self.shape.ways
        eligible = sorted(c for c, records in pool.items() if len(records) >= per_class)
        if len(eligible) < ways:
            raise ValueError(f"domain {split.name!r}: {len(eligible)} classes have {per_class} decodable samples, "
                             f"{ways}-way episodes need {ways}")
        return [(s, [(c, rng.sample(range(len(pool[c])), per_class)) for c in rng.sample(eligible, ways)])
                for _ in range(count)]

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> Task:
        s, picks = self.episodes[i]
        split, pool = self.splits[s], self.pools[s]
        groups = [[pool[c][j] for j in idx] for c, idx in picks]
        if not split.labelled:
            return make_caption_task(split.name, split.domain_id, groups[0], self.shape.support_size)
        names = [split.classes[c] for c, _ in picks]
        return make_task(split.name, split.domain_id, names, groups, self.shape.shots, split.templates[0])


class EpisodicDataModule(L.LightningDataModule):
    """Meta-batches of few-shot tasks from per-domain WebDataset shards, streamed with bounded memory.

    Labelled domains give N-way K-shot tasks; caption-only domains (manifest ``labelled: false``) give
    tasks of ``support_size`` + ``query_size`` image-caption pairs. Everything that can be checked from
    the manifests (domains, splits, class counts) is checked in ``setup``, before any shard is opened.

    Args:
        domains: domain names, in domain-id order.
        root: the shards root, holding ``<domain>/manifest.json`` and the shards.
        urls: per-domain shard specs that override ``root``, each with a ``{split}`` brace pattern or a
            ``{shard}`` field (see ``metacontrastive.data.sources``); the manifest lies beside the shards.
        ways: classes per labelled task (N).
        shots: support samples per class (K).
        queries: query samples per class (Q).
        support_size: support pairs of a caption-only task (default: ``ways * shots``).
        query_size: query pairs of a caption-only task (default: ``ways * queries``).
        tasks_per_batch: tasks per meta-batch; at least 2 when two domains are configured.
        domain_sampling: ``round_robin`` (domains in turn), ``uniform`` or ``proportional`` (to each
            domain's train samples); a meta-batch always holds two domains when two are configured.
        steps_per_epoch: meta-batches per training epoch (the streams are infinite).
        val_episodes: fixed validation episodes per domain.
        test_episodes: fixed test episodes per domain.
        image_size: side length images are resized to.
        num_workers: DataLoader workers for the training stream.
        shuffle_buffer: raw samples each training stream holds for shuffling; also the size of a
            caption-only domain's evaluation pool.
        reservoir: records kept per class by the training sampler and by the evaluation pools.
        seed: seeds the training streams (mixed with rank, worker and epoch).
        eval_seed: seeds the fixed validation and test episodes (kept apart from ``seed`` so that runs
            with different training seeds are evaluated on the same episodes).
        strict_decode: raise on a corrupt shard or image instead of skipping, counting and logging it.
    """

    def __init__(
        self,
        domains: list[str] = ["natural", "medical"],  # noqa: B006 - read-only default, shown by the CLI
        root: str = "data/shards",
        urls: dict[str, str] | None = None,
        ways: int = 5,
        shots: int = 5,
        queries: int = 15,
        support_size: int | None = None,
        query_size: int | None = None,
        tasks_per_batch: int = 4,
        domain_sampling: Literal["round_robin", "uniform", "proportional"] = "round_robin",
        steps_per_epoch: int = 100,
        val_episodes: int = 50,
        test_episodes: int = 600,
        image_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 500,
        reservoir: int = 40,
        seed: int = 0,
        eval_seed: int = 0,
        strict_decode: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if len(set(domains)) != len(domains) or not domains:
            raise ValueError(f"domains must be distinct and non-empty, got {domains}")
        if len(domains) > 1 and tasks_per_batch < 2:
            raise ValueError(f"tasks_per_batch={tasks_per_batch} cannot mix {len(domains)} domains in a meta-batch; "
                             "the alignment term needs tasks from two domains")
        self.shape = EpisodeShape(ways, shots, queries, support_size if support_size is not None else ways * shots,
                                  query_size if query_size is not None else ways * queries)
        if reservoir < self.shape.per_class:
            raise ValueError(f"reservoir={reservoir} cannot hold shots + queries = {self.shape.per_class} records per class")
        self.domains = list(domains)
        self.manifests: dict[str, dict] = {}
        self.splits: dict[str, list[DomainSplit]] = {}
        self._fixed_sets: dict[str, FixedEpisodes] = {}

    def split(self, name: str) -> list[DomainSplit]:
        """Every domain's ``name`` split, checked against its manifest (read once per domain)."""
        if name not in self.splits:
            hp = self.hparams
            out = []
            for domain_id, domain in enumerate(self.domains):
                if domain not in self.manifests:
                    self.manifests[domain] = read_manifest(domain, hp.root, hp.urls)
                out.append(domain_split(domain, domain_id, name, self.manifests[domain], hp.root, hp.urls,
                                        self.shape.ways, self.shape.per_class, self.shape.caption_size))
            self.splits[name] = out
        return self.splits[name]

    def setup(self, stage: str | None = None) -> None:
        for name in {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test")):
            self.split(name)

    def train_dataloader(self) -> DataLoader:
        hp, trainer = self.hparams, self.trainer
        rank, epoch = (trainer.global_rank, trainer.current_epoch) if trainer is not None else (0, 0)
        stream = MetaBatchStream(self.split("train"), self.shape, hp.tasks_per_batch, hp.domain_sampling, hp.steps_per_epoch,
                                 hp.image_size, hp.shuffle_buffer, hp.reservoir, hp.seed, rank, epoch, hp.strict_decode)
        return DataLoader(stream, batch_size=None, collate_fn=_identity, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0)

    def fixed_episodes(self, name: str) -> FixedEpisodes:
        """The fixed episodes of the ``val`` or ``test`` split, built (and decoded) once."""
        if name not in self._fixed_sets:
            hp = self.hparams
            count = hp.val_episodes if name == "val" else hp.test_episodes
            self._fixed_sets[name] = FixedEpisodes(self.split(name), self.shape, count, hp.image_size, hp.eval_seed,
                                                   hp.reservoir, hp.shuffle_buffer, hp.strict_decode)
        return self._fixed_sets[name]

    def _fixed_loader(self, name: str) -> DataLoader:
        # items are whole meta-batches, so that a distributed sampler hands each rank mixed-domain batches
        batches = _MetaBatches(self.fixed_episodes(name), self.hparams.tasks_per_batch)
        return DataLoader(batches, batch_size=None, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")
