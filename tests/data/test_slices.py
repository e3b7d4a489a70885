import numpy as np
import pytest
import torch

from anomaseg.data import slices
from anomaseg.data.layout import find_cases
from anomaseg.data.slices import CaseCache, SliceGeometry, SliceSpec, normalise, prepare_case


def test_geometry_pads_without_stretching_and_round_trips():
    g = SliceGeometry.for_shape((20, 32, 5), size=32)
    vol = np.random.default_rng(0).random((20, 32, 5)).astype(np.float32)
    s = g.to_slices(vol)
    assert s.shape == (5, 1, 32, 32)
    # x is padded by 6 zeros on each side, y untouched: a square stays a square
    assert torch.all(s[:, 0, :6] == 0) and torch.all(s[:, 0, 26:] == 0)
    np.testing.assert_allclose(g.to_volume(s), vol, atol=1e-6)


def test_geometry_resizes_and_maps_back_smoothly():
    g = SliceGeometry.for_shape((40, 48, 3), size=32)
    x, y = np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, 1, 48), indexing="ij")
    vol = np.repeat((x + y)[..., None], 3, axis=2).astype(np.float32)
    back = g.to_volume(g.to_slices(vol))
    assert back.shape == vol.shape
    assert np.abs(back - vol)[4:-4, 4:-4].max() < 0.05


def test_normalise_maps_percentiles_inside_brain():
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (20, 20, 20)).astype(np.float32)
    brain = np.zeros(data.shape, bool)
    brain[5:15, 5:15, 5:15] = True
    data[~brain] = 5000  # outside the brain does not influence the scaling
    out = normalise(data, brain, SliceSpec(percentiles=(1, 99)))
    assert out[~brain].max() == 0
    inside = out[brain]
    assert abs(np.mean(inside <= 0.0) - 0.01) < 0.005 and abs(np.mean(inside >= 1.0) - 0.01) < 0.005


def test_spec_rejects_bad_sizes():
    for size in (16, 100):
        with pytest.raises(ValueError, match="power of two"):
            SliceSpec(image_size=size)


def test_prepare_case_keeps_slices_with_enough_brain(healthy_dir):
    case = find_cases(healthy_dir, ["flair"])[0]
    p = prepare_case(case, SliceSpec(image_size=32, min_brain_fraction=0.5))
    area = p.brain.sum(axis=(0, 1))
    np.testing.assert_array_equal(p.keep, area >= 0.5 * area.max())
    assert p.images.dtype == np.float16 and p.images.shape == (len(area), 1, 32, 32)
    assert p.truth is None and p.labels is None


def test_cache_avoids_rereading_and_notices_changes(lesioned_dir, tmp_path, monkeypatch):
    case = find_cases(lesioned_dir, ["flair"])[0]
    spec = SliceSpec(image_size=32)
    cache = CaseCache(tmp_path / "c")
    first = cache.get(case, spec)

    def fail(*a, **k):
        raise AssertionError("NIfTI files were read again")

    monkeypatch.setattr(slices, "load_volume", fail)
    again = cache.get(case, spec)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.truth, first.truth)
    assert again.geometry == first.geometry
    # another preprocessing setting is another cache entry
    with pytest.raises(AssertionError, match="read again"):
        cache.get(case, SliceSpec(image_size=64))
    # a damaged cache file is rebuilt, never trusted
    monkeypatch.undo()
    for f in (tmp_path / "c").glob("*.npz"):
        f.write_bytes(b"broken")
    rebuilt = cache.get(case, spec)
    np.testing.assert_array_equal(rebuilt.images, first.images)


def test_geometry_crops_to_the_brain_box_and_maps_back():
    brain = np.zeros((40, 50, 6), bool)
    brain[10:26, 12:44, 1:5] = True  # 16 x 32 in-plane box
    g = SliceGeometry.for_shape(brain.shape, size=32, brain=brain, margin=0)
    assert g.box == ((10, 26), (12, 44)) and g.side == 32 and g.pad == (8, 0)
    vol = np.random.default_rng(0).random(brain.shape).astype(np.float32)
    s = g.to_slices(vol)
    np.testing.assert_allclose(s[:, 0, 8:24, :].numpy(), np.moveaxis(vol[10:26, 12:44], 2, 0), atol=1e-6)
    back = g.to_volume(s, fill=-1.0)
    np.testing.assert_allclose(back[10:26, 12:44], vol[10:26, 12:44], atol=1e-6)
    assert np.all(back[:10] == -1.0) and np.all(back[:, 44:] == -1.0)


def test_cropping_is_part_of_the_spec(lesioned_dir):
    case = find_cases(lesioned_dir, ["flair"])[0]
    cropped = prepare_case(case, SliceSpec(image_size=32))
    full = prepare_case(case, SliceSpec(image_size=32, crop_to_brain=False))
    assert cropped.geometry.crop is not None and full.geometry.crop is None
    # the brain covers more of the model's input when cropped
    assert cropped.masks.mean() > full.masks.mean()
