"""Predictors of Zhou, Deng & Wu (2020): projection, input gradients, combi, ensembles.

One tiny spatial VAE is trained here (module-scoped fixture, a few seconds) on synthetic 32 px
"brains"; lesioned images carry a bright disk. Gradient checks use an untrained float64 model.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomaseg.models import create_model
from anomaseg.predictors import create_predictor, list_predictors
from anomaseg.predictors.ensemble import PixelStats, foreground
from anomaseg.predictors.gradients import gaussian_smooth, input_gradient, vae_loss_terms
from anomaseg.predictors.projection import project

SIZE = 32
VAE_ONLY = ["grad_elbo", "grad_kl", "grad_rec", "combi", "ensemble"]
ANY_MODEL = ["residual", "projection"]
OURS = ["projection", "grad_elbo", "grad_kl", "grad_rec", "combi", "ensemble"]


def synthetic_slices(n: int, seed: int, lesion: bool = False, size: int = SIZE):
    """(x, lesion mask, brain mask), each (n, 1, size, size): a textured ellipse, optionally a disk
    of intensity 1.6 (healthy tissue ~0.5-1.1, background 0)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    t = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    col = lambda v: v[:, None, None]  # noqa: E731
    cx, cy = col(u(n) - 0.5) * 0.1, col(u(n) - 0.5) * 0.1
    r2 = ((xx - cx) / col(0.75 + 0.1 * u(n))) ** 2 + ((yy - cy) / col(0.8 + 0.1 * u(n))) ** 2
    brain = r2 < 1
    texture = 0.7 + 0.15 * torch.cos(4 * xx + col(u(n)) * 0.5) * torch.cos(3 * yy) + 0.2 * (r2 < 0.3)
    x = torch.where(brain, texture + 0.02 * torch.randn(n, size, size, generator=g), torch.zeros(()))
    seg = torch.zeros_like(brain)
    if lesion:
        lx, ly, rad = col(u(n) - 0.5) * 0.8, col(u(n) - 0.5) * 0.8, col(0.12 + 0.08 * u(n))
        seg = ((xx - lx) ** 2 + (yy - ly) ** 2 < rad**2) & brain
        x = torch.where(seg, torch.full_like(x, 1.6), x)
    return x[:, None].float(), seg[:, None], brain[:, None]


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # models this small run fastest on one thread, and several times faster than on two busy cores
    with threads(1):
        yield


@pytest.fixture(scope="module")
def trained(one_thread):
    """A tiny spatial VAE trained for 200 steps on healthy synthetic slices, fixed seed."""
    torch.manual_seed(0)
    train_x = synthetic_slices(512, seed=100)[0]
    model = create_model("spatial_vae", tiny=True, image_size=SIZE)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        xb = train_x[torch.randint(0, len(train_x), (32,))]
        loss = model.loss(xb, model(xb))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    healthy = synthetic_slices(32, seed=8)[0]
    return model, [healthy[:16], healthy[16:]], synthetic_slices(32, seed=7, lesion=True)


def fitted(name, model, healthy, **params):
    return create_predictor(name, **params).fit(model, iter(healthy))


# --------------------------------------------------------------------------- registry, supports
def test_registered():
    assert set(OURS + ["residual"]) <= set(list_predictors())
    with pytest.raises(KeyError):
        create_predictor("ensemble", members=["no_such_predictor"])
    with pytest.raises(ValueError):
        create_predictor("ensemble", members=[{"name": "residual", "weight": 2}])
    for name, bad in [("projection", {"output": "x"}), ("grad_kl", {"sigma": -1}), ("combi", {"mode": "x"}),
                      ("ensemble", {"combine": "median"}), ("grad_rec", {"rec_loss": "l3"})]:
        with pytest.raises(ValueError):
            create_predictor(name, **bad)


@pytest.mark.parametrize("name", VAE_ONLY + ANY_MODEL)
def test_supports_ae_vs_vae(name):
    ae = create_model("spatial_ae", tiny=True, image_size=SIZE)
    vae = create_model("dense_vae", tiny=True, image_size=SIZE)
    p = create_predictor(name)
    assert p.supports(vae)
    assert p.supports(ae) == (name in ANY_MODEL)


def test_ensemble_supports_what_its_members_support():
    ae = create_model("dense_ae", tiny=True, image_size=SIZE)
    assert create_predictor("ensemble", members=["residual", "projection"]).supports(ae)
    assert create_predictor("ensemble", members=["residual", "projection"]).requires == ("recon",)
    assert not create_predictor("ensemble", members=["residual", "grad_kl"]).supports(ae)
    assert set(create_predictor("ensemble").requires) == {"recon", "vae"}


# --------------------------------------------------------------------------- gradients
@pytest.fixture(scope="module")
def double_vae(one_thread):
    torch.manual_seed(3)
    model = create_model("spatial_vae", tiny=True, image_size=SIZE, beta=2.0)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


@pytest.mark.parametrize("term,rec_loss", [("elbo", "l2"), ("kl", "l2"), ("rec", "l2"), ("elbo", "l1"), ("rec", "l1")])
def test_input_gradient_matches_finite_differences(double_vae, term, rec_loss):
    x = synthetic_slices(3, seed=5, lesion=True)[0].double()
    grad = input_gradient(double_vae, x, term, rec_loss)
    assert grad.dtype == torch.float64 and grad.shape == x.shape
    eps = 1e-6
    for b, i, j in [(0, 16, 16), (1, 10, 20), (2, 5, 27), (2, 20, 9)]:
        xp, xm = x.clone(), x.clone()
        xp[b, 0, i, j] += eps
        xm[b, 0, i, j] -= eps
        with torch.no_grad():
            fd = (vae_loss_terms(double_vae, xp, rec_loss)[term][b] - vae_loss_terms(double_vae, xm, rec_loss)[term][b]) / (2 * eps)
        assert float(grad[b, 0, i, j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-6)


def test_gradients_do_not_mix_across_the_batch(double_vae):
    x = synthetic_slices(4, seed=6, lesion=True)[0].double()
    whole = input_gradient(double_vae, x, "elbo")
    alone = torch.cat([input_gradient(double_vae, x[i:i + 1], "elbo") for i in range(4)])
    torch.testing.assert_close(whole, alone)


def test_gradient_map_is_smoothed_abs_gradient(double_vae):
    x = synthetic_slices(2, seed=5)[0].double()
    g = input_gradient(double_vae, x, "kl").abs()
    raw = create_predictor("grad_kl", sigma=0).anomaly_map(double_vae, x)
    torch.testing.assert_close(raw, g.float())
    smooth = create_predictor("grad_kl", sigma=1.5).anomaly_map(double_vae, x)
    ref = np.stack([ndimage.gaussian_filter(a, 1.5, mode="nearest", truncate=3.0) for a in g[:, 0].numpy()])
    np.testing.assert_allclose(smooth[:, 0].numpy(), ref, rtol=1e-5, atol=1e-9)


def test_gaussian_smooth_keeps_constants_and_mass():
    x = torch.full((2, 3, 16, 16), 0.7)
    torch.testing.assert_close(gaussian_smooth(x, 2.0), x)
    d = torch.zeros(1, 1, 33, 33)
    d[0, 0, 16, 16] = 1
    assert float(gaussian_smooth(d, 2.0).sum()) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- maps: shape, determinism, autocast
@pytest.mark.parametrize("name", OURS)
def test_maps_shape_determinism_and_autocast(trained, name):
    model, healthy, (x, _, _) = trained
    p = fitted(name, model, healthy)
    x = x[:6]
    a = p.anomaly_map(model, x)
    b = p.anomaly_map(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Scorer runs them
        c = p.anomaly_map(model, x)
    model.train()  # BatchNorm in training mode would mix the batch: the predictors switch it off
    d = p.anomaly_map(model, x)
    assert model.training
    model.eval()
    scores = p.score(model, x)
    assert a.shape == (6, 1, SIZE, SIZE) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, d, rtol=0, atol=0)
    scale = float(a.abs().max())
    if name in ("projection", "grad_elbo", "grad_kl", "grad_rec"):  # computed in float32 whatever the context
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    else:  # their residual member follows the caller's bf16 autocast
        assert float((a - c).abs().max()) < 0.1 * scale
    assert scores.shape == (6,)


@pytest.mark.parametrize("name", ["projection", "grad_elbo"])
def test_gradients_are_taken_even_under_no_grad_or_inference_mode(trained, name):
    model, _, (x, _, _) = trained
    p = create_predictor(name, **({"steps": 3} if name == "projection" else {}))
    expected = p.anomaly_map(model, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(p.anomaly_map(model, x[:2]), expected, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(p.anomaly_map(model, x[:2]), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- planted lesions
PLANTED = [("residual", {}, 0.95), ("projection", {}, 0.95), ("projection", {"output": "residual"}, 0.95),
           ("grad_elbo", {}, 0.95), ("grad_elbo", {"polarity": "bright"}, 0.95), ("grad_rec", {}, 0.95), ("grad_kl", {}, 0.7), ("combi", {}, 0.95),
           ("combi", {"mode": "sum"}, 0.95), ("ensemble", {}, 0.95), ("ensemble", {"combine": "max"}, 0.95),
           ("ensemble", {"combine": "product"}, 0.95)]


@pytest.mark.parametrize("name,params,min_auroc", PLANTED, ids=[f"{n}{p or ''}" for n, p, _ in PLANTED])
def test_planted_lesions_rank_above_healthy_tissue(trained, name, params, min_auroc):
    model, healthy, (x, seg, brain) = trained
    p = fitted(name, model, healthy, **params)
    maps = p.anomaly_map(model, x)
    values, labels = maps[brain].numpy(), seg[brain].numpy()
    assert roc_auc_score(labels, values) > min_auroc
    assert values[labels].mean() > values[~labels].mean()


# --------------------------------------------------------------------------- projection
def test_projection_without_steps_is_the_residual(trained):
    model, _, (x, _, _) = trained
    x = x[:4]
    residual = create_predictor("residual").anomaly_map(model, x)
    torch.testing.assert_close(create_predictor("projection", steps=0, output="residual").anomaly_map(model, x),
                               residual, rtol=1e-5, atol=1e-6)
    assert float(create_predictor("projection", steps=0).anomaly_map(model, x).abs().max()) == 0


def test_projection_moves_lesions_more_than_healthy_tissue(trained):
    model, _, (x, seg, brain) = trained
    xt = project(model, x)
    moved = (xt - x).abs()
    assert float(moved[seg].mean()) > 5 * float(moved[brain & ~seg].mean())
    # the lesion's residual goes down: the projection makes it look more like healthy tissue
    with torch.no_grad():
        before = (x - model(x).recon).abs()[seg].mean()
        after = (xt - model(xt).recon).abs()[seg].mean()
    assert float(after) < float(before)


def test_projection_safeguard_keeps_a_too_large_step_finite_and_descending(trained):
    from anomaseg.predictors.projection import _energy, projection_with_reconstruction

    model, _, (x, _, _) = trained
    x = x[:4]
    xt, recon = projection_with_reconstruction(model, x, steps=8, alpha=1e4)  # the plain update would diverge
    assert torch.isfinite(xt).all() and torch.isfinite(recon).all()
    before, after = _energy(model, x, x, 0.1, "l2")[0], _energy(model, xt, x, 0.1, "l2")[0]
    assert (after <= before).all()


# --------------------------------------------------------------------------- ensembles and fitted state
def test_foreground_statistics():
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0
    x[1, 0, 2, 2] = 2.0
    s = PixelStats()
    s.update(torch.arange(32.0).view(2, 1, 4, 4), foreground(x))
    assert s.n == 2 and s.mean == pytest.approx((5 + 26) / 2) and s.std == pytest.approx(10.5)
    assert foreground(torch.zeros(1, 1, 2, 2)).all()  # no foreground at all: every pixel counts


@pytest.mark.parametrize("combine", ["mean", "max", "product"])
@pytest.mark.parametrize("member", [{"name": "residual"}, {"name": "grad_kl", "params": {"sigma": 1.0}}])
def test_ensemble_of_one_is_its_normalised_member(trained, combine, member):
    model, healthy, (x, _, _) = trained
    ens = fitted("ensemble", model, healthy, members=[member], combine=combine)
    single = fitted(member["name"], model, healthy, **member.get("params", {}))
    stats = PixelStats()
    for h in healthy:
        stats.update(single.anomaly_map(model, h), foreground(h))
    m = single.anomaly_map(model, x)
    expected = m / stats.mean if combine == "product" else (m - stats.mean) / stats.std
    torch.testing.assert_close(ens.anomaly_map(model, x), expected, rtol=1e-5, atol=1e-5)


def test_fitted_state_round_trips_through_json(trained):
    model, healthy, (x, _, _) = trained
    params = {"members": ["residual", {"name": "combi", "params": {"mode": "sum"}},
                          {"name": "ensemble", "params": {"members": ["grad_kl"], "combine": "max"}}],
              "combine": "max"}
    ens = fitted("ensemble", model, healthy, **params)
    state = json.loads(json.dumps(ens.fitted_state()))
    assert len(state["mean_"]) == 3 and set(state["member_states_"][1]) >= {"residual_mean_", "grad_kl_std_"}
    fresh = create_predictor("ensemble", **json.loads(json.dumps(params))).load_fitted_state(state)
    torch.testing.assert_close(fresh.anomaly_map(model, x), ens.anomaly_map(model, x), rtol=0, atol=0)
    combi = fitted("combi", model, healthy)
    again = create_predictor("combi").load_fitted_state(json.loads(json.dumps(combi.fitted_state())))
    torch.testing.assert_close(again.anomaly_map(model, x), combi.anomaly_map(model, x), rtol=0, atol=0)
    with pytest.raises(ValueError):
        create_predictor("ensemble", members=["residual"]).load_fitted_state(state)


@pytest.mark.parametrize("name", ["combi", "ensemble"])
def test_unfitted_combinations_refuse_to_score(trained, name):
    model, _, (x, _, _) = trained
    with pytest.raises(RuntimeError, match="fit"):
        create_predictor(name).anomaly_map(model, x[:2])
