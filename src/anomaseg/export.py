"""ONNX export of a trained run, and scoring with ONNX Runtime (no run folder, no training stack).

`anomaseg export --run RUN --format onnx --out model.onnx` writes one file holding

- the graph `image -> anomaly_map`: input `image`, float32 (batch, C, S, S), normalised axial slices
  as `preprocessing` describes; output `anomaly_map`, float32 (batch, 1, S, S), the predictor's map
  at model size (higher = more anomalous). The model is the BatchNorm-folded eval copy that
  PyTorch scoring runs (`inference.inference_copy`); the batch axis is dynamic. A patch run
  (`data.patch_size`): S is the patch size, and `OnnxScorer` slides the graph over each image_size
  slice in windows blended as PyTorch scoring blends them (`scorer.Scorer.window_maps`);
- everything scoring needs, as JSON under the metadata key "anomaseg" (`onnx.ModelProto.metadata_props`,
  read with `onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map["anomaseg"]`):
  `preprocessing` (modalities in channel order, image size, intensity percentiles, clip, brain
  crop, the slice-domain rule), `predictor` (name, parameters, how a slice score is made from the
  map), `postprocessing` (median size, erosion, minimum component size, healthy FPR), `threshold`
  (fitted on the run's held-out healthy cases), the model's hyper-parameters and where it came from.

`anomaseg score --onnx model.onnx --data DATA --out MAPS` scores with ONNX Runtime (CPU) in float32;
with the same run scored by PyTorch in float32 the maps agree within 1e-4 of the map's range
(tests/test_export.py).

Which predictors export (ONNX's standard operator sets have no automatic differentiation, so input
gradients are traced into the graph as forward operators, see `trace_map`):
- `residual` (any polarity): one forward pass and arithmetic. Exported.
- `intensity` (the baseline): arithmetic on the input with its fitted healthy statistics. Exported.
- `grad_elbo` (the VAEs' default), `grad_kl`, `grad_rec`, `combi`, and `ensemble` when all its
  members export: the backward pass of the VAE's loss is traced into the graph (convolutions,
  transposed convolutions, the activations' derivatives), so ONNX Runtime computes the input
  gradient without autograd. Exported.
- `projection`: 20 gradient-descent steps on the input with per-sample step control (control flow
  on the values of the map). Not exported.
- `skip_ganomaly`: its map is the residual (export `residual`); its image score needs the
  discriminator's features and a healthy scaling, which the exported graph does not carry.
An operator that has no ONNX translation stops the export with an InputError naming it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from anomaseg import __version__
from anomaseg.atomic import atomic_path
from anomaseg.data.slices import SliceSpec
from anomaseg.errors import InputError
from anomaseg.inference import activation_bytes_per_sample, batch_size_for, inference_copy
from anomaseg.postprocess import PostProcessor
from anomaseg.predictors.base import TOP_FRACTION, create_predictor, top_fraction_mean
from anomaseg.calibration import calibrate
from anomaseg.scorer import Scorer, vars_of

METADATA_KEY = "anomaseg"
FORMAT = "anomaseg-onnx/1"
EXPORTABLE = ("residual", "intensity", "grad_elbo", "grad_kl", "grad_rec", "combi", "ensemble")
NOT_EXPORTABLE = {
    "projection": "it runs gradient descent on the input with per-sample step control (control flow on the "
                  "map's values, which a traced graph cannot hold)",
    "skip_ganomaly": "its image score needs the discriminator's features; export 'residual' for its map",
}
INPUT, OUTPUT = "image", "anomaly_map"
aten = torch.ops.aten


class MapGraph(torch.nn.Module):
    """image -> anomaly_map of an exportable predictor (what the ONNX graph computes)."""

    def __init__(self, net: torch.nn.Module, predictor):
        super().__init__()
        self.net, self.predictor = net, predictor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.predictor.anomaly_map(self.net, image)


@dataclass(frozen=True)
class ExportMetadata:
    """What an exported file carries besides the graph (stored as JSON, see the module docstring)."""

    preprocessing: dict
    predictor: dict
    postprocessing: dict
    threshold: float
    model: dict
    source: dict
    activation_bytes_per_sample: int
    postprocessing_fitted: dict = field(default_factory=dict)  # e.g. fp_lesions' min_lesion_ml_
    format: str = FORMAT
    anomaseg_version: str = __version__
    input: str = (f"{INPUT}: float32 (batch, channels, size, size), axial slices normalised as "
                  "'preprocessing' says, channels in the order of preprocessing.modalities")
    output: str = (f"{OUTPUT}: float32 (batch, 1, size, size), the predictor's map at model size; "
                   "higher = more anomalous")

    def slice_spec(self) -> SliceSpec:
        p = self.preprocessing
        return SliceSpec(tuple(p["modalities"]), int(p["image_size"]), tuple(p["percentiles"]), float(p["clip_max"]),
                         float(p["min_brain_fraction"]), bool(p["crop_to_brain"]))

    def postprocessor(self) -> PostProcessor:
        post = PostProcessor(**self.postprocessing)
        post.threshold_ = float(self.threshold)
        return post.load_fitted_state(self.postprocessing_fitted)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def export_onnx(run_dir: str | Path, out: str | Path, predictor: str | None = None, params: dict | None = None,
                opset: int = 18, progress: bool = True) -> ExportMetadata:
    """Export the run's model and predictor map to `out` (written atomically); returns the metadata."""
    import onnx

    from anomaseg.run import checkpoint_stamp, load_run_config

    config = load_run_config(run_dir)
    name = predictor or config.score.predictor
    check_exportable(name, params if predictor else config.score.predictor_params)
    scorer = calibrate(run_dir, predictor, params, progress, device="cpu")
    spec = config.data.slice_spec()
    # A fresh copy, contiguous: the exporter traces this module and nothing else uses it.
    net = inference_copy(scorer.model, "cpu", channels_last=False)
    size = scorer.patch_size or spec.image_size  # a patch run's graph maps one window; OnnxScorer slides it
    shape = (len(spec.modalities), size, size)
    meta = ExportMetadata(
        preprocessing={**asdict(spec), "patch_size": scorer.patch_size, "description": (
            "per modality: scale the brain's voxels so that the percentiles map to 0 and 1, clip to "
            "[0, clip_max], 0 outside the brain; RAS+ axial slices cropped to the brain's in-plane box "
            "(+2 voxels) if crop_to_brain, zero-padded to a square, resized (bilinear, antialiased) to "
            "image_size; slices with brain area < min_brain_fraction of the largest are out of domain "
            "and get the case's lowest value; patch_size > 0: the graph maps patch_size windows, overlapping by "
            "half, their maps blended with Gaussian weights (MONAI's sliding_window_inference)")},
        predictor={"name": name, "params": scorer.predictor.get_params(),
                   "slice_score": f"mean of the highest {TOP_FRACTION:.0%} of the map inside the brain mask"},
        postprocessing=vars_of(scorer.post), postprocessing_fitted=scorer.post.fitted_state(),
        threshold=float(scorer.post.threshold_), model=dict(scorer.model.hparams),
        source={"run": str(Path(run_dir).resolve()), "checkpoint": checkpoint_stamp(run_dir)},
        activation_bytes_per_sample=activation_bytes_per_sample(net, shape, "cpu"))
    proto = onnx_graph(net, scorer.predictor, shape, opset)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    proto.producer_name, proto.producer_version = "anomaseg", __version__
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return meta


def check_exportable(name: str, params: dict | None = None) -> None:
    """InputError unless predictor `name` (an ensemble: each of its members) can be exported."""
    if name == "ensemble":
        from anomaseg.predictors.ensemble import DEFAULT_MEMBERS

        members = (params or {}).get("members") or DEFAULT_MEMBERS
        for m in members:
            m = {"name": m} if isinstance(m, str) else m
            check_exportable(m["name"], m.get("params"))
        return
    if name not in EXPORTABLE:
        reason = NOT_EXPORTABLE.get(name, "it is not a forward pass (with input gradients) and arithmetic")
        raise InputError(None, f"predictor {name!r} cannot be exported to ONNX: {reason}; "
                               f"exportable: {', '.join(EXPORTABLE)}")


def convolution_input_gradient(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                               output_padding, groups, output_mask):
    """aten.convolution_backward as forward operators, for the input gradient only.

    Written here because neither torch (2.13) has a decomposition of convolution_backward nor
    ONNX (no automatic differentiation) an operator for it. The input gradient of a convolution is
    the transposed convolution with the same weights (and vice versa); the output padding restores
    the input's size where the stride dropped rows. The inference copy's parameters need no
    gradient, so only the input gradient is ever asked for; anything else is left to the operator
    itself (and its export then fails naming it)."""
    if output_mask[1] or output_mask[2]:
        return NotImplemented
    n = weight.dim() - 2
    if transposed:
        grad = aten.convolution(grad_output, weight, None, stride, padding, dilation, False, [0] * n, groups)
    else:
        pad_out = [input.shape[2 + i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                         + dilation[i] * (weight.shape[2 + i] - 1) + 1) for i in range(n)]
        grad = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, pad_out, groups)
    return grad, None, None


def trace_map(net: torch.nn.Module, predictor, shape: tuple[int, int, int]) -> torch.fx.GraphModule:
    """`image -> predictor.anomaly_map(net, image)` as a graph of aten operators, batch axis symbolic.

    `make_fx` runs the predictor on a symbolic input, autograd included: a predictor that takes an
    input gradient leaves its backward pass in the graph as ordinary operators (the backward of a
    convolution through `convolution_input_gradient`), so the graph needs no autograd to run."""
    from torch.fx.experimental.proxy_tensor import make_fx

    # A batch size unlike every other dimension: symbolic tracing gives equal sizes one symbol.
    batch = next(b for b in range(3, 4096) if b not in shape)
    # _allow_non_fake_inputs: the weights stay real tensors (the graph's constants); only x is symbolic.
    graph = make_fx(MapGraph(net, predictor).eval(), tracing_mode="symbolic", _allow_non_fake_inputs=True,
                    decomposition_table={aten.convolution_backward.default: convolution_input_gradient})
    return graph(torch.zeros((batch,) + tuple(shape))).eval()


def missing_operators(exc: BaseException) -> list[str]:
    """The operators named by the ONNX exporter's "No ONNX function found" errors in `exc`'s chain."""
    found, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found += re.findall(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'", str(exc))
        exc = exc.__cause__ or exc.__context__
    return sorted({f"{op}.{overload}" for op, overload in found})


def onnx_graph(net: torch.nn.Module, predictor, shape: tuple[int, int, int], opset: int = 18):
    """The ONNX ModelProto of `image -> predictor.anomaly_map(net, image)` for inputs (batch, *shape),
    the batch axis dynamic: the graph of `trace_map`, through torch's maintained (dynamo) exporter
    (the older TorchScript exporter was seen to alter the traced module's later eager outputs,
    torch 2.13). An operator without ONNX translation: InputError naming it."""
    import warnings

    graph = trace_map(net, predictor, shape)
    example = torch.rand((2,) + tuple(shape))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecations inside torch.export
        try:
            program = torch.onnx.export(graph, (example,), None, dynamo=True, input_names=[INPUT],
                                        output_names=[OUTPUT], dynamic_shapes=({0: batch},), opset_version=opset,
                                        external_data=False, verbose=False)
        except Exception as exc:  # the exporter wraps its errors in several types
            ops = missing_operators(exc)
            if not ops:
                raise
            name = getattr(predictor, "name", "") or type(predictor).__name__
            raise InputError(None, f"predictor {name!r} cannot be exported to ONNX: "
                                   + "; ".join(f"{op} {why_not_exported(op, opset)}" for op in ops)) from None
    return program.model_proto


def why_not_exported(op: str, opset: int) -> str:
    """Why operator `op` (as missing_operators names it) stops an export."""
    if "backward" in op:
        return ("is a backward (autograd) operator: ONNX has no automatic differentiation, and neither "
                f"torch {torch.__version__}'s decompositions nor anomaseg write it out as forward operators "
                "(anomaseg does for convolutions' input gradients only)")
    return (f"has no ONNX translation: ONNX opset {opset} has no such operator and torch {torch.__version__}'s "
            "exporter knows no decomposition of it into ONNX operators")


def read_metadata(path: str | Path) -> ExportMetadata:
    """The metadata of an exported file; InputError if it is missing, not ONNX or not ours."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "ONNX file not found")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for damaged files
        raise InputError(path, f"not a readable ONNX file ({exc.__class__.__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise InputError(path, "ONNX file has no anomaseg metadata: export it with `anomaseg export`")
    try:
        d = json.loads(props[METADATA_KEY])
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        return ExportMetadata(**d)
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"anomaseg metadata of the ONNX file is not usable ({exc})") from None


class OnnxScorer(Scorer):
    """A Scorer whose maps come from an exported file run by ONNX Runtime (float32, CPU).
    Pre- and post-processing, threshold and slice scores are the PyTorch Scorer's."""

    def __init__(self, path: str | Path, batch_size: int | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.meta = read_metadata(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.predictor = create_predictor(self.meta.predictor["name"], **self.meta.predictor["params"])
        self.predictor.set_modalities(self.meta.preprocessing["modalities"])
        self.post = self.meta.postprocessor()
        self.model = self.net = None
        self.device, self.precision, self._fabric_precision, self.optimize = "cpu", "32", "32-true", True
        self.batch_size = batch_size or batch_size_for(self.meta.activation_bytes_per_sample)
        self.patch_size = int(self.meta.preprocessing.get("patch_size", 0))  # files of older versions: none

    def predict_batch(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.patch_size:  # windows blended as PyTorch scoring blends them, each mapped by the graph
            return super().predict_batch(x, mask)
        maps = self.window_map(x, mask)
        return maps, top_fraction_mean(maps, mask)

    def window_map(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image = np.ascontiguousarray(x.float().cpu().numpy())
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: image})[0])

    def fit(self, healthy, progress: bool = False):
        raise NotImplementedError("an exported model is already calibrated (its threshold is in the file)")
