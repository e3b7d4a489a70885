import gzip

import nibabel as nib
import numpy as np
import pytest

from anomaseg.data.io import load_volume, save_like
from anomaseg.errors import InputError


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_reorients_to_ras_and_writes_back_in_source_order(tmp_path):
    # stored as LPS-ish with permuted axes: voxel axes are (A->P, S, R->L)
    affine = np.array([[0, 0, -2.0, 50], [-1.5, 0, 0, 60], [0, 3.0, 0, -20], [0, 0, 0, 1]])
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    src = _save(tmp_path / "img.nii.gz", data, affine)
    vol = load_volume(src)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.shape == (6, 4, 5)
    # the same world point has the same value in both voxel orders
    ijk_src = np.array([1, 2, 3, 1])
    world = affine @ ijk_src
    ijk_ras = np.linalg.solve(vol.affine, world).round().astype(int)
    assert vol.data[tuple(ijk_ras[:3])] == data[1, 2, 3]
    np.testing.assert_allclose(vol.spacing, (2.0, 1.5, 3.0))

    out = save_like(vol, vol.data * 2, tmp_path / "out.nii.gz")
    back = nib.load(out)
    np.testing.assert_array_equal(back.get_fdata(), data * 2)
    np.testing.assert_allclose(back.affine, affine)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_header_only_matches_full_load(tmp_path):
    affine = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    src = _save(tmp_path / "a.nii", np.zeros((3, 4, 5), np.float32), affine)
    full, head = load_volume(src), load_volume(src, header_only=True)
    assert head.data is None and head.shape == full.shape
    np.testing.assert_allclose(head.affine, full.affine)


def test_4d_channel_selection(tmp_path):
    data = np.stack([np.full((3, 3, 3), k, np.float32) for k in range(3)], axis=-1)
    src = _save(tmp_path / "multi.nii.gz", data)
    assert load_volume(src, channel=2).data.max() == 2
    with pytest.raises(InputError, match="multi.nii.gz.*4D with 3 volumes"):
        load_volume(src)
    with pytest.raises(InputError, match="channel 5"):
        load_volume(src, channel=5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_rejects_non_finite_voxels(tmp_path, bad):
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = bad
    src = _save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputError, match=r"nan\.nii\.gz: image contains 1 NaN/Inf voxels"):
        load_volume(src)


def test_rejects_corrupt_truncated_and_foreign_files(tmp_path):
    good = _save(tmp_path / "good.nii.gz", np.ones((8, 8, 8), np.float32))
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InputError, match="trunc.nii.gz: image is corrupt"):
        load_volume(truncated)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not nifti" * 40))
    with pytest.raises(InputError, match="garbage.nii.gz"):
        load_volume(garbage)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InputError, match="notes.txt: image is not a NIfTI file"):
        load_volume(text)
    with pytest.raises(InputError, match="missing.nii.gz: image file not found"):
        load_volume(tmp_path / "missing.nii.gz")


def test_label_files_keep_integer_values(tmp_path):
    seg = np.zeros((4, 4, 4), np.float64)
    seg[1, 1, 1] = 4.0
    vol = load_volume(_save(tmp_path / "seg.nii.gz", seg), kind="segmentation")
    assert np.issubdtype(vol.data.dtype, np.integer) and vol.data.max() == 4
