import json

from anomaseg.cli import main


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert f"report:  {out / 'eval' / 'report.html'}" in printed
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert len(metrics["per_case"]) == 3 and 0 <= metrics["pixel_auroc"] <= 1
    assert (out / "run" / "checkpoints" / "best.pt").exists()
