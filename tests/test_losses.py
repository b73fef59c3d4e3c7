"""Losses on small seeded tensors, against hand-worked values and second implementations."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metacontrastive.losses import alignment_loss, contrastive_loss, coral, mean_distance, mmd_rbf


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_contrastive_equals_clip_loss_when_labels_differ():
    img, txt = _unit(6, 8, seed=1), _unit(6, 8, seed=2)
    labels = torch.arange(6)
    logits = 10.0 * img @ txt.t()
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert torch.allclose(contrastive_loss(img, txt, 10.0, labels, labels), clip, atol=1e-6)


def test_contrastive_counts_duplicates_as_positives():
    # two images share class 0; one text per class: the text-to-image term spreads its target over both
    img, txt = _unit(3, 4, seed=3), _unit(2, 4, seed=4)
    img_labels, txt_labels = torch.tensor([0, 0, 1]), torch.tensor([0, 1])
    logits = 5.0 * img @ txt.t()  # (3, 2)
    i2t = F.cross_entropy(logits, img_labels)
    lp = F.log_softmax(logits.t(), dim=1)  # (2, 3)
    t2i = -(0.5 * (lp[0, 0] + lp[0, 1]) + lp[1, 2]) / 2
    expected = 0.5 * (i2t + t2i)
    assert torch.allclose(contrastive_loss(img, txt, 5.0, img_labels, txt_labels), expected, atol=1e-6)


def test_contrastive_never_uses_a_positive_as_negative():
    # identical captions: moving the duplicate text closer to the image must not raise the loss
    img = _unit(1, 4, seed=5)
    far = _unit(1, 4, seed=6)
    txt = torch.cat([img, far])
    same = contrastive_loss(img, txt, 10.0, torch.tensor([0]), torch.tensor([0, 0]))
    txt_closer = torch.cat([img, img])
    closer = contrastive_loss(img, txt_closer, 10.0, torch.tensor([0]), torch.tensor([0, 0]))
    assert closer <= same + 1e-6


def test_contrastive_rejects_images_without_a_text():
    with pytest.raises(ValueError, match="at least one positive"):
        contrastive_loss(_unit(2, 4), _unit(2, 4), 1.0, torch.tensor([0, 5]), torch.tensor([0, 1]))


def test_mmd_is_zero_for_identical_samples_and_grows_with_shift():
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    assert mmd_rbf(x, x.clone()).abs() < 1e-6
    values = [mmd_rbf(x, x + shift).item() for shift in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_mmd_matches_a_loop_implementation():
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64) + 0.3
    bws = (0.5, 2.0)

    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s)) for s in bws)

    kxx = np.mean([[k(a, b) for b in x] for a in x])
    kyy = np.mean([[k(a, b) for b in y] for a in y])
    kxy = np.mean([[k(a, b) for b in y] for a in x])
    assert mmd_rbf(x, y, bws).item() == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-9)


def test_coral_matches_its_formula():
    x, y = np.random.default_rng(0).normal(size=(20, 3)), np.random.default_rng(1).normal(size=(15, 3)) * 2
    expected = np.sum((np.cov(x, rowvar=False) - np.cov(y, rowvar=False)) ** 2) / (4 * 3 * 3)
    assert coral(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(expected, rel=1e-9)


def test_mean_distance():
    x, y = torch.zeros(4, 2), torch.ones(3, 2) * torch.tensor([3.0, 4.0])
    assert mean_distance(x, y).item() == pytest.approx(25.0)


def test_alignment_sums_pairs_of_present_domains():
    z = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    expected = coral(z[:3], z[3:6]) + coral(z[:3], z[6:]) + coral(z[3:6], z[6:])
    assert torch.allclose(alignment_loss(z, ids, "coral"), expected)
    assert alignment_loss(z[:3], ids[:3], "mmd").item() == 0.0  # one domain: nothing to align
    with pytest.raises(ValueError, match="unknown alignment"):
        alignment_loss(z, ids, "wasserstein")
