"""Perturbations of a ground truth and the Dice-balanced pool."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from anomaseg.metrics import dice_score
from anomaseg.quality.pool import KINDS, dice_bin, fill_pool, perturb


@pytest.fixture
def volume():
    z, y, x = np.mgrid[:40, :44, :36]
    brain = ((x - 18) / 16) ** 2 + ((y - 22) / 20) ** 2 + ((z - 20) / 18) ** 2 < 1
    truth = ((x - 14) ** 2 + (y - 20) ** 2 + (z - 18) ** 2 < 36) | ((x - 24) ** 2 + (y - 28) ** 2 + (z - 24) ** 2 < 9)
    image = brain * 1.0 + truth * 1.0
    return truth, brain, image.astype(np.float32)


def test_every_perturbation_changes_the_truth_plausibly(volume):
    truth, brain, image = volume
    rng = np.random.default_rng(0)
    for kind in KINDS:
        dices = []
        for _ in range(4):
            seg = perturb(kind, truth, brain, rng, image)
            assert seg.shape == truth.shape and seg.dtype == bool
            dices.append(dice_score(seg, truth))
        assert min(dices) < 0.999, kind  # something changed
    dilated, eroded = perturb("dilate", truth, brain, rng), perturb("erode", truth, brain, rng)
    assert (dilated >= truth).all() and (eroded <= truth).all()  # they grow or shrink the lesions, nothing else
    assert dilated.sum() > truth.sum() > eroded.sum()
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb("melt", truth, brain, rng)


def test_drop_removes_whole_components(volume):
    truth, brain, _ = volume
    rng = np.random.default_rng(1)
    labels, n = ndi.label(truth)
    for _ in range(5):
        seg = perturb("drop", truth, brain, rng)
        assert seg.sum() < truth.sum()
        for k in range(1, n + 1):  # each component kept whole or dropped whole
            assert seg[labels == k].all() or not seg[labels == k].any()


def test_pool_is_spread_over_dice_and_keeps_given_candidates(volume):
    truth, brain, image = volume
    rng = np.random.default_rng(2)
    pool = fill_pool(truth, brain, given_dice=[0.05, 0.1], pool_size=30, rng=rng, image=image)
    assert len(pool) == 28
    counts = np.bincount([dice_bin(d) for _, _, d in pool] + [0, 1], minlength=10)
    assert (counts > 0).sum() >= 7 and counts.max() <= 3 * 30 / 10
    for kind, seg, d in pool:
        assert d == pytest.approx(dice_score(seg, truth))
    assert fill_pool(truth, brain, [0.5] * 5, pool_size=5, rng=rng) == []
