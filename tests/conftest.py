"""Shared fixtures: tiny demo shards written once per test session."""
from __future__ import annotations

import pytest

from metacontrastive.data.synthetic import write_synthetic


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Synthetic natural + medical shards at 16 px, 24 images per class (enough for 5-way 5-shot 5-query)."""
    root = tmp_path_factory.mktemp("shards")
    for domain in ("natural", "medical"):
        write_synthetic(domain, root, per_class=24, size=16, seed=0)
    return root
