import torch

from anomaseg.models import create_model
from anomaseg.models.base import recalibrate_batchnorm


def _blobs(n, generator):
    """Images with a random bright square: enough structure for a tiny VAE to learn something."""
    x = torch.zeros(n, 1, 32, 32)
    pos = torch.randint(4, 20, (n, 2), generator=generator)
    for i, (a, b) in enumerate(pos.tolist()):
        x[i, 0, a:a + 8, b:b + 8] = 1.0
    return x + 0.05 * torch.rand(x.shape, generator=generator)


def test_precise_bn_first_layer_is_exact_and_eval_error_drops():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = create_model("spatial_vae", tiny=True, image_size=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        x = _blobs(16, g)
        loss = model.loss(x, model(x))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    data = [_blobs(32, g) for _ in range(4)]

    def eval_error():
        model.eval()
        with torch.no_grad():
            return sum(float((model(x).recon - x).abs().mean()) for x in data)

    before = eval_error()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert recalibrate_batchnorm(model, data) == len(bns)
    assert not model.training and model._sampling  # modes restored (eval_error left it in eval mode)
    after = eval_error()
    assert after < before
    # the first BatchNorm sees the same inputs in both modes: its mean is the exact data mean
    first = bns[0]
    with torch.no_grad():
        feats = torch.cat([model.encoder[0](x) for x in data])
    torch.testing.assert_close(first.running_mean, feats.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)


def test_unused_layers_keep_their_statistics():
    model = create_model("skip_ganomaly", tiny=True, image_size=32)
    disc_bns = [m for m in model.discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in disc_bns:
        m.running_mean.fill_(3.0)
    recalibrate_batchnorm(model, [torch.rand(4, 1, 32, 32)])
    assert all(torch.all(m.running_mean == 3.0) for m in disc_bns)
    assert model.training is True
