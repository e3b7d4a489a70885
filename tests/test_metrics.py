"""Streaming voxel metrics and exact small-array metrics, checked against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

sk = pytest.importorskip("sklearn.metrics")

from anomaseg.metrics import VoxelMetrics, binary_auprc, binary_auroc, dice_score  # noqa: E402

TOL = 1e-3


def _reference(scores, labels):
    """scikit-learn's exact AUROC, AP and best Dice (= best F1 over all thresholds)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel() > 0
    precision, recall, _ = sk.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return sk.roc_auc_score(y, s), sk.average_precision_score(y, s), float(f1.max())


def _data(n=100_000, prevalence=0.03, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(np.uint8)
    scores = (rng.standard_normal(n) + 1.5 * labels).astype(np.float32)
    return rng, scores, labels


def _stream(scores, labels, masks=None, sizes=(1000, 23_457, 5, 40_000)):
    """Feed in update() calls of different sizes (the rest in the last call)."""
    vm = VoxelMetrics()
    bounds = np.cumsum((0,) + tuple(sizes))
    bounds = np.append(bounds[bounds < scores.size], scores.size)
    for a, b in zip(bounds[:-1], bounds[1:]):
        vm.update(scores[a:b], labels[a:b], None if masks is None else masks[a:b])
    return vm


def _assert_close(result, ref):
    auroc, ap, dice = ref
    assert result["pixel_auroc"] == pytest.approx(auroc, abs=TOL)
    assert result["pixel_auprc"] == pytest.approx(ap, abs=TOL)
    assert result["dice_best"] == pytest.approx(dice, abs=TOL)


def test_continuous_scores_streamed_with_masks_match_sklearn():
    rng, scores, labels = _data()
    masks = rng.random(scores.size) < 0.7
    vm = _stream(scores, labels, masks)
    r = vm.compute()
    _assert_close(r, _reference(scores[masks], labels[masks]))
    assert r["n_voxels"] == int(masks.sum())
    assert r["n_positive"] == int((labels[masks] > 0).sum())
    assert r["warnings"] == []


def test_mask_excludes_voxels():
    rng, scores, labels = _data(n=20_000)
    # masked-out voxels are adversarial: if they counted, the metrics would collapse
    outside = np.zeros(scores.size, dtype=bool)
    outside[:5000] = True
    scores = scores.copy()
    scores[outside] = np.where(labels[outside] > 0, -10.0, 10.0)
    vm = VoxelMetrics()
    vm.update(scores.reshape(20, 1000), labels.reshape(20, 1000), ~outside.reshape(20, 1000))
    _assert_close(vm.compute(), _reference(scores[~outside], labels[~outside]))


def test_heavy_ties_exact_zeros():
    rng, scores, labels = _data()
    rectified = np.maximum(scores - 1.0, 0.0).astype(np.float32)  # ~85 % exact zeros
    rectified[rng.random(scores.size) < 0.05] = -0.0  # -0.0 ties with +0.0, as in sklearn
    assert (rectified == 0).mean() > 0.5
    vm = _stream(rectified, labels)
    _assert_close(vm.compute(), _reference(rectified, labels))


def test_negative_scores():
    _, scores, labels = _data()
    neg = (scores - 20.0).astype(np.float32)  # all negative
    vm = _stream(neg, labels)
    _assert_close(vm.compute(), _reference(neg, labels))
    mixed = (-np.exp(-scores)).astype(np.float32)  # negative, monotone in scores
    vm = _stream(mixed, labels)
    _assert_close(vm.compute(), _reference(mixed, labels))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes(dtype):
    _, scores, labels = _data()
    s = scores.astype(dtype)
    vm = _stream(s, labels)
    _assert_close(vm.compute(), _reference(s.astype(np.float32), labels))


def test_torch_inputs_incl_bfloat16():
    _, scores, labels = _data(n=30_000)
    t = torch.from_numpy(scores).to(torch.bfloat16).reshape(3, 1, 100, 100)
    y = torch.from_numpy(labels).bool().reshape(3, 1, 100, 100)
    vm = VoxelMetrics()
    vm.update(t, y, torch.ones_like(y))
    ref = _reference(t.float().numpy(), labels)
    _assert_close(vm.compute(), ref)


def test_merge_equals_single_accumulator():
    rng, scores, labels = _data()
    masks = rng.random(scores.size) < 0.8
    single = VoxelMetrics()
    single.update(scores, labels, masks)
    a, b = VoxelMetrics(), VoxelMetrics()
    a.update(scores[:30_000], labels[:30_000], masks[:30_000])
    b.update(scores[30_000:], labels[30_000:], masks[30_000:])
    assert a.merge(b) is a
    assert a.compute() == single.compute()
    assert a.curves() == single.curves()
    with pytest.raises(ValueError, match="bits"):
        a.merge(VoxelMetrics(bits=16))


def test_dice_at_matches_exact_dice():
    _, scores, labels = _data()
    vm = _stream(scores, labels)
    for t in (0.5, 1.2345, -0.3):
        exact = dice_score(scores > t, labels)
        # exact up to the voxels that share the threshold's bin (relative width 2**-11)
        assert vm.dice_at(t) == pytest.approx(exact, abs=TOL)
    r = vm.compute()
    # the reported threshold reproduces the best Dice, from the histogram and on the raw scores
    assert vm.dice_at(r["dice_best_threshold"]) == pytest.approx(r["dice_best"], abs=1e-12)
    assert dice_score(scores > r["dice_best_threshold"], labels) == pytest.approx(r["dice_best"], abs=1e-12)


def test_dice_at_exact_for_tied_values():
    # scores on a coarse grid: every threshold between grid values is exact
    rng = np.random.default_rng(3)
    labels = rng.random(10_000) < 0.1
    scores = (np.round(rng.random(10_000) * 8) / 8 + 0.25 * labels).astype(np.float32)
    vm = VoxelMetrics()
    vm.update(scores, labels)
    for t in (0.0, 0.5, 0.625, 0.99, -1.0, 10.0):
        assert vm.dice_at(t) == pytest.approx(dice_score(scores > t, labels), abs=1e-12)
    assert vm.dice_at(math.inf) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        vm.dice_at(math.nan)


def test_curves_format():
    _, scores, labels = _data()
    vm = _stream(scores, labels)
    c = vm.curves(max_points=200)
    assert set(c) == {"fpr", "tpr", "precision", "recall", "thresholds"}
    n = len(c["fpr"])
    assert 2 < n <= 200 and all(len(v) == n and isinstance(v, list) for v in c.values())
    assert (c["fpr"][0], c["tpr"][0], c["precision"][0]) == (0.0, 0.0, 1.0)
    assert c["fpr"][-1] == 1.0 and c["tpr"][-1] == 1.0
    assert c["precision"][-1] == pytest.approx(labels.mean())
    assert np.all(np.diff(c["fpr"]) >= 0) and np.all(np.diff(c["thresholds"]) <= 0)
    # the curve's area approximates the exact AUROC even downsampled
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(vm.compute()["pixel_auroc"], abs=5e-3)


def test_single_class_gives_nan_and_warning():
    vm = VoxelMetrics()
    vm.update(np.random.default_rng(0).random(100).astype(np.float32), np.zeros(100))
    r = vm.compute()
    assert math.isnan(r["pixel_auroc"]) and math.isnan(r["pixel_auprc"])
    assert r["dice_best"] == 1.0  # predicting nothing matches the empty truth
    assert r["warnings"] and "no anomalous" in r["warnings"][0]
    assert vm.curves()["fpr"] == []

    vm = VoxelMetrics()
    vm.update(np.arange(10, dtype=np.float32), np.ones(10))
    r = vm.compute()
    assert math.isnan(r["pixel_auroc"]) and r["warnings"]

    r = VoxelMetrics().compute()
    assert r["n_voxels"] == 0 and math.isnan(r["dice_best"]) and r["warnings"]


def test_nan_and_shape_errors_leave_state_unchanged():
    vm = VoxelMetrics()
    vm.update(np.ones(4, np.float32), np.array([0, 1, 0, 1]))
    before = vm.compute()
    scores = np.array([0.1, np.nan, 0.3, 0.4], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        vm.update(scores, np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        vm.update(np.ones(4), np.ones(5))
    assert vm.compute() == before
    # NaN outside the mask does not count
    vm.update(scores, np.array([0, 1, 0, 1]), np.array([True, False, True, True]))
    assert vm.compute()["n_voxels"] == 7


def test_memory_independent_of_voxels():
    vm = VoxelMetrics()

    def size():
        return sum(v.nbytes for v in vars(vm).values() if isinstance(v, np.ndarray))

    start = size()
    rng = np.random.default_rng(0)
    vm.update(rng.random(1000, dtype=np.float32), rng.random(1000) < 0.1)
    after_small = size()
    vm.update(rng.random(1_000_000, dtype=np.float32), rng.random(1_000_000) < 0.1)
    assert start == after_small == size() == vm.nbytes


def test_infinite_scores_are_ordered():
    scores = np.array([-np.inf, -1.0, 0.0, 2.0, np.inf, np.inf], dtype=np.float32)
    labels = np.array([0, 0, 1, 0, 1, 1])
    vm = VoxelMetrics()
    vm.update(scores, labels)
    finite = np.array([-1e30, -1.0, 0.0, 2.0, 1e30, 1e30])
    _assert_close(vm.compute(), _reference(finite, labels))


# -- exact small-array metrics --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_auroc_auprc_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.standard_normal(300) + labels, 1)  # many ties
    scores[:50] = 0.0
    assert binary_auroc(scores, labels) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
    assert binary_auprc(scores, labels) == pytest.approx(sk.average_precision_score(labels, scores), abs=1e-12)
    t = torch.from_numpy(scores)
    assert binary_auroc(t, torch.from_numpy(labels)) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)


def test_exact_metrics_errors():
    with pytest.raises(ValueError, match="one class"):
        binary_auroc([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="undefined"):
        binary_auprc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        binary_auroc([0.1, float("nan"), 0.3], [0, 1, 0])
    assert binary_auprc([0.1, 0.2], [1, 1]) == pytest.approx(sk.average_precision_score([1, 1], [0.1, 0.2]))


def test_dice_score():
    a = np.array([[1, 1, 0], [0, 0, 0]])
    b = np.array([[1, 0, 0], [0, 0, 1]])
    assert dice_score(a, b) == pytest.approx(2 * 1 / (2 + 2))
    assert dice_score(np.zeros(5), np.zeros(5)) == 1.0
    assert dice_score(np.zeros(3), np.ones(3)) == 0.0
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)  # hides b's second voxel
    assert dice_score(a, b, mask) == pytest.approx(2 * 1 / (2 + 1))
    assert dice_score(torch.tensor([0.0, 2.0]), torch.tensor([False, True])) == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice_score(np.zeros(3), np.zeros(4))
