"""A trained model made fast for scoring, and the batch size for the machine.

`inference_copy(model)` returns a *copy* (the trained model and its checkpoints stay as they are)
with every BatchNorm that directly follows a convolution (or transposed convolution) in an
`nn.Sequential` folded into that convolution's weights and bias (`torch.nn.utils.fusion`: in eval
mode BN is a per-channel affine map, so conv -> BN is one conv), weights in channels_last, and no
parameter requiring a gradient (predictors that differentiate take gradients w.r.t. the input only,
which still flow). It computes the eval-mode forward of the original within float32 rounding.
BatchNorm layers that follow no convolution (e.g. at the start of Baur's decoder) stay as they are.

Measured on this project's CPUs (benchmarks/bench_inference.py): folding and channels_last make
the residual predictor several times faster than running the trained model as is; `torch.compile`
and ONNX Runtime were measured as alternatives (see benchmarks/README.md).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
MAX_BATCH = 512


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode with every conv -> BatchNorm pair of an nn.Sequential
    folded into one conv (the BN replaced by nn.Identity, so module names and indices stay)."""
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = seq._modules[first], seq._modules[second]
            if (isinstance(conv, CONVS) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
                    and bn.track_running_stats and bn.running_mean is not None and conv.out_channels == bn.num_features):
                seq._modules[first] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, TRANSPOSED))
                seq._modules[second] = nn.Identity()
    return model


def count_batchnorm(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def inference_copy(model: nn.Module, device: str | torch.device = "cpu", channels_last: bool = True) -> nn.Module:
    """The model as scoring runs it: a folded copy (see module docstring) on `device`, eval mode,
    channels_last weights, no parameter gradients."""
    net = fold_batchnorm(model).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def activation_bytes_per_sample(net: nn.Module, shape: tuple[int, ...], device) -> int:
    """Bytes of all module outputs of one eval forward pass of one sample of `shape` (C, H, W): an
    upper bound of what a sample holds at once while a batch runs."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in net.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.inference_mode():
            net(torch.zeros((1,) + tuple(shape), device=device))
    finally:
        for h in hooks:
            h.remove()
    return max(total, 1)


def memory_budget(device) -> int:
    """Bytes a scoring batch may use: a quarter of the free GPU memory, or an eighth of the
    machine's physical memory (at most 2 GiB: beyond that CPU throughput stops growing)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return min(physical // 8, 2 << 30)


def inference_batch_size(net: nn.Module, shape: tuple[int, ...], device, budget: int | None = None) -> int:
    """The largest power of two <= MAX_BATCH whose activations fit the memory budget (>= 1)."""
    return batch_size_for(activation_bytes_per_sample(net, shape, device), device, budget)


def batch_size_for(bytes_per_sample: int, device="cpu", budget: int | None = None) -> int:
    """The largest power of two <= MAX_BATCH with `bytes_per_sample` each within the budget (>= 1)."""
    fits = (budget if budget is not None else memory_budget(device)) // max(int(bytes_per_sample), 1)
    batch = 1
    while batch * 2 <= min(fits, MAX_BATCH):
        batch *= 2
    return batch
