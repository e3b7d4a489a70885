"""FGSM against a quality-assessment pipeline (the robustness test of Zhou, Deng & Wu 2020).

What is attacked: the image I, i.e. the normalised model-size slices of a case (`data/slices.py`:
brain 1st/99th percentiles -> 0/1, clipped to [0, clip_max]) that the pipeline reads. The
candidate segmentation S is left alone. For the difference variants the perturbed I enters both
the REC-Net input ``I * (1 - S)`` and ``I_dif = I - REC(...)``: the attacker sees the whole pipeline
(white box), not only REG-Net.

How: one step of the fast gradient sign method (Goodfellow et al. 2015) on the squared error of
the predicted *volume* Dice against the true Dice, ``x_adv = clip(x + eps * sign(grad_x (D(x) -
D_true)^2), 0, clip_max)``, every pixel of every assessed slice moved by eps at most (an L-inf
ball of radius eps on the normalised intensities). The gradient is taken once per candidate;
each eps reuses its sign.

The scale of eps. Zhou, Deng & Wu report eps 0.05 / 0.1 / 0.2 / 0.3 for "fast gradient sign
[Kurakin et al., 2016]" on ACDC cine-MR slices without stating their intensity scale in the text
we could read (their MIDL 2020 slides and the arXiv 1903.08773 abstract). Eps of 0.05-0.3 only
make sense on images scaled to [0, 1] (the FGSM convention of Goodfellow et al. and the MNIST
attacks; on [0, 255] they would be below one grey level, on z-scores a fraction of a standard
deviation of the whole image, mostly background): we take the paper's scale to be each image
min-max scaled to [0, 1] ("unit"); "zscore" (eps in standard deviations of the brain's
intensities) is offered for comparison. Ours: `data/slices.py` maps a case's brain 1st / 99th
percentiles to 0 / 1 and clips to [0, 2] (background 0), so a case's [0, 1] scale is ours divided
by its maximum: eps_ours = eps_paper * max(I), 1-2 times eps_paper (lesions brighter than the 99th
percentile reach up to 2). `eps_on_our_scale` converts per case.
"""

from __future__ import annotations

import torch

from anomaseg.quality.networks import QualityPipeline, volume_dice

PAPER_SCALES = ("unit", "zscore")


def eps_on_our_scale(eps: list[float], image: torch.Tensor, scale: str = "unit") -> list[float]:
    """FGSM sizes given on the paper's intensity scale as sizes on our normalised intensities, for
    one case's assessed slices `image` (N, C, S, S): times the case's intensity range (min-max
    scaling to [0, 1], "unit") or times the standard deviation of its brain (nonzero) pixels
    ("zscore")."""
    x = image.detach().float()
    if scale == "unit":
        factor = float(x.max() - x.min())
    elif scale == "zscore":
        inside = x[x != 0]
        factor = float(inside.std()) if inside.numel() > 1 else 0.0
    else:
        raise ValueError(f"scale must be one of {', '.join(PAPER_SCALES)}, got {scale!r}")
    return [float(e) * factor for e in eps]


def fgsm_predictions(pipeline: QualityPipeline, image: torch.Tensor, seg: torch.Tensor, areas: torch.Tensor,
                     outside: float, true_dice: float, eps: list[float], clip_max: float = 2.0) -> list[float]:
    """The predicted volume Dice after an FGSM step of each size in `eps` (0: no attack)."""
    pipeline.eval()
    x = image.detach().clone().requires_grad_(True)
    predicted = volume_dice(pipeline(x, seg), areas, outside)
    (grad,) = torch.autograd.grad((predicted - true_dice) ** 2, x)  # no weight gradients computed
    direction = grad.sign()
    out = []
    with torch.no_grad():
        for e in eps:
            if e == 0:
                out.append(float(predicted))
                continue
            x_adv = (image + e * direction).clamp(0.0, clip_max)
            out.append(float(volume_dice(pipeline(x_adv, seg), areas, outside)))
    return out
