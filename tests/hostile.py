"""Helpers for the hostile-input tests. `raw_nifti` writes NIfTI-1 files byte by byte, so tests can
make the files nibabel refuses to write: lying headers, NaN affines, zero voxel sizes, truncated data."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np


def raw_nifti(path: Path, shape=(8, 9, 10), dtype=np.float32, data: bytes | np.ndarray | None = None,
              affine=None, **fields) -> Path:
    """A .nii / .nii.gz with exactly this header and these voxel bytes (default: ones of `shape`).
    `fields` set header fields after everything else (e.g. srow_x=[nan, 0, 0, 0], pixdim=...)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    dims = np.ones(8, np.int16)
    dims[0] = len(shape)
    dims[1:1 + len(shape)] = shape
    hdr["dim"] = dims
    a = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else np.asarray(affine, float)
    hdr["pixdim"][1:4] = np.sqrt((a[:3, :3] ** 2).sum(0))
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = a[0], a[1], a[2]
    hdr["vox_offset"] = 352
    for k, v in fields.items():
        hdr[k] = v
    buf = io.BytesIO()
    hdr.write_to(buf)
    head = buf.getvalue().ljust(352, b"\0")
    if data is None:
        data = np.ones(shape, dtype)
    if isinstance(data, np.ndarray):
        data = np.asarray(data, dtype).tobytes(order="F")
    blob = head + data
    Path(path).write_bytes(gzip.compress(blob, compresslevel=1) if str(path).endswith(".gz") else blob)
    return Path(path)


def error_line(stderr: str) -> str:
    """The one error line of a failed command (progress bars may have drawn on stderr before it);
    asserts there is exactly one, that it is the last line, and that no traceback was printed."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("anomaseg: error: "), stderr
    return errors[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (to show that nothing was changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}
