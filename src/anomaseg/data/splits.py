"""Which healthy cases train and which are held out (validation, checkpoint choice, calibration)."""

from __future__ import annotations

import random

from anomaseg.data.bids import subject_of


def split_cases(case_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole subjects (never slices of a training case, never one session of a subject
    whose other sessions train) for validation and calibration."""
    ids = sorted(case_ids)
    subjects: dict[str, list[str]] = {}
    for cid in ids:
        subjects.setdefault(subject_of(cid), []).append(cid)
    if len(subjects) < 2 or val_fraction <= 0:
        return ids, []
    shuffled = sorted(subjects)
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(shuffled) - 1, max(1, round(val_fraction * len(shuffled))))
    val = [cid for subject in shuffled[:n_val] for cid in subjects[subject]]
    return sorted(set(ids) - set(val)), sorted(val)
