"""`anomaseg preprocess`: each step on small synthetic volumes, then the dataset command
(parallel, resumable, deterministic, BIDS in -> BIDS derivatives out)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

sitk = pytest.importorskip("SimpleITK")

from anomaseg.cli import main  # noqa: E402
from anomaseg.data.bids import BidsQuery  # noqa: E402
from anomaseg.data.layout import find_cases  # noqa: E402
from anomaseg.preprocess import (PreprocessConfig, isotropic_grid, n4_correct, preprocess_dataset,  # noqa: E402
                                 register, resample)


def _head(shape=(40, 44, 36), spacing=2.0, seed=0):
    """An asymmetric 'head': ellipsoid brain with two inner tissues and an off-centre blob, so a
    rotation or shift is identifiable. Returns (SimpleITK image, brain mask array (z, y, x))."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[::-1]], indexing="ij")
    brain = (x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.6) ** 2 < 1
    image = np.where(brain, 100.0, 0.0)
    image[((x - 0.2) / 0.35) ** 2 + ((y + 0.1) / 0.25) ** 2 + (z / 0.3) ** 2 < 1] = 160.0
    image[((x + 0.35) ** 2 + (y - 0.3) ** 2 + (z + 0.2) ** 2) < 0.04] = 220.0
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, image.shape), 2.0)  # anatomy-like smooth texture
    image *= 1 + 0.15 * texture / texture.std()
    image += rng.normal(0, 2, image.shape) * brain
    img = sitk.GetImageFromArray(image.astype(np.float32))
    img.SetSpacing((spacing,) * 3)
    img.SetOrigin(tuple(-np.array(shape) * spacing / 2))
    return img, brain


def test_n4_removes_a_known_bias_field():
    img, brain = _head()
    arr = sitk.GetArrayFromImage(img)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in arr.shape], indexing="ij")
    bias = np.exp(0.35 * x - 0.2 * y + 0.15 * z)  # smooth, about +-50%
    biased = sitk.GetImageFromArray((arr * bias).astype(np.float32))
    biased.CopyInformation(img)
    corrected, field = n4_correct(biased)  # the command's settings
    out = sitk.GetArrayFromImage(corrected)
    tissue = brain & (arr > 60)
    cv = lambda a: a[tissue].std() / a[tissue].mean()  # noqa: E731
    # what is left of the field: corrected / true image is constant up to a global scale
    assert cv(bias) > 0.12 and cv(out / np.maximum(arr, 1)) < 0.45 * cv(bias)
    est = sitk.GetArrayFromImage(field)[tissue]
    assert np.corrcoef(np.log(est), np.log(bias[tissue]))[0, 1] > 0.9  # and the field found is the one applied


def test_resampling_to_isotropic_keeps_extent_and_values():
    ramp = np.tile(np.arange(30, dtype=np.float32)[None, None, :] * 2.0, (20, 24, 1))  # value = x in mm
    img = sitk.GetImageFromArray(ramp)
    img.SetSpacing((2.0, 1.0, 1.0))  # 2x1x1 mm voxels
    grid = isotropic_grid(img, 1.0)
    assert grid.GetSize() == (60, 24, 20) and grid.GetSpacing() == (1.0, 1.0, 1.0)
    corner = lambda im: np.array(im.GetOrigin()) - np.array(im.GetSpacing()) / 2  # noqa: E731
    np.testing.assert_allclose(corner(grid), corner(img))  # same physical extent
    out = sitk.GetArrayFromImage(resample(img, grid))
    x_mm = np.array([grid.TransformIndexToPhysicalPoint((i, 0, 0))[0] for i in range(60)])
    np.testing.assert_allclose(out[10, 12, 4:-4], x_mm[4:-4], atol=0.05)  # the ramp, inside the border


def _rotation_deg(a, b) -> float:
    r = np.array(a).reshape(3, 3).T @ np.array(b).reshape(3, 3)
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))


def test_rigid_registration_recovers_a_known_rotation():
    fixed, _ = _head()
    truth = sitk.Euler3DTransform()
    truth.SetRotation(np.radians(4), np.radians(-3), np.radians(10))
    truth.SetTranslation((3.0, -2.0, 4.0))
    moving = resample(fixed, fixed, truth.GetInverse())  # moving(p) = fixed(truth^-1 p): maps fixed -> moving = truth
    found, _ = register(fixed, moving, "rigid", iterations=60)
    euler = sitk.Euler3DTransform()
    euler.SetMatrix(found.GetMatrix())
    euler.SetCenter(found.GetCenter())
    euler.SetTranslation(found.GetTranslation())
    assert _rotation_deg(truth.GetMatrix(), euler.GetMatrix()) < 1.0
    for point in [(0, 0, 0), (20, -15, 10), (-25, 20, -15)]:  # points inside the head
        assert np.linalg.norm(np.subtract(truth.TransformPoint(point), euler.TransformPoint(point))) < 1.0


def _write_case(folder, case, image, brain, seg=None, rotate_t1=True):
    """A case folder: FLAIR, a T1 rotated by 6 degrees (to be co-registered), mask and labels on the FLAIR grid."""
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{case}_flair.nii.gz"))
    t = sitk.Euler3DTransform()
    t.SetRotation(0, 0, np.radians(6 if rotate_t1 else 0))
    t1 = resample(image * 0.5 + 20 * sitk.Cast(image > 0, sitk.sitkFloat32), image, t)
    sitk.WriteImage(t1, str(folder / f"{case}_t1.nii.gz"))
    for name, arr in (("mask", brain), ("seg", seg)):
        if arr is not None:
            lab = sitk.GetImageFromArray(arr.astype(np.uint8))
            lab.CopyInformation(image)
            sitk.WriteImage(lab, str(folder / f"{case}_{name}.nii.gz"))


def test_dataset_command_is_parallel_resumable_and_deterministic(tmp_path, capsys):
    data = tmp_path / "raw"
    for i in range(2):
        img, brain = _head(shape=(32, 36, 28), seed=i)
        seg = np.zeros_like(brain)
        seg[12:16, 15:19, 14:18] = True
        _write_case(data / f"c{i}", f"c{i}", img, brain, seg)
    args = ["preprocess", "--data", str(data), "--modality", "flair,t1", "--spacing", "3"]
    assert main(args + ["--out", str(tmp_path / "a"), "--workers", "2"]) == 0
    log = json.loads((tmp_path / "a" / "c0" / "c0_preprocess.json").read_text())
    assert [s["step"] for s in log["steps"]] == ["reorient", "n4", "n4", "coregister", "resample", "brain_mask"]
    matrix = np.array(log["steps"][3]["matrix_ref_to_modality"])
    assert abs(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0]))) == pytest.approx(6, abs=1.0)  # T1's rotation found
    cases = find_cases(tmp_path / "a", ["flair", "t1"], require_seg=True)
    assert [c.case_id for c in cases] == ["c0", "c1"]
    flair = nib.load(cases[0].images["flair"].path)
    assert flair.header.get_zooms() == (3.0, 3.0, 3.0) and flair.shape == nib.load(cases[0].mask).shape
    seg = np.asarray(nib.load(cases[0].seg).dataobj)
    assert abs(seg.sum() * 27 - 512) < 300 and set(np.unique(seg)) == {0, 1}  # 512 mm3 of label, nearest neighbour
    # resumable: a second run skips finished cases and leaves them untouched
    stamp = (tmp_path / "a" / "c0" / "c0_flair.nii.gz").stat().st_mtime_ns
    assert main(args + ["--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert "2 skipped" in capsys.readouterr().out
    assert (tmp_path / "a" / "c0" / "c0_flair.nii.gz").stat().st_mtime_ns == stamp
    # deterministic: the same input gives the same voxels, whatever the number of workers
    assert main(args + ["--out", str(tmp_path / "b"), "--workers", "1"]) == 0
    for name in ("c1/c1_flair.nii.gz", "c1/c1_t1.nii.gz", "c1/c1_mask.nii.gz"):
        a = np.asarray(nib.load(tmp_path / "a" / name).dataobj)
        b = np.asarray(nib.load(tmp_path / "b" / name).dataobj)
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_one_line(tmp_path, capsys):
    img, brain = _head(shape=(20, 20, 20))
    _write_case(tmp_path / "raw" / "c0", "c0", img, None)
    nib.save(nib.Nifti1Image(np.ones((20, 20, 10), np.uint8), np.eye(4)), tmp_path / "raw" / "c0" / "c0_mask.nii.gz")
    assert main(["preprocess", "--data", str(tmp_path / "raw"), "--out", str(tmp_path / "o"),
                 "--modality", "flair", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "c0_mask.nii.gz" in err and "grid" in err and "Traceback" not in err


@pytest.mark.slow
def test_bids_preprocessing_with_the_template_mask(tmp_path):
    """BIDS in, BIDS derivatives out; without a brain mask the MNI152 mask is brought back to the
    subject by the inverse affine: on the template itself, moved by a known rigid transform, it
    lands on the true brain (Dice > 0.9)."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    true_mask = np.asarray(datasets.load_mni152_brain_mask(resolution=2).dataobj) > 0
    angle = np.radians(8)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0, 4], [np.sin(angle), np.cos(angle), 0, -3], [0, 0, 1, 2],
                    [0, 0, 0, 1]])
    affine = rot @ template.affine  # same voxels, rotated and shifted in world space
    root = tmp_path / "bids"
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (root / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tcontrol\n")
    nib.save(nib.Nifti1Image(np.asarray(template.dataobj, np.float32), affine), anat / "sub-01_T1w.nii.gz")
    out = root / "derivatives" / "preproc"
    config = PreprocessConfig(reference="t1", spacing=2.0, n4=False, iterations=40, samples=30_000)
    rows = preprocess_dataset(root, out, config, workers=1, progress=False)
    assert rows[0]["status"] == "done"
    (case,) = find_cases(out, ["t1"], bids=BidsQuery(select=("group=control",)))
    assert case.images["t1"].path.name == "sub-01_desc-preproc_T1w.nii.gz"
    assert case.mask.name == "sub-01_desc-brain_mask.nii.gz"
    # compare with the true mask in world space: resample it onto the output grid
    mask_img = nib.load(case.mask)
    from nibabel.processing import resample_from_to

    truth = resample_from_to(nib.Nifti1Image(true_mask.astype(np.float32), affine), mask_img, order=0)
    a, b = np.asarray(mask_img.dataobj) > 0, np.asarray(truth.dataobj) > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and (out / "participants.tsv").is_file()
