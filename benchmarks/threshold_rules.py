"""One trained run's map under each threshold rule, beside the intensity baseline under the same
rules (issue 18): the run's own predictor and the baseline evaluated in one pass (maps predicted
once), each rule calibrated on the run's held-out healthy cases.

    anomaseg demo --out /tmp/demo                       # or any run and labelled test set
    python benchmarks/threshold_rules.py --run /tmp/demo/run --data /tmp/demo/phantom/test \
        [--out benchmarks/results/threshold_rules_demo.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from anomaseg.atomic import write_text
from anomaseg.evaluation import evaluate_dataset
from anomaseg.runtime import cpu_info

RULES = {
    "voxel_fpr": {"calibration": "voxel_fpr"},
    "hysteresis, 1 FP lesion per healthy case": {"calibration": "hysteresis", "healthy_fp_lesions": 1.0},
    "hysteresis, 3": {"calibration": "hysteresis", "healthy_fp_lesions": 3.0},
    "fp_lesions, 1": {"calibration": "fp_lesions", "healthy_fp_lesions": 1.0},
}
KEYS = ("pixel_auprc", "dice_best", "dice_at_threshold", "lesion_f1", "lesion_recall", "lesion_precision",
        "false_positive_lesions_per_case", "froc_score")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True, help="labelled test cases")
    p.add_argument("--out", help="JSON of the table (default: print only)")
    args = p.parse_args(argv)
    config = yaml.safe_load((Path(args.run) / "config.yaml").read_text())
    name, params = config["score"]["predictor"], config["score"].get("predictor_params") or {}
    specs = {}
    for rule, score in RULES.items():
        specs[f"{name} @ {rule}"] = {"name": name, "params": params, "score": score}
        specs[f"intensity baseline @ {rule}"] = {"name": "intensity", "score": score}
    with tempfile.TemporaryDirectory() as tmp:
        metrics = evaluate_dataset(args.run, args.data, Path(tmp) / "eval", predictors=specs, progress=True,
                                   baseline=False)
    rows = {label: {k: metrics[label][k] for k in KEYS} for label in specs}
    print("| map @ rule | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row[k]:.3f}" for k in KEYS) + " |")
    if args.out:
        write_text(Path(args.out), json.dumps({"run": str(Path(args.run).resolve()), "data": str(Path(args.data).resolve()),
                                               "rules": RULES, "machine": cpu_info(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
