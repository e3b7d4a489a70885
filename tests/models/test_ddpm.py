"""The patched DDPM (pDDPM): its patch grid, what the U-Net sees in training and at test time, the
x0 of its diffusion steps, its anomaly map after a short training, exact resume in the loop, and
its ONNX export."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from anomaseg.models import create_model
from anomaseg.models.ddpm import patch_starts
from anomaseg.predictors import create_predictor
from synthetic_slices import healthy_slices, planted_blob_auroc


def test_patch_grid_tiles_the_slice_and_spreads_overlapping_patches_evenly():
    assert patch_starts(96, 48, 48) == [0, 48]  # the paper's 2 x 2 grid of a 96 px slice
    assert patch_starts(64, 32, 16) == [0, 16, 32]
    assert patch_starts(64, 24, 24) == [0, 20, 40]  # a stride that does not divide: last patch at the edge
    assert patch_starts(32, 32, 32) == [0]
    model = create_model("pddpm", tiny=True, image_size=32)  # patch 16: 2 x 2, no overlap
    masks = model.patch_masks(32, 32)
    assert masks.shape == (4, 1, 32, 32) and torch.equal(masks.sum(0), torch.ones(1, 32, 32, dtype=torch.long))
    overlapping = create_model("pddpm", tiny=True, image_size=32, patch_stride=8).patch_masks(32, 32)
    assert len(overlapping) == 9 and int(overlapping.sum(0).min()) == 1 and int(overlapping.sum(0).max()) == 4


class Spy(nn.Module):
    """Wraps the U-Net and keeps every input it is given."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.inputs = unet, []

    def forward(self, x, t):
        self.inputs.append((x.detach().clone(), t.detach().clone()))
        return self.unet(x, t)


def _one_patch_differs(model_input: torch.Tensor, clean: torch.Tensor, masks: torch.Tensor) -> int:
    """Index of the one grid patch where `model_input` differs from `clean` everywhere, the rest
    of the slice equal to `clean`; -1 if there is no such patch."""
    for k, mask in enumerate(masks):
        inside = mask.expand_as(clean)
        if torch.equal(model_input[~inside], clean[~inside]) and bool((model_input[inside] != clean[inside]).all()):
            return k
    return -1


def test_test_time_noises_each_patch_with_the_rest_clean_and_stitches_the_patches():
    torch.manual_seed(0)
    model = create_model("pddpm", tiny=True, in_channels=2, image_size=32).eval()
    model.unet = Spy(model.unet)
    x = torch.rand(3, 2, 32, 32)
    with torch.no_grad():
        recon = model(x).recon
    (inputs, t), = model.unet.inputs  # one U-Net call: the 4 patches x 3 slices as one batch
    masks = model.patch_masks(32, 32)
    assert inputs.shape == (12, 2, 32, 32) and bool((t == model.t_test - 1).all())
    clean = x * 2 - 1
    found = [_one_patch_differs(inputs[i], clean[i % 3], masks) for i in range(12)]
    assert found == [k for k in range(4) for _ in range(3)]
    # the stitched reconstruction takes each patch from the pass that noised it
    with torch.no_grad():
        out = model.unet.unet(inputs, t).view(4, 3, 2, 32, 32)
    expected = (sum(out[k] * masks[k] for k in range(4)) + 1) / 2
    assert torch.allclose(recon, expected, atol=1e-6)
    # the noise field is the same for every slice: a slice scored alone equals it scored in a batch
    with torch.no_grad():
        assert torch.equal(model(x[1:2]).recon, recon[1:2])


class Free(nn.Module):
    """Stands in for the U-Net: its output is a parameter (so the loss's gradient w.r.t. the output
    can be read); keeps its inputs."""

    def __init__(self, shape):
        super().__init__()
        self.out, self.inputs = nn.Parameter(torch.zeros(shape)), []

    def forward(self, x, t):
        self.inputs.append((x.detach().clone(), t.detach().clone()))
        return self.out


def test_training_noises_one_grid_patch_per_slice_and_counts_only_that_patch():
    torch.manual_seed(0)
    model = create_model("pddpm", tiny=True, image_size=32)
    x = torch.rand(8, 1, 32, 32)
    model.unet = Free(x.shape)
    model.training_step(x, model.make_optimizers(1e-3), lambda loss: loss.backward())
    (inputs, t), = model.unet.inputs
    masks = model.patch_masks(32, 32)
    patches = [_one_patch_differs(inputs[i], x[i] * 2 - 1, masks) for i in range(8)]
    assert -1 not in patches and len(set(patches)) > 1 and len(set(t.tolist())) > 1
    grad = model.unet.out.grad  # the L1 loss's gradient w.r.t. the network's output
    for i, k in enumerate(patches):
        inside = masks[k].expand_as(grad[i])
        assert bool((grad[i][~inside] == 0).all()) and bool((grad[i][inside] != 0).all())


class Oracle(nn.Module):
    """A perfect denoiser of one known clean batch: returns its x0, or the noise that makes x_t."""

    def __init__(self, clean: torch.Tensor, scheduler, objective: str):
        super().__init__()
        self.clean, self.scheduler, self.objective = clean, scheduler, objective

    def forward(self, x, t):
        clean = self.clean.repeat(len(x) // len(self.clean), 1, 1, 1)
        if self.objective == "x0":
            return clean
        a = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).to(x)
        return (x - a.sqrt() * clean) / (1 - a).sqrt()


@pytest.mark.parametrize("objective", ["x0", "epsilon"])
@pytest.mark.parametrize("ddim_steps,ensemble", [(0, 1), (4, 1), (0, 3)])
def test_a_perfect_denoiser_reconstructs_the_slice_exactly(objective, ddim_steps, ensemble):
    """The scheduler arithmetic (x0 from the noise, DDIM steps, stitching, ensemble averaging) loses
    nothing: with the true x0 or noise as the network's output the reconstruction is the input."""
    model = create_model("pddpm", tiny=True, image_size=32, objective=objective, ddim_steps=ddim_steps,
                         ensemble=ensemble, patch_stride=12).eval()
    x = torch.rand(2, 1, 32, 32)
    model.unet = Oracle(x * 2 - 1, model.scheduler, objective)
    with torch.no_grad():
        assert torch.allclose(model(x).recon, x, atol=2e-4)


def test_ddim_steps_run_from_the_test_step_down_to_zero():
    model = create_model("pddpm", tiny=True, image_size=32, ddim_steps=5).eval()
    model.unet = Spy(model.unet)
    with torch.no_grad():
        model(torch.rand(1, 1, 32, 32))
    steps = [int(t[0]) for _, t in model.unet.inputs]
    assert steps == [499, 399, 299, 199, 99]


def _blob_auroc(model) -> float:
    return planted_blob_auroc(model.eval(), create_predictor("residual", polarity="bright"))


def test_residual_ranks_a_planted_bright_blob_above_healthy_tissue_after_a_short_training():
    """Training is what ranks the blob: an untrained network already ranks bright pixels high
    (0.80: its residual follows the intensity); 150 steps of pDDPM training raise it (0.88 measured)."""
    torch.manual_seed(0)
    model = create_model("pddpm", tiny=True, image_size=32)
    untrained = _blob_auroc(model)
    train = healthy_slices(64)
    opts = model.make_optimizers(3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(150):
        model.training_step(train[torch.randint(len(train), (16,), generator=g)], opts, lambda loss: loss.backward())
    trained = _blob_auroc(model)
    assert trained > 0.85 and trained > untrained + 0.05, (untrained, trained)


def test_trains_under_bf16_autocast():
    model = create_model("pddpm", tiny=True, in_channels=2, image_size=64)
    x = torch.rand(2, 2, 64, 64)
    before = [p.detach().clone() for p in model.parameters()]
    opts = model.make_optimizers(1e-3)
    # MONAI zero-initialises the output convolution and each residual block's second convolution (as
    # OpenAI's U-Net): gradients reach the first convolutions of the blocks at the third step
    for _ in range(3):
        logs = model.training_step(x, opts, lambda loss: loss.backward(),
                                   lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.isfinite(logs["loss"])
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_rejects_bad_parameters():
    with pytest.raises(ValueError, match="divisible"):
        create_model("pddpm", tiny=True, image_size=33)
    with pytest.raises(ValueError, match="objective"):
        create_model("pddpm", tiny=True, objective="v")
    with pytest.raises(ValueError, match="t_test"):
        create_model("pddpm", tiny=True, t_test=0)
    with pytest.raises(ValueError, match="patch_size"):
        create_model("pddpm", tiny=True, image_size=32, patch_size=64)
    with pytest.raises(ValueError, match="ensemble"):
        create_model("pddpm", tiny=True, ensemble=0)

