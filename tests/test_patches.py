"""Patch runs (`data.patch_size`): the model trains on brain-centred crops of finer slices and scores
them in overlapping windows blended by MONAI's sliding_window_inference (data/patches.py, scorer.py).

One tiny patch run (64 px slices, 32 px patches) is trained once for the module; the training
steps' inputs are recorded on the way.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomaseg import config as cfg
from anomaseg import training
from anomaseg.calibration import calibrate
from anomaseg.cli import main
from anomaseg.data.layout import find_cases
from anomaseg.data.patches import brain_crop_offsets, crop, random_brain_crops, window_grid, windows
from anomaseg.data.slices import CaseCache, PreparedCase, SliceGeometry, prepare_cases, training_slices
from anomaseg.models import create_model
from anomaseg.models.autoencoders import SpatialVAE
from anomaseg.postprocess import PostProcessor
from anomaseg.predictors import create_predictor
from anomaseg.run import RunPaths, load_checkpoint, load_model, load_split
from anomaseg.scorer import Scorer
from conftest import tiny_train_args, write_dataset

SIZE, PATCH = 64, 32


def patch_args(data, run, *extra):
    # 80 training slices, batch 16: 5 steps per epoch; a checkpoint every 2 steps; fp32 (bit for bit)
    return tiny_train_args(data, run, 3, "--image-size", str(SIZE), "--set", f"data.patch_size={PATCH}",
                           "--precision", "32", "--seed", "3", "--set", "train.checkpoint_every_steps=2", *extra)


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory):
    """(data, run, cache, the inputs of the first training steps) of a tiny patch run."""
    root = tmp_path_factory.mktemp("patches")
    data = write_dataset(root / "healthy", 6, lesioned=False, seed=1)
    seen = []
    original = SpatialVAE.training_step

    def recording(self, x, *a, **k):
        if len(seen) < 3:
            seen.append(x.detach().clone())
        return original(self, x, *a, **k)

    SpatialVAE.training_step = recording
    try:
        assert main(patch_args(data, root / "run", "--set", f"data.cache_dir={root / 'cache'}")) == 0
    finally:
        SpatialVAE.training_step = original
    return data, root / "run", root / "cache", seen


def synthetic_case(images: np.ndarray) -> PreparedCase:
    z, size = len(images), images.shape[-1]
    brain = np.abs(images).max(1) > 0
    return PreparedCase("c", images.astype(np.float16), brain, None, np.ones(z, bool),
                        SliceGeometry((size, size, z), size, (0, 0), size), np.ones((size, size, z), bool), None,
                        None)


def textured_slices(z: int, seed: int = 0) -> np.ndarray:
    """(z, 1, SIZE, SIZE): a textured disk on a zero background."""
    rng = np.random.default_rng(seed)
    t = np.linspace(-1, 1, SIZE)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    disk = xx**2 + yy**2 < 0.7
    x = np.stack([np.where(disk, 0.8 + 0.2 * np.cos(3 * xx + k) + 0.05 * rng.normal(size=disk.shape), 0.0)
                  for k in range(z)])
    return x[:, None].astype(np.float32)


# --------------------------------------------------------------------------- configuration
def test_patch_size_is_zero_or_a_power_of_two_up_to_the_image_size(tmp_path, capsys):
    assert cfg.DataConfig().patch_size == 0  # default: whole slices
    for ok in (0, 32, 64):
        assert cfg.DataConfig(image_size=64, patch_size=ok).patch_size == ok
    for bad in (16, 48, 128, -32, True):
        with pytest.raises(ValueError, match="patch_size must be 0"):
            cfg.DataConfig(image_size=64, patch_size=bad)
    code = main(tiny_train_args(tmp_path / "none", tmp_path / "run", 1, "--set", "data.patch_size=48"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "patch_size" in err[0]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- training crops
def test_brain_crops_are_regions_of_their_slice_centred_on_brain():
    x = torch.zeros(6, 2, SIZE, SIZE)
    x[:, 1, 40:50, 5:20] = torch.rand(6, 10, 15) + 0.1  # brain in one corner, second channel only
    x[5] = 0  # a slice without brain: any crop
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    offsets = brain_crop_offsets(x, PATCH, g())
    assert torch.equal(offsets, brain_crop_offsets(x, PATCH, g()))  # a seeded draw repeats
    assert ((offsets >= 0) & (offsets <= SIZE - PATCH)).all()
    crops = random_brain_crops(x, PATCH, g())
    assert crops.shape == (6, 2, PATCH, PATCH)
    for b, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(crops[b], x[b, :, r:r + PATCH, c:c + PATCH])
    assert all(bool((crops[b] != 0).any()) for b in range(5))
    assert torch.equal(crop(x, offsets, PATCH), crops)
    # over many draws the crop centres cover the brain's box, not the empty rest of the slice
    many = brain_crop_offsets(x[:1].expand(400, -1, -1, -1), PATCH, g()) + PATCH // 2
    rows, cols = many[:, 0], many[:, 1]
    assert rows.min() >= 40 and rows.max() == 48 and cols.min() == 16 and cols.max() <= 19


def test_training_steps_see_patches_cut_from_the_training_slices(patch_run):
    data, run, cache, seen = patch_run
    model, config = load_model(run)
    assert model.hparams["image_size"] == PATCH and config.data.patch_size == PATCH
    assert len(seen) == 3 and all(x.shape == (16, 1, PATCH, PATCH) for x in seen)
    split = load_split(run)
    cases = [c for c in find_cases(data, ["flair"]) if c.case_id in split["train"]]
    slices = training_slices(prepare_cases(cases, config.data.slice_spec(), CaseCache.at(str(cache)), False)).float()
    all_windows = slices.unfold(2, PATCH, 1).unfold(3, PATCH, 1)  # (N, C, 33, 33, PATCH, PATCH), a view
    for x in seen[0][:4]:
        found = (all_windows == x[:, None, None]).flatten(-2).all(-1).all(1)  # (N, 33, 33)
        assert bool(found.any()), "a training input is no window of any training slice"
        assert bool((x != 0).any())  # it holds brain


def test_a_killed_patch_run_resumes_to_the_same_weights(patch_run, tmp_path, monkeypatch):
    data, ref, cache, _ = patch_run
    run = tmp_path / "run"
    calls = {"n": 0}
    original = SpatialVAE.training_step

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # epoch 2, step 3: one step after the checkpoint at global step 6
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(SpatialVAE, "training_step", flaky)
    assert main(patch_args(data, run, "--set", f"data.cache_dir={cache}")) == 130
    state = load_checkpoint(RunPaths(run).last)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    monkeypatch.setattr(SpatialVAE, "training_step", original)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    a, b = load_checkpoint(RunPaths(run).last), load_checkpoint(RunPaths(ref).last)
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    def history(p):
        return [{k: v for k, v in r.items() if k != "slices_per_second"} for r in json.loads(p.read_text())]

    assert history(RunPaths(run).history) == history(RunPaths(ref).history)
    assert json.loads(RunPaths(run).calibration.read_text()) == json.loads(RunPaths(ref).calibration.read_text())


# --------------------------------------------------------------------------- scoring in windows
class RecordingIntensity(type(create_predictor("intensity"))):
    def fit(self, model, healthy_batches):
        batches = list(healthy_batches)
        self.fit_shapes_ = [tuple(b.shape) for b in batches]
        return super().fit(model, batches)


def test_windows_of_a_pointwise_map_blend_to_the_whole_slice_map():
    """The intensity baseline is pointwise, so blending its window maps (any weights that sum to one)
    must give the whole-slice map; the predictor is fitted on the scoring windows."""
    model = create_model("spatial_ae", tiny=True, image_size=PATCH)
    case = synthetic_case(textured_slices(5))
    whole = Scorer(model, create_predictor("intensity"), PostProcessor(), batch_size=2, device="cpu", precision="32")
    patched = Scorer(model, RecordingIntensity(), PostProcessor(), batch_size=2, device="cpu", precision="32",
                     patch_size=PATCH)
    patched.fit([case])
    n = len(window_grid(SIZE, PATCH))
    shapes = patched.predictor.fit_shapes_  # 5 slices x 9 windows, in batches of (at most) 2
    assert n == 9 and sum(s[0] for s in shapes) == 5 * n and all(s[0] <= 2 and s[1:] == (1, PATCH, PATCH)
                                                                   for s in shapes)
    whole.predictor.load_fitted_state({k: v for k, v in patched.predictor.fitted_state().items()
                                       if k != "fit_shapes_"})
    maps, scores = patched.predict_slices(case)
    expected_maps, expected_scores = whole.predict_slices(case)
    assert maps.shape == expected_maps.shape == (5, SIZE, SIZE)
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert np.ptp(maps) > 1  # a map with structure, not a constant


def test_windows_are_monais_grid():
    x = torch.arange(2 * SIZE * SIZE, dtype=torch.float32).reshape(2, 1, SIZE, SIZE)
    w = windows(x, PATCH)
    starts = sorted({(r.start, c.start) for r, c in window_grid(SIZE, PATCH)})
    assert starts == [(r, c) for r in (0, 16, 32) for c in (0, 16, 32)]
    assert torch.equal(w[9 + 4], x[1, :, 16:48, 16:48])


def test_grad_elbo_differentiates_inside_the_windows():
    """grad_elbo re-enables autograd inside scoring's inference_mode; through MONAI's windows too:
    one window the size of the slice gives the whole-slice map, and 32 px windows a finite map."""
    torch.manual_seed(0)
    model = create_model("spatial_vae", tiny=True, image_size=SIZE).eval()
    case = synthetic_case(textured_slices(3))
    kwargs = dict(batch_size=2, device="cpu", precision="32")
    whole = Scorer(model, create_predictor("grad_elbo"), PostProcessor(), **kwargs).predict_slices(case)
    one = Scorer(model, create_predictor("grad_elbo"), PostProcessor(), patch_size=SIZE, **kwargs).predict_slices(case)
    np.testing.assert_allclose(one[0], whole[0], rtol=1e-4, atol=1e-6)
    small = create_model("spatial_vae", tiny=True, image_size=PATCH).eval()
    maps, scores = Scorer(small, create_predictor("grad_elbo"), PostProcessor(), patch_size=PATCH,
                          **kwargs).predict_slices(case)
    assert np.isfinite(maps).all() and maps.max() > 0 and np.isfinite(scores).all()


def test_a_planted_bright_blob_ranks_above_healthy_tissue_after_patch_training(patch_run, tmp_path):
    data, run, cache, _ = patch_run
    scorer = calibrate(run, progress=False)  # the run's config carries the patch size to the scorer
    assert scorer.patch_size == PATCH
    lesioned = write_dataset(tmp_path / "lesioned", 2, lesioned=True, seed=2)
    _, config = load_model(run)
    for case in prepare_cases(find_cases(lesioned, ["flair"]), config.data.slice_spec(), None, False):
        amap = scorer.smoothed_volume(case)
        values, labels = amap[case.brain], case.truth[case.brain]
        assert labels.any() and roc_auc_score(labels, values) > 0.9
        assert values[labels].mean() > values[~labels].mean()
    # the intensity baseline ignores the model: whole slices, as beside a whole-slice run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert calibrate(copy, "intensity", progress=False).patch_size == 0


def test_onnx_scoring_of_a_patch_run_slides_the_same_windows(patch_run, tmp_path):
    """The exported graph maps one patch; OnnxScorer slides and blends it as the PyTorch scorer does."""
    from anomaseg.export import OnnxScorer

    _, run, _, _ = patch_run
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run), "--out", str(onnx_file)]) == 0
    onnx_scorer, torch_scorer = OnnxScorer(onnx_file, batch_size=4), calibrate(run, progress=False)
    assert onnx_scorer.patch_size == torch_scorer.patch_size == PATCH
    assert onnx_scorer.session.get_inputs()[0].shape[-2:] == [PATCH, PATCH]
    lesioned = write_dataset(tmp_path / "lesioned", 1, lesioned=True, seed=2)
    (case,) = prepare_cases(find_cases(lesioned, ["flair"]), load_model(run)[1].data.slice_spec(), None, False)
    (onnx_maps, onnx_scores), (maps, scores) = onnx_scorer.predict_slices(case), torch_scorer.predict_slices(case)
    scale = float(np.ptp(maps))
    assert scale > 0
    np.testing.assert_allclose(onnx_maps, maps, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(onnx_scores, scores, rtol=0, atol=1e-4 * scale)
