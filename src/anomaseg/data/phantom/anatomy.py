"""A subject's anatomy: the MNI152 tissue model pushed through the subject's deformation (and the
tumours' mass effect) in one resampling, on the box of the volume that can hold brain."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from anomaseg.data.phantom.fields import Warp, invert_warp, output_box, template_coordinates
from anomaseg.data.phantom.template import Template


@dataclass
class Anatomy:
    """Box-local tissue of one subject (all arrays have the box's shape, float32 unless stated)."""

    box: tuple[slice, ...]  # the part of the volume that can hold brain (the rest is background)
    coords: np.ndarray  # (3, *box) template voxel coordinates of every subject voxel in the box
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # brain fraction (partial volume at the edges); csf + gm + wm
    mask: np.ndarray  # bool: brain > 0.5

    @property
    def origin(self) -> np.ndarray:
        """Subject voxel coordinates of the box's first voxel (int)."""
        return np.array([s.start for s in self.box])


def deform_anatomy(tpl: Template, warp: Warp, masses: list) -> Anatomy:
    """Resample the template's tissue maps into the subject (one resampling per map).

    `masses`: lesions.Blob objects with a mass effect (tumour, isointense mass); their subject
    voxel `centre` is set here (the warp inverted at their template centre).
    """
    vox = tpl.voxel_mm
    shape = tpl.brain.shape
    margin = warp.bound
    for m in masses:
        m.centre = invert_warp(warp, m.centre_tpl)
        margin += m.mass_effect * 1.2 * m.radius_mm / vox
    box = output_box(tpl, warp, margin)
    coords = template_coordinates(warp, box, masses, vox)

    # Linear interpolation for GM, WM and the brain fraction; CSF = brain - GM - WM exactly, since
    # interpolation is linear and the template's maps sum to its brain fraction. Only points whose
    # interpolation support touches the template brain can be nonzero.
    tc = np.rint(coords).astype(np.int16)
    for a in range(3):
        np.clip(tc[a], 0, shape[a] - 1, out=tc[a])
    near = tpl.near_brain[tc[0], tc[1], tc[2]]
    del tc
    pts = coords[:, near]
    csf_t, gm_t, wm_t = tpl.tissue
    kw = dict(order=1, mode="constant", cval=0.0, prefilter=False)
    gm, wm, brain = (np.zeros(near.shape, np.float32) for _ in range(3))
    gm[near] = ndi.map_coordinates(gm_t, pts, **kw)
    wm[near] = ndi.map_coordinates(wm_t, pts, **kw)
    brain[near] = ndi.map_coordinates(tpl.brain, pts, **kw)  # tissue fraction (partial volume at edges)
    del pts
    csf = np.clip(brain - gm - wm, 0, None)
    return Anatomy(box=box, coords=coords, csf=csf, gm=gm, wm=wm, brain=brain, mask=brain > 0.5)
