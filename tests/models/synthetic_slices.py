"""Synthetic healthy 2D slices and a planted-blob check, shared by the model tests."""

from __future__ import annotations

import torch


def healthy_slices(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Synthetic 'brains': an ellipse of white matter (0.6) with a grey-matter rim (0.8) and two
    dark ventricles (0.1), all with random sizes and positions, plus a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        cy, cx = (size / 2 + torch.randn(2, generator=g)).tolist()
        ry, rx = (size * (0.38 + 0.06 * torch.rand(2, generator=g))).tolist()
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        img = torch.where(r < 1, torch.where(r > 0.7, 0.8, 0.6), 0.0)
        for side in (-1, 1):
            vy, vx = cy + torch.randn((), generator=g).item(), cx + side * (2.5 + torch.rand((), generator=g).item())
            img = torch.where(((yy - vy) / 4.5) ** 2 + ((xx - vx) / 1.6) ** 2 < 1, 0.1, img)
        out[i, 0] = img + 0.02 * torch.randn(size, size, generator=g) * (img > 0)
    return out


def planted_blob_auroc(model, predictor) -> float:
    """Pixel AUROC (brain pixels) of `predictor`'s map for bright blobs (+0.4) planted in 8 unseen
    healthy 32 px slices."""
    from sklearn.metrics import roc_auc_score

    x = healthy_slices(8, seed=11)
    lesion = torch.zeros_like(x, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    for i in range(len(x)):
        cy, cx = 11 + (i % 3) * 4, 10 + (i % 4) * 3
        lesion[i, 0] = ((yy - cy) ** 2 + (xx - cx) ** 2) <= 5
    x = torch.where(lesion, x + 0.4, x)
    maps = predictor.anomaly_map(model, x)
    brain = x > 0
    return roc_auc_score(lesion[brain].numpy(), maps[brain].numpy())
