"""How much of a slice-level AUROC the brain's area alone explains.

Scores each axial slice of a labelled test set by its brain area (voxels of the brain mask) and
reports the slice AUROC of that score against "the slice holds a label voxel", over the slices
`anomaseg evaluate` scores (those holding brain, RAS+). A whole-image anomaly score that grows
with the amount of tissue in the slice gets this much for free.

    python benchmarks/slice_area_baseline.py --data benchmarks/results/work/phantom/test --modality flair
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from anomaseg.data.layout import find_cases  # noqa: E402
from anomaseg.data.slices import SliceSpec, load_case_volumes  # noqa: E402
from anomaseg.metrics import binary_auroc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="labelled test set (cases with segmentations)")
    ap.add_argument("--modality", default="flair")
    args = ap.parse_args()
    spec = SliceSpec((args.modality,))
    areas, labels = [], []
    for case in find_cases(args.data, spec.modalities):
        _, brain, truth = load_case_volumes(case, spec)
        area = brain.sum(axis=(0, 1))
        in_brain = area > 0  # the slices `anomaseg evaluate` scores
        areas.append(area[in_brain])
        labels.append(truth.any(axis=(0, 1))[in_brain])
    y = np.concatenate(labels)
    print(f"{len(y)} slices ({int(y.sum())} with lesion): slice AUROC of the brain area alone "
          f"{binary_auroc(np.concatenate(areas).astype(float), y):.3f}")


if __name__ == "__main__":
    main()
