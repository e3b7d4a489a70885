"""The built-in brain MR phantom: layout, determinism, ground truth and contrast behaviour (2 mm)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from anomaseg.data.phantom import LABELS, MODALITIES, make_phantom, make_subject

FILES = MODALITIES + ("mask",)


def load(path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    # lesioned subjects alternate their main lesion family, so two of them cover both families
    cases = make_phantom(out, n_healthy=2, n_lesioned=2, seed=0, resolution=2)
    return out, cases


@pytest.fixture(scope="module")
def lesioned_subjects():
    """In-memory subjects (with their tissue maps) of the dataset above."""
    return [make_subject(i, True, seed=0, resolution=2) for i in range(2)]


def test_layout_and_file_names(dataset):
    out, cases = dataset
    assert [p.name for p in cases["train"]] == ["healthy_000", "healthy_001"]
    assert [p.name for p in cases["test"]] == ["lesioned_000", "lesioned_001"]
    for p in cases["train"]:
        assert p.parent == out / "train"
        assert sorted(f.name for f in p.iterdir()) == sorted(f"{p.name}_{m}.nii.gz" for m in FILES)
    for p in cases["test"]:
        assert p.parent == out / "test"
        expected = sorted(f"{p.name}_{m}.nii.gz" for m in FILES + ("seg",))
        assert sorted(f.name for f in p.iterdir()) == expected
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["seed"] == 0 and meta["resolution"] == 2
    assert meta["n_healthy"] == 2 and meta["n_lesioned"] == 2
    assert meta["labels"] == {str(k): v for k, v in LABELS.items()}
    assert set(meta["cases"]) == {p.name for p in cases["train"] + cases["test"]}
    for p in cases["test"]:
        entry = meta["cases"][p.name]
        assert entry["families"] and set(entry["families"]) <= {"ms", "tumour"}
        seg, _ = load(p / f"{p.name}_seg.nii.gz")
        assert entry["lesion_voxels"] == {name: int((seg == k).sum()) for k, name in LABELS.items()}
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"


def test_shapes_affines_dtypes_and_header(dataset):
    _, cases = dataset
    for p in cases["train"] + cases["test"]:
        names = FILES + (("seg",) if p.parent.name == "test" else ())
        ref_shape, ref_affine = None, None
        for m in names:
            data, img = load(p / f"{p.name}_{m}.nii.gz")
            if m in MODALITIES:
                assert data.dtype == np.float32
                assert np.isfinite(data).all()
                assert data.min() >= 0
            else:
                assert data.dtype == np.uint8
            assert img.header.get_xyzt_units()[0] == "mm"
            assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0
            ref_shape = ref_shape or data.shape
            ref_affine = img.affine if ref_affine is None else ref_affine
            assert data.shape == ref_shape
            np.testing.assert_allclose(img.affine, ref_affine)
        assert ref_shape == (99, 117, 95)
        np.testing.assert_allclose(np.abs(np.diag(ref_affine)[:3]), 2.0)
        mask, _ = load(p / f"{p.name}_mask.nii.gz")
        assert set(np.unique(mask)) == {0, 1}


def test_ground_truth(dataset):
    _, cases = dataset
    for p in cases["train"]:
        assert not (p / f"{p.name}_seg.nii.gz").exists()
    for p in cases["test"]:
        seg, _ = load(p / f"{p.name}_seg.nii.gz")
        mask, _ = load(p / f"{p.name}_mask.nii.gz")
        assert set(np.unique(seg)) <= {0, 1, 2, 3, 4}
        assert (seg > 0).any()
        assert not ((seg > 0) & (mask == 0)).any(), "lesion outside the brain mask"
        assert (seg > 0).sum() >= 0.002 * mask.sum()


def test_both_lesion_families_occur(dataset):
    _, cases = dataset
    labels = set()
    for p in cases["test"]:
        seg, _ = load(p / f"{p.name}_seg.nii.gz")
        labels |= set(np.unique(seg).tolist())
    assert {1, 2, 3, 4} <= labels


def test_subjects_differ(dataset):
    _, cases = dataset
    masks = [load(p / f"{p.name}_mask.nii.gz")[0] for p in cases["train"] + cases["test"][:1]]
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[0], masks[2])
    flair = [load(p / f"{p.name}_flair.nii.gz")[0] for p in cases["train"]]
    assert not np.array_equal(flair[0], flair[1])


def test_deterministic_per_seed_and_independent_of_counts(dataset, tmp_path):
    out, cases = dataset
    # the same seed reproduces each subject exactly, whatever the number of other subjects
    again = make_phantom(tmp_path / "again", n_healthy=1, n_lesioned=1, seed=0, resolution=2)
    for a, b in [(again["train"][0], cases["train"][0]), (again["test"][0], cases["test"][0])]:
        for m in FILES + (("seg",) if a.parent.name == "test" else ()):
            np.testing.assert_array_equal(load(a / f"{a.name}_{m}.nii.gz")[0],
                                          load(b / f"{b.name}_{m}.nii.gz")[0])
    other = make_phantom(tmp_path / "other", 1, 0, seed=1, resolution=2, modalities=("flair",))
    for m in ("flair", "mask"):
        p, q = other["train"][0], cases["train"][0]
        assert not np.array_equal(load(p / f"{p.name}_{m}.nii.gz")[0], load(q / f"{q.name}_{m}.nii.gz")[0])


def test_overwrite_is_deterministic_and_removes_stale_cases(tmp_path):
    first = make_phantom(tmp_path, 2, 0, seed=3, resolution=2, modalities=("t2", "flair"))
    before = load(first["train"][0] / "healthy_000_t2.nii.gz")[0]
    (tmp_path / "train" / "notes").mkdir()  # not a phantom case: left alone
    second = make_phantom(tmp_path, 1, 0, seed=3, resolution=2, modalities=("t2",))
    assert second == {"train": [tmp_path / "train" / "healthy_000"], "test": []}
    assert not (tmp_path / "train" / "healthy_001").exists()
    assert (tmp_path / "train" / "notes").is_dir()
    names = sorted(f.name for f in second["train"][0].iterdir())
    assert names == ["healthy_000_mask.nii.gz", "healthy_000_t2.nii.gz"]  # the stale FLAIR is gone
    np.testing.assert_array_equal(load(second["train"][0] / "healthy_000_t2.nii.gz")[0], before)
    assert json.loads((tmp_path / "phantom.json").read_text())["modalities"] == ["t2"]


def test_written_case_equals_in_memory_subject(dataset, lesioned_subjects):
    _, cases = dataset
    p, s = cases["test"][0], lesioned_subjects[0]
    for m in MODALITIES:
        np.testing.assert_array_equal(load(p / f"{p.name}_{m}.nii.gz")[0], s.images[m])
    np.testing.assert_array_equal(load(p / f"{p.name}_seg.nii.gz")[0], s.seg)
    np.testing.assert_array_equal(load(p / f"{p.name}_mask.nii.gz")[0], s.mask)


def _region_means(s, region):
    return {m: float(s.images[m][region].mean()) for m in MODALITIES}


def test_tissue_contrasts(lesioned_subjects):
    for s in lesioned_subjects:
        brain, tissue = (s.mask > 0) & (s.seg == 0), s.tissue
        csf, gm, wm = (brain & (tissue[t] > 0.9) for t in range(3))
        c, g, w = _region_means(s, csf), _region_means(s, gm), _region_means(s, wm)
        for m in ("t1", "t1ce"):
            assert w[m] > g[m] > c[m], m
        assert c["t2"] > g["t2"] > w["t2"]
        assert g["flair"] > w["flair"] > c["flair"]
        for m in MODALITIES:
            assert np.isfinite(s.images[m]).all()


def test_lesion_contrasts(lesioned_subjects):
    seen = set()
    for s in lesioned_subjects:
        wm = _region_means(s, (s.mask > 0) & (s.seg == 0) & (s.tissue[2] > 0.9))
        if (s.seg == 1).sum() > 20:  # MS-like lesions: FLAIR/T2 bright, T1 dark, clearly but not absurdly
            seen.add("ms")
            ms = _region_means(s, s.seg == 1)
            assert 1.2 * wm["flair"] < ms["flair"] < 2.5 * wm["flair"]
            assert ms["t2"] > wm["t2"]
            assert ms["t1"] < wm["t1"]
        if (s.seg == 4).sum() > 20:  # tumour: enhancing rim, dark necrotic core on T1, bright oedema
            seen.add("tumour")
            rim, oed = _region_means(s, s.seg == 4), _region_means(s, s.seg == 3)
            assert wm["t1ce"] < rim["t1ce"] < 2.5 * wm["t1ce"]
            assert oed["flair"] > 1.2 * wm["flair"] and oed["t2"] > wm["t2"]
            assert oed["t1"] < wm["t1"]
            if (s.seg == 2).sum() > 5:
                core = _region_means(s, s.seg == 2)
                assert core["t1"] < rim["t1"] and core["t2"] > wm["t2"]
    assert seen == {"ms", "tumour"}


def test_background_is_noise_floor(lesioned_subjects):
    s = lesioned_subjects[0]
    tissue = s.tissue
    outside = tissue.sum(0) == 0
    for m in MODALITIES:
        wm = s.images[m][(s.mask > 0) & (s.seg == 0) & (tissue[2] > 0.9)].mean()
        bg = s.images[m][outside]
        # Rayleigh floor: mean = sigma * sqrt(pi / 2) with sigma 2-3 % of the WM intensity
        assert 0.01 * wm < bg.mean() < 0.06 * wm, m


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError):
        make_phantom(tmp_path, 1, 0, modalities=("t1", "dwi"))
    with pytest.raises(ValueError):
        make_phantom(tmp_path, -1, 0)
