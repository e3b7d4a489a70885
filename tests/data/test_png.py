"""PNG images (MVTec-AD style) as volumes of depth 1: reading, writing, finding cases, slicing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaseg.data.io import load_volume, save_like
from anomaseg.data.layout import find_cases
from anomaseg.data.slices import SliceSpec, prepare_case
from anomaseg.errors import InputError


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_mvtec(root: Path, n_good: int = 3, n_defect: int = 2, size=(40, 48), rgb: bool = True, seed: int = 0) -> Path:
    """root/train/good, root/test/{good,crack}, root/ground_truth/crack/<stem>_mask.png; images H x W = size."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]

    def image(defect: bool):
        base = 100 + 40 * np.sin(xx / 4.0 + rng.uniform(0, 0.5)) * np.cos(yy / 5.0) + rng.normal(0, 3, size)
        mask = np.zeros(size, bool)
        if defect:
            r, c = rng.integers(6, h - 14), rng.integers(6, w - 14)
            mask[r:r + 8, c:c + 8] = True
            base = np.where(mask, 250, base)
        gray = np.clip(base, 0, 255).astype(np.uint8)
        return (np.stack([gray, (gray * 0.8).astype(np.uint8), 255 - gray], -1) if rgb else gray), mask

    for i in range(n_good):
        _png(root / "train" / "good" / f"{i:03d}.png", image(False)[0])
        _png(root / "test" / "good" / f"{i:03d}.png", image(False)[0])
    for i in range(n_defect):
        img, mask = image(True)
        _png(root / "test" / "crack" / f"{i:03d}.png", img)
        _png(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root


def test_png_is_a_depth_one_volume_x_right_y_up(tmp_path):
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)  # 3 rows, 4 columns
    vol = load_volume(_png(tmp_path / "a.png", img))
    assert vol.shape == (4, 3, 1) and vol.format == "png" and vol.data.dtype == np.float32
    for r in range(3):
        for c in range(4):
            assert vol.data[c, 2 - r, 0] == img[r, c]  # column -> x, bottom row -> y = 0
    assert load_volume(tmp_path / "a.png", header_only=True).shape == (4, 3, 1)
    assert np.allclose(vol.affine, np.eye(4))


def test_png_colour_channels_luma_and_16_bit(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    path = _png(tmp_path / "rgb.png", rgb)
    assert [float(load_volume(path, channel=c).data.max()) for c in range(3)] == [10, 20, 30]
    assert load_volume(path).data.max() == pytest.approx(0.299 * 10 + 0.587 * 20 + 0.114 * 30, abs=1e-4)
    gray = _png(tmp_path / "gray.png", np.full((2, 2), 7, np.uint8))
    assert load_volume(gray, channel=2).data.max() == 7  # a grayscale image serves every channel
    deep = _png(tmp_path / "deep.png", np.full((2, 3), 40000, np.uint16))
    assert load_volume(deep).data.max() == 40000
    with pytest.raises(InputError, match="rgb.png: image has 3 colour channels"):
        load_volume(path, channel=3)


def test_corrupt_and_truncated_png_name_the_file(tmp_path):
    good = _png(tmp_path / "good.png", np.full((16, 16), 9, np.uint8))
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(InputError, match="trunc.png: image is corrupt or not a readable PNG"):
        load_volume(truncated)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all" * 10)
    with pytest.raises(InputError, match="garbage.png: segmentation is corrupt"):
        load_volume(garbage, kind="segmentation")


def test_outputs_are_images_in_the_input_pixel_order(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (5, 7)).astype(np.uint8)
    ref = load_volume(_png(tmp_path / "in.png", img))
    written = save_like(ref, ref.data, tmp_path / "out" / "x_anomaly_map.nii.gz", np.float32)
    assert written.name == "x_anomaly_map.tiff"
    assert np.array_equal(np.asarray(Image.open(written)), img.astype(np.float32))
    seg = (ref.data > 128).astype(np.uint8)
    written = save_like(ref, seg, tmp_path / "out" / "x_segmentation.nii.gz", np.uint8)
    assert written.name == "x_segmentation.png"
    assert np.array_equal(np.asarray(Image.open(written)), (img > 128).astype(np.uint8) * 255)


def test_mvtec_layout(tmp_path):
    root = write_mvtec(tmp_path / "bottle")
    train = find_cases(root / "train", ["r", "g", "b"])
    assert [c.case_id for c in train] == ["good_000", "good_001", "good_002"]
    assert all(c.normal and c.seg is None for c in train)
    test = find_cases(root / "test", ["gray"], require_seg=True)  # good images need no mask
    crack = [c for c in test if c.case_id.startswith("crack")]
    assert len(test) == 5 and len(crack) == 2 and all(c.seg.name.endswith("_mask.png") and not c.normal for c in crack)
    assert find_cases(root / "test" / "crack", require_seg=True)[0].case_id == "crack_000"  # one type folder
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(InputError, match=r"'crack_001' has no segmentation \(\.\./ground_truth/crack/<name>_mask\.png\)"):
        find_cases(root / "test", require_seg=True)
    with pytest.raises(InputError, match="pass its train/ or test/ folder"):
        find_cases(root)
    with pytest.raises(InputError, match="has no 'flair' image"):
        find_cases(root / "train", ["flair"])


def test_png_cases_slice_with_whole_image_mask_and_labels(tmp_path):
    root = write_mvtec(tmp_path / "m", size=(40, 48))
    spec = SliceSpec(("r", "g", "b"), 32, (0.0, 100.0), 1.0, 0.0)
    cases = {c.case_id: c for c in find_cases(root / "test", ["r", "g", "b"])}
    good = prepare_case(cases["good_000"], spec)
    assert good.images.shape == (1, 3, 32, 32) and good.keep.all()
    assert good.brain.shape == (48, 40, 1) and good.brain.all()
    assert good.truth is not None and not good.truth.any()  # "good" = known healthy
    crack = prepare_case(cases["crack_000"], spec)
    assert crack.truth.sum() == 64 and crack.slice_labels.tolist() == [True]
    assert float(crack.images.max()) == pytest.approx(1.0, abs=1e-3) and float(crack.images.min()) >= 0
