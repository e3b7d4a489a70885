"""Cases without a mask file: nonzero voxels only where they delimit the brain, else a derived mask."""

import nibabel as nib
import numpy as np
import pytest

from anomaseg.data import brainmask
from anomaseg.data.layout import find_cases
from anomaseg.data.phantom import make_subject
from anomaseg.data.slices import SliceSpec, load_case_with_mask_source, prepare_cases
from anomaseg.errors import InputError, InputWarning
from conftest import synthetic_case


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom_subject():
    return make_subject(0, lesioned=True, seed=0, resolution=2, modalities=("flair", "t2"))


def test_phantom_background_is_noise_and_the_derived_mask_is_its_brain(phantom_subject):
    """The phantom's background holds Rician noise: nonzero voxels are ~the whole volume, so
    'nonzero = brain' is wrong there; Otsu + largest component + holes recovers the brain."""
    images = [phantom_subject.images[m] for m in ("flair", "t2")]
    truth = phantom_subject.mask > 0
    nz = brainmask.nonzero(images)
    assert nz.mean() > 0.99 and truth.mean() < 0.3
    assert not brainmask.background_is_empty(nz)
    derived = brainmask.derive_head_mask(images)
    assert _dice(derived, truth) > 0.97
    assert _dice(brainmask.derive_head_mask(images[:1]), truth) > 0.97  # FLAIR alone too


def test_skull_stripped_zero_background_keeps_nonzero_voxels():
    image, brain, _ = synthetic_case(np.random.default_rng(0))
    nz = brainmask.nonzero([image])
    assert brainmask.background_is_empty(nz)
    assert (nz == (brain > 0)).mean() > 0.99
    # a thin slab whose first and last axial slices are brain is still "empty background"
    assert brainmask.background_is_empty(nz[:, :, 10:13])


def _head(rng, shape=(40, 44, 36)):
    """A head that is not skull-stripped: brain, dark skull, bright scalp, noise around it."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    brain, skull, scalp = r < 0.6, (r >= 0.6) & (r < 0.72), (r >= 0.72) & (r < 0.82)
    image = 800 * brain + 80 * skull + 600 * scalp + np.abs(rng.normal(0, 15, shape))
    return image.astype(np.float32), r < 0.82


def test_unstripped_head_gets_a_head_mask():
    image, head = _head(np.random.default_rng(0))
    assert not brainmask.background_is_empty(brainmask.nonzero([image]))
    derived = brainmask.derive_head_mask([image])
    assert _dice(derived, head) > 0.95  # the dark skull inside is filled in


def _write_case(root, name, image, affine=np.diag([2.0, 2.0, 2.0, 1.0]), mask=None):
    d = root / name
    d.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, affine), d / f"{name}_flair.nii.gz")
    if mask is not None:
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), d / f"{name}_mask.nii.gz")
    return root


def test_rules_and_sources(tmp_path):
    image, head = _head(np.random.default_rng(1))
    root = _write_case(tmp_path / "d", "noisy", image)
    (case,) = find_cases(root)
    _, brain, _, source = load_case_with_mask_source(case, SliceSpec(image_size=32))
    assert source == "derived" and _dice(brain, head) > 0.95
    _, brain, _, source = load_case_with_mask_source(case, SliceSpec(image_size=32, brain_mask="nonzero"))
    assert source == "nonzero" and brain.mean() > 0.99
    with pytest.raises(InputError, match="noisy.*has no brain mask file.*'file'"):
        load_case_with_mask_source(case, SliceSpec(image_size=32, brain_mask="file"))
    # a mask file always wins
    root2 = _write_case(tmp_path / "e", "masked", image, mask=head)
    (case2,) = find_cases(root2)
    _, brain, _, source = load_case_with_mask_source(case2, SliceSpec(image_size=32, brain_mask="derived"))
    assert source == "file" and (brain == head).all()


def test_a_derived_mask_is_never_silent(tmp_path):
    image, _ = _head(np.random.default_rng(2))
    (case,) = find_cases(_write_case(tmp_path / "d", "noisy", image))
    with pytest.warns(InputWarning, match="brain mask is derived from the images.*anomaseg preprocess"):
        (prepared,) = prepare_cases([case], SliceSpec(image_size=32), progress=False)
    assert prepared.meta["brain_mask"] == "derived"


def test_noise_only_volume_stops_with_the_fix(tmp_path):
    noise = np.abs(np.random.default_rng(3).normal(0, 10, (30, 30, 20))).astype(np.float32) + 1
    (case,) = find_cases(_write_case(tmp_path / "d", "noise", noise))
    with pytest.raises(InputError, match="noise_flair.nii.gz: no brain mask file.*pass <case>_mask.nii.gz or run "
                                         "`anomaseg preprocess`"):
        load_case_with_mask_source(case, SliceSpec(image_size=32))
