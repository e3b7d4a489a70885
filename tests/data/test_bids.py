"""BIDS datasets in (cases, modalities, derivatives, participants.tsv) and BIDS derivatives out."""

from __future__ import annotations

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from anomaseg.cli import main
from anomaseg.data.bids import BidsQuery, find_bids_cases, is_bids_root, parse_name
from anomaseg.data.layout import find_cases
from anomaseg.errors import InputError
from conftest import synthetic_case, tiny_train_args

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
GROUPS = {"01": "control", "02": "control", "03": "control", "04": "patient", "05": "patient"}


def _save(data, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def write_bids(root, groups=GROUPS, sessions=("1", "2"), seed=0):
    """A BIDS dataset: FLAIR + T1w per session, brain masks in derivatives/masks, lesion labels of
    the patients in derivatives/lesions, participants.tsv with a group column."""
    rng = np.random.default_rng(seed)
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    rows = ["participant_id\tgroup\tage"]
    for sub, group in groups.items():
        rows.append(f"sub-{sub}\t{group}\t{40 + int(sub)}")
        for ses in sessions:
            image, brain, seg = synthetic_case(rng, lesion=group == "patient")
            prefix, rel = f"sub-{sub}_ses-{ses}", f"sub-{sub}/ses-{ses}/anat"
            _save(image, root / rel / f"{prefix}_FLAIR.nii.gz")
            _save(image * 0.7 + 0.1 * brain, root / rel / f"{prefix}_T1w.nii.gz")
            _save(brain, root / "derivatives" / "masks" / rel / f"{prefix}_desc-brain_mask.nii.gz")
            if group == "patient":
                _save(seg, root / "derivatives" / "lesions" / rel / f"{prefix}_label-lesion_mask.nii.gz")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_reader(tmp_path):
    root = write_bids(tmp_path / "bids")
    assert is_bids_root(root) and not is_bids_root(tmp_path)
    cases = find_cases(root, ["flair", "t1"])
    assert [c.case_id for c in cases][:3] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1"]
    assert len(cases) == 10
    patient = next(c for c in cases if c.case_id == "sub-04_ses-2")
    assert patient.images["flair"].path.name == "sub-04_ses-2_FLAIR.nii.gz"
    assert patient.images["t1"].path.name == "sub-04_ses-2_T1w.nii.gz"
    assert patient.mask.name == "sub-04_ses-2_desc-brain_mask.nii.gz"
    assert patient.seg.name == "sub-04_ses-2_label-lesion_mask.nii.gz"
    assert next(c for c in cases if c.case_id == "sub-01_ses-1").seg is None
    controls = find_cases(root, bids=BidsQuery(select=("group=control",)))
    assert {c.case_id[:6] for c in controls} == {"sub-01", "sub-02", "sub-03"}
    either = find_cases(root, bids=BidsQuery(select=("group=patient,control", "age=44")))
    assert [c.case_id for c in either] == ["sub-04_ses-1", "sub-04_ses-2"]
    # only the named pipeline is searched: without lesions, patients have no labels
    masks_only = find_cases(root, bids=BidsQuery(derivatives=("masks",)))
    assert all(c.seg is None and c.mask is not None for c in masks_only)


def test_entities_and_modalities(tmp_path):
    assert parse_name("sub-01_ses-1_ce-gad_run-2_T1w.nii.gz") == ({"sub": "01", "ses": "1", "ce": "gad", "run": "2"}, "T1w")
    assert parse_name("notbids.nii.gz") is None and parse_name("sub-01_sub-02_T1w.nii") is None
    anat = tmp_path / "b" / "sub-01" / "anat"
    image = synthetic_case(np.random.default_rng(0))[0]
    for name in ("sub-01_T1w", "sub-01_ce-gadolinium_T1w", "sub-01_T2w", "sub-01_PDw"):
        _save(image, anat / f"{name}.nii.gz")
    # a template-space mask does not lie on the image grid: ignored
    _save(np.ones((4, 4, 4), np.uint8), tmp_path / "b" / "derivatives" / "x" / "sub-01" / "anat" /
          "sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz")
    (case,) = find_bids_cases(tmp_path / "b")
    assert sorted(case.images) == ["pdw", "t1", "t1ce", "t2"] and case.mask is None and case.case_id == "sub-01"


def test_clear_errors(tmp_path):
    root = write_bids(tmp_path / "bids", {"01": "control", "02": "patient"}, sessions=("1",))
    with pytest.raises(InputError, match="no column 'diagnosis'.*participant_id, group, age"):
        find_cases(root, bids=BidsQuery(select=("diagnosis=ms",)))
    with pytest.raises(InputError, match="no participant matches group=nobody"):
        find_cases(root, bids=BidsQuery(select=("group=nobody",)))
    with pytest.raises(InputError, match="derivatives pipeline not found.*lesions, masks"):
        find_cases(root, bids=BidsQuery(derivatives=("fmriprep",)))
    # a second pipeline with a brain mask for the same case: ambiguous, named, never a silent choice
    other = root / "derivatives" / "other" / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-brain_mask.nii.gz"
    other.parent.mkdir(parents=True)
    shutil.copy(root / "derivatives" / "masks" / "sub-01" / "ses-1" / "anat" / other.name, other)
    with pytest.raises(InputError, match="2 candidates for its brain mask.*--derivatives"):
        find_cases(root)
    assert find_cases(root, bids=BidsQuery(derivatives=("masks",)))[0].mask.parent.parts[-4] == "masks"
    (root / "participants.tsv").unlink()
    with pytest.raises(InputError, match="needs participants.tsv"):
        find_cases(root, bids=BidsQuery(select=("group=control",)))
    with pytest.raises(InputError, match="need a BIDS dataset"):
        find_cases(tmp_path / "bids" / "sub-01" / "ses-1" / "anat", bids=BidsQuery(select=("group=x",)))
    # a patient without lesion labels cannot be evaluated: the message says where they belong
    with pytest.raises(InputError, match="label-lesion_mask"):
        find_cases(root, require_seg=True, bids=BidsQuery(derivatives=("masks",)))


def _check_derivatives(folder, source_root, cases):
    """The BIDS-derivatives conventions our outputs must follow."""
    desc = json.loads((folder / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "anomaseg" and desc["GeneratedBy"][0]["Version"]
    for case in cases:
        sub, ses = case.split("_")
        anat = folder / sub / ses / "anat"
        for kind, dtype in (("map", np.float32), ("mask", np.uint8)):
            nii = anat / f"{case}_desc-anomaly_{kind}.nii.gz"
            entities, suffix = parse_name(nii)
            assert entities == {"sub": sub[4:], "ses": ses[4:], "desc": "anomaly"} and suffix == kind
            img = nib.load(nii)
            src = nib.load(source_root / sub / ses / "anat" / f"{case}_FLAIR.nii.gz")
            assert img.shape == src.shape and np.allclose(img.affine, src.affine)
            assert img.get_data_dtype() == dtype
            sidecar = json.loads(nii.with_name(nii.name.replace(".nii.gz", ".json")).read_text())
            assert {"Sources", "Model", "Predictor", "Threshold", "Run", "AnomasegVersion"} <= set(sidecar)
            assert sidecar["Sources"][0].startswith(f"bids:raw:{sub}/{ses}/anat/")
    for f in folder.rglob("*"):  # nothing but BIDS files in subject folders
        if f.is_file() and f.parts[len(folder.parts)].startswith("sub-"):
            assert parse_name(f) is not None and f.name.endswith((".nii.gz", ".json"))


def _validator_errors(folder) -> set[str]:
    """Error codes of bids-validator (npm) on a dataset; the test skips it where it is not installed."""
    result = subprocess.run([shutil.which("bids-validator"), str(folder), "--json"], capture_output=True,
                            text=True, timeout=300)
    return {issue["key"] for issue in json.loads(result.stdout)["issues"]["errors"]}


@pytest.mark.slow
def test_train_on_controls_score_and_evaluate_patients(tmp_path, capsys):
    root = write_bids(tmp_path / "bids")
    run, ev = tmp_path / "run", tmp_path / "eval"
    # beta 1: a 6-epoch tiny VAE with the default beta 0.05 still reconstructs part of the blobs
    assert main(tiny_train_args(root, run, 6, "--select", "group=control", "--modality", "flair,t1",
                                "--set", "model.params.beta=1")) == 0
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [f"sub-0{s}_ses-{t}" for s in "123" for t in "12"]
    patients = [f"sub-0{s}_ses-{t}" for s in "45" for t in "12"]

    assert main(["evaluate", "--run", str(run), "--data", str(root), "--out", str(ev), "--select", "group=patient",
                 "--save-maps"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert [c["case_id"] for c in metrics["per_case"]] == patients
    assert metrics["n_true_lesions"] == 4 and metrics["lesion_recall"] == 1.0  # one bright blob per case
    # the segmentations overlap the blobs, not just touch them (0.30 on an AMX/bf16 CPU, more on others)
    assert metrics["per_volume_dice_mean"] > 0.25 and len(metrics["per_lesion"]) == 4
    _check_derivatives(ev / "maps", root, patients)

    assert main(["score", "--run", str(run), "--data", str(root), "--select", "group=patient"]) == 0
    out = root / "derivatives" / "anomaseg"
    assert str(out) in capsys.readouterr().out
    _check_derivatives(out, root, patients)
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"]["raw"] == "../.."
    # our own outputs are never read back as masks or labels, and the dataset still reads the same
    assert [c.case_id for c in find_cases(root, require_seg=True, bids=BidsQuery(select=("group=patient",)))] == patients
    if shutil.which("bids-validator"):
        assert _validator_errors(root) == set()  # the dataset with our derivatives inside stays valid
        # bids-validator 1.15 (the last on npm) predates the derivatives schema: it rejects every
        # derivative file name (BIDS' own desc-brain_mask too) but checks dataset_description.json
        assert _validator_errors(out) <= {"NOT_INCLUDED", "NO_VALID_DATA_FOUND_FOR_SUBJECT"}


def test_score_needs_out_unless_bids(tmp_path, capsys):
    assert main(["score", "--run", str(tmp_path / "run"), "--data", str(tmp_path)]) == 2
    assert "--out is required" in capsys.readouterr().err
