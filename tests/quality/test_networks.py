"""REC-Net and REG-Net as modules: REC-Net inpaints a removed structure better than copying its
surroundings; REG-Net's per-slice counts add up to the volume Dice; the loop contract holds."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from anomaseg.metrics import dice_score
from anomaseg.quality.networks import (QualityOutput, QualityPipeline, create_network, volume_dice)


def _structure_images(n: int, rng: np.random.Generator, size: int = 32):
    """Smooth random background plus a bright disc with its own radial shading (a healthy
    structure, segmented by `seg`): what fills a removed disc cannot be copied from around it."""
    y, x = np.mgrid[:size, :size] / size
    images, segs = [], []
    for _ in range(n):
        a, b, p = rng.uniform(0.1, 0.3, 3)
        bg = 0.4 + a * np.sin(6 * x + p * 10) + b * np.cos(5 * y)
        cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.12, 0.2)
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / r
        disc = d < 1
        image = np.where(disc, 1.4 - 0.5 * d ** 2, bg) + rng.normal(0, 0.01, bg.shape)
        images.append(image)
        segs.append(disc)
    return (torch.tensor(np.array(images), dtype=torch.float32)[:, None],
            torch.tensor(np.array(segs), dtype=torch.float32)[:, None])


def _nearest_fill(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Copy each removed pixel from the nearest kept pixel."""
    idx = ndi.distance_transform_edt(hole, return_distances=False, return_indices=True)
    return image[tuple(idx)]


def test_rec_net_inpaints_a_removed_structure_better_than_its_surroundings():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, s = _structure_images(128, rng)
    net = create_network("rec_net", in_channels=1, image_size=32, base_channels=4, depth=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(40):
        idx = torch.randint(0, len(x), (16,))
        net.training_step(torch.cat([x[idx], s[idx]], 1), {"model": opt}, lambda loss: loss.backward())
    net.eval()
    xt, st = _structure_images(32, np.random.default_rng(1))
    with torch.no_grad():
        recon = net(torch.cat([xt, st], 1)).recon
    hole = st[:, 0].bool()
    rec_err = (recon[:, 0] - xt[:, 0]).abs()[hole].mean().item()
    near, ring = [], []
    for img, h in zip(xt[:, 0].numpy(), hole.numpy()):
        near.append(np.abs(_nearest_fill(img, h) - img)[h].mean())
        around = ndi.binary_dilation(h, iterations=2) & ~h
        ring.append(np.abs(img[around].mean() - img)[h].mean())
    assert rec_err < 0.5 * min(np.mean(near), np.mean(ring)), (rec_err, np.mean(near), np.mean(ring))
    # the input really had the region removed: a reconstruction is not a copy of the input
    assert (torch.cat([xt, st], 1)[:, :1] * (1 - st))[st.bool()].abs().max() == 0


def test_volume_dice_of_exact_counts_is_the_volume_dice():
    rng = np.random.default_rng(3)
    truth = ndi.gaussian_filter(rng.random((20, 20, 12)), 2) > 0.52
    seg = ndi.binary_dilation(truth, iterations=1) & (rng.random(truth.shape) > 0.2)
    s = seg.sum(axis=(0, 1)).astype(float)
    tp = (seg & truth).sum(axis=(0, 1)).astype(float)
    fn = (truth & ~seg).sum(axis=(0, 1)).astype(float)
    q = np.where(s > 0, tp / np.maximum(s, 1), 0.5)
    out = QualityOutput(torch.tensor(q), torch.tensor(fn))
    assert float(volume_dice(out, torch.tensor(s))) == pytest.approx(dice_score(seg, truth), abs=1e-5)
    # area outside the assessed box counts as wrong
    assert float(volume_dice(out, torch.tensor(s), outside=s.sum())) < dice_score(seg, truth)
    # nothing segmented and nothing missed: both empty, Dice 1
    empty = QualityOutput(torch.full((3,), 0.5), torch.zeros(3))
    assert float(volume_dice(empty, torch.zeros(3))) == 1.0


def test_reg_net_never_sees_the_targets_and_trains():
    torch.manual_seed(0)
    net = create_network("reg_net", tiny=True, in_channels=1, image_size=32)
    batch = torch.rand(6, 5, 32, 32)  # [X, S, TP map, missed map, weight]
    with pytest.raises(ValueError, match="expects 2 channels"):
        net(batch)
    net.eval()  # dropout off: two forwards of the same input agree
    out_a = net(batch[:, :2])
    changed = batch.clone()
    changed[:, 2:] = 0  # other targets: same prediction
    out_b = net(changed[:, :2])
    assert torch.equal(out_a.precision, out_b.precision) and torch.equal(out_a.missed, out_b.missed)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    logs = net.training_step(batch, {"model": opt}, lambda loss: loss.backward())
    assert set(logs) == {"loss", "tp_abs_error", "missed_abs_error"} and np.isfinite(float(logs["loss"]))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_pipeline_inputs_per_variant():
    rec = create_network("rec_net", tiny=True, in_channels=1, image_size=32).eval()
    reg = {v: create_network("reg_net", tiny=True, in_channels=2 if v == "both" else 1, image_size=32).eval()
           for v in ("difference", "image", "both")}
    image, seg = torch.rand(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.7).float()
    with torch.no_grad():
        dif = image - rec(torch.cat([image, seg], 1)).recon
        torch.testing.assert_close(QualityPipeline(reg["image"], None, "image").inputs(image, seg), torch.cat([image, seg], 1))
        torch.testing.assert_close(QualityPipeline(reg["difference"], rec, "difference").inputs(image, seg),
                                   torch.cat([dif, seg], 1))
        torch.testing.assert_close(QualityPipeline(reg["both"], rec, "both").inputs(image, seg),
                                   torch.cat([image, dif, seg], 1))
    with pytest.raises(ValueError, match="needs a REC-Net"):
        QualityPipeline(reg["difference"], None, "difference")
