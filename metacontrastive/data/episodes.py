"""Episodic task sampling: N-way K-shot tasks from a stream of records, with bounded memory.

``EpisodeSampler`` keeps a bounded reservoir of records per class, fed from a (shuffled) stream, and
draws an episode whenever enough classes hold ``shots + queries`` records. ``FixedEpisodes`` is the
evaluation counterpart: a seeded, fixed list of episodes drawn from a bounded pool of each split, the
same for every run and every method.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator

import torch

from metacontrastive.data.shards import Record

__all__ = ["EpisodeSampler", "Task", "check_episode_shape", "episodes", "make_task"]


@dataclass
class Task:
    """One task T_i = (domain, support, query). Labels index ``texts``.

    For an N-way K-shot episode ``texts`` holds the N class prompts, ``support_labels`` (N*K,) and
    ``query_labels`` (N*Q,) take values in 0..N-1 and ``classes`` names the N classes.
    """

    domain: str
    domain_id: int
    texts: list[str]
    support_images: torch.Tensor  # (S, 3, H, W) float in [0, 1]
    support_labels: torch.Tensor  # (S,)
    query_images: torch.Tensor  # (Q, 3, H, W)
    query_labels: torch.Tensor  # (Q,)
    classes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def check_episode_shape(ways: int, shots: int, queries: int) -> None:
    """Reject episode shapes that cannot form a task."""
    if ways < 2 or shots < 1 or queries < 1:
        raise ValueError(f"an episode needs ways >= 2, shots >= 1 and queries >= 1; got {ways}-way {shots}-shot {queries}-query")


def make_task(domain: str, domain_id: int, class_names: list[str], groups: list[list[Record]], shots: int, template: str) -> Task:
    """Build a labelled task from ``groups[i]``, the records of class ``class_names[i]``: the first
    ``shots`` records of each class are the support set, the rest the query set."""
    def stack(records: list[Record]) -> torch.Tensor:
        return torch.stack([r.image for r in records]).float().div_(255.0)  # (n, 3, H, W)

    support = [r for g in groups for r in g[:shots]]
    query = [r for g in groups for r in g[shots:]]
    support_labels = torch.tensor([i for i, g in enumerate(groups) for _ in g[:shots]])
    query_labels = torch.tensor([i for i, g in enumerate(groups) for _ in g[shots:]])
    texts = [template.format(label=name) for name in class_names]
    return Task(domain, domain_id, texts, stack(support), support_labels, stack(query), query_labels, list(class_names))


class EpisodeSampler:
    """Bounded per-class reservoirs over a record stream, drawing N-way (K+Q)-per-class episodes.

    Args:
        ways: classes per episode (N).
        per_class: records per class in an episode (K + Q).
        capacity: records kept per class; a full reservoir replaces a random slot.
        rng: the random source (seeded by the caller with rank and worker).
        allowed: class ids to keep; records of other classes are ignored.
    """

    def __init__(self, ways: int, per_class: int, capacity: int, rng: random.Random, allowed: set[int] | None = None) -> None:
        if capacity < per_class:
            raise ValueError(f"reservoir capacity {capacity} is below shots + queries = {per_class}")
        self.ways, self.per_class, self.capacity, self.rng, self.allowed = ways, per_class, capacity, rng, allowed
        self.reservoirs: dict[int, list[Record]] = {}

    def add(self, record: Record) -> None:
        if self.allowed is not None and record.label not in self.allowed:
            return
        slot = self.reservoirs.setdefault(record.label, [])
        if len(slot) < self.capacity:
            slot.append(record)
        else:
            slot[self.rng.randrange(self.capacity)] = record

    def ready(self) -> bool:
        return sum(len(s) >= self.per_class for s in self.reservoirs.values()) >= self.ways

    def sample(self) -> tuple[list[int], list[list[Record]]]:
        """Draw ``ways`` distinct classes and ``per_class`` distinct records of each."""
        full = sorted(c for c, s in self.reservoirs.items() if len(s) >= self.per_class)
        classes = self.rng.sample(full, self.ways)
        return classes, [self.rng.sample(self.reservoirs[c], self.per_class) for c in classes]

    def buffered(self) -> int:
        return sum(len(s) for s in self.reservoirs.values())


def episodes(records: Iterator[Record], sampler: EpisodeSampler) -> Iterator[tuple[list[int], list[list[Record]]]]:
    """Yield episodes from ``sampler`` while feeding it ``records``: after each episode the stream moves
    on by one episode's worth of records, so episodes keep drawing fresh data."""
    step = sampler.ways * sampler.per_class
    fresh = 0
    for record in records:
        sampler.add(record)
        fresh += 1
        if fresh >= step and sampler.ready():
            fresh = 0
            yield sampler.sample()
    raise RuntimeError("the record stream ended before an episode could be drawn: too few samples per class for this episode shape")
