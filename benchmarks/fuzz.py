"""The long fuzzing run: tests/test_fuzz.py with many random examples (`make fuzz`).

The normal suite runs each property with a few dozen fixed (derandomised) examples; this runs
`--examples` fresh random ones per property and records, per property, the examples tried, those
that passed, failed or were rejected as invalid by the strategy (hypothesis' statistics).

    python benchmarks/fuzz.py [--examples 2000]          # -> results/fuzz.json

A failure prints hypothesis' minimal failing example; fix it, add it as a regression test, and
note it in benchmarks/README.md ("Fuzzing").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from anomaseg.atomic import write_text  # noqa: E402


def parse_statistics(text: str) -> dict:
    """{test name: {"passing": n, "failing": n, "invalid": n}} from --hypothesis-show-statistics."""
    stats: dict = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^tests/test_fuzz\.py::(\w+):", line.strip())
        if head:
            current = stats.setdefault(head.group(1), {"passing": 0, "failing": 0, "invalid": 0})
            continue
        counts = re.search(r"(\d+) passing(?: examples?)?, (\d+) failing(?: examples?)?,(?: and)? (\d+) invalid", line)
        if counts and current is not None:
            for key, value in zip(("passing", "failing", "invalid"), counts.groups()):
                current[key] += int(value)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="random examples per property")
    ap.add_argument("--out", default=str(ROOT / "results" / "fuzz.json"))
    args = ap.parse_args()
    env = dict(os.environ, ANOMASEG_FUZZ_EXAMPLES=str(args.examples))
    t0 = time.perf_counter()
    load = os.getloadavg()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py",
                           "--hypothesis-show-statistics"], cwd=ROOT.parent, env=env, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n")
    stats = parse_statistics(proc.stdout)
    summary = {"date": time.strftime("%Y-%m-%d"), "examples_per_property": args.examples,
               "seconds": round(time.perf_counter() - t0, 1), "load_average_at_start": load,
               "exit_code": proc.returncode, "properties": stats,
               "examples_tried": sum(v["passing"] + v["failing"] for v in stats.values()),
               "failing": sum(v["failing"] for v in stats.values())}
    write_text(Path(args.out), json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "properties"}, indent=1))
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
