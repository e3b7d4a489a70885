"""Writing a phantom dataset: BraTS-style case folders and ``phantom.json`` (see the package docstring)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from anomaseg.atomic import atomic_path, write_text
from anomaseg.data.phantom.contrasts import (LABELS, LESION_INTENSITY, MODALITIES, REALISTIC_LESION_INTENSITY,
                                             TISSUE_INTENSITY, check_modalities)
from anomaseg.data.phantom.ms_load import check_lesion_load
from anomaseg.data.phantom.realism import realism_features
from anomaseg.data.phantom.subject import PhantomSubject, make_subject
from anomaseg.data.phantom.template import load_template

PHANTOM_VERSION = 1
_CASE_RE = re.compile(r"^(healthy|lesioned)_\d{3,}$")


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    # code 1 (scanner anatomical), not MNI: each subject is deformed away from MNI152 space
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _remove_stale(split_dir: Path, keep: set[str]) -> None:
    """Remove phantom-named case folders of an earlier run that this run does not write."""
    if not split_dir.is_dir():
        return
    for entry in sorted(split_dir.iterdir()):
        if entry.is_dir() and _CASE_RE.match(entry.name) and entry.name not in keep:
            shutil.rmtree(entry)


def _case_files(subject: PhantomSubject, case_dir: Path) -> list[tuple[np.ndarray, Path]]:
    case = case_dir.name
    files = [(data, case_dir / f"{case}_{mod}.nii.gz") for mod, data in subject.images.items()]
    files.append((subject.mask, case_dir / f"{case}_mask.nii.gz"))
    if subject.seg is not None:
        files.append((subject.seg, case_dir / f"{case}_seg.nii.gz"))
    return files


def _remove_stale_files(case_dir: Path, written: set[str]) -> None:
    for old in case_dir.glob(f"{case_dir.name}_*.nii*"):  # e.g. a modality an earlier run wrote
        if old.name not in written:
            old.unlink()


def make_phantom(out_dir, n_healthy: int, n_lesioned: int, seed: int = 0, resolution: int = 2,
                 modalities=MODALITIES, progress: bool = False, realism=False, lesion_load: str = "default") -> dict:
    """Write a phantom dataset; return {"train": [case dirs], "test": [case dirs]} (pathlib.Path).

    `n_healthy` healthy subjects go to ``out_dir/train`` (no seg), `n_lesioned` lesioned subjects to
    ``out_dir/test`` (with ``<case>_seg.nii.gz``, labels per `LABELS`). `resolution` is the
    MNI152 voxel size in mm (2: 99x117x95, 1: 197x233x189). The same seed gives the same arrays;
    an existing phantom in `out_dir` is overwritten and phantom cases it no longer contains removed.
    `realism`: False (default: the phantom of PHANTOM_VERSION, unchanged), True (every feature of
    `REALISM`) or some of their names; see the package docstring. `lesion_load`: "default" or "ms"
    (realistic MS lesion loads in every lesioned subject, see `ms_load`).
    """
    n_healthy, n_lesioned, seed, resolution = int(n_healthy), int(n_lesioned), int(seed), int(resolution)
    if n_healthy < 0 or n_lesioned < 0:
        raise ValueError(f"subject counts must be >= 0, got n_healthy={n_healthy}, n_lesioned={n_lesioned}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of mm, got {resolution}")
    modalities = check_modalities(modalities)
    features = realism_features(realism)
    lesion_load = check_lesion_load(lesion_load)
    out_dir = Path(out_dir)
    jobs = [("train", f"healthy_{i:03d}", i, False) for i in range(n_healthy)]
    jobs += [("test", f"lesioned_{i:03d}", i, True) for i in range(n_lesioned)]
    _remove_stale(out_dir / "train", {c for s, c, _, _ in jobs if s == "train"})
    _remove_stale(out_dir / "test", {c for s, c, _, _ in jobs if s == "test"})

    result: dict[str, list[Path]] = {"train": [], "test": []}
    cases: dict[str, dict] = {}
    # gzip dominates the run time; it releases the GIL, so one subject's files are compressed in
    # worker threads while the next subject is synthesised (at most two subjects in memory).
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: list = []
        for k, (split, case, index, lesioned) in enumerate(jobs):
            if progress:
                print(f"phantom: {case} ({k + 1}/{len(jobs)})", file=sys.stderr, flush=True)
            subject = make_subject(index, lesioned, seed=seed, resolution=resolution, modalities=modalities,
                                   realism=features, lesion_load=lesion_load)
            for f in pending:
                f.result()  # re-raises a failed write
            case_dir = out_dir / split / case
            case_dir.mkdir(parents=True, exist_ok=True)
            files = _case_files(subject, case_dir)
            _remove_stale_files(case_dir, {p.name for _, p in files})
            pending = [pool.submit(_save, data, subject.affine, path) for data, path in files]
            result[split].append(case_dir)
            cases[case] = {"split": split, **subject.info}
        for f in pending:
            f.result()

    tpl = load_template(resolution)
    meta = {
        "generator": "anomaseg.data.phantom",
        "version": PHANTOM_VERSION,
        "seed": seed,
        "resolution": resolution,
        "shape": list(tpl.brain.shape),
        "n_healthy": n_healthy,
        "n_lesioned": n_lesioned,
        "modalities": list(modalities),
        "labels": {str(k): v for k, v in LABELS.items()},
        "intensities": {
            "tissue_csf_gm_wm": {m: list(v) for m, v in TISSUE_INTENSITY.items()},
            "lesion": {m: {LABELS[k]: v for k, v in d.items()} for m, d in LESION_INTENSITY.items()},
        },
        "cases": cases,
    }
    if lesion_load != "default":
        meta["lesion_load"] = lesion_load
    if features:
        meta["realism"] = list(features)
        meta["intensities"]["realistic_lesion"] = {
            m: {LABELS[k]: v for k, v in d.items()} for m, d in REALISTIC_LESION_INTENSITY.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "phantom.json", json.dumps(meta, indent=2) + "\n")
    return result
