"""Recalibration of REG-Net's predicted Dice, fitted on the validation subjects' candidate pool.

REG-Net's volume Dice comes out biased (low on the phantom: mean predicted 0.36-0.43 where the
true mean is 0.50) although its per-slice count loss is unbiased: the error sits in how counts add
up to a ratio. `DiceCalibration` is a monotone map from predicted to true Dice, fitted on the
validation subjects of `fit_quality` (never used for REG-Net's weights, only to pick its best
epoch) and stored in QA/calibration.json; `QualityAssessor.predict` applies it.

- ``isotonic``: isotonic regression of the true Dice on the predicted one
  (`scipy.optimize.isotonic_regression`, pool-adjacent violators). Its fitted steps become knots
  at each block's mean prediction, joined linearly (`numpy.interp`): the map rises strictly
  between blocks, so it keeps most of the ranking where a step function would tie whole ranges,
  and it stays flat beyond the first and last knot.
- ``linear``: least-squares line (stored as its values at 0 and 1), clipped to [0, 1].
- ``none`` (`QualityConfig`'s default: opt-in, see benchmarks/README.md): the identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomaseg.atomic import write_text
from anomaseg.errors import InputError

METHODS = ("isotonic", "linear", "none")
CALIBRATION_FILE = "calibration.json"
MIN_POINTS = 4  # fewer validation candidates than this: no recalibration (identity)


@dataclass
class DiceCalibration:
    """A monotone map predicted Dice -> calibrated Dice: piecewise linear through `knots`."""

    method: str = "none"
    x: list = field(default_factory=list)
    y: list = field(default_factory=list)
    n: int = 0  # validation candidates it was fitted on

    @classmethod
    def fit(cls, predicted, true, method: str = "isotonic") -> "DiceCalibration":
        if method not in METHODS:
            raise ValueError(f"calibration must be one of {', '.join(METHODS)}, got {method!r}")
        p, t = np.asarray(predicted, float), np.asarray(true, float)
        if method == "none" or len(p) < MIN_POINTS or np.ptp(p) == 0:
            return cls("none", n=len(p))
        if method == "linear":
            slope, intercept = np.polyfit(p, t, 1)
            slope = max(float(slope), 0.0)  # monotone: a falling fit means no usable signal
            return cls("linear", [0.0, 1.0], [float(intercept), float(slope + intercept)], len(p))  # clipped when applied
        from scipy.optimize import isotonic_regression

        order = np.argsort(p, kind="stable")
        res = isotonic_regression(t[order], increasing=True)
        starts = res.blocks[:-1]
        xs = [float(p[order][a:b].mean()) for a, b in zip(starts, res.blocks[1:])]
        ys = [float(res.x[a]) for a in starts]
        return cls("isotonic", xs, np.clip(ys, 0, 1).tolist(), len(p))

    def __call__(self, predicted):
        p = np.asarray(predicted, float)
        if self.method == "none" or not self.x:
            return p
        if self.method == "linear":
            slope = (self.y[1] - self.y[0]) / (self.x[1] - self.x[0])
            return np.clip(self.y[0] + slope * (p - self.x[0]), 0, 1)
        return np.interp(p, self.x, self.y)

    def to_dict(self) -> dict:
        return {"method": self.method, "x": list(self.x), "y": list(self.y), "n": self.n}


def save_calibrations(folder: str | Path, calibrations: dict[str, DiceCalibration], fitted_on: dict) -> Path:
    path = Path(folder) / CALIBRATION_FILE
    write_text(path, json.dumps({"variants": {v: c.to_dict() for v, c in calibrations.items()},
                                 "fitted_on": fitted_on}, indent=1))
    return path


def load_calibrations(folder: str | Path) -> dict[str, DiceCalibration]:
    """Each variant's recalibration from QA/calibration.json ({} when the folder has none: a QA
    model fitted before recalibration existed, predicted uncalibrated)."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.exists():
        return {}
    try:
        return {v: DiceCalibration(**c) for v, c in json.loads(path.read_text())["variants"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a valid QA recalibration ({exc})") from None


def calibration_figure(true, predicted: dict, title: str = "predicted against true Dice"):
    """A matplotlib figure: each entry of `predicted` (label -> predictions of the same
    segmentations as `true`) against the true Dice, with the diagonal and each one's MAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(true, float)
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    for (label, p), marker in zip(predicted.items(), "o^sv"):
        p = np.asarray(p, float)
        ax.scatter(t, p, s=14, marker=marker, alpha=0.7, label=f"{label} (MAE {np.abs(p - t).mean():.3f})")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="true Dice", ylabel="predicted Dice", title=title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
