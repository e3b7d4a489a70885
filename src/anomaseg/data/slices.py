"""Volumes -> normalised, square 2D axial slices at the model's size, and model-size maps -> volumes.

Per case and modality: intensities are scaled so that the `percentiles` (default 1st and 99th) of
the brain voxels map to 0 and 1 (voxels outside the brain are 0; values are clipped to
[0, `clip_max`] so that hyper-intense lesions stay above healthy tissue without letting single
outliers dominate). Each axial slice (RAS+, `data[:, :, k]`) is cropped to the in-plane bounding
box of the volume's brain mask (`crop_to_brain`, plus 2 voxels; the same box for all slices of a
volume, so the brain fills the model's input whatever the field of view), zero-padded to a square
(never stretched) and resized to `image_size`. Slices whose brain area is below `min_brain_fraction` of the
volume's largest axial brain area are outside the model's domain: not trained on, and scored with
the lowest value of the case. The brain mask is the case's mask file, or without one the rule of
`brain_mask` (`anomaseg.data.brainmask`). Preprocessed cases are cached on disk, keyed by the
files' resolved paths, sizes and modification times and by the preprocessing settings; nothing
cached depends on the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anomaseg.atomic import atomic_path
from anomaseg.data import brainmask
from anomaseg.data.io import Volume, check_same_grid, load_volume
from anomaseg.data.cases import Case
from anomaseg.errors import InputError, InputWarning

CACHE_VERSION = 3  # 3: labels >= 0.5, brain_mask rule, no paths stored
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class SliceSpec:
    """How volumes become model inputs (the `data` part of a run's config)."""

    modalities: tuple[str, ...] = ("flair",)
    image_size: int = 128
    percentiles: tuple[float, float] = (1.0, 99.0)
    clip_max: float = 2.0
    min_brain_fraction: float = 0.25
    crop_to_brain: bool = True
    brain_mask: str = "auto"  # without a mask file: see anomaseg.data.brainmask.BRAIN_MASK_RULES

    def __post_init__(self):
        size = self.image_size
        if size < 32 or size > MAX_IMAGE_SIZE or size & (size - 1):
            raise ValueError(f"image_size must be a power of two from 32 to {MAX_IMAGE_SIZE}, got {size}")
        if not self.modalities or not all(isinstance(m, str) and m.strip() for m in self.modalities):
            raise ValueError(f"modalities must be one or more names, got {list(self.modalities)}")
        if len(self.percentiles) != 2:
            raise ValueError(f"percentiles must be two numbers (low, high), got {list(self.percentiles)}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if not (np.isfinite(self.clip_max) and self.clip_max > 0):
            raise ValueError(f"clip_max must be a positive number, got {self.clip_max}")
        if not 0 <= self.min_brain_fraction <= 1:
            raise ValueError(f"min_brain_fraction must be in [0, 1], got {self.min_brain_fraction}")
        if self.brain_mask not in brainmask.BRAIN_MASK_RULES:
            raise ValueError(f"brain_mask must be one of {', '.join(brainmask.BRAIN_MASK_RULES)}, "
                             f"got {self.brain_mask!r}")


@dataclass(frozen=True)
class SliceGeometry:
    """Where the model-size slices sit in the RAS+ volume."""

    shape: tuple[int, int, int]  # RAS+ volume shape (X, Y, Z)
    side: int  # square side after cropping and padding
    pad: tuple[int, int]  # zeros added before X and before Y (after cropping)
    size: int  # model input size
    crop: tuple[tuple[int, int], tuple[int, int]] | None = None  # in-plane box [x0, x1) x [y0, y1); None: all

    @classmethod
    def for_shape(cls, shape, size: int, brain: np.ndarray | None = None, margin: int = 2) -> "SliceGeometry":
        """Geometry of a volume; with `brain`, slices are cropped in-plane to the brain's box
        (plus `margin` voxels), the same box for every slice of the volume."""
        shape = tuple(int(s) for s in shape)
        crop = None
        if brain is not None and brain.any():
            box = []
            for axis in (0, 1):
                hit = np.flatnonzero(brain.any(axis=(1 - axis, 2)))
                box.append((max(0, int(hit[0]) - margin), min(shape[axis], int(hit[-1]) + 1 + margin)))
            crop = tuple(box)
        (x0, x1), (y0, y1) = crop or ((0, shape[0]), (0, shape[1]))
        x, y = x1 - x0, y1 - y0
        side = max(x, y)
        return cls(shape, side, ((side - x) // 2, (side - y) // 2), size, crop)

    @property
    def box(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return self.crop or ((0, self.shape[0]), (0, self.shape[1]))

    def to_slices(self, volume: np.ndarray, mode: str = "bilinear") -> torch.Tensor:
        """(X, Y, Z) or (C, X, Y, Z) -> (Z, C, size, size) float32."""
        v = torch.as_tensor(np.asarray(volume, dtype=np.float32))
        if v.ndim == 3:
            v = v[None]
        (x0, x1), (y0, y1) = self.box
        v = v.permute(3, 0, 1, 2)[:, :, x0:x1, y0:y1]  # Z, C, X, Y
        x, y = x1 - x0, y1 - y0
        px, py = self.pad
        v = F.pad(v, (py, self.side - y - py, px, self.side - x - px))
        if self.side != self.size:
            if mode == "nearest":
                v = F.interpolate(v, size=(self.size, self.size), mode="nearest")
            else:
                v = F.interpolate(v, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=self.side > self.size)
        return v.contiguous()

    def to_volume(self, slices: torch.Tensor | np.ndarray, fill: float = 0.0) -> np.ndarray:
        """(Z, size, size) or (Z, 1, size, size) maps -> (X, Y, Z) float32 volume (bilinear);
        voxels outside the crop box get `fill`."""
        s = torch.as_tensor(slices, dtype=torch.float32)
        if s.ndim == 3:
            s = s[:, None]
        if self.side != self.size:
            s = F.interpolate(s, size=(self.side, self.side), mode="bilinear", align_corners=False)
        (x0, x1), (y0, y1) = self.box
        px, py = self.pad
        out = np.full(self.shape, fill, np.float32)
        out[x0:x1, y0:y1] = s[:, 0, px:px + x1 - x0, py:py + y1 - y0].permute(1, 2, 0).numpy()
        return out


@dataclass
class PreparedCase:
    """A case ready for the model: model-size slices plus native-resolution mask and label."""

    case_id: str
    images: np.ndarray  # (Z, C, S, S) float16, normalised
    masks: np.ndarray  # (Z, S, S) bool, brain at model size
    labels: np.ndarray | None  # (Z, S, S) bool, anomalous at model size
    keep: np.ndarray  # (Z,) bool, slice in the model's domain
    geometry: SliceGeometry
    brain: np.ndarray  # (X, Y, Z) bool, RAS+ native brain mask
    truth: np.ndarray | None  # (X, Y, Z) bool, RAS+ native anomalous voxels
    reference: Path  # the first image file: header/affine/orientation for outputs
    meta: dict = field(default_factory=dict)

    @property
    def slice_labels(self) -> np.ndarray | None:
        """Per slice: does it hold an anomalous voxel (native resolution)?"""
        return None if self.truth is None else self.truth.any(axis=(0, 1))


def normalise(data: np.ndarray, brain: np.ndarray, spec: SliceSpec) -> np.ndarray:
    lo, hi = np.percentile(data[brain], spec.percentiles)
    if hi <= lo:
        hi = lo + 1.0  # constant image: avoid a division by zero; everything maps to 0
    out = (data - lo) / (hi - lo)
    np.clip(out, 0.0, spec.clip_max, out=out)
    out[~brain] = 0.0
    return out.astype(np.float32)


def load_case_volumes(case: Case, spec: SliceSpec) -> tuple[list[Volume], np.ndarray, np.ndarray | None]:
    """Read and check a case's images, brain mask and segmentation (RAS+)."""
    return load_case_with_mask_source(case, spec)[:3]


def load_case_with_mask_source(case: Case, spec: SliceSpec) -> tuple[list[Volume], np.ndarray, np.ndarray | None, str]:
    """`load_case_volumes` and where the brain mask came from: "file", "nonzero", "derived" (see
    `anomaseg.data.brainmask`) or "image" (2D pictures: every pixel)."""
    vols = []
    for m in spec.modalities:
        ref = case.image(m)
        vols.append(load_volume(ref.path, channel=ref.channel, kind="image"))
    first = vols[0]
    for v in vols[1:]:
        check_same_grid(first, v, "image")
    for v in vols:
        lo, hi = float(v.data.min()), float(v.data.max())
        if hi <= lo:
            raise InputError(v.path, "image is all zeros" if hi == 0 else f"image is constant ({lo:g}): nothing to analyse")
    brain, source = _brain_mask(case, vols, spec)
    for v in vols:
        inside = v.data[brain]
        lo, hi = float(inside.min()), float(inside.max())
        if hi <= lo:
            raise InputError(v.path, f"image is constant ({lo:g}) inside the brain mask: nothing to analyse")
    truth = None
    if case.seg is not None:
        seg_vol = load_volume(case.seg, kind="segmentation")
        check_same_grid(first, seg_vol, "segmentation")
        truth = seg_vol.data > 0
    elif case.normal:
        truth = np.zeros(first.shape, bool)
    return vols, brain, truth, source


def _brain_mask(case: Case, vols: list[Volume], spec: SliceSpec) -> tuple[np.ndarray, str]:
    first = vols[0]
    if case.mask is not None:
        mask_vol = load_volume(case.mask, kind="mask")
        check_same_grid(first, mask_vol, "brain mask")
        brain = mask_vol.data > 0
        if not brain.any():
            raise InputError(case.mask, "brain mask is empty")
        return brain, "file"
    if first.format == "png":  # a 2D image: every pixel is in the domain (no background to strip)
        return np.ones(first.shape, bool), "image"
    if spec.brain_mask == "file":
        raise InputError(case.source or first.path, f"case {case.case_id!r} has no brain mask file "
                                                    "(<case>_mask.nii.gz), and data.brain_mask is 'file'")
    images = [v.data for v in vols]
    foreground = brainmask.nonzero(images)
    if not foreground.any():
        raise InputError(first.path, "image is all zeros: no brain voxels (and no <case>_mask file)")
    if spec.brain_mask == "nonzero" or (spec.brain_mask == "auto" and brainmask.background_is_empty(foreground)):
        return foreground, "nonzero"
    derived = brainmask.derive_head_mask(images)
    if derived is None:
        raise InputError(first.path, f"no brain mask file, the image's background is not empty "
                                     f"({brainmask.border_fraction(foreground):.0%} of the volume's border is nonzero) "
                                     "and no head stands out from it: pass <case>_mask.nii.gz or run "
                                     "`anomaseg preprocess`")
    return derived, "derived"


DERIVED_MASK_WARNING = ("cases without a brain mask file whose background is not empty (noise, or a head "
                        "that is not skull-stripped): their brain mask is derived from the images (Otsu "
                        "threshold, largest component, holes filled; it covers the head when the skull is "
                        "there). For brain-only results pass <case>_mask.nii.gz files or run `anomaseg preprocess`")


def prepare_case(case: Case, spec: SliceSpec) -> PreparedCase:
    vols, brain, truth, mask_source = load_case_with_mask_source(case, spec)
    geometry = SliceGeometry.for_shape(vols[0].shape, spec.image_size, brain if spec.crop_to_brain else None)
    stack = np.stack([normalise(v.data, brain, spec) for v in vols])
    images = geometry.to_slices(stack).to(torch.float16).numpy()
    masks = geometry.to_slices(brain).squeeze(1).numpy() > 0.5
    labels = None if truth is None else geometry.to_slices(truth).squeeze(1).numpy() > 0.5
    area = brain.sum(axis=(0, 1))
    keep = area >= spec.min_brain_fraction * area.max()
    return PreparedCase(case.case_id, images, masks, labels, keep, geometry, brain, truth, vols[0].path,
                        {"spacing": vols[0].spacing, "brain_mask": mask_source})


class CaseCache:
    """Preprocessed cases on disk (one .npz per case), so a second run does not re-read NIfTI files."""

    def __init__(self, folder: str | Path | None):
        self.folder = None if folder is None else Path(folder)

    @classmethod
    def at(cls, folder: str | Path | None) -> "CaseCache":
        """The cache a run's `data.cache_dir` names ("default": the user's cache folder, None: none)."""
        return cls(cls.default_folder() if folder == "default" else folder)

    @staticmethod
    def default_folder() -> Path:
        if os.environ.get("ANOMASEG_CACHE"):
            return Path(os.environ["ANOMASEG_CACHE"])
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anomaseg"

    def key(self, case: Case, spec: SliceSpec) -> str:
        files = [case.image(m).path for m in spec.modalities] + [p for p in (case.mask, case.seg) if p]
        stamp = []
        for f in files:
            st = f.stat()
            stamp.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        channels = [case.image(m).channel for m in spec.modalities]
        extra = ["normal"] if case.normal else []  # (kept out of other keys: existing caches stay valid)
        blob = json.dumps([CACHE_VERSION, asdict(spec), stamp, channels] + extra, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def entry(self, case: Case, spec: SliceSpec) -> Path | None:
        """The cache file of a case (None without a cache folder)."""
        if self.folder is None:
            return None
        try:
            return self.folder / f"{case.case_id}-{self.key(case, spec)}.npz"
        except OSError as exc:
            raise InputError(case.source or case.case_id, f"cannot read case files ({exc})") from None

    def _members(self, case: Case, spec: SliceSpec, names: tuple[str, ...]) -> dict | None:
        """Some arrays of a cached case, read without the others (None if it is not cached)."""
        path = self.entry(case, spec)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path) as z:
                return {n: z[n] for n in names if n in z.files}
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def training_view(self, case: Case, spec: SliceSpec) -> tuple[np.ndarray, bool]:
        """(keep, anomalous): which slices are in the model's domain and whether the case has
        anomalous voxels, without reading its images when it is cached (prepared and cached if not)."""
        got = self._members(case, spec, ("keep", "truth"))
        if not got or "keep" not in got:
            p = self.get(case, spec)
            return p.keep, bool(p.truth is not None and p.truth.any())
        return got["keep"], bool("truth" in got and got["truth"].any())  # truth is bit-packed: any() holds

    def kept_images(self, case: Case, spec: SliceSpec) -> np.ndarray:
        """The case's in-domain slices, (K, C, S, S) float16, reading only its images from the cache."""
        got = self._members(case, spec, ("images", "keep"))
        if not got or len(got) < 2:
            p = self.get(case, spec)
            return p.images[p.keep]
        return got["images"][got["keep"]]

    def get(self, case: Case, spec: SliceSpec) -> PreparedCase:
        if self.folder is None:
            return prepare_case(case, spec)
        path = self.entry(case, spec)
        if path.exists():
            try:
                return _read_prepared(path, case, spec)
            except (OSError, ValueError, KeyError, EOFError):
                path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
        prepared = prepare_case(case, spec)
        try:
            _write_prepared(path, prepared)
        except OSError:
            pass  # a read-only or full cache folder only costs speed
        return prepared


def _write_prepared(path: Path, p: PreparedCase) -> None:
    # no paths: the same entry serves the case whatever the working directory or the path's spelling
    arrays = dict(images=p.images, masks=p.masks, keep=p.keep, brain=np.packbits(p.brain),
                  geometry=np.array(json.dumps(asdict(p.geometry))), meta=np.array(json.dumps(p.meta)))
    if p.labels is not None:
        arrays.update(labels=p.labels, truth=np.packbits(p.truth))
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _read_prepared(path: Path, case: Case, spec: SliceSpec) -> PreparedCase:
    with np.load(path) as z:
        g = json.loads(str(z["geometry"]))
        crop = None if g.get("crop") is None else tuple(tuple(b) for b in g["crop"])
        geometry = SliceGeometry(tuple(g["shape"]), g["side"], tuple(g["pad"]), g["size"], crop)
        n = int(np.prod(geometry.shape))
        unpack = lambda a: np.unpackbits(a, count=n).reshape(geometry.shape).astype(bool)  # noqa: E731
        has_labels = "labels" in z.files
        return PreparedCase(case.case_id, z["images"], z["masks"], z["labels"] if has_labels else None,
                            z["keep"], geometry, unpack(z["brain"]),
                            unpack(z["truth"]) if has_labels else None, case.image(spec.modalities[0]).path,
                            json.loads(str(z["meta"])))


def prepare_cases(cases: list[Case], spec: SliceSpec, cache: CaseCache | None = None,
                  progress: bool = True, desc: str = "preparing cases") -> list[PreparedCase]:
    from tqdm.auto import tqdm

    cache = cache or CaseCache(None)
    with tqdm(cases, desc=desc, unit="case", disable=not progress, leave=False) as bar:
        prepared = [cache.get(c, spec) for c in bar]
    if any(p.meta.get("brain_mask") == "derived" for p in prepared):
        warnings.warn(DERIVED_MASK_WARNING, InputWarning, stacklevel=2)
    return prepared


def training_slices(cases: list[PreparedCase]) -> torch.Tensor:
    """All in-domain slices of healthy cases, (N, C, S, S) float16."""
    chunks = [c.images[c.keep] for c in cases]
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise ValueError("no training slices: every slice has too little brain")
    return torch.from_numpy(np.concatenate(chunks))
