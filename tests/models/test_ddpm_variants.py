"""The conditioned (cDDPM) and masked (mDDPM) variants of the patched DDPM: what the U-Net is given
in training and at test time, the masks of mDDPM against numpy's FFT, their anomaly maps after a
short training; for all three diffusion models exact resume in the loop and the ONNX export."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

from anomaseg.models import create_model
from anomaseg.models.mddpm import frequency_filtered
from anomaseg.predictors import create_predictor
from synthetic_slices import healthy_slices, planted_blob_auroc


class Spy(nn.Module):
    """Wraps a module and keeps every input it is given (the U-Net's condition as `class_labels`)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.inputs = module, []

    def forward(self, x, *args, **kwargs):
        self.inputs.append((x.detach().clone(), *(a.detach().clone() for a in args),
                            *(v.detach().clone() for v in kwargs.values())))
        return self.module(x, *args, **kwargs)


# -- cDDPM ------------------------------------------------------------------------------------------

def test_cddpm_noises_the_whole_slice_at_three_steps_conditioned_on_the_clean_slice():
    torch.manual_seed(0)
    model = create_model("cddpm", tiny=True, in_channels=2, image_size=32).eval()
    model.encoder, model.unet = Spy(model.encoder), Spy(model.unet)
    x = torch.rand(3, 2, 32, 32)
    with torch.no_grad():
        recon = model(x).recon
    (seen,), = model.encoder.inputs  # the encoder sees the clean slices, once
    assert torch.equal(seen, x)
    with torch.no_grad():
        latent = model.encoder.module(x)
    calls = model.unet.inputs
    assert [int(t[0]) for _, t, _ in calls] == [249, 499, 749]  # the code's noise ensemble, t - 1
    outs = []
    for sample, t, cond in calls:
        assert torch.equal(cond, latent)  # every step conditioned on the latent of its clean slice
        assert bool((sample != x * 2 - 1).all())  # the whole slice noised
        with torch.no_grad():
            outs.append(model.unet.module(sample, t, class_labels=cond))
    assert len({s.sum().item() for s, _, _ in calls}) == 3  # a noise draw of its own for each step
    assert torch.allclose(recon, (sum(outs) / 3 + 1) / 2, atol=1e-6)


def test_cddpm_training_conditions_on_the_clean_slice_and_updates_the_encoder():
    torch.manual_seed(0)
    model = create_model("cddpm", tiny=True, image_size=32)
    model.encoder = Spy(model.encoder)
    x = torch.rand(4, 1, 32, 32)
    before = [p.detach().clone() for p in model.encoder.parameters()]
    opts = model.make_optimizers(1e-3)
    for _ in range(3):  # MONAI zero-initialises the U-Net's output and its blocks' last convolutions: the
        # encoder's gradients arrive at the third step
        model.training_step(x, opts, lambda loss: loss.backward())
    assert all(torch.equal(seen, x) for seen, in model.encoder.inputs)
    assert all(not torch.equal(p, q) for p, q in zip(model.encoder.parameters(), before))


def test_cddpm_reconstruction_depends_on_the_condition():
    """The latent does enter the U-Net: the same noised slice with another latent is reconstructed
    differently."""
    torch.manual_seed(0)
    model = create_model("cddpm", tiny=True, image_size=32).eval()
    for p in model.unet.parameters():  # MONAI zero-initialises the output and each block's last convolution
        if not p.any():
            nn.init.normal_(p, std=0.1)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        recon = model(x).recon
        model.encoder.fc.bias += 1.0
        assert not torch.allclose(model(x).recon, recon, atol=1e-4)


class Oracle(nn.Module):
    """A perfect x0-denoiser of one known clean batch that ignores its condition."""

    def __init__(self, clean: torch.Tensor):
        super().__init__()
        self.clean = clean

    def forward(self, x, t, class_labels=None):
        assert class_labels is not None and len(class_labels) == len(x)
        return self.clean.repeat(len(x) // len(self.clean), 1, 1, 1)


@pytest.mark.parametrize("patch_size", [None, 16])
def test_cddpm_perfect_denoiser_reconstructs_the_slice_exactly(patch_size):
    model = create_model("cddpm", tiny=True, image_size=32, patch_size=patch_size).eval()
    x = torch.rand(2, 1, 32, 32)
    model.unet = Oracle(x * 2 - 1)
    with torch.no_grad():
        assert torch.allclose(model(x).recon, x, atol=1e-6)


def test_cddpm_rejects_bad_encoders():
    with pytest.raises(ValueError, match="encoder_block"):
        create_model("cddpm", tiny=True, encoder_block="wide")
    with pytest.raises(ValueError, match="4 stages"):
        create_model("cddpm", tiny=True, encoder_layers=(1, 1, 1))


# -- mDDPM ------------------------------------------------------------------------------------------

def _numpy_filtered(s: np.ndarray, v: int, low_pass: bool) -> np.ndarray:
    """The code's filter written with numpy: fftshift, a centred square of half-width v kept or removed."""
    spectrum = np.fft.fftshift(np.fft.fft2(s))
    square = np.zeros(s.shape)
    cy, cx = s.shape[0] // 2, s.shape[1] // 2
    square[cy - v:cy + v, cx - v:cx + v] = 1
    keep = square if low_pass else 1 - square
    return np.real(np.fft.ifft2(np.fft.ifftshift(spectrum * keep)))


def test_frequency_filter_agrees_with_numpy_and_splits_the_slice_in_two():
    x = healthy_slices(2, size=32)
    low = frequency_filtered(x, torch.tensor([3, 10]), torch.tensor([True, True]))
    high = frequency_filtered(x, torch.tensor([3, 10]), torch.tensor([False, False]))
    for i, v in enumerate((3, 10)):
        assert np.allclose(low[i, 0].numpy(), _numpy_filtered(x[i, 0].double().numpy(), v, True), atol=1e-5)
        assert np.allclose(high[i, 0].numpy(), _numpy_filtered(x[i, 0].double().numpy(), v, False), atol=1e-5)
    assert torch.allclose(low + high, x, atol=1e-5)


def test_mddpm_masks_rectangles_of_the_brain_with_the_filtered_slice():
    model = create_model("mddpm", tiny=True, image_size=32)
    x = healthy_slices(64, size=32)
    brain = x != 0
    masked = model.mask_slices(x, torch.Generator().manual_seed(0))
    assert bool((masked[~brain] == 0).all())  # nothing outside the brain
    changed = (masked != x) & brain
    counts = changed.flatten(1).sum(1)
    assert int((counts == 0).sum()) > 0 and int((counts > 0).sum()) > 32  # 0..5 rectangles: some none
    # inside the brain every changed pixel holds the low- or high-pass copy of its slice (v in 2..10)
    for i in torch.nonzero(counts).flatten()[:8].tolist():
        s = x[i, 0].double().numpy()
        candidates = [_numpy_filtered(s, v, low) for v in range(2, 11) for low in (True, False)]
        m = changed[i, 0].numpy()
        assert any(np.allclose(masked[i, 0].numpy()[m], c[m], atol=1e-5) for c in candidates)
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        brain_rows = np.nonzero(brain[i, 0].numpy().any(1))[0]
        assert rows.min() >= brain_rows.min() and rows.max() <= brain_rows.max()


class Free(nn.Module):
    """Stands in for the U-Net: its output is a parameter; keeps its inputs."""

    def __init__(self, shape):
        super().__init__()
        self.out, self.inputs = nn.Parameter(torch.zeros(shape)), []

    def forward(self, x, t):
        self.inputs.append(x.detach().clone())
        return self.out


def _noised_patch(seen: torch.Tensor, rest: torch.Tensor, masks: torch.Tensor) -> int:
    """Index of the one grid patch where `seen` differs from `rest` everywhere, equal to it elsewhere; -1 if none."""
    for k, mask in enumerate(masks):
        inside = mask.expand_as(rest)
        if torch.equal(seen[~inside], rest[~inside]) and bool((seen[inside] != rest[inside]).all()):
            return k
    return -1


def test_mddpm_trains_on_the_masked_slice_towards_the_clean_one_and_validates_unmasked():
    torch.manual_seed(0)
    model = create_model("mddpm", tiny=True, image_size=32)
    x = healthy_slices(16, size=32)
    model.unet = Free(x.shape)
    masks = model.patch_masks(32, 32)
    torch.manual_seed(5)
    masked = model.mask_slices(x)
    assert not torch.equal(masked, x)
    torch.manual_seed(5)  # the same draws inside the training step
    model.training_step(x, model.make_optimizers(1e-3), lambda loss: loss.backward())
    (seen,) = model.unet.inputs
    # each slice: one grid patch of the masked slice noised, the rest the masked slice
    patches = [_noised_patch(seen[i], masked[i] * 2 - 1, masks) for i in range(16)]
    assert -1 not in patches
    # the L1 target is the clean slice: the output is 0, so the gradient is sign(0 - x0) in the patch, 0 outside
    grad = model.unet.out.grad
    for i, k in enumerate(patches):
        inside = masks[k].expand_as(grad[i])
        assert torch.equal(torch.sign(grad[i][inside]), -torch.sign(x[i] * 2 - 1)[inside])
        assert bool((grad[i][~inside] == 0).all())
    model.unet.inputs.clear()
    model.validation_losses(x)  # validation as the code's: unmasked
    (seen,) = model.unet.inputs
    assert -1 not in [_noised_patch(seen[i], x[i] * 2 - 1, masks) for i in range(16)]


def test_mddpm_rejects_bad_masks():
    with pytest.raises(ValueError, match="mask_size"):
        create_model("mddpm", tiny=True, mask_size=0)
    with pytest.raises(ValueError, match="frequency_band"):
        create_model("mddpm", tiny=True, frequency_band=(5, 2))


# -- both: the map after a short training, resume, export ------------------------------------------

@pytest.mark.parametrize("name,steps", [("cddpm", 250), ("mddpm", 150)])
def test_residual_ranks_a_planted_bright_blob_above_healthy_tissue_after_a_short_training(name, steps):
    """Untrained, the residual already ranks bright pixels high (0.80: it follows the intensity);
    training raises it (measured: cDDPM 0.90 after 250 steps, mDDPM 0.86 after 150)."""
    torch.manual_seed(0)
    model = create_model(name, tiny=True, image_size=32)
    predictor = create_predictor("residual", polarity="bright")
    untrained = planted_blob_auroc(model.eval(), predictor)
    train = healthy_slices(64)
    opts = model.make_optimizers(3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        model.training_step(train[torch.randint(len(train), (16,), generator=g)], opts, lambda loss: loss.backward())
    trained = planted_blob_auroc(model.eval(), predictor)
    assert trained > 0.84 and trained > untrained + 0.05, (untrained, trained)


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [
    ("pddpm", "{channels: [8, 16], norm_num_groups: 4, num_head_channels: 16, patch_size: 16}"),
    ("cddpm", "{channels: [8, 16], norm_num_groups: 4, num_head_channels: 16, encoder_channels: [8, 8, 16, 16], "
              "encoder_max_pool: false}"),
    ("mddpm", "{channels: [8, 16], norm_num_groups: 4, num_head_channels: 16, patch_size: 16}")])
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, name, params):
    """`anomaseg train` of a tiny diffusion model, SIGKILLed one step after a mid-epoch checkpoint and
    resumed, ends with the weights, buffers (cDDPM's BatchNorm) and optimiser state of the
    uninterrupted run, bit for bit."""
    from anomaseg.run import RunPaths, load_checkpoint
    from conftest import write_dataset
    from processes import run_cli

    data = write_dataset(tmp_path / "healthy", 4, lesioned=False, seed=1)

    def args(run):
        return ["train", "--data", str(data), "--out", str(run), "--epochs", "2", "--image-size", "32",
                "--batch-size", "16", "--precision", "32", "--seed", "3", "--threads", "1",
                "--set", f"model.name={name}", "--set", f"model.params={params}",
                "--set", "train.checkpoint_every_steps=2", "--set", "score.predictor=residual"]

    cache = tmp_path / "cache"
    assert run_cli(args(tmp_path / "reference"), cache) == 0
    run = tmp_path / "run"
    assert run_cli(args(run), cache, kill_at="train_step:epoch=1,step=3") == -signal.SIGKILL
    assert run_cli(["train", "--out", str(run), "--resume"], cache) == 0
    a, b = load_checkpoint(RunPaths(run).last), load_checkpoint(RunPaths(tmp_path / "reference").last)
    assert a["model"].keys() == b["model"].keys()
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for p, state in b["optimizers"]["model"]["state"].items():
        assert all(torch.equal(a["optimizers"]["model"]["state"][p][n], v) for n, v in state.items())


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [("pddpm", {}), ("cddpm", {"step_ensemble": ()})])
def test_onnx_graph_computes_the_pytorch_map(name, params):
    """The test-time noise and patch masks are constants of the exported graph (cDDPM: the encoder
    and its latent's embedding are in it): ONNX Runtime computes the PyTorch residual map, for any
    batch size (cDDPM with one test step: the default three unroll into a graph three times the
    size, which takes half a minute to export and load)."""
    import onnxruntime as ort

    from anomaseg.export import INPUT, OUTPUT, onnx_graph
    from anomaseg.inference import inference_copy

    torch.manual_seed(0)
    model = create_model(name, tiny=True, image_size=32, in_channels=2, **params).eval()
    predictor = create_predictor("residual", polarity="auto").set_modalities(["flair", "t1"])
    net = inference_copy(model, channels_last=False)
    session = ort.InferenceSession(onnx_graph(net, predictor, (2, 32, 32)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 2, 32, 32)
        with torch.no_grad():
            want = predictor.anomaly_map(model, x).numpy()
        got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
        assert got.shape == (batch, 1, 32, 32)
        assert abs(got - want).max() <= 1e-4 * float(want.max() - want.min())
