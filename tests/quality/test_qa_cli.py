"""`anomaseg qa fit / predict` end to end on tiny synthetic data, and `--qa` in evaluate and score."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from anomaseg.cli import main
from anomaseg.data.io import load_volume
from anomaseg.data.layout import find_cases
from anomaseg.quality.assessor import QualityAssessor
from conftest import tiny_train_args, write_dataset

# tiny networks, few epochs: the fit takes seconds (the benchmark measures the real thing)
QA_FIT = ["--image-size", "32", "--pool-size", "8", "--batch-size", "16", "--set", "rec_epochs=15",
          "--set", "reg_epochs=8", "--set", "rec_params={base_channels: 4, depth: 2}",
          "--set", "reg_params={base_channels: 4, depth: 2}", "--set", "calibration=isotonic"]


@pytest.fixture(scope="module")
def qa_model(tmp_path_factory):
    """A small fitted REC-Net + REG-Net pair (the paper's difference variant), fitted once."""
    root = tmp_path_factory.mktemp("qa")
    data = write_dataset(root / "labelled", 5, lesioned=True, seed=11)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMASEG_CACHE", str(root / "cache"))
        assert main(["qa", "fit", "--data", str(data), "--out", str(root / "qa"), *QA_FIT]) == 0
    return root / "qa"


def _shifted(seg: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The lesion moved into healthy brain, away from itself: Dice 0, same size."""
    for dx in (10, -10, 8, -8):
        moved = np.roll(seg, dx, axis=0)
        if not (moved & seg).any() and (moved <= brain).all():
            return moved
    raise AssertionError("no healthy place for the shifted lesion")


def _write_candidates(data, folder):
    """<case>_segmentation.nii.gz: the truth for les00, the lesion moved elsewhere for les01."""
    folder.mkdir(parents=True)
    truths = {}
    for case in find_cases(data, ["flair"]):
        img = nib.load(case.seg)
        truth = np.asarray(img.dataobj) > 0
        brain = np.asarray(nib.load(case.mask).dataobj) > 0
        seg = truth if case.case_id == "les00" else _shifted(truth, brain)
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), img.affine), folder / f"{case.case_id}_segmentation.nii.gz")
        truths[case.case_id] = seg
    return truths


def test_fitted_folder(qa_model):
    meta = json.loads((qa_model / "qa.json").read_text())
    assert meta["variants"] == ["difference"] and len(meta["split"]["val"]) == 1
    pool = json.loads((qa_model / "pool.json").read_text())["candidates"]
    assert len(pool) == 5 * 8  # pool_size per case, completed by perturbations
    dices = np.array([c["dice"] for c in pool])
    assert dices.min() < 0.2 and dices.max() > 0.8  # widely spread quality
    for run, epochs in (("rec", 15), ("reg_difference", 8)):
        assert (qa_model / run / "checkpoints" / "best.pt").is_file()
        history = json.loads((qa_model / run / "history.json").read_text())
        assert len(history) == epochs and history[-1]["train_loss"] < history[0]["train_loss"]
    assert list((qa_model / "rec" / "samples").glob("*.png"))  # REC-Net shows its reconstructions
    # REG-Net was trained with its default flips / rotations (so the ranking test below covers them)
    assert QualityAssessor.load(qa_model).regs["difference"].augment
    # the predicted Dice is recalibrated on the validation subject's 8 candidates (calibration.json)
    calibration = json.loads((qa_model / "calibration.json").read_text())
    assert calibration["fitted_on"]["cases"] == meta["split"]["val"]
    fitted = calibration["variants"]["difference"]
    assert fitted["method"] == "isotonic" and fitted["n"] == 8 and fitted["y"] == sorted(fitted["y"])


def test_good_segmentation_ranks_above_a_bad_one(qa_model, tmp_path):
    qa = QualityAssessor.load(qa_model)
    for case in find_cases(write_dataset(tmp_path / "new", 3, lesioned=True, seed=99), ["flair"]):
        truth = load_volume(case.seg, kind="segmentation").data > 0
        brain = load_volume(case.mask, kind="mask").data > 0
        prepared = qa.prepare(case)
        good, bad = qa.predict(prepared, truth), qa.predict(prepared, _shifted(truth, brain))
        assert good > bad + 0.2, (case.case_id, good, bad)


def test_predict_reads_no_ground_truth(qa_model, tmp_path):
    data = write_dataset(tmp_path / "cases", 2, lesioned=True, seed=7)
    segs = tmp_path / "segs"
    truths = _write_candidates(data, segs)
    qa = QualityAssessor.load(qa_model)
    expected = {c.case_id: qa.predict_case(c, truths[c.case_id]) for c in find_cases(data, ["flair"])}
    for label in data.glob("*/*_seg.nii.gz"):
        label.unlink()
    out = tmp_path / "pred"
    assert main(["qa", "predict", "--qa", str(qa_model), "--data", str(data), "--segmentations", str(segs),
                 "--out", str(out)]) == 0
    rows = json.loads((out / "predictions.json").read_text())["predictions"]
    assert {r["case_id"]: r["predicted_dice"] for r in rows} == pytest.approx(expected)
    with open(out / "predictions.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["case_id"] for r in table] == ["les00", "les01"]
    assert float(table[0]["predicted_dice"]) == pytest.approx(expected["les00"], abs=1e-6)
    assert table[0]["source"] == "segs" and table[0]["segmentation"].endswith("les00_segmentation.nii.gz")


@pytest.mark.parametrize("problem", ["shape", "grid", "case id", "empty"])
def test_predict_bad_input_names_the_file(qa_model, tmp_path, capsys, problem):
    data = write_dataset(tmp_path / "cases", 1, lesioned=False, seed=3)
    segs = tmp_path / "segs"
    segs.mkdir()
    name = {"case id": "patient7_segmentation.nii.gz"}.get(problem, "hea00_segmentation.nii.gz")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    if problem == "grid":
        affine[:3, 3] = 10.0
    if problem != "empty":
        shape = (28, 32, 20) if problem == "shape" else (28, 32, 24)
        nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), affine), segs / name)
    out = tmp_path / "pred"
    rc = main(["qa", "predict", "--qa", str(qa_model), "--data", str(data), "--segmentations", str(segs),
               "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert (str(segs) if problem == "empty" else name) in err
    assert {"shape": "shape", "grid": "voxel grid", "case id": "matches no case id", "empty": "no segmentation"}[problem] in err
    assert not out.exists()


def test_fit_bad_input(tmp_path, capsys):
    data = write_dataset(tmp_path / "labelled", 2, lesioned=True, seed=5)
    rc = main(["qa", "fit", "--data", str(data), "--out", str(tmp_path / "qa"), *QA_FIT, "--pool-size", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "candidate pool is empty" in err and str(data) in err
    segs = tmp_path / "segs"
    segs.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), segs / "les00_seg.nii.gz")
    rc = main(["qa", "fit", "--data", str(data), "--segmentations", str(segs), "--out", str(tmp_path / "qa")])
    err = capsys.readouterr().err
    assert rc == 2 and "les00_seg.nii.gz" in err and "shape" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "qa").exists()
    rc = main(["qa", "fit", "--data", str(data), "--out", str(tmp_path / "qa"), "--set", "pool_sise=3"])
    assert rc == 2 and "pool_sise" in capsys.readouterr().err


def test_resume_finishes_an_interrupted_fit(qa_model, tmp_path, capsys):
    qa = tmp_path / "qa"
    shutil.copytree(qa_model, qa)
    (qa / "qa.json").unlink()  # interrupted before the end
    data = json.loads((qa / "pool.json").read_text())
    labelled = json.loads((qa_model / "qa.json").read_text())["data"]
    assert main(["qa", "fit", "--data", labelled, "--out", str(qa), *QA_FIT]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["qa", "fit", "--data", labelled, "--out", str(qa), "--resume", *QA_FIT]) == 0
    assert json.loads((qa / "pool.json").read_text()) == data  # the same pool, rebuilt
    assert (qa / "qa.json").is_file()
    assert main(["qa", "fit", "--data", labelled, "--out", str(qa), *QA_FIT]) == 2  # complete: not overwritten


def test_evaluate_and_score_add_predicted_dice(qa_model, healthy_dir, lesioned_dir, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_train_args(healthy_dir, run, 2)) == 0
    ev = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--data", str(lesioned_dir), "--out", str(ev), "--qa", str(qa_model)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    for row in metrics["per_case"]:
        keys = list(row)
        assert keys[keys.index("dice") + 1] == "predicted_dice" and 0 <= row["predicted_dice"] <= 1
    html = (ev / "report.html").read_text()
    assert "predicted_dice" in html and "predicted against true Dice" in html  # the calibration plot
    maps = tmp_path / "maps"
    assert main(["score", "--run", str(run), "--data", str(lesioned_dir), "--out", str(maps), "--qa", str(qa_model)]) == 0
    scores = json.loads((maps / "scores.json").read_text())
    by_case = {r["case_id"]: r["predicted_dice"] for r in scores["cases"]}
    assert by_case == pytest.approx({r["case_id"]: r["predicted_dice"] for r in metrics["per_case"]})
