"""Does `anomaseg preprocess` bring degraded scans back to what the model expects?

1. The demo's setting: phantom at 2 mm (FLAIR + T2), a spatial VAE trained on the healthy cases,
   evaluated on the lesioned ones: the **clean** copy.
2. The same lesioned subjects written at 1 mm and **degraded** as raw scans come: rotated (10
   degrees about a random axis, the T2 by 3 more degrees than the FLAIR, so co-registration has
   work to do), shifted (up to 5 mm), multiplied by a smooth bias field (exp of a random quadratic,
   typically within +-30%) and resampled to
   2 x 1 x 1 mm voxels. Brain mask and labels follow the FLAIR (nearest neighbour).
3. `anomaseg preprocess --mni --spacing 2` on the degraded copy (N4, co-registration of T2 to
   FLAIR, affine registration to MNI152, the given brain mask carried along); and once more
   without the brain masks (`template_mask`: the MNI152 mask brought back, the documented
   approximation of skull stripping; with --template-mask).
4. The same model (and the intensity baseline, in the same pass) evaluated on every copy.

Target: pixel AUPRC on the preprocessed copy within 0.02 of the clean copy.

    python benchmarks/bench_preprocess.py [--healthy 80] [--lesioned 12] [--epochs 12] [--workers 2]
        [--template-mask] [--work DIR [--reuse] [--run RUN]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from anomaseg import demo  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.data.phantom import make_phantom  # noqa: E402
from anomaseg.evaluation import evaluate_dataset  # noqa: E402
from anomaseg.preprocess import PreprocessConfig, preprocess_dataset  # noqa: E402
from anomaseg.calibration import calibrate  # noqa: E402
from anomaseg.training import train  # noqa: E402

KEYS = ("pixel_auroc", "pixel_auprc", "dice_best", "per_volume_dice_mean", "lesion_recall")
MODALITIES = ["flair", "t2"]


def degrade_case(src: Path, dst: Path, rng: np.random.Generator, write: bool = True) -> dict:
    """Rotate, shift, bias and resample one 1 mm case to 2 x 1 x 1 mm (see the module docstring);
    `write=False` only draws the same parameters (for a rerun on existing copies)."""
    import SimpleITK as sitk

    case = src.name
    flair = sitk.ReadImage(str(src / f"{case}_flair.nii.gz"), sitk.sitkFloat32)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    shift = rng.uniform(-5, 5, 3)
    centre = flair.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in flair.GetSize()])

    def rotation(degrees):
        t = sitk.VersorRigid3DTransform()
        t.SetCenter(centre)
        t.SetRotation(tuple(axis), float(np.radians(degrees)))
        t.SetTranslation(tuple(shift))
        return t

    grid = sitk.Image([int(round(flair.GetSize()[0] / 2)), *flair.GetSize()[1:]], sitk.sitkUInt8)
    grid.SetSpacing((2.0, 1.0, 1.0))
    grid.SetDirection(flair.GetDirection())
    grid.SetOrigin(flair.TransformContinuousIndexToPhysicalPoint((0.5, 0, 0)))  # same extent as the 1 mm grid
    x = (np.arange(grid.GetSize()[0]) / grid.GetSize()[0] - 0.5)[None, None, :]
    y = (np.arange(grid.GetSize()[1]) / grid.GetSize()[1] - 0.5)[None, :, None]
    z = (np.arange(grid.GetSize()[2]) / grid.GetSize()[2] - 0.5)[:, None, None]
    c = rng.uniform(-0.5, 0.5, 4)
    bias = np.exp(c[0] * x + c[1] * y + c[2] * z + c[3] * (x * y + y * z))  # smooth, typically +-30%
    dst.mkdir(parents=True, exist_ok=True)
    files = (("flair", 10, False), ("t2", 13, False), ("mask", 10, True), ("seg", 10, True))
    for name, degrees, label in files if write else ():
        path = src / f"{case}_{name}.nii.gz"
        if not path.exists():
            continue
        image = sitk.ReadImage(str(path), sitk.sitkUInt8 if label else sitk.sitkFloat32)
        t = rotation(degrees).GetInverse()  # the subject turned by `degrees` in the scanner
        out = sitk.Resample(image, grid, t, sitk.sitkNearestNeighbor if label else sitk.sitkBSpline, 0.0,
                            image.GetPixelID())
        if not label:
            arr = sitk.GetArrayFromImage(out) * bias
            out2 = sitk.GetImageFromArray(np.maximum(arr, 0).astype(np.float32))
            out2.CopyInformation(out)
            out = out2
        sitk.WriteImage(out, str(dst / f"{case}_{name}.nii.gz"), useCompression=True)
    return {"case": case, "axis": axis.round(3).tolist(), "degrees": 10, "t2_degrees": 13,
            "shift_mm": shift.round(2).tolist(), "bias_coefficients": c.round(3).tolist()}


def _subset(folder: Path, cases: list[str], out: Path) -> Path:
    """A folder of links to the named case folders (every copy is evaluated on the same cases)."""
    out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        if not (out / case).exists():
            (out / case).symlink_to((folder / case).resolve())
    return out


def evaluate(run: Path, data: Path, out: Path) -> dict:
    m = evaluate_dataset(run, data, out, progress=False)
    row = {k: m.get(k) for k in KEYS}
    base = m.get("baseline") or {}
    row.update({f"baseline_{k}": base.get(k) for k in ("pixel_auroc", "pixel_auprc", "dice_best")})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--healthy", type=int, default=demo.DEMO["healthy"])
    ap.add_argument("--lesioned", type=int, default=demo.DEMO["lesioned"])
    ap.add_argument("--epochs", type=int, default=demo.DEMO["epochs"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template-mask", action="store_true",
                    help="also preprocess without the brain masks (MNI152 mask brought back) and evaluate that copy")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    ap.add_argument("--run", help="a run trained on WORK/p2/train with the demo's settings: reused instead of training")
    ap.add_argument("--reuse", action="store_true", help="reuse the phantoms and degraded copies already in --work")
    ap.add_argument("--no-preprocess", action="store_true",
                    help="with --reuse: evaluate the cases already preprocessed in WORK/pre (all copies on those cases)")
    ap.add_argument("--out", default=str(ROOT / "results" / "preprocess.json"))
    args = ap.parse_args()
    times: dict = {}
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        os.environ.setdefault("ANOMASEG_CACHE", str(work / "cache"))
        t = time.perf_counter()
        if not (args.reuse and (work / "p1" / "test").is_dir()):
            make_phantom(work / "p2", args.healthy, args.lesioned, seed=args.seed, resolution=2, modalities=MODALITIES)
            make_phantom(work / "p1", 0, args.lesioned, seed=args.seed, resolution=1, modalities=MODALITIES)
        times["phantoms"] = time.perf_counter() - t

        t = time.perf_counter()
        rng = np.random.default_rng(args.seed)
        degradations = [degrade_case(c, work / "degraded" / c.name, rng, write=not args.reuse)
                        for c in sorted((work / "p1" / "test").iterdir()) if c.is_dir()]
        times["degrade"] = time.perf_counter() - t

        t = time.perf_counter()
        config = PreprocessConfig(reference="flair", spacing=2.0, mni=True)
        if not args.no_preprocess:
            preprocess_dataset(work / "degraded", work / "pre", config, workers=args.workers, progress=False)
        times["preprocess"] = time.perf_counter() - t
        cases = sorted(d.name for d in (work / "pre").iterdir() if (d / f"{d.name}_preprocess.json").exists())
        copies = {name: _subset(folder, cases, work / "subsets" / name) for name, folder in
                  (("clean", work / "p2" / "test"), ("degraded", work / "degraded"), ("preprocessed", work / "pre"))}
        if args.template_mask:
            t = time.perf_counter()
            no_masks = work / "degraded_nomask"
            for c in (work / "degraded").iterdir():
                (no_masks / c.name).mkdir(parents=True, exist_ok=True)
                for f in c.iterdir():
                    if not f.name.endswith("_mask.nii.gz"):
                        (no_masks / c.name / f.name).symlink_to(f)
            preprocess_dataset(no_masks, work / "pre_template_mask", config, workers=args.workers, progress=False)
            times["preprocess_template_mask"] = time.perf_counter() - t
            copies["preprocessed_template_mask"] = _subset(work / "pre_template_mask", cases, work / "subsets" / "tm")

        t = time.perf_counter()
        plan = dict(demo.DEMO, healthy=args.healthy, epochs=args.epochs, modalities=MODALITIES)
        run = Path(args.run) if args.run else work / "run"
        if not args.run:
            cfg = demo.demo_config(plan, args.seed)
            cfg.train_dir = str((work / "p2" / "train").resolve())
            train(cfg, run, progress=False)
            calibrate(run, progress=False, force=True)
        times["train"] = time.perf_counter() - t

        rows = {}
        for name, data in copies.items():
            t = time.perf_counter()
            rows[name] = evaluate(run, data, work / f"eval_{name}")
            times[f"evaluate_{name}"] = time.perf_counter() - t
            print(name, json.dumps(rows[name]), flush=True)
        logs = [json.loads(p.read_text()) for p in sorted((work / "pre").glob("*/*_preprocess.json"))]
        step_seconds = {}
        for log in logs:
            for step in log["steps"]:
                step_seconds[step["step"]] = round(step_seconds.get(step["step"], 0) + step["seconds"], 1)

    gap = rows["preprocessed"]["pixel_auprc"] - rows["clean"]["pixel_auprc"]
    report = {
        "date": time.strftime("%Y-%m-%d"), "args": vars(args), "plan": plan,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "lscpu_flags": _lscpu_flags(), "load_average_at_start": load_at_start,
                    "load_average_at_end": os.getloadavg()},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "preprocess_seconds_per_case": [log["seconds"] for log in logs], "preprocess_seconds_by_step": step_seconds,
        "degradations": degradations, "cases_evaluated": cases, "results": rows,
        "auprc_preprocessed_minus_clean": gap, "target_met": abs(gap) <= 0.02,
    }
    write_text(Path(args.out), json.dumps(report, indent=1))
    print("\n| copy | pixel AUROC | pixel AUPRC | dice_best | per-volume Dice | lesion recall | baseline AUPRC | baseline dice_best |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['pixel_auroc']:.3f} | {r['pixel_auprc']:.3f} | {r['dice_best']:.3f} | "
              f"{r['per_volume_dice_mean']:.3f} | {r['lesion_recall']:.3f} | {r['baseline_pixel_auprc']:.3f} | "
              f"{r['baseline_dice_best']:.3f} |")
    print(f"\nAUPRC preprocessed - clean: {gap:+.3f} (target |gap| <= 0.02: {'met' if abs(gap) <= 0.02 else 'NOT met'})")


def _lscpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))]
    return f"{model}; {' '.join(keep)}"


if __name__ == "__main__":
    main()
