"""EpisodicDataModule: streams each domain's shards and yields meta-batches of episodic tasks.

Training streams are resampled and infinite; every (rank, worker) pair seeds its own shard
resampling, shuffle buffer and episode sampling from ``(seed, rank, worker, epoch)``, so episodes are
reproducible for a seed and never repeated across ranks or workers. Validation and test use a fixed,
seeded set of episodes per domain, identical across runs and methods.
A meta-batch is a ``list[Task]`` that mixes domains.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from metacontrastive.data.episodes import EpisodeSampler, Task, check_episode_shape, episodes, make_task
from metacontrastive.data.shards import Record, load_manifest, split_urls, stream_records

__all__ = ["DomainSplit", "EpisodicDataModule", "FixedEpisodes", "MetaBatchStream"]

log = logging.getLogger(__name__)


@dataclass
class DomainSplit:
    """What a loader needs to know about one domain's split, read from its manifest."""

    name: str
    domain_id: int
    urls: list[str]
    classes: list[str]  # every class name of the domain; record labels index it
    usable: list[int]  # class ids of this split with at least shots + queries samples
    templates: list[str]


def _identity(batch):
    return batch


class MetaBatchStream(IterableDataset):
    """Infinite meta-batches of ``tasks_per_batch`` tasks, ``batches`` per epoch split over workers."""

    def __init__(self, splits: list[DomainSplit], ways: int, shots: int, queries: int, tasks_per_batch: int,
                 batches: int, image_size: int, seed: int, rank: int, shuffle_buffer: int, capacity: int) -> None:
        super().__init__()
        self.splits, self.ways, self.shots, self.queries = splits, ways, shots, queries
        self.tasks_per_batch, self.batches, self.image_size = tasks_per_batch, batches, image_size
        self.seed, self.rank, self.shuffle_buffer, self.capacity = seed, rank, shuffle_buffer, capacity
        self.epoch = 0

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        seed = hash((self.seed, self.rank, worker, self.epoch)) & 0x7FFFFFFF  # ints hash the same in every process
        self.epoch += 1
        rng = random.Random(seed)
        streams = {}
        for split in self.splits:
            records = stream_records(split.urls, self.image_size, seed, resampled=True, shuffle_buffer=self.shuffle_buffer)
            sampler = EpisodeSampler(self.ways, self.shots + self.queries, self.capacity, random.Random(seed + split.domain_id), set(split.usable))
            streams[split.name] = episodes(records, sampler)
        mine = self.batches // workers + (worker < self.batches % workers)
        for _ in range(mine):
            # round robin from a random start: every meta-batch of two or more tasks mixes domains
            start = rng.randrange(len(self.splits))
            tasks = []
            for t in range(self.tasks_per_batch):
                split = self.splits[(start + t) % len(self.splits)]
                classes, groups = next(streams[split.name])
                names = [split.classes[c] for c in classes]
                tasks.append(make_task(split.name, split.domain_id, names, groups, self.shots, rng.choice(split.templates)))
            yield tasks


class FixedEpisodes(Dataset):
    """A fixed, seeded list of labelled episodes per domain, interleaved across domains.

    The records come from one ordered pass over each split, keeping at most ``pool_per_class`` records
    per class; episode i belongs to domain ``i % len(splits)``.
    """

    def __init__(self, splits: list[DomainSplit], ways: int, shots: int, queries: int, episodes_per_domain: int,
                 image_size: int, seed: int, pool_per_class: int = 60) -> None:
        self.splits, self.shots = splits, shots
        self.pools: dict[str, dict[int, list[Record]]] = {}
        self.episodes: list[tuple[int, list[int], list[list[int]]]] = []
        per_class = shots + queries
        per_domain = []
        for s, split in enumerate(splits):
            pool: dict[int, list[Record]] = {c: [] for c in split.usable}
            for record in stream_records(split.urls, image_size, seed=0, resampled=False):
                if record.label in pool and len(pool[record.label]) < pool_per_class:
                    pool[record.label].append(record)
            self.pools[split.name] = pool
            rng = random.Random(hash((seed, split.domain_id)))
            eligible = sorted(c for c, r in pool.items() if len(r) >= per_class)
            if len(eligible) < ways:
                raise ValueError(f"domain {split.name!r}: {len(eligible)} classes have {per_class} samples, {ways}-way needs {ways}")
            drawn = []
            for _ in range(episodes_per_domain):
                classes = rng.sample(eligible, ways)
                drawn.append((s, classes, [rng.sample(range(len(pool[c])), per_class) for c in classes]))
            per_domain.append(drawn)
        self.episodes = [ep for group in zip(*per_domain) for ep in group]

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> Task:
        s, classes, picks = self.episodes[i]
        split = self.splits[s]
        pool = self.pools[split.name]
        groups = [[pool[c][j] for j in idx] for c, idx in zip(classes, picks)]
        return make_task(split.name, split.domain_id, [split.classes[c] for c in classes], groups, self.shots, split.templates[0])


class EpisodicDataModule(L.LightningDataModule):
    """Meta-batches of N-way K-shot tasks from per-domain WebDataset shards.

    Args:
        domains: domain names, each a folder with shards and a manifest under ``root``.
        root: the shards root.
        ways: classes per task (N).
        shots: support samples per class (K).
        queries: query samples per class (Q).
        tasks_per_batch: tasks per meta-batch, drawn round robin over the domains.
        steps_per_epoch: meta-batches per training epoch (the streams are infinite).
        val_episodes: fixed validation episodes per domain.
        test_episodes: fixed test episodes per domain.
        image_size: side length images are resized to.
        num_workers: DataLoader workers for the training stream.
        shuffle_buffer: sample shuffle buffer of each training stream.
        reservoir: records kept per class by the episode sampler.
        seed: seeds every stream and the fixed evaluation episodes.
    """

    def __init__(
        self,
        domains: list[str] = ["natural", "medical"],  # noqa: B006 - read-only default, shown by the CLI
        root: str = "data/shards",
        ways: int = 5,
        shots: int = 5,
        queries: int = 15,
        tasks_per_batch: int = 4,
        steps_per_epoch: int = 100,
        val_episodes: int = 50,
        test_episodes: int = 600,
        image_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 500,
        reservoir: int = 40,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_episode_shape(ways, shots, queries)
        if len(set(domains)) != len(domains) or not domains:
            raise ValueError(f"domains must be distinct and non-empty, got {domains}")
        self.domains = list(domains)
        self.splits: dict[str, list[DomainSplit]] = {}

    def domain_splits(self, split: str) -> list[DomainSplit]:
        """Check every domain's manifest for ``split`` before anything streams."""
        hp = self.hparams
        out = []
        for domain_id, domain in enumerate(self.domains):
            manifest = load_manifest(hp.root, domain)
            info = manifest["splits"].get(split)
            if info is None:
                raise ValueError(f"domain {domain!r} has no {split!r} split; it has {sorted(manifest['splits'])}")
            need = hp.shots + hp.queries
            usable = [manifest["classes"].index(c) for c, n in info["counts"].items() if n >= need]
            dropped = len(info["counts"]) - len(usable)
            if dropped:
                log.warning("domain %r %s: dropped %d classes with fewer than shots + queries = %d samples", domain, split, dropped, need)
            if len(usable) < hp.ways:
                raise ValueError(
                    f"domain {domain!r} {split} split: {hp.ways}-way episodes need {hp.ways} classes with "
                    f"{need} samples each, but only {len(usable)} have that many; lower ways, shots or queries"
                )
            out.append(DomainSplit(domain, domain_id, split_urls(hp.root, domain, split, manifest),
                                   manifest["classes"], usable, manifest["templates"]))
        return out

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test"))
        for split in wanted:
            if split not in self.splits:
                self.splits[split] = self.domain_splits(split)

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        stream = MetaBatchStream(self.splits["train"], hp.ways, hp.shots, hp.queries, hp.tasks_per_batch,
                                 hp.steps_per_epoch, hp.image_size, hp.seed, self._rank(), hp.shuffle_buffer, hp.reservoir)
        return DataLoader(stream, batch_size=None, collate_fn=_identity, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0)

    def _fixed(self, split: str, count: int) -> DataLoader:
        hp = self.hparams
        data = FixedEpisodes(self.splits[split], hp.ways, hp.shots, hp.queries, count, hp.image_size, hp.seed)
        return DataLoader(data, batch_size=hp.tasks_per_batch, collate_fn=list)

    def val_dataloader(self) -> DataLoader:
        return self._fixed("val", self.hparams.val_episodes)

    def test_dataloader(self) -> DataLoader:
        return self._fixed("test", self.hparams.test_episodes)
