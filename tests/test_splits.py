"""Meta-splits: seeded, disjoint, complete, and the errors that say what to change."""
from __future__ import annotations

import pytest

from metacontrastive.data.splits import class_split, explicit_class_split, fraction_split


def test_fraction_split_is_seeded_disjoint_and_rounds_val_and_test_up():
    cut = fraction_split(11, (0.6, 0.2, 0.2), seed=1)
    assert [len(cut[s]) for s in ("train", "val", "test")] == [5, 3, 3]
    assert sorted(cut["train"] + cut["val"] + cut["test"]) == list(range(11))
    assert cut == fraction_split(11, (0.6, 0.2, 0.2), seed=1)
    assert any(fraction_split(11, (0.6, 0.2, 0.2), seed=s) != cut for s in range(2, 6))


def test_class_split_keeps_class_order_and_names_the_fix():
    classes = [f"c{i}" for i in range(10)]
    split = class_split(classes, (0.6, 0.2, 0.2), seed=0)
    assert all(names == sorted(names, key=classes.index) for names in split.values())
    assert sorted(sum(split.values(), [])) == sorted(classes)
    with pytest.raises(ValueError, match="--train-classes"):
        class_split(classes[:2], (0.6, 0.2, 0.2), seed=0)


def test_explicit_class_split():
    classes = ["a", "b", "c", "d"]
    assert explicit_class_split(classes, {"test": ["d", "a"]}) == {"train": [], "val": [], "test": ["a", "d"]}
    with pytest.raises(ValueError, match="both the train and the test list"):
        explicit_class_split(classes, {"train": ["a"], "test": ["a"]})
    with pytest.raises(ValueError, match="all empty"):
        explicit_class_split(classes, {"train": []})
