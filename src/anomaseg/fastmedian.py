"""An exact median filter evaluated only where a mask is set: scipy's `median_filter(mode="nearest")`
at a fraction of its cost for the post-processing of anomaly maps.

Why by hand: scipy (and ITK) select the median of every window from scratch (a quickselect over
125 values per voxel for a 5x5x5 window: ~5-10 s for the brain's box of a 1 mm volume), and the
post-processing only needs the values inside the eroded brain. No maintained library does a
masked float median faster on the CPU, so this module runs a sliding-window histogram (Huang's
algorithm, extended to 3D) compiled with numba:

1. every value gets a bin code: its position among ~4096 quantiles of the values (any monotone
   binning is exact; quantiles keep the bins evenly filled);
2. along each line in z, the histogram of the window's codes is updated by the plane that leaves
   and the plane that enters, and the bin holding the median (the k-th code, k = n // 2) is tracked
   from the previous voxel's, together with the count of values below it;
3. the exact median is the (k - below)-th smallest value of the window inside that bin: when the
   bin holds one value of the window (usual for smooth maps), it is the XOR of the bit patterns kept
   per bin (XOR adds and removes exactly); otherwise the window is scanned for the bin's values.

The result is bit for bit scipy's (median = the k-th order statistic, which does not depend on how
ties are ordered). Inputs with NaN fall back to scipy. The first call in a process compiles the
kernel (a few seconds; numba caches it on disk for later processes).
"""

from __future__ import annotations

import contextlib

import numpy as np
from numba import njit, prange
from scipy import ndimage

N_BINS = 4096
_SAMPLE = 1 << 17  # values used to place the bin edges


@njit(parallel=True, cache=True, nogil=True)
def _bin_codes_of(values, edges, codes):  # pragma: no cover (compiled)
    """codes[i] = number of edges <= values[i] (a binary search per value; values are not NaN)."""
    n_edges = edges.shape[0]
    for i in prange(values.shape[0]):
        v = values[i]
        lo, hi = 0, n_edges
        while lo < hi:
            mid = (lo + hi) >> 1
            if edges[mid] <= v:
                lo = mid + 1
            else:
                hi = mid
        codes[i] = lo


@njit(parallel=True, cache=True, nogil=True)
def _median_lines(vals, bits, codes, keep, wx, wy, wz, n_bins, out, out_bits):  # pragma: no cover (compiled)
    # vals / bits / codes: edge-padded by the window's half widths; keep / out: unpadded (X, Y, Z);
    # bits / out_bits: the int32 views of vals / out
    nx, ny, nz = keep.shape
    k = (wx * wy * wz) // 2
    for x in prange(nx):
        hist = np.zeros(n_bins, np.int32)
        xor = np.zeros(n_bins, np.int32)
        buf = np.empty(wx * wy * wz, vals.dtype)
        for y in range(ny):
            z0 = -1
            z1 = -1
            for z in range(nz):
                if keep[x, y, z]:
                    if z0 < 0:
                        z0 = z
                    z1 = z
            if z0 < 0:
                continue
            hist[:] = 0
            xor[:] = 0
            for a in range(wx):
                for b in range(wy):
                    for e in range(wz):
                        c = codes[x + a, y + b, z0 + e]
                        hist[c] += 1
                        xor[c] ^= bits[x + a, y + b, z0 + e]
            med = 0
            below = 0
            while below + hist[med] <= k:
                below += hist[med]
                med += 1
            for z in range(z0, z1 + 1):
                if z > z0:
                    for a in range(wx):
                        for b in range(wy):
                            c = codes[x + a, y + b, z - 1]
                            hist[c] -= 1
                            xor[c] ^= bits[x + a, y + b, z - 1]
                            if c < med:
                                below -= 1
                            c = codes[x + a, y + b, z + wz - 1]
                            hist[c] += 1
                            xor[c] ^= bits[x + a, y + b, z + wz - 1]
                            if c < med:
                                below += 1
                    while below > k:
                        med -= 1
                        below -= hist[med]
                    while below + hist[med] <= k:
                        below += hist[med]
                        med += 1
                if not keep[x, y, z]:
                    continue
                if hist[med] == 1:
                    out_bits[x, y, z] = xor[med]
                    continue
                n = 0
                for a in range(wx):
                    for b in range(wy):
                        for e in range(wz):
                            if codes[x + a, y + b, z + e] == med:
                                buf[n] = vals[x + a, y + b, z + e]
                                n += 1
                for i in range(1, n):  # insertion sort: a bin holds few values of a window
                    v = buf[i]
                    j = i - 1
                    while j >= 0 and buf[j] > v:
                        buf[j + 1] = buf[j]
                        j -= 1
                    buf[j + 1] = v
                out[x, y, z] = buf[k - below]



def masked_median(volume: np.ndarray, size: int | tuple[int, int, int], mask: np.ndarray) -> np.ndarray:
    """`np.where(mask, scipy.ndimage.median_filter(volume, size, mode="nearest"), 0)` as float32,
    computing the median only where `mask` is True. `volume`, `mask`: 3D arrays of one shape;
    `size`: odd window side(s)."""
    sizes = (size,) * 3 if np.isscalar(size) else tuple(int(s) for s in size)
    if len(sizes) != 3 or any(s < 1 or s % 2 == 0 for s in sizes):
        raise ValueError(f"window sizes must be three odd numbers >= 1, got {size}")
    if volume.shape != mask.shape or volume.ndim != 3:
        raise ValueError(f"volume and mask must be 3D arrays of one shape, got {volume.shape} and {mask.shape}")
    vol = np.ascontiguousarray(volume, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(vol.shape, np.float32)
    if np.isnan(vol).any():
        return np.where(mask, ndimage.median_filter(vol, size=sizes, mode="nearest"), 0).astype(np.float32)
    # slide along the longest of the last two axes whose window is > 1 (2D images: along y)
    axis = 2 if sizes[2] > 1 or sizes[1] == 1 else 1
    if axis == 1:
        vol, mask, sizes = vol.transpose(0, 2, 1), mask.transpose(0, 2, 1), (sizes[0], sizes[2], sizes[1])
    vol, mask = np.ascontiguousarray(vol), np.ascontiguousarray(mask)
    with threads_of_torch():
        codes = _bin_codes(vol)
        pad = [(s // 2, s // 2) for s in sizes]
        padded = np.pad(vol, pad, mode="edge")
        result = np.zeros(vol.shape, np.float32)
        _median_lines(padded, padded.view(np.int32), np.pad(codes, pad, mode="edge"), mask,
                      sizes[0], sizes[1], sizes[2], N_BINS, result, result.view(np.int32))
    return result.transpose(0, 2, 1).copy() if axis == 1 else result


@contextlib.contextmanager
def threads_of_torch():
    """Run numba's parallel kernels on PyTorch's thread count (`anomaseg.threads`' policy), and
    leave that count as it was.

    numba's OpenMP threading layer shares libgomp with PyTorch and sets the thread count of the
    whole process to its own (all cores) on the first parallel call: a process limited to one
    thread (OMP_NUM_THREADS=1, `--workers`) then trained its next model on two threads, 10x slower
    on a 2-core machine that other jobs share (measured in benchmarks/study_defaults.py runs)."""
    from anomaseg import threads

    count = threads.current()
    threads.apply(count)  # numba is loaded here, so it gets the same count
    try:
        yield
    finally:
        threads.apply(count)


def _bin_codes(vol: np.ndarray) -> np.ndarray:
    """Each value's bin (uint16): its position among the quantiles of a sample of the values."""
    flat = vol.reshape(-1)
    sample = flat if flat.size <= _SAMPLE else flat[np.random.default_rng(0).integers(0, flat.size, _SAMPLE)]
    edges = np.unique(np.quantile(sample, np.linspace(0, 1, N_BINS + 1)[1:-1]).astype(np.float32))
    codes = np.empty(vol.size, np.uint16)
    _bin_codes_of(flat, edges, codes)
    return codes.reshape(vol.shape)
