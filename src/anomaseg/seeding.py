"""Random streams that depend only on where a run is: every phase of training (and the calibration
after it) re-seeds torch, numpy, python and the model's own generators from (seed, phase, epoch,
step, rank), so a resumed process draws what the uninterrupted one drew (docs/architecture.md,
"Exact resume without saved RNG state")."""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch

PHASES = ("train", "bn", "validation", "samples", "calibration")  # independent random streams


def seed_all(seed: int) -> None:
    """One seed for torch, numpy and python (weight initialisation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_generators(model: torch.nn.Module) -> list[tuple[str, torch.Generator]]:
    """The `torch.Generator`s a model keeps as attributes of its modules (e.g. for its own noise)."""
    return [(f"{prefix}.{attr}" if prefix else attr, value)
            for prefix, module in model.named_modules()
            for attr, value in vars(module).items() if isinstance(value, torch.Generator)]


def seed_phase(seed: int, phase: str, epoch: int = 0, step: int = 0, rank: int = 0,
               model: torch.nn.Module | None = None) -> None:
    """Re-seed torch, numpy, python and the model's own generators from (seed, phase, epoch, step,
    rank): what a phase draws never depends on what ran before it in the process, so a resumed run
    draws exactly what the uninterrupted run drew (and each process of a multi-process run its own)."""
    words = np.random.SeedSequence([seed, PHASES.index(phase), epoch, step, rank]).generate_state(4)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(int(words[2]))
    random.seed(int(words[3]))
    for name, gen in model_generators(model) if model is not None else ():
        entropy = [seed, PHASES.index(phase), epoch, step, rank, zlib.crc32(name.encode())]
        gen.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))
