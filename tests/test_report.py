"""The HTML report: one self-contained, escaped file, written atomically."""

from __future__ import annotations

import math
import re

import numpy as np

from anomaseg.metrics import VoxelMetrics
from anomaseg.report import CaseOverlay, write_report


def _overlay(case_id, with_recon, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    truth = (yy - 12) ** 2 + (xx - 18) ** 2 < 25
    image = rng.random((32, 32)).astype(np.float32) + truth
    amap = np.abs(rng.standard_normal((32, 32))).astype(np.float32) + 2 * truth
    prediction = amap > 1.5
    return CaseOverlay(
        case_id=case_id,
        dice=0.5,
        image=image,
        reconstruction=rng.random((32, 32)) if with_recon else None,
        anomaly_map=amap,
        prediction=prediction,
        truth=truth,
    )


def _metrics_and_curves():
    rng = np.random.default_rng(0)
    labels = rng.random(5000) < 0.05
    vm = VoxelMetrics()
    vm.update(rng.standard_normal(5000).astype(np.float32) + labels, labels)
    metrics = vm.compute()
    metrics.update(image_auroc=math.nan, threshold=0.7, model="vae <beta=4>", threshold_rule="hysteresis",
                   postprocess_fitted={"peak_threshold_": 1.2345, "min_lesion_ml_": None})
    return metrics, vm.curves(max_points=100)


def test_report_is_self_contained_and_escaped(tmp_path):
    metrics, curves = _metrics_and_curves()
    per_case = [
        {"case_id": "BraTS_001", "dice": 0.61234, "n_voxels": 1234, "image_score": math.nan},
        {"case_id": "evil<script>", "dice": 0.1},
    ]
    overlays = [_overlay("BraTS_001", True, 1), _overlay("evil<script>", False, 2)]
    out = tmp_path / "report" / "report.html"
    write_report(out, metrics, curves, per_case, overlays, title="eval & <test>")

    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temp files left
    text = out.read_text(encoding="ascii")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    images = re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', text)
    assert len(images) == 3  # curves + 2 overlays
    assert 'src="http' not in text and "href=" not in text and "<link" not in text
    assert "evil<script>" not in text and "evil&lt;script&gt;" in text  # the only script is the report's own
    assert "BraTS_001" in text and "eval &amp; &lt;test&gt;" in text and "vae &lt;beta=4&gt;" in text
    assert "n/a" in text  # NaN metric / NaN per-case value
    assert "0.612" in text and "1234" in text
    # the threshold rule and its fitted state (one level of nesting) are in the summary
    assert "hysteresis" in text and "postprocess_fitted.peak_threshold_" in text and "1.23" in text
    assert out.stat().st_size < 500_000


def test_report_without_overlays_or_curves(tmp_path):
    vm = VoxelMetrics()
    vm.update(np.zeros(10, np.float32), np.zeros(10))  # one class only: NaN metrics, empty curves
    out = tmp_path / "r.html"
    write_report(out, vm.compute(), vm.curves(), [], [])
    text = out.read_text(encoding="ascii")
    assert "n/a" in text and "no anomalous" in text and "data:image/png" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
