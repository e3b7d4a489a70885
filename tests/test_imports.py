"""How the modules depend on each other: deployment code loads no training code."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after_import(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_export_and_onnx_scoring_load_no_training_code():
    for module in ("anomaseg.export", "anomaseg.scoring", "anomaseg.scorer", "anomaseg.calibration"):
        loaded = _modules_after_import(module)
        assert module in loaded
        assert not {"anomaseg.training", "anomaseg.distributed", "anomaseg.compilation", "lightning"} & loaded, module
