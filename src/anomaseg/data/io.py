"""Reading and writing image files. Orientation and affines are handled here and nowhere else.

Every volume is held in memory in the closest canonical orientation, RAS+ (array axes increase
towards the subject's right, anterior and superior), so axial slices are always `data[:, :, k]`. Outputs are written back in the input's own voxel
order with its own affine and header, so they overlay the input in 3D Slicer, ITK-SNAP or FSLeyes.

PNG images (MVTec-AD style 2D data) are volumes of depth 1: `data[x, y, 0]` is the pixel in column
x and row H-1-y (x to the right, y upwards, like an axial slice shown anterior up), identity affine.
`channel` picks a colour channel (0, 1, 2 = R, G, B; a grayscale image serves every channel); no
channel gives the grayscale image (luma 0.299 R + 0.587 G + 0.114 B for colour images). Outputs for
a PNG reference are 2D images in its pixel order: float maps as 32-bit float TIFF, integer maps as
8-bit PNG (binary masks written 0/255, like MVTec's ground truth) or 16-bit PNG above 255.

What a NIfTI file must be (anything else is an `InputError` naming it, before its voxels are read):
- 3D, or 4D with one volume per channel (a datalist names the channels), or with trailing axes of
  length 1; 2D and 5D files, a zero-length axis and non-numeric or complex voxel types are refused;
- as large as its header says: the file size is checked against the header's shape and type
  before anything is allocated (a `.nii.gz` cannot hold more than ~1000x its size), and a volume
  larger than half of this machine's memory is refused;
- a finite, non-singular affine with a nonzero voxel size on every axis (nibabel would quietly
  replace a zero `pixdim` by 1 mm);
- segmentations and masks: a voxel is labelled when its value is >= 0.5 (float labels from
  resampling are rounded to the nearest label, halves up; integer labels: > 0).
Images of one case share one voxel grid (`check_same_grid`): the same shape and every voxel
centre within `GRID_TOLERANCE` voxels of the same position in the other image.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from anomaseg.atomic import atomic_path
from anomaseg.errors import InputError, one_line

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_SUFFIXES = (".png",)
_RAS = ornt.axcodes2ornt(("R", "A", "S"))
GRID_TOLERANCE = 0.01  # voxels: two grids agree when every voxel centre lies within this of its twin
GZIP_MAX_RATIO = 1100  # deflate expands at most ~1032x; a .nii.gz claiming more voxels than that lies
LABEL_THRESHOLD = 0.5  # float segmentations / masks: a voxel is labelled when its value is >= this


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_png(path: str | Path) -> bool:
    return str(path).lower().endswith(PNG_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """File name without .nii / .nii.gz."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass
class Volume:
    """A 3D image in RAS+ voxel order, with what is needed to write results back like the input."""

    data: np.ndarray | None  # float32 (images) or integer values (labels), (X, Y, Z) RAS+; None: header only
    affine: np.ndarray  # 4x4 affine of `data` (RAS+ voxel order)
    path: Path
    source_affine: np.ndarray  # affine of the file as stored
    source_header: nib.Nifti1Header | None  # None for PNG
    to_source: np.ndarray | None  # nibabel orientation transform RAS+ -> stored voxel order (NIfTI)
    shape: tuple[int, int, int] = ()  # RAS+ shape
    format: str = "nifti"  # "nifti" or "png" (a 2D image: depth 1)

    def __post_init__(self):
        if self.data is not None:
            self.shape = tuple(self.data.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore


def load_volume(path: str | Path, *, channel: int | None = None, kind: str = "image",
                header_only: bool = False) -> Volume:
    """Load a NIfTI volume (or a PNG image as a volume of depth 1), check it, and reorient it to RAS+.

    `channel` picks one volume of a 4D file (decathlon-style multi-modal images). `kind` ("image",
    "segmentation" or "mask") only words the error messages and decides the dtype: images become
    float32, the others keep integer values. `header_only` reads the geometry without the voxels
    (`data` is then None), enough to write outputs like the file. Every problem raises
    `InputError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"{kind} file not found")
    if not path.is_file():
        raise InputError(path, f"{kind} path is not a file")
    if is_png(path):
        return _load_png(path, channel, kind, header_only)
    if not is_nifti(path):
        raise InputError(path, f"{kind} is not a NIfTI file (expected .nii or .nii.gz) or a PNG image (.png)")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(path, f"{kind} is not a NIfTI image")
        shape = _check_header(path, img, kind, channel)
        _check_affine(path, img, kind)
        if header_only:
            shape = shape[:3]
            to_ras = ornt.ornt_transform(ornt.io_orientation(img.affine), _RAS)
            ras_shape = [0, 0, 0]
            for axis, (target, _) in enumerate(to_ras):
                ras_shape[int(target)] = shape[axis]
            return Volume(None, img.affine @ ornt.inv_ornt_aff(to_ras, shape), path, img.affine.copy(),
                          img.header.copy(), ornt.ornt_transform(_RAS, ornt.io_orientation(img.affine)),
                          tuple(ras_shape))
        if len(shape) == 4 and channel is not None:
            raw = np.asanyarray(img.dataobj[:, :, :, channel])  # one volume, not the whole 4D file
        else:
            raw = np.asanyarray(img.dataobj)
    except InputError:
        raise
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, EOFError, OSError,
            ValueError, zlib.error, gzip.BadGzipFile, MemoryError) as exc:
        raise InputError(path, f"{kind} is corrupt or not a readable NIfTI file ({one_line(exc)})") from None

    raw = raw.reshape(raw.shape[:3])  # trailing axes of length 1 (checked in _check_header)
    if kind == "image":
        data = np.asarray(raw, dtype=np.float32)
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputError(path, f"{kind} contains {int(bad.sum())} NaN/Inf voxels")
    else:
        data = _labels(raw, path, kind)

    source_affine = img.affine.copy()
    to_ras = ornt.ornt_transform(ornt.io_orientation(source_affine), _RAS)
    to_source = ornt.ornt_transform(_RAS, ornt.io_orientation(source_affine))
    data = np.ascontiguousarray(ornt.apply_orientation(data, to_ras))
    affine = source_affine @ ornt.inv_ornt_aff(to_ras, raw.shape)
    return Volume(data, affine, path, source_affine, img.header.copy(), to_source)


def _labels(raw: np.ndarray, path: Path, kind: str) -> np.ndarray:
    """Label values as integers: floats (e.g. a mask resampled with linear interpolation, 0.5 at
    its edge) are rounded to the nearest label, halves up, so value >= 0.5 counts as labelled."""
    if np.issubdtype(raw.dtype, np.floating):
        if not np.isfinite(raw).all():
            raise InputError(path, f"{kind} contains NaN/Inf voxels")
        return np.floor(np.clip(raw, -2**31, 2**31 - 1) + LABEL_THRESHOLD).astype(np.int32)
    return np.asarray(raw)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**36


def _check_header(path: Path, img, kind: str, channel: int | None) -> tuple[int, ...]:
    """Shape and voxel type from the header, checked against the file's size before any voxel is
    read (a lying header must not make us allocate what it claims). Returns the data shape."""
    header = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) < 3:
        raise InputError(path, f"{kind} is {len(shape)}D (shape {shape}): a 3D volume is expected "
                               "(2D images are read as PNG)")
    if min(shape) < 1:
        raise InputError(path, f"{kind} has a zero-length axis (shape {shape}): no voxels")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise InputError(path, f"{kind} is {len(shape)}D (shape {shape}): a 3D volume, or 4D with one "
                               "volume per modality, is expected")
    if len(shape) == 4:
        if channel is None:
            raise InputError(path, f"{kind} is 4D with {shape[3]} volumes (shape {shape}): name its "
                                   "channels in a datalist's \"modality\" map, or split it into 3D files")
        if not 0 <= channel < shape[3]:
            raise InputError(path, f"{kind} has {shape[3]} channels, channel {channel} requested")
    elif channel not in (None, 0):
        raise InputError(path, f"{kind} holds one volume (shape {shape}), channel {channel} requested")
    dtype = header.get_data_dtype()
    if dtype.kind not in "biuf":
        raise InputError(path, f"{kind} has voxels of type {dtype} (complex or structured): real numbers "
                               "are expected (for complex MR data, take the magnitude first)")
    n_voxels = int(np.prod(shape, dtype=np.float64))
    nbytes = n_voxels * dtype.itemsize
    size = path.stat().st_size
    offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))  # the loaded header says 0
    claim = f"its header claims {'x'.join(map(str, shape))} voxels of {dtype} ({nbytes:,} bytes)"
    if str(path).lower().endswith(".gz"):
        if nbytes > GZIP_MAX_RATIO * size:
            raise InputError(path, f"{kind}: {claim}, more than a {size:,}-byte gzip file can hold: "
                                   "a wrong header or a truncated file")
    elif size < offset + nbytes:
        raise InputError(path, f"{kind}: {claim} after byte {offset}, but the file has only {size:,} bytes: "
                               "truncated, or a wrong header")
    per_volume = int(np.prod(shape[:3], dtype=np.float64)) * 8  # the float64 a scaled read may produce
    if per_volume > _memory_bytes() // 2:
        raise InputError(path, f"{kind}: {claim}; one volume needs {per_volume / 2**30:.1f} GiB, more than "
                               "half of this machine's memory")
    return shape


def _stored_pixdim(path: Path, header_class) -> np.ndarray:
    """The voxel sizes as the file stores them (nibabel's loaded header has zeros replaced by 1)."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        header = header_class.from_fileobj(f, check=False)
    return np.asarray(header["pixdim"][1:4], dtype=np.float64)


def _check_affine(path: Path, img, kind: str) -> None:
    """A usable voxel-to-world transform: finite, nonzero voxel size, axes independent."""
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise InputError(path, f"{kind}'s affine (voxel-to-world transform, sform/qform) contains NaN or Inf")
    if int(img.header["sform_code"]) == 0:  # the affine comes from qform or pixdim, which nibabel repairs
        pixdim = _stored_pixdim(path, type(img.header))
        if not (np.isfinite(pixdim).all() and (pixdim != 0).all()):
            raise InputError(path, f"{kind}'s voxel size (pixdim) is {pixdim.tolist()}: zero or NaN "
                                   "(nibabel would assume 1 mm); fix the header")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if zooms.min() <= 1e-6 * max(1.0, zooms.max()):
        axis = int(np.argmin(zooms))
        raise InputError(path, f"{kind}'s affine has a zero scale along voxel axis {axis} "
                               f"(voxel sizes {np.round(zooms, 6).tolist()})")
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * float(np.prod(zooms)):
        raise InputError(path, f"{kind}'s affine is singular: its voxel axes are not independent")


_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def _load_png(path: Path, channel: int | None, kind: str, header_only: bool) -> Volume:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if header_only:
                width, height = img.size
                return Volume(None, np.eye(4), path, np.eye(4), None, None, (width, height, 1), "png")
            img.load()
            if img.mode in _COLOUR_MODES:
                rgb = np.asarray(img.convert("RGB"))
                gray = None
            else:
                rgb = None
                gray = np.asarray(img if img.mode in ("I", "I;16", "I;16B", "I;16L", "F") else img.convert("L"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError,
            zlib.error, MemoryError) as exc:
        raise InputError(path, f"{kind} is corrupt or not a readable PNG image ({exc})") from None
    if min((rgb if rgb is not None else gray).shape[:2]) < 1:
        raise InputError(path, f"{kind} is empty")
    if channel is not None and not 0 <= channel < 3:
        raise InputError(path, f"{kind} has 3 colour channels (0, 1, 2), channel {channel} requested")
    if kind == "image":
        if rgb is None:
            raw = gray.astype(np.float32)
        elif channel is None:
            raw = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        else:
            raw = rgb[..., channel].astype(np.float32)
        if not np.isfinite(raw).all():
            raise InputError(path, f"{kind} contains NaN/Inf pixels")
    else:  # labels: any nonzero colour channel counts
        raw = gray if rgb is None else rgb.max(axis=-1)
        if np.issubdtype(raw.dtype, np.floating):
            if not np.isfinite(raw).all():
                raise InputError(path, f"{kind} contains NaN/Inf pixels")
            raw = np.rint(raw)
        raw = raw.astype(np.int32)
    data = np.ascontiguousarray(raw[::-1].T)[..., None]  # (row, col) -> (x right, y up, 1)
    return Volume(data, np.eye(4), path, np.eye(4), None, None, format="png")


def to_source_orientation(reference: Volume, data_ras: np.ndarray) -> np.ndarray:
    """Reorder a RAS+ array of the reference's shape back into the reference file's voxel order
    (for a PNG reference: the 2D (row, column) image)."""
    if data_ras.shape != reference.shape:
        raise ValueError(f"array shape {data_ras.shape} != volume shape {reference.shape}")
    if reference.format == "png":
        return np.ascontiguousarray(np.asarray(data_ras)[:, :, 0].T[::-1])
    return np.ascontiguousarray(ornt.apply_orientation(data_ras, reference.to_source))


def save_like(reference: Volume, data_ras: np.ndarray, path: str | Path, dtype=np.float32) -> Path:
    """Write `data_ras` (RAS+, the reference's shape) as NIfTI with the reference's affine and
    header, in the reference's voxel order. Written under a temporary name, then renamed.

    For a PNG reference the output is a 2D image instead (see the module docstring); a `.nii` /
    `.nii.gz` suffix of `path` becomes `.tiff` (float data) or `.png` (integer data). Returns the
    path written."""
    path = Path(path)
    if reference.format == "png":
        return _save_image_like(reference, data_ras, path, dtype)
    data = to_source_orientation(reference, np.asarray(data_ras)).astype(dtype, copy=False)
    header = reference.source_header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(data, reference.source_affine, header=header)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def _save_image_like(reference: Volume, data_ras: np.ndarray, path: Path, dtype) -> Path:
    from PIL import Image

    image = to_source_orientation(reference, np.asarray(data_ras))
    name = nifti_stem(path) if is_nifti(path) else None
    if np.issubdtype(np.dtype(dtype), np.floating):
        path = path.with_name(name + ".tiff") if name else path
        out, fmt = Image.fromarray(image.astype(np.float32)), "TIFF"
    else:
        path = path.with_name(name + ".png") if name else path
        values = np.rint(image).astype(np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise ValueError(f"integer image values must lie in [0, 65535] to be written as PNG ({path.name})")
        if values.max(initial=0) <= 1:
            values = values * 255  # binary mask: 0/255 as MVTec's ground truth
        if values.max(initial=0) <= 255:
            out = Image.fromarray(values.astype(np.uint8))
        else:
            out = Image.fromarray(values.astype(np.uint16))
        fmt = "PNG"
    with atomic_path(path, suffix=path.suffix) as tmp:
        out.save(tmp, format=fmt)
    return path


def grid_difference(reference: Volume, other: Volume) -> str | None:
    """None when `other` lies on the reference's voxel grid (RAS+ shape equal, and every voxel centre
    within GRID_TOLERANCE voxels of its twin: the affines are linear, so the volume's corners bound
    the distance); else what differs."""
    if other.shape != reference.shape:
        return f"shape {other.shape} differs from {reference.shape}"
    corners = np.array(np.meshgrid(*[[0, max(n - 1, 0)] for n in reference.shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    shift = np.linalg.norm((other.affine @ corners - reference.affine @ corners)[:3], axis=0).max()
    voxel = min(reference.spacing)
    if shift > GRID_TOLERANCE * voxel:
        return (f"its voxels lie up to {shift:.3g} mm away from the image's ({shift / voxel:.3g} voxels; "
                f"tolerance {GRID_TOLERANCE} voxels)")
    return None


def check_same_grid(reference: Volume, other: Volume, what: str) -> None:
    """Segmentations, masks and further modalities must share the first image's voxel grid."""
    problem = grid_difference(reference, other)
    if problem:
        raise InputError(other.path, f"{what} is not on the voxel grid of {reference.path.name}: {problem}; "
                                     "resample it onto that image (nearest neighbour for labels) or run "
                                     "`anomaseg preprocess`")
