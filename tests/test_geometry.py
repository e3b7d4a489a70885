"""Geometry is never silently wrong: one voxel grid per case, usable affines, and outputs on the
input's own grid whatever its storage order (LPS, sagittal-major, oblique)."""

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as ornt

from anomaseg.cli import main
from anomaseg.data.io import GRID_TOLERANCE, load_volume
from anomaseg.data.layout import find_cases
from anomaseg.data.slices import SliceSpec, load_case_volumes
from anomaseg.errors import InputError
from conftest import synthetic_case
from hostile import raw_nifti

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _case(root, name="c", lesion=True, seed=0, modalities=("flair", "t2"), affines=None):
    image, brain, seg = synthetic_case(np.random.default_rng(seed), lesion=lesion)
    d = root / name
    d.mkdir(parents=True)
    affines = affines or {}
    for k, m in enumerate(modalities):
        nib.save(nib.Nifti1Image(image * (1 + 0.1 * k), affines.get(m, AFFINE)), d / f"{name}_{m}.nii.gz")
    nib.save(nib.Nifti1Image(brain, affines.get("mask", AFFINE)), d / f"{name}_mask.nii.gz")
    nib.save(nib.Nifti1Image(seg, affines.get("seg", AFFINE)), d / f"{name}_seg.nii.gz")
    return root


def _shifted(voxels):
    a = AFFINE.copy()
    a[:3, 3] += voxels * 2.0  # 2 mm voxels
    return a


SPEC = SliceSpec(("flair", "t2"), image_size=32)


@pytest.mark.parametrize("what", ["t2", "mask", "seg"])
def test_files_off_the_image_grid_are_refused_with_the_fix(tmp_path, what):
    root = _case(tmp_path / "d", affines={what: _shifted(np.array([0.5, 0, 0]))})
    label = {"t2": "image", "mask": "brain mask", "seg": "segmentation"}[what]
    with pytest.raises(InputError) as err:
        load_case_volumes(find_cases(root)[0], SPEC)
    msg = str(err.value)
    assert msg.startswith(str(root / "c" / f"c_{what}.nii.gz"))
    assert f"{label} is not on the voxel grid of c_flair.nii.gz" in msg and "1 mm away" in msg
    assert "resample it" in msg and "`anomaseg preprocess`" in msg


def test_grid_tolerance(tmp_path):
    """Within GRID_TOLERANCE voxels (float32 header rounding) grids agree; beyond, they do not."""
    ok = _case(tmp_path / "ok", affines={"t2": _shifted(np.full(3, GRID_TOLERANCE / 4))})
    load_case_volumes(find_cases(ok)[0], SPEC)
    rotated = AFFINE.copy()
    angle = np.deg2rad(1.0)  # 1 degree turns the far corner of a 28x32x24 grid by ~0.6 voxels
    rotated[:2, :2] = 2.0 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    bad = _case(tmp_path / "bad", affines={"t2": rotated})
    with pytest.raises(InputError, match="not on the voxel grid"):
        load_case_volumes(find_cases(bad)[0], SPEC)


def test_same_grid_stored_in_another_voxel_order_is_accepted(tmp_path):
    root = _case(tmp_path / "d")
    mask_file = root / "c" / "c_mask.nii.gz"
    img = nib.load(mask_file)
    tf = ornt.ornt_transform(ornt.io_orientation(img.affine), ornt.axcodes2ornt(("P", "I", "L")))
    data = ornt.apply_orientation(np.asarray(img.dataobj), tf)
    nib.save(nib.Nifti1Image(data, img.affine @ ornt.inv_ornt_aff(tf, img.shape)), mask_file)
    _, brain, _ = load_case_volumes(find_cases(root)[0], SPEC)
    reference = np.asarray(nib.load(root / "c" / "c_flair.nii.gz").dataobj) != 0
    assert (brain == reference).mean() > 0.99


@pytest.mark.parametrize("fields, message", [
    (dict(srow_x=[np.nan, 0, 0, 0]), "affine .* contains NaN or Inf"),
    (dict(srow_y=[0, np.inf, 0, 0]), "affine .* contains NaN or Inf"),
    (dict(srow_y=[0, 0, 0, 0]), "affine has a zero scale along voxel axis 1"),
    (dict(srow_x=[2, 0, 2, 0], srow_z=[0, 0, 0, 0]), "affine is singular"),
    (dict(sform_code=0, qform_code=1, pixdim=[1, 2, 0, 2, 1, 1, 1, 1]), r"voxel size \(pixdim\) is .*zero"),
    (dict(sform_code=0, qform_code=0, pixdim=[1, 2, 2, 0, 1, 1, 1, 1]), r"voxel size \(pixdim\) is .*zero"),
])
def test_unusable_affines_are_refused(tmp_path, fields, message):
    path = raw_nifti(tmp_path / "bad.nii.gz", **fields)
    with pytest.raises(InputError, match=f"bad.nii.gz: image's {message}"):
        load_volume(path)
    with pytest.raises(InputError, match="bad.nii.gz"):
        load_volume(path, header_only=True)


# ------------------------------------------------------------------ outputs on the input's own grid
def _stored(src_dir, dst_dir, axcodes=None, rotation=None):
    """The same case stored another way: voxel order `axcodes`, or its world turned by `rotation`."""
    dst_dir.mkdir(parents=True)
    for f in src_dir.iterdir():
        img = nib.load(f)
        data, affine = np.asarray(img.dataobj), img.affine
        if axcodes:
            tf = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(axcodes))
            data, affine = ornt.apply_orientation(data, tf), affine @ ornt.inv_ornt_aff(tf, data.shape)
        if rotation is not None:
            affine = rotation @ affine
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), dst_dir / f.name)


def _rotation(ax_deg, az_deg):
    a, b = np.deg2rad(ax_deg), np.deg2rad(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    r = np.eye(4)
    r[:3, :3] = rz @ rx
    r[:3, 3] = [5.0, -3.0, 7.0]
    return r


def test_outputs_keep_the_input_grid_in_lps_sagittal_and_oblique_storage(shared_run, tmp_path):
    _case(tmp_path / "ras", name="c", seed=4, modalities=("flair",))
    src = tmp_path / "ras" / "c"
    variants = {"lps": dict(axcodes=("L", "P", "S")), "sagittal": dict(axcodes=("P", "I", "L")),
                "oblique": dict(rotation=_rotation(20, 12))}
    for name, how in variants.items():
        _stored(src, tmp_path / name / "c", **how)
    maps = {}
    for name in ["ras", *variants]:
        out = tmp_path / f"out_{name}"
        assert main(["score", "--run", str(shared_run), "--data", str(tmp_path / name), "--out", str(out)]) == 0
        src_img = nib.load(tmp_path / name / "c" / "c_flair.nii.gz")
        for kind in ("anomaly_map", "segmentation"):
            o = nib.load(out / f"c_{kind}.nii.gz")
            assert o.shape == src_img.shape
            np.testing.assert_allclose(o.affine, src_img.affine, atol=1e-5)
            assert nib.aff2axcodes(o.affine) == nib.aff2axcodes(src_img.affine)
        amap = np.asarray(nib.load(out / "c_anomaly_map.nii.gz").dataobj)
        seg = np.asarray(nib.load(tmp_path / name / "c" / "c_seg.nii.gz").dataobj) > 0
        brain = np.asarray(nib.load(tmp_path / name / "c" / "c_mask.nii.gz").dataobj) > 0
        assert amap[seg].mean() > 3 * amap[brain & ~seg].mean(), name  # the map lands on the lesion
        # back in RAS voxel order every variant's map is the original's
        to_ras = ornt.ornt_transform(ornt.io_orientation(src_img.affine), ornt.axcodes2ornt(("R", "A", "S")))
        maps[name] = ornt.apply_orientation(amap, to_ras)
    for name in variants:
        np.testing.assert_allclose(maps[name], maps["ras"], atol=1e-5, err_msg=name)
