"""FROC over the threshold sweep and the lesion-level calibration on healthy cases (issue 18)."""

import json
import shutil

import numpy as np
import pytest
import yaml

from anomaseg import calibration
from anomaseg.lesion_metrics import case_lesions
from anomaseg.lesion_sweep import FrocTally, component_sweep, interpolated_sensitivity
from anomaseg.postprocess import PostProcessor
from anomaseg.scorer import Scorer


def _line(values, lesions):
    """A row of voxels (x axis) with these map values; `lesions`: indices of one-voxel true lesions."""
    amap = np.asarray(values, np.float32).reshape(-1, 1, 1)
    truth = np.zeros(amap.shape, bool)
    truth[list(lesions), 0, 0] = True
    return amap, np.ones(amap.shape, bool), truth


CASE_A = _line([0.9, 0.1, 0.8, 0.1, 0.5, 0.1, 0.3, 0.1, 0.1], [0, 4])
CASE_B = _line([0.7, 0.1, 0.6, 0.1, 0.2], [4])


def test_froc_agrees_with_a_hand_computed_example():
    # Falling threshold, (false positives per case, sensitivity of 3 lesions): 0.9 detects A's first
    # lesion (0, 1/3); FPs appear at 0.8 (A), 0.7 and 0.6 (B): (1.5, 1/3); 0.5 detects A's second
    # (1.5, 2/3); 0.3 is an FP of A (2, 2/3); 0.2 detects B's lesion (2, 1). Below 0.1 each case is one
    # component that overlaps a lesion: 0 FPs, but the running maximum keeps 2 per case.
    tally = FrocTally()
    for case in (CASE_A, CASE_B):
        tally.update(*case, min_voxels=1)
    curve = tally.curve()
    assert curve["fp_per_case"] == [0, 0, 0.5, 1.0, 1.5, 1.5, 2.0, 2.0]
    assert curve["sensitivity"] == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    out = tally.compute()
    # at 1/8, 1/4, 1/2, 1: 1/3; at 2, 4, 8: 1 (linear between (1.5, 2/3) and (2, 1) is not needed)
    assert out["froc_sensitivity"] == pytest.approx({"1/8": 1 / 3, "1/4": 1 / 3, "1/2": 1 / 3, "1": 1 / 3,
                                                     "2": 1.0, "4": 1.0, "8": 1.0})
    assert out["froc_score"] == pytest.approx((4 / 3 + 3) / 7)
    assert (out["froc_n_lesions"], out["froc_n_cases"]) == (3, 2)
    # curve point i is the segmentation map > thresholds[i]: check one against lesion_metrics
    t = curve["thresholds"][4]
    assert 0.5 <= t < 0.6
    post = PostProcessor(min_component_size=1)
    found = [case_lesions(post.segment(m, t), g, brain=b) for m, b, g in (CASE_A, CASE_B)]
    assert sum(c.n_false_positive for c in found) / 2 == 1.5 and sum(c.n_detected for c in found) == 1


def test_froc_interpolates_linearly_between_operating_points():
    sens = interpolated_sensitivity([0, 1, 3], [0.2, 0.4, 0.8], rates=(0.5, 2, 8))
    np.testing.assert_allclose(sens, [0.3, 0.6, 0.8])


def test_froc_tallies_merge_exactly():
    one = FrocTally()
    for case in (CASE_A, CASE_B):
        one.update(*case, min_voxels=1)
    a, b = FrocTally(), FrocTally()
    a.update(*CASE_B, min_voxels=1)
    b.update(*CASE_A, min_voxels=1)
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.detected, one.detected)
    np.testing.assert_array_equal(merged.false_positives, one.false_positives)
    assert merged.compute() == one.compute()


def test_sweep_matches_segmentations_at_every_threshold():
    """The sweep's counts equal those of PostProcessor.segment + case_lesions at each threshold."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    amap = ndimage.gaussian_filter(rng.normal(size=(14, 12, 10)), 1.0).astype(np.float32)
    brain = np.zeros(amap.shape, bool)
    brain[1:13, 1:11, 1:9] = True
    truth = np.zeros(amap.shape, bool)
    truth[3:5, 3:5, 3:5] = truth[9:11, 7:9, 2:4] = True
    truth[6, 1, 1] = True
    sizes = (1, 4, 9)
    sweep = component_sweep(amap, brain, truth, sizes)
    for t in np.quantile(amap[brain], [0.2, 0.5, 0.7, 0.85, 0.95, 0.99]):
        t = float(np.float32(t))
        for k, m in enumerate(sizes):
            seg = PostProcessor(min_component_size=m).segment(np.where(brain, amap, -np.inf), t)
            expected = case_lesions(seg, truth, brain=brain)
            fp = int(sweep.event_steps[sweep.event_values > t, k].sum())
            assert fp == expected.n_false_positive
            detected = np.nan_to_num(sweep.detection[k], nan=-np.inf) > t
            assert detected.tolist() == [les["detected"] for les in expected.lesions]


def _healthy_case(spots):
    """A 1 mm healthy case of zeros with (value, corner, side) cubes."""
    amap = np.zeros((20, 20, 20), np.float32)
    for value, (x, y, z), side in spots:
        amap[x:x + side, y:y + side, z:z + side] = value
    return amap, np.ones(amap.shape, bool), (1.0, 1.0, 1.0)


HEALTHY = [_healthy_case([(5.0, (2, 2, 2), 1), (4.0, (8, 8, 8), 3), (3.0, (15, 2, 2), 1)]),
           _healthy_case([(6.0, (2, 2, 2), 1), (2.0, (8, 8, 8), 3)])]


def test_lesion_level_calibration_agrees_with_a_hand_computed_example():
    # target 0.5 false-positive lesions per healthy case. Candidate 0.001 ml (1 voxel): the mean count
    # is 0.5 below 6 and 1 below 5 -> threshold 5. Candidate 0.027 ml (27 voxels): 0.5 below 4, 1
    # below 2 -> threshold 2. The voxel_fpr floor is 0 (most voxels are 0). Lowest threshold: (2, 0.027).
    post = PostProcessor(calibration="fp_lesions", healthy_fp_lesions=0.5, healthy_fpr=0.05,
                         min_lesion_ml_candidates=[0.027, 0.001]).fit(HEALTHY)
    assert (post.threshold_, post.min_lesion_ml_, post.healthy_fp_lesions_) == (2.0, 0.027, 0.5)
    fps = [case_lesions(post.segment(m, spacing=s), np.zeros(m.shape, bool), s, brain=b).n_false_positive
           for m, b, s in HEALTHY]
    assert np.mean(fps) == 0.5
    # a floor above the candidates' thresholds: the voxel quantile (4.0: the 16th highest of 16000
    # voxels) wins, with the volume whose count is within the target there (27 voxels, 0 lesions)
    post = PostProcessor(calibration="fp_lesions", healthy_fp_lesions=0.5, healthy_fpr=0.001,
                         min_lesion_ml_candidates=[0.001, 0.027]).fit(HEALTHY)
    assert (post.threshold_, post.min_lesion_ml_) == (4.0, 0.027)
    # the default rule is unchanged: the quantile, no fitted volume
    post = PostProcessor(healthy_fpr=0.001).fit(HEALTHY)
    assert post.threshold_ == 4.0 and post.fitted_state() == {}


def test_hysteresis_calibration_agrees_with_a_hand_computed_example():
    # every spot is a component (1 mm, components of >= 1 voxel kept); the voxel_fpr threshold is 0.
    # Peaks over both cases: 6, 5, 4, 3, 2; target 0.5 per case x 2 cases = 1 component may exceed
    # the peak threshold -> the second largest peak, 5 (only the 6 exceeds it).
    post = PostProcessor(calibration="hysteresis", size_units="mm", min_lesion_ml=0.001, healthy_fp_lesions=0.5,
                         healthy_fpr=0.05).fit(HEALTHY)
    assert (post.threshold_, post.peak_threshold_, post.healthy_fp_lesions_) == (0.0, 5.0, 0.5)
    fps = [case_lesions(post.segment(m, spacing=s), np.zeros(m.shape, bool), s, brain=b).n_false_positive
           for m, b, s in HEALTHY]
    assert fps == [0, 1]
    # a lesioned case: a one-voxel lesion that is bright in the map survives, a large faint blob does
    # not, and the kept component has the extent of the low threshold (its voxels at 0.5 included)
    amap, brain, spacing = _healthy_case([(4.5, (2, 2, 2), 4), (7.0, (12, 12, 12), 1)])
    amap[13, 12, 12] = 0.5
    seg = post.segment(amap, spacing=spacing)
    assert seg[12, 12, 12] == 1 and seg[13, 12, 12] == 1 and seg.sum() == 2
    # fp_lesions on the same healthy cases buys its count with a minimum volume: the small lesion is lost
    fp_rule = PostProcessor(calibration="fp_lesions", healthy_fp_lesions=0.5, healthy_fpr=0.05,
                            min_lesion_ml_candidates=[0.027, 0.001]).fit(HEALTHY)
    assert fp_rule.segment(amap, spacing=spacing)[12, 12, 12] == 0
    # the voxel_fpr threshold is the floor of both thresholds: 4.0 here, then peaks 6 and 5 remain
    post = PostProcessor(calibration="hysteresis", size_units="mm", min_lesion_ml=0.001, healthy_fp_lesions=0.5,
                         healthy_fpr=0.001).fit(HEALTHY)
    assert (post.threshold_, post.peak_threshold_) == (4.0, 5.0)
    # a target no healthy case reaches keeps every component: the peak threshold is the voxel threshold
    post = PostProcessor(calibration="hysteresis", healthy_fp_lesions=5.0, healthy_fpr=0.001).fit(HEALTHY)
    assert post.peak_threshold_ == post.threshold_ and post.healthy_fp_lesions_ == 0.0  # 1-voxel spots < 8 voxels
    with pytest.raises(ValueError, match="peak_threshold_"):
        PostProcessor(calibration="hysteresis").load_fitted_state({})


def _planted(spacing_mm: float, volume_ml: float = 0.05):
    """A brain of noise (values < 0.3) and one spherical lesion of `volume_ml` (value 1)."""
    n = int(round(40 / spacing_mm))
    axes = [(np.arange(n) - n // 2) * spacing_mm for _ in range(3)]  # a voxel centre at the lesion's
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    brain = r < 18
    radius = (3 * volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)
    lesion = r <= radius
    amap = 0.3 * np.random.default_rng(0).random(brain.shape).astype(np.float32)
    amap[lesion] = 1.0
    return amap, brain, lesion, (spacing_mm,) * 3


@pytest.mark.parametrize("spacing_mm", [1.0, 2.0])
def test_a_small_lesion_survives_the_physical_post_processing(spacing_mm):
    amap, brain, lesion, spacing = _planted(spacing_mm)
    assert 0.04 <= lesion.sum() * spacing_mm ** 3 / 1000 <= 0.06
    hysteresis = PostProcessor(calibration="hysteresis", size_units="mm")
    hysteresis.peak_threshold_ = 0.9
    for post in (PostProcessor(calibration="fp_lesions"), PostProcessor(size_units="mm"), hysteresis):
        seg = post.segment(post.smooth(amap, brain, spacing), 0.5, spacing)
        found = case_lesions(seg, lesion, spacing, brain=brain)
        assert found.n_detected == 1 and found.n_false_positive == 0
    # the voxel-count defaults (a 5-voxel median, 8 voxels) lose it at either spacing
    post = PostProcessor()
    seg = post.segment(post.smooth(amap, brain), 0.5)
    assert case_lesions(seg, lesion, spacing, brain=brain).n_detected == 0


def test_physical_sizes_in_voxels():
    post = PostProcessor(size_units="mm", median_mm=3.0, min_lesion_ml=0.064)
    assert post.median_window((50, 50, 50), (1.0, 1.0, 1.0)) == (3, 3, 3)
    assert post.median_window((50, 50, 50), (2.0, 2.0, 2.0)) == (1, 1, 1)
    assert post.median_window((50, 50, 50), (0.5, 1.0, 3.0)) == (5, 3, 1)
    assert post.min_voxels((2.0, 2.0, 2.0)) == 8 and post.min_voxels((1.0, 1.0, 1.0)) == 64
    with pytest.raises(ValueError, match="spacing"):
        post.min_voxels(None)
    with pytest.raises(ValueError, match="size_units must be mm"):
        PostProcessor(calibration="fp_lesions", size_units="voxels")


@pytest.mark.parametrize("rule, fitted", [("fp_lesions", "min_lesion_ml_"), ("hysteresis", "peak_threshold_")])
def test_lesion_calibration_reads_only_the_held_out_healthy_cases(shared_run, tmp_path, lesioned_dir, monkeypatch,
                                                                  rule, fitted):
    """The lesion-level rules are fitted on the run's held-out healthy cases; test data never changes them."""
    import nibabel as nib

    from anomaseg.evaluation import evaluate_dataset
    from anomaseg.run import RunPaths

    run = tmp_path / "run"
    shutil.copytree(shared_run, run)
    paths = RunPaths(run)
    config = yaml.safe_load(paths.config.read_text())
    config["score"]["calibration"] = rule
    paths.config.write_text(yaml.safe_dump(config))
    read = []
    prepare = calibration.prepare_cases
    monkeypatch.setattr(calibration, "prepare_cases", lambda cases, *a, **k: read.extend(c.case_id for c in cases)
                        or prepare(cases, *a, **k))
    scorer = calibration.calibrate(run, progress=False, force=True)
    assert sorted(read) == sorted(json.loads(paths.split.read_text())["val"])
    entry = json.loads(paths.calibration.read_text())["residual"]
    assert entry["postprocess"]["calibration"] == rule
    assert entry["postprocess_fitted"][fitted] == getattr(scorer.post, fitted)

    def refit(*a, **k):
        raise AssertionError("calibrated on the test data")

    monkeypatch.setattr(Scorer, "fit", refit)
    for case in sorted(lesioned_dir.iterdir()):  # poisoned test cases: bright noise everywhere
        image = next(case.glob("*_flair.nii.gz"))
        img = nib.load(image)
        noisy = img.get_fdata() + np.random.default_rng(0).random(img.shape) * 5
        nib.save(nib.Nifti1Image(noisy.astype(np.float32), img.affine), image)
    metrics = evaluate_dataset(run, lesioned_dir, tmp_path / "eval", progress=False, baseline=False)
    assert metrics["threshold"] == scorer.post.threshold_
    assert metrics["threshold_rule"] == rule and metrics["postprocess_fitted"][fitted] == getattr(scorer.post, fitted)
    assert np.isfinite(metrics["froc_score"]) and metrics["froc_n_lesions"] == metrics["n_true_lesions"]


def test_an_onnx_export_carries_the_fitted_lesion_volume():
    from anomaseg.export import ExportMetadata

    post = PostProcessor(calibration="fp_lesions", healthy_fp_lesions=0.5, healthy_fpr=0.05,
                         min_lesion_ml_candidates=[0.027, 0.001]).fit(HEALTHY)
    settings = {k: v for k, v in vars(post).items() if not k.endswith("_")}  # what export stores
    meta = ExportMetadata({}, {}, settings, post.threshold_, {}, {}, 0, post.fitted_state())
    meta = ExportMetadata(**json.loads(meta.to_json()))  # as read back from the file
    rebuilt = meta.postprocessor()
    assert (rebuilt.threshold_, rebuilt.min_lesion_ml_) == (2.0, 0.027)
    assert rebuilt.min_voxels((1.0, 1.0, 1.0)) == 27
    stale = ExportMetadata({}, {}, settings, post.threshold_, {}, {}, 0)  # without it: an error, not another size
    with pytest.raises(ValueError, match="min_lesion_ml_"):
        stale.postprocessor()
    post = PostProcessor(calibration="hysteresis", size_units="mm", min_lesion_ml=0.001, healthy_fp_lesions=0.5,
                         healthy_fpr=0.05).fit(HEALTHY)
    settings = {k: v for k, v in vars(post).items() if not k.endswith("_")}
    meta = ExportMetadata(**json.loads(ExportMetadata({}, {}, settings, post.threshold_, {}, {}, 0,
                                                      post.fitted_state()).to_json()))
    assert meta.postprocessor().peak_threshold_ == 5.0


def test_one_pass_evaluates_several_post_processing_rules(shared_run, tmp_path, lesioned_dir):
    """A predictor under a post-processing override (spec "score") gives the metrics of a run
    configured that way, in the same pass as the run's own rule (maps predicted once, shared)."""
    from anomaseg.evaluation import evaluate_dataset
    from anomaseg.run import RunPaths

    run, configured = tmp_path / "run", tmp_path / "configured"
    shutil.copytree(shared_run, run)
    shutil.copytree(shared_run, configured)
    paths = RunPaths(configured)
    config = yaml.safe_load(paths.config.read_text())
    rule = {"calibration": "fp_lesions", "healthy_fp_lesions": 0.5}
    config["score"].update(rule)
    paths.config.write_text(yaml.safe_dump(config))
    specs = {"own": {"name": "residual"}, "lesions": {"name": "residual", "score": rule}}
    both = evaluate_dataset(run, lesioned_dir, tmp_path / "both", predictors=specs, progress=False, baseline=False)
    alone = evaluate_dataset(configured, lesioned_dir, tmp_path / "alone", predictors="residual", progress=False,
                             baseline=False)
    keys = ("threshold", "dice_at_threshold", "lesion_f1", "false_positive_lesions_per_case", "froc_score")
    assert {k: both["lesions"][k] for k in keys} == {k: alone[k] for k in keys}
    assert both["lesions"]["threshold"] != both["own"]["threshold"]  # the rules really differ
    entries = json.loads(RunPaths(run).calibration.read_text())  # each rule keeps its own calibration
    assert entries["residual"]["postprocess"]["calibration"] == "hysteresis"  # the default
    assert entries["residual | score(calibration=fp_lesions,healthy_fp_lesions=0.5)"]["postprocess"][
        "calibration"] == "fp_lesions"
