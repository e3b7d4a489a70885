"""CPU cost of the patched DDPM preset (configs/behrendt2023_pddpm.yaml, 64 px, one channel):
training slices per CPU second in NCHW / NHWC, fp32 / bf16 autocast (what decides
`PatchedDDPM.prefers_channels_last`), and scoring CPU milliseconds per slice of the stitched
reconstruction (the inference copy, as the Scorer runs it) for the preset and for DDIM steps (a noise
ensemble of K draws costs K times the preset). One torch thread; CPU time (`time.process_time`), so
a shared machine inflates it less than wall time; configurations interleaved, medians of `--repeats`.

    python benchmarks/bench_pddpm.py [--repeats 3] [--out benchmarks/results/pddpm_speed.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from anomaseg import config as cfg
from anomaseg.inference import inference_copy
from anomaseg.models import create_model
from anomaseg.runtime import cpu_info

PRESET = Path(__file__).resolve().parents[1] / "configs" / "behrendt2023_pddpm.yaml"


def bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def train_cost(params: dict, channels_last: bool, use_bf16: bool, batch: int = 16, steps: int = 3) -> float:
    """Slices per CPU second of `steps` training steps (after one warm-up step)."""
    torch.manual_seed(0)
    model = create_model("pddpm", in_channels=1, image_size=64, **params)
    x = torch.rand(batch, 1, 64, 64)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opts = model.make_optimizers(1e-4)
    autocast = bf16 if use_bf16 else contextlib.nullcontext
    model.train()
    model.training_step(x, opts, lambda loss: loss.backward(), autocast)
    start = time.process_time()
    for _ in range(steps):
        model.training_step(x, opts, lambda loss: loss.backward(), autocast)
    return batch * steps / (time.process_time() - start)


def scoring_cost(params: dict, use_bf16: bool, batch: int = 16) -> float:
    """CPU milliseconds per slice of the eval-mode forward (the stitched reconstruction)."""
    torch.manual_seed(0)
    net = inference_copy(create_model("pddpm", in_channels=1, image_size=64, **params), channels_last=False)
    x = torch.rand(batch, 1, 64, 64)
    with torch.inference_mode(), (bf16() if use_bf16 else contextlib.nullcontext()):
        net(x[:4])
        start = time.process_time()
        net(x)
    return 1000 * (time.process_time() - start) / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pddpm_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = cfg.resolve(PRESET).model.params
    train_rows = {f"{'NHWC' if cl else 'NCHW'} {'bf16' if b else 'fp32'}": (cl, b)
                  for cl in (False, True) for b in (False, True)}
    # (name, extra parameters, bf16): the options under bf16 only (what `--precision auto` picks here)
    score_rows = [("preset (4 patches, one x0 step), fp32", {}, False), ("preset, bf16", {}, True),
                  ("ddim_steps 5, bf16", {"ddim_steps": 5}, True)]
    train = {k: [] for k in train_rows}
    score = {k: [] for k, _, _ in score_rows}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for k, (cl, b) in train_rows.items():
            train[k].append(train_cost(params, cl, b))
        for k, extra, b in score_rows:
            score[k].append(scoring_cost({**params, **extra}, b))
    result = {
        "machine": {**cpu_info(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_before": load_before, "load_after": os.getloadavg(), "threads": 1},
        "train_slices_per_cpu_second": {k: statistics.median(v) for k, v in train.items()},
        "score_cpu_ms_per_slice": {k: statistics.median(v) for k, v in score.items()},
        "repeats": args.repeats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for section in ("train_slices_per_cpu_second", "score_cpu_ms_per_slice"):
        for k, v in result[section].items():
            print(f"{section}: {k}: {v:.1f}")
    print(f"load {load_before} -> {result['machine']['load_after']}; written to {args.out}")


if __name__ == "__main__":
    main()
