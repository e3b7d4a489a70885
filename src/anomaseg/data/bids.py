"""BIDS datasets in, BIDS derivatives out: a small reader of the conventions anomaseg needs.

In: a BIDS root (it holds `dataset_description.json`, or `sub-*/anat` / `sub-*/ses-*/anat`
folders). A case is a subject, or a subject's session (`sub-01_ses-1`). Its images are the NIfTI
files of its `anat/` folder, named by their suffix: `T1w` -> t1 (`ce-<agent>` entity: t1ce), `T2w` ->
t2, `FLAIR` -> flair, any other suffix lower-cased (`PDw` -> pdw). Brain masks (`*_desc-brain_mask`)
and lesion labels (`*_label-lesion_mask`, `*_label-lesion_roi`, `*_desc-lesion_mask`,
`*_desc-lesion_dseg`; label > 0 = anomalous) are taken from the case's own `anat/` folder (a
derivatives dataset such as `anomaseg preprocess`'s output is itself a BIDS root) and from the
pipelines under `derivatives/`: the ones named by `derivatives` (a folder name under
`derivatives/`, or a path), else every pipeline there except anomaseg's own outputs. Masks and
labels must be in the images' space (`space-` entity; none, `orig`, `native` and `individual` all
mean the scanner's): a brain mask in MNI space does not lie on native images and is ignored. Two candidates for one role (e.g. two pipelines that both provide a
brain mask) are an error that names both, never a silent choice; `--derivatives` picks one.
`select` filters subjects on `participants.tsv` columns (`group=control`; `group=control,hc` for
either value; several conditions must all hold).

Out: `score` / `evaluate --save-maps` on BIDS input write a BIDS-derivatives dataset:
`sub-XX/[ses-YY/]anat/sub-XX_[ses-YY_]desc-anomaly_map.nii.gz` (float32) and
`..._desc-anomaly_mask.nii.gz` (uint8), each with a JSON sidecar (sources, model, predictor,
threshold, run, version), and `dataset_description.json` with `DatasetType: derivative` and
`GeneratedBy`.

Why not pybids: it would bring SQLAlchemy, bids-validator's Python port, formulaic, pandas and a
database layer to index every file of a dataset, for what is here ~200 lines of file-name parsing;
its `BIDSLayout` also indexes (and validates) derivatives with their own descriptions, which is
slow on large datasets and fails on the half-conforming derivatives many labs have. The
conventions we read are stable and small (entities, suffixes, `participants.tsv`), and every
mismatch here can be reported as one line naming the file.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from anomaseg.data.io import is_nifti, nifti_stem
from anomaseg.data.cases import Case, ImageRef
from anomaseg.errors import InputError

PIPELINE = "anomaseg"  # our derivatives folder name, never read back as input
BIDS_VERSION = "1.9.0"
_SUFFIX_MODALITY = {"T1w": "t1", "T2w": "t2", "FLAIR": "flair"}
_NATIVE_SPACES = {None, "orig", "native", "individual"}
_LESION_NAMES = {"lesion", "lesions"}
_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9+.]+)$")
_OUTPUT_ENTITIES = ("sub", "ses", "space", "res", "den")  # kept from the reference image in output names


@dataclass(frozen=True)
class BidsQuery:
    """Which derivatives and which participants to use."""

    derivatives: tuple[str, ...] = ()  # pipeline names under derivatives/ or paths; () = every pipeline
    select: tuple[str, ...] = ()  # "column=value[,value...]" conditions on participants.tsv
    participants: tuple[str, ...] = ()  # participant labels (BIDS-Apps --participant_label); () = all
    sessions: tuple[str, ...] = ()  # session labels (--session_label); () = all
    labelled: bool = False  # only the cases with lesion labels

    def __bool__(self) -> bool:
        return bool(self.derivatives or self.select or self.participants or self.sessions or self.labelled)


def is_bids_root(path: str | Path) -> bool:
    """A folder with `dataset_description.json`, or with `sub-*/anat` or `sub-*/ses-*/anat` folders."""
    root = Path(path)
    if not root.is_dir():
        return False
    if (root / "dataset_description.json").is_file():
        return True
    for sub in root.glob("sub-*"):
        if sub.is_dir() and ((sub / "anat").is_dir() or any(s.is_dir() for s in sub.glob("ses-*/anat"))):
            return True
    return False


def parse_name(path: str | Path) -> tuple[dict, str] | None:
    """`sub-01_ses-1_ce-gad_T1w.nii.gz` -> ({'sub': '01', 'ses': '1', 'ce': 'gad'}, 'T1w'), or None
    if the name is not `<key>-<value>_..._<suffix>`."""
    parts = nifti_stem(path).split("_")
    if len(parts) < 2:
        return None
    entities = {}
    for part in parts[:-1]:
        m = _ENTITY.match(part)
        if not m or m.group(1) in entities:
            return None
        entities[m.group(1)] = m.group(2)
    suffix = parts[-1]
    if "sub" not in entities or not suffix.isalnum():
        return None
    return entities, suffix


def modality_of(entities: dict, suffix: str) -> str:
    if suffix == "T1w" and "ce" in entities:
        return "t1ce"
    return _SUFFIX_MODALITY.get(suffix, suffix.lower())


def role_of(entities: dict, suffix: str) -> str:
    """'brain' (brain mask), 'lesion' (lesion labels), 'image', or 'other' (ignored)."""
    desc, label = entities.get("desc", "").lower(), entities.get("label", "").lower()
    if suffix in ("mask", "roi", "dseg"):
        if label in _LESION_NAMES or desc in _LESION_NAMES:
            return "lesion"
        if suffix == "mask" and desc == "brain" and label in ("", "brain"):
            return "brain"
        return "other"
    if suffix in ("probseg", "xfm", "defacemask", "dwi", "bold", "events", "physio"):
        return "other"
    return "image"


def case_id(entities: dict) -> str:
    return f"sub-{entities['sub']}" + (f"_ses-{entities['ses']}" if "ses" in entities else "")


def subject_of(case: str) -> str:
    """The subject a case belongs to: 'sub-01_ses-2' -> 'sub-01'; any other case id is its own subject."""
    head, _, rest = case.partition("_ses-")
    return head if head.startswith("sub-") and rest else case


def case_entities(case: str) -> dict:
    """'sub-01_ses-1' -> {'sub': '01', 'ses': '1'}."""
    return dict(part.split("-", 1) for part in case.split("_"))


def _anat_files(root: Path, subjects: set[str] | None) -> dict[str, list[Path]]:
    """Case id -> NIfTI files of its anat/ folder(s) under one dataset root."""
    out: dict[str, list[Path]] = {}
    for sub in sorted(root.glob("sub-*")):
        if not sub.is_dir() or (subjects is not None and sub.name[4:] not in subjects):
            continue
        for anat in [sub / "anat"] + sorted(sub.glob("ses-*/anat")):
            if not anat.is_dir():
                continue
            for f in sorted(anat.iterdir()):
                if f.is_file() and is_nifti(f) and not f.name.startswith("."):
                    parsed = parse_name(f)
                    if parsed is None or parsed[0]["sub"] != sub.name[4:]:
                        continue
                    out.setdefault(case_id(parsed[0]), []).append(f)
    return out


def derivative_roots(root: Path, names: tuple[str, ...] = ()) -> list[Path]:
    """The pipeline folders to search for masks and labels."""
    base = root / "derivatives"
    if names:
        roots = []
        for name in names:
            p = Path(name)
            candidate = p if p.is_absolute() or (p.exists() and len(p.parts) > 1) else base / name
            if not candidate.is_dir():
                found = ", ".join(sorted(d.name for d in base.iterdir() if d.is_dir())) if base.is_dir() else "none"
                raise InputError(candidate, f"derivatives pipeline not found (pipelines under {base}: {found})")
            roots.append(candidate)
        return roots
    if not base.is_dir():
        return []
    return sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != PIPELINE)


def selected_subjects(root: Path, select: tuple[str, ...]) -> set[str] | None:
    """Subject labels (without 'sub-') that satisfy every condition, or None without conditions."""
    if not select:
        return None
    table = root / "participants.tsv"
    if not table.is_file():
        raise InputError(table, "--select needs participants.tsv in the BIDS root")
    try:
        with table.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(table, f"cannot read participants table ({exc})") from None
    columns = list(rows[0]) if rows else []
    if "participant_id" not in columns:
        raise InputError(table, f"participants.tsv has no participant_id column (columns: {', '.join(columns)})")
    keep = {(r["participant_id"] or "").strip().removeprefix("sub-") for r in rows}
    for condition in select:
        column, sep, values = condition.partition("=")
        column = column.strip()
        if not sep or not column:
            raise InputError(None, f"--select expects column=value, got {condition!r}")
        if column not in columns:
            raise InputError(table, f"--select {condition!r}: no column {column!r} (columns: {', '.join(columns)})")
        wanted = {v.strip() for v in values.split(",")}
        keep &= {(r["participant_id"] or "").strip().removeprefix("sub-") for r in rows
                 if (r.get(column) or "").strip() in wanted}
    if not keep:
        raise InputError(table, f"no participant matches {' and '.join(select)}")
    return keep


def find_bids_cases(root: str | Path, query: BidsQuery | None = None) -> list[Case]:
    """The cases of a BIDS dataset (see the module docstring)."""
    root = Path(root)
    query = query or BidsQuery()
    subjects = selected_subjects(root, query.select)
    if query.participants:
        named = {label.removeprefix("sub-") for label in query.participants}
        unknown = sorted(n for n in named if not (root / f"sub-{n}").is_dir())
        if unknown:
            raise InputError(root, f"no participant {', '.join(f'sub-{n}' for n in unknown)} in this BIDS dataset")
        subjects = named if subjects is None else subjects & named
    own = _anat_files(root, subjects)
    if query.sessions:
        named = {label.removeprefix("ses-") for label in query.sessions}
        own = {cid: files for cid, files in own.items() if case_entities(cid).get("ses") in named}
    extra: dict[str, list[Path]] = {}
    for d in derivative_roots(root, query.derivatives):
        for cid, files in _anat_files(d, subjects).items():
            extra.setdefault(cid, []).extend(files)
    cases = []
    for cid in sorted(own):
        images: dict[str, list[Path]] = {}
        roles: dict[tuple, list[Path]] = {}
        derived = extra.get(cid, [])
        for f, from_pipeline in [(f, False) for f in own[cid]] + [(f, True) for f in derived]:
            entities, suffix = parse_name(f)
            role = role_of(entities, suffix)
            space = None if entities.get("space") in _NATIVE_SPACES else entities["space"]
            if role == "image" and not from_pipeline:  # a pipeline's images are not the dataset's
                images.setdefault(modality_of(entities, suffix), []).append(f)
                roles.setdefault(("space", space), []).append(f)
            elif role in ("brain", "lesion"):
                roles.setdefault((role, space), []).append(f)
        if not images:
            continue
        for modality, files in images.items():
            _one(files, f"{modality} image", cid)
        spaces = sorted({key[1] or "native" for key in roles if key[0] == "space"})
        if len(spaces) > 1:
            raise InputError(own[cid][0].parent, f"{cid} has images in several spaces ({', '.join(spaces)})")
        space = next(key[1] for key in roles if key[0] == "space")  # masks in another space do not fit
        refs = {m: ImageRef(files[0]) for m, files in images.items()}
        cases.append(Case(cid, refs, _one(roles.get(("lesion", space), []), "lesion label", cid),
                          _one(roles.get(("brain", space), []), "brain mask", cid), own[cid][0].parent))
    if query.labelled:
        cases = [c for c in cases if c.seg is not None]
    if not cases:
        chosen = [*query.select, *(f"sub-{p.removeprefix('sub-')}" for p in query.participants),
                  *(f"ses-{s.removeprefix('ses-')}" for s in query.sessions)]
        where = f" for the selected participants ({', '.join(chosen)})" if chosen else ""
        where += " with lesion labels" if query.labelled else ""
        raise InputError(root, f"BIDS dataset has no anatomical images{where} (expected "
                               "sub-<label>/[ses-<label>/]anat/sub-<label>_[ses-<label>_]<suffix>.nii.gz)")
    return cases


def _one(files: list[Path], what: str, cid: str) -> Path | None:
    if len(files) > 1:
        listing = ", ".join(str(f) for f in files)
        raise InputError(files[0], f"{cid} has {len(files)} candidates for its {what} ({listing}); keep one, "
                                   "or name the pipeline to use with --derivatives")
    return files[0] if files else None


# --------------------------------------------------------------------------- derivatives out
def output_stem(case: str, reference: Path | None = None) -> str:
    """Entities of an output file: sub, ses (and space/res/den of the reference image, if any)."""
    entities = case_entities(case)
    parsed = parse_name(reference) if reference is not None else None
    if parsed and parsed[0].get("sub") == entities.get("sub"):
        entities = {k: v for k, v in parsed[0].items() if k in _OUTPUT_ENTITIES}
    return "_".join(f"{k}-{entities[k]}" for k in _OUTPUT_ENTITIES if k in entities)


def output_folder(out_root: Path, case: str) -> Path:
    e = case_entities(case)
    folder = out_root / f"sub-{e['sub']}"
    if "ses" in e:
        folder = folder / f"ses-{e['ses']}"
    return folder / "anat"


def source_uri(source_root: Path, path: Path) -> str:
    """A BIDS URI of an input file: `bids:raw:<path in the raw dataset>`."""
    try:
        return f"bids:raw:{Path(path).resolve().relative_to(Path(source_root).resolve()).as_posix()}"
    except ValueError:
        return Path(path).resolve().as_uri()


def write_description(out_root: Path, source_root: Path, description: str, extra: dict | None = None,
                      ignored: tuple[str, ...] = ("scores.json",)) -> None:
    """`dataset_description.json` of a derivatives dataset written by anomaseg."""
    from anomaseg import __version__
    from anomaseg.atomic import write_text

    source = Path(source_root).resolve()
    # inside the raw dataset's derivatives/ folder the link stays valid when the dataset moves
    link = "../.." if Path(out_root).resolve().parent.parent == source else source.as_uri()
    doc = {"Name": f"anomaseg {description}", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
           "GeneratedBy": [{"Name": "anomaseg", "Version": __version__, "Description": description,
                            **(extra or {})}],
           "SourceDatasets": [{"URL": source.as_uri()}], "DatasetLinks": {"raw": link}}
    write_text(out_root / "dataset_description.json", json.dumps(doc, indent=2) + "\n")
    # our summary files beside the BIDS files: marked as not BIDS, so validators skip them
    write_text(out_root / ".bidsignore", "".join(f"{name}\n" for name in ignored))


def write_sidecar(nifti_path: Path, fields: dict) -> None:
    from anomaseg.atomic import write_text

    write_text(nifti_path.with_name(nifti_stem(nifti_path) + ".json"), json.dumps(fields, indent=2) + "\n")


def save_case_outputs(out_root: Path, source_root: Path, case: Case, reference, anomaly_map, mask,
                      info: dict) -> tuple[Path, Path]:
    """Write one case's `desc-anomaly_map` (float32) and `desc-anomaly_mask` (uint8) with their
    sidecars on the reference image's grid; `info` goes into both sidecars."""
    import numpy as np

    from anomaseg.data.io import save_like

    folder = output_folder(out_root, case.case_id)
    stem = output_stem(case.case_id, reference.path)
    sources = [source_uri(source_root, ref.path) for ref in case.images.values()]
    written = []
    for desc, data, dtype, what in (("anomaly_map", anomaly_map, np.float32, "Post-processed anomaly map "
                                     "(higher = more anomalous)"),
                                    ("anomaly_mask", mask, np.uint8, "Anomaly segmentation: the map above the "
                                     "healthy-calibrated threshold, small components removed (1 = anomalous)")):
        name, suffix = desc.split("_")
        path = save_like(reference, data, folder / f"{stem}_desc-{name}_{suffix}.nii.gz", dtype)
        fields = {"Description": what, "Sources": sources, **info}
        if suffix == "mask":
            fields["Type"] = "Lesion"
        write_sidecar(path, fields)
        written.append(path)
    return written[0], written[1]
