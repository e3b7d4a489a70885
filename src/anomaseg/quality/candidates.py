"""Candidate segmentations on disk: folders of any segmenter's output, matched to cases by id.

A folder holds NIfTI (or PNG) files, flat or in one level of case sub-folders. A file belongs to
case `<case>` when its name (without .nii / .nii.gz / .png) is `<case>` or `<case>_<suffix>` /
`<case>-<suffix>` with a segmentation suffix (`segmentation` as `anomaseg score` writes it, `seg`,
`pred`, `prediction`, `label`, `labels`, `mask` is NOT one: that is a brain mask). Other files of a
known case (`<case>_anomaly_map`, `<case>_flair`, ...) are not segmentations and are skipped; a file
that names no case of the dataset is an error, as are two segmentations of one case in one folder
and a folder without any. Voxels > 0 are the segmented region; a segmentation must lie on its
case's image grid (shape and affine), else the error names the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaseg.data.io import Volume, check_same_grid, is_nifti, is_png, load_volume, nifti_stem
from anomaseg.errors import InputError

SEGMENTATION_SUFFIXES = ("segmentation", "seg", "pred", "prediction", "label", "labels")


@dataclass(frozen=True)
class Candidate:
    """One candidate segmentation of a case: a file, or an array already on the case's RAS+ grid."""

    case_id: str
    source: str  # where it comes from: a folder name, or "perturbation:<kind>"
    path: Path | None = None
    array: np.ndarray | None = None  # bool (X, Y, Z) RAS+; used instead of `path` when given

    def load(self, reference: Volume) -> np.ndarray:
        """The segmentation as a bool RAS+ array; it must lie on the grid of `reference` (the case's
        image, header only), else the error names the segmentation file."""
        if self.array is not None:
            seg = np.asarray(self.array, bool)
            if seg.shape != reference.shape:
                raise InputError(reference.path, f"candidate {self.source!r} of case {self.case_id!r} has shape "
                                                 f"{seg.shape}, the image {reference.shape}")
            return seg
        seg = load_volume(self.path, kind="segmentation")
        check_same_grid(reference, seg, "segmentation")
        return seg.data > 0


def check_candidates(candidates: list[Candidate], cases: dict, modality: str) -> None:
    """Check every file candidate against the grid of its case's `modality` image (`cases`: case id
    -> Case) from the headers alone, so a wrong file stops the work before it starts."""
    for cand in candidates:
        if cand.path is not None:
            ref = load_volume(cases[cand.case_id].image(modality).path, header_only=True)
            check_same_grid(ref, load_volume(cand.path, kind="segmentation", header_only=True), "segmentation")


def _case_of(stem: str, longest_first: list[str]) -> tuple[str | None, str | None]:
    """(case id, suffix) of a file stem: the first (longest) case id that the stem is, or starts with
    plus a separator; (None, None) when no case matches. `longest_first`: case ids sorted by length,
    longest first."""
    for cid in longest_first:
        if stem == cid:
            return cid, ""
        if stem.startswith(cid) and len(stem) > len(cid) + 1 and stem[len(cid)] in "_-":
            return cid, stem[len(cid) + 1:].lower()
    return None, None


def find_candidates(folder: str | Path, case_ids: list[str]) -> dict[str, Candidate]:
    """The segmentation of each case found in `folder` (case id -> Candidate)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "segmentation folder not found" if not folder.exists() else "not a folder")
    files = [f for f in folder.iterdir() if f.is_file()]
    files += [f for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") for f in d.iterdir() if f.is_file()]
    files = sorted(f for f in files if (is_nifti(f) or is_png(f)) and not f.name.startswith("."))
    found: dict[str, Candidate] = {}
    longest_first = sorted(case_ids, key=len, reverse=True)
    for f in files:
        cid, suffix = _case_of(nifti_stem(f), longest_first)
        if cid is None:
            examples = ", ".join(sorted(case_ids)[:3])
            raise InputError(f, f"file name matches no case id of the dataset (expected <case>.nii.gz or "
                                f"<case>_segmentation.nii.gz with a case id such as {examples})")
        if suffix and suffix not in SEGMENTATION_SUFFIXES:
            continue  # another file of a known case (anomaly map, image, brain mask)
        if cid in found:
            raise InputError(f, f"second segmentation of case {cid!r} in this folder (also {found[cid].path.name})")
        found[cid] = Candidate(cid, folder.name, path=f)
    if not found:
        raise InputError(folder, "no segmentation files in this folder (expected <case>.nii.gz or "
                                 f"<case>_{{{','.join(SEGMENTATION_SUFFIXES)}}}.nii.gz)")
    return found
