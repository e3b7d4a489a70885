"""`anomaseg preprocess`: raw scans -> model-ready volumes, on SimpleITK (ITK) and nilearn's MNI152.

Per case, in this order (each step can be switched off; every parameter goes into the case's log):

1. **Reorient** every image to one canonical axis order (ITK's LPS voxel order; the NIfTI files
   written say so in their affine, so viewers show them as before).
2. **N4 bias-field correction** (Tustison et al. 2010, ITK's N4BiasFieldCorrectionImageFilter) of
   every modality, fitted on a 4x shrunken copy inside an Otsu foreground mask, then divided out at
   full resolution.
3. **Resampling of the reference modality to isotropic voxels** (`spacing` mm, B-spline), over the
   same physical extent.
4. **Co-registration** of every other modality to the reference (rigid by default, or affine;
   Mattes mutual information, 3-level pyramid, regular sampling), resampled onto the reference grid.
5. Optional **affine registration to MNI152** (nilearn's template at 1 or 2 mm, whichever is
   closer to `spacing`): every output then lies on the template's grid, resampled in one step
   from the original voxels (transforms are composed, never resampled twice).
6. **Brain mask**: the case's own mask (assumed on the reference modality's grid) carried along
   with nearest-neighbour resampling; without one, nilearn's MNI152 brain mask brought back to the
   subject through the inverse of step 5's registration. That is **an approximation of skull
   stripping**, not a replacement: an affine registration matches the brain's outline only to a few
   millimetres, so use a real skull-stripping tool (HD-BET, SynthStrip, ROBEX) when the border
   matters, and pass its mask in. Lesion labels are carried along like a given mask.

Deterministic (fixed sampling, one ITK thread per case), parallel over cases (processes),
resumable (a case whose log exists is skipped; each case is written under a temporary name, then
renamed), and every case gets a JSON log of what was done (steps, parameters, the registration
matrices, the final metric values, timings).

Output: a dataset of the same kind as the input. Case folders `OUT/<case>/<case>_<modality>.nii.gz`
(+ `_mask`, `_seg`, `_preprocess.json`) for folder or datalist inputs; for a BIDS dataset a
BIDS-derivatives dataset (`sub-XX/[ses-YY/]anat/sub-XX_[ses-YY_][space-MNI152NLin2009cSym_]desc-preproc_<suffix>.nii.gz`,
`..._desc-brain_mask`, `..._label-lesion_mask`, `..._desc-preproc_log.json` listed in `.bidsignore`,
participants.tsv copied), which `--data` reads as a BIDS root, `--select` included.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from anomaseg import threads
from anomaseg.atomic import atomic_dir, write_text
from anomaseg.errors import InputError

MNI_SPACE = "MNI152NLin2009cSym"  # what nilearn ships (ICBM 2009c nonlinear symmetric)
_BIDS_SUFFIX = {"t1": "T1w", "t1ce": "T1w", "t2": "T2w", "flair": "FLAIR"}


@dataclass(frozen=True)
class PreprocessConfig:
    reference: str = "flair"  # modality every other one is registered to
    spacing: float = 1.0  # isotropic voxel size in mm (on the MNI grid: 1 or 2)
    n4: bool = True
    coregistration: str = "rigid"  # rigid | affine | none
    mni: bool = False  # affine registration to MNI152
    iterations: int = 100  # optimiser iterations per pyramid level
    samples: int = 100_000  # voxels sampled (on a regular grid) by the registration metric per level
    n4_iterations: tuple[int, ...] = (50, 50, 30)

    def __post_init__(self):
        if self.coregistration not in ("rigid", "affine", "none"):
            raise ValueError(f"coregistration must be rigid, affine or none, got {self.coregistration!r}")
        if not self.spacing > 0:
            raise ValueError(f"spacing must be > 0 mm, got {self.spacing}")


# --------------------------------------------------------------------------- single steps
def _sitk():
    import SimpleITK as sitk

    return sitk


def read_image(path: Path):
    """A SimpleITK image in float32, reoriented to ITK's canonical LPS voxel order."""
    sitk = _sitk()
    try:
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise InputError(path, f"cannot read image ({str(exc).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3:
        raise InputError(path, f"expected a 3D image, got {image.GetDimension()}D")
    return sitk.DICOMOrient(image, "LPS")


def n4_correct(image, iterations=(50, 50, 30), shrink: int = 4):
    """N4 bias-field correction; returns (corrected image, bias field) on the image's grid."""
    sitk = _sitk()
    mask = sitk.OtsuThreshold(image, 0, 1, 200)
    small = sitk.Shrink(image, [shrink] * 3) if min(image.GetSize()) >= 4 * shrink else image
    small_mask = sitk.Shrink(mask, [shrink] * 3) if small is not image else mask
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    n4.Execute(sitk.Clamp(small, sitk.sitkFloat32, 0.0) + 1e-3, small_mask)  # N4 needs positive values
    log_field = n4.GetLogBiasFieldAsImage(image)
    field = sitk.Exp(log_field)
    return sitk.Cast(image / field, sitk.sitkFloat32), field


def isotropic_grid(image, spacing: float):
    """A reference image (no voxels needed) with `spacing` mm voxels over `image`'s extent."""
    sitk = _sitk()
    size = [max(1, int(round(n * s / spacing))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetDirection(image.GetDirection())
    # keep the extent centred: the first voxel centre moves by half the change of voxel size
    old, new = np.array(image.GetSpacing()), np.array([spacing] * 3)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    grid.SetOrigin(tuple(np.array(image.GetOrigin()) + direction @ ((new - old) / 2)))
    grid.SetSpacing(tuple(new))
    return grid


def resample(image, grid, transform=None, label: bool = False):
    sitk = _sitk()
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkBSpline
    out = sitk.Resample(image, grid, transform or sitk.Transform(), interpolator, 0.0,
                        image.GetPixelID())
    return out if label else sitk.Cast(out, sitk.sitkFloat32)


def register(fixed, moving, kind: str = "rigid", iterations: int = 100, samples: int = 100_000,
             initial=None):
    """Transform mapping fixed-image points to moving-image points (ITK's convention), by Mattes
    mutual information, a 3-level pyramid (4x, 2x, 1x) and at most `samples` voxels per level on a
    regular grid (deterministic). Returns (transform, final metric value)."""
    sitk = _sitk()
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    if initial is None:
        base = sitk.Euler3DTransform() if kind == "rigid" else sitk.AffineTransform(3)
        initial = sitk.CenteredTransformInitializer(fixed, moving, base,
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
    elif kind == "affine" and not isinstance(initial, sitk.AffineTransform):
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(initial.GetMatrix())
        affine.SetTranslation(initial.GetTranslation())
        affine.SetCenter(initial.GetCenter())
        initial = affine
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    shrinks = [4, 2, 1]
    voxels = [np.prod([max(1, n // f) for n in fixed.GetSize()]) for f in shrinks]
    method.SetMetricSamplingPercentagePerLevel([float(min(1.0, samples / v)) for v in voxels], 1)
    method.SetInterpolator(sitk.sitkLinear)
    # steps of 2 mm (physical shift scales), shrinking by 0.8 when the direction turns: of the
    # optimisers SimpleITK offers, the one that recovered the tests' rotations (6-10 degrees, small
    # 2 mm heads, across contrasts) within a degree at the lowest cost; faster settings stopped early
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4,
                                                    numberOfIterations=iterations,
                                                    relaxationFactor=0.8, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrinks)
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    transform = method.Execute(fixed, moving)
    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0)
    if hasattr(transform, "Downcast"):
        transform = transform.Downcast()  # the concrete Euler3D / Affine transform
    return transform, float(method.GetMetricValue())


def _matrix(transform) -> list:
    """A transform as a 4x4 matrix (physical LPS mm, fixed -> moving), for the log."""
    sitk = _sitk()
    t = transform
    try:
        a = sitk.AffineTransform(3)
        a.SetMatrix(t.GetMatrix())
        a.SetTranslation(t.GetTranslation())
        a.SetCenter(t.GetCenter())
    except (AttributeError, RuntimeError, TypeError):
        return []
    m = np.eye(4)
    m[:3, :3] = np.array(a.GetMatrix()).reshape(3, 3)
    c = np.array(a.GetCenter())
    m[:3, 3] = np.array(a.GetTranslation()) + c - m[:3, :3] @ c
    return m.round(6).tolist()


def mni_template(spacing: float):
    """nilearn's MNI152 template and brain mask as SimpleITK images, at 1 or 2 mm."""
    sitk = _sitk()
    from nilearn import datasets

    resolution = 1 if spacing < 1.5 else 2
    out = []
    for img in (datasets.load_mni152_template(resolution=resolution),
                datasets.load_mni152_brain_mask(resolution=resolution)):
        data = np.asarray(img.get_fdata(), np.float32)
        out.append(_from_ras_array(data, img.affine))
    template, mask = out
    return template, sitk.Cast(mask > 0.5, sitk.sitkUInt8), resolution


def _from_ras_array(data: np.ndarray, affine: np.ndarray):
    """A (x, y, z) array with a NIfTI (RAS) affine -> SimpleITK image (LPS physical space)."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :4]
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((lps[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(lps[:3, 3]))
    return image


# --------------------------------------------------------------------------- one case
class _TimedSteps(list):
    """The log's step list: each step records the seconds since the previous one."""

    def __init__(self):
        super().__init__()
        self._last = time.perf_counter()

    def append(self, step: dict) -> None:
        now = time.perf_counter()
        step["seconds"] = round(now - self._last, 2)
        self._last = now
        super().append(step)


def preprocess_case(images: dict[str, Path], mask: Path | None, seg: Path | None, config: PreprocessConfig
                    ) -> tuple[dict, object, object | None, dict]:
    """Run every step on one case. Returns ({modality: image}, brain mask, labels or None, log)."""
    sitk = _sitk()
    # one ITK thread per case: deterministic, whatever the machine; cases run in parallel instead
    # (as many as anomaseg.threads.process_count allows)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    log: dict = {"config": asdict(config), "steps": _TimedSteps(), "inputs": {m: str(p) for m, p in images.items()}}
    t0 = time.perf_counter()
    if config.reference not in images:
        raise InputError(next(iter(images.values())), f"reference modality {config.reference!r} missing "
                                                      f"(found: {', '.join(images)})")
    raw = {m: read_image(p) for m, p in images.items()}
    log["steps"].append({"step": "reorient", "to": "LPS",
                         "input_spacing_mm": {m: list(im.GetSpacing()) for m, im in raw.items()}})
    if config.n4:
        for m in raw:
            raw[m], field = n4_correct(raw[m], config.n4_iterations)
            f = sitk.GetArrayViewFromImage(field)
            log["steps"].append({"step": "n4", "modality": m, "iterations": list(config.n4_iterations),
                                 "bias_field_range": [round(float(f.min()), 4), round(float(f.max()), 4)]})
    ref = raw[config.reference]
    grid = isotropic_grid(ref, config.spacing)
    to_ref = {config.reference: sitk.Transform()}
    for m, im in raw.items():
        if m == config.reference:
            continue
        if config.coregistration == "none":
            to_ref[m] = sitk.Transform()
            continue
        t, metric = register(ref, im, config.coregistration, config.iterations, config.samples)
        to_ref[m] = t
        log["steps"].append({"step": "coregister", "modality": m, "to": config.reference,
                             "kind": config.coregistration, "mattes_mi": round(metric, 5),
                             "matrix_ref_to_modality": _matrix(t)})
    to_mni = None
    if config.mni:
        template, template_mask, resolution = mni_template(config.spacing)
        to_mni, metric = register(template, ref, "rigid", config.iterations, config.samples)
        to_mni, metric = register(template, ref, "affine", config.iterations, config.samples, initial=to_mni)
        grid = template
        log["steps"].append({"step": "register_mni152", "template": f"nilearn MNI152 {resolution} mm ({MNI_SPACE})",
                             "kind": "affine", "mattes_mi": round(metric, 5),
                             "matrix_template_to_reference": _matrix(to_mni)})

    def chain(t):  # output grid point -> (MNI ->) reference -> modality
        if to_mni is None:
            return t
        c = sitk.CompositeTransform(3)
        c.AddTransform(t)
        c.AddTransform(to_mni)  # applied first
        return c

    out = {m: resample(raw[m], grid, chain(to_ref[m])) for m in raw}
    log["steps"].append({"step": "resample", "spacing_mm": list(grid.GetSpacing()), "size": list(grid.GetSize()),
                         "interpolation": "bspline (images), nearest (masks, labels)"})
    ref_grid_of_input = sitk.ReadImage(str(images[config.reference]))  # masks and labels lie on it
    if mask is not None:
        brain = resample(_label_on(mask, ref_grid_of_input), grid, chain(sitk.Transform()), label=True)
        log["steps"].append({"step": "brain_mask", "source": str(mask)})
    elif config.mni:
        brain = resample(template_mask, grid, sitk.Transform(), label=True)
        log["steps"].append({"step": "brain_mask", "source": "MNI152 brain mask on the template grid "
                                                             "(approximation of skull stripping)"})
    else:
        template, template_mask, _ = mni_template(config.spacing)
        t, metric = register(template, ref, "rigid", config.iterations, config.samples)
        t, metric = register(template, ref, "affine", config.iterations, config.samples, initial=t)
        brain = resample(template_mask, grid, t.GetInverse(), label=True)
        log["steps"].append({"step": "brain_mask", "source": "MNI152 brain mask brought back to the subject "
                                                             "by the inverse affine (approximation of skull "
                                                             "stripping)", "mattes_mi": round(metric, 5),
                             "matrix_template_to_reference": _matrix(t)})
    labels = None
    if seg is not None:
        labels = resample(_label_on(seg, ref_grid_of_input), grid, chain(sitk.Transform()), label=True)
    log["seconds"] = round(time.perf_counter() - t0, 2)
    return out, brain, labels, log


def _label_on(path: Path, reference):
    """A mask/label image, checked to lie on the reference modality's voxel grid, reoriented to LPS."""
    sitk = _sitk()
    image = sitk.ReadImage(str(path))
    if image.GetSize() != reference.GetSize() or not np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-2) \
            or not np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-4):
        raise InputError(path, "mask/labels do not lie on the reference modality's voxel grid "
                               f"(size {image.GetSize()} vs {reference.GetSize()})")
    return sitk.DICOMOrient(sitk.Cast(image, sitk.sitkUInt8), "LPS")


# --------------------------------------------------------------------------- datasets
def _outputs(case, out_root: Path, bids_root: Path | None, config: PreprocessConfig):
    """(case folder to write, {role: file name}) for one case."""
    if bids_root is None:
        names = {m: f"{case.case_id}_{m}.nii.gz" for m in case.images}
        names.update(mask=f"{case.case_id}_mask.nii.gz", seg=f"{case.case_id}_seg.nii.gz",
                     log=f"{case.case_id}_preprocess.json")
        return out_root / case.case_id, names
    from anomaseg.data import bids

    stem = bids.case_id(bids.case_entities(case.case_id))
    space = f"_space-{MNI_SPACE}" if config.mni else ""
    names = {}
    for m in case.images:  # entity order of the BIDS specification: sub, ses, ce, space, desc
        ce = "_ce-contrast" if m == "t1ce" else ""
        names[m] = f"{stem}{ce}{space}_desc-preproc_{_BIDS_SUFFIX.get(m, m)}.nii.gz"
    names.update(mask=f"{stem}{space}_desc-brain_mask.nii.gz", seg=f"{stem}{space}_label-lesion_mask.nii.gz",
                 log=f"{stem}{space}_desc-preproc_log.json")
    return bids.output_folder(out_root, case.case_id), names


def _run_case(args) -> dict:
    case, folder, names, config = args
    sitk = _sitk()
    if (folder / names["log"]).exists():
        return {"case_id": case.case_id, "status": "skipped (already done)"}
    images = {m: ref.path for m, ref in case.images.items()}
    out, brain, labels, log = preprocess_case(images, case.mask, case.seg, config)
    log["case_id"] = case.case_id
    with atomic_dir(folder) as tmp:
        for m, image in out.items():
            sitk.WriteImage(image, str(tmp / names[m]), useCompression=True)
        sitk.WriteImage(brain, str(tmp / names["mask"]), useCompression=True)
        if labels is not None:
            sitk.WriteImage(labels, str(tmp / names["seg"]), useCompression=True)
        write_text(tmp / names["log"], json.dumps(log, indent=1))
    return {"case_id": case.case_id, "status": "done", "seconds": log["seconds"]}


def preprocess_dataset(data: str | Path, out: str | Path, config: PreprocessConfig = PreprocessConfig(),
                       workers: int | None = None, bids=None, progress: bool = True,
                       modalities: list[str] | None = None) -> list[dict]:
    """Preprocess every case of `data` into `out` (see the module docstring); returns one status
    row per case. Finished cases (their log exists) are skipped, so an interrupted run resumes.
    `modalities` limits the images processed (default: every image of a case)."""
    from dataclasses import replace

    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from anomaseg.data import bids as bids_io
    from anomaseg.data.layout import find_cases

    data, out = Path(data), Path(out)
    wanted = [config.reference] + [m for m in modalities or [] if m != config.reference]
    cases = find_cases(data, wanted, bids=bids)
    if modalities:
        cases = [replace(c, images={m: c.image(m) for m in wanted}) for c in cases]
    bids_root = data if bids_io.is_bids_root(data) else None
    if out.resolve() == data.resolve():
        raise InputError(out, "--out must differ from --data (inputs are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(case,) + _outputs(case, out, bids_root, config) + (config,) for case in cases]
    workers = max(1, min(workers or threads.process_count(), len(jobs)))  # anomaseg.threads' policy
    rows = []
    with tqdm(total=len(jobs), desc="preprocessing", unit="case", disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                rows.append(_run_case(job))
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for row in pool.map(_run_case, jobs):
                    rows.append(row)
                    bar.update()
    if bids_root is not None:
        bids_io.write_description(out, bids_root, "preprocessing (N4, resampling, co-registration)")
        write_text(out / ".bidsignore", "*_log.json\npreprocess.json\n")
        for name in ("participants.tsv", "participants.json"):
            if (bids_root / name).is_file():
                shutil.copy(bids_root / name, out / name)
    write_text(out / "preprocess.json", json.dumps({"data": str(data.resolve()), "config": asdict(config),
                                                    "cases": rows}, indent=1))
    return rows
