"""Why the demo is set up as it is: one change at a time from the demo's configuration.

Trains the spatial VAE on the demo's phantom (80 healthy + 12 lesioned subjects, 2 mm) under the
demo's budget, once per variant, and evaluates each with the residual predictor:

    demo            FLAIR + T2, 64 px, beta 0.05, brain crop            (what `anomaseg demo` runs)
    beta_1          ... with the paper's KL weight beta = 1
    flair_only      ... FLAIR alone
    no_crop         ... without cropping slices to the brain's box
    size_128        ... at 128 px (the library's default size; the latent grid grows to 8x8)

    python benchmarks/ablation_demo.py [--variants demo,beta_1] [--epochs 12] [--seed 0]

Writes benchmarks/results/ablation_demo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from anomaseg import demo  # noqa: E402
from anomaseg.atomic import write_text  # noqa: E402
from anomaseg.config import merge  # noqa: E402
from anomaseg.data.phantom import make_phantom  # noqa: E402
from anomaseg.evaluation import evaluate_dataset  # noqa: E402
from anomaseg.calibration import calibrate  # noqa: E402
from anomaseg.training import train  # noqa: E402

VARIANTS = {
    "demo": {},
    "beta_1": {"model": {"params": {"beta": 1.0}}},
    "flair_only": {"data": {"modalities": ["flair"]}},
    "no_crop": {"data": {"crop_to_brain": False}},
    "size_128": {"data": {"image_size": 128}},
}
KEYS = ("pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold", "image_auroc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--epochs", type=int, default=demo.DEMO["epochs"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "ablation_demo"))
    args = ap.parse_args()
    plan = dict(demo.DEMO, epochs=args.epochs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["ANOMASEG_CACHE"] = str(tmp / "cache")
        make_phantom(tmp / "phantom", plan["healthy"], plan["lesioned"], seed=args.seed,
                     resolution=plan["resolution"], modalities=plan["modalities"])
        for name in args.variants.split(","):
            base = demo.demo_config(plan, args.seed)
            config = type(base).from_dict(merge(base.to_dict(), VARIANTS[name]))
            config.train_dir = str(tmp / "phantom" / "train")
            t = time.perf_counter()
            train(config, tmp / name, progress=False)
            calibrate(tmp / name, progress=False, force=True)
            seconds = time.perf_counter() - t
            m = evaluate_dataset(tmp / name, tmp / "phantom" / "test", tmp / f"{name}_eval", progress=False)
            rows.append({"variant": name, "changes": VARIANTS[name], "train_seconds": seconds,
                         **{k: m[k] for k in KEYS}})
            print(json.dumps(rows[-1]), flush=True)
    write_text(Path(args.out + ".json"), json.dumps({"date": time.strftime("%Y-%m-%d"), "plan": plan,
                                                    "seed": args.seed, "rows": rows}, indent=1))
    lines = ["| variant | pixel AUROC | pixel AUPRC | dice_best | dice@threshold | slice AUROC | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + f" | {r['train_seconds']:.0f} |")
    write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
