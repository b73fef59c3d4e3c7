"""Few-shot metrics: per-episode accuracy and macro-F1 against scikit-learn, and the mean with its 95% CI,
mergeable across ranks."""
import math

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from metacontrastive.metrics import EpisodeMean, episode_scores


@pytest.mark.parametrize("seed", range(5))
def test_episode_scores_match_scikit_learn(seed):
    g = torch.Generator().manual_seed(seed)
    ways = 5
    targets = torch.arange(ways).repeat_interleave(3)
    predictions = torch.randint(0, ways, targets.shape, generator=g)
    predictions[:2] = 4  # make sure some class is over-predicted and another may be missing
    accuracy, f1 = episode_scores(predictions, targets, ways)
    assert math.isclose(accuracy.item(), accuracy_score(targets, predictions), abs_tol=1e-6)
    expected = f1_score(targets, predictions, average="macro", labels=list(range(ways)), zero_division=0)
    assert math.isclose(f1.item(), expected, abs_tol=1e-6)


def test_mean_and_ci_match_the_formula():
    scores = torch.tensor([0.2, 0.6, 0.8, 1.0])
    metric = EpisodeMean()
    for a in scores:
        metric.update(a)
    out = metric.compute()
    assert out["episodes"] == 4
    assert math.isclose(out["mean"].item(), 0.65, abs_tol=1e-6)
    assert math.isclose(out["ci95"].item(), 1.96 * scores.std().item() / 2.0, rel_tol=1e-5)


def test_merging_two_ranks_equals_one_rank_seeing_everything():
    # what the DDP reduction does: sum the states of every rank
    whole, left, right = EpisodeMean(), EpisodeMean(), EpisodeMean()
    whole.update(torch.tensor([0.1, 0.5, 0.9, 0.3]))
    left.update(torch.tensor([0.1, 0.5]))
    right.update(torch.tensor([0.9, 0.3]))
    left.merge_state(right)
    for key in ("mean", "ci95", "episodes"):
        assert torch.allclose(left.compute()[key].double(), whole.compute()[key].double())


def test_no_episode_gives_a_zero_count():
    assert EpisodeMean().compute()["episodes"] == 0
