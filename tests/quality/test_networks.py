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
    batch = torch.rand(6, 6, 32, 32)  # [X, S, TP map, missed map, weights n, v]
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


def _loss_batch() -> torch.Tensor:
    """Two REG-Net rows [X, S, TP map, missed map, n, v]: a candidate slice (area 10, 8 of it lesion,
    2 lesion pixels missed; its volume has |S| + |G| = 50) and a clean slice shared by 3 candidates
    whose volumes have |S| + |G| = 50, 100 and 200."""
    batch = torch.zeros(2, 6, 8, 8)
    batch[0, 1].view(-1)[:10] = 1.0
    batch[0, 2].view(-1)[:8] = 1.0
    batch[0, 3].view(-1)[10:12] = 1.0
    batch[0, 4], batch[0, 5] = 1.0, 100.0 / 50  # Dice points per pixel
    batch[1, 4], batch[1, 5] = 3.0, 100.0 * np.sqrt(1 / 50**2 + 1 / 100**2 + 1 / 200**2)
    return batch


def test_reg_net_losses_by_hand():
    out = QualityOutput(precision=torch.tensor([0.5, 0.5]), missed=torch.tensor([4.0, 1.0]))
    # predicted TP 5 (true 8), missed 4 (true 2); clean slice: missed 1 (true 0)
    dice = create_network("reg_net", tiny=True, image_size=8).loss(_loss_batch(), out)
    # squared count errors in Dice points per candidate slice: ((3 * 2)^2 + (2 * 2)^2 + the clean
    # slice's 1 pixel in each of the three volumes) / (1 + 3)
    clean = sum((100 / d) ** 2 for d in (50, 100, 200))
    assert float(dice["loss"]) == pytest.approx((36 + 16 + clean) / 4, rel=1e-4)
    assert float(dice["tp_abs_error"]) == pytest.approx(3 / 4)  # weighted by n: 3 on 1 of 4 candidate slices
    counts = create_network("reg_net", tiny=True, image_size=8, loss="counts").loss(_loss_batch(), out)
    # Huber of counts / 16, weights n / sum n
    expected = 0.25 * (0.5 * (3 / 16) ** 2 + 0.5 * (2 / 16) ** 2) + 0.75 * 0.5 * (1 / 16) ** 2
    assert float(counts["loss"]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="loss must be one of"):
        create_network("reg_net", tiny=True, image_size=8, loss="mse")


def _toy_volume(rng: np.random.Generator, radius: float, size: int = 32):
    """Five slices of noise, three of them with a bright disc (the lesion G) of `radius` pixels."""
    y, x = np.mgrid[:size, :size]
    images = 0.4 + 0.05 * rng.standard_normal((5, size, size))
    truth = np.zeros((5, size, size), bool)
    for k in range(3):
        cy, cx = rng.integers(8, size - 8, 2)
        truth[k] = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    images[truth] = 1.5
    return images.astype(np.float32), truth


def _toy_rows(images: np.ndarray, truth: np.ndarray, candidates: list[np.ndarray]) -> list[np.ndarray]:
    """REG-Net rows [I, S, TP, missed, n, v] of a toy volume's candidates, as `samples.py` builds them."""
    rows, n, squares = [], np.zeros(len(images)), np.zeros(len(images))
    for seg in candidates:
        v = 100.0 / (seg.sum() + truth.sum())
        for k, image in enumerate(images):
            if seg[k].any() or truth[k].any():
                rows.append(np.stack([image, seg[k], seg[k] & truth[k], truth[k] & ~seg[k],
                                      np.ones_like(image), np.full_like(image, v)]))
            else:
                n[k], squares[k] = n[k] + 1, squares[k] + v * v
    for k in np.flatnonzero(n):
        zero = np.zeros_like(images[k])
        rows.append(np.stack([images[k], zero, zero, zero, zero + n[k], zero + np.sqrt(squares[k])]))
    return rows


def test_reg_net_learns_the_dice_of_small_and_large_lesions():
    """On a trivially learnable toy set (bright discs; candidates: the exact lesion, a shifted copy,
    nothing, the lesion plus as many false discs), the default loss's REG-Net predicts a perfect
    segmentation of tiny lesions (radius 1.5 px, ~7 px a slice) near Dice 1 and their shifted copy
    near its true Dice (0), as it does for large ones (radius 7 px; shifted: Dice ~0.2)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        images, truth = _toy_volume(rng, 1.5 if i % 2 else 7.0)
        extra = truth | np.roll(truth, (11, 13), axis=(1, 2))
        rows += _toy_rows(images, truth, [truth, np.roll(truth, 9, axis=2), np.zeros_like(truth), extra])
    data = torch.tensor(np.array(rows), dtype=torch.float32)
    net = create_network("reg_net", tiny=True, image_size=32, augment=False, dropout=0.0, weight_decay=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        net.training_step(data[torch.randint(0, len(data), (32,))], {"model": opt}, lambda loss: loss.backward())
    net.eval()

    def predicted(images, seg):
        x = torch.tensor(np.stack([images, seg.astype(np.float32)], 1))
        with torch.no_grad():
            return float(volume_dice(net(x), torch.tensor(seg.sum(axis=(1, 2)), dtype=torch.float32)))

    test = np.random.default_rng(1)
    for radius in (1.5, 7.0):
        volumes = [_toy_volume(test, radius) for _ in range(4)]
        exact = np.mean([predicted(images, truth) for images, truth in volumes])
        shifted = [(predicted(images, np.roll(truth, 9, axis=2)), dice_score(np.roll(truth, 9, axis=2), truth))
                   for images, truth in volumes]
        error = np.mean([abs(p - d) for p, d in shifted])
        assert exact > 0.85 and error < 0.15, (radius, exact, shifted)
