"""Fixed evaluation episodes: drawn from the whole split, seeded per domain, and the data module's
evaluation-only domains, validation subsets and capped ways."""
import logging

import lightning as L
import numpy as np
import pytest
from PIL import Image

from metacontrastive.data.datamodule import EpisodicDataModule
from metacontrastive.data.shards import DomainWriter
from metacontrastive.module import MetaContrastiveModule


def _write(root, domain, splits, per_class=12, size=8):
    """A domain with the given classes per split: ``{"train": 5, "test": 4}``; random images."""
    rng = np.random.default_rng(len(domain))
    names = [f"{domain} {split} {c}" for split, n in splits.items() for c in range(n)]
    with DomainWriter(root, domain, names, ["a photo of a {label}"], "test") as writer:
        for split, n in splits.items():
            for c in range(n):
                label = names.index(f"{domain} {split} {c}")
                for j in range(per_class):
                    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                    writer.write(split, f"{domain}-{split}-{c}-{j}", image, f"a photo of a {names[label]}", label)
    return root


SMALL = dict(ways=3, shots=1, queries=2, image_size=8, tasks_per_batch=2, val_episodes=4, test_episodes=4)


def test_episodes_draw_from_the_whole_split_and_count_the_images_they_use(tmp_path):
    _write(tmp_path, "natural", {"train": 3, "val": 3, "test": 4}, per_class=50)
    dm = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **{**SMALL, "test_episodes": 300, "ways": 4})
    (episodes,) = dm.episode_sets("test")
    assert len(episodes.pool) == 200  # every test image, not the 40 per class that training reservoirs keep
    assert episodes.distinct_images() == 200  # 300 episodes of 12 images reach all of them
    capped = EpisodicDataModule(domains=["natural"], root=str(tmp_path), eval_pool=10, **{**SMALL, "ways": 4})
    (few,) = capped.episode_sets("test", count=300)
    assert len(few.pool) == 40 and few.distinct_images() == 40


def test_a_domains_episodes_do_not_depend_on_the_other_domains(tmp_path):
    _write(tmp_path, "natural", {"train": 3, "val": 3, "test": 3})
    _write(tmp_path, "medical", {"train": 3, "val": 3, "test": 3})
    both = EpisodicDataModule(domains=["natural", "medical"], root=str(tmp_path), **SMALL).episode_sets("test")
    alone = EpisodicDataModule(domains=["medical", "natural"], test_domains=["medical"], root=str(tmp_path),
                               **SMALL).episode_sets("test")
    assert both[1].split.name == alone[0].split.name == "medical"
    assert both[1].draws == alone[0].draws
    assert both[0].draws != both[1].draws


def test_an_evaluation_split_with_few_classes_is_evaluated_with_all_of_them(tmp_path, caplog):
    _write(tmp_path, "natural", {"train": 5, "val": 2, "test": 2})
    dm = EpisodicDataModule(domains=["natural"], root=str(tmp_path), **{**SMALL, "ways": 5})
    with caplog.at_level(logging.WARNING):
        (episodes,) = dm.episode_sets("val")
    assert episodes.shape.ways == 2 and len(episodes[0].classes) == 2
    assert "evaluated 2-way, not 5-way" in caplog.text


def test_evaluation_only_domains_get_ids_after_the_training_ones_and_the_unknown_row(tmp_path):
    _write(tmp_path, "natural", {"train": 3, "val": 3, "test": 3})
    _write(tmp_path, "brain", {"test": 4})  # every class at test time: a held-out domain
    dm = EpisodicDataModule(domains=["natural"], test_domains=["natural", "brain"], root=str(tmp_path), **SMALL)
    assert dm.domain_ids == {"natural": 0, "brain": 1} and dm.evaluation_only == ["brain"]
    module = MetaContrastiveModule(domains=["natural"])
    assert module.domain_row("brain") == module.model.unknown_domain
    trainer = L.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    assert metrics["test/episodes/brain"] == 4 and metrics["test/episodes/natural"] == 4
    assert 0.0 <= metrics["test/acc/brain"] <= 1.0 and "test/f1/brain" in metrics


def test_fit_validates_on_a_subset_of_domains(tmp_path):
    _write(tmp_path, "natural", {"train": 3, "val": 3, "test": 3})
    _write(tmp_path, "medical", {"train": 3, "test": 3})  # too few classes for a val split of its own
    with pytest.raises(ValueError, match="has no 'val' split"):
        EpisodicDataModule(domains=["natural", "medical"], root=str(tmp_path), **SMALL).setup("fit")
    dm = EpisodicDataModule(domains=["natural", "medical"], val_domains=["natural"], root=str(tmp_path),
                            **{**SMALL, "steps_per_epoch": 2})
    trainer = L.Trainer(accelerator="cpu", max_steps=2, inference_mode=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(MetaContrastiveModule(domains=["natural", "medical"]), datamodule=dm)
    assert trainer.global_step == 2
    assert "val/acc/natural" in trainer.callback_metrics and "val/acc/medical" not in trainer.callback_metrics


def test_stage_domain_lists_must_be_distinct_and_non_empty():
    with pytest.raises(ValueError, match="test_domains must be distinct"):
        EpisodicDataModule(test_domains=["natural", "natural"])
    with pytest.raises(ValueError, match="val_domains must be distinct and non-empty"):
        EpisodicDataModule(val_domains=[])
