"""End to end through the `anomaseg` command, and the bad-input contract: one clear error line
naming the file, a non-zero exit, and no partial outputs."""

import json

import nibabel as nib
import numpy as np
import pytest

from anomaseg.cli import main
from conftest import tiny_train_args, write_dataset


@pytest.fixture
def trained_run(healthy_dir, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_train_args(healthy_dir, run, 4)) == 0
    return run


def test_train_evaluate_score(trained_run, lesioned_dir, tmp_path, capsys):
    ev = tmp_path / "eval"
    assert main(["evaluate", "--run", str(trained_run), "--data", str(lesioned_dir), "--out", str(ev)]) == 0
    out = capsys.readouterr().out
    assert str(ev / "report.html") in out
    metrics = json.loads((ev / "metrics.json").read_text())
    for key in ("pixel_auroc", "pixel_auprc", "dice_best", "dice_at_threshold", "image_auroc", "threshold", "per_case"):
        assert key in metrics
    assert [c["case_id"] for c in metrics["per_case"]] == ["les00", "les01", "les02"]
    # the synthetic lesion is much brighter than anything healthy: even a tiny model finds it
    assert metrics["pixel_auroc"] > 0.85 and metrics["dice_best"] > 0.3
    html = (ev / "report.html").read_text()
    assert "les00" in html and "data:image/png;base64," in html
    # the intensity baseline, computed in the same pass, stands beside the model everywhere
    assert "residual vs the intensity baseline: AUPRC" in out
    # lesion-level numbers: printed for the baseline and the model, FROC in metrics.json and the report
    assert "intensity (baseline): pixel AUROC" in out and out.count("lesion F1") >= 3
    assert 0 <= metrics["froc_score"] <= 1
    assert set(metrics["froc_sensitivity"]) == {"1/8", "1/4", "1/2", "1", "2", "4", "8"}
    assert metrics["froc_curve"]["fp_per_case"][0] == 0 and "froc_score" in metrics["baseline"]
    assert "<h2>FROC</h2>" in html
    base = metrics["baseline"]
    assert base["predictor"] == "intensity" and base["n_voxels"] == metrics["n_voxels"]
    assert base["pixel_auroc"] > 0.85  # the synthetic lesion is bright: the baseline finds it too
    gain = metrics["gain_over_baseline"]
    assert gain["dice_best"] == pytest.approx(metrics["dice_best"] / base["dice_best"] - 1)
    assert all(0 <= row["baseline_dice"] <= 1 for row in metrics["per_case"])
    assert html.index("(baseline)") < html.index("<h2>Summary</h2>")  # first row of the first table

    maps = tmp_path / "maps"
    assert main(["score", "--run", str(trained_run), "--data", str(lesioned_dir), "--out", str(maps)]) == 0
    for case in ("les00", "les01", "les02"):
        src = nib.load(lesioned_dir / case / f"{case}_flair.nii.gz")
        amap = nib.load(maps / f"{case}_anomaly_map.nii.gz")
        seg = nib.load(maps / f"{case}_segmentation.nii.gz")
        assert amap.shape == seg.shape == src.shape
        np.testing.assert_allclose(amap.affine, src.affine)
        assert amap.get_data_dtype() == np.float32 and seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
    # the lesion scores higher than healthy brain in the written map
    truth = np.asarray(nib.load(lesioned_dir / "les00" / "les00_seg.nii.gz").dataobj) > 0
    brain = np.asarray(nib.load(lesioned_dir / "les00" / "les00_mask.nii.gz").dataobj) > 0
    amap = np.asarray(nib.load(maps / "les00_anomaly_map.nii.gz").dataobj)
    assert amap[truth].mean() > 3 * amap[brain & ~truth].mean()


def test_evaluate_without_the_baseline(trained_run, lesioned_dir, tmp_path, capsys):
    ev = tmp_path / "eval"
    assert main(["evaluate", "--run", str(trained_run), "--data", str(lesioned_dir), "--out", str(ev),
                 "--no-baseline"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert "baseline" not in metrics and "baseline_dice" not in metrics["per_case"][0]
    assert "intensity baseline" not in capsys.readouterr().out
    assert "intensity" not in json.loads((trained_run / "calibration.json").read_text())


def test_outputs_follow_the_input_orientation(trained_run, tmp_path):
    """A test case stored in another voxel order gets maps in that order, aligned with it."""
    src_dir = tmp_path / "flipped" / "les"
    write_dataset(tmp_path / "orig", 1, lesioned=True, seed=5)
    src_dir.mkdir(parents=True)
    for f in (tmp_path / "orig" / "les00").iterdir():
        img = nib.load(f)
        data = np.asarray(img.dataobj)[::-1]  # voxel axis 0 reversed...
        affine = img.affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(data, affine), src_dir / f.name.replace("les00", "les"))  # ...same world
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["score", "--run", str(trained_run), "--data", str(tmp_path / "orig"), "--out", str(a)]) == 0
    assert main(["score", "--run", str(trained_run), "--data", str(tmp_path / "flipped"), "--out", str(b)]) == 0
    ma, mb = nib.load(a / "les00_anomaly_map.nii.gz"), nib.load(b / "les_anomaly_map.nii.gz")
    np.testing.assert_allclose(np.asarray(mb.dataobj), np.asarray(ma.dataobj)[::-1], atol=1e-5)
    np.testing.assert_allclose(mb.affine, nib.load(src_dir / "les_flair.nii.gz").affine)


def _break(kind, case_dir):
    case = case_dir.name
    img = nib.load(case_dir / f"{case}_flair.nii.gz")
    if kind == "missing_modality":
        (case_dir / f"{case}_flair.nii.gz").rename(case_dir / f"{case}_t1.nii.gz")
        return f"{case}: case '{case}' has no 'flair' image"
    if kind == "seg_shape":
        nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), img.affine), case_dir / f"{case}_seg.nii.gz")
        return f"{case}_seg.nii.gz: segmentation is not on the voxel grid of {case}_flair.nii.gz: shape (5, 5, 5)"
    if kind == "corrupt":
        p = case_dir / f"{case}_flair.nii.gz"
        p.write_bytes(p.read_bytes()[:100])
        return f"{case}_flair.nii.gz: image is corrupt"
    if kind == "not_nifti":
        (case_dir / f"{case}_flair.nii.gz").write_text("<html>not an image</html>")
        return f"{case}_flair.nii.gz: image is corrupt or not a readable NIfTI"
    if kind == "nan":
        data = img.get_fdata().astype(np.float32)
        data[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine), case_dir / f"{case}_flair.nii.gz")
        return f"{case}_flair.nii.gz: image contains 1 NaN/Inf voxels"
    if kind == "empty_mask":
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), case_dir / f"{case}_mask.nii.gz")
        return f"{case}_mask.nii.gz: brain mask is empty"
    raise ValueError(kind)


def _error_line(stderr: str) -> str:
    """The one error line (progress bars may have drawn on stderr before it)."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("anomaseg: error: "), stderr
    return errors[0]


BAD = ["missing_modality", "seg_shape", "corrupt", "not_nifti", "nan", "empty_mask"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_test_input_fails_cleanly(trained_run, tmp_path, capsys, kind):
    data = write_dataset(tmp_path / "bad", 3, lesioned=True, seed=3)
    expected = _break(kind, data / "les01")
    for command in ("evaluate", "score"):
        out = tmp_path / f"out_{command}"
        capsys.readouterr()
        assert main([command, "--run", str(trained_run), "--data", str(data), "--out", str(out)]) == 2
        err = _error_line(capsys.readouterr().err)
        assert expected in err, err
        assert not out.exists()  # nothing half-written
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".out_{command}")]


@pytest.mark.parametrize("kind", ["corrupt", "nan", "empty_mask"])
def test_bad_training_input_fails_cleanly(tmp_path, capsys, kind):
    data = write_dataset(tmp_path / "bad", 4, lesioned=False, seed=3)
    expected = _break(kind, data / "hea02")
    assert main(tiny_train_args(data, tmp_path / "run", 1)) == 2
    err = _error_line(capsys.readouterr().err)
    assert expected in err, err


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(tiny_train_args(tmp_path / "empty", tmp_path / "run", 1)) == 2
    assert "empty: no NIfTI cases found" in capsys.readouterr().err


def test_refuses_to_replace_a_foreign_output_folder(trained_run, lesioned_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(["score", "--run", str(trained_run), "--data", str(lesioned_dir), "--out", str(out)]) == 2
    assert (out / "thesis.tex").read_text() == "precious"
    # an earlier anomaseg output is replaced
    ours = tmp_path / "ours"
    assert main(["score", "--run", str(trained_run), "--data", str(lesioned_dir), "--out", str(ours)]) == 0
    assert main(["score", "--run", str(trained_run), "--data", str(lesioned_dir), "--out", str(ours)]) == 0


def test_bad_config_values(healthy_dir, tmp_path, capsys):
    assert main(tiny_train_args(healthy_dir, tmp_path / "r", 1, "--set", "train.epochs=many")) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(tiny_train_args(healthy_dir, tmp_path / "r", 1, "--image-size", "100")) == 2
    assert "power of two" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: [unclosed")
    assert main(tiny_train_args(healthy_dir, tmp_path / "r", 1, "--config", str(cfg))) == 2
    assert "c.yaml: config is not valid YAML" in capsys.readouterr().err
