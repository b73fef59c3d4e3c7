"""EpisodeAccuracy: mean and 95% CI of per-episode accuracies, mergeable across ranks."""
import math

import torch

from metacontrastive.metrics import EpisodeAccuracy


def test_mean_and_ci_match_the_formula():
    accs = torch.tensor([0.2, 0.6, 0.8, 1.0])
    metric = EpisodeAccuracy()
    for a in accs:
        metric.update(a)
    out = metric.compute()
    assert out["episodes"] == 4
    assert math.isclose(out["mean"].item(), 0.65, abs_tol=1e-6)
    assert math.isclose(out["ci95"].item(), 1.96 * accs.std().item() / 2.0, rel_tol=1e-5)


def test_merging_two_ranks_equals_one_rank_seeing_everything():
    # what the DDP reduction does: sum the states of every rank
    whole, left, right = EpisodeAccuracy(), EpisodeAccuracy(), EpisodeAccuracy()
    whole.update(torch.tensor([0.1, 0.5, 0.9, 0.3]))
    left.update(torch.tensor([0.1, 0.5]))
    right.update(torch.tensor([0.9, 0.3]))
    left.merge_state(right)
    for key in ("mean", "ci95", "episodes"):
        assert torch.allclose(left.compute()[key].double(), whole.compute()[key].double())


def test_no_episode_gives_a_zero_count():
    assert EpisodeAccuracy().compute()["episodes"] == 0
