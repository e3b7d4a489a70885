"""The BIDS-Apps command line (`anomaseg bids BIDS_DIR OUTPUT_DIR participant|group`, as fMRIPrep and
MRIQC take it), so that pipelines and schedulers that run BIDS Apps run anomaseg unchanged.

participant: the named participants (`--participant_label`, default every one; `--session_label`)
are scored with a run (`scoring.score_dataset` on BIDS input) into OUTPUT_DIR, a BIDS-derivatives
dataset (`data.bids`). Participant-level jobs of one dataset may run at the same time, one per
participant, into one OUTPUT_DIR (how BIDS Apps are parallelised): each scores into its own hidden
work folder beside OUTPUT_DIR, then moves each case's `anat/` folder into place by rename, replacing
that case's earlier outputs and nothing else.

group: OUTPUT_DIR/group/cohort.tsv (per case of the participant level: anomalous voxels and volume,
from its mask) and, on the cases with lesion labels, the evaluation in OUTPUT_DIR/group/evaluation
(`evaluation.evaluate_dataset`: metrics.json and the cohort's HTML report, the intensity baseline
beside). The group folder is listed in `.bidsignore`.

Exit codes follow the BIDS-Apps convention (0 on success, non-zero on failure): 2 for bad input or
arguments (one line naming the file), 1 for anything else.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from anomaseg.atomic import write_text
from anomaseg.data import bids as bids_io
from anomaseg.errors import InputError

GROUP = "group"  # OUTPUT_DIR/group: the group level's outputs (not BIDS files)
IGNORED = ("scores.json", f"{GROUP}/")


def _check_dirs(bids_dir: Path, output_dir: Path, query: bids_io.BidsQuery) -> None:
    """The arguments, before any run is loaded: a BIDS dataset, another output folder, and labels
    that name participants and sessions it has."""
    if not bids_io.is_bids_root(bids_dir):
        raise InputError(bids_dir, "not a BIDS dataset (no dataset_description.json and no sub-*/anat folders)")
    if output_dir.resolve() == bids_dir.resolve():
        raise InputError(output_dir, "OUTPUT_DIR must not be BIDS_DIR (e.g. BIDS_DIR/derivatives/anomaseg)")
    bids_io.find_bids_cases(bids_dir, query)


def run_participant(bids_dir, output_dir, run_dir, query: bids_io.BidsQuery, predictor: str | None = None,
                    workers: int = 1) -> list[dict]:
    """Score the query's cases into the derivatives dataset `output_dir`; returns score's rows."""
    from anomaseg.scoring import score_dataset

    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    _check_dirs(bids_dir, output_dir, query)
    output_dir.mkdir(parents=True, exist_ok=True)
    # hidden (derivatives/.name.* is never read as a pipeline) and on the same file system: renames
    work = output_dir.parent / f".{output_dir.name}.participant-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        rows = score_dataset(run_dir, bids_dir, work / "out", predictor=predictor, workers=workers, bids=query)
        for row in rows:
            _replace(bids_io.output_folder(work / "out", row["case_id"]),
                     bids_io.output_folder(output_dir, row["case_id"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bids_io.write_description(output_dir, bids_dir, "anomaly maps and segmentations", ignored=IGNORED)
    return rows


def _replace(new: Path, dst: Path) -> None:
    """Put folder `new` at `dst` by rename; an existing `dst` is moved aside first and removed after."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        dst.rename(old)
    new.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def cohort_rows(output_dir: Path, query: bids_io.BidsQuery) -> list[dict]:
    """One row per case with a participant-level mask in `output_dir` (within the query's labels)."""
    import numpy as np

    from anomaseg.data.io import load_volume

    participants = {p.removeprefix("sub-") for p in query.participants}
    sessions = {s.removeprefix("ses-") for s in query.sessions}
    rows = []
    for mask in sorted(output_dir.glob("sub-*/**/anat/*_desc-anomaly_mask.nii.gz")):
        parsed = bids_io.parse_name(mask)
        if parsed is None:
            continue
        entities = parsed[0]
        if (participants and entities["sub"] not in participants) or (sessions and entities.get("ses") not in sessions):
            continue
        volume = load_volume(mask, kind="mask")
        voxels = int(np.count_nonzero(volume.data))
        rows.append({"participant_id": f"sub-{entities['sub']}", "session_id": f"ses-{entities['ses']}"
                     if "ses" in entities else "n/a", "anomalous_voxels": voxels,
                     "anomalous_volume_ml": round(voxels * float(np.prod(volume.spacing)) / 1000.0, 4)})
    return rows


def run_group(bids_dir, output_dir, run_dir, query: bids_io.BidsQuery, predictor: str | None = None,
              workers: int = 1) -> dict | None:
    """The cohort table, and the evaluation on the cases with lesion labels (None without any)."""
    from anomaseg.evaluation import evaluate_dataset

    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    _check_dirs(bids_dir, output_dir, query)
    rows = cohort_rows(output_dir, query)
    if not rows:
        raise InputError(output_dir, "no participant-level outputs (*_desc-anomaly_mask.nii.gz) for these "
                                     "participants: run the participant level first")
    columns = list(rows[0])
    write_text(output_dir / GROUP / "cohort.tsv",
               "\t".join(columns) + "\n" + "".join("\t".join(str(r[c]) for c in columns) + "\n" for r in rows))
    if not any(case.seg is not None for case in bids_io.find_bids_cases(bids_dir, query)):
        return None  # no lesion labels among these participants: the cohort table is the group output
    labelled = bids_io.BidsQuery(query.derivatives, query.select, query.participants, query.sessions, labelled=True)
    return evaluate_dataset(run_dir, bids_dir, output_dir / GROUP / "evaluation", predictors=predictor,
                            workers=workers, bids=labelled)
