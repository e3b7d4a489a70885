"""Lesion-wise and per-volume metrics against a small example computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomaseg.lesion_metrics import LesionMetrics, case_lesions, size_bin
from anomaseg.metrics import dice_score

SPACING = (2.0, 2.0, 2.5)  # 10 mm^3 = 0.01 ml per voxel


def _example():
    """Three cases. Case 1: true lesions A (5 voxels, 0.05 ml, missed), B (20 voxels, 0.2 ml, hit by
    one voxel of a 3-voxel prediction), C (150 voxels, 1.5 ml, fully predicted), and two
    false-positive predictions (8 and 1 voxels). Case 2: lesion D (1200 voxels, 12 ml), nothing
    predicted. Case 3: no lesion, one false-positive prediction of 4 voxels."""
    t1, p1 = np.zeros((30, 30, 30), bool), np.zeros((30, 30, 30), bool)
    t1[2, 2, 2:7] = True  # A
    t1[10:12, 2:4, 2:7] = True  # B
    t1[2:7, 10:15, 10:16] = True  # C
    p1[11, 3, 6:9] = True  # overlaps B at (11, 3, 6) only
    p1[2:7, 10:15, 10:16] = True  # C
    p1[20:22, 20:22, 20:22] = True  # false positive, 8 voxels
    p1[25, 25, 25] = True  # false positive, 1 voxel
    t2, p2 = np.zeros((30, 30, 30), bool), np.zeros((30, 30, 30), bool)
    t2[5:15, 5:15, 5:17] = True  # D
    t3, p3 = np.zeros((30, 30, 30), bool), np.zeros((30, 30, 30), bool)
    p3[0:2, 0:2, 0] = True
    return [(p1, t1), (p2, t2), (p3, t3)]


def test_hand_computed_example():
    acc = LesionMetrics()
    rows = []
    for i, (pred, true) in enumerate(_example()):
        les = case_lesions(pred, true, SPACING, f"c{i + 1}")
        rows.append(acc.update(les, dice_score(pred, true), 0.5))
    m = acc.compute()
    assert m["n_true_lesions"] == 4 and m["n_detected_lesions"] == 2
    assert m["n_predicted_lesions"] == 5 and m["n_false_positive_lesions"] == 3
    assert m["lesion_recall"] == pytest.approx(0.5)
    assert m["lesion_precision"] == pytest.approx(0.4)
    assert m["lesion_f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert m["false_positive_lesions_per_case"] == pytest.approx(1.0)
    assert m["recall_by_lesion_size"] == {
        "<0.1 ml": {"n_lesions": 1, "detected": 0, "recall": 0.0},
        "0.1-1 ml": {"n_lesions": 1, "detected": 1, "recall": 1.0},
        "1-10 ml": {"n_lesions": 1, "detected": 1, "recall": 1.0},
        ">10 ml": {"n_lesions": 1, "detected": 0, "recall": 0.0},
    }
    # volumes: case 1 true 175 voxels = 1.75 ml, predicted 162 voxels = 1.62 ml
    assert rows[0]["volume_true_ml"] == pytest.approx(1.75)
    assert rows[0]["volume_predicted_ml"] == pytest.approx(1.62)
    assert [r["abs_volume_difference_ml"] for r in rows] == pytest.approx([0.13, 12.0, 0.04])
    assert m["abs_volume_difference_ml_mean"] == pytest.approx((0.13 + 12.0 + 0.04) / 3)
    assert m["abs_volume_difference_percent_mean"] == pytest.approx((0.13 / 1.75 * 100 + 100) / 2)
    # per volume: only the two cases with lesions; Dice of case 1 = 2 * 151 / (175 + 162)
    d1 = 2 * 151 / 337
    assert m["per_volume_n_cases"] == 2
    assert m["per_volume_dice_mean"] == pytest.approx(d1 / 2)
    assert m["per_volume_dice_std"] == pytest.approx(d1 / 2)  # population std of {d1, 0}
    assert m["per_volume_auprc_mean"] == pytest.approx(0.5) and m["per_volume_auprc_std"] == 0.0
    assert math.isnan(rows[2]["auprc"])  # no lesion: no AUPRC
    assert [r["false_positive_lesions"] for r in rows] == [2, 0, 1]
    lesions = acc.per_lesion()  # in scan order of each case: A, C, B, then D
    assert [les["voxels"] for les in lesions] == [5, 150, 20, 1200]
    assert [les["detected"] for les in lesions] == [False, True, True, False]
    assert lesions[2]["overlap_fraction"] == pytest.approx(1 / 20)
    assert lesions[1]["centre_voxel"] == [4, 12, 12]  # centre (4, 12, 12.5), rounded half to even
    assert [les["case_id"] for les in lesions] == ["c1", "c1", "c1", "c2"]


def test_components_are_26_connected_and_brain_restricted():
    true = np.zeros((8, 8, 8), bool)
    true[1, 1, 1] = true[2, 2, 2] = True  # diagonal neighbours: one lesion
    pred = np.zeros_like(true)
    pred[6, 6, 6] = True
    brain = np.ones_like(true)
    brain[6, 6, 6] = False  # a prediction outside the brain does not count
    les = case_lesions(pred, true, brain=brain)
    assert len(les.lesions) == 1 and les.n_predicted == 0 and les.n_false_positive == 0


def test_size_bins_edges():
    assert size_bin(0.0999) == "<0.1 ml" and size_bin(0.1) == "0.1-1 ml"
    assert size_bin(10.0) == ">10 ml" and size_bin(9.99) == "1-10 ml"


def test_nothing_predicted():
    true = np.zeros((6, 6, 6), bool)
    true[2:4, 2:4, 2:4] = True
    acc = LesionMetrics()
    acc.update(case_lesions(np.zeros_like(true), true), 0.0, 0.1)
    m = acc.compute()
    assert m["lesion_recall"] == 0.0 and math.isnan(m["lesion_precision"]) and m["lesion_f1"] == 0.0


def test_lesion_f1_is_zero_when_every_predicted_lesion_misses():
    """Precision and recall both 0 (lesions predicted, none on a true lesion): F1 0, not undefined."""
    truth = np.zeros((12, 12, 12), bool)
    truth[1:3, 1:3, 1:3] = True
    seg = np.zeros_like(truth)
    seg[8:10, 8:10, 8:10] = True
    lm = LesionMetrics()
    lm.update(case_lesions(seg, truth, (1.0, 1.0, 1.0), "a", np.ones_like(truth)), 0.0, 0.0)
    m = lm.compute()
    assert (m["lesion_recall"], m["lesion_precision"], m["lesion_f1"]) == (0.0, 0.0, 0.0)


def test_merged_shares_give_the_same_metrics():
    cases = [case_lesions(p, t, SPACING, f"c{i}") for i, (p, t) in enumerate(_example())]
    whole, a, b = LesionMetrics(), LesionMetrics(), LesionMetrics()
    for i, c in enumerate(cases):
        whole.update(c, 0.1 * i, 0.5)
    b.update(cases[2], 0.2, 0.5)  # another worker's share, in another order
    for i in (1, 0):
        a.update(cases[i], 0.1 * i, 0.5)
    assert a.merge(b).compute() == whole.compute() and a.per_lesion() == whole.per_lesion()
