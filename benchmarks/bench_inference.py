"""Scoring speed before and after the inference work (issues 12 and 13): slices/s of residual maps,
post-processing of a 1 mm volume, ONNX Runtime vs PyTorch, and volumes per minute end to end.

    python benchmarks/bench_inference.py [--repeats 3] [--before 4bc09a6] [--quick]

Set-up (under benchmarks/results/work/inference/, reused when present): phantoms at 1 mm (MNI152
1 mm grid, 197 x 233 x 189) and 2 mm, each with a spatial VAE run of the default configuration
(default image size, FLAIR, `--precision auto`) trained for a few steps (speed does not depend on
the weights) and without the case cache (`data.cache_dir: null`), so that end-to-end scoring really reads NIfTI.

Measured, each configuration interleaved with the others and repeated (medians reported):
1. slices/s of the residual map on the slices of 1 mm test cases: "before" = the scoring loop of
   the `--before` commit (the trained model as loaded, no_grad, batches of 64), "after" = the
   Scorer now (BatchNorm folded, channels_last weights, inference_mode, batch sized to the
   machine), each in fp32 and in the run's precision (`auto`: bf16 autocast where the CPU has
   AVX512-BF16/AMX); alternatives: ONNX Runtime (fp32) on the exported graph, and `torch.compile`
   of the folded model (fp32; its compile time is reported). Max |map difference| vs before (fp32).
2. post-processing of one 1 mm volume (the model's raw map of a lesioned case, put back on the
   voxel grid): before = scipy's median on the brain's box + erosion and labelling of the whole
   volume (the code of the `--before` commit), after = PostProcessor now. Outputs compared exactly.
3. volumes per minute of `anomaseg score` end to end (process start, read, predict, post-process,
   write NIfTI), at 1 mm and 2 mm: the `--before` commit's code (`git archive`, run with
   PYTHONPATH), this tree with 1 and 2 workers, and `score --onnx`. One warm-up run each first
   (numba's compile cache, file cache).
Results: benchmarks/results/inference.json (+ .md), with CPU model, flags and load averages.

    python benchmarks/bench_inference.py --default-map [--repeats 3]

measures only the default map (`grad_elbo`, whose backward pass `anomaseg export` writes into the
ONNX graph): seconds per 1 mm volume (the kept axial slices of each 1 mm test case, default size) of
the PyTorch Scorer (the run's precision and fp32) and of ONNX Runtime (`score --onnx`'s
OnnxScorer, fp32) on the run of the set-up above, exported with no option, and the largest
|map - PyTorch fp32 map| and |map - float64 map| per case as a fraction of the reference map's
range (the float64 map: the trained model in float64, showing float32's own error). `--run RUN
--test DIR` measures another run (e.g. `anomaseg demo`'s) instead. Results:
benchmarks/results/inference_default_map.json (+ .md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(REPO / "src"))

from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.data.layout import find_cases  # noqa: E402
from anomaseg.data.slices import prepare_cases  # noqa: E402
from anomaseg.boxes import bounding_box  # noqa: E402
from anomaseg.postprocess import PostProcessor, median_filter_3d  # noqa: E402
from anomaseg.runtime import autocast, fabric_precision  # noqa: E402
from anomaseg.run import load_run_config  # noqa: E402
from anomaseg.calibration import calibrate  # noqa: E402
from anomaseg.scorer import Scorer  # noqa: E402

WORK = ROOT / "results" / "work" / "inference"
BEFORE_DEFAULT = "4bc09a6"  # main before the inference work


# ---------------------------------------------------------------------------------------- set-up
def cli(*args: str, env: dict | None = None, quiet: bool = True) -> float:
    """Run `python -m anomaseg.cli ARGS` in a fresh process; returns its wall time in seconds."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anomaseg.cli", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.DEVNULL if quiet else None)
    return time.perf_counter() - t


def prepare(resolution: int, healthy: int, lesioned: int, steps: int) -> tuple[Path, Path]:
    data, run = WORK / f"phantom_{resolution}mm", WORK / f"run_{resolution}mm"
    if not (data / "phantom.json").exists():
        from anomaseg.data.phantom import make_phantom

        make_phantom(data, healthy, lesioned, seed=0, resolution=resolution, progress=True)
    if not (run / "calibration.json").exists():
        cli("train", "--data", str(data / "train"), "--out", str(run), "--epochs", "1",
            "--set", f"train.max_steps_per_epoch={steps}", "--set", "data.cache_dir=null", quiet=False)
    return data / "test", run


def before_source(ref: str) -> Path:
    """The `ref` commit's src/ folder, extracted once."""
    dest = WORK / f"before_{ref}"
    if not (dest / "src" / "anomaseg").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def machine() -> dict:
    flags = ""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import numba
    import onnxruntime
    import scipy

    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": model, "cores": os.cpu_count(), "bf16_flags": [f for f in wanted if f in flags.split()],
            "flags": flags, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "numba": numba.__version__, "scipy": scipy.__version__,
            "python": platform.python_version()}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------- 1. slices per second
def before_predict_slices(model, predictor, case, precision: str, batch: int = 64) -> np.ndarray:
    """Scorer.predict_slices of the `--before` commit (its maps): the trained model as loaded,
    no_grad inside the predictor, batches of 64, channels_last inputs, the run's autocast."""
    images, masks = case.images[case.keep], case.masks[case.keep]
    out = []
    with autocast("cpu", fabric_precision(precision, "cpu")):
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).float().contiguous(
                memory_format=torch.channels_last)
            m = torch.from_numpy(masks[i:i + batch])
            out.append(predictor.predict(model, x, m[:, None])[0][:, 0].float().numpy())
    return np.concatenate(out)


def bench_slices(run: Path, test: Path, onnx_file: Path, repeats: int, n_cases: int) -> dict:
    from anomaseg.export import OnnxScorer

    config = load_run_config(run)
    cases = find_cases(test, config.data.modalities)[:n_cases]
    prepared = prepare_cases(cases, config.data.slice_spec(), None, progress=False)
    n = int(sum(c.keep.sum() for c in prepared))
    base = calibrate(run, "residual", {}, progress=False, device="cpu")
    scorers = {p: Scorer(base.model, base.predictor, base.post, device="cpu", precision=p) for p in ("32", "auto")}
    scorers["onnxruntime_32"] = OnnxScorer(onnx_file)

    def after(scorer):
        return np.concatenate([scorer.predict_slices(c)[0][c.keep] for c in prepared])

    fns = {}
    for p in ("32", "auto"):
        fns[f"before_{p}"] = lambda p=p: np.concatenate([before_predict_slices(base.model, base.predictor, c, p)
                                                         for c in prepared])
        fns[f"after_{p}"] = lambda p=p: after(scorers[p])
    fns["onnxruntime_32"] = lambda: after(scorers["onnxruntime_32"])
    compiled = {}
    try:  # torch.compile of the folded model, fp32: measured, adopted only if it wins
        s = Scorer(base.model, base.predictor, base.post, device="cpu", precision="32")
        t = time.perf_counter()
        s.net = torch.compile(s.net)
        after(s)
        compiled["compile_s"] = time.perf_counter() - t
        fns["compiled_32"] = lambda: after(s)
    except Exception as exc:  # noqa: BLE001 (a missing compiler is a result, not a failure)
        compiled["error"] = f"{type(exc).__name__}: {exc}"[:300]
    maps = {name: fn() for name, fn in fns.items()}  # warm-up (and the outputs to compare)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rates = {name: n / statistics.median(ts) for name, ts in times.items()}
    ref = maps["before_32"]
    return {
        "slices": n, "cases": [c.case_id for c in prepared], "image_size": int(prepared[0].images.shape[-1]),
        "channels": int(prepared[0].images.shape[1]), "auto_precision": fabric_precision("auto", "cpu"),
        "batch_before": 64, "batch_after": scorers["32"].batch_size, "onnx_batch": scorers["onnxruntime_32"].batch_size,
        "slices_per_s": rates, "seconds": times,
        "speedup_fp32": rates["after_32"] / rates["before_32"],
        "speedup_auto": rates["after_auto"] / rates["before_auto"],
        "max_abs_diff_fp32": {name: float(np.abs(maps[name] - ref).max()) for name in maps if name.endswith("_32")},
        "max_abs_diff_auto": float(np.abs(maps["after_auto"] - maps["before_auto"]).max()),
        "compile": compiled,
    }


def bench_default_map(run: Path, test: Path, onnx_file: Path, repeats: int, n_cases: int) -> dict:
    """Seconds per 1 mm volume of the run's default map: PyTorch (run's precision, fp32) vs ONNX Runtime."""
    from anomaseg.export import OnnxScorer, read_metadata

    config = load_run_config(run)
    prepared = prepare_cases(find_cases(test, config.data.modalities)[:n_cases], config.data.slice_spec(), None,
                             progress=False)
    base = calibrate(run, progress=False, device="cpu")
    scorers = {f"pytorch_{p}": Scorer(base.model, base.predictor, base.post, device="cpu", precision=p)
               for p in (config.train.precision, "32")}
    scorers["onnxruntime_32"] = OnnxScorer(onnx_file)

    def maps(scorer):
        return [scorer.predict_slices(c)[0][c.keep] for c in prepared]

    outputs = {name: maps(s) for name, s in scorers.items()}  # warm-up (and the maps to compare)
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(repeats):
        for name, s in scorers.items():
            t = time.perf_counter()
            maps(s)
            times[name].append(time.perf_counter() - t)
    per_volume = {name: statistics.median(ts) / len(prepared) for name, ts in times.items()}
    def rel_diff(ref):  # per path: the largest |map - ref| of a case over that case's ref range
        return {name: max(float(np.abs(m - r).max() / (r.max() - r.min())) for m, r in zip(out, ref))
                for name, out in outputs.items()}

    model64 = copy.deepcopy(base.model).double().eval()  # how far float32 itself is from the map
    with torch.no_grad():
        exact = [np.concatenate([base.predictor.anomaly_map(model64, torch.from_numpy(c.images[c.keep][i:i + 64])
                                                            .double())[:, 0].float().numpy()
                                 for i in range(0, int(c.keep.sum()), 64)]) for c in prepared]
    return {"predictor": base.predictor.name, "params": base.predictor.get_params(),
            "exported_predictor": read_metadata(onnx_file).predictor, "run_precision": config.train.precision,
            "cases": [c.case_id for c in prepared], "slices_per_volume": [int(c.keep.sum()) for c in prepared],
            "image_size": int(prepared[0].images.shape[-1]), "channels": int(prepared[0].images.shape[1]),
            "batch": {name: s.batch_size for name, s in scorers.items()}, "seconds": times,
            "seconds_per_volume": per_volume,
            "onnx_vs_pytorch_32": per_volume["pytorch_32"] / per_volume["onnxruntime_32"],
            "max_abs_diff_over_range_vs_pytorch_32": rel_diff(outputs["pytorch_32"]),
            "max_abs_diff_over_range_vs_float64": rel_diff(exact)}


def default_map_markdown(r: dict) -> str:
    d = r["default_map"]
    sv, rel, rel64 = (d["seconds_per_volume"], d["max_abs_diff_over_range_vs_pytorch_32"],
                      d["max_abs_diff_over_range_vs_float64"])
    rows = [f"| {name} | {sv[name]:.2f} | {sv['pytorch_32'] / sv[name]:.2f}x | {d['batch'][name]} | {rel[name]:.1e} | "
            f"{rel64[name]:.1e} |" for name in sv]
    return "\n".join([
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, bf16 flags: "
        f"{', '.join(r['machine']['bf16_flags']) or 'none'}, torch threads {r['machine']['torch_threads']}; "
        f"load average {r['load_start']} at start, {r['load_end']} at the end.", "",
        f"Default map ({d['predictor']}, {d['params']}), {len(d['cases'])} cases, "
        f"{sum(d['slices_per_volume']) / len(d['cases']):.0f} slices per volume at {d['image_size']} px:", "",
        "| path | s per volume | speed vs PyTorch fp32 | batch | max abs diff / map range, vs PyTorch fp32 | "
        "vs PyTorch float64 |", "|---|---|---|---|---|---|", *rows]) + "\n"


# ------------------------------------------------------------------------------ 2. post-processing
def before_smooth_segment(post: PostProcessor, amap: np.ndarray, brain: np.ndarray, threshold: float):
    """PostProcessor.smooth + segment as in the `--before` commit."""
    from scipy import ndimage

    out = np.zeros_like(amap, dtype=np.float32)
    box = bounding_box(brain, post.median_size)
    sub = median_filter_3d(amap[box].astype(np.float32), post.median_size)
    keep = post.eroded(brain)[box]
    out[box] = np.where(keep, sub, 0.0)
    seg = out > threshold
    labels, n = ndimage.label(seg, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep_components = sizes >= post.min_component_size
    keep_components[0] = False
    return out, keep_components[labels].astype(np.uint8)


def bench_postprocess(run: Path, test: Path, repeats: int) -> dict:
    scorer = calibrate(run, "residual", {}, progress=False, device="cpu")
    config_spec = load_run_config(run).data.slice_spec()
    case = prepare_cases(find_cases(test, config_spec.modalities)[:1], config_spec, None, progress=False)[0]
    raw = case.geometry.to_volume(scorer.predict_slices(case)[0])
    post, t = scorer.post, scorer.post.threshold_

    def after():
        smoothed = post.smooth(raw, case.brain)
        return smoothed, post.segment(smoothed)

    results = {"before": before_smooth_segment(post, raw, case.brain, t), "after": after()}
    times = {"before": [], "after": []}
    parts = {"median_before": [], "median_after": []}
    box = bounding_box(case.brain, post.median_size)
    for _ in range(repeats):
        for name, fn in (("before", lambda: before_smooth_segment(post, raw, case.brain, t)), ("after", after)):
            s = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - s)
        from anomaseg.fastmedian import masked_median

        s = time.perf_counter()
        median_filter_3d(raw[box].astype(np.float32), post.median_size)
        parts["median_before"].append(time.perf_counter() - s)
        keep = post.eroded(case.brain[box])
        s = time.perf_counter()
        masked_median(raw[box].astype(np.float32), post.median_size, keep)
        parts["median_after"].append(time.perf_counter() - s)
    med = {k: statistics.median(v) for k, v in {**times, **parts}.items()}
    return {"case": case.case_id, "shape": list(case.brain.shape), "brain_voxels": int(case.brain.sum()),
            "box_voxels": int(np.prod([s.stop - s.start for s in box])),
            "seconds": med, "speedup": med["before"] / med["after"],
            "median_speedup": med["median_before"] / med["median_after"],
            "identical_smoothed": bool(np.array_equal(results["before"][0], results["after"][0])),
            "identical_segmentation": bool(np.array_equal(results["before"][1], results["after"][1]))}


# ----------------------------------------------------------------------------------- 3. end to end
def run_for_before(run: Path) -> Path:
    """A copy of `run` whose config the `--before` code reads: `score.batch_size` was an int (64)
    then; file times are kept, so the stored calibration stays valid."""
    import yaml

    copy = run.with_name(run.name + "_before")
    if not copy.exists():
        shutil.copytree(run, copy)
        config = yaml.safe_load((copy / "config.yaml").read_text())
        if config["score"].get("batch_size") is None:
            config["score"]["batch_size"] = 64
        (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def bench_end_to_end(run: Path, test: Path, onnx_file: Path, before_src: Path, repeats: int) -> dict:
    n = len(find_cases(test, ["flair"]))
    before_run = run_for_before(run)
    env_before = {**os.environ, "PYTHONPATH": str(before_src)}
    env_after = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = WORK / "out"

    def score(env, *extra):
        shutil.rmtree(out, ignore_errors=True)
        return cli("score", "--data", str(test), "--out", str(out), *extra, env=env)

    configs = {
        "before": lambda: score(env_before, "--run", str(before_run)),
        "after": lambda: score(env_after, "--run", str(run)),
        "after_2_workers": lambda: score(env_after, "--run", str(run), "--workers", "2"),
        "after_onnx": lambda: score(env_after, "--onnx", str(onnx_file)),
    }
    for fn in configs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            times[name].append(fn())
    shutil.rmtree(out, ignore_errors=True)
    per_min = {name: 60 * n / statistics.median(ts) for name, ts in times.items()}
    return {"volumes": n, "seconds": times, "volumes_per_min": per_min,
            "speedup": per_min["after"] / per_min["before"]}


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default=BEFORE_DEFAULT, help="commit whose code is 'before'")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats (a smoke test)")
    parser.add_argument("--default-map", action="store_true",
                        help="only the default map (grad_elbo): PyTorch vs ONNX Runtime per 1 mm volume")
    parser.add_argument("--run", help="with --default-map: this run (e.g. `anomaseg demo`'s OUT/run) "
                                      "instead of the set-up's")
    parser.add_argument("--test", help="with --run: its test cases (e.g. OUT/phantom/test)")
    parser.add_argument("--cases", type=int, default=2, help="with --default-map: test cases measured")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/inference.json, "
                                                    "or inference_default_map.json with --default-map)")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    default_out = "inference_default_map.json" if args.default_map else "inference.json"
    args.out = args.out or str(ROOT / "results" / default_out)
    global WORK
    if args.quick:
        WORK = WORK.with_name("inference_quick")
    WORK.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/bench_inference.py " + " ".join(sys.argv[1:]),
              "machine": machine(), "load_start": load(), "before": args.before}
    t0 = time.perf_counter()
    if args.default_map:
        result.pop("before")
        if args.run:
            test1, run1 = Path(args.test), Path(args.run)
            onnx_file = WORK / f"model_{run1.resolve().parent.name}_default.onnx"
            onnx_file.unlink(missing_ok=True)
        else:
            test1, run1 = prepare(1, 3, 4, 5)  # the set-up of the full benchmark, shared with it
            onnx_file = WORK / "model_1mm_default.onnx"
        if not onnx_file.exists():
            cli("export", "--run", str(run1), "--out", str(onnx_file))  # no option: the run's default map
        result["setup_s"] = time.perf_counter() - t0
        result["uptime_start"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        result["default_map"] = bench_default_map(run1, test1, onnx_file, repeats, args.cases)
        result["load_end"] = load()
        result["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        result["total_s"] = time.perf_counter() - t0
        write_text(args.out, json.dumps(result, indent=1))
        table = default_map_markdown(result)
        write_text(Path(args.out).with_suffix(".md"), table)
        print(table)
        return
    test1, run1 = prepare(1, 3, 2 if args.quick else 4, 5)
    test2, run2 = prepare(2, 4, 3 if args.quick else 8, 5)
    before_src = before_source(args.before)
    onnx_files = {}
    for res, run in (("1mm", run1), ("2mm", run2)):
        onnx_files[res] = WORK / f"model_{res}_residual.onnx"
        if not onnx_files[res].exists():
            cli("export", "--run", str(run), "--out", str(onnx_files[res]), "--predictor", "residual")
    result["setup_s"] = time.perf_counter() - t0
    print(f"set-up done in {result['setup_s']:.0f} s; load {load()}")
    result["slices"] = bench_slices(run1, test1, onnx_files["1mm"], repeats, 1 if args.quick else 2)
    print(json.dumps(result["slices"]["slices_per_s"], indent=1))
    result["postprocess"] = bench_postprocess(run1, test1, repeats)
    print(json.dumps(result["postprocess"]["seconds"], indent=1))
    result["end_to_end"] = {res: bench_end_to_end(run, test, onnx_files[res], before_src, repeats)
                            for res, run, test in (("1mm", run1, test1), ("2mm", run2, test2))}
    result["load_end"] = load()
    result["total_s"] = time.perf_counter() - t0
    write_text(args.out, json.dumps(result, indent=1))
    table = markdown(result)
    write_text(Path(args.out).with_suffix(".md"), table)
    print(table)


def markdown(r: dict) -> str:
    s, p, e = r["slices"], r["postprocess"], r["end_to_end"]
    sp = s["slices_per_s"]
    lines = [f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, bf16 flags: "
             f"{', '.join(r['machine']['bf16_flags']) or 'none'}; load average {r['load_start']} at start, "
             f"{r['load_end']} at the end.", "",
             f"Residual maps, {s['slices']} slices of {len(s['cases'])} 1 mm cases, {s['image_size']} px "
             f"(slices/s; batch {s['batch_before']} before, {s['batch_after']} after):", "",
             "| precision | before | after | speed-up | max abs diff vs before |", "|---|---|---|---|---|",
             f"| fp32 | {sp['before_32']:.1f} | {sp['after_32']:.1f} | {s['speedup_fp32']:.2f}x | "
             f"{s['max_abs_diff_fp32']['after_32']:.1e} |",
             f"| auto ({s['auto_precision']}) | {sp['before_auto']:.1f} | {sp['after_auto']:.1f} | "
             f"{s['speedup_auto']:.2f}x | {s['max_abs_diff_auto']:.1e} |",
             f"| fp32, ONNX Runtime | | {sp['onnxruntime_32']:.1f} | {sp['onnxruntime_32'] / sp['before_32']:.2f}x | "
             f"{s['max_abs_diff_fp32']['onnxruntime_32']:.1e} |"]
    if "compiled_32" in sp:
        lines.append(f"| fp32, torch.compile (+{s['compile']['compile_s']:.0f} s compile) | | {sp['compiled_32']:.1f} | "
                     f"{sp['compiled_32'] / sp['before_32']:.2f}x | {s['max_abs_diff_fp32']['compiled_32']:.1e} |")
    ps = p["seconds"]
    lines += ["", f"Post-processing of one 1 mm volume ({' x '.join(map(str, p['shape']))}, "
                  f"{p['brain_voxels']:,} brain voxels): before {ps['before']:.2f} s, after {ps['after']:.2f} s "
                  f"({p['speedup']:.1f}x; median filter alone {ps['median_before']:.2f} -> {ps['median_after']:.2f} s, "
                  f"{p['median_speedup']:.1f}x); identical output: smoothed map {p['identical_smoothed']}, "
                  f"segmentation {p['identical_segmentation']}.", "",
              "End to end, `anomaseg score` (volumes per minute):", "",
              "| data | volumes | before | after | after, 2 workers | after, ONNX Runtime | speed-up |",
              "|---|---|---|---|---|---|---|"]
    for res, x in e.items():
        v = x["volumes_per_min"]
        lines.append(f"| {res} | {x['volumes']} | {v['before']:.1f} | {v['after']:.1f} | {v['after_2_workers']:.1f} | "
                     f"{v['after_onnx']:.1f} | {x['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
