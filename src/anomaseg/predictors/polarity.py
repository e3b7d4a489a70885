"""Which direction of intensity change counts as anomalous, per input channel (modality).

Lesions have a known polarity on each MR contrast: MS lesions, oedema and most tumours are
hyper-intense on FLAIR and T2; on T1 they may be darker (black holes, necrosis) or brighter
(enhancement on T1ce, haemorrhage, fat). A map that counts only the expected direction drops the
false positives of the other one (a reconstruction that is too bright over CSF, say). Per channel:

    bright:  max(d, 0)        d = the channel's signed deviation (x - reconstruction, a z-score, ...)
    dark:    max(-d, 0)
    both:    |d|

Defaults per modality (`DEFAULT_POLARITY`; any modality not listed, e.g. PNG channels, is "both"):
FLAIR and T2 "bright", T1 and T1ce "both". `polarity="auto"` resolves each channel by its
modality's default; a predictor learns its channels' modalities from `Predictor.set_modalities`
(the run's `data.modalities`, in channel order) and treats unknown channels as "both".
Channels are then combined into one map by their mean or their max (`combine_channels`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from anomaseg.data.cases import canonical_modality

POLARITIES = ("bright", "dark", "both")
CHANNEL_COMBINES = ("mean", "max")
DEFAULT_POLARITY = {"flair": "bright", "t2": "bright", "t1": "both", "t1ce": "both"}


def default_polarity(modality: str | None) -> str:
    return "both" if modality is None else DEFAULT_POLARITY.get(canonical_modality(modality), "both")


def check_polarity(polarity) -> str | tuple[str, ...]:
    """A predictor's `polarity` parameter: "auto", one of POLARITIES, or one of them per channel."""
    if isinstance(polarity, str):
        if polarity != "auto" and polarity not in POLARITIES:
            raise ValueError(f"polarity must be 'auto', one of {POLARITIES} or a list of them, got {polarity!r}")
        return polarity
    if isinstance(polarity, (list, tuple)) and polarity and all(p in POLARITIES for p in polarity):
        return tuple(polarity)
    raise ValueError(f"polarity must be 'auto', one of {POLARITIES} or a list of them, got {polarity!r}")


def check_combine(combine: str) -> str:
    if combine not in CHANNEL_COMBINES:
        raise ValueError(f"combine must be one of {CHANNEL_COMBINES}, got {combine!r}")
    return combine


def channel_polarities(polarity, modalities: Sequence[str] | None, n_channels: int) -> tuple[str, ...]:
    """One polarity per channel."""
    if isinstance(polarity, str) and polarity != "auto":
        return (polarity,) * n_channels
    if isinstance(polarity, (list, tuple)):
        if len(polarity) != n_channels:
            raise ValueError(f"{len(polarity)} polarities given for {n_channels} channels")
        return tuple(polarity)
    names = list(modalities or [])
    if names and len(names) != n_channels:
        raise ValueError(f"{len(names)} modalities known for {n_channels} channels")
    return tuple(default_polarity(names[c] if names else None) for c in range(n_channels))


def signed(deviation: torch.Tensor, polarities: Sequence[str]) -> torch.Tensor:
    """(B, C, H, W) signed deviations -> (B, C, H, W) >= 0, each channel by its polarity."""
    if all(p == polarities[0] for p in polarities):  # one op for the whole batch
        return _signed(deviation, polarities[0])
    return torch.cat([_signed(deviation[:, c:c + 1], p) for c, p in enumerate(polarities)], dim=1)


def _signed(d: torch.Tensor, polarity: str) -> torch.Tensor:
    if polarity == "bright":
        return d.clamp(min=0)
    if polarity == "dark":
        return (-d).clamp(min=0)
    return d.abs()


def combine_channels(maps: torch.Tensor, combine: str = "mean") -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) by the channels' mean or max."""
    return maps.mean(dim=1, keepdim=True) if combine == "mean" else maps.amax(dim=1, keepdim=True)
