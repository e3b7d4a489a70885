"""Where does a fitted QA model's Dice error come from? (issue 20)

    .venv/bin/python benchmarks/qa_error_decomposition.py --work /tmp/qa_work \
        --results benchmarks/results/quality_assessment.json      # that run's --work folder and its JSON

For each held-out test subject of a `benchmarks/quality_assessment.py` run (its phantom, split and
fitted QA model), REG-Net is run on the exact ground truth and on fresh perturbations of it; per
subject and kind it prints the true and predicted volume Dice, and the predicted Dice with either
count replaced by the truth (true TP or true missed lesion), so an error can be traced to the
precision head (TP) or to the missed-lesion head; also the lesion size (native voxels), since the
error of the count loss (`reg_params.loss=counts`) sat on the subjects with small lesions. With
--results, first the run's balanced test pool's MAE split by lesion size (--small voxels) and by
true Dice (>= 0.8 or not).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

KINDS = ("add", "boundary", "erode", "drop")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="the --work folder of a quality_assessment.py run")
    ap.add_argument("--variant", default=None, help="REG-Net variant (default: each fitted one)")
    ap.add_argument("--results", help="the run's JSON: its balanced test pool's MAE by lesion size and true Dice")
    ap.add_argument("--split", choices=["test", "train"], default="test",
                    help="the test subjects, or the fitting subjects (is the error overfitting?)")
    ap.add_argument("--small", type=int, default=5000, help="a subject's lesion is small below this many voxels")
    args = ap.parse_args(argv)
    work = Path(args.work)
    os.environ["ANOMASEG_CACHE"] = str(work / "cache")  # the benchmark's own case cache
    torch.set_num_threads(1)
    from anomaseg.data.layout import find_cases
    from anomaseg.metrics import dice_score
    from anomaseg.quality.assessor import QualityAssessor
    from anomaseg.quality.pool import perturb
    from anomaseg.quality.samples import assessed_slices, soft_slices

    qa = QualityAssessor.load(work / "qa")
    cases = find_cases(work / f"qa_{args.split}", ["flair"])
    if args.results:
        import json

        lesion = {c.case_id: int(qa.config.cache().get(c, qa.config.spec()).truth.sum()) for c in cases}
        rows = [r for r in json.loads(Path(args.results).read_text())["test_rows"] if r["set"] == "pool"]
        groups = {f"lesion < {args.small} voxels": lambda r: lesion[r["case_id"]] < args.small,
                  f"lesion >= {args.small} voxels": lambda r: lesion[r["case_id"]] >= args.small,
                  "true Dice >= 0.8": lambda r: r["dice"] >= 0.8, "true Dice < 0.8": lambda r: r["dice"] < 0.8}
        variants = [v for v in qa.regs if v in rows[0]]
        print("| balanced test pool | n | " + " | ".join(f"MAE {v}" for v in variants) + " |")
        print("|---|---|" + "---|" * len(variants))
        for name, keep in groups.items():
            rs = [r for r in rows if keep(r)]
            print(f"| {name} | {len(rs)} | " + " | ".join(
                f"{np.mean([abs(r[v][0] - r['dice']) for r in rs]):.3f}" if rs else "n/a" for v in variants) + " |")
        print(f"\nlesion voxels per test subject: {lesion}\n")
    print("| variant | subject | lesion voxels | largest lesion slice (model px) | lesion (model px) | candidate "
          "| true Dice | predicted | with true TP | with true missed | predicted missed (model px) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in [args.variant] if args.variant else list(qa.regs):
        rng = np.random.default_rng(0)
        for case in cases:
            p = qa.config.cache().get(case, qa.config.spec())  # with its ground truth: this is the check
            image = p.geometry.to_volume(p.images[:, 0].astype(np.float32))
            per_slice = soft_slices(p, p.truth).sum(axis=(1, 2))
            cands = [("exact", p.truth)] + [(k, perturb(k, p.truth, p.brain, rng, image)) for k in KINDS]
            for kind, seg in cands:
                img, s, areas, outside = qa.case_inputs(p, seg)
                z = assessed_slices(p, seg)
                with torch.no_grad():
                    out = qa.pipeline(variant)(img, s)
                tp_pred, m_pred = float((out.precision * areas).sum()), float(out.missed.sum())
                tp_true = float(soft_slices(p, seg & p.truth)[z].sum())
                m_true = float(soft_slices(p, p.truth & ~seg)[z].sum())
                base = float(areas.sum()) + outside

                def dice(tp, m):
                    return 2 * tp / max(base + tp + m, 1e-3)

                cells = [variant, case.case_id, int(p.truth.sum()), f"{per_slice.max():.0f}", f"{per_slice.sum():.0f}",
                         kind] + [f"{d:.2f}" for d in (dice_score(seg, p.truth), dice(tp_pred, m_pred),
                                                        dice(tp_true, m_pred), dice(tp_pred, m_true))]
                print("| " + " | ".join(str(c) for c in cells + [f"{m_pred:.0f}"]) + " |")


if __name__ == "__main__":
    main()
