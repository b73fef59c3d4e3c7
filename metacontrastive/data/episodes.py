"""Episodic task sampling: tasks from a stream of records, with bounded memory.

Labelled domains give N-way K-shot tasks: ``EpisodeSampler`` keeps a bounded reservoir of distinct
records per class, fed from a shuffled stream, and draws an episode whenever ``ways`` classes hold
``shots + queries`` records. Caption-only domains give tasks of ``support_size + query_size``
consecutive distinct pairs of the shuffled stream (``CaptionSampler``); their texts are the unique
captions, and identical captions share a label. The streams that feed them live in ``tasks.py``.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from metacontrastive.data.shards import Record

__all__ = [
    "AUGMENTATION",
    "CaptionSampler",
    "EpisodeSampler",
    "EpisodeShape",
    "Task",
    "episodes",
    "make_caption_task",
    "augment",
    "make_task",
    "mix_seed",
]


@dataclass
class Task:
    """One task T_i = (domain, support, query). Labels index the task's texts (in groups of ``prompts``).

    For an N-way K-shot episode ``texts`` holds ``prompts`` class prompts per class, class by class (N * P
    texts: prompt ensembling averages each class's P embeddings), ``support_labels`` (N*K,) and
    ``query_labels`` (N*Q,) take values in 0..N-1 and ``classes`` names the N classes. For a
    caption-only task ``texts`` holds the unique captions of support and query together, a label
    indexes its pair's caption (identical captions share one), ``prompts`` is 1 and ``classes`` is empty.

    A task read through a feature cache (``metacontrastive.data.features``) carries the frozen image tower's
    features of its images (``support_features``, ``query_features``), made by the tower that ``features_of``
    names; the model then skips that tower. Its images are None where they were never decoded (training).
    """

    domain: str
    domain_id: int
    texts: list[str]
    support_images: torch.Tensor | None  # (S, 3, H, W) float in [0, 1]
    support_labels: torch.Tensor  # (S,)
    query_images: torch.Tensor | None  # (Q, 3, H, W)
    query_labels: torch.Tensor  # (Q,)
    classes: list[str] = field(default_factory=list)
    prompts: int = 1
    support_features: torch.Tensor | None = None  # (S, F_I) the cached image tower's
    query_features: torch.Tensor | None = None  # (Q, F_I)
    features_of: str | None = None  # the tower that made them (``features.FeatureSpec.tower``)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def size(self) -> int:
        """Images in the task: support and query."""
        return len(self.support_labels) + len(self.query_labels)

    @property
    def cached(self) -> bool:
        """Whether the task carries its image tower's features."""
        return self.support_features is not None

    def map_tensors(self, fn) -> Task:
        """A copy with ``fn`` applied to each tensor (images, features and labels; absent ones stay None)."""
        names = ("support_images", "support_labels", "query_images", "query_labels", "support_features", "query_features")
        return dataclasses.replace(self, **{name: fn(getattr(self, name)) for name in names if getattr(self, name) is not None})

    def pin_memory(self) -> Task:
        """A copy in page-locked memory, which a GPU copies from asynchronously (the DataLoader calls this
        with ``pin_memory=True``; Lightning then moves the batch with ``non_blocking``)."""
        return self.map_tensors(torch.Tensor.pin_memory)


@dataclass(frozen=True)
class EpisodeShape:
    """The size of a task: ``ways`` x (``shots`` + ``queries``) records when labelled,
    ``support_size`` + ``query_size`` pairs when caption-only."""

    ways: int
    shots: int
    queries: int
    support_size: int
    query_size: int

    def __post_init__(self) -> None:
        if self.ways < 2 or self.shots < 1 or self.queries < 1:
            raise ValueError(f"an episode needs ways >= 2, shots >= 1 and queries >= 1; "
                             f"got {self.ways}-way {self.shots}-shot {self.queries}-query")
        if self.support_size < 1 or self.query_size < 1:
            raise ValueError(f"a caption-only task needs support_size >= 1 and query_size >= 1; "
                             f"got {self.support_size} and {self.query_size}")

    @property
    def per_class(self) -> int:
        return self.shots + self.queries

    @property
    def caption_size(self) -> int:
        return self.support_size + self.query_size


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, rank, worker, ...), the same in every process."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _stack(records: list[Record]) -> torch.Tensor | None:
    """(n, 3, H, W) float images in [0, 1], or None when the records hold no images (a feature cache).
    In numpy, on one thread: torch would spread this small op over its intra-op pool, which costs a hundred
    times more than it saves when the cores are busy training."""
    if records[0].image is None:
        return None
    pixels = np.stack([r.image.numpy() for r in records])  # (n, 3, H, W) uint8
    return torch.from_numpy(np.divide(pixels, np.float32(255.0), dtype=np.float32))


def _stack_features(records: list[Record]) -> torch.Tensor | None:
    """(n, F) cached tower features of the records, or None when they hold none."""
    if records[0].features is None:
        return None
    return torch.from_numpy(np.stack([r.features.numpy() for r in records]))


def _split_rows(records: list[Record], n: int, features_of: str | None) -> dict:
    """The Task fields of ``records`` whose first ``n`` are the support set: images and cached features."""
    images, features = _stack(records), _stack_features(records)  # one conversion for the whole task
    out = {"support_images": None if images is None else images[:n], "query_images": None if images is None else images[n:]}
    if features is not None:
        out.update(support_features=features[:n], query_features=features[n:], features_of=features_of)
    return out


def make_task(domain: str, domain_id: int, class_names: list[str], groups: list[list[Record]], shots: int | list[int],
              templates: list[str], features_of: str | None = None) -> Task:
    """Build a labelled task from ``groups[i]``, the records of class ``class_names[i]``: the first ``shots``
    records of each class (``shots[i]`` of class i, when a list) are the support set, the rest the query set;
    each class gets one prompt per template. ``features_of`` names the tower of cached features the records
    carry, if any."""
    ways = len(groups)
    shots = [shots] * ways if isinstance(shots, int) else list(shots)
    records = [r for g, k in zip(groups, shots) for r in g[:k]] + [r for g, k in zip(groups, shots) for r in g[k:]]
    support_labels = torch.arange(ways).repeat_interleave(torch.tensor(shots))  # (sum K,)
    query_labels = torch.arange(ways).repeat_interleave(torch.tensor([len(g) - k for g, k in zip(groups, shots)]))  # (Q,)
    texts = [template.format(label=name) for name in class_names for template in templates]  # class by class
    rows = _split_rows(records, sum(shots), features_of)
    return Task(domain, domain_id, texts, rows.pop("support_images"), support_labels, rows.pop("query_images"),
                query_labels, list(class_names), len(templates), **rows)


AUGMENTATION = {"scale": (0.6, 1.0), "ratio": (3 / 4, 4 / 3), "flip": 0.5, "jitter": 0.4}


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Episodic data augmentation, a different draw per image: random resized crop (area ``scale`` of the
    image, aspect ``ratio``), horizontal flip, and brightness, contrast and saturation jitter (factors in
    1 +- ``jitter``), the strengths of ``AUGMENTATION``. One batched warp, so it costs little beside decoding.

    Args:
        images: (n, 3, H, W) float images in [0, 1].
        generator: the random source (seeded by the task stream, so runs are reproducible).

    Returns:
        (n, 3, H, W) augmented images in [0, 1].
    """
    n = len(images)
    a = AUGMENTATION

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    area = uniform(*a["scale"])
    log_ratio = uniform(math.log(a["ratio"][0]), math.log(a["ratio"][1]))
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop size as a fraction of the side
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    centre_x, centre_y = (uniform(-1, 1) * (1 - width)), (uniform(-1, 1) * (1 - height))  # crop inside the image
    flip = torch.where(torch.rand(n, generator=generator) < a["flip"], -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)  # (n, H, W, 2)
    out = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    j = a["jitter"]
    out = out * uniform(1 - j, 1 + j)[:, None, None, None]  # brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * uniform(1 - j, 1 + j)[:, None, None, None] + mean  # contrast
    grey = out.mean(dim=1, keepdim=True)  # (n, 1, H, W)
    out = (out - grey) * uniform(1 - j, 1 + j)[:, None, None, None] + grey  # saturation
    return out.clamp(0.0, 1.0)


def make_caption_task(domain: str, domain_id: int, records: list[Record], support_size: int,
                      features_of: str | None = None) -> Task:
    """Build a caption-only task: the first ``support_size`` pairs are the support set, the rest the query
    set; ``texts`` are the unique captions in order of appearance and a label indexes its caption."""
    texts = list(dict.fromkeys(r.text for r in records))
    index = {text: i for i, text in enumerate(texts)}
    labels = torch.tensor([index[r.text] for r in records])  # (S + Q,)
    s = support_size
    rows = _split_rows(records, s, features_of)
    return Task(domain, domain_id, texts, rows.pop("support_images"), labels[:s], rows.pop("query_images"), labels[s:],
                **rows)


class EpisodeSampler:
    """Bounded per-class reservoirs of distinct records, drawing N-way (K+Q)-per-class episodes.

    A full reservoir replaces a random slot, so it follows the stream; a record met again on a later
    pass is not added twice, so an episode never holds the same record twice.

    Args:
        ways: classes per episode (N).
        per_class: records per class in an episode (K + Q).
        capacity: records kept per class.
        rng: the random source (seeded by the caller with rank and worker).
    """

    def __init__(self, ways: int, per_class: int, capacity: int, rng: random.Random) -> None:
        if capacity < per_class:
            raise ValueError(f"reservoir capacity {capacity} is below shots + queries = {per_class}")
        self.ways, self.per_class, self.capacity, self.rng = ways, per_class, capacity, rng
        self.reservoirs: dict[int, list[Record]] = {}
        self._keys: dict[int, set[str]] = {}
        self._ready_classes: list[int] = []  # classes holding per_class records, in the order they got there

    @property
    def step(self) -> int:
        """Records one episode uses: the stream moves on by this many between episodes."""
        return self.ways * self.per_class

    def add(self, record: Record) -> None:
        slot = self.reservoirs.setdefault(record.label, [])
        keys = self._keys.setdefault(record.label, set())
        if record.key in keys:
            return
        if len(slot) < self.capacity:
            slot.append(record)
            if len(slot) == self.per_class:
                self._ready_classes.append(record.label)
        else:
            i = self.rng.randrange(self.capacity)
            keys.discard(slot[i].key)
            slot[i] = record
        keys.add(record.key)

    def ready(self) -> bool:
        return len(self._ready_classes) >= self.ways

    def sample(self) -> tuple[list[int], list[list[Record]]]:
        """Draw ``ways`` distinct classes and ``per_class`` distinct records of each."""
        classes = self.rng.sample(self._ready_classes, self.ways)
        return classes, [self.rng.sample(self.reservoirs[c], self.per_class) for c in classes]

    def buffered(self) -> int:
        return sum(len(s) for s in self.reservoirs.values())


class CaptionSampler:
    """Groups a caption stream into tasks of ``size`` consecutive pairs with distinct keys.

    Args:
        size: pairs per task (support + query).
    """

    def __init__(self, size: int) -> None:
        self.step = size
        self._batch: list[Record] = []
        self._keys: set[str] = set()

    def add(self, record: Record) -> None:
        if record.key not in self._keys:  # the shuffle buffer can bring a record back within one task
            self._batch.append(record)
            self._keys.add(record.key)

    def ready(self) -> bool:
        return len(self._batch) >= self.step

    def sample(self) -> list[Record]:
        batch, self._batch, self._keys = self._batch, [], set()
        return batch

    def buffered(self) -> int:
        return len(self._batch)


def episodes(records: Iterator[Record], sampler: EpisodeSampler | CaptionSampler, patience: int) -> Iterator:
    """Yield draws from ``sampler`` while feeding it ``records``: after each draw the stream moves on by
    ``sampler.step`` records, so draws keep taking fresh data.

    Raises:
        RuntimeError: ``patience`` records passed without a draw (too few decodable samples), or the stream ended.
    """
    fresh = 0
    for record in records:
        sampler.add(record)
        fresh += 1
        if fresh >= sampler.step and sampler.ready():
            fresh = 0
            yield sampler.sample()
        elif fresh > patience:
            raise RuntimeError(f"{fresh} records streamed without forming a task: too few decodable samples per class "
                               "for this episode shape (check the skip warnings above)")
    raise RuntimeError("the record stream ended before a task could be drawn: too few samples for this episode shape")
