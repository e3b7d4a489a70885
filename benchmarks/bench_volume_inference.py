"""Inference seconds per 1 mm volume for each model family (issue 23 item 4): the model's default
predictor over every in-domain slice of one lesioned realistic phantom subject at 1 mm (FLAIR, 64 px),
then the post-processing (map back to the 1 mm grid, median, mask) as `anomaseg score` runs them.
The preset sizes of `configs/` (weights untrained: the cost does not depend on them), one torch
thread, bf16 autocast where `--precision auto` picks it; wall time, median of `--repeats`, the
models interleaved. Reading and preparing the case (the same for every model) is timed once apart.

    python benchmarks/bench_volume_inference.py [--repeats 3] [--out benchmarks/results/volume_inference.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from anomaseg import config as cfg
from anomaseg.data.layout import find_cases
from anomaseg.data.phantom import make_phantom
from anomaseg.data.slices import prepare_cases
from anomaseg.models import create_model
from anomaseg.predictors import create_predictor
from anomaseg.runtime import cpu_info
from anomaseg.scorer import Scorer, make_postprocessor

ROOT = Path(__file__).resolve().parents[1]
# name -> (preset in configs/, model parameter overrides)
PRESETS = {"spatial VAE (default)": (None, {}), "dense AE": ("baur2018_dense_ae", {}),
           "DAE (Kascenas)": ("kascenas2022_dae", {}),
           "DAE, half width (the study's)": ("kascenas2022_dae", {"base_channels": 32}),
           "pDDPM": ("behrendt2023_pddpm", {}), "cDDPM": ("behrendt2024_cddpm", {}), "mDDPM": ("iqbal2023_mddpm", {})}


def scorer_for(preset: str | None, params: dict) -> Scorer:
    config = cfg.resolve(ROOT / "configs" / f"{preset}.yaml" if preset else None,
                         {"data": {"modalities": ["flair"], "image_size": 64}, "model": {"params": params}})
    torch.manual_seed(0)
    model = create_model(config.model.name, in_channels=1, image_size=64, **config.model.params)
    predictor = create_predictor(config.score.predictor, **config.score.predictor_params).set_modalities(["flair"])
    return Scorer(model, predictor, make_postprocessor(config.score), device="cpu", precision=config.train.precision)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "volume_inference.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        make_phantom(tmp, 0, 1, seed=0, resolution=1, modalities=("flair",), realism=True, lesion_load="ms")
        case = find_cases(Path(tmp) / "test", ["flair"], require_seg=True)[0]
        t0 = time.perf_counter()
        spec = cfg.RunConfig().data.slice_spec()
        prepared = prepare_cases([case], spec, progress=False)[0]
        prepare_seconds = time.perf_counter() - t0
    scorers = {name: scorer_for(*preset) for name, preset in PRESETS.items()}
    for scorer in scorers.values():  # the intensity member / baseline statistics: fitted on the case itself
        scorer.predictor.fit(scorer.net, iter([torch.from_numpy(prepared.images[prepared.keep][:32]).float()]))
        scorer.predict_slices(prepared)  # warm-up
    times = {name: [] for name in scorers}
    for _ in range(args.repeats):
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            maps, _ = scorer.predict_slices(prepared)
            scorer.smooth_volume(prepared, maps)
            times[name].append(time.perf_counter() - t0)
    result = {"machine": cpu_info(), "load_average_before": os.getloadavg()[0], "threads": 1,
              "volume_shape": list(prepared.truth.shape), "slices_scored": int(prepared.keep.sum()),
              "prepare_seconds": prepare_seconds,
              "seconds_per_volume": {name: statistics.median(t) for name, t in times.items()},
              "parameters": {name: sum(p.numel() for p in s.model.parameters()) for name, s in scorers.items()},
              "precision": {name: s.precision for name, s in scorers.items()}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, seconds in result["seconds_per_volume"].items():
        print(f"{name:24s} {seconds:7.2f} s per 1 mm volume ({result['parameters'][name]:,} parameters)")
    print(f"reading + preparing the case: {prepare_seconds:.2f} s; {result['slices_scored']} slices of "
          f"{result['volume_shape']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
