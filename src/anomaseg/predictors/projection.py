"""Energy-based projection onto the healthy-image manifold (Dehaene et al., ICLR 2020), as used by
Zhou, Deng & Wu (2020) as a VAE predictor.

Starting from the input x0, gradient descent on the energy

    E(x) = rec(x, f(x)) + lam * |x - x0|_1,       f(x) = g(mu(x)) (VAE: decoded posterior mean;
                                                         other models: their reconstruction)

with each pixel's step weighted by its current squared residual (so the descent concentrates on
what the model cannot reconstruct and leaves well-reconstructed tissue where it is):

    x_{t+1} = x_t - alpha * grad_x E(x_t) * (x_t - f(x_t))^2,    t = 0 .. steps-1

rec is summed over pixels ("l2", default: 1/2 sum (x - f(x))^2; "l1": sum |x - f(x)|, the loss the
VAEs train with), so a pixel's gradient does not depend on the image size; lam * |x - x0|_1 keeps
x_T close to x0 where the model allows it. The gradient flows through f (the full Jacobian, as in
the paper), in float32 with autocast off and the model in eval mode, batched over the whole batch
(per-sample energies are summed: samples do not interact).

Safeguard (not in the paper): the residual weight makes the step cubic in the residual, and the
Jacobian term J^T (x - f) is as large as the residual itself on a trained 64 px VAE of the phantom,
where the plain iteration diverged to NaN within 8 steps at alpha 0.5 (l2) and even at alpha 0.1
(l1). So a step that would raise a sample's energy E (or make it non-finite) is rejected and that
sample's alpha halved; accepted steps are exactly the update above, and where the iteration is
stable (the tiny test VAEs) the results are unchanged. Cost: steps + 1 forward+backward passes.

Maps (averaged over channels, higher = more anomalous):
- output="difference" (default): |x0 - x_T|, how far the projection moved each pixel;
- output="residual": |x_T - f(x_T)|, the reconstruction error left at the projected image.

Defaults: steps=20, alpha=0.1, lam=0.1, rec_loss="l2", output="difference", for intensities
normalised to ~[0, 1] (healthy 99th percentile = 1, clipped at 2). With "l2" a pixel with residual
r moves by about alpha * r^3 per step (r^2 weight times gradient r): healthy tissue (r ~ 0.05)
barely moves while a lesion with r ~ 1 moves ~0.1 per step towards its reconstruction.

Why these defaults (pixel AUROC / AUPRC inside the brain, model-size slices, no post-processing):
- "difference" because "residual" fails exactly when the projection works: once a lesion has been
  projected onto healthy tissue its residual is gone. On the 2-epoch CLI test run of
  tests/predictors (bright synthetic lesions; plain residual 1.000 / 1.000) "residual" scored
  0.000 / 0.015 at alpha 0.5 (20 steps, and already after 5), "difference" 1.000 / 1.000 at every
  setting tried. Where the projection removes little of the lesion "residual" can be better: on
  tiny VAEs trained on synthetic 32 px images (3 seeds; plain residual 0.990 / 0.76) it reached
  0.998 / 0.95 at alpha 0.5 against 0.99 / 0.74-0.78 for "difference" at every alpha and loss tried;
- alpha 0.1 because "difference" was best or tied there everywhere: flat on the synthetic images,
  1.000 on the CLI run, and on one spatial VAE (64 px, 9 epochs, 3 lesioned phantom cases; plain
  residual 0.73 / 0.17) 0.62 / 0.08 at alpha 0.1, 0.58 / 0.06 at 0.25, 0.54 / 0.05 at 0.5
  ("residual": 0.70 / 0.10). On that phantom model no projection setting beat the plain residual.
- "l2" for the same reason as the gradient predictors (gradients.py), and because "l1" needed the
  safeguard at every alpha tried on the phantom model.
benchmarks/study_vae_predictors.py (--predictor-params) compares settings on the phantom.

Requires only a reconstruction that is differentiable w.r.t. the input ("recon"): every model of
this package; for VAEs f decodes the posterior mean, so the map is deterministic.
"""

from __future__ import annotations

import torch

from anomaseg.predictors.base import Predictor, register_predictor
from anomaseg.predictors.gradients import (REC_LOSSES, eval_mode, full_precision, posterior_mean_reconstruction,
                                           reconstruction_loss, work_dtype)

OUTPUTS = ("difference", "residual")


def _energy(model, x: torch.Tensor, x0: torch.Tensor, lam: float, rec_loss: str):
    """Per-sample energy (B,), its gradient w.r.t. x and the reconstruction f(x) (detached)."""
    x = x.detach().requires_grad_(True)
    recon = posterior_mean_reconstruction(model, x)
    energy = reconstruction_loss(x, recon, rec_loss) + lam * (x - x0).abs().flatten(1).sum(1)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach(), grad, recon.detach()


def projection_with_reconstruction(model, x: torch.Tensor, steps: int = 20, alpha: float = 0.1, lam: float = 0.1,
                                   rec_loss: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, f(x_T)) of the energy-based projection (module docstring), float32 (float64 for a float64
    model). A step that would raise a sample's energy (or make it non-finite) is rejected and that
    sample's alpha halved (see the module docstring)."""
    with full_precision(x), eval_mode(model):
        x0 = x.detach().to(work_dtype(model)).clone()
        xt = x0
        energy, grad, recon = _energy(model, xt, x0, lam, rec_loss)
        step = torch.full((len(x0),) + (1,) * (x0.ndim - 1), float(alpha), dtype=x0.dtype, device=x0.device)
        for _ in range(steps):
            candidate = xt - step * grad * (xt - recon).pow(2)
            e_c, g_c, r_c = _energy(model, candidate, x0, lam, rec_loss)
            ok = (torch.isfinite(e_c) & (e_c <= energy)).view_as(step)
            xt, grad, recon = torch.where(ok, candidate, xt), torch.where(ok, g_c, grad), torch.where(ok, r_c, recon)
            energy = torch.where(ok.flatten(), e_c, energy)
            step = torch.where(ok, step, step / 2)
        return xt.detach(), recon


def project(model, x: torch.Tensor, steps: int = 20, alpha: float = 0.1, lam: float = 0.1,
            rec_loss: str = "l2") -> torch.Tensor:
    """x_T of the energy-based projection (module docstring)."""
    return projection_with_reconstruction(model, x, steps, alpha, lam, rec_loss)[0]


@register_predictor("projection", description="energy-based projection onto the healthy manifold (Dehaene et al. 2020)")
class ProjectionPredictor(Predictor):
    """map = |x0 - x_T| ("difference", default) or |x_T - f(x_T)| ("residual"), channel mean, with x_T
    the energy-based projection of the module docstring. Defaults: steps=20, alpha=0.1, lam=0.1,
    rec_loss="l2"."""

    requires = ("recon",)

    def __init__(self, steps: int = 20, alpha: float = 0.1, lam: float = 0.1, rec_loss: str = "l2",
                 output: str = "difference"):
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if alpha < 0 or lam < 0:
            raise ValueError(f"alpha and lam must be >= 0, got alpha={alpha}, lam={lam}")
        if rec_loss not in REC_LOSSES:
            raise ValueError(f"rec_loss must be one of {REC_LOSSES}, got {rec_loss!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.steps = int(steps)
        self.alpha = float(alpha)
        self.lam = float(lam)
        self.rec_loss = rec_loss
        self.output = output

    def anomaly_map(self, model, x: torch.Tensor) -> torch.Tensor:
        xt, recon = projection_with_reconstruction(model, x, self.steps, self.alpha, self.lam, self.rec_loss)
        diff = x.detach().to(xt.dtype) - xt if self.output == "difference" else xt - recon
        return diff.abs().mean(dim=1, keepdim=True).float()
