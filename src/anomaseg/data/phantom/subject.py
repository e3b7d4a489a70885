"""One phantom subject in memory: `make_subject` composes the package's steps (families, warp,
anatomy, normal variants, lesions, contrasts) for one case."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from anomaseg.data.phantom.anatomy import Anatomy, deform_anatomy
from anomaseg.data.phantom.contrasts import LABELS, MODALITIES, check_modalities, draw_realistic_intensities, render
from anomaseg.data.phantom.fields import Warp, draw_warp
from anomaseg.data.phantom.lesion_maps import (MIN_LESION_FRACTION, LesionMaps, add_infarcts, add_isointense_mass,
                                               add_ms, add_tumour, free_white_matter, ms_candidates)
from anomaseg.data.phantom.lesions import Blob, draw_tumour
from anomaseg.data.phantom.ms_load import add_ms_load, check_lesion_load
from anomaseg.data.phantom.realism import NORMAL_VARIANTS, REALISTIC_LESIONS, draw_mass, draw_variants, realism_features
from anomaseg.data.phantom.seeds import (STREAM_ANATOMY, STREAM_LESION, STREAM_MS_LOAD, STREAM_REALISTIC_LESIONS,
                                         subject_rng)
from anomaseg.data.phantom.template import Template, load_template


@dataclass
class PhantomSubject:
    """One synthetic subject in memory (what `make_phantom` writes for a case)."""

    images: dict[str, np.ndarray]  # modality -> (X, Y, Z) float32
    mask: np.ndarray  # (X, Y, Z) uint8 0/1: the deformed brain mask
    seg: np.ndarray | None  # (X, Y, Z) uint8 labels per LABELS; None for healthy subjects
    affine: np.ndarray  # (4, 4)
    tissue_box: np.ndarray = field(repr=False)  # (3, *box shape) CSF, GM, WM inside `box`
    box: tuple[slice, ...]  # the part of the volume that can hold brain (the rest is background)
    info: dict = field(default_factory=dict)  # families, lesion voxel counts, contrast draws
    # realism's normal variants (never labelled): name -> (X, Y, Z) bool, where the variant shows
    variants: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def tissue(self) -> np.ndarray:
        """(3, X, Y, Z) float32 CSF, GM, WM probabilities in subject space (built on demand)."""
        full = np.zeros((3,) + self.mask.shape, np.float32)
        full[(slice(None),) + self.box] = self.tissue_box
        return full



def make_subject(index: int, lesioned: bool, seed: int = 0, resolution: int = 2,
                 modalities: Iterable[str] = MODALITIES, realism=False, lesion_load: str = "default") -> PhantomSubject:
    """Synthesise one subject in memory; `make_phantom` writes exactly this for case `index`.

    `lesion_load`: "default" (the phantom's MS lesions: a few, 0.3-0.8% of the brain) or "ms"
    (every lesioned subject carries a realistic MS lesion load, see `ms_load`).
    """
    modalities = check_modalities(modalities)
    features = realism_features(realism)
    lesion_load = check_lesion_load(lesion_load)
    tpl = load_template(int(resolution))
    rng_les = subject_rng(seed, index, lesioned, STREAM_LESION)
    rng_real = subject_rng(seed, index, lesioned, STREAM_REALISTIC_LESIONS)

    families, tumour, mass = _draw_families(lesioned, seed, index, features, tpl, rng_les, rng_real)
    warp = draw_warp(subject_rng(seed, index, lesioned, STREAM_ANATOMY), tpl)
    anat = deform_anatomy(tpl, warp, [m for m in (tumour, mass) if m is not None])
    variants = None
    if any(f in NORMAL_VARIANTS for f in features):
        variants = draw_variants(features, seed, index, lesioned, tpl, warp, anat.coords, anat.box,
                                 anat.csf, anat.gm, anat.wm)
    info: dict = {"families": families}
    lesions = None
    if lesioned:
        rng_load = subject_rng(seed, index, lesioned, STREAM_MS_LOAD) if lesion_load == "ms" else None
        lesions = _draw_lesions(features, families, tumour, mass, warp, anat, tpl, rng_les, rng_real, rng_load, info)

    realistic_i = None
    if lesioned and any(f in REALISTIC_LESIONS for f in features):  # drawn for all modalities: same subject
        realistic_i = draw_realistic_intensities(rng_real)
    shape = tpl.brain.shape
    images: dict[str, np.ndarray] = {}
    jitters: dict[str, dict] = {}
    for mod in modalities:
        images[mod], jitters[mod] = render(mod, seed, index, lesioned, (anat.csf, anat.gm, anat.wm), anat.box,
                                           shape, tpl.voxel_mm, lesions, variants, realistic_i)
    return _assemble(tpl, anat, images, lesions, variants, features, jitters, info)


def _draw_families(lesioned: bool, seed: int, index: int, features, tpl: Template, rng_les, rng_real):
    """(families, tumour, mass): the lesion families of a subject and the blobs with mass effect.

    The primary family alternates so any consecutive lesioned subjects cover all families; a
    quarter of subjects also get another one.
    """
    families: list[str] = []
    tumour = mass = None
    if not lesioned:
        return families, tumour, mass
    pool = ["ms", "tumour"] + [fam for fam, feature in (("infarct", "infarcts"), ("mass", "isointense_masses"))
                               if feature in features]
    primary = pool[(int(seed) + int(index)) % len(pool)]
    families = [primary]
    if rng_les.random() < 0.25:
        others = [fam for fam in pool if fam != primary]
        families.append(others[0] if len(others) == 1 else others[int(rng_real.integers(len(others)))])
    if "tumour" in families:
        tumour = draw_tumour(rng_les, tpl)
    if "mass" in families:
        mass = draw_mass(rng_real, tpl, tumour)
    return families, tumour, mass


def _draw_lesions(features, families: list[str], tumour: Blob | None, mass: Blob | None, warp: Warp,
                  anat: Anatomy, tpl: Template, rng_les, rng_real, rng_load, info: dict) -> LesionMaps:
    """Label map and lesion weights of a lesioned subject, in the order of `lesion_maps`; with
    `rng_load` (lesion_load="ms"), a realistic MS lesion load in place of the default MS lesions."""
    maps = LesionMaps.empty(anat.brain.shape)
    m_oed_full, n_tumour = None, 0
    if tumour is not None:
        m_oed_full, n_tumour = add_tumour(maps, rng_les, tumour, anat, tpl, info)
    n_realistic = 0  # lesions of the realism features, labelled where their membership passes 0.5
    if mass is not None:
        n_realistic += add_isointense_mass(maps, rng_real, mass, anat, tpl, info)
    if "infarct" in families:
        n_realistic += add_infarcts(maps, rng_real, warp, anat, tpl, info)

    avoid_realistic = maps.w_tissue > 0.95 if n_realistic else None
    if rng_load is not None:
        if "ms" not in families:
            families.append("ms")
        add_ms_load(maps, rng_load, anat, tpl, free_white_matter(anat, m_oed_full, avoid_realistic),
                    "black_holes" in features, info)
        maps.add_texture(rng_les, anat.brain, tpl.voxel_mm)
        return maps
    need_ms = "ms" in families
    n_brain = int(anat.mask.sum())
    deficit = int(np.ceil(MIN_LESION_FRACTION * n_brain)) - n_tumour - n_realistic
    if need_ms or deficit > 0:
        if not need_ms:
            families.append("ms")  # tumour clipped by the brain edge: top up with MS lesions
        cand, weights = ms_candidates(anat, tpl, m_oed_full, avoid_realistic)
        if need_ms:
            target, n_min = int(rng_les.uniform(0.003, 0.008) * n_brain), 3
        else:
            target, n_min = deficit, 1
        black_holes = 0
        if need_ms and "black_holes" in features:  # a part of the MS lesion load is T1 black holes
            black_holes = int(rng_real.uniform(0.3, 0.6) * target)
            target -= black_holes
        add_ms(maps, rng_les, rng_real, anat, tpl, cand, weights, target, n_min, black_holes, info)
    maps.add_texture(rng_les, anat.brain, tpl.voxel_mm)
    return maps


def _assemble(tpl: Template, anat: Anatomy, images, lesions: LesionMaps | None, variants, features, jitters,
              info: dict) -> PhantomSubject:
    """Box-local maps into whole volumes; the subject's `info` completed."""
    shape = tpl.brain.shape
    box = anat.box
    full_mask = np.zeros(shape, np.uint8)
    full_mask[box] = anat.mask
    full_seg = None
    if lesions is not None:
        full_seg = np.zeros(shape, np.uint8)
        full_seg[box] = lesions.seg
        info["lesion_voxels"] = {name: int((full_seg == k).sum()) for k, name in LABELS.items()}
    info["brain_voxels"] = int(anat.mask.sum())
    info["contrast"] = jitters
    variant_masks = {}
    if features:
        info["realism"] = list(features)
    if variants is not None:
        info["variants"] = variants.info
        for name, m in variants.masks.items():
            full = np.zeros(shape, bool)
            full[box] = m
            variant_masks[name] = full
    return PhantomSubject(images=images, mask=full_mask, seg=full_seg, affine=np.array(tpl.affine), info=info,
                          tissue_box=np.stack([anat.csf, anat.gm, anat.wm]), box=box, variants=variant_masks)
