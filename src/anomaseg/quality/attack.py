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
"""

from __future__ import annotations

import torch

from anomaseg.quality.networks import QualityPipeline, volume_dice


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
