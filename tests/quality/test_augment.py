"""REG-Net's training augmentation keeps inputs and targets exact: image and candidate stay aligned
pixel for pixel, the per-slice counts (hence the Dice target) are unchanged, draws follow the seed;
and the regularised REG-Net's optimiser and eval mode behave."""

import numpy as np
import pytest
import torch

from anomaseg.quality.augment import N_SYMMETRIES, augment_rows, dihedral, inverse_dihedral
from anomaseg.quality.networks import REGNet, create_network


def _rows(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    """REG-Net rows [X, S, TP map, missed map, weights n, v]: an asymmetric image (a gradient plus an
    off-centre bright blob, the 'lesion' G), a candidate S shifted from G, their overlap maps."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    rows = []
    for _ in range(n):
        cy, cx = rng.integers(6, size - 10, 2)
        g = (y - cy) ** 2 + (x - cx) ** 2 < rng.integers(9, 25)
        s = np.roll(g, (rng.integers(0, 3), rng.integers(0, 4)), axis=(0, 1)) | ((y == cy + 3) & (x > cx))
        image = 0.3 + 0.005 * x + 0.0003 * y * y + 1.0 * g  # background < 0.75, lesion > 1.3
        rows.append([image, s, s & g, g & ~s, np.full(g.shape, float(rng.integers(1, 4))),
                     np.full(g.shape, 100.0 / (s.sum() + g.sum()))])
    return torch.tensor(np.array(rows), dtype=torch.float32)


def test_every_symmetry_is_distinct_and_inverted_exactly():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    images = [dihedral(x, k) for k in range(N_SYMMETRIES)]
    assert len({tuple(t.flatten().tolist()) for t in images}) == N_SYMMETRIES
    for k, t in enumerate(images):
        assert torch.equal(inverse_dihedral(t, k), x)


def test_augmented_rows_stay_aligned_and_keep_the_counts():
    rows = _rows()
    codes = torch.arange(len(rows)) % N_SYMMETRIES  # every symmetry, twice
    out = augment_rows(rows, x_channels=1, codes=codes)
    assert not torch.equal(out, rows)
    for i, k in enumerate(codes.tolist()):
        # the inverse transform gives back the row pixel for pixel, every channel alike
        assert torch.equal(inverse_dihedral(out[i], k), rows[i])
        # the image's bright lesion is still where the target maps say it is
        lesion = out[i, 0] > 1.0
        assert torch.equal(lesion, (out[i, 2] + out[i, 3]) > 0)
        assert torch.equal(out[i, 2] > 0, (out[i, 1] > 0) & lesion)
    # per-slice counts and weights (REGNet.split), hence every volume Dice, are unchanged
    for a, b in zip(REGNet.split(rows)[1:], REGNet.split(out)[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_intensity_jitter_touches_the_image_channels_only():
    rows = _rows(8)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, N_SYMMETRIES, (len(rows),), generator=torch.Generator().manual_seed(4))
    geometric = augment_rows(rows, 1, codes=codes)
    jittered = augment_rows(rows, 1, codes=codes, intensity_scale=0.2, intensity_shift=0.1, generator=gen)
    assert torch.equal(jittered[:, 1:], geometric[:, 1:])  # S, targets and weights untouched
    ratio = (jittered[:, 0] - jittered[:, 0, :1, :1]) / (geometric[:, 0] - geometric[:, 0, :1, :1])
    finite = torch.isfinite(ratio)
    scale = ratio[finite]
    assert scale.min() >= 0.8 - 1e-4 and scale.max() <= 1.2 + 1e-4 and scale.std() > 0.01
    assert torch.equal(augment_rows(rows, 1, flips=False), rows)  # everything off: the rows as they are


def test_augmentation_is_deterministic_for_a_seed():
    rows = _rows()
    draw = [augment_rows(rows, 1, intensity_scale=0.1, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    torch.manual_seed(5)
    a = augment_rows(rows, 1)  # the global generator, which the training loop seeds per step
    torch.manual_seed(5)
    assert torch.equal(a, augment_rows(rows, 1))


def test_regularised_reg_net_optimiser_and_eval_mode():
    net = create_network("reg_net", tiny=True, in_channels=1, image_size=32, augment=True, dropout=0.2,
                         weight_decay=0.01)
    opt = net.make_optimizers(1e-3)["model"]
    assert isinstance(opt, torch.optim.AdamW)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in net.parameters() if p.ndim > 1}  # no decay of biases and norm scales
    plain = create_network("reg_net", tiny=True, in_channels=1, image_size=32,
                           weight_decay=0).make_optimizers(1e-3)["model"]
    assert type(plain) is torch.optim.Adam
    rows = _rows(8)
    net.eval()  # dropout off, no augmentation: validation sees the rows as they are, reproducibly
    assert net.validation_losses(rows) == net.validation_losses(rows)
    net.train()
    torch.manual_seed(0)
    logs = net.training_step(rows, {"model": opt}, lambda loss: loss.backward())
    assert np.isfinite(float(logs["loss"]))
    with pytest.raises(ValueError, match="dropout"):
        create_network("reg_net", tiny=True, dropout=1.0)
