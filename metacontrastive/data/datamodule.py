"""EpisodicDataModule: the wiring from configuration to loaders of meta-batches that mix domains.

It reads and checks every domain's manifest (``manifest.py``) before any shard is opened, then hands
the training loader a ``MetaBatchStream`` and the validation and test loaders fixed episodes
(``tasks.py``): drawn from the whole evaluation split and seeded by ``eval_seed`` alone, so they are
identical across runs, training seeds and methods. Validation and test may name their own domains,
including evaluation-only domains the model was not trained on (they get ids after the training
domains; the model conditions them on its ``unknown`` embedding). A meta-batch is a ``list[Task]``.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from metacontrastive.data.episodes import EpisodeShape, mix_seed
from metacontrastive.data.features import FeatureSpec, FrozenTower, build_split, feature_folder, feature_table
from metacontrastive.data.manifest import ROOT, DomainSplit, domain_split, read_manifest
from metacontrastive.data.shards import DROP_REASONS
from metacontrastive.data.tasks import (
    DomainSampling, EvaluationPool, FixedEpisodes, Interleaved, MetaBatches, MetaBatchStream, Prompts, StreamOptions,
    VariableEpisodes, VariableShape,
)
from metacontrastive.errors import BadInput

__all__ = ["EpisodicDataModule"]

log = logging.getLogger(__name__)


def _identity(batch):
    return batch


def _check_options(options: dict) -> None:
    """Refuse settings that cannot mean anything, before any work starts, naming the option and its range."""
    def refuse(name: str, why: str) -> None:
        raise ValueError(f"data.{name}={options[name]!r}: {why}")

    for name in ("domains", "val_domains", "test_domains"):
        names = options[name]
        if names is not None and (not names or len(set(names)) != len(names)):
            refuse(name, "name at least one domain, each once")
    for name, low in (("tasks_per_batch", 1), ("steps_per_epoch", 1), ("val_episodes", 1), ("test_episodes", 1),
                      ("num_workers", 0), ("prefetch", 1), ("shuffle_buffer", 0), ("reservoir", 1)):
        if options[name] < low:
            refuse(name, f"use {low} or more")
    if options["image_size"] is not None and options["image_size"] < 8:
        refuse("image_size", "use 8 or more, or null for the image tower's input size")
    for name in ("eval_ways", "eval_pool", "support_size", "query_size"):
        if options[name] is not None and options[name] < (2 if name == "eval_ways" else 1):
            refuse(name, f"use {2 if name == 'eval_ways' else 1} or more, or null for the default")
    unknown = sorted(set(options["augment"]) - set(options["domains"]))
    if unknown:
        refuse("augment", f"augmentation applies to training domains; {unknown} is not among data.domains")


class EpisodicDataModule(L.LightningDataModule):
    """Meta-batches of few-shot tasks from per-domain WebDataset shards, streamed with bounded memory.

    Labelled domains give N-way K-shot tasks; caption-only domains (manifest ``labelled: false``) give
    tasks of ``support_size`` + ``query_size`` image-caption pairs. Everything that can be checked from
    the manifests (domains, splits, class counts) is checked in ``setup``, before any shard is opened.

    Args:
        domains: the training domains, in domain-id order (the model's domain table).
        root: the shards root, holding ``<domain>/manifest.json`` and the shards.
        urls: per-domain shard specs that override ``root``, each with a ``{split}`` brace pattern or a
            ``{shard}`` field (see ``metacontrastive.data.manifest``); the manifest lies beside the shards.
        val_domains: domains validated on their ``val`` split (default: ``domains``). May name
            evaluation-only domains, absent from ``domains``.
        test_domains: domains tested on their ``test`` split (default: ``domains``); may name
            evaluation-only domains, e.g. a held-out domain whose classes all sit in its test split.
        ways: classes per labelled task (N).
        shots: support samples per class (K).
        queries: query samples per class (Q).
        eval_ways: classes per validation and test task (default: ``ways``); a domain whose evaluation
            split has fewer usable classes is evaluated with all of them, with a warning.
        support_size: support pairs of a caption-only task (default: ``ways * shots``).
        query_size: query pairs of a caption-only task (default: ``ways * queries``).
        tasks_per_batch: tasks per meta-batch; at least 2 when two domains are configured.
        domain_sampling: ``round_robin`` (domains in turn), ``uniform`` or ``proportional`` (to each
            domain's train samples); a meta-batch always holds two domains when two are configured.
        steps_per_epoch: meta-batches per training epoch (the streams are infinite).
        val_episodes: fixed validation episodes per domain.
        test_episodes: fixed test episodes per domain.
        image_size: side length images are decoded at; None: the image tower's input size when it states one
            (``model.encoder.image_size``, or the pretrained backbone's own), else 32. A size that differs from the
            tower's warns: the tower would resize every image again.
        num_workers: DataLoader workers for the training stream.
        prefetch: meta-batches each training worker prepares ahead (DataLoader ``prefetch_factor``).
        pin_memory: hand the model page-locked batches, which a GPU copies while it computes; None: when the
            trainer runs on a CUDA device.
        shuffle_buffer: raw samples each training stream holds for shuffling.
        reservoir: records kept per class by the training sampler.
        eval_pool: records decoded per class of an evaluation split (caption-only: in total), the first
            in shard order; None: the whole split, so that episodes draw from all of it.
        augment: domains whose training images are augmented: random resized crop, horizontal flip and
            colour jitter (``episodes.augment``). Name only domains whose classes survive a crop and a
            mirror image (the synthetic medical demo's left/right findings do not).
        prompts: class prompts per class: ``one`` template (a random one per training task, the first for
            evaluation) or ``all`` the domain's templates, their embeddings averaged (prompt ensembling).
        seed: seeds the training streams (mixed with rank, worker and epoch).
        eval_seed: seeds the fixed validation and test episodes (kept apart from ``seed`` so that runs
            with different training seeds are evaluated on the same episodes).
        strict_decode: raise on a corrupt shard or image instead of skipping, counting and logging it.
        feature_cache: ``auto``: when the model's image tower is frozen (and its features do not depend on the
            task), compute each image's features once, store them beside the shards and stream them instead of
            the images, for every split but the training split of an augmented domain
            (``metacontrastive.data.features``); ``on``: the same, and stop if it cannot be used; ``off``: never.
        feature_dir: where the feature cache lives (default: beside each domain's shards, under ``root``); needed
            when shards come from ``urls``.
    """

    def __init__(
        self,
        domains: list[str] = ["natural", "medical"],  # noqa: B006 - read-only default, shown by the CLI
        root: str = ROOT,
        urls: dict[str, str] | None = None,
        val_domains: list[str] | None = None,
        test_domains: list[str] | None = None,
        ways: int = 5,
        shots: int = 5,
        queries: int = 15,
        eval_ways: int | None = None,
        support_size: int | None = None,
        query_size: int | None = None,
        tasks_per_batch: int = 4,
        domain_sampling: DomainSampling = "round_robin",
        steps_per_epoch: int = 100,
        val_episodes: int = 50,
        test_episodes: int = 600,
        image_size: int | None = None,
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        shuffle_buffer: int = 500,
        reservoir: int = 40,
        eval_pool: int | None = None,
        augment: list[str] = [],  # noqa: B006 - read-only default, shown by the CLI
        prompts: Prompts = "one",
        seed: int = 0,
        eval_seed: int = 0,
        strict_decode: bool = False,
        feature_cache: Literal["auto", "on", "off"] = "auto",
        feature_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_options(locals())
        if len(domains) > 1 and tasks_per_batch < 2:
            raise ValueError(f"tasks_per_batch={tasks_per_batch} cannot mix {len(domains)} domains in a meta-batch; "
                             "the alignment term needs tasks from two domains")
        self.shape = EpisodeShape(ways, shots, queries, support_size if support_size is not None else ways * shots,
                                  query_size if query_size is not None else ways * queries)
        self.eval_shape = dataclasses.replace(self.shape, ways=eval_ways) if eval_ways is not None else self.shape
        if reservoir < self.shape.per_class:
            raise ValueError(f"reservoir={reservoir} cannot hold shots + queries = {self.shape.per_class} records per class")
        self.domains = list(domains)
        self.stage_domains = {"train": self.domains, "val": list(val_domains or domains),
                              "test": list(test_domains or domains)}
        # training domains first, in order (their ids are the model's domain table), then evaluation-only ones
        names = self.domains + [d for stage in ("val", "test") for d in self.stage_domains[stage]]
        self.domain_ids = {name: i for i, name in enumerate(dict.fromkeys(names))}
        self.manifests: dict[str, dict] = {}
        self.splits: dict[str, list[DomainSplit]] = {}
        self._pools: dict[tuple[str, str], EvaluationPool] = {}
        self._dropped: torch.Tensor | None = None  # (workers, training domains, reasons), shared with the workers
        self._fixed_sets: dict[str, Interleaved] = {}
        self.tower_size: int | None = None  # the image tower's input side, once a model is attached
        self.spec: FeatureSpec | None = None  # what the feature cache holds, once built
        self.cached: dict[tuple[str, str], list[Path]] = {}  # (domain, split) -> its feature files

    @property
    def image_size(self) -> int:
        """The side images are decoded at: ``image_size``, else the attached image tower's input size, else 32."""
        return self.hparams.image_size or self.tower_size or 32

    @property
    def evaluation_only(self) -> list[str]:
        """Domains validated or tested but not trained on."""
        return [d for d in self.domain_ids if d not in self.domains]

    def split(self, name: str) -> list[DomainSplit]:
        """The ``name`` split of every domain of that stage, checked against its manifest (read once per domain).

        Training splits must allow ``ways``-way tasks; an evaluation split with fewer usable classes than
        ``eval_ways`` is evaluated with all of them (see ``eval_shape_of``)."""
        if name not in self.splits:
            hp = self.hparams
            train = name == "train"
            shape = self.shape if train else self.eval_shape
            out = []
            for domain in self.stage_domains[name]:
                if domain not in self.manifests:
                    self.manifests[domain] = read_manifest(domain, hp.root, hp.urls)
                out.append(domain_split(domain, self.domain_ids[domain], name, self.manifests[domain], hp.root, hp.urls,
                                        shape.ways if train else 2, shape.per_class, shape.caption_size))
            self.splits[name] = out
        return self.splits[name]

    def eval_shape_of(self, split: DomainSplit) -> EpisodeShape:
        """The episode shape of a domain's evaluation split: ``eval_ways`` capped at its usable classes."""
        shape = self.eval_shape
        if split.labelled and len(split.usable) < shape.ways:
            log.warning("domain %r: its evaluation split has %d usable classes, so it is evaluated %d-way, not %d-way",
                        split.name, len(split.usable), len(split.usable), shape.ways)
            return dataclasses.replace(shape, ways=len(split.usable))
        return shape

    def setup(self, stage: str | None = None) -> None:
        for name in {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test")):
            self.split(name)

    def attach(self, tower: FrozenTower, device: torch.device | str = "cpu", progress: bool = True) -> None:
        """Connect the model's image tower: images are decoded at its input size (unless ``image_size`` says
        otherwise), and, with ``feature_cache``, its features of every split set up so far are computed once
        (built where missing or stale; shard by shard, so DDP ranks that attach together share the work) and
        streamed instead of images from then on. Called by the model's ``setup`` and by ``evaluate``."""
        hp = self.hparams
        self.tower_size = tower.input_size
        if hp.image_size is not None and tower.input_size is not None and hp.image_size != tower.input_size:
            log.warning("data.image_size=%d, but the image tower runs at %d px (model.encoder.image_size): every image is "
                        "decoded at %d and resized again to %d; leave data.image_size unset to decode at the tower's size",
                        hp.image_size, tower.input_size, hp.image_size, tower.input_size)
        if hp.feature_cache == "off":
            return
        if tower.cacheable is not None:
            if hp.feature_cache == "on":
                raise BadInput(f"data.feature_cache=on, but {tower.cacheable}: set data.feature_cache=auto or off")
            log.info("feature cache off: %s", tower.cacheable)
            return
        self.spec = FeatureSpec(tower.id, self.image_size)
        for name, splits in self.splits.items():
            for split in splits:
                if (split.name, name) in self.cached or (name == "train" and split.name in hp.augment):
                    continue  # augmented training images change every time: no cache
                remote = split.name in (hp.urls or {})
                if remote and hp.feature_dir is None:
                    if hp.feature_cache == "on":
                        raise BadInput(f"domain {split.name!r} streams from data.urls: set data.feature_dir to a folder "
                                       "for its feature cache, or data.feature_cache=auto to read its images")
                    log.info("feature cache off for domain %r: its shards come from data.urls and data.feature_dir "
                             "is not set", split.name)
                    continue
                folder = feature_folder(hp.feature_dir or hp.root, split.name, self.spec)
                self.cached[(split.name, name)] = build_split(split, name, tower.tower, self.spec, folder, device,
                                                              strict=hp.strict_decode, progress=progress)

    def train_dataloader(self) -> DataLoader:
        hp, trainer = self.hparams, self.trainer
        rank, epoch, step = (trainer.global_rank, trainer.current_epoch, trainer.global_step) if trainer else (0, 0, 0)
        cached = {domain: [str(p) for p in files] for (domain, name), files in self.cached.items() if name == "train"}
        options = StreamOptions(self.image_size, hp.shuffle_buffer, hp.reservoir, hp.strict_decode, tuple(hp.augment),
                                hp.prompts, cached, self.spec)
        # A resumed run (step > 0) seeds its streams with the step it resumes at as well: fresh episodes, never
        # the ones the interrupted run already trained on in this epoch (a fresh run's seeds are unchanged).
        seed = mix_seed(hp.seed, step) if step > 0 else hp.seed
        splits = self.split("train")
        self._dropped = torch.zeros(max(hp.num_workers, 1), len(splits), len(DROP_REASONS), dtype=torch.long).share_memory_()
        stream = MetaBatchStream(splits, self.shape, hp.tasks_per_batch, hp.domain_sampling, hp.steps_per_epoch,
                                 options, seed, rank, epoch, self._dropped)
        return DataLoader(stream, batch_size=None, collate_fn=_identity, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0, pin_memory=self.pins_memory,
                          prefetch_factor=hp.prefetch if hp.num_workers > 0 else None)

    @property
    def pins_memory(self) -> bool:
        """Whether the loaders pin their batches: ``pin_memory``, or by default whether the trainer runs on CUDA."""
        if self.hparams.pin_memory is not None:
            return self.hparams.pin_memory
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        return device is not None and device.type == "cuda"

    def dropped(self) -> dict[str, dict[str, int]]:
        """Samples dropped so far on this rank, by domain and reason (``shards.DROP_REASONS``): the training
        streams (every worker's) and the evaluation pools."""
        out: dict[str, dict[str, int]] = {}
        if self._dropped is not None:
            for split, counts in zip(self.split("train"), self._dropped.sum(dim=0).tolist()):
                out[split.name] = {r: n for r, n in zip(DROP_REASONS, counts) if n}
        for (domain, _), pool in self._pools.items():
            for reason, n in pool.skips.by_reason().items():
                out.setdefault(domain, {})[reason] = out.get(domain, {}).get(reason, 0) + n
        return out

    def state_dict(self) -> dict:
        """What a resumed run checks: the training stream depends on the seed and the worker count."""
        return {"seed": self.hparams.seed, "num_workers": self.hparams.num_workers}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_workers"):
            if key in state and state[key] != self.hparams[key]:
                log.warning("resuming with data.%s=%s where the checkpoint's run had %s: the training episodes from "
                            "here on differ from the ones that run would have drawn", key, self.hparams[key], state[key])

    def pool(self, split: DomainSplit, name: str) -> EvaluationPool:
        """The decoded ``name`` split of one domain, decoded once."""
        key = (split.name, name)
        if key not in self._pools:
            hp = self.hparams
            features = (feature_table(self.cached[key], self.spec), self.spec.tower) if key in self.cached else None
            self._pools[key] = EvaluationPool(split, self.image_size, hp.eval_pool, hp.strict_decode, features)
        return self._pools[key]

    def episode_sets(self, name: str, shots: list[int] | None = None, count: int | None = None,
                     labelled_only: bool = False, variable: VariableShape | None = None) -> list[FixedEpisodes]:
        """Fixed episodes of every domain of the ``val`` or ``test`` split, one set per domain and shots.

        Args:
            name: ``val`` or ``test``.
            shots: support sizes (default: ``shots``), each its own seeded set.
            count: episodes per set (default: ``val_episodes`` or ``test_episodes``).
            labelled_only: leave out caption-only domains (few-shot classification needs labels).
            variable: also a set of variable-way, variable-shot episodes per labelled domain, within these
                bounds (``tasks.VariableEpisodes``, Meta-Dataset's sampler).
        """
        hp = self.hparams
        count = count if count is not None else (hp.val_episodes if name == "val" else hp.test_episodes)
        sets: list[FixedEpisodes] = []
        for split in self.split(name):
            if not split.labelled and labelled_only:
                continue
            pool = self.pool(split, name)
            sets += [FixedEpisodes(pool, dataclasses.replace(self.eval_shape_of(split), shots=k), count, hp.eval_seed,
                                   hp.prompts) for k in (shots or [self.eval_shape.shots])]
            if variable is not None and split.labelled:
                sets.append(VariableEpisodes(pool, variable, count, hp.eval_seed, hp.prompts))
        return sets

    def fixed_episodes(self, name: str) -> Interleaved:
        """The fixed episodes of the ``val`` or ``test`` split, every domain's interleaved, built once."""
        if name not in self._fixed_sets:
            self._fixed_sets[name] = Interleaved(self.episode_sets(name))
        return self._fixed_sets[name]

    def _fixed_loader(self, name: str) -> DataLoader:
        # items are whole meta-batches, so that a distributed sampler hands each rank mixed-domain batches
        batches = MetaBatches(self.fixed_episodes(name), self.hparams.tasks_per_batch)
        return DataLoader(batches, batch_size=None, collate_fn=_identity, pin_memory=self.pins_memory)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")
