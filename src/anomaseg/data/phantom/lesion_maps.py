"""The lesions of one lesioned subject: its label map and the weights with which lesion intensities
take the place of the tissue.

Families are placed in a fixed order (tumour, isointense mass, infarcts, MS lesions and black
holes): a voxel keeps the first label that reaches it, and each lesion's weight takes a share of
the tissue that is left. Every lesioned subject has at least `MIN_LESION_FRACTION` of its brain
labelled (MS lesions top up a tumour clipped by the brain's edge).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit

from anomaseg.data.phantom.anatomy import Anatomy
from anomaseg.data.phantom.fields import invert_warp, n_control_points, spline_field
from anomaseg.data.phantom.lesions import add_ms_lesions, irregular_radius, tumour_memberships
from anomaseg.data.phantom.realism import draw_infarct

MIN_LESION_FRACTION = 0.0025  # every lesioned subject has at least this fraction of brain labelled
_TEXTURE_SPACING_MM = 6.0
_EVERYWHERE = (slice(None),) * 3


@dataclass
class LesionMaps:
    """Box-local label map and lesion weights of one subject."""

    seg: np.ndarray  # uint8 labels (see contrasts.LABELS)
    w_tissue: np.ndarray  # float32: the share of each voxel left to normal tissue
    terms: list = field(default_factory=list)  # (label, weight, sub-box): lesion weights as drawn
    # (label, flat voxel indices, weight x brain fraction, the same x texture): what `render` adds
    sparse_terms: list = field(default_factory=list)

    @classmethod
    def empty(cls, shape) -> "LesionMaps":
        return cls(seg=np.zeros(shape, np.uint8), w_tissue=np.ones(shape, np.float32))

    def place(self, label: int, weight_of_rest: np.ndarray, sub, labelled: np.ndarray) -> int:
        """Add a lesion whose weight takes `weight_of_rest` of the tissue left in `sub`; label it
        where `labelled` and no earlier label is. Returns the number of voxels newly labelled."""
        w = weight_of_rest * self.w_tissue[sub]
        self.w_tissue[sub] -= w
        self.terms.append((label, w, sub))
        seg_sub = self.seg[sub]
        new = labelled & (seg_sub == 0)
        seg_sub[new] = label
        return int(new.sum())

    def add_texture(self, rng: np.random.Generator, brain: np.ndarray, vox: float) -> None:
        """One smooth texture field shared by all lesion classes (tissue heterogeneity).

        Lesions cover a small part of the box: each class's weight (times the brain fraction) and
        its texture-modulated copy are kept as sparse lists, reused by every modality.
        """
        tspacing = _TEXTURE_SPACING_MM / vox
        tshape = brain.shape
        ctrl = rng.standard_normal((1,) + tuple(n_control_points(n, tspacing) for n in tshape))
        texture = spline_field(ctrl, [np.arange(n, dtype=np.float32) for n in tshape], tspacing)[0]
        texture /= max(float(texture.std()), 1e-6)
        np.clip(texture, -3, 3, out=texture)
        flat_index = np.arange(brain.size).reshape(brain.shape)
        for label, weight, sub in self.terms:
            weight = weight * brain[sub]
            nz = weight > 1e-6
            idx = flat_index[sub][nz]
            a = weight[nz]
            self.sparse_terms.append((label, idx, a, a * texture[sub][nz]))
        self.terms = []


def _world_mm(tpl, centre_subject: np.ndarray) -> list[float]:
    return [round(float(v), 2) for v in (tpl.affine @ np.append(centre_subject, 1.0))[:3]]


def add_tumour(maps: LesionMaps, rng, tumour, anat: Anatomy, tpl, info: dict) -> tuple[np.ndarray, int]:
    """Necrotic core (2), enhancing rim (4) and oedema (3); returns the oedema's membership (the
    whole box) and the number of voxels labelled."""
    tumour.centre = tumour.centre - anat.origin  # into box coordinates
    maskf = anat.mask.astype(np.float32)
    tbox, m_core, m_tum, m_oed = tumour_memberships(rng, tumour, tpl.voxel_mm, anat.wm, anat.csf, maskf)
    maps.terms += [(2, m_core, tbox), (4, m_tum - m_core, tbox), (3, m_oed - m_tum, tbox)]
    maps.w_tissue[tbox] = 1 - m_oed
    m_oed_full = np.zeros(anat.brain.shape, np.float32)
    m_oed_full[tbox] = m_oed
    sub = maps.seg[tbox]
    sub[m_oed > 0.5] = 3
    sub[m_tum > 0.5] = 4
    sub[m_core > 0.5] = 2
    n_tumour = int((sub > 0).sum())
    info["tumour"] = {"centre_mm": _world_mm(tpl, tumour.centre + anat.origin),
                      "radius_mm": round(float(tumour.radius_mm), 2)}
    return m_oed_full, n_tumour


def add_isointense_mass(maps: LesionMaps, rng, mass, anat: Anatomy, tpl, info: dict) -> int:
    """The isointense mass (8), labelled where its membership passes 0.5; returns voxels labelled."""
    mass.centre = mass.centre - anat.origin
    mbox, r = irregular_radius(rng, mass, tpl.voxel_mm, 1.0, anat.brain.shape)
    m = expit((1 - r) * np.float32(mass.radius_mm / 1.5)) * anat.mask.astype(np.float32)[mbox]  # edge ~1.5 mm
    n = maps.place(8, m, mbox, m > 0.5)
    info["isointense_mass"] = {"centre_mm": _world_mm(tpl, mass.centre + anat.origin),
                               "radius_mm": round(float(mass.radius_mm), 2),
                               "mass_effect": round(float(mass.mass_effect), 3)}
    return n


def add_infarcts(maps: LesionMaps, rng, warp, anat: Anatomy, tpl, info: dict) -> int:
    """1-2 chronic infarcts: fluid core (6) and gliotic rim (7); returns voxels labelled."""
    vox = tpl.voxel_mm
    maskf = anat.mask.astype(np.float32)
    n = 0
    info["infarcts"] = []
    for k in range(1 + int(rng.random() < 0.5)):
        cortical = k == 0 and rng.random() < 0.7
        blob, rim_mm = draw_infarct(rng, tpl, cortical)
        blob.centre = invert_warp(warp, blob.centre_tpl) - anat.origin
        ibox, r = irregular_radius(rng, blob, vox, 1 + rim_mm / blob.radius_mm, anat.brain.shape)
        sharp = np.float32(blob.radius_mm / 0.7)  # edge width ~0.7 mm
        m_core = expit((1 - r) * sharp) * maskf[ibox]
        m_all = expit((1 + np.float32(rim_mm / blob.radius_mm) - r) * sharp) * maskf[ibox]
        tissue_frac = np.clip(1 - anat.csf[ibox], 0, 1)
        m_rim = (m_all - m_core) * tissue_frac  # gliosis forms in tissue, not in the sulci
        n += maps.place(6, m_core, ibox, m_core > 0.5)
        n += maps.place(7, m_rim / np.maximum(1 - m_core, 1e-3), ibox,
                        (m_all > 0.5) & (m_core <= 0.5) & (tissue_frac > 0.5))
        info["infarcts"].append({"kind": "cortical" if cortical else "lacunar",
                                 "radius_mm": round(float(blob.radius_mm), 2), "rim_mm": round(float(rim_mm), 2)})
    return n


def free_white_matter(anat: Anatomy, m_oed_full, avoid_realistic: np.ndarray | None) -> np.ndarray:
    """Box-local bool: white matter outside a tumour's oedema and (`avoid_realistic`: where True)
    the realism lesions: where MS lesion centres may fall."""
    ok = (anat.wm > 0.5) & anat.mask
    if m_oed_full is not None:
        ok &= m_oed_full < 0.05
    if avoid_realistic is not None:
        ok &= avoid_realistic
    return ok


def ms_candidates(anat: Anatomy, tpl, m_oed_full, avoid_realistic: np.ndarray | None):
    """(flat box indices, prior weights) of `free_white_matter` voxels, weighted by the template's
    MS prior (periventricular, deep white matter)."""
    cand = np.flatnonzero(free_white_matter(anat, m_oed_full, avoid_realistic))
    shape = tpl.brain.shape
    tc = np.rint(anat.coords.reshape(3, -1)[:, cand]).astype(np.intp)
    for a in range(3):
        np.clip(tc[a], 0, shape[a] - 1, out=tc[a])
    weights = tpl.ms_prior[tc[0], tc[1], tc[2]].astype(np.float64)
    keep = weights > 0
    return cand[keep], weights[keep]


def add_ms(maps: LesionMaps, rng_les, rng_real, anat: Anatomy, tpl, cand, weights, target: int, n_min: int,
           black_holes: int, info: dict) -> None:
    """MS-like ellipsoids (1) until `target` voxels are labelled, then `black_holes` voxels of T1
    black holes (5) from the realism stream."""
    vox = tpl.voxel_mm
    maskf = anat.mask.astype(np.float32)
    ms = np.zeros(anat.brain.shape, np.float32)
    conf = maskf * np.clip(1 - anat.csf, 0, 1)
    info["n_ms_lesions"] = add_ms_lesions(rng_les, ms, cand, weights, vox, conf, target, n_min)
    maps.place(1, ms, _EVERYWHERE, ms > 0.5)
    if black_holes:
        bh = np.zeros(anat.brain.shape, np.float32)
        info["n_black_holes"] = add_ms_lesions(rng_real, bh, cand, weights, vox, conf * (1 - ms), black_holes, 2)
        maps.place(5, bh, _EVERYWHERE, bh > 0.5)
