"""Hostile and odd files (issue 9 part 3). Bad ones: one error line naming the file, exit code 2, no
traceback, no output. Odd but valid ones: work end to end, maps on the lesion."""

import html
import json
import os

import nibabel as nib
import numpy as np
import pytest

from anomaseg.cli import main
from anomaseg.data.io import load_volume
from anomaseg.data.layout import find_cases
from anomaseg.errors import InputError
from conftest import synthetic_case, write_dataset
from hostile import error_line, raw_nifti


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])


def _nifti(path, data, affine=np.diag([2.0, 2.0, 2.0, 1.0])):
    nib.save(nib.Nifti1Image(data, affine), path)


# kind -> (make the case's FLAIR file hostile, the message expected after the file's name)
BAD_FILES = {
    "huge_header_nii": (lambda p: raw_nifti(p.with_suffix(""), shape=(2000, 2000, 2000), data=b"\0" * 1000)
                        and p.unlink(), "header claims 2000x2000x2000 voxels of float32 (32,000,000,000 bytes) "
                                        "after byte 352, but the file has only 1,352 bytes"),
    "huge_header_gz": (lambda p: raw_nifti(p, shape=(2000, 2000, 1000), data=b"\0" * 4000),
                       "more than a"),
    "truncated_gz": (_truncated, "image is corrupt or not a readable NIfTI file"),
    "2d": (lambda p: _nifti(p, np.ones((28, 32), np.float32)), "image is 2D (shape (28, 32))"),
    "5d": (lambda p: _nifti(p, np.ones((28, 32, 24, 1, 3), np.float32)), "image is 5D"),
    "zero_axis": (lambda p: raw_nifti(p, shape=(28, 0, 24), data=b""), "image has a zero-length axis"),
    "all_zero": (lambda p: _nifti(p, np.zeros((28, 32, 24), np.float32)), "image is all zeros"),
    "constant": (lambda p: _nifti(p, np.full((28, 32, 24), 7.0, np.float32)), "image is constant (7)"),
    "complex": (lambda p: _nifti(p, np.ones((28, 32, 24), np.complex64)), "complex"),
    "4d_unnamed": (lambda p: _nifti(p, np.ones((28, 32, 24, 3), np.float32)), "image is 4D with 3 volumes"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_is_refused_before_reading(tmp_path, kind):
    make, expected = BAD_FILES[kind]
    path = tmp_path / "x_flair.nii.gz"
    _nifti(path, synthetic_case(np.random.default_rng(0))[0])
    make(path)
    if not path.exists():  # the uncompressed variant
        path = tmp_path / "x_flair.nii"
    try:
        vol = load_volume(path)
    except InputError as exc:
        assert str(exc).startswith(f"{path}: ") and expected in str(exc), str(exc)
        return
    assert kind in ("all_zero", "constant") and vol.data is not None  # refused per case, not per file


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_stops_score_cleanly(shared_run, tmp_path, capsys, kind):
    data = write_dataset(tmp_path / "data", 2, lesioned=True, seed=3)
    make, expected = BAD_FILES[kind]
    path = data / "les01" / "les01_flair.nii.gz"
    make(path)
    if not path.exists():
        path = path.with_suffix("")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["score", "--run", str(shared_run), "--data", str(data), "--out", str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"anomaseg: error: {path}: ") and expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no output, no temporary litter


def test_float_labels_count_from_one_half(tmp_path):
    """A binary mask resampled with linear interpolation has 0.5 at its edge: labelled when >= 0.5."""
    values = np.array([0.0, 0.2, 0.49, 0.5, 0.51, 1.0, 1.5, -0.7], np.float32)
    path = tmp_path / "seg.nii.gz"
    _nifti(path, np.tile(values, (2, 2, 1)))
    got = load_volume(path, kind="segmentation").data[0, 0] > 0
    assert got.tolist() == [False, False, False, True, True, True, True, False]


def test_int16_with_scale_factor_is_read_scaled(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, 100.0)
    nib.save(img, tmp_path / "s.nii.gz")
    vol = load_volume(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(vol.data, raw * 0.5 + 100.0)


def _odd_dataset(root, elsewhere):
    """Lesioned cases that are odd but valid, each in its own way."""
    rng = np.random.default_rng(7)

    def case(name, shape=(28, 32, 24), affine=np.diag([2.0, 2.0, 2.0, 1.0]), folder=None, seg_float=False,
             int16_scaled=False):
        d = folder or root / name
        d.mkdir(parents=True)
        image, brain, seg = synthetic_case(rng, shape, lesion=True)
        if int16_scaled:  # scanner-style integers with a scale factor
            img = nib.Nifti1Image(np.rint((image - 0.2) / 0.001).astype(np.int16), affine)
            img.header.set_slope_inter(0.001, 0.2)
            nib.save(img, d / f"{name}_flair.nii.gz")
        else:
            nib.save(nib.Nifti1Image(image, affine), d / f"{name}_flair.nii.gz")
        nib.save(nib.Nifti1Image(brain, affine), d / f"{name}_mask.nii.gz")
        if seg_float:  # linear-interpolation edges: 0.5 on the lesion's boundary voxels
            from scipy import ndimage as ndi
            edge = ndi.binary_dilation(seg > 0) & ~(seg > 0)
            seg = np.where(edge, 0.5, seg).astype(np.float32)
        nib.save(nib.Nifti1Image(seg, affine), d / f"{name}_seg.nii.gz")
        return d

    case("int16_scaled", int16_scaled=True)
    case("float_labels", seg_float=True)
    case("aniso", shape=(56, 64, 10), affine=np.diag([1.0, 1.0, 5.0, 1.0]))
    case("tiny", shape=(12, 14, 6))
    case("Müller Hans 01")
    target = case("linked", folder=elsewhere / "linked")
    os.symlink(target, root / "linked", target_is_directory=True)
    return root


def test_odd_but_valid_files_work_end_to_end(shared_run, tmp_path, capsys):
    data = _odd_dataset(tmp_path / "odd", tmp_path / "elsewhere")
    ev, maps = tmp_path / "eval", tmp_path / "maps"
    assert main(["evaluate", "--run", str(shared_run), "--data", str(data), "--out", str(ev)]) == 0
    per_case = {c["case_id"]: c for c in json.loads((ev / "metrics.json").read_text())["per_case"]}
    assert set(per_case) == {"int16_scaled", "float_labels", "aniso", "tiny", "Müller Hans 01", "linked"}
    assert "Müller Hans 01" in html.unescape((ev / "report.html").read_text(encoding="utf-8"))
    assert main(["score", "--run", str(shared_run), "--data", str(data), "--out", str(maps)]) == 0
    for case, row in per_case.items():
        folder = data / case
        src = nib.load(folder / f"{case}_flair.nii.gz")
        amap = nib.load(maps / f"{case}_anomaly_map.nii.gz")
        assert amap.shape == src.shape and np.allclose(amap.affine, src.affine)
        values = np.asarray(amap.dataobj)
        assert np.isfinite(values).all()
        seg = np.asarray(nib.load(folder / f"{case}_seg.nii.gz").dataobj) >= 0.5
        brain = np.asarray(nib.load(folder / f"{case}_mask.nii.gz").dataobj) > 0
        assert row["lesion_voxels"] == int((seg & brain).sum())  # float labels: >= 0.5
        if case not in ("tiny", "aniso"):  # the same geometry as the training data
            assert values[seg].mean() > 3 * values[brain & ~seg].mean(), case
            assert row["pixel_auroc"] > 0.85, case


def test_duplicate_and_colliding_case_ids_are_refused(tmp_path, capsys):
    write_dataset(tmp_path / "d", 1, lesioned=True)
    f = tmp_path / "d" / "les00" / "les00_flair.nii.gz"
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": str(f), "id": "a"}, {"image": str(f), "id": "a"}]}))
    with pytest.raises(InputError, match="list.json: duplicate case ids: a"):
        find_cases(datalist)
    datalist.write_text(json.dumps({"training": [{"image": str(f), "id": "Case1"}, {"image": str(f), "id": "case1"}]}))
    with pytest.raises(InputError, match="'Case1' and 'case1' differ only in letter case"):
        find_cases(datalist)
    datalist.write_text(json.dumps({"training": [{"image": str(f), "id": "../../escape"}]}))
    with pytest.raises(InputError, match="case id '../../escape' contains a path separator"):
        find_cases(datalist)
    out = tmp_path / "run"
    assert main(["train", "--data", str(datalist), "--out", str(out), "--epochs", "1", "--image-size", "32"]) == 2
    assert "list.json: case id '../../escape'" in error_line(capsys.readouterr().err)
    assert not out.exists()


def test_broken_symlinked_case_folder_is_named(tmp_path):
    write_dataset(tmp_path / "d", 1, lesioned=True)
    os.symlink(tmp_path / "gone", tmp_path / "d" / "les01")
    with pytest.raises(InputError, match="les01: broken symbolic link"):
        find_cases(tmp_path / "d")


def test_a_3d_file_cannot_serve_several_channels(tmp_path):
    """A datalist naming two modalities for a 3D image used to get the same volume twice."""
    _nifti(tmp_path / "a.nii.gz", np.ones((4, 5, 6), np.float32))
    assert load_volume(tmp_path / "a.nii.gz", channel=0).shape == (4, 5, 6)
    with pytest.raises(InputError, match="a.nii.gz: image holds one volume .*, channel 1 requested"):
        load_volume(tmp_path / "a.nii.gz", channel=1)
