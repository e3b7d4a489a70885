"""FGSM strength on the paper's intensity scale: the conversion to our normalised intensities."""

import numpy as np
import pytest
import torch

from anomaseg.data.slices import SliceSpec, normalise
from anomaseg.quality.attack import eps_on_our_scale


def test_unit_scale_is_the_case_intensity_range():
    # a case normalised as data/slices.py does: brain 1st/99th percentiles -> 0/1, clipped to [0, 2]
    rng = np.random.default_rng(0)
    data = np.zeros((20, 20, 10), np.float32)
    brain = np.zeros(data.shape, bool)
    brain[2:18, 2:18, 1:9] = True
    data[brain] = rng.normal(100, 10, brain.sum())
    data[5:8, 5:8, 4:6] = 250  # a hyperintense lesion: above the 99th percentile, clipped at 2
    image = torch.from_numpy(normalise(data, brain, SliceSpec(("flair",), 32))).permute(2, 0, 1)[:, None]
    assert float(image.max()) == pytest.approx(2.0)
    # a case on [0, 2]: eps 0.1 of its [0, 1] min-max scale is 0.2 of ours
    assert eps_on_our_scale([0.0, 0.1, 0.3], image) == pytest.approx([0.0, 0.2, 0.6])
    # eps 1 on the paper's scale moves a background pixel to the brightest intensity
    (full,) = eps_on_our_scale([1.0], image)
    assert float(image.min()) + full == pytest.approx(float(image.max()))


def test_zscore_scale_is_the_brain_standard_deviation():
    image = torch.zeros(2, 1, 4, 4)
    image[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # brain pixels 1..4: std 1.291
    assert eps_on_our_scale([0.5], image, "zscore") == pytest.approx([0.5 * np.std([1, 2, 3, 4], ddof=1)])
    with pytest.raises(ValueError, match="scale must be one of"):
        eps_on_our_scale([0.1], image, "hounsfield")
