"""Meta-splits of a domain: which classes (or, for caption-only data, which images) go to train, val and test.

Labelled domains are split by class, so val and test classes are never seen in meta-training (the
evaluation protocol of DESIGN.md); caption-only domains have no classes and are split by image.
"""
from __future__ import annotations

import math

import numpy as np

from metacontrastive.data.manifest import SPLITS

__all__ = ["CLASS_FRACTIONS", "class_split", "explicit_class_split", "fraction_split"]

CLASS_FRACTIONS = (0.6, 0.2, 0.2)  # train, val and test fractions of a labelled domain's classes


def fraction_split(n: int, fractions: tuple[float, float, float], seed: int) -> dict[str, list[int]]:
    """Split ``range(n)`` into train/val/test index lists by a seeded shuffle (val and test rounded up).

    Args:
        n: how many things to split.
        fractions: train, val and test fractions (summing to 1).
        seed: seeds the shuffle.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each list in ascending order.
    """
    order = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    n_val = math.ceil(fractions[1] * n)
    n_test = math.ceil(fractions[2] * n)
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"split {fractions} of {n} leaves a split empty; change the fractions or add data")
    cut = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {split: sorted(idx) for split, idx in cut.items()}


def class_split(classes: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Split classes into disjoint train/val/test lists by a seeded shuffle (val and test rounded up)."""
    try:
        cut = fraction_split(len(classes), fractions, seed)
    except ValueError:
        raise ValueError(f"class split {fractions} of {len(classes)} classes leaves a split empty; "
                         f"name the classes of each split with --train-classes/--val-classes/--test-classes") from None
    return {split: [classes[i] for i in idx] for split, idx in cut.items()}


def explicit_class_split(classes: list[str], lists: dict[str, list[str]]) -> dict[str, list[str]]:
    """Check explicit per-split class lists against the classes a source has.

    Args:
        classes: every class of the source.
        lists: class names per split; a split left out (or empty) gets no shards, a class left out of
            every list is not written.

    Returns:
        The lists, each in the order of ``classes``.
    """
    unknown = sorted({c for names in lists.values() for c in names} - set(classes))
    if unknown:
        raise ValueError(f"unknown classes {unknown}; the source has {classes}")
    seen: dict[str, str] = {}
    for split in SPLITS:
        for name in lists.get(split, []):
            if name in seen:
                raise ValueError(f"class {name!r} is in both the {seen[name]} and the {split} list; "
                                 f"meta-splits are class-disjoint")
            seen[name] = split
    if not seen:
        raise ValueError("the explicit class lists are all empty; name at least one class")
    return {split: [c for c in classes if seen.get(c) == split] for split in SPLITS}
