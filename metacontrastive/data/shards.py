"""The shard format: writing a domain's WebDataset shards and manifest, and streaming them back.

Layout (see data/README.md): ``<root>/<domain>/<split>-000000.tar ...`` and ``<root>/<domain>/manifest.json``.
A sample holds ``__key__``, the image (``png`` or ``jpg``), ``txt`` (caption), ``cls`` (class index into
the manifest's ``classes``; absent for caption-only data) and ``json``
(``{"domain", "label", "split", "source"}``).

``DomainWriter`` writes into a staging folder and renames it into place only after the manifest is
written, so an interrupted run never leaves a manifest that points at partial shards.
"""
from __future__ import annotations

import io
import json
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

__all__ = [
    "SPLITS",
    "DomainWriter",
    "Record",
    "available_domains",
    "decode_record",
    "load_manifest",
    "split_urls",
    "stream_records",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
IMAGE_KEYS = ("png", "jpg", "jpeg")


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
        maxcount: int = 1000,
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
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.domain}.partial-", dir=self.root))
        self.staging.chmod(0o755)  # mkdtemp makes it private; shards are meant to be shared
        return self

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
            self.writers[split] = wds.ShardWriter(pattern, maxcount=self.maxcount, verbose=0)
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
            shards = sorted(p.name for p in self.staging.glob(f"{split}-*.tar"))
            labelled = [c for c in counts if c is not None]
            splits[split] = {
                "classes": sorted(labelled, key=self.classes.index),
                "counts": {c: counts[c] for c in sorted(labelled, key=self.classes.index)},
                "num_samples": sum(counts.values()),
                "shards": shards,
            }
        manifest = {
            "domain": self.domain,
            "labelled": bool(self.classes),
            "classes": self.classes,
            "templates": self.templates,
            "source": self.source,
            "splits": splits,
        }
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2))


def available_domains(root: str | Path) -> list[str]:
    """Domains under ``root`` that have a manifest."""
    root = Path(root)
    return sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}")) if root.exists() else []


def load_manifest(root: str | Path, domain: str) -> dict:
    """Read ``<root>/<domain>/manifest.json`` with an error that says how to make it."""
    path = Path(root) / domain / MANIFEST
    if not path.exists():
        have = available_domains(root)
        raise FileNotFoundError(
            f"no manifest for domain {domain!r} at {path} (domains with shards: {have or 'none'}); "
            f"write demo shards with `python -m metacontrastive prepare synthetic --domain {domain} --out {root}` "
            f"or `make data DOMAINS={domain}`"
        )
    return json.loads(path.read_text())


def split_urls(root: str | Path, domain: str, split: str, manifest: dict) -> list[str]:
    """Local paths of one split's shards, as listed in the manifest."""
    if split not in manifest["splits"]:
        raise ValueError(f"domain {domain!r} has no {split!r} split; it has {sorted(manifest['splits'])}")
    return [str(Path(root) / domain / name) for name in manifest["splits"][split]["shards"]]


@dataclass
class Record:
    """One decoded sample: a uint8 image (3, H, W), its caption and its class index (-1 if none)."""

    image: torch.Tensor
    text: str
    label: int
    key: str


def decode_record(sample: dict, image_size: int) -> Record:
    """Decode a raw WebDataset sample into a ``Record`` with the image resized to ``image_size``."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image (expected one of {IMAGE_KEYS})")
    image = Image.open(io.BytesIO(sample[key])).convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    label = int(sample["cls"]) if "cls" in sample else -1
    return Record(array, sample["txt"].decode() if isinstance(sample["txt"], bytes) else sample["txt"], label, sample["__key__"])


def stream_records(
    urls: list[str],
    image_size: int,
    seed: int,
    resampled: bool,
    shuffle_buffer: int = 0,
) -> Iterator[Record]:
    """Stream decoded records from shards.

    Args:
        urls: shard URLs (local paths or anything WebDataset opens).
        image_size: side length images are resized to.
        seed: seeds shard resampling and the shuffle buffer; callers mix in rank and worker.
        resampled: draw shards with replacement forever (training) or read each once in order.
        shuffle_buffer: sample shuffle buffer size (0: no shuffle).
    """
    source = wds.ResampledShards(urls, seed=seed, deterministic=True) if resampled else wds.SimpleShardList(urls)
    stages = [source, wds.tarfile_to_samples()]
    if shuffle_buffer:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed)))
    for sample in wds.DataPipeline(*stages):
        yield decode_record(sample, image_size)
