"""The scoring engine: a model, a predictor and post-processing, from prepared slices to a volume.

`Scorer` runs a predictor over a case's in-domain slices, maps the result back to the case's
voxel grid and post-processes it; `fit` fits predictor and threshold on healthy cases. It knows
nothing about run folders, datasets or training (`calibration.calibrate` builds one for a run,
`scoring` runs one over a dataset, `export.OnnxScorer` is one backed by ONNX Runtime).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from anomaseg import config as cfg
from anomaseg.data.patches import WINDOW_OVERLAP, windows
from anomaseg.data.slices import PreparedCase
from anomaseg.inference import inference_batch_size, inference_copy
from anomaseg.postprocess import PostProcessor
from anomaseg.predictors.base import Predictor, top_fraction_mean
from anomaseg.runtime import autocast, default_device, fabric_precision


def predictor_key(name: str, params: dict) -> str:
    if not params:
        return name
    return name + "(" + ",".join(f"{k}={params[k]}" for k in sorted(params)) + ")"


def make_postprocessor(score: cfg.ScoreConfig) -> PostProcessor:
    return PostProcessor(score.median_size, score.erosion, score.min_component_size, score.healthy_fpr,
                         score.calibration, score.size_units, score.median_mm, score.min_lesion_ml,
                         score.healthy_fp_lesions, score.min_lesion_ml_candidates)


def case_spacing(case: PreparedCase) -> tuple[float, float, float]:
    """The case's voxel size in mm along the axes of its RAS+ arrays."""
    return tuple(case.meta.get("spacing", (1.0, 1.0, 1.0)))


@dataclass
class Scorer:
    """Runs one predictor of a model over prepared cases and post-processes the maps.

    Scoring runs `net`, the model made fast for inference (`inference.inference_copy`: BatchNorm
    folded into the convolutions, channels_last, no parameter gradients), under
    `torch.inference_mode` (predictors that differentiate re-enable autograd for their input), in
    batches sized to the machine's memory (`batch_size=None`). `optimize=False` runs the trained
    model as it is (the reference the fast path is tested against). `model` stays untouched.

    `patch_size` > 0 (a run trained on patches, `data.patch_size`): the model sees patch_size windows
    of each slice, overlapping by half (`data.patches.window_grid`), their maps blended by MONAI's
    `sliding_window_inference`; a slice's score is then the top-fraction mean of its blended map
    inside the brain (`top_fraction_mean`), and the predictor is fitted on the same windows.
    """

    model: torch.nn.Module
    predictor: Predictor
    post: PostProcessor
    batch_size: int | None = None
    device: str = field(default_factory=default_device)
    precision: str = "auto"
    optimize: bool = True
    patch_size: int = 0

    def __post_init__(self):
        self.model = self.model.to(self.device).eval()
        self._fabric_precision = fabric_precision(self.precision, self.device)
        self.net = inference_copy(self.model, self.device) if self.optimize else self.model

    def _batch_size(self, sample_shape: tuple[int, ...]) -> int:
        if not self.batch_size:
            self.batch_size = inference_batch_size(self.net, sample_shape, self.device)
        return self.batch_size

    def _batches(self, images: np.ndarray):
        p = self.patch_size
        size = self._batch_size(images.shape[1:] if not p else (images.shape[1], p, p))
        for i in range(0, len(images), size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + size])).float()
            yield x.to(self.device).contiguous(memory_format=torch.channels_last)

    def predict_batch(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, 1, S, S), scores (B,)) of a batch of model-size slices and their brain masks."""
        if not self.patch_size:
            return self.predictor.predict(self.net, x, mask)
        maps = self.window_maps(x, mask)
        return maps, top_fraction_mean(maps, mask)

    def window_maps(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S): the predictor's maps of patch_size windows of x, blended. Image and mask
        travel through MONAI's windowing as channels of one tensor and are split for the predictor.
        Gaussian blending: a window's border pixels see less context (the convolutions' zero padding),
        so each pixel's map leans on the windows it is central in; MONAI normalises the weights, so a
        pointwise map is left unchanged."""
        from monai.inferers import sliding_window_inference

        channels = x.shape[1]

        def predict(window: torch.Tensor) -> torch.Tensor:
            return self.window_map(window[:, :channels].contiguous(memory_format=torch.channels_last),
                                   window[:, channels:] > 0.5)

        both = torch.cat([x.float(), mask.to(torch.float32)], 1)
        p = self.patch_size
        return sliding_window_inference(both, p, self._batch_size((channels, p, p)), predict, overlap=WINDOW_OVERLAP,
                                        mode="gaussian")

    def window_map(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, P, P) float32: the predictor's map of a batch of windows (`OnnxScorer`: the graph's)."""
        return self.predictor.predict(self.net, x, mask)[0].float()

    def predict_slices(self, case: PreparedCase) -> tuple[np.ndarray, np.ndarray]:
        """Raw maps (Z, S, S) at model size and the predictor's score per slice (Z,). Slices outside
        the model's domain get the case's lowest map value and score."""
        shape = (len(case.keep),) + case.images.shape[-2:]
        maps, scores = np.zeros(shape, np.float32), np.zeros(len(case.keep), np.float32)
        kept_maps, kept_scores = [], []
        masks = case.masks[case.keep]
        start = 0
        with torch.inference_mode(), autocast(self.device, self._fabric_precision):
            for x in self._batches(case.images[case.keep]):
                m = torch.from_numpy(masks[start:start + len(x)]).to(self.device)
                start += len(x)
                batch_maps, batch_scores = self.predict_batch(x, m[:, None])
                kept_maps.append(batch_maps[:, 0].float().cpu().numpy())
                kept_scores.append(batch_scores.float().cpu().numpy())
        if kept_maps:
            maps[case.keep], scores[case.keep] = np.concatenate(kept_maps), np.concatenate(kept_scores)
            maps[~case.keep], scores[~case.keep] = maps[case.keep].min(), scores[case.keep].min()
        return maps, scores

    def predict_case(self, case: PreparedCase) -> tuple[np.ndarray, np.ndarray]:
        """Post-processed anomaly map on the case's RAS+ voxel grid, and the score of every slice."""
        maps, scores = self.predict_slices(case)
        return self.smooth_volume(case, maps), scores

    def smooth_volume(self, case: PreparedCase, maps: np.ndarray) -> np.ndarray:
        """Model-size maps of the case's slices (`predict_slices`) on its voxel grid, post-processed."""
        return self.post.smooth(case.geometry.to_volume(maps), case.brain, case_spacing(case))

    def smoothed_volume(self, case: PreparedCase) -> np.ndarray:
        """Post-processed anomaly map on the case's RAS+ voxel grid."""
        return self.predict_case(case)[0]

    def fit(self, healthy: list[PreparedCase], progress: bool = False) -> "Scorer":
        """Fit the predictor on healthy slices, then the threshold on their post-processed maps."""
        from tqdm.auto import tqdm

        def batches():  # a patch run's predictor is fitted on the windows it will see (`window_maps`)
            for c in healthy:
                for x in self._batches(c.images[c.keep]):
                    if not self.patch_size:
                        yield x
                    else:
                        for w in windows(x, self.patch_size).split(self.batch_size):
                            yield w.contiguous(memory_format=torch.channels_last)

        with torch.inference_mode(), autocast(self.device, self._fabric_precision):
            self.predictor.fit(self.net, batches())
        with tqdm(healthy, desc=f"calibrating {self.predictor.name}", unit="case", disable=not progress,
                  leave=False) as cases:
            self.post.fit([(self.smoothed_volume(c), c.brain, case_spacing(c)) for c in cases])
        return self


def vars_of(post: PostProcessor) -> dict:
    """The post-processing settings (its fitted attributes, ending in `_`, left out)."""
    return {k: v for k, v in vars(post).items() if not k.endswith("_")}
