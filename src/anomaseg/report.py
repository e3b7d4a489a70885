"""Self-contained HTML reports: one evaluation (summary metrics, ROC / PR curves, per-case table,
overlays) and a comparison of predictors (metrics table, maps side by side).

One HTML file, no external resources: figures are PNGs rendered with matplotlib's Agg backend
(through ``matplotlib.figure.Figure``, never pyplot, so no global state or GUI backend is touched)
and embedded as base64 ``data:`` URIs; the CSS is inline. All text is HTML-escaped. The file is
written atomically (temporary file beside it, then renamed).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomaseg import report_viewer
from anomaseg.atomic import write_text
from anomaseg.report_html import escape_html, fmt, generation_time, img_html, is_number, mpl_text, png_data_uri

__all__ = ["CaseOverlay", "SideBySide", "write_comparison_report", "write_report"]

_PRED_COLOUR = "#ff2020"  # prediction outline: red, solid
_TRUE_COLOUR = "#20e020"  # ground-truth outline: green, dashed (line style also tells them apart)


@dataclass
class CaseOverlay:
    """What one overlay row shows. Arrays are 2D, already oriented for display (anterior up)."""

    case_id: str
    dice: float
    image: np.ndarray  # input slice
    reconstruction: np.ndarray | None  # None for predictors without a reconstruction
    anomaly_map: np.ndarray
    prediction: np.ndarray  # bool, predicted segmentation
    truth: np.ndarray  # bool, ground truth


@dataclass
class SideBySide:
    """One case's slice under several predictors. Arrays are 2D, oriented for display."""

    case_id: str
    image: np.ndarray
    truth: np.ndarray  # bool
    maps: dict  # predictor name -> anomaly map


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------


_BASELINE_COLOUR = "0.45"  # the intensity baseline's curves: grey, drawn first


def _curves_png(metrics: dict, curves: dict, baseline: tuple[dict, dict] | None = None) -> str | None:
    from matplotlib.figure import Figure

    fpr = list(curves.get("fpr") or [])
    tpr = list(curves.get("tpr") or [])
    precision = list(curves.get("precision") or [])
    recall = list(curves.get("recall") or [])
    if not (fpr and len(fpr) == len(tpr)) and not (precision and len(precision) == len(recall)):
        return None
    fig = Figure(figsize=(9.0, 4.2))
    ax_roc, ax_pr = fig.subplots(1, 2)
    if baseline is not None:
        b_metrics, b_curves = baseline
        name = mpl_text(f"baseline: {b_metrics.get('predictor', 'intensity')}")
        if b_curves.get("fpr"):
            ax_roc.plot(b_curves["fpr"], b_curves["tpr"], color=_BASELINE_COLOUR, lw=1.4,
                        label=f"{name} (AUROC {fmt(b_metrics.get('pixel_auroc'))})")
        if b_curves.get("precision"):
            ax_pr.plot(b_curves["recall"], b_curves["precision"], color=_BASELINE_COLOUR, lw=1.4,
                       label=f"{name} (AP {fmt(b_metrics.get('pixel_auprc'))})")

    auroc = metrics.get("pixel_auroc")
    if fpr and len(fpr) == len(tpr):
        label = "ROC" + (f" (AUROC {fmt(auroc)})" if auroc is not None else "")
        ax_roc.plot(fpr, tpr, color="C0", lw=1.8, label=label)
    else:
        ax_roc.text(0.5, 0.5, "no ROC curve", ha="center", va="center")
    ax_roc.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="chance")
    ax_roc.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title="ROC (voxels)")
    ax_roc.set_aspect("equal")
    ax_roc.legend(loc="lower right", fontsize=8)

    auprc = metrics.get("pixel_auprc")
    if precision and len(precision) == len(recall):
        label = "PR" + (f" (AP {fmt(auprc)})" if auprc is not None else "")
        ax_pr.plot(recall, precision, color="C1", lw=1.8, label=label)
    else:
        ax_pr.text(0.5, 0.5, "no PR curve", ha="center", va="center")
    prevalence = _prevalence(metrics, precision, recall)
    if prevalence is not None:
        ax_pr.axhline(prevalence, color="0.5", ls="--", lw=1, label=f"chance (prevalence {prevalence:.3g})")
    ax_pr.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title="Precision-recall (voxels)")
    ax_pr.set_aspect("equal")
    ax_pr.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return png_data_uri(fig)


def _prevalence(metrics: dict, precision: list, recall: list) -> float | None:
    n_vox, n_pos = metrics.get("n_voxels"), metrics.get("n_positive")
    if is_number(n_vox) and is_number(n_pos) and n_vox > 0:
        return float(n_pos) / float(n_vox)
    # VoxelMetrics.curves() ends where everything is predicted: precision there = prevalence
    if precision and recall and recall[-1] == 1.0:
        return float(precision[-1])
    return None


def _finite_range(a: np.ndarray) -> tuple[float, float] | tuple[None, None]:
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return None, None
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _outline(ax, mask: np.ndarray, colour: str, style: str) -> None:
    mask = np.asarray(mask, dtype=bool)
    if mask.any() and not mask.all():  # contour of a constant array has no level: skip it
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.4, linestyles=style)


def _overlay_png(ov: CaseOverlay) -> str:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    image = np.asarray(ov.image, dtype=np.float32)
    recon = None if ov.reconstruction is None else np.asarray(ov.reconstruction, dtype=np.float32)
    amap = np.asarray(ov.anomaly_map, dtype=np.float32)
    for name, a in (("image", image), ("reconstruction", recon), ("anomaly_map", amap),
                    ("prediction", ov.prediction), ("truth", ov.truth)):
        if a is not None and np.ndim(a) != 2:
            raise ValueError(f"CaseOverlay {ov.case_id!r}: {name} must be 2D, got shape {np.shape(a)}")

    panels = 4 if recon is not None else 3
    fig = Figure(figsize=(2.9 * panels + 0.4, 3.3))
    axes = fig.subplots(1, panels)
    vmin, vmax = _finite_range(image)
    gray = dict(cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    i = 0
    axes[i].imshow(image, **gray)
    axes[i].set_title("input", fontsize=9)
    if recon is not None:
        i += 1
        axes[i].imshow(recon, **gray)  # same intensity range as the input: differences stay visible
        axes[i].set_title("reconstruction", fontsize=9)
    i += 1
    lo, hi = _finite_range(amap)
    im = axes[i].imshow(amap, cmap="inferno", vmin=lo, vmax=hi, interpolation="nearest")
    axes[i].set_title("anomaly map", fontsize=9)
    fig.colorbar(im, ax=axes[i], fraction=0.046, pad=0.03)
    i += 1
    axes[i].imshow(image, **gray)
    # truth drawn last and dashed: where the outlines coincide both stay visible
    _outline(axes[i], ov.prediction, _PRED_COLOUR, "solid")
    _outline(axes[i], ov.truth, _TRUE_COLOUR, "dashed")
    axes[i].set_title("prediction vs truth", fontsize=9)
    axes[i].legend(
        handles=[Line2D([], [], color=_PRED_COLOUR, lw=1.5, ls="-", label="predicted"),
                 Line2D([], [], color=_TRUE_COLOUR, lw=1.5, ls="--", label="true")],
        loc="lower right", fontsize=7, framealpha=0.6,
    )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(mpl_text(f"{ov.case_id} — Dice {fmt(ov.dice)}"), fontsize=10)
    fig.tight_layout()
    return png_data_uri(fig)


def _side_by_side_png(row: SideBySide) -> str:
    """Input with the true outline, then each predictor's map (own colour scale) with it."""
    from matplotlib.figure import Figure

    image = np.asarray(row.image, dtype=np.float32)
    panels = 1 + len(row.maps)
    fig = Figure(figsize=(2.4 * panels, 2.8))
    axes = np.atleast_1d(fig.subplots(1, panels))
    vmin, vmax = _finite_range(image)
    axes[0].imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    axes[0].set_title("input", fontsize=9)
    for ax, (name, amap) in zip(axes[1:], row.maps.items()):
        lo, hi = _finite_range(np.asarray(amap, dtype=np.float32))
        ax.imshow(amap, cmap="inferno", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(mpl_text(name), fontsize=9)
    for ax in axes:
        _outline(ax, row.truth, _TRUE_COLOUR, "dashed")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(mpl_text(f"{row.case_id} (true outline dashed)"), fontsize=10)
    fig.tight_layout()
    return png_data_uri(fig)


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.key, th.key { text-align: left; }
figure { margin: 0.8em 0; } figcaption { font-size: 0.9em; color: #444; }
img { max-width: 100%; height: auto; }
.note { color: #666; font-size: 0.85em; } .warn { color: #a40; }
"""


def _scalar_items(metrics: dict, nested: bool = True) -> list[tuple[str, Any]]:
    """The scalar entries of `metrics`; with `nested`, those of its dict entries too, one level down
    ("postprocess_fitted.peak_threshold_": the fitted state of the threshold rule, the predictor's
    parameters)."""
    out = []
    for k, v in metrics.items():
        if isinstance(v, np.ndarray) and v.ndim == 0:
            v = v.item()
        elif isinstance(v, np.generic):
            v = v.item()
        if v is None or isinstance(v, (numbers.Number, str, bool)):
            out.append((str(k), v))
        elif nested and isinstance(v, dict):
            out += [(f"{k}.{sub}", w) for sub, w in _scalar_items(v, nested=False)]
    return out


def _summary_html(metrics: dict) -> str:
    shown = {key: value for key, value in metrics.items() if key != "baseline"}  # the baseline has its own table
    rows = "".join(f'<tr><td class="key">{escape_html(k)}</td><td>{escape_html(fmt(v))}</td></tr>'
                   for k, v in _scalar_items(shown))
    parts = [f'<table><tr><th class="key">metric</th><th>value</th></tr>{rows}</table>']
    warnings = metrics.get("warnings")
    if isinstance(warnings, (list, tuple)) and warnings:
        items = "".join(f"<li>{escape_html(w)}</li>" for w in warnings)
        parts.append(f'<ul class="warn">{items}</ul>')
    return "\n".join(parts)


def _per_case_html(per_case: list[dict]) -> str:
    """A table with one column per key (sortable by clicking a column head)."""
    if not per_case:
        return '<p class="note">no cases</p>'
    columns: list[str] = []
    for row in per_case:
        for k in row:
            if k not in columns:
                columns.append(k)
    head = "".join(f'<th class="key">{escape_html(c)}</th>' if c == "case_id" else f"<th>{escape_html(c)}</th>"
                   for c in columns)
    body = []
    for row in per_case:
        cells = []
        for c in columns:
            v = row.get(c)
            if isinstance(v, np.generic):
                v = v.item()
            cls = ' class="key"' if c == "case_id" or isinstance(v, str) else ""
            cells.append(f"<td{cls}>{escape_html(fmt(v))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class=\"sortable\"><tr>{head}</tr>{''.join(body)}</table>"


CLINICAL_ROWS = [  # (label, mean key, std key) of lesion_metrics.LesionMetrics
    ("per-volume Dice", "per_volume_dice_mean", "per_volume_dice_std"),
    ("per-volume AUPRC", "per_volume_auprc_mean", "per_volume_auprc_std"),
    ("lesion recall", "lesion_recall", None), ("lesion precision", "lesion_precision", None),
    ("lesion F1", "lesion_f1", None), ("false-positive lesions per case", "false_positive_lesions_per_case", None),
    ("absolute volume difference (ml)", "abs_volume_difference_ml_mean", "abs_volume_difference_ml_std"),
    ("absolute volume difference (%)", "abs_volume_difference_percent_mean", None),
    ("FROC score (mean sensitivity at 1/8-8 false positives per case)", "froc_score", None),
]


def _clinical_html(metrics: dict, baseline: dict | None) -> str:
    """Per-volume (mean +- std) and lesion-wise metrics; the baseline's beside when given."""
    def cell(m, mean, std):
        text = fmt(m.get(mean))
        if std and m.get(std) is not None:
            text += f" &plusmn; {escape_html(fmt(m.get(std)))}"
        return f"<td>{text}</td>"

    columns = [(str(metrics.get("predictor", "model")), metrics)]
    if baseline:
        columns.insert(0, (f"{baseline.get('predictor', 'intensity')} (baseline)", baseline))
    head = "".join(f"<th>{escape_html(name)}</th>" for name, _ in columns)
    body = "".join(f'<tr><td class="key">{escape_html(label)}</td>' + "".join(cell(m, mean, std) for _, m in columns)
                   + "</tr>" for label, mean, std in CLINICAL_ROWS)
    n_cases = escape_html(fmt(metrics.get("per_volume_n_cases")))
    note = (f'<p class="note">Per-volume means over the {n_cases} cases with lesions; '
            "a true lesion is detected when a predicted component overlaps it; "
            f"{escape_html(fmt(metrics.get('n_true_lesions')))} true and "
            f"{escape_html(fmt(metrics.get('n_predicted_lesions')))} predicted lesions.</p>")
    return f'<table><tr><th class="key">metric</th>{head}</tr>{body}</table>{note}'


def _versus_baseline_html(metrics: dict, baseline: dict, keys: list[str]) -> str:
    """The predictor against the baseline: one row each, the baseline first."""
    head = "".join(f"<th>{escape_html(k)}</th>" for k in keys)
    rows = [(f"{baseline.get('predictor', 'intensity')} (baseline)", baseline),
            (str(metrics.get("predictor", "model")), metrics)]
    body = "".join(f'<tr><td class="key">{escape_html(name)}</td>'
                   + "".join(f"<td>{escape_html(fmt(m.get(k)))}</td>" for k in keys) + "</tr>" for name, m in rows)
    return f'<table><tr><th class="key">method</th>{head}</tr>{body}</table>'


def _qa_calibration_html(per_case: list[dict]) -> list[str]:
    """With `--qa`: the QA model's predicted Dice of each case against its true Dice."""
    rows = [r for r in per_case if all(is_number(r.get(k)) and math.isfinite(r[k]) for k in ("dice", "predicted_dice"))]
    if not rows:
        return []
    import matplotlib.pyplot as plt

    from anomaseg.quality.calibration import calibration_figure

    fig = calibration_figure([r["dice"] for r in rows], {"QA": [r["predicted_dice"] for r in rows]})
    uri = png_data_uri(fig)
    plt.close(fig)
    return ["<h2>Quality assessment: predicted against true Dice</h2>", img_html(uri, "predicted against true Dice"),
            '<p class="note">Each case\'s Dice as the QA model (<code>--qa</code>) predicted it without the ground '
            "truth, against its true Dice; on the dashed line the prediction is exact.</p>"]


def write_report(
    path,
    metrics: dict,
    curves: dict,
    per_case: list[dict],
    overlays: list[CaseOverlay],
    title: str = "anomaseg evaluation",
    baseline: tuple[dict, dict] | None = None,
    compare_keys: list[str] | None = None,
    viewers: list | None = None,
    per_lesion: list[dict] | None = None,
    froc: tuple[dict, dict | None] | None = None,
) -> None:
    """Write one self-contained HTML report to ``path`` (atomically).

    ``metrics``: scalar entries are tabulated (NaN shown as "n/a"; a "warnings" list is shown below
    the table); ``curves``: as returned by ``VoxelMetrics.curves()`` (empty lists -> no plot);
    ``per_case``: dicts with at least "case_id" and "dice", every key becomes a column;
    ``overlays``: one row of panels per :class:`CaseOverlay` (may be empty); ``baseline``: the
    (metrics, curves) of the intensity baseline on the same cases, shown as the first row of a
    comparison table (columns ``compare_keys``) and the first curve of each plot; ``viewers``:
    :class:`report_viewer.CaseSlices` to browse slice by slice; ``per_lesion``: the lesion table;
    ``froc``: (curve, the baseline's curve or None) as ``lesion_sweep.FrocTally.curve()`` gives them.
    With lesion metrics in ``metrics`` (``lesion_metrics``), a clinical section and the
    size-stratified recall plot are added.
    """
    metrics = dict(metrics or {})
    curves = dict(curves or {})
    per_case = list(per_case or [])
    overlays = list(overlays or [])

    curves_uri = _curves_png(metrics, curves, baseline)
    sections = []
    if baseline is not None:
        sections += ["<h2>Against the intensity baseline</h2>",
                     _versus_baseline_html(metrics, baseline[0], compare_keys or ["pixel_auroc", "pixel_auprc", "dice_best"])]
    sections += [
        "<h2>Summary</h2>",
        _summary_html(metrics),
        "<h2>Curves</h2>",
        img_html(curves_uri, "ROC and precision-recall curves") if curves_uri
        else '<p class="note">no curves (both classes are needed)</p>',
    ]
    if "lesion_recall" in metrics:
        size_uri = report_viewer.size_recall_png(metrics, baseline[0] if baseline else None)
        sections += ["<h2>Clinical metrics</h2>", _clinical_html(metrics, baseline[0] if baseline else None)]
        if size_uri:
            sections.append(img_html(size_uri, "lesion recall by lesion size"))
    froc_uri = report_viewer.froc_png(metrics, froc[0], baseline[0] if baseline else None, froc[1]) if froc else None
    if froc_uri:
        sections += ["<h2>FROC</h2>", img_html(froc_uri, "FROC curve"),
                     '<p class="note">Lesion sensitivity against false-positive lesions per case over the '
                     "threshold sweep (components and hits as in the clinical metrics, small components removed "
                     "as in the segmentation; a case's false-positive count is its running maximum from the "
                     "highest threshold down). FROC score: the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 "
                     "false positives per case. A dot: the segmentation itself, at the calibrated threshold under its "
                     "rule (the hysteresis rule's peak test can put it off the curve).</p>"]
    if viewers:
        sections += [f"<h2>Slice viewer ({len(viewers)} cases)</h2>", report_viewer.viewers_html(viewers)]
    sections += _qa_calibration_html(per_case)
    sections += [
        f"<h2>Per case ({len(per_case)})</h2>",
        _per_case_html(per_case),
    ]
    if per_lesion is not None:
        sections += [f"<h2>Per lesion ({len(per_lesion)})</h2>", _per_case_html(per_lesion)]
    sections += [
        f"<h2>Overlays ({len(overlays)})</h2>",
    ]
    if overlays:
        sections.append(
            '<p class="note">Prediction outline in red (solid), ground truth in green (dashed).</p>'
        )
        for ov in overlays:
            caption = f"{ov.case_id} — Dice {fmt(ov.dice)}"
            sections.append(
                f"<figure>{img_html(_overlay_png(ov), caption)}<figcaption>{escape_html(caption)}</figcaption></figure>"
            )
    else:
        sections.append('<p class="note">no overlays</p>')

    created = generation_time()
    doc = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape_html(title)}</title>\n<style>{_CSS}{report_viewer.css()}</style>\n</head>\n<body>\n"
        f"<h1>{escape_html(title)}</h1>\n"
        f'<p class="note">generated {escape_html(created)} by anomaseg</p>\n'
        + "\n".join(sections)
        + "\n" + report_viewer.script_html()
        + "\n</body>\n</html>\n"
    )
    # pure ASCII (non-ASCII as character references): independent of the locale's file encoding
    write_text(Path(path), doc.encode("ascii", "xmlcharrefreplace").decode("ascii"))


def write_comparison_report(path, summary: dict, rows: list[SideBySide], keys: list[str],
                            title: str = "anomaseg: predictor comparison", baseline: str | None = None) -> None:
    """One self-contained HTML file comparing predictors: ``summary`` {predictor: metrics} as a
    table (``keys`` as columns; each predictor links to its own report in ``<predictor>/report.html``;
    the predictor named ``baseline`` is marked as such) and, per case in ``rows``, the maps of every
    predictor side by side. Written atomically."""
    head = "".join(f"<th>{escape_html(k)}</th>" for k in keys)
    body = "".join(
        f'<tr><td class="key"><a href="{escape_html(name)}/report.html">{escape_html(name)}</a>'
        + (" (baseline)" if name == baseline else "") + "</td>"
        + "".join(f"<td>{escape_html(fmt(m.get(k)))}</td>" for k in keys) + "</tr>"
        for name, m in summary.items()
    )
    sections = [f'<h2>Metrics</h2><table><tr><th class="key">predictor</th>{head}</tr>{body}</table>',
                f"<h2>Maps side by side ({len(rows)} case(s) with the largest lesions)</h2>"]
    sections += [f"<figure>{img_html(_side_by_side_png(r), r.case_id)}</figure>" for r in rows] or \
        ['<p class="note">no cases</p>']
    created = generation_time()
    doc = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
           f"<title>{escape_html(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
           f"<h1>{escape_html(title)}</h1>\n"
           f'<p class="note">generated {escape_html(created)} by anomaseg</p>\n' + "\n".join(sections)
           + "\n</body>\n</html>\n")
    write_text(Path(path), doc.encode("ascii", "xmlcharrefreplace").decode("ascii"))
