import json

import nibabel as nib
import numpy as np
import pytest

from anomaseg.data.layout import UNNAMED, find_cases
from anomaseg.errors import InputError


def _touch(path, shape=(4, 4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)
    return path


def test_brats_case_folders_with_aliases(tmp_path):
    for case in ("BraTS_001", "BraTS_002"):
        for m in ("t1", "flair", "seg"):
            _touch(tmp_path / case / f"{case}_{m}.nii.gz")
    # BraTS 2023 naming: hyphen separator, t2f = FLAIR
    _touch(tmp_path / "BraTS-GLI-00003-000" / "BraTS-GLI-00003-000-t2f.nii.gz")
    _touch(tmp_path / "BraTS-GLI-00003-000" / "BraTS-GLI-00003-000-seg.nii.gz")
    cases = find_cases(tmp_path, ["flair"])
    assert [c.case_id for c in cases] == ["BraTS-GLI-00003-000", "BraTS_001", "BraTS_002"]
    assert all(c.seg is not None and c.mask is None for c in cases)
    assert cases[0].image("FLAIR").path.name.endswith("-t2f.nii.gz")


def test_missing_modality_names_the_case(tmp_path):
    _touch(tmp_path / "c1" / "c1_t1.nii.gz")
    _touch(tmp_path / "c1" / "c1_t2.nii.gz")
    with pytest.raises(InputError, match=r"c1: case 'c1' has no 'flair' image \(found: t1, t2\)"):
        find_cases(tmp_path, ["flair"])


def test_flat_folder_groups_modalities_masks_and_segs(tmp_path):
    _touch(tmp_path / "a_flair.nii.gz")
    _touch(tmp_path / "a_seg.nii.gz")
    _touch(tmp_path / "a_mask.nii")
    _touch(tmp_path / "scan2.nii.gz")
    cases = {c.case_id: c for c in find_cases(tmp_path, ["flair"])}
    assert set(cases) == {"a", "scan2"}
    assert cases["a"].seg.name == "a_seg.nii.gz" and cases["a"].mask.name == "a_mask.nii"
    assert list(cases["scan2"].images) == [UNNAMED]
    assert cases["scan2"].image("flair").path.name == "scan2.nii.gz"  # a lone image serves any modality


def test_orphan_segmentation_is_an_error(tmp_path):
    _touch(tmp_path / "b_seg.nii.gz")
    with pytest.raises(InputError, match="b_seg.nii.gz: no image file belongs"):
        find_cases(tmp_path, ["flair"])


def test_decathlon_datalist_4d_and_lists(tmp_path):
    _touch(tmp_path / "imagesTr" / "x1.nii.gz", (4, 4, 4, 2))
    _touch(tmp_path / "labelsTr" / "x1.nii.gz")
    _touch(tmp_path / "imagesTr" / "x2.nii.gz", (4, 4, 4, 2))
    spec = {"modality": {"0": "FLAIR", "1": "T1w"},
            "training": [{"image": "imagesTr/x1.nii.gz", "label": "labelsTr/x1.nii.gz"},
                         {"image": "imagesTr/x2.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    cases = find_cases(tmp_path / "dataset.json", ["t1"])
    assert [c.case_id for c in cases] == ["x1", "x2"]
    assert cases[0].image("t1").channel == 1 and cases[0].image("flair").channel == 0
    assert cases[0].seg.name == "x1.nii.gz" and cases[1].seg is None
    with pytest.raises(InputError, match="dataset.json: datalist has no list 'test'"):
        find_cases(tmp_path / "dataset.json", split="test")


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no NIfTI cases found"):
        find_cases(tmp_path / "empty")
    with pytest.raises(InputError, match="nowhere: dataset path not found"):
        find_cases(tmp_path / "nowhere")


def test_require_seg(tmp_path):
    _touch(tmp_path / "c" / "c_flair.nii.gz")
    with pytest.raises(InputError, match="has no segmentation"):
        find_cases(tmp_path, ["flair"], require_seg=True)


@pytest.mark.parametrize("name", ["_.nii.gz", "scan_.nii.gz", "scan-.nii"])
def test_case_folder_file_ending_in_a_separator_is_the_unnamed_image(tmp_path, name):
    # found by `make fuzz` (2000 examples): the empty text after the separator became modality ""
    _touch(tmp_path / "0" / name)
    (case,) = find_cases(tmp_path)
    assert list(case.images) == [UNNAMED]
