"""The manifest: writing it, reading it (the one reader), where a domain's shards live, and the checks
made on a split before anything streams.

``<root>/<domain>/manifest.json`` names every class of the domain, each split's classes with their
counts and its shard list, and the caption templates (see data/README.md).

A domain is read from ``<root>/<domain>/`` (its shards as listed by its manifest) unless ``urls`` maps it
to a shard spec: any URL WebDataset opens (a local path, ``file:``, ``pipe:``, ``http(s)://``) holding
one of two fields:

- ``{split}`` in a brace pattern, expanded once per split: ``/data/natural/{split}-{000000..000009}.tar``.
  One pattern serves every split, so it fits data whose splits have the same number of shards; a
  pattern that names more shards than the manifest lists for a split is an error.
- ``{shard}``, filled with each shard name the manifest lists for the split:
  ``pipe:curl -sfL https://host/natural/{shard}``. This fits any layout that ``prepare`` writes.

The manifest is always needed: it names the classes of each split and their counts, which the checks
below use before any shard is opened. It always lies beside the shards, at ``<root>/<domain>/manifest.json``
or at the spec with the path segment that holds the field replaced by ``manifest.json``
(``pipe:curl -sfL https://host/natural/manifest.json``), so a spec needs no second setting.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

__all__ = [
    "MANIFEST",
    "ROOT",
    "SPLITS",
    "DomainSplit",
    "available_domains",
    "domain_split",
    "manifest_url",
    "read_manifest",
    "split_urls",
    "write_manifest",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
ROOT = "data/shards"  # where shards are written and read unless a command says otherwise
_FIELD = re.compile(r"[^/\s]*\{(?:split|shard)\}[^/\s]*")  # the path segment that holds the field


def write_manifest(folder: Path, domain: str, classes: list[str], templates: list[str], source: str,
                   splits: dict[str, dict]) -> None:
    """Write ``folder/manifest.json``.

    Args:
        folder: the domain's folder (a staging folder while ``DomainWriter`` writes).
        domain: the domain name.
        classes: every class name; a sample's ``cls`` indexes it. Empty for caption-only data.
        templates: caption templates with a ``{label}`` field.
        source: where the data came from.
        splits: per split, ``{"classes", "counts", "num_samples", "shards"}``.
    """
    manifest = {"domain": domain, "labelled": bool(classes), "classes": classes, "templates": templates,
                "source": source, "splits": splits}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def available_domains(root: str | Path) -> list[str]:
    """Domains under ``root`` that have a manifest."""
    root = Path(root)
    return sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}")) if root.exists() else []


def _read_local(root: str | Path, domain: str) -> dict:
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


@dataclass(frozen=True)
class DomainSplit:
    """What a loader needs to know about one domain's split, read from its manifest.

    Attributes:
        name: the domain.
        domain_id: the domain's index in the configured domain list.
        urls: the split's shard URLs.
        classes: every class name of the domain; record labels index it. Empty for caption-only data.
        usable: class ids of this split with at least ``shots + queries`` samples (empty if caption-only).
        counts: samples of each class id of this split (empty if caption-only).
        templates: caption templates with a ``{label}`` field, turning a class into a prompt.
        num_samples: samples in the split, all classes included.
    """

    name: str
    domain_id: int
    urls: list[str]
    classes: list[str]
    usable: list[int]
    counts: dict[int, int]
    templates: list[str]
    num_samples: int

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def manifest_url(spec: str) -> str:
    """The manifest beside the shards a spec names: the segment holding ``{split}``/``{shard}`` replaced."""
    if not _FIELD.search(spec):
        raise ValueError(f"shard spec {spec!r} needs a {{split}} or {{shard}} field (see metacontrastive.data.manifest)")
    return _FIELD.sub(MANIFEST, spec, count=1)


def read_manifest(domain: str, root: str | Path, urls: dict[str, str] | None = None) -> dict:
    """Read a domain's manifest from its spec in ``urls`` or from ``root``: the one reader of manifests.

    Raises:
        ValueError: the domain is neither in ``urls`` nor a folder under ``root`` while other domains are
            available; names them.
        FileNotFoundError: the domain has no readable manifest (or no domain has shards yet); names the
            command that writes one.
    """
    urls = urls or {}
    if domain in urls:
        url = manifest_url(urls[domain])
        try:
            with wds.gopen(url) as stream:
                return json.loads(stream.read())
        except (OSError, ValueError) as exn:
            raise FileNotFoundError(
                f"no readable manifest for domain {domain!r} at {url} ({exn}); write shards and manifest with "
                f"`python -m metacontrastive prepare <converter> --domain {domain} --out DIR` "
                f"and copy {MANIFEST} beside the shards"
            ) from exn
    have = sorted(set(available_domains(root)) | set(urls))
    if have and not (Path(root) / domain).is_dir():  # with nothing prepared yet, the missing manifest is the news
        raise ValueError(
            f"unknown domain {domain!r}: it is neither a folder under {root} nor a key of data.urls; available domains: "
            f"{have}. Write demo shards with `python -m metacontrastive prepare synthetic --domain {domain} --out {root}`"
        )
    return _read_local(root, domain)


def _shard_urls(domain: str, split: str, manifest: dict, root: str, spec: str | None) -> list[str]:
    listed = split_urls(root, domain, split, manifest)  # checks the split exists
    if spec is None:
        return listed
    if "{shard}" in spec:
        return [spec.replace("{shard}", Path(path).name) for path in listed]
    expanded = wds.shardlists.expand_urls(spec.replace("{split}", split))
    if len(expanded) > len(listed):
        raise ValueError(
            f"domain {domain!r} {split} split: the shard spec {spec!r} names {len(expanded)} shards but the manifest "
            f"lists {len(listed)}; fix the brace range or use a {{shard}} field, filled from the manifest"
        )
    return expanded


def domain_split(
    domain: str,
    domain_id: int,
    split: str,
    manifest: dict,
    root: str,
    urls: dict[str, str] | None,
    ways: int | None,
    per_class: int,
    caption_size: int,
) -> DomainSplit:
    """Check that one domain's split can form tasks, and describe it for the loaders.

    Classes with fewer than ``per_class`` samples are dropped with a warning that counts them.

    Args:
        domain: the domain name.
        domain_id: its index in the configured domains.
        split: ``train``, ``val`` or ``test``.
        manifest: the domain's manifest (``read_manifest``).
        root: the shards root, used when ``urls`` has no spec for the domain.
        urls: per-domain shard specs (see the module docstring).
        ways: classes per labelled task; None checks nothing (the caller chooses the ways from ``usable``).
        per_class: samples per class in a labelled task (shots + queries).
        caption_size: pairs per caption-only task (support + query).

    Raises:
        ValueError: fewer than ``ways`` classes of a labelled split have ``per_class`` samples, or a
            caption-only split has fewer than ``caption_size`` samples.
    """
    shard_urls = _shard_urls(domain, split, manifest, root, (urls or {}).get(domain))
    info = manifest["splits"][split]
    classes = list(manifest["classes"]) if manifest.get("labelled", True) else []
    usable: list[int] = []
    counts: dict[int, int] = {}
    if classes:
        index = {name: i for i, name in enumerate(classes)}
        counts = {index[name]: int(n) for name, n in info["counts"].items()}
        usable = [c for c, n in counts.items() if n >= per_class]
        dropped = len(counts) - len(usable)
        if dropped:
            log.warning("domain %r %s split: dropped %d of %d classes with fewer than shots + queries = %d samples",
                        domain, split, dropped, len(counts), per_class)
        if ways is not None and len(usable) < ways:
            raise ValueError(
                f"domain {domain!r} {split} split: {ways}-way episodes need {ways} classes with at least shots + queries = "
                f"{per_class} samples each, but the split has {len(counts)} classes and {len(usable)} with that many; "
                f"lower data.ways, data.shots or data.queries"
            )
    elif info["num_samples"] < caption_size:
        raise ValueError(
            f"caption-only domain {domain!r} {split} split: a task needs support_size + query_size = {caption_size} "
            f"pairs but the split has {info['num_samples']}"
        )
    return DomainSplit(domain, domain_id, shard_urls, classes, usable, counts, list(manifest["templates"]),
                       int(info["num_samples"]))
