"""The feature cache of frozen towers: each image's tower features computed once, stored beside its shards.

A frozen image tower maps an image to the same features every time, so training on a frozen pretrained
tower (the setting of the second seed paper) need not run it again and again: its features are computed
once per image, written beside the shards, and streamed instead of the images. Layout::

    <cache root>/<domain>/features/<spec>/<split>-000000.pt ...   one file per shard

where ``<cache root>`` is the shards root (or ``data.feature_dir``) and ``<spec>`` names everything the
features depend on (``FeatureSpec.folder``): the tower, a digest of its weights, its input size and the
side images are decoded at. A feature file holds its shard's sample keys, labels, captions and features
(n, F) float32 (or, for a tower cut into trunk and tail, ``models.tail``, the trunk's activations (n, C, h, w) in
float16), the spec it was made for and the identity of the shard it was made from (a SHA-1 of a
local tar). A file whose spec or shard does not match is stale: it is rebuilt when the cache is built,
and refused when only read, never read as if it were right.

The cache is built shard by shard (``build_split``): a process claims a shard with a lock file, so any
number of processes (DDP ranks, jobs of an array) build one cache together, each shard once, and every
process returns when all shards are done. Images are decoded exactly as the image path decodes them
(``shards.decode_record``), so cached and uncached runs see the same features.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from metacontrastive.data.manifest import DomainSplit
from metacontrastive.data.shards import Record, RecordStream, SkipCounter, shuffled
from metacontrastive.errors import BadInput

__all__ = ["FORMAT", "FeatureSpec", "FeatureStream", "FrozenTower", "StaleCache", "build_split", "feature_folder",
           "feature_table", "read_shard", "shard_features_path", "source_id"]

log = logging.getLogger(__name__)

FORMAT = 1  # the layout of a feature file; bumped when it changes
_LOCK_POLL_S = 0.5


class StaleCache(BadInput):
    """A feature file made for another tower, weights, size or shard than the one asked for."""


@dataclass(frozen=True)
class FrozenTower:
    """What the model tells the data path about its image tower.

    Attributes:
        tower: the image tower (float images in [0, 1], (B, 3, H, W) -> (B, F)).
        id: names the tower and its weights (``DomainConditionedCLIP.image_tower_id``); tasks carry it
            (``Task.features_of``) and the model checks it.
        input_size: the side the tower runs at, when it states one (None: any).
        cacheable: None when its features can be cached, else why not (a trainable tower, ...).
    """

    tower: nn.Module
    id: str
    input_size: int | None
    cacheable: str | None = None


@dataclass(frozen=True)
class FeatureSpec:
    """What cached features depend on.

    Attributes:
        tower: ``FrozenTower.id``: the tower, its weights digest and its input size.
        image_size: the side images are decoded at before the tower resizes them.
    """

    tower: str
    image_size: int

    @property
    def folder(self) -> str:
        """A folder name that differs whenever the features would: ``<tower id>-from<size>px``, made safe."""
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{self.tower}-from{self.image_size}px")


def feature_folder(root: str | Path, domain: str, spec: FeatureSpec) -> Path:
    """Where the features of ``domain`` for ``spec`` live under a cache root."""
    return Path(root) / domain / "features" / spec.folder


def shard_features_path(folder: Path, url: str) -> Path:
    """The feature file of one shard: its name with ``.pt`` for ``.tar``."""
    name = Path(url.split("::")[0].rstrip("/")).name
    return folder / (name[:-4] + ".pt" if name.endswith(".tar") else name + ".pt")


def source_id(url: str) -> str:
    """The identity of a shard: the SHA-1 of a local file's bytes (a rewritten shard differs), else its URL."""
    path = Path(url)
    if not path.is_file():
        return f"url:{url}"
    digest = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"sha1:{digest.hexdigest()}"


def read_shard(path: Path, spec: FeatureSpec, source: str | None = None) -> dict:
    """Load one feature file and check it was made for ``spec`` (and for the shard ``source``, if given).

    Raises:
        StaleCache: unreadable, another format, another spec or another shard.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:  # noqa: BLE001 - a truncated or foreign file: rebuild it
        raise StaleCache(f"feature file {path} does not load ({type(exn).__name__}); delete it or rebuild the cache") from exn
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StaleCache(f"feature file {path} is not a feature file of format {FORMAT}; delete it or rebuild the cache")
    if data["spec"] != spec.folder:
        raise StaleCache(f"feature file {path} was made for {data['spec']}, not {spec.folder}; rebuild the cache")
    if source is not None and data["source"] != source:
        raise StaleCache(f"feature file {path} was made from another version of its shard ({data['source'][:17]}..., the shard "
                         f"now is {source[:17]}...): the shards were rewritten; rebuild the cache")
    return data


def _is_fresh(path: Path, spec: FeatureSpec, source: str) -> bool:
    if not path.exists():
        return False
    try:
        read_shard(path, spec, source)
        return True
    except StaleCache as exn:
        log.warning("%s: rebuilding it", exn)
        return False


def _claim(lock: Path) -> bool:
    """Take the lock of a shard (a file holding host and pid), or find it held. A lock left by a process of this
    host that no longer runs is stale and taken over."""
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
                os.kill(int(pid), 0) if host == socket.gethostname() else None
                return False  # alive here, or on another host: theirs
            except ProcessLookupError:
                lock.unlink(missing_ok=True)  # its process is gone: take it over
            except (OSError, ValueError):  # vanished or half-written: look again
                time.sleep(_LOCK_POLL_S)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


@torch.no_grad()
def _compute(url: str, tower: nn.Module, spec: FeatureSpec, device: torch.device, batch_size: int,
             strict: bool, bar: tqdm) -> dict:
    """Decode one shard in order (as the image path does) and run the tower over its images in batches."""
    stream = RecordStream([url], spec.image_size, seed=0, resampled=False, strict=strict, where=f"features of {url}")
    keys, labels, texts, chunks, batch = [], [], [], [], []

    def flush() -> None:
        images = torch.stack([r.image for r in batch]).to(device).float().div_(255.0)  # (b, 3, H, W)
        features = tower(images).float().cpu()  # (b, F) pooled features, or a cut tower's trunk activations (b, C, h, w)
        # activations are many values per image: float16 halves the cache (relative error about 5e-4)
        chunks.append(features.half().contiguous() if features.ndim > 2 else features)
        bar.update(len(batch))
        batch.clear()

    for record in stream:
        keys.append(record.key)
        labels.append(record.label)
        texts.append(record.text)
        batch.append(record)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    features = torch.cat(chunks) if chunks else torch.zeros(0, 0)
    return {"keys": keys, "labels": torch.tensor(labels, dtype=torch.long), "texts": texts, "features": features,
            "dropped": stream.skips.by_reason()}


def build_split(split: DomainSplit, split_name: str, tower: nn.Module, spec: FeatureSpec, folder: Path,
                device: torch.device | str = "cpu", batch_size: int = 64, strict: bool = False,
                progress: bool = True, timeout_s: float = 24 * 3600.0) -> list[Path]:
    """Make sure every shard of a split has a fresh feature file in ``folder``, building the missing or stale ones.

    Any number of processes may call this at once for the same split: each shard is built by the one that
    claims it, and every call returns when all shards are done (or raises after ``timeout_s``).

    Args:
        split: the domain's split (its shard URLs).
        split_name: ``train``, ``val`` or ``test`` (for messages).
        tower: the frozen image tower.
        spec: what the features depend on.
        folder: where the split's feature files go (``feature_folder``).
        device: where the tower runs while building.
        batch_size: images per tower call.
        strict: raise on an undecodable image instead of skipping and counting it.
        progress: show a progress bar.
        timeout_s: how long to wait for shards that other processes build.

    Returns:
        The feature files, one per shard, in the split's shard order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sources = {url: source_id(url) for url in split.urls}
    paths = {url: shard_features_path(folder, url) for url in split.urls}
    todo = [url for url in split.urls if not _is_fresh(paths[url], spec, sources[url])]
    if not todo:
        return [paths[url] for url in split.urls]
    was_training = tower.training
    tower = tower.eval()
    original = next(iter(tower.parameters())).device
    tower.to(device)
    waited = time.monotonic()
    bar = tqdm(total=split.num_samples, desc=f"features {split.name}/{split_name}", unit="image", disable=not progress,
               mininterval=2.0)
    bar.update(split.num_samples * (len(split.urls) - len(todo)) // max(len(split.urls), 1))
    try:
        while todo:
            left = []
            for url in todo:
                lock = paths[url].with_suffix(".lock")
                if _is_fresh(paths[url], spec, sources[url]):
                    continue
                if not _claim(lock):
                    left.append(url)  # another process builds it
                    continue
                try:
                    if _is_fresh(paths[url], spec, sources[url]):
                        continue  # built by another process between our look and our claim
                    data = _compute(url, tower, spec, torch.device(device), batch_size, strict, bar)
                    data.update(format=FORMAT, spec=spec.folder, source=sources[url])
                    tmp = paths[url].with_suffix(f".tmp-{os.getpid()}")
                    torch.save(data, tmp)
                    os.replace(tmp, paths[url])  # readers never see a half-written file
                    if data["dropped"]:
                        log.warning("features of %s: dropped %s", url, data["dropped"])
                finally:
                    lock.unlink(missing_ok=True)
            todo = left
            if todo:
                if time.monotonic() - waited > timeout_s:
                    raise TimeoutError(f"features of domain {split.name!r} {split_name}: {len(todo)} shards still locked "
                                       f"by other processes after {timeout_s:.0f}s, e.g. {paths[todo[0]].with_suffix('.lock')}; "
                                       "delete the lock files if those processes are gone")
                time.sleep(_LOCK_POLL_S)
    finally:
        bar.close()
        tower.to(original).train(was_training)
    return [paths[url] for url in split.urls]


def feature_table(files: list[Path], spec: FeatureSpec) -> dict[str, torch.Tensor]:
    """Every sample's features of a split's feature files, by sample key: (F,) each."""
    table: dict[str, torch.Tensor] = {}
    for path in files:
        data = read_shard(path, spec)
        table.update(zip(data["keys"], data["features"]))
    return table


class FeatureStream:
    """Records of cached features, streamed like ``shards.RecordStream`` streams decoded images: file order
    shuffled per pass (``resampled``), a bounded shuffle buffer, a class filter. Records carry features and
    no image.

    Args:
        files: the split's feature files (``build_split``).
        spec: what they must have been made for (checked as each file is read).
        seed: seeds the file order and the shuffle buffer.
        resampled: loop over the files forever, each pass in a fresh order; else read each once, in order.
        shuffle_buffer: records held for shuffling (0: none).
        labels: class ids to keep (None: every record).
        where: names the stream in errors.
        counts: counters for ``SkipCounter`` (nothing is dropped here: undecodable images were counted when the
            cache was built).

    Attributes:
        read: records read so far.
        skips: what was skipped (nothing, on a sound cache).
    """

    def __init__(self, files: list[Path], spec: FeatureSpec, seed: int, resampled: bool, shuffle_buffer: int = 0,
                 labels: set[int] | None = None, where: str = "features", counts: torch.Tensor | None = None) -> None:
        if not files:
            raise ValueError(f"{where}: no feature files to stream")
        self.files, self.spec, self.seed, self.resampled = list(files), spec, seed, resampled
        self.shuffle_buffer, self.labels, self.where = shuffle_buffer, labels, where
        self.skips = SkipCounter(where, False, counts)
        self.read = 0
        self._buffer: list[Record] = []

    @property
    def buffered(self) -> int:
        """Records held in the shuffle buffer now."""
        return len(self._buffer)

    def __iter__(self) -> Iterator[Record]:
        rng = random.Random(self.seed)
        self._buffer = []
        return shuffled(self._records(rng), self.shuffle_buffer, rng, self._buffer)

    def _records(self, rng: random.Random) -> Iterator[Record]:
        while True:
            for path in rng.sample(self.files, len(self.files)) if self.resampled else self.files:
                data = read_shard(path, self.spec)
                labels = data["labels"].tolist()
                for i, key in enumerate(data["keys"]):
                    self.read += 1
                    if self.labels is None or labels[i] in self.labels:
                        yield Record(None, data["texts"][i], labels[i], key, data["features"][i])
            if not self.resampled:
                return


def attach_features(records: list[Record], table: dict[str, torch.Tensor], where: str) -> None:
    """Give each decoded record its cached features, in place.

    Raises:
        StaleCache: a record the cache does not hold (the cache was made from other shards).
    """
    for record in records:
        features = table.get(record.key)
        if features is None:
            raise StaleCache(f"{where}: sample {record.key!r} is not in the feature cache; rebuild the cache")
        record.features = features


Barrier = Callable[[], None]
