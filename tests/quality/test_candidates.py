"""Candidate folders: files matched to cases by id, every mistake named by its file."""

import nibabel as nib
import numpy as np
import pytest

from anomaseg.data.io import load_volume
from anomaseg.errors import InputError
from anomaseg.quality.candidates import find_candidates


def _save(path, shape=(6, 7, 5), affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), np.eye(4) if affine is None else affine), path)
    return path


def test_matching_by_case_id(tmp_path):
    segs = tmp_path / "segs"
    _save(segs / "case1_segmentation.nii.gz")
    _save(segs / "case1_anomaly_map.nii.gz")  # another output of `anomaseg score`: not a segmentation
    _save(segs / "case10.nii.gz")
    _save(segs / "case2" / "case2_pred.nii.gz")  # one level of case folders
    found = find_candidates(segs, ["case1", "case10", "case2", "case3"])
    assert {k: v.path.name for k, v in found.items()} == {
        "case1": "case1_segmentation.nii.gz", "case10": "case10.nii.gz", "case2": "case2_pred.nii.gz"}
    assert found["case1"].source == "segs"


@pytest.mark.parametrize("names, culprit, message", [
    (["case1_seg.nii.gz", "other_seg.nii.gz"], "other_seg.nii.gz", "matches no case id"),
    (["case1_seg.nii.gz", "case1_pred.nii.gz"], "case1_seg.nii.gz", "second segmentation of case 'case1'"),
])
def test_bad_folders_name_the_file(tmp_path, names, culprit, message):
    for n in names:
        _save(tmp_path / "segs" / n)
    with pytest.raises(InputError, match=message) as err:
        find_candidates(tmp_path / "segs", ["case1"])
    assert err.value.path.name == culprit


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no segmentation files") as err:
        find_candidates(tmp_path / "empty", ["case1"])
    assert err.value.path.name == "empty"
    with pytest.raises(InputError, match="not found"):
        find_candidates(tmp_path / "nowhere", ["case1"])


def test_candidate_must_lie_on_the_image_grid(tmp_path):
    ref = load_volume(_save(tmp_path / "img.nii.gz"), header_only=True)
    shifted = np.eye(4)
    shifted[0, 3] = 5
    _save(tmp_path / "a" / "case1_seg.nii.gz", shape=(6, 7, 4))
    _save(tmp_path / "b" / "case1_seg.nii.gz", affine=shifted)
    for folder, message in (("a", "shape"), ("b", "grid")):
        cand = find_candidates(tmp_path / folder, ["case1"])["case1"]
        with pytest.raises(InputError, match=message) as err:
            cand.load(ref)
        assert err.value.path == tmp_path / folder / "case1_seg.nii.gz"
