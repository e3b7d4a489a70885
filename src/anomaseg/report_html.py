"""What every part of the HTML report shares: escaping, number formatting, figures as PNG data URIs,
the time a report says it was written. (`report` writes the pages, `report_viewer` the slice viewer,
sortable tables and lesion plots; both build on this.)
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from datetime import datetime, timezone
from typing import Any

import numpy as np

DPI = 72  # modest: a 4-panel overlay row is ~30-60 kB


def generation_time() -> str:
    """When a report says it was written: now, or SOURCE_DATE_EPOCH (the reproducible-builds
    convention) where set, so that two reports of the same results compare byte for byte."""
    import os

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def escape_html(x: Any) -> str:
    return html.escape(str(x), quote=True)


def is_number(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def fmt(x: Any) -> str:
    """Numbers: ints as ints, floats to 3 decimals (scientific when tiny or huge), NaN -> n/a."""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, numbers.Integral):
        return str(int(x))
    if isinstance(x, numbers.Real):
        v = float(x)
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0.0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.3f}"
    if x is None:
        return "n/a"
    return str(x)


def mpl_text(s: str) -> str:
    """Text for matplotlib: escape '$' so case ids never switch on mathtext."""
    return str(s).replace("$", r"\$")


def png_data_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI, at the report's resolution."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_html(data_uri: str, alt: str) -> str:
    return f'<img alt="{escape_html(alt)}" src="{data_uri}">'
