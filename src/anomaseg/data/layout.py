"""Find the cases of a dataset: BraTS-style case folders, a flat folder, or a decathlon datalist.

A dataset is one of
- a folder of case folders `<case>/<case>_<modality>.nii[.gz]` with optional `<case>_seg` (labels,
  > 0 = anomalous) and `<case>_mask` (brain mask); `-` works as separator too (BraTS 2023 naming);
- a flat folder of `*.nii[.gz]`: `<case>_<modality>`, `<case>_seg` and `<case>_mask` files are grouped
  by case; any other file is a case of its own holding one image of unnamed modality;
- a decathlon-style datalist JSON (`{"training": [{"image": ..., "label": ..., "mask": ...}], ...}`);
  `image` is one path (3D, or 4D with the modalities as channels named by the file's "modality" map)
  or a list of paths, one per modality;
- 2D PNG images, MVTec-AD style: a split folder (`train/` or `test/`) of type folders `<type>/*.png`,
  or one type folder itself. Each image is a case `<type>_<stem>` whose anomaly mask is
  `../ground_truth/<type>/<stem>_mask.png` (seen from the type folder); images of type `good` are
  normal (an all-healthy segmentation, no mask file needed); the whole image counts as "brain".
  A PNG case offers the modalities `gray` (grayscale; luma for colour images) and `r`, `g`, `b`
  (colour channels; a grayscale image serves all three);
- a BIDS dataset root (`sub-<label>/[ses-<label>/]anat/...`): read by `anomaseg.data.bids`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from anomaseg.data.cases import UNNAMED, Case, ImageRef, canonical_modality
from anomaseg.data.io import is_nifti, is_png, nifti_stem
from anomaseg.errors import InputError

SEG_NAMES = ("seg", "label", "labels")
MASK_NAMES = ("mask", "brainmask", "brain_mask")

NORMAL_TYPE = "good"  # MVTec-AD: the defect-free image type


def find_cases(root: str | Path, modalities: list[str] | None = None, split: str = "training",
               require_seg: bool = False, bids=None) -> list[Case]:
    """List the cases under `root` (folder or datalist JSON), sorted by case id.

    With `modalities`, every case must have each of them (else `InputError`); with `require_seg`,
    every case must have a segmentation. A BIDS root is read by `data.bids` (`bids`: its
    `BidsQuery`, which derivatives and participants to use).
    """
    from anomaseg.data import bids as bids_reader

    root = Path(root)
    if not root.exists():
        raise InputError(root, "dataset path not found")
    if bids_reader.is_bids_root(root):
        cases = bids_reader.find_bids_cases(root, bids)
    elif bids:
        raise InputError(root, "--derivatives and --select need a BIDS dataset (dataset_description.json "
                               "or sub-<label>/anat folders)")
    elif root.is_file():
        if root.suffix.lower() != ".json":
            raise InputError(root, "dataset must be a folder or a datalist .json file")
        cases = _from_datalist(root, split)
    else:
        entries = _entries(root)
        sub = [p for p in entries if p.is_dir()]
        case_dirs = [p for p in sub if any(is_nifti(f) for f in _entries(p))]
        flat = [f for f in entries if f.is_file() and is_nifti(f)]
        cases = [_from_case_dir(d) for d in case_dirs] + _from_flat(root, flat, modalities)
        if not cases:  # PNG images only where there is no NIfTI data (a stray folder of screenshots stays out)
            png_dirs = [d for d in sub if any(is_png(f) for f in _entries(d))]
            for folder in png_dirs + ([root] if any(is_png(f) for f in entries) else []):
                cases += _from_png_folder(folder)
        if not cases:
            raise InputError(root, "no NIfTI cases found (expected case folders <case>/<case>_<modality>.nii.gz, "
                                   "a flat folder of .nii/.nii.gz files, or a datalist .json) and no PNG images "
                                   "(for an MVTec-style dataset pass its train/ or test/ folder)")
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InputError(root, f"duplicate case ids: {', '.join(dupes)}")
    for case in cases:
        _check_case_id(case.case_id, case.source or root)
    folded: dict[str, str] = {}
    for i in ids:  # outputs are named after case ids: they must stay apart on case-insensitive disks too
        other = folded.setdefault(i.casefold(), i)
        if other != i:
            raise InputError(root, f"case ids {other!r} and {i!r} differ only in letter case; their output "
                                   "files would collide on case-insensitive file systems")
    for case in cases:
        for m in modalities or []:
            case.image(m)
        if require_seg and case.seg is None and not case.normal:
            expected = (f"../ground_truth/{case.source.name}/<name>_mask.png" if _is_png_case(case)
                        else "a *_label-lesion_mask.nii.gz in derivatives/" if bids_reader.is_bids_root(root)
                        else "<case>_seg.nii.gz")
            raise InputError(case.source or root, f"case {case.case_id!r} has no segmentation ({expected})")
    return sorted(cases, key=lambda c: c.case_id)


MAX_CASE_ID_BYTES = 200  # outputs add "_anomaly_map.nii.gz", the cache "-<key>.npz": file names stop at 255


def _check_case_id(case_id: str, where: Path) -> None:
    """A case id names output files: it must be a plain, non-empty file name."""
    problem = None
    if not case_id.strip():
        problem = "is empty"
    elif case_id in (".", "..") or any(c in case_id for c in "/\\"):
        problem = "contains a path separator or is '.' / '..'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in case_id):
        problem = "contains control characters"
    elif len(case_id.encode("utf-8", "surrogateescape")) > MAX_CASE_ID_BYTES:
        problem = f"is longer than {MAX_CASE_ID_BYTES} bytes"
    if problem:
        raise InputError(where, f"case id {case_id!r} {problem}: it names output files")


def _entries(folder: Path) -> list[Path]:
    """The visible entries of a folder, sorted; a broken symbolic link is an error, not skipped."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise InputError(folder, f"cannot read folder ({exc.strerror or exc})") from None
    for p in entries:
        if p.is_symlink() and not p.exists():
            raise InputError(p, "broken symbolic link (its target does not exist)")
    return entries


def _split_name(stem: str, case_id: str) -> str | None:
    """The suffix naming the modality in `<case>_<suffix>` / `<case>-<suffix>`, or None."""
    if stem.startswith(case_id) and len(stem) > len(case_id) + 1 and stem[len(case_id)] in "_-":
        return stem[len(case_id) + 1:].lower()
    return None


def _from_case_dir(folder: Path) -> Case:
    images: dict[str, ImageRef] = {}
    seg = mask = None
    for f in _entries(folder):
        if not (f.is_file() and is_nifti(f)):
            continue
        suffix = _split_name(nifti_stem(f), folder.name)
        if suffix is None:
            # a file not named after its folder: take the text after the last separator (none, or
            # nothing after it as in "scan_.nii.gz": the folder's unnamed image)
            parts = re.split(r"[_-]", nifti_stem(f))
            suffix = parts[-1].lower() if len(parts) > 1 and parts[-1] else UNNAMED
        if suffix in SEG_NAMES:
            seg = f
        elif suffix in MASK_NAMES:
            mask = f
        else:
            key = canonical_modality(suffix)
            if key in images:
                raise InputError(f, f"two files of modality {key!r} in case folder {folder.name!r}")
            images[key] = ImageRef(f)
    if not images:
        raise InputError(folder, "case folder holds no image (only segmentation/mask files)")
    return Case(folder.name, images, seg, mask, folder)


def _from_flat(root: Path, files: list[Path], modalities: list[str] | None) -> list[Case]:
    wanted = {canonical_modality(m) for m in modalities or []}
    groups: dict[str, dict] = {}
    for f in files:
        stem = nifti_stem(f)
        head, sep, tail = max((stem.rpartition(s) for s in "_-"), key=lambda t: len(t[0]))
        sep = sep if head else ""  # "_flair.nii.gz" is a case of its own, not modality flair of case ""
        tail_l = tail.lower()
        if sep and tail_l in SEG_NAMES:
            groups.setdefault(head, {}).setdefault("seg", f)
        elif sep and tail_l in MASK_NAMES:
            groups.setdefault(head, {}).setdefault("mask", f)
        elif sep and canonical_modality(tail_l) in wanted:
            groups.setdefault(head, {}).setdefault("images", {})[canonical_modality(tail_l)] = ImageRef(f)
        else:
            groups.setdefault(stem, {}).setdefault("images", {})[UNNAMED] = ImageRef(f)
    cases = []
    for case_id, g in groups.items():
        if not g.get("images"):
            orphan = g.get("seg") or g.get("mask")
            raise InputError(orphan, f"no image file belongs to this file (expected {case_id}.nii.gz "
                                     f"or {case_id}_<modality>.nii.gz beside it)")
        cases.append(Case(case_id, g["images"], g.get("seg"), g.get("mask"), root))
    return cases


def _is_png_case(case: Case) -> bool:
    return case.source is not None and any(is_png(ref.path) for ref in case.images.values())


def _from_png_folder(folder: Path) -> list[Case]:
    """MVTec-style type folder: every PNG is a case; masks in ../ground_truth/<type>/<stem>_mask.png."""
    truth_dir = folder.parent.parent / "ground_truth" / folder.name
    cases = []
    for f in (p for p in _entries(folder) if p.is_file() and is_png(p)):
        images = {"gray": ImageRef(f), "r": ImageRef(f, 0), "g": ImageRef(f, 1), "b": ImageRef(f, 2)}
        mask = truth_dir / f"{f.stem}_mask.png"
        cases.append(Case(f"{folder.name}_{f.stem}", images, mask if mask.is_file() else None, None, folder,
                          normal=folder.name == NORMAL_TYPE))
    return cases


def _from_datalist(path: Path, split: str) -> list[Case]:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(path, f"datalist is not valid JSON ({exc})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get(split), list):
        keys = ", ".join(k for k, v in spec.items() if isinstance(v, list)) if isinstance(spec, dict) else ""
        raise InputError(path, f"datalist has no list {split!r} (lists found: {keys or 'none'})")
    names = _modality_names(path, spec.get("modality"))
    base = path.parent
    cases = []
    for i, entry in enumerate(spec[split]):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputError(path, f"entry {i} of {split!r} has no 'image'")
        image = entry["image"]
        if isinstance(image, list):
            if not image or not all(_is_path(p) for p in image):
                raise InputError(path, f"entry {i} of {split!r}: 'image' must be a path or a non-empty list of paths")
            if names and len(names) != len(image):
                raise InputError(path, f"entry {i}: {len(image)} images but {len(names)} modalities named")
            keys = names or ([UNNAMED] if len(image) == 1 else [str(k) for k in range(len(image))])
            images = {k: ImageRef(_resolve(base, p)) for k, p in zip(keys, image)}
        elif not _is_path(image):
            raise InputError(path, f"entry {i} of {split!r}: 'image' must be a path or a non-empty list of paths")
        elif names and len(names) > 1:
            images = {k: ImageRef(_resolve(base, image), channel=c) for c, k in enumerate(names)}
        else:
            images = {names[0] if names else UNNAMED: ImageRef(_resolve(base, image))}
        files = {}
        for key in ("label", "seg", "mask"):
            value = entry.get(key)
            if value is not None and value != "" and not _is_path(value):
                raise InputError(path, f"entry {i} of {split!r}: {key!r} must be a path, got {value!r}")
            files[key] = _resolve(base, value) if value else None
        first = next(iter(images.values())).path
        case_id = entry.get("id")
        if case_id is not None and not isinstance(case_id, (str, int)):
            raise InputError(path, f"entry {i} of {split!r}: 'id' must be a string, got {case_id!r}")
        case_id = str(case_id) if case_id not in (None, "") else nifti_stem(first)
        cases.append(Case(case_id, images, files["label"] or files["seg"], files["mask"], path))
    if not cases:
        raise InputError(path, f"datalist split {split!r} is empty")
    return cases


def _is_path(value) -> bool:
    return isinstance(value, str) and bool(value.strip()) and "\0" not in value


def _modality_names(path: Path, modality) -> list[str]:
    """The datalist's {"0": "FLAIR", "1": "T2"} map as a list of canonical names, by channel."""
    if modality in (None, {}, []):
        return []
    if not isinstance(modality, dict):
        raise InputError(path, f"datalist 'modality' must be a map {{\"0\": \"FLAIR\", ...}}, got {modality!r}")
    try:
        channels = sorted((int(k), v) for k, v in modality.items())
    except (TypeError, ValueError):
        raise InputError(path, f"datalist 'modality' keys must be channel numbers, got {list(modality)}") from None
    if [c for c, _ in channels] != list(range(len(channels))) or not all(_is_path(v) for _, v in channels):
        raise InputError(path, f"datalist 'modality' must map channels 0..N-1 to names, got {modality!r}")
    names = [canonical_modality(v) for _, v in channels]
    if len(set(names)) != len(names):
        raise InputError(path, f"datalist 'modality' names a modality twice: {modality!r}")
    return names


def _resolve(base: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else (base / q)
