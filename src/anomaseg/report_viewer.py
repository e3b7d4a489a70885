"""The browsable parts of report.html: a slice viewer per case, sortable tables, the lesion-size plot.

Slice viewer: every axial slice of a case at model size (at most `MAX_SIDE` pixels), as three
canvases side by side: input, anomaly map (inferno, 0 to twice the segmentation threshold, so
the threshold sits mid-scale), and the input with the predicted (red) and true (green) outlines.
A slider and the keyboard (arrow keys, j/k, PageUp/PageDown, Home/End) move through the slices.
The slices of a case travel as three sprite images (all slices stacked vertically): input and map
as JPEG (quality 85), both masks in one lossless PNG (red = predicted, green = true); the outlines
are drawn in the browser. That is ~100-300 kB per 2 mm case; only `MAX_VIEWERS` cases get a viewer
(the best and worst by Dice), every case stays in the tables.

Sortable tables: click a column head to sort (numbers numerically, "n/a" last). Everything is
inline: the page opens offline and loads nothing.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

import numpy as np

from anomaseg.report_html import escape_html, mpl_text, png_data_uri

MAX_VIEWERS = 8  # cases with a slice viewer in one report (half best, half worst by Dice)
MAX_SIDE = 128  # slices are shown at model size, downsampled to at most this many pixels


@dataclass
class CaseSlices:
    """One case's slices, ready for the viewer (already encoded: a few hundred kB at most)."""

    case_id: str
    dice: float
    n_slices: int
    side: int
    image_uri: str  # JPEG sprite: n_slices tiles of side x side stacked vertically
    map_uri: str  # JPEG sprite, colour-mapped anomaly map
    masks_uri: str  # PNG sprite: red = predicted, green = true
    first: int  # slice shown first (the one with most lesion)
    map_range: tuple[float, float]


def _encode(array: np.ndarray, fmt: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=85)
    else:
        image.save(buf, format="PNG", optimize=True)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def case_slices(case_id: str, dice: float, image: np.ndarray, anomaly_map: np.ndarray, prediction: np.ndarray,
                truth: np.ndarray, threshold: float | None) -> CaseSlices:
    """`image`, `anomaly_map`: (Z, H, W) float slices oriented for display; `prediction`, `truth`:
    (Z, H, W) bool. Keeps the slices that hold brain (nonzero input) plus one either side."""
    from matplotlib import colormaps

    z_any = np.flatnonzero(np.abs(image).reshape(len(image), -1).max(axis=1) > 0)
    lo, hi = (max(0, z_any[0] - 1), min(len(image), z_any[-1] + 2)) if z_any.size else (0, len(image))
    image, anomaly_map = image[lo:hi], anomaly_map[lo:hi]
    prediction, truth = prediction[lo:hi], truth[lo:hi]
    step = max(1, int(np.ceil(image.shape[1] / MAX_SIDE)))
    if step > 1:
        image, anomaly_map = image[:, ::step, ::step], anomaly_map[:, ::step, ::step]
        prediction, truth = prediction[:, ::step, ::step], truth[:, ::step, ::step]
    z, h, w = image.shape
    vmax_img = float(np.percentile(image[image > 0], 99.5)) if (image > 0).any() else 1.0
    gray = np.clip(image / max(vmax_img, 1e-6) * 255, 0, 255).astype(np.uint8).reshape(z * h, w)
    top = 2 * threshold if threshold and threshold > 0 else float(anomaly_map.max()) or 1.0
    heat = colormaps["inferno"](np.clip(anomaly_map / top, 0, 1).reshape(z * h, w))[..., :3]
    masks = np.zeros((z * h, w, 3), np.uint8)
    masks[..., 0] = prediction.reshape(z * h, w) * 255
    masks[..., 1] = truth.reshape(z * h, w) * 255
    lesion = truth.sum(axis=(1, 2)) + 1e-3 * prediction.sum(axis=(1, 2))
    first = int(np.argmax(lesion)) if lesion.any() else z // 2
    return CaseSlices(case_id, dice, z, max(h, w), _encode(gray, "JPEG"), _encode((heat * 255).astype(np.uint8), "JPEG"),
                      _encode(masks, "PNG"), first, (0.0, top))


_VIEWER_CSS = """
.viewer { border: 1px solid #ccc; padding: 0.5em; margin: 0.8em 0; display: inline-block; }
.viewer:focus { outline: 2px solid #4a90d9; }
.viewer canvas { width: 256px; height: 256px; image-rendering: pixelated; background: #000; margin-right: 4px; }
.viewer .controls { margin-top: 0.3em; font-size: 0.9em; }
.viewer input[type=range] { width: 400px; vertical-align: middle; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th.asc::after { content: " \\25B2"; } table.sortable th.desc::after { content: " \\25BC"; }
"""

# One small script: viewers (sprites -> canvases, slider, keys) and sortable tables.
_SCRIPT = r"""
(function () {
  "use strict";
  function drawOutline(ctx, data, w, h, channel, rgb) {
    var out = ctx.getImageData(0, 0, w, h);
    for (var y = 0; y < h; y++) {
      for (var x = 0; x < w; x++) {
        var i = (y * w + x) * 4 + channel;
        if (data[i] < 128) continue;
        var edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
          data[i - 4] < 128 || data[i + 4] < 128 || data[i - 4 * w] < 128 || data[i + 4 * w] < 128;
        if (!edge) continue;
        var j = (y * w + x) * 4;
        out.data[j] = rgb[0]; out.data[j + 1] = rgb[1]; out.data[j + 2] = rgb[2]; out.data[j + 3] = 255;
      }
    }
    ctx.putImageData(out, 0, 0);
  }
  function setUp(viewer) {
    var spec = JSON.parse(viewer.getAttribute("data-spec"));
    var n = spec.n, side = spec.side;
    var canvases = viewer.querySelectorAll("canvas");
    var slider = viewer.querySelector("input[type=range]");
    var label = viewer.querySelector(".slice");
    var sprites = {}, pending = 3;
    var scratch = document.createElement("canvas");
    scratch.width = side; scratch.height = side;
    var sctx = scratch.getContext("2d", {willReadFrequently: true});
    canvases.forEach(function (c) { c.width = side; c.height = side; });
    function show(z) {
      z = Math.max(0, Math.min(n - 1, z));
      slider.value = z;
      label.textContent = "slice " + (z + 1) + " / " + n;
      viewer.setAttribute("data-slice", String(z));
      if (pending > 0) return;
      var sy = z * side;
      var c0 = canvases[0].getContext("2d"), c1 = canvases[1].getContext("2d");
      var c2 = canvases[2].getContext("2d", {willReadFrequently: true});
      c0.drawImage(sprites.image, 0, sy, side, side, 0, 0, side, side);
      c1.drawImage(sprites.map, 0, sy, side, side, 0, 0, side, side);
      c2.drawImage(sprites.image, 0, sy, side, side, 0, 0, side, side);
      sctx.clearRect(0, 0, side, side);
      sctx.drawImage(sprites.masks, 0, sy, side, side, 0, 0, side, side);
      var m = sctx.getImageData(0, 0, side, side).data;
      drawOutline(c2, m, side, side, 1, [32, 224, 32]);
      drawOutline(c2, m, side, side, 0, [255, 32, 32]);
    }
    ["image", "map", "masks"].forEach(function (key) {
      var img = new Image();
      img.onload = function () { pending -= 1; if (pending === 0) show(Number(slider.value)); };
      img.src = spec[key];
      sprites[key] = img;
    });
    slider.addEventListener("input", function () { show(Number(slider.value)); });
    viewer.addEventListener("keydown", function (e) {
      var z = Number(slider.value), step = {ArrowUp: 1, ArrowRight: 1, k: 1, ArrowDown: -1, ArrowLeft: -1, j: -1,
        PageUp: 10, PageDown: -10}[e.key];
      if (e.key === "Home") { show(0); } else if (e.key === "End") { show(n - 1); }
      else if (step !== undefined) { show(z + step); } else { return; }
      e.preventDefault();
    });
    show(spec.first);
  }
  function sortable(table) {
    var heads = table.querySelectorAll("tr:first-child th");
    heads.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var asc = !th.classList.contains("asc");
        heads.forEach(function (h) { h.classList.remove("asc", "desc"); });
        th.classList.add(asc ? "asc" : "desc");
        var rows = Array.prototype.slice.call(table.querySelectorAll("tr")).slice(1);
        function key(row) {
          var t = row.children[col] ? row.children[col].textContent.trim() : "";
          var v = parseFloat(t);
          return isNaN(v) || !/^[-+0-9.einf]+$/i.test(t) ? t : v;
        }
        rows.sort(function (a, b) {
          var x = key(a), y = key(b);
          if (x === "n/a" || x === "") return 1;
          if (y === "n/a" || y === "") return -1;
          var r = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
          return asc ? r : -r;
        });
        rows.forEach(function (row) { row.parentNode.appendChild(row); });
      });
    });
  }
  document.querySelectorAll(".viewer").forEach(setUp);
  document.querySelectorAll("table.sortable").forEach(sortable);
})();
"""


def viewers_html(cases: list[CaseSlices]) -> str:
    if not cases:
        return '<p class="note">no slice viewers</p>'
    parts = [f'<p class="note">Up to {MAX_VIEWERS} cases (best and worst by Dice) have a viewer; every case is in '
             "the tables. Click a viewer, then use the slider or the arrow keys (also j/k, PageUp/PageDown, "
             "Home/End). Left: input; middle: anomaly map (0 to twice the threshold); right: predicted "
             "outline red, true outline green.</p>"]
    for c in cases:
        spec = {"n": c.n_slices, "side": c.side, "first": c.first, "image": c.image_uri, "map": c.map_uri,
                "masks": c.masks_uri}
        parts.append(
            f'<div class="viewer" id="viewer-{escape_html(c.case_id)}" tabindex="0" '
            f'data-spec="{escape_html(json.dumps(spec))}">'
            f"<div><b>{escape_html(c.case_id)}</b> &mdash; Dice {c.dice:.3f}; map scale {c.map_range[0]:.3g} to "
            f"{c.map_range[1]:.3g}</div>"
            '<canvas aria-label="input"></canvas><canvas aria-label="anomaly map"></canvas>'
            '<canvas aria-label="outlines"></canvas>'
            f'<div class="controls"><input type="range" min="0" max="{c.n_slices - 1}" value="{c.first}" '
            f'aria-label="slice"> <span class="slice"></span></div></div>')
    return "\n".join(parts)


def script_html() -> str:
    return f"<script>{_SCRIPT}</script>"


def css() -> str:
    return _VIEWER_CSS


def size_recall_png(metrics: dict, baseline: dict | None = None) -> str | None:
    """Bar chart of lesion recall per size stratum (n lesions above the bars), the baseline beside."""
    from matplotlib.figure import Figure

    by_size = metrics.get("recall_by_lesion_size")
    if not isinstance(by_size, dict) or not by_size:
        return None
    names = list(by_size)
    series = [(str(metrics.get("predictor", "model")), by_size, "C1")]
    if baseline and isinstance(baseline.get("recall_by_lesion_size"), dict):
        series.insert(0, (f"{baseline.get('predictor', 'intensity')} (baseline)", baseline["recall_by_lesion_size"],
                          "0.6"))
    fig = Figure(figsize=(6.0, 3.2))
    ax = fig.subplots()
    width = 0.8 / len(series)
    for k, (label, data, colour) in enumerate(series):
        x = np.arange(len(names)) + (k - (len(series) - 1) / 2) * width
        recall = [data[n]["recall"] if data[n].get("recall") is not None else np.nan for n in names]
        ax.bar(x, np.nan_to_num(recall), width, color=colour, label=mpl_text(label))
        for xi, r, n in zip(x, recall, names):
            ax.text(xi, (0 if np.isnan(r) else r) + 0.02, f"n={data[n]['n_lesions']}", ha="center", fontsize=7)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylim=(0, 1.12), ylabel="lesion recall", title="Detected lesions by lesion volume")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return png_data_uri(fig)


def operating_point(metrics: dict) -> tuple[float, float] | None:
    """(false-positive lesions per case, lesion recall) of the segmentation itself: the calibrated
    threshold under its rule, which the FROC's voxel-threshold sweep need not pass through (the
    hysteresis rule's peak test, a fitted minimum volume); None where either is missing."""
    fp, recall = metrics.get("false_positive_lesions_per_case"), metrics.get("lesion_recall")
    ok = all(isinstance(v, (int, float)) and np.isfinite(v) for v in (fp, recall))
    return (float(fp), float(recall)) if ok else None


def froc_png(metrics: dict, curve: dict, baseline: dict | None = None,
             baseline_curve: dict | None = None) -> str | None:
    """The FROC curve (lesion sensitivity against false-positive lesions per case, log axis, points
    joined linearly as the summary interpolates them; the summary's rates 1/8 ... 8 marked), the
    baseline's beside it in grey; a dot on each: the segmentation at its calibrated threshold
    (`operating_point`). Points at 0 false positives are drawn at the axis' left end."""
    from matplotlib.figure import Figure

    from anomaseg.lesion_sweep import FROC_RATES

    series = []
    if baseline and baseline_curve and baseline_curve.get("fp_per_case"):
        series.append((f"{baseline.get('predictor', 'intensity')} (baseline)", baseline, baseline_curve, "0.45"))
    if curve and curve.get("fp_per_case"):
        series.append((str(metrics.get("predictor", "model")), metrics, curve, "C2"))
    if not series:
        return None
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    low = FROC_RATES[0] / 4
    for label, m, c, colour in series:
        score = m.get("froc_score")
        text = label + (f" (FROC score {score:.3f})" if isinstance(score, float) and np.isfinite(score) else "")
        ax.plot(np.maximum(c["fp_per_case"], low), c["sensitivity"], color=colour, lw=1.6, label=mpl_text(text))
        point = operating_point(m)
        if point is not None:
            rule = m.get("threshold_rule")
            ax.plot(max(point[0], low), point[1], "o", color=colour, ms=6,
                    label=mpl_text("  its segmentation" + (f" ({rule})" if rule else "")))
    for rate in FROC_RATES:
        ax.axvline(rate, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set(xlim=(low, FROC_RATES[-1] * 4), ylim=(0, 1.02), xlabel="false-positive lesions per case",
           ylabel="lesion sensitivity", title="FROC (lesions over the threshold sweep)")
    ax.legend(fontsize=7, loc="upper left")  # FROC curves rise to the right: the upper left stays free
    fig.tight_layout()
    return png_data_uri(fig)

