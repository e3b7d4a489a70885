"""REG-Net's training rows: targets and weights by hand on a tiny native volume (the Dice weight
v = 100 / (|S| + |G|) in model pixels; a clean row shared by several candidates holds the root of
the sum of their squared weights)."""

import numpy as np
import pytest

from anomaseg.data.slices import PreparedCase, SliceGeometry
from anomaseg.quality.samples import clean_samples, dice_denominator, reg_samples


def _case() -> PreparedCase:
    """A 16 x 16 x 4 native volume seen at 8 px (a model pixel is 2 x 2 voxels); lesion G: a 4 x 4
    square on slice 1 only."""
    shape, size = (16, 16, 4), 8
    truth = np.zeros(shape, bool)
    truth[4:8, 4:8, 1] = True
    images = np.random.default_rng(0).random((4, 1, size, size)).astype(np.float16)
    return PreparedCase("c", images, np.ones((4, size, size), bool), None, np.ones(4, bool),
                        SliceGeometry(shape, 16, (0, 0), size), np.ones(shape, bool), truth, None)


def test_candidate_rows_carry_counts_and_dice_weight():
    case = _case()
    seg = np.zeros(case.truth.shape, bool)
    seg[4:8, 6:10, 1] = True  # half of it on G
    seg[10:12, 10:12, 3] = True  # a false positive on slice 3
    rows = reg_samples(case, seg).astype(np.float32)
    assert rows.shape == (2, 6, 8, 8)  # slices 1 and 3: [I, S, S and G, G not S, n, v]
    # counts in model pixels: 16 + 4 segmented voxels, 8 on G, 8 missed, each voxel a quarter pixel
    np.testing.assert_allclose(rows[:, 1].sum(axis=(1, 2)), [4.0, 1.0], atol=1e-3)
    np.testing.assert_allclose(rows[:, 2].sum(axis=(1, 2)), [2.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(rows[:, 3].sum(axis=(1, 2)), [2.0, 0.0], atol=1e-3)
    assert dice_denominator(case, seg) == pytest.approx((20 + 16) / 4)
    np.testing.assert_array_equal(rows[:, 4], 1.0)
    np.testing.assert_allclose(rows[:, 5], 100 / 9, rtol=1e-3)


def test_clean_rows_sum_the_squared_weights_of_the_candidates_sharing_them():
    case = _case()
    exact = case.truth.copy()  # |S| + |G| = 32 voxels = 8 model pixels
    spread = case.truth.copy()
    spread[0:4, 0:4, 2] = True  # 16 more voxels on slice 2: 48 voxels = 12 model pixels
    rows = clean_samples(case, [exact, spread]).astype(np.float32)
    # clean slices 0, 2, 3: slices 0 and 3 are empty in both candidates, slice 2 in `exact` only
    np.testing.assert_array_equal(rows[:, 4, 0, 0], [2, 1, 2])
    both = np.sqrt((100 / 8) ** 2 + (100 / 12) ** 2)
    np.testing.assert_allclose(rows[:, 5, 0, 0], [both, 100 / 8, both], rtol=1e-3)
    assert not rows[:, 1:4].any()  # no candidate, no lesion on these rows
