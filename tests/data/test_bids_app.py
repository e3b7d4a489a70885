"""The BIDS-Apps command line: `anomaseg bids BIDS_DIR OUTPUT_DIR participant|group` on a 5-subject dataset."""

from __future__ import annotations

import json

import pytest

from anomaseg.cli import main
from conftest import tiny_train_args
from test_bids import _check_derivatives, write_bids


@pytest.mark.slow
def test_participant_jobs_then_group(tmp_path, capsys):
    root = write_bids(tmp_path / "bids", sessions=("1",))  # sub-01..03 controls, sub-04..05 patients (labelled)
    run = tmp_path / "run"
    assert main(tiny_train_args(root, run, 1, "--select", "group=control", "--modality", "flair")) == 0
    out = root / "derivatives" / "anomaseg"
    cases = [f"sub-0{s}_ses-1" for s in "12345"]

    # two participant-level jobs (as a scheduler runs them) into one derivatives dataset
    assert main(["bids", str(root), str(out), "participant", "--run", str(run), "--participant_label", "01", "04"]) == 0
    _check_derivatives(out, root, ["sub-01_ses-1", "sub-04_ses-1"])
    assert not (out / "sub-02").exists()
    first = (out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-anomaly_mask.nii.gz").read_bytes()
    assert main(["bids", str(root), str(out), "participant", "--run", str(run),
                 "--participant_label", "sub-02", "03", "05", "--session_label", "1"]) == 0
    _check_derivatives(out, root, cases)
    assert (out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-anomaly_mask.nii.gz").read_bytes() == first
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".anomaseg")]  # no work folders left

    capsys.readouterr()
    assert main(["bids", str(root), str(out), "group", "--run", str(run)]) == 0
    cohort = (out / "group" / "cohort.tsv").read_text().splitlines()
    assert cohort[0].split("\t") == ["participant_id", "session_id", "anomalous_voxels", "anomalous_volume_ml"]
    assert [line.split("\t")[0] for line in cohort[1:]] == [c.split("_")[0] for c in cases]
    metrics = json.loads((out / "group" / "evaluation" / "metrics.json").read_text())
    assert [r["case_id"] for r in metrics["per_case"]] == ["sub-04_ses-1", "sub-05_ses-1"]  # the labelled ones
    assert metrics["baseline"]["n_cases"] == 2 and (out / "group" / "evaluation" / "report.html").is_file()
    assert "group/" in (out / ".bidsignore").read_text().split()


def test_bids_app_arguments_and_exit_codes(tmp_path, capsys):
    root = write_bids(tmp_path / "bids", groups={"01": "control"}, sessions=("1",))
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as exit_:
        main(["bids", "-h"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    assert "{participant,group}" in usage and "--participant_label" in usage and "--session_label" in usage
    with pytest.raises(SystemExit) as exit_:
        main(["bids", str(root), out, "subject", "--run", str(tmp_path)])
    assert exit_.value.code == 2  # argparse: analysis level is participant or group
    capsys.readouterr()
    assert main(["bids", str(root), out, "participant", "--run", str(tmp_path), "--participant_label", "07"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no participant sub-07" in err[0] and str(root) in err[0]
    assert main(["bids", str(tmp_path / "nothing"), out, "group", "--run", str(tmp_path)]) == 2
    assert "not a BIDS dataset" in capsys.readouterr().err
