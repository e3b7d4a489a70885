"""The built-in brain MR phantom: MNI152 anatomy (shipped with nilearn) + synthetic lesions.

Every subject is the MNI152 tissue model (grey matter, white matter, CSF probability maps) pushed
through its own random smooth deformation, rendered as T1, T1ce, T2 and FLAIR with per-subject
contrast jitter, a smooth bias field and Rician noise. Lesioned subjects additionally carry MS-like
white-matter lesions and/or a tumour (necrotic core, enhancing rim, oedema) with a label map.

Realism (off by default; ``make_phantom(..., realism=True)`` or ``anomaseg phantom --realistic``, or
a subset of `REALISM` by name). Real FLAIR has bright tissue that is normal, and lesions that are not
its brightest tissue; a FLAIR threshold is fooled by both, so these decide how methods rank.

- Normal variants, in healthy and lesioned subjects alike, never labelled (``PhantomSubject.variants``
  holds where they show): ``caps`` (FLAIR/T2-bright periventricular caps at the frontal and occipital
  horns of the lateral ventricles, fading over 2-5 mm, and a fainter thin band along their bodies);
  ``choroid_plexus`` (a glomus in each atrium: enhancing on T1ce, GM-like on T1/T2, mixed on FLAIR);
  ``septum`` (the septum pellucidum, a ~1-3 mm tissue sheet between the frontal horns, absent from
  the MNI152 maps); ``flow_artefacts`` (2-7 FLAIR-bright streaks, 8-24 mm long, along the
  phase-encoding axis in the third and fourth ventricles, basal cisterns and medial lateral
  ventricles: CSF pulsation);
  ``pv_rims`` (partial-volume CSF/tissue voxels brighter on FLAIR than either, strongly along the
  ventricles, a quarter as much at the sulci). Each varies per subject (thickness, brightness,
  position, count: see ``info["variants"]``).
- Lesions (labels 5-8): ``black_holes`` (in MS subjects, 30-60% of the lesion load is T1 black holes:
  T1 dark, FLAIR only mildly above WM and below GM); ``infarcts`` (a lesion family: 1-2 chronic
  infarcts, cortical-subcortical or lacunar, with a fluid core dark on FLAIR and a 2-4 mm FLAIR-bright
  gliotic rim); ``isointense_masses`` (a lesion family: a solid mass near the cortex, within ~10% of
  GM on every contrast, that pushes the anatomy aside with a stronger mass effect than the tumours).
  With ``infarcts`` / ``isointense_masses`` the primary family of lesioned subjects cycles over
  MS, tumour, infarct and mass instead of MS and tumour.

The realism features draw from their own random streams: without them every subject is the one of
PHANTOM_VERSION (same seed, same volumes); with them, it is deterministic per seed as well. All of
them cost about a quarter more time per subject (benchmarks/README.md, "Phantom realism").

MS lesion loads (off by default; ``make_phantom(..., lesion_load="ms")`` or ``anomaseg phantom
--lesions ms``): every lesioned subject carries 20-50 MS lesions, mostly 0.01-0.5 ml, periventricular,
juxtacortical and in deep white matter, some confluent, from their own random stream (``ms_load``,
with the numbers' sources; ``info["ms_load"]`` lists each lesion's region and volume).

Output follows the project's data contract (BraTS-style case folders)::

    out_dir/train/healthy_000/healthy_000_{t1,t1ce,t2,flair,mask}.nii.gz
    out_dir/test/lesioned_000/lesioned_000_{t1,t1ce,t2,flair,mask,seg}.nii.gz
    out_dir/phantom.json

Determinism: each subject draws its randomness from seeds derived from ``(seed, index, lesioned,
stream)`` only (`seeds`), so a subject is the same whatever the number of other subjects or the
modalities requested.

The package, one job per module (each imports only the ones above it):

- ``seeds``: the random streams;
- ``template``: nilearn's MNI152 tissue maps at each resolution, priors, the ventricles' landmarks;
- ``fields``: B-spline fields: the subject's deformation, the bias field, Rician noise;
- ``anatomy``: the template deformed into one subject (one resampling per tissue map);
- ``lesions``: lesion shapes (tumour, MS-like ellipsoids);
- ``realism``: the realism features (normal variants, realistic lesion families);
- ``ms_load``: realistic MS lesion loads (``lesion_load="ms"``);
- ``lesion_maps``: a subject's label map and lesion weights, family by family;
- ``contrasts``: tissue and lesion intensities, rendering T1 / T1ce / T2 / FLAIR;
- ``subject``: `make_subject`, composing the steps; ``writing``: `make_phantom`.
"""

from anomaseg.data.phantom.contrasts import (LABELS, LESION_INTENSITY, MODALITIES, REALISTIC_LESION_INTENSITY,
                                             TISSUE_INTENSITY)
from anomaseg.data.phantom.ms_load import LESION_LOADS
from anomaseg.data.phantom.realism import NORMAL_VARIANTS, REALISM, REALISTIC_LESIONS, realism_features
from anomaseg.data.phantom.subject import PhantomSubject, make_subject
from anomaseg.data.phantom.writing import PHANTOM_VERSION, make_phantom

__all__ = ["LABELS", "MODALITIES", "TISSUE_INTENSITY", "LESION_INTENSITY", "REALISTIC_LESION_INTENSITY",
           "NORMAL_VARIANTS", "REALISTIC_LESIONS", "REALISM", "LESION_LOADS", "PHANTOM_VERSION", "make_phantom",
           "make_subject", "realism_features", "PhantomSubject"]
