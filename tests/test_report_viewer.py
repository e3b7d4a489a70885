"""The browsable report: slice viewers, sortable tables, the lesion-size plot; driven in headless
Chromium where it is installed (Debian's `chromium`; the test skips without it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from anomaseg.report import write_report
from anomaseg.report_viewer import case_slices, froc_png, operating_point

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _viewer(case_id, seed, n=20, side=48, dice=0.5):
    """A moving bright blob: every slice looks different."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    image = np.zeros((n, side, side), np.float32)
    truth = np.zeros((n, side, side), bool)
    for z in range(n):
        brain = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 2.5) ** 2
        blob = (yy - 14 - z) ** 2 + (xx - side / 2) ** 2 < 2 + 3 * min(z, n - 1 - z)  # largest mid-volume
        image[z] = brain * (0.5 + 0.1 * rng.random((side, side))) + blob * brain
        truth[z] = blob & brain
    amap = image * truth + 0.1 * rng.random(image.shape).astype(np.float32)
    return case_slices(case_id, dice, image, amap, amap > 0.5, truth, threshold=0.5)


def _report(tmp_path, n_viewers=2):
    metrics = {"pixel_auroc": 0.9, "predictor": "residual", "lesion_recall": 0.5, "lesion_precision": 0.4,
               "lesion_f1": 0.44, "per_volume_dice_mean": 0.3, "per_volume_dice_std": 0.1, "n_true_lesions": 4,
               "recall_by_lesion_size": {"<0.1 ml": {"n_lesions": 1, "detected": 0, "recall": 0.0},
                                         "0.1-1 ml": {"n_lesions": 2, "detected": 1, "recall": 0.5},
                                         "1-10 ml": {"n_lesions": 1, "detected": 1, "recall": 1.0},
                                         ">10 ml": {"n_lesions": 0, "detected": 0, "recall": None}}}
    per_case = [{"case_id": f"case{i}", "dice": d} for i, d in enumerate([0.2, 0.9, float("nan"), 0.5])]
    per_lesion = [{"case_id": "case0", "lesion": 1, "volume_ml": 0.05, "detected": False},
                  {"case_id": "case1", "lesion": 1, "volume_ml": 2.0, "detected": True}]
    out = tmp_path / "report.html"
    write_report(out, metrics, {}, per_case, [], viewers=[_viewer(f"case{i}", i) for i in range(n_viewers)],
                 per_lesion=per_lesion)
    return out


def test_report_sections_and_size(tmp_path):
    text = _report(tmp_path).read_text()
    assert text.count('class="viewer"') == 2 and text.count('class="sortable"') == 2
    assert "Clinical metrics" in text and "Per lesion (2)" in text and "lesion recall by lesion size" in text
    assert "0.300 &plusmn; 0.100" in text  # per-volume Dice as mean +- std
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # nothing loaded from outside
    # one 20-slice case costs a few kB here; a 2 mm brain at 64 px ~100-300 kB (module docstring)
    assert len(text) < 200_000


def test_froc_plot_marks_the_segmentations_operating_point():
    curve = {"fp_per_case": [0.0, 0.5, 2.0, 8.0], "sensitivity": [0.1, 0.3, 0.5, 0.7]}
    m = {"predictor": "grad_elbo", "froc_score": 0.4, "threshold_rule": "hysteresis",
         "false_positive_lesions_per_case": 1.5, "lesion_recall": 0.25}
    assert operating_point(m) == (1.5, 0.25)
    assert operating_point({**m, "lesion_recall": float("nan")}) is None
    assert operating_point({"lesion_recall": 0.3}) is None
    with_dot = froc_png(m, curve)
    without = froc_png({k: v for k, v in m.items() if k != "lesion_recall"}, curve)
    assert with_dot.startswith("data:image/png;base64,") and with_dot != without
    assert froc_png(m, {"fp_per_case": [], "sensitivity": []}) is None


HEAD_HOOK = """<script>window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
var __ce = console.error; console.error = function () { window.__errors.push(Array.prototype.join.call(arguments, " ")); };
</script>"""

DRIVER = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var out = {errors: window.__errors};
  try {
    var v = document.querySelector(".viewer"), s = v.querySelector("input[type=range]");
    var c = v.querySelectorAll("canvas");
    out.slice0 = v.getAttribute("data-slice");
    out.label0 = v.querySelector(".slice").textContent;
    var before = [c[0].toDataURL(), c[1].toDataURL(), c[2].toDataURL()];
    s.value = "0"; s.dispatchEvent(new Event("input"));
    out.slice1 = v.getAttribute("data-slice");
    var after = [c[0].toDataURL(), c[1].toDataURL(), c[2].toDataURL()];
    out.changed = before.map(function (b, i) { return b !== after[i]; });
    out.blank = c[0].toDataURL() === document.createElement("canvas").toDataURL();
    v.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowUp", bubbles: true}));
    out.slice2 = v.getAttribute("data-slice");
    v.dispatchEvent(new KeyboardEvent("keydown", {key: "End", bubbles: true}));
    out.slice3 = v.getAttribute("data-slice");
    var t = document.querySelector("table.sortable"), heads = t.querySelectorAll("th");
    var col = Array.prototype.findIndex.call(heads, function (h) { return h.textContent === "dice"; });
    heads[col].click();
    out.ascending = Array.prototype.slice.call(t.rows, 1).map(function (r) { return r.cells[col].textContent; });
    heads[col].click();
    out.descending = Array.prototype.slice.call(t.rows, 1).map(function (r) { return r.cells[col].textContent; });
  } catch (e) { out.errors.push("driver: " + e); }
  var pre = document.createElement("pre"); pre.id = "result"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 300); });
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_viewer_in_headless_chromium(tmp_path):
    report = _report(tmp_path)
    page = tmp_path / "driven.html"  # a copy with the test's hooks; the report itself is untouched
    text = report.read_text()
    page.write_text(text.replace("<head>", "<head>" + HEAD_HOOK, 1).replace("</body>", DRIVER + "</body>", 1))
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                             page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="result">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stderr[-2000:]
    out = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert out["errors"] == []
    assert "Uncaught" not in result.stderr and "CONSOLE" not in result.stderr.upper().replace("CONSOLE_", "")
    assert out["slice0"] != "0" and out["label0"].startswith("slice ")  # opens on the slice with most lesion
    assert out["slice1"] == "0" and out["changed"] == [True, True, True] and not out["blank"]
    assert out["slice2"] == "1" and out["slice3"] == "19"  # keyboard: up one, then the last slice
    assert out["ascending"] == ["0.200", "0.500", "0.900", "n/a"]
    assert out["descending"] == ["0.900", "0.500", "0.200", "n/a"]
