"""Lesion statistics of the phantom's MS lesion load (`lesion_load="ms"`): connected lesions per
subject, their sizes in ml (from the voxel spacing) by band, and the regions they were drawn in.

    python benchmarks/phantom_lesion_stats.py --resolution 2 --seeds 0,1,2 --subjects 12 --realism
        # -> results/phantom_ms_lesions.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from anomaseg.atomic import write_text
from anomaseg.data.phantom import make_subject

BANDS_ML = [0, 0.01, 0.03, 0.1, 0.3, 1.0, 10.0]
MS_LABELS = (1, 5)  # MS lesion, T1 black hole


def subject_stats(index: int, seed: int, resolution: float, realism: bool) -> dict:
    s = make_subject(index, True, seed=seed, resolution=resolution, modalities=("flair",), realism=realism,
                     lesion_load="ms")
    voxel_ml = abs(np.linalg.det(s.affine[:3, :3])) / 1000
    labels, n = ndi.label(np.isin(s.seg, MS_LABELS), structure=np.ones((3, 3, 3)))
    volumes = np.bincount(labels.ravel())[1:] * voxel_ml
    regions: dict[str, int] = {}
    for lesion in s.info["ms_load"]["lesions"]:
        regions[lesion["region"]] = regions.get(lesion["region"], 0) + 1
    return {"seed": seed, "index": index, "drawn": s.info["ms_load"]["n_lesions"], "components": int(n),
            "volumes_ml": [round(float(v), 5) for v in volumes], "regions": regions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=float, default=2.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--subjects", type=int, default=12, help="lesioned subjects per seed")
    ap.add_argument("--realism", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "phantom_ms_lesions.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = [subject_stats(i, int(seed), args.resolution, args.realism)
            for seed in args.seeds.split(",") for i in range(args.subjects)]
    per_seed = {}
    for seed in args.seeds.split(","):
        vols = np.concatenate([r["volumes_ml"] for r in rows if r["seed"] == int(seed)] or [np.zeros(0)])
        per_seed[seed] = {"components": int(len(vols)), "per_band": np.histogram(vols, BANDS_ML)[0].tolist()}
    v = np.concatenate([r["volumes_ml"] for r in rows])
    drawn_regions: dict[str, int] = {}
    for r in rows:
        for k, n in r["regions"].items():
            drawn_regions[k] = drawn_regions.get(k, 0) + n
    components = [r["components"] for r in rows]
    summary = {"resolution_mm": args.resolution, "realism": args.realism, "bands_ml": BANDS_ML, "per_seed": per_seed,
               "components_per_subject": {"min": min(components), "median": float(np.median(components)),
                                          "max": max(components)},
               "volume_ml": {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "max": float(v.max())},
               "drawn_regions": drawn_regions, "seconds": round(time.perf_counter() - t0, 1)}
    write_text(args.out, json.dumps({"summary": summary, "subjects": rows}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
