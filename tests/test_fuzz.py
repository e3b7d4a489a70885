"""Property-based fuzzing (hypothesis) of the loaders and the metrics.

Loaders: random NIfTI headers and shapes, random datalists, random folder layouts. Whatever comes
in, a loader returns a valid result or raises InputError naming a file; any other exception (a
traceback for the user) fails the test. Metrics: random scores and labels against scikit-learn.

The normal suite runs a bounded number of examples (a few seconds); `make fuzz` (benchmarks/fuzz.py)
runs many more with random seeds: ANOMASEG_FUZZ_EXAMPLES=N.
"""

from __future__ import annotations

import json
import math
import os
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaseg.data.io import load_volume
from anomaseg.data.layout import find_cases
from anomaseg.data.slices import SliceSpec, load_case_volumes
from anomaseg.errors import InputError
from anomaseg.metrics import VoxelMetrics, binary_auprc, binary_auroc
from hostile import raw_nifti

EXAMPLES = int(os.environ.get("ANOMASEG_FUZZ_EXAMPLES", "0"))
FUZZING = EXAMPLES > 0
FUZZ = settings(max_examples=EXAMPLES or 40, deadline=None, derandomize=not FUZZING, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def _names_a_file(exc: InputError, *roots: Path) -> None:
    """The error names a path (a file or folder the user gave, or one inside it)."""
    assert exc.path is not None, str(exc)
    assert str(exc).startswith(f"{exc.path}: ")
    assert "\n" not in exc.problem
    if roots:
        assert any(r == exc.path or r in exc.path.parents or exc.path in r.parents for r in roots), (exc.path, roots)


# ------------------------------------------------------------------------------------ NIfTI headers
DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64, np.complex64]
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, 1e-30, 1e30, math.nan, math.inf, -math.inf]
floats = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e3, 1e3, allow_nan=False))


@st.composite
def nifti_files(draw):
    ndim = draw(st.integers(0, 7))
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    n = int(np.prod(shape)) if shape else 1
    full = n * np.dtype(dtype).itemsize
    size = draw(st.sampled_from([full, full, full, 0, full // 2, full + 17, draw(st.integers(0, 2 * full + 8))]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    if draw(st.booleans()) and size == full and n:  # plausible values, so that many files are valid
        data = (rng.random(n) * 100).astype(dtype).tobytes(order="F")
    fields = {}
    if draw(st.booleans()):
        fields["sform_code"] = draw(st.integers(0, 4))
        fields["qform_code"] = draw(st.integers(0, 4))
    for row in ("srow_x", "srow_y", "srow_z"):
        if draw(st.integers(0, 4)) == 0:
            fields[row] = [draw(floats) for _ in range(4)]
    if draw(st.integers(0, 3)) == 0:
        fields["pixdim"] = [1.0] + [draw(floats) for _ in range(7)]
    if draw(st.integers(0, 3)) == 0:
        fields["scl_slope"], fields["scl_inter"] = draw(floats), draw(floats)
    if draw(st.integers(0, 5)) == 0:
        fields["vox_offset"] = draw(st.sampled_from([0, 348, 352, 1000, 10**9]))
    gz = draw(st.booleans())
    kind = draw(st.sampled_from(["image", "segmentation", "mask"]))
    channel = draw(st.sampled_from([None, None, 0, 1, 5]))
    return shape, dtype, data, fields, gz, kind, channel


@FUZZ
@given(nifti_files())
def test_fuzz_nifti_headers(tmp_path_factory, spec):
    shape, dtype, data, fields, gz, kind, channel = spec
    folder = tmp_path_factory.mktemp("nii")
    try:
        path = raw_nifti(folder / ("f.nii.gz" if gz else "f.nii"), shape=shape, dtype=dtype, data=data, **fields)
    except Exception:  # nibabel refuses to even write this header (e.g. a field out of range)
        assume(False)
    for header_only in (True, False):
        try:
            vol = load_volume(path, kind=kind, channel=channel, header_only=header_only)
        except InputError as exc:
            _names_a_file(exc, path)
            continue
        assert len(vol.shape) == 3 and min(vol.shape) >= 1
        assert np.isfinite(vol.affine).all() and abs(np.linalg.det(vol.affine[:3, :3])) > 0
        if not header_only:
            assert vol.data.shape == vol.shape
            if kind == "image":
                assert vol.data.dtype == np.float32 and np.isfinite(vol.data).all()


# ------------------------------------------------------------------------------------ datalists
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                      st.text(max_size=8), st.sampled_from(["a.nii.gz", "b.nii.gz", "seg.nii.gz", "missing.nii", ""]))
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
entry = st.one_of(
    json_values,
    st.fixed_dictionaries({"image": st.one_of(json_values, st.sampled_from(["a.nii.gz", "b.nii.gz"]),
                                              st.lists(st.sampled_from(["a.nii.gz", "b.nii.gz", "4d.nii.gz"]), max_size=3))},
                          optional={"label": json_values, "seg": json_values, "mask": json_values,
                                    "id": st.one_of(json_values, st.text(max_size=12))}),
)
datalists = st.fixed_dictionaries({}, optional={
    "training": st.lists(entry, max_size=4),
    "test": st.lists(entry, max_size=3),
    "modality": st.one_of(json_values, st.dictionaries(st.sampled_from(["0", "1", "2", "x", "-1"]),
                                                       st.sampled_from(["FLAIR", "T2", "t1", "flair", 3]), max_size=3)),
})


@pytest.fixture(scope="module")
def datalist_files(tmp_path_factory):
    """Real images the fuzzed datalists may point to: 3D images, a segmentation, a 4D image."""
    import nibabel as nib

    folder = tmp_path_factory.mktemp("datalist_files")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image((rng.random((6, 7, 5)) + 0.5).astype(np.float32), np.eye(4)), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image((rng.random((6, 7, 5)) > 0.7).astype(np.uint8), np.eye(4)), folder / "seg.nii.gz")
    nib.save(nib.Nifti1Image((rng.random((6, 7, 5, 2)) + 0.5).astype(np.float32), np.eye(4)), folder / "4d.nii.gz")
    return folder


@FUZZ
@given(spec=datalists, raw=st.booleans(), modality=st.sampled_from([None, ["flair"], ["flair", "t2"]]))
def test_fuzz_datalists(datalist_files, spec, raw, modality):
    path = datalist_files / "list.json"
    path.write_text(json.dumps(spec) if not raw else json.dumps(spec)[:-1])
    try:
        cases = find_cases(path, modality)
    except InputError as exc:
        _names_a_file(exc, datalist_files)
        return
    assert cases and len({c.case_id for c in cases}) == len(cases)
    for case in cases:  # and every case found loads, or says which file is wrong
        try:
            load_case_volumes(case, SliceSpec(tuple(modality or [next(iter(case.images))]), image_size=32))
        except InputError as exc:
            _names_a_file(exc, datalist_files)


# ------------------------------------------------------------------------------------ folder layouts
name_chars = st.sampled_from(list(string.ascii_letters[:6] + "_-. 0ü"))
stems = st.text(name_chars, min_size=1, max_size=10).filter(lambda s: s not in (".", ".."))
suffixes = st.sampled_from([".nii.gz", ".nii.gz", ".nii", ".png", ".txt", ""])
modal = st.sampled_from(["", "_flair", "_t2", "_seg", "_mask", "-t1c", "_label", "_x"])
content = st.sampled_from(["image", "image", "seg", "garbage", "empty", "tiny", "dir", "link", "broken_link"])
layouts = st.lists(st.tuples(st.lists(stems, max_size=2), stems, modal, suffixes, content), max_size=8)


@FUZZ
@given(layout=layouts, modality=st.sampled_from([None, ["flair"], ["t2", "flair"]]))
def test_fuzz_folder_layouts(tmp_path_factory, datalist_files, layout, modality):
    root = tmp_path_factory.mktemp("layout")
    for folders, stem, mod, suffix, what in layout:
        path = root.joinpath(*folders, stem + mod + suffix)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                continue
            if what == "dir":
                path.mkdir()
            elif what == "link":
                path.symlink_to(datalist_files / "a.nii.gz")
            elif what == "broken_link":
                path.symlink_to(root / "nowhere")
            elif what in ("image", "seg", "tiny"):
                src = {"image": "a", "seg": "seg", "tiny": "a"}[what]
                path.write_bytes((datalist_files / f"{src}.nii.gz").read_bytes())
            else:
                path.write_bytes(b"" if what == "empty" else os.urandom(64))
        except (FileExistsError, NotADirectoryError):
            continue  # a file where a folder is wanted: this layout cannot be made
    try:
        cases = find_cases(root, modality)
    except InputError as exc:
        _names_a_file(exc, root)
        return
    assert len({c.case_id for c in cases}) == len(cases)
    for case in cases:
        try:
            load_case_volumes(case, SliceSpec(tuple(modality or [next(iter(case.images))]), image_size=32))
        except InputError as exc:
            _names_a_file(exc, root, datalist_files)


# ------------------------------------------------------------------------------------ metrics
def _quantised(scores: np.ndarray, bits: int = 20) -> np.ndarray:
    """What VoxelMetrics sees: scores within one bin (the top `bits` bits of the float32) are ties."""
    u = scores.astype(np.float32).view(np.uint32) & np.uint32(~((1 << (32 - bits)) - 1) & 0xFFFFFFFF)
    q = u.view(np.float32).copy()
    q[q == 0] = 0.0  # -0.0 and +0.0 tie
    return q


score_arrays = st.integers(2, 300).flatmap(lambda n: st.tuples(
    st.lists(st.one_of(st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32),
                       st.sampled_from([0.0, -0.0, 1.0, 0.5, math.inf, -math.inf])), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n),
    st.integers(1, 4),
))


@FUZZ
@given(score_arrays)
def test_fuzz_voxel_metrics_against_sklearn(data):
    values, labels, chunks = data
    s, y = np.array(values, np.float32), np.array(labels, bool)
    m = VoxelMetrics()
    for part_s, part_y in zip(np.array_split(s, chunks), np.array_split(y, chunks)):  # streaming, any split
        m.update(part_s, part_y)
    got = m.compute()
    qs = _quantised(s)
    q = qs.astype(np.float64)
    q[np.isposinf(q)], q[np.isneginf(q)] = 1e300, -1e300  # sklearn refuses infinities; same order
    if 0 < y.sum() < len(y):
        assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, q), abs=1e-9)
    if y.any():
        assert got["pixel_auprc"] == pytest.approx(average_precision_score(y, q), abs=1e-9)
        best = max(2 * (y & (qs > t)).sum() / ((qs > t).sum() + y.sum()) for t in np.concatenate([[-np.inf], np.unique(qs)]))
        assert got["dice_best"] == pytest.approx(best, abs=1e-12)
        pred = s > got["dice_best_threshold"]  # the reported threshold reproduces the reported Dice
        assert 2 * (pred & y).sum() / (pred.sum() + y.sum()) == pytest.approx(got["dice_best"], abs=1e-12)


@FUZZ
@given(score_arrays)
def test_fuzz_exact_metrics_against_sklearn(data):
    values, labels, _ = data
    s = np.array([v if math.isfinite(v) else math.copysign(1e30, v) for v in values])
    y = np.array(labels, bool)
    if 0 < y.sum() < len(y):
        assert binary_auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    else:
        with pytest.raises(ValueError):
            binary_auroc(s, y)
    if y.any():
        assert binary_auprc(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


@settings(FUZZ, max_examples=EXAMPLES or 15)
@given(score_arrays, st.integers(0, 299))
def test_fuzz_nan_scores_are_refused_and_change_nothing(data, at):
    values, labels, _ = data
    s, y = np.array(values, np.float32), np.array(labels, bool)
    m = VoxelMetrics()
    m.update(s, y)
    before = m.compute()
    s[at % len(s)] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.update(s, y)
    after = m.compute()
    assert json.dumps(before, default=str) == json.dumps(after, default=str)


def test_dice_best_is_reachable_with_minus_inf_scores():
    """Found by the fuzzer: a -inf score labelled anomalous made dice_best count the point 'every
    voxel predicted', which no threshold reaches with the strict `score > t` rule."""
    s = np.array([-1.9, -0.14, 3.9, 4.3, -1.4, -np.inf], np.float32)
    y = np.array([True, False, True, True, False, True])
    got = VoxelMetrics()
    got.update(s, y)
    got = got.compute()
    pred = s > got["dice_best_threshold"]
    assert got["dice_best"] == pytest.approx(2 * (pred & y).sum() / (pred.sum() + y.sum())) == pytest.approx(2 / 3)
    only = VoxelMetrics()
    only.update(np.full(3, -np.inf, np.float32), np.array([True, False, True]))
    assert only.compute()["dice_best"] == 0.0
