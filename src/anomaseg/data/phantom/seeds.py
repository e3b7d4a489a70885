"""The phantom's random streams.

Each subject draws its randomness from seeds derived from ``(seed, index, lesioned, stream)`` only,
so a subject is the same whatever the number of other subjects or the modalities requested, and a
feature that is turned off changes no other feature's draws.
"""

from __future__ import annotations

import numpy as np

STREAM_ANATOMY, STREAM_LESION = 1, 2
STREAM_VARIANTS, STREAM_REALISTIC_LESIONS = 3, 4  # used only with realism features
STREAM_MS_LOAD = 5  # used only with lesion_load="ms"
STREAM_MODALITY_BASE = 10  # modality k of MODALITIES draws from stream 10 + k


def subject_rng(seed: int, index: int, lesioned: bool, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(bool(lesioned)), int(stream)])
