"""The encoder/decoder family of Baur et al. (2018) and the comparative study (Baur et al. 2020).

Encoder: `depth` x [5x5 conv, stride 2 -> BatchNorm -> LeakyReLU], filters min(max_channels,
base_channels * 2^i). Decoder: BatchNorm -> ReLU, then `depth` x [5x5 transposed conv, stride 2 ->
BatchNorm -> LeakyReLU] with filters max(base, max_channels / 2^i), then a 1x1 conv to the image
channels (no output activation: intensities are not bounded to [0, 1]).
"""

from __future__ import annotations

import torch.nn as nn


def encoder_channels(depth: int, base: int, maximum: int) -> list[int]:
    return [min(maximum, base * 2**i) for i in range(depth)]


def conv_encoder(in_channels: int, depth: int, base: int, maximum: int, norm: bool = True,
                 slope: float = 0.2) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for f in encoder_channels(depth, base, maximum):
        layers += [nn.Conv2d(c, f, 5, stride=2, padding=2, bias=not norm)]
        layers += [nn.BatchNorm2d(f)] if norm else []
        layers += [nn.LeakyReLU(slope, inplace=True)]
        c = f
    return nn.Sequential(*layers)


def conv_decoder(out_channels: int, depth: int, base: int, maximum: int, norm: bool = True,
                 slope: float = 0.2) -> nn.Sequential:
    top = encoder_channels(depth, base, maximum)[-1]
    layers: list[nn.Module] = [nn.BatchNorm2d(top) if norm else nn.Identity(), nn.ReLU(inplace=True)]
    c = top
    for i in range(depth):
        f = max(base, top // 2**i)
        # padding 2 + output_padding 1 doubles the size exactly ("same" padding of the reference code)
        layers += [nn.ConvTranspose2d(c, f, 5, stride=2, padding=2, output_padding=1, bias=not norm)]
        layers += [nn.BatchNorm2d(f)] if norm else []
        layers += [nn.LeakyReLU(slope, inplace=True)]
        c = f
    layers.append(nn.Conv2d(c, out_channels, 1))
    return nn.Sequential(*layers)
