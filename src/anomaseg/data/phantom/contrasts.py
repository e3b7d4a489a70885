"""MR contrasts of the phantom: tissue and lesion intensities per sequence, and the rendering of a
subject's tissue and lesion weights into T1, T1ce, T2 and FLAIR images.

Image intensities are arbitrary units (T1 white matter ~ 1000) rounded to whole numbers, as scanner
data are; the arrays are still stored as float32. Rounding costs nothing in realism (noise sigma is
8-30 units) and halves the gzip time and size.
"""

from __future__ import annotations

import numpy as np

from anomaseg.data.phantom.fields import bias_field, rician_noise
from anomaseg.data.phantom.seeds import STREAM_MODALITY_BASE, subject_rng

# Labels 1-4 occur in every phantom; 5-8 only with the realism features "black_holes", "infarcts"
# and "isointense_masses" (see realism.REALISM).
LABELS = {1: "ms_lesion", 2: "tumour_necrotic_core", 3: "tumour_oedema", 4: "tumour_enhancing_rim",
          5: "ms_black_hole", 6: "infarct_core", 7: "infarct_gliotic_rim", 8: "isointense_mass"}
MODALITIES = ("t1", "t1ce", "t2", "flair")

# Mean tissue intensities (arbitrary units, T1 white matter = 1000) as (CSF, GM, WM). Relative
# orders follow the usual clinical appearance: T1/T1ce WM > GM > CSF; T2 CSF >> GM > WM;
# FLAIR GM > WM with CSF suppressed. Each value is multiplied per subject by U(0.9, 1.1).
TISSUE_INTENSITY = {
    "t1": (250.0, 620.0, 1000.0),
    "t1ce": (260.0, 640.0, 1000.0),
    "t2": (1000.0, 500.0, 380.0),
    "flair": (150.0, 700.0, 550.0),
}
# Lesion intensities per label (same units); multiplied per subject by U(0.93, 1.07).
# MS: T2/FLAIR hyperintense (FLAIR ~1.6x WM), T1 hypointense, not enhancing.
# Necrotic core: fluid-like (T1 dark, T2 bright, FLAIR dark-ish and heterogeneous).
# Enhancing rim: T1ce ~1.5x WM, mildly bright on T2/FLAIR. Oedema: T2/FLAIR bright, T1 slightly dark.
LESION_INTENSITY = {
    "t1": {1: 680.0, 2: 320.0, 3: 800.0, 4: 720.0},
    "t1ce": {1: 700.0, 2: 340.0, 3: 810.0, 4: 1500.0},
    "t2": {1: 700.0, 2: 950.0, 3: 720.0, 4: 600.0},
    "flair": {1: 900.0, 2: 450.0, 3: 880.0, 4: 800.0},
}
# Lesions of the realism features (drawn from their own random stream, so the default phantom keeps
# its values). Black hole (5): T1 dark (between CSF and GM), T2 bright, FLAIR only mildly above WM
# and below GM. Infarct core (6): fluid, like CSF on every contrast (dark on FLAIR). Gliotic rim (7):
# FLAIR/T2 bright, mildly T1 dark. Isointense mass (8): within ~10% of GM on every contrast, found
# by the anatomy it pushes aside (mass effect) rather than by its intensity.
REALISTIC_LESION_INTENSITY = {
    "t1": {5: 480.0, 6: 280.0, 7: 760.0, 8: 640.0},
    "t1ce": {5: 500.0, 6: 290.0, 7: 770.0, 8: 680.0},
    "t2": {5: 820.0, 6: 980.0, 7: 700.0, 8: 600.0},
    "flair": {5: 630.0, 6: 210.0, 7: 870.0, 8: 650.0},
}
# Relative amplitude of the smooth multiplicative lesion texture, per label (FLAIR core: its own).
_TEXTURE = {1: 0.04, 2: 0.12, 3: 0.05, 4: 0.08, 5: 0.05, 6: 0.08, 7: 0.06, 8: 0.06}
_TEXTURE_FLAIR_CORE = 0.20

_TISSUE_JITTER = 0.10
_LESION_JITTER = 0.07
_NOISE_SIGMA = (0.02, 0.03)  # Rician sigma as a fraction of the subject's WM intensity
_MODALITY_STREAM = {m: STREAM_MODALITY_BASE + i for i, m in enumerate(MODALITIES)}


def check_modalities(modalities) -> tuple[str, ...]:
    if isinstance(modalities, str):
        modalities = (modalities,)
    out = tuple(dict.fromkeys(str(m).lower() for m in modalities))
    unknown = [m for m in out if m not in MODALITIES]
    if unknown or not out:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {tuple(modalities)}")
    return out


def draw_realistic_intensities(rng: np.random.Generator) -> dict[str, dict[int, float]]:
    """Per-subject intensities of the realism features' lesions (labels 5-8), drawn for every
    modality whichever are written (so a subject is the same whatever the modalities)."""
    return {mod: {k: v * rng.uniform(1 - _LESION_JITTER, 1 + _LESION_JITTER)
                  for k, v in sorted(REALISTIC_LESION_INTENSITY[mod].items())} for mod in MODALITIES}


def render(mod: str, seed: int, index: int, lesioned: bool, tissue, box, shape, vox: float, lesions=None,
           variants=None, realistic_i: dict | None = None) -> tuple[np.ndarray, dict]:
    """One modality's image (float32, whole numbers, `shape`) and its contrast draws.

    `tissue`: (CSF, GM, WM) box-local fractions; `lesions`: the subject's `lesion_maps.LesionMaps`
    (None for healthy subjects); `variants`: its `realism.Variants` or None; `realistic_i`: the
    realism lesions' intensities (`draw_realistic_intensities`) or None.
    """
    rng = subject_rng(seed, index, lesioned, _MODALITY_STREAM[mod])
    tissue_i = np.array(TISSUE_INTENSITY[mod]) * rng.uniform(1 - _TISSUE_JITTER, 1 + _TISSUE_JITTER, 3)
    lesion_i = {k: v * rng.uniform(1 - _LESION_JITTER, 1 + _LESION_JITTER)
                for k, v in sorted(LESION_INTENSITY[mod].items())}
    lesion_i.update((realistic_i or {}).get(mod, {}))
    sigma = rng.uniform(*_NOISE_SIGMA) * tissue_i[2]
    bias = bias_field(rng, [np.arange(s.start, s.stop, dtype=np.float32) for s in box], shape, vox)

    csf, gm, wm = tissue
    c, g, w = (np.float32(v) for v in tissue_i)
    signal = csf * c + gm * g + wm * w
    if lesions is not None:
        signal *= lesions.w_tissue
        flat = signal.reshape(-1)
        for label, idx, a, a_tex in lesions.sparse_terms:
            amp = _TEXTURE_FLAIR_CORE if (mod == "flair" and label == 2) else _TEXTURE[label]
            # lesion intensity x (1 + amp x texture), blended by the lesion's weight
            flat[idx] += np.float32(lesion_i[label]) * (a + np.float32(amp) * a_tex)
    if variants is not None:
        extra = variants.term(mod, tissue_i)
        if extra is not None:
            signal += extra if lesions is None else extra * lesions.w_tissue
    signal *= bias
    img = rician_noise(rng, signal, sigma, shape, box)
    jitter = {"tissue_csf_gm_wm": [round(float(v), 2) for v in tissue_i], "noise_sigma": round(float(sigma), 3)}
    return np.rint(img, out=img), jitter
