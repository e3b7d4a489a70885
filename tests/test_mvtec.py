"""MVTec-style PNG data through the same commands as NIfTI: train, evaluate, score."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from anomaseg.cli import main

sys.path.insert(0, str(Path(__file__).parent / "data"))
from test_png import write_mvtec  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "configs" / "mvtec_png.yaml"


def test_mvtec_train_evaluate_score_with_skip_ganomaly(tmp_path, capsys):
    root = write_mvtec(tmp_path / "bottle", n_good=5, n_defect=3, size=(40, 48), rgb=True)
    run = tmp_path / "run"
    assert main(["train", "--data", str(root / "train"), "--out", str(run), "--config", str(PRESET),
                 "--model", "skip_ganomaly", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                 "--set", "model.params={base_channels: 4, max_channels: 8}"]) == 0
    assert main(["evaluate", "--run", str(run), "--data", str(root / "test"), "--out", str(tmp_path / "eval"),
                 "--predictor", "residual,skip_ganomaly"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    for name in ("residual", "skip_ganomaly"):
        m = summary[name]
        assert m["n_slices"] == 8 and m["n_anomalous_slices"] == 3  # one slice per image: image-level AUROC
        assert m["image_auroc"] is not None and 0 <= m["pixel_auroc"] <= 1
        assert m["n_voxels"] == 8 * 40 * 48  # every pixel counts (whole-image mask)
    calibration = json.loads((run / "calibration.json").read_text())
    assert "rec_max_" in calibration["skip_ganomaly"]["predictor_state"]

    out = tmp_path / "scores"
    assert main(["score", "--run", str(run), "--data", str(root / "test"), "--out", str(out)]) == 0
    amap = np.asarray(Image.open(out / "crack_000_anomaly_map.tiff"))
    seg = np.asarray(Image.open(out / "crack_000_segmentation.png"))
    assert amap.shape == seg.shape == (40, 48) and amap.dtype == np.float32
    assert set(np.unique(seg)) <= {0, 255}
    assert not list(out.glob("*.nii.gz"))


def test_png_post_processing_erodes_in_plane(tmp_path):
    """Erosion of a depth-1 volume must not erase the single slice (a 3D erosion would)."""
    from anomaseg.data.layout import find_cases
    from anomaseg.data.slices import SliceSpec, prepare_case
    from anomaseg.models import create_model
    from anomaseg.postprocess import PostProcessor
    from anomaseg.predictors.base import create_predictor
    from anomaseg.scorer import Scorer

    root = write_mvtec(tmp_path / "m", n_good=1, n_defect=0, size=(40, 48), rgb=False)
    case = prepare_case(find_cases(root / "test", ["gray"])[0], SliceSpec(("gray",), 32, (0.0, 100.0), 1.0, 0.0))
    scorer = Scorer(create_model("spatial_ae", tiny=True, image_size=32), create_predictor("residual"),
                    PostProcessor(median_size=3, erosion=2, min_component_size=1), device="cpu", precision="32")
    smoothed = scorer.smoothed_volume(case)
    assert smoothed.shape == (48, 40, 1)
    assert (smoothed[2:-2, 2:-2] > 0).mean() > 0.9  # the interior survives
    assert not smoothed[:2].any() and not smoothed[-2:].any() and not smoothed[:, :2].any() and not smoothed[:, -2:].any()
