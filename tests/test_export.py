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
from anomaseg.errors import InputError
from anomaseg.export import INPUT, METADATA_KEY, OUTPUT, onnx_graph, read_metadata
from anomaseg.inference import inference_copy
from anomaseg.models import create_model
from anomaseg.predictors import create_predictor
from conftest import tiny_train_args

pytestmark = pytest.mark.slow


def assert_close_to_range(got: np.ndarray, want: np.ndarray, fraction: float = 1e-4) -> None:
    """|got - want| <= fraction of want's range (and the map is not flat)."""
    span = float(want.max() - want.min())
    assert span > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=fraction * span)


@pytest.mark.parametrize("name,predictor", [("spatial_vae", "residual"), ("dense_ae", "residual"),
                                            ("skip_ganomaly", "residual"), ("spatial_ae", "intensity"),
                                            ("spatial_vae", "grad_elbo"), ("dense_vae", "grad_kl"),
                                            ("anovaegan", "grad_rec"), ("spatial_vae", "combi"),
                                            ("dense_vae", "ensemble")])
def test_onnx_graph_computes_the_pytorch_map(name, predictor):
    torch.manual_seed(0)
    model = create_model(name, tiny=True, image_size=32, in_channels=2).eval()
    params = {"polarity": "auto"} if predictor == "grad_elbo" else {}  # the default model's default map
    predictor = create_predictor(predictor, **params).set_modalities(["flair", "t1"])  # bright + both polarities
    if predictor.name == "intensity":
        predictor.load_fitted_state({"centre_": [0.4, 0.5], "spread_": [0.1, 0.2]})
    else:  # combi and ensemble carry healthy statistics into the graph
        predictor.fit(model, [torch.rand(4, 2, 32, 32)])
    net = inference_copy(model, channels_last=False)
    session = ort.InferenceSession(onnx_graph(net, predictor, (2, 32, 32)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.rand(batch, 2, 32, 32) * 1.5
        with torch.no_grad():  # as the Scorer calls it: gradient predictors re-enable autograd for x only
            want = predictor.anomaly_map(model, x).numpy()
        got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
        assert got.shape == (batch, 1, 32, 32)
        assert_close_to_range(got, want)


class BesselPredictor:
    """A map through an operator ONNX has no translation for (torch.special.i1)."""

    name = "bessel"

    def anomaly_map(self, model, x):
        return torch.special.i1(model.reconstruct(x) - x).mean(1, keepdim=True)


def test_an_operator_without_onnx_translation_is_named():
    net = inference_copy(create_model("spatial_ae", tiny=True, image_size=32, in_channels=1), channels_last=False)
    with pytest.raises(InputError, match=r"'bessel' cannot be exported to ONNX: prims\.bessel_i1\.default has no "
                                         r"ONNX translation"):
        onnx_graph(net, BesselPredictor(), (1, 32, 32))


def test_score_with_onnx_equals_pytorch_without_the_run_folder(healthy_dir, lesioned_dir, tmp_path, capsys):
    """The default model's default map (grad_elbo: its backward pass is in the graph), exported with
    no option, scored by ONNX Runtime without the run folder: PyTorch's maps within 1e-4 of their range."""
    run = tmp_path / "run"
    args = tiny_train_args(healthy_dir, run, 1, "--precision", "32", "--modality", "flair")
    i = args.index("score.predictor=residual")
    del args[i - 1:i + 1]  # the model's default predictor
    assert main(args) == 0
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(onnx_file)]) == 0
    assert "score --onnx" in capsys.readouterr().out

    meta = read_metadata(onnx_file)
    (calibration,) = json.loads((run / "calibration.json").read_text()).values()
    assert calibration["predictor"] == "grad_elbo"
    assert meta.threshold == calibration["threshold"] and meta.preprocessing["modalities"] == ["flair"]
    assert meta.preprocessing["image_size"] == 32 and meta.postprocessing["median_size"] == 5
    assert meta.predictor["name"] == "grad_elbo" and meta.predictor["params"]["polarity"] == "auto"
    plain = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert json.loads(plain.get_modelmeta().custom_metadata_map[METADATA_KEY])["threshold"] == meta.threshold

    assert main(["score", "--run", str(run), "--data", str(lesioned_dir), "--out", str(tmp_path / "pt")]) == 0
    shutil.move(run, tmp_path / "elsewhere")  # scoring with ONNX needs no run folder
    assert main(["score", "--onnx", str(onnx_file), "--data", str(lesioned_dir), "--out", str(tmp_path / "ox")]) == 0
    maps = sorted((tmp_path / "pt").glob("*_anomaly_map.nii.gz"))
    assert len(maps) == 3
    for f in maps:
        torch_map, onnx_map = (nib.load(d / f.name).get_fdata(dtype=np.float32) for d in (tmp_path / "pt", tmp_path / "ox"))
        assert_close_to_range(onnx_map, torch_map)
    scores = json.loads((tmp_path / "ox" / "scores.json").read_text())
    assert scores["onnx"] == str(onnx_file.resolve()) and scores["threshold"] == meta.threshold
    # the default rule's second threshold travels in the file
    assert scores["threshold_rule"] == "hysteresis"
    assert scores["postprocess_fitted"] == calibration["postprocess_fitted"] == meta.postprocessing_fitted
    assert "peak_threshold_" in scores["postprocess_fitted"]


def test_export_refuses_predictors_onnx_cannot_express(healthy_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_train_args(healthy_dir, run, 1)) == 0
    capsys.readouterr()
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run), "--out", str(out), "--predictor", "projection"]) == 2
    err = capsys.readouterr().err
    assert "'projection' cannot be exported to ONNX" in err and "control flow" in err and not out.exists()
    assert main(["export", "--run", str(run), "--out", str(out), "--predictor", "ensemble", "--predictor-params",
                 "{ensemble: {members: [residual, projection]}}"]) == 2
    assert "'projection' cannot be exported to ONNX" in capsys.readouterr().err and not out.exists()
    not_onnx = tmp_path / "fake.onnx"
    not_onnx.write_bytes(b"\x00garbage")
    assert main(["score", "--onnx", str(not_onnx), "--data", str(healthy_dir), "--out", str(tmp_path / "o")]) == 2
    assert "fake.onnx" in capsys.readouterr().err
    assert main(["score", "--run", str(run), "--onnx", str(not_onnx), "--data", str(healthy_dir),
                 "--out", str(tmp_path / "o")]) == 2
    assert "exactly one of --run" in capsys.readouterr().err and not (tmp_path / "o").exists()
