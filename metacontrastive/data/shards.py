"""The shard format: writing a domain's WebDataset shards and manifest, and streaming them back.

Layout (see data/README.md): ``<root>/<domain>/<split>-000000.tar ...`` and ``<root>/<domain>/manifest.json``.
A sample holds ``__key__``, the image (``png`` or ``jpg``), ``txt`` (caption), ``cls`` (class index into
the manifest's ``classes``; absent for caption-only data) and ``json``
(``{"domain", "label", "split", "source"}``).

``DomainWriter`` writes into a staging folder and renames it into place only after the manifest is
written, so an interrupted run never leaves a manifest that points at partial shards. ``RecordStream``
reads shards back as decoded ``Record``s, with shard shuffle, a bounded shuffle buffer and counted skips
of corrupt samples.
"""
from __future__ import annotations

import io
import logging
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import tarfile_samples

from metacontrastive.data.manifest import MANIFEST, SPLITS, write_manifest

__all__ = ["DROP_REASONS", "IMAGE_KEYS", "SHARD_SIZE", "DomainWriter", "Record", "RecordStream", "SkipCounter", "decode_record",
           "sample_label", "shuffled"]

log = logging.getLogger(__name__)

SHARD_SIZE = 1000  # samples per shard unless a command says otherwise
IMAGE_KEYS = ("png", "jpg", "jpeg")
_OWNER = ".writer-pid"  # in a staging folder: the process writing it


def _encode_image(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if image.mode not in ("RGB", "L"):  # greyscale stays one channel: a third of the bytes, same pixels once decoded
        image = image.convert("RGB")
    image.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return buf.getvalue()


class DomainWriter:
    """Writes one domain's shards split by split, then its manifest, atomically.

    Use as a context manager; ``write`` samples, and on a clean exit the manifest is written and the
    staging folder replaces ``<root>/<domain>``. On an error the staging folder is removed.

    Args:
        root: the shards root (``data/shards``).
        domain: the domain name (a folder under ``root``).
        classes: every class name; a sample's ``cls`` indexes this list. Empty for caption-only data.
        templates: caption templates with a ``{label}`` field, used to build class prompts.
        source: a short description of where the data came from.
        maxcount: samples per shard.
        image_format: ``png`` (lossless) or ``jpg``.
        overwrite: replace an existing domain folder instead of refusing.
    """

    def __init__(
        self,
        root: str | Path,
        domain: str,
        classes: list[str],
        templates: list[str],
        source: str,
        maxcount: int = SHARD_SIZE,
        image_format: str = "png",
        overwrite: bool = False,
    ) -> None:
        self.root, self.domain = Path(root), domain
        self.final = self.root / domain
        if (self.final / MANIFEST).exists() and not overwrite:
            raise FileExistsError(f"{self.final} already holds shards; pass --overwrite to replace them")
        if image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', not {image_format!r}")
        self.classes, self.templates, self.source = list(classes), list(templates), source
        self.maxcount, self.image_format = maxcount, image_format
        self.counts: dict[str, Counter] = {}
        self.writers: dict[str, wds.ShardWriter] = {}
        self.staging: Path | None = None

    def __enter__(self) -> "DomainWriter":
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging()
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.domain}.partial-", dir=self.root))
        self.staging.chmod(0o755)  # mkdtemp makes it private; shards are meant to be shared
        (self.staging / _OWNER).write_text(str(os.getpid()))
        return self

    def _remove_stale_staging(self) -> None:
        """Remove staging folders of this domain left by a writer that was killed (its process is gone)."""
        for folder in self.root.glob(f".{self.domain}.partial-*"):
            try:
                os.kill(int((folder / _OWNER).read_text()), 0)  # signal 0: does that process still exist?
                continue  # a writer of the same domain is at work: leave its folder alone
            except (OSError, ValueError):  # no such process, no owner file, or an unreadable one
                shutil.rmtree(folder, ignore_errors=True)
                log.warning("removed %s, left by an interrupted write of domain %r", folder, self.domain)

    def note(self, name: str, text: str) -> None:
        """Write a text file beside the shards (e.g. the list of skipped source files)."""
        (self.staging / name).write_text(text)

    def write(self, split: str, key: str, image: Image.Image | bytes, caption: str, label: int | None = None,
              extra: dict | None = None) -> None:
        """Write one sample to ``split``.

        Args:
            split: one of ``SPLITS``.
            key: the sample's unique key (no dots: WebDataset splits keys from extensions at the first dot).
            image: a PIL image, encoded here, or bytes already encoded as ``image_format`` (written as they
                are, so JPEG sources are not re-encoded).
            caption: the sample's text.
            label: index into ``classes``; None for caption-only data.
            extra: more fields for the sample's ``json`` (e.g. where it came from).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        if split not in self.writers:
            pattern = str(self.staging / f"{split}-%06d.tar")
            # an integer mtime: a float one (the default, time.time()) gives every member a PAX header, which
            # doubles the tar parsing that dominates reading; it also makes shards byte-for-byte reproducible
            self.writers[split] = wds.ShardWriter(pattern, maxcount=self.maxcount, verbose=0, mtime=0)
            self.counts[split] = Counter()
        name = self.classes[label] if label is not None else None
        sample = {
            "__key__": key,
            self.image_format: image if isinstance(image, bytes) else _encode_image(image, self.image_format),
            "txt": caption,
            "json": {**(extra or {}), "domain": self.domain, "label": name, "split": split, "source": self.source},
        }
        if label is not None:
            sample["cls"] = int(label)
        self.writers[split].write(sample)
        self.counts[split][name] += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        for writer in self.writers.values():
            writer.close()
        try:
            if exc_type is None:
                (self.staging / _OWNER).unlink()
                self._write_manifest()
                if self.final.exists():
                    shutil.rmtree(self.final)
                os.replace(self.staging, self.final)
        finally:
            if self.staging.exists():
                shutil.rmtree(self.staging)

    def _write_manifest(self) -> None:
        splits = {}
        for split, counts in self.counts.items():
            labelled = sorted((c for c in counts if c is not None), key=self.classes.index)
            splits[split] = {
                "classes": labelled,
                "counts": {c: counts[c] for c in labelled},
                "num_samples": sum(counts.values()),
                "shards": sorted(p.name for p in self.staging.glob(f"{split}-*.tar")),
            }
        write_manifest(self.staging, self.domain, self.classes, self.templates, self.source, splits)


@dataclass
class Record:
    """One decoded sample: a uint8 image (3, H, W), its caption, its class index (-1 if none) and its key.

    A record read from a feature cache (``metacontrastive.data.features``) carries its frozen tower's
    features (F,) instead of, or besides, its image: ``image`` is None when the images were never decoded.
    """

    image: torch.Tensor | None
    text: str
    label: int
    key: str
    features: torch.Tensor | None = None


def sample_label(sample: dict) -> int:
    """The class index of a raw sample, read without decoding its image (-1 for caption-only data)."""
    return int(sample["cls"]) if "cls" in sample else -1


def decode_record(sample: dict, image_size: int) -> Record:
    """Decode a raw WebDataset sample into a ``Record`` with the image resized to ``image_size``.

    Raises:
        ValueError: the sample has no image or no caption.
        OSError: the image bytes do not decode (PIL's error).
    """
    fmt = next((k for k in IMAGE_KEYS if k in sample), None)
    if fmt is None or "txt" not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} lacks an image ({'/'.join(IMAGE_KEYS)}) or a caption (txt)")
    image = Image.open(io.BytesIO(sample[fmt]))
    image.draft("RGB", (image_size, image_size))  # JPEG only: decode at a reduced scale when much larger
    image = image.convert("RGB")  # greyscale shards hold one channel; the towers take three
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))  # (3, H, W)
    text = sample["txt"]
    return Record(pixels, text.decode() if isinstance(text, bytes) else text, sample_label(sample), sample["__key__"])


DROP_REASONS = ("unreadable shard", "no image", "no caption", "no label", "bad label", "undecodable image")


class SkipCounter:
    """Counts what a stream drops, by reason, or raises when ``strict``.

    It is the tar reader's error handler (an unreadable or truncated shard: the rest of it is lost; the
    shard's URL is named) and the record stream's account of samples without an image, a caption or a
    label, and of images that do not decode (the sample's key is named). It logs the first ten drops, then
    every power of two, so a resampled stream that meets the same broken sample on every pass does not
    flood the log.

    Args:
        where: names the stream in log lines.
        strict: raise instead of dropping.
        counts: (len(DROP_REASONS),) counters to add to; may live in shared memory, so that the training
            streams of DataLoader workers report to the main process. Default: private ones.

    Attributes:
        examples: the first few keys or URLs dropped, by reason.
    """

    def __init__(self, where: str, strict: bool = False, counts: torch.Tensor | None = None) -> None:
        self.where, self.strict = where, strict
        self.counts = counts if counts is not None else torch.zeros(len(DROP_REASONS), dtype=torch.long)
        self.examples: dict[str, list[str]] = {}

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def by_reason(self) -> dict[str, int]:
        return {reason: int(n) for reason, n in zip(DROP_REASONS, self.counts.tolist()) if n}

    def __call__(self, exn: Exception) -> bool:
        """The tar reader's handler: an unreadable shard (webdataset puts its URL in the error's arguments)."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and ("/" in a or ".tar" in a)), "?")
        return self.drop("unreadable shard", url, exn)

    def drop(self, reason: str, what: str, exn: Exception | None = None) -> bool:
        """Count one dropped sample (or shard) ``what`` for ``reason``, or raise when strict."""
        if self.strict:
            raise exn if exn is not None else ValueError(f"{self.where}: {what}: {reason}")
        self.counts[DROP_REASONS.index(reason)] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(what)
        n = self.count
        if n <= 10 or n & (n - 1) == 0:
            log.warning("%s: dropped %s (%s%s); %d dropped so far: %s", self.where, what, reason,
                        f": {exn!r}" if exn is not None else "", n, self.by_reason())
        return True


class RecordStream:
    """Decoded records from shards: shard shuffle, a bounded sample shuffle buffer, counted skips.

    Raw samples flow shard order -> tar members -> class filter -> shuffle buffer -> decode, so records
    of classes nobody asked for cost neither buffer space nor decoding, and each kept record is decoded
    once. Besides one sample in flight, the stream holds at most ``shuffle_buffer`` raw samples.

    Args:
        urls: shard URLs (local paths or anything ``webdataset.gopen`` opens: ``pipe:``, http(s)).
        image_size: side length images are resized to.
        seed: seeds the shard order and the shuffle buffer; callers mix in rank, worker and epoch.
        resampled: loop over the shards forever, each pass in a fresh seeded order (training);
            otherwise read each shard once in the given order (evaluation pools).
        shuffle_buffer: raw samples held for shuffling (0: no shuffle).
        labels: class ids to keep (None: keep every sample).
        strict: raise on a corrupt sample or shard instead of skipping it.
        where: names the stream in log lines and errors.
        expected: samples the shards hold (the manifest's count for the split): after every full pass the
            stream compares what it read with it and warns (strict: raises) when shards lost samples.
        counts: counters for ``SkipCounter`` (shared memory for DataLoader workers).

    Attributes:
        read: raw samples read from the shards so far.
        skips: counts what was skipped.
    """

    def __init__(self, urls: list[str], image_size: int, seed: int, resampled: bool, shuffle_buffer: int = 0,
                 labels: set[int] | None = None, strict: bool = False, where: str = "shards",
                 expected: int | None = None, counts: torch.Tensor | None = None) -> None:
        if not urls:
            raise ValueError(f"{where}: no shard URLs to stream")
        self.urls, self.image_size, self.seed, self.resampled = list(urls), image_size, seed, resampled
        self.shuffle_buffer, self.labels, self.where = shuffle_buffer, labels, where
        self.skips = SkipCounter(where, strict, counts)
        self.strict, self.expected, self._warned_short = strict, expected, False
        self.read = 0
        self._buffer: list[dict] = []

    @property
    def buffered(self) -> int:
        """Raw samples held in the shuffle buffer now."""
        return len(self._buffer)

    def __iter__(self) -> Iterator[Record]:
        rng = random.Random(self.seed)
        for sample in self._shuffled(self._kept(rng), rng):
            key = str(sample.get("__key__"))
            if not any(k in sample for k in IMAGE_KEYS):
                self.skips.drop("no image", key)
                continue
            if "txt" not in sample:
                self.skips.drop("no caption", key)
                continue
            try:
                record = decode_record(sample, self.image_size)
            except Exception as exn:  # noqa: BLE001 - any decoder error is a corrupt image
                self.skips.drop("undecodable image", key, exn)
                continue
            yield record

    def _shards(self, rng: random.Random) -> Iterator[dict]:
        # the tar reader asks for the next shard once it has read every sample of the last: when a pass ends
        # here, ``read`` holds all it read
        while True:
            before = self.read
            yield from ({"url": url} for url in (rng.sample(self.urls, len(self.urls)) if self.resampled else self.urls))
            self._check_pass(self.read - before)
            if not self.resampled:
                return
            if self.read == before:  # else an unreadable data set would spin forever
                raise RuntimeError(f"{self.where}: a full pass over {len(self.urls)} shards read no sample "
                                   f"({self.skips.count} dropped: {self.skips.by_reason()}); first shard: {self.urls[0]}")

    def _check_pass(self, read: int) -> None:
        """Compare one full pass with the manifest's count: lost samples warn (once), or raise when strict."""
        if self.expected is None or read >= self.expected:
            return
        message = (f"{self.where}: a full pass over the shards read {read} of the {self.expected} samples the manifest "
                   f"lists ({self.expected - read} lost to truncated or unreadable shards; dropped: {self.skips.by_reason()}"
                   f", e.g. {self.skips.examples.get('unreadable shard', [])[:2]})")
        if self.strict:
            raise RuntimeError(message + "; rewrite the shards, or drop strict_decode to go on without them")
        if not self._warned_short:
            log.warning(message)
            self._warned_short = True

    def _kept(self, rng: random.Random) -> Iterator[dict]:
        for sample in tarfile_samples(self._shards(rng), handler=self.skips):
            self.read += 1
            if self.labels is None:
                yield sample
                continue
            if "cls" not in sample:  # a labelled domain's sample without its class
                self.skips.drop("no label", str(sample.get("__key__")))
                continue
            try:
                label = sample_label(sample)
            except ValueError as exn:  # an unparsable cls member
                self.skips.drop("bad label", str(sample.get("__key__")), exn)
                continue
            if label in self.labels:
                yield sample

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        self._buffer = []  # this iteration's buffer, watched by ``buffered``
        return shuffled(samples, self.shuffle_buffer, rng, self._buffer)


def shuffled(items: Iterator, size: int, rng: random.Random, buffer: list | None = None) -> Iterator:
    """``items`` through a shuffle buffer of ``size`` (0: in order): each item leaves at a random time after
    the buffer filled; ``buffer`` (an empty list) is the buffer itself, for callers that watch its size."""
    if not size:
        yield from items
        return
    buffer = [] if buffer is None else buffer
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    while buffer:
        yield buffer.pop()
