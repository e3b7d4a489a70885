"""ONNX export: the graph computes PyTorch's maps, the file carries what scoring needs, and
`score --onnx` works without the run folder."""

import json
import shutil

import nibabel as nib
import numpy as np
import onnxruntime as ort
import pytest
import torch

from anomaseg.cli import main
from anomaseg.export import INPUT, METADATA_KEY, OUTPUT, onnx_graph, read_metadata
from anomaseg.inference import inference_copy
from anomaseg.models import create_model
from anomaseg.predictors import create_predictor
from conftest import tiny_train_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name,predictor", [("spatial_vae", "residual"), ("dense_ae", "residual"),
                                            ("skip_ganomaly", "residual"), ("spatial_ae", "intensity")])
def test_onnx_graph_computes_the_pytorch_map(name, predictor):
    torch.manual_seed(0)
    model = create_model(name, tiny=True, image_size=32, in_channels=2).eval()
    predictor = create_predictor(predictor).set_modalities(["flair", "t1"])  # bright + both polarities
    if predictor.name == "intensity":
        predictor.load_fitted_state({"centre_": [0.4, 0.5], "spread_": [0.1, 0.2]})
    net = inference_copy(model, channels_last=False)
    session = ort.InferenceSession(onnx_graph(net, predictor, (2, 32, 32)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.rand(batch, 2, 32, 32) * 1.5
        with torch.no_grad():
            want = predictor.anomaly_map(model, x).numpy()
        got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
        assert got.shape == (batch, 1, 32, 32)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_score_with_onnx_equals_pytorch_without_the_run_folder(healthy_dir, lesioned_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_train_args(healthy_dir, run, 1, "--precision", "32", "--modality", "flair")) == 0
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(onnx_file)]) == 0
    assert "score --onnx" in capsys.readouterr().out

    meta = read_metadata(onnx_file)
    calibration = json.loads((run / "calibration.json").read_text())["residual"]
    assert meta.threshold == calibration["threshold"] and meta.preprocessing["modalities"] == ["flair"]
    assert meta.preprocessing["image_size"] == 32 and meta.postprocessing["median_size"] == 5
    assert meta.predictor["name"] == "residual"
    plain = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert json.loads(plain.get_modelmeta().custom_metadata_map[METADATA_KEY])["threshold"] == meta.threshold

    assert main(["score", "--run", str(run), "--data", str(lesioned_dir), "--out", str(tmp_path / "pt")]) == 0
    shutil.move(run, tmp_path / "elsewhere")  # scoring with ONNX needs no run folder
    assert main(["score", "--onnx", str(onnx_file), "--data", str(lesioned_dir), "--out", str(tmp_path / "ox")]) == 0
    maps = sorted((tmp_path / "pt").glob("*_anomaly_map.nii.gz"))
    assert len(maps) == 3
    for f in maps:
        torch_map, onnx_map = (nib.load(d / f.name).get_fdata(dtype=np.float32) for d in (tmp_path / "pt", tmp_path / "ox"))
        assert torch_map.max() > 0.1
        np.testing.assert_allclose(onnx_map, torch_map, rtol=0, atol=1e-4)
    scores = json.loads((tmp_path / "ox" / "scores.json").read_text())
    assert scores["onnx"] == str(onnx_file.resolve()) and scores["threshold"] == meta.threshold


def test_export_refuses_predictors_onnx_cannot_express(healthy_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_train_args(healthy_dir, run, 1)) == 0
    capsys.readouterr()
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run), "--out", str(out), "--predictor", "grad_elbo"]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported to ONNX" in err and "autograd" in err and not out.exists()
    not_onnx = tmp_path / "fake.onnx"
    not_onnx.write_bytes(b"\x00garbage")
    assert main(["score", "--onnx", str(not_onnx), "--data", str(healthy_dir), "--out", str(tmp_path / "o")]) == 2
    assert "fake.onnx" in capsys.readouterr().err
    assert main(["score", "--run", str(run), "--onnx", str(not_onnx), "--data", str(healthy_dir),
                 "--out", str(tmp_path / "o")]) == 2
    assert "exactly one of --run" in capsys.readouterr().err and not (tmp_path / "o").exists()
