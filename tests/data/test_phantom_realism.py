"""Phantom realism: FLAIR's normal hyperintensities (never labelled) and lesions that are not the
brightest tissue; the default phantom stays what it was (2 mm)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from anomaseg.cli import main
from anomaseg.data.phantom import LABELS, MODALITIES, NORMAL_VARIANTS, REALISM, make_subject, realism_features

# sha256 (first 16 hex digits) of make_subject(index, lesioned, seed=0, resolution=2) before the
# realism features were added: every modality, the mask and the labels.
DEFAULT_HASHES = {(0, False): "395111b9d46d996e", (0, True): "641fbd853ac68f9d", (3, True): "5be101bd70c16fce"}


def _hash(s) -> str:
    h = hashlib.sha256()
    for m in sorted(s.images):
        h.update(m.encode())
        h.update(np.ascontiguousarray(s.images[m]).tobytes())
    h.update(s.mask.tobytes())
    if s.seg is not None:
        h.update(s.seg.tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def healthy():
    return make_subject(0, False, realism=True)


@pytest.fixture(scope="module")
def lesioned():
    """With every feature, lesioned subjects cycle over MS (0), tumour (1), infarct (2) and mass (3)."""
    return {i: make_subject(i, True, realism=True) for i in (0, 2, 3)}


def _means(s, region):
    return {m: float(s.images[m][region].mean()) for m in MODALITIES}


def _tissue(s, t: int, threshold: float = 0.9):
    """Voxels of tissue class t (0 CSF, 1 GM, 2 WM) with no label and no normal variant."""
    region = (s.mask > 0) & (s.tissue[t] > threshold)
    if s.seg is not None:
        region &= s.seg == 0
    for m in s.variants.values():
        region &= ~m
    return region


def _world(s, region) -> np.ndarray:
    """World coordinates (mm) of the voxels of `region`, (N, 3)."""
    idx = np.argwhere(region)
    return idx @ s.affine[:3, :3].T + s.affine[:3, 3]


@pytest.mark.parametrize("index,lesioned_", sorted(DEFAULT_HASHES))
def test_default_phantom_is_unchanged(index, lesioned_):
    assert _hash(make_subject(index, lesioned_, seed=0, resolution=2)) == DEFAULT_HASHES[(index, lesioned_)]


def test_realism_is_deterministic_and_named(healthy):
    again = make_subject(0, False, realism=True)
    assert all(np.array_equal(again.images[m], healthy.images[m]) for m in MODALITIES)
    assert healthy.info["realism"] == list(REALISM) and set(healthy.variants) == set(NORMAL_VARIANTS)
    assert realism_features("caps, infarcts") == ("caps", "infarcts") and realism_features(False) == ()
    with pytest.raises(ValueError, match="unknown realism feature"):
        realism_features(["caps", "glitter"])


def test_normal_variants_are_never_labelled():
    default = make_subject(0, True)
    variants = make_subject(0, True, realism=NORMAL_VARIANTS)
    np.testing.assert_array_equal(variants.seg, default.seg)  # same lesions, no new labels
    assert not np.array_equal(variants.images["flair"], default.images["flair"])
    assert make_subject(0, False, realism=NORMAL_VARIANTS).seg is None


def test_periventricular_caps_are_flair_bright_bands(healthy):
    caps = healthy.variants["caps"]
    assert 200 < caps.sum() < 0.05 * healthy.mask.sum()
    wm, band = _means(healthy, _tissue(healthy, 2)), _means(healthy, caps)
    assert band["flair"] > 1.1 * wm["flair"] and band["t2"] > wm["t2"]
    # a band along the lateral ventricles, thickest at the horns: within a few mm of ventricular CSF
    vent_csf = (healthy.tissue[0] > 0.5) & (healthy.mask > 0)
    from scipy import ndimage as ndi
    dist_mm = ndi.distance_transform_edt(~vent_csf, sampling=2.0)
    assert np.median(dist_mm[caps]) <= 6.0
    y = _world(healthy, caps)[:, 1]
    assert (y > 5).mean() > 0.2 and (y < -30).mean() > 0.1  # frontal and occipital horns


def test_choroid_plexus_enhances_in_the_atria(healthy):
    cp = healthy.variants["choroid_plexus"]
    assert cp.sum() >= 4
    wm = _means(healthy, _tissue(healthy, 2))
    assert _means(healthy, cp)["t1ce"] > 1.1 * wm["t1ce"]
    xyz = _world(healthy, cp)
    assert (np.abs(xyz[:, 0]) > 12).all() and np.median(xyz[:, 1]) < -25  # lateral and posterior: the atria
    assert (xyz[:, 0] < 0).any() and (xyz[:, 0] > 0).any()  # both sides


def test_septum_is_tissue_at_the_midline_between_the_ventricles(healthy):
    septum = healthy.variants["septum"]
    assert septum.sum() >= 3
    xyz = _world(healthy, septum)
    assert np.abs(np.median(xyz[:, 0])) < 6 and np.median(xyz[:, 1]) > -25
    csf, sep = _means(healthy, _tissue(healthy, 0)), _means(healthy, septum)
    assert sep["flair"] > 2 * csf["flair"] and sep["t1"] > 1.5 * csf["t1"]


def test_flow_artefacts_are_flair_only_bright_csf():
    default = make_subject(1, False)
    flow = make_subject(1, False, realism=("flow_artefacts",))
    mask = flow.variants["flow_artefacts"]
    assert mask.any()
    for m in ("t1", "t1ce", "t2"):
        np.testing.assert_array_equal(flow.images[m], default.images[m])
    changed = flow.images["flair"] != default.images["flair"]
    assert changed[mask].all()
    csf = default.images["flair"][_tissue(default, 0)].mean()
    assert flow.images["flair"][mask].mean() > 2.5 * csf
    assert (default.tissue[0][mask] > 0.4).all()  # in CSF spaces


def test_partial_volume_rims_brighten_csf_tissue_boundaries_on_flair():
    default = make_subject(1, False)
    pv = make_subject(1, False, realism=("pv_rims",))
    rim = pv.variants["pv_rims"]
    assert rim.sum() > 100
    csf = pv.tissue[0][rim]
    assert (csf > 0.1).all() and (csf < 0.9).all()  # mixed voxels
    for m in ("t1", "t1ce", "t2"):
        np.testing.assert_array_equal(pv.images[m], default.images[m])
    wm = default.images["flair"][_tissue(default, 2)].mean()
    gain = pv.images["flair"][rim].astype(float) - default.images["flair"][rim]
    assert gain.mean() > 0.08 * wm


def test_black_holes_are_t1_dark_and_only_mildly_flair_bright(lesioned):
    s = lesioned[0]
    assert "ms" in s.info["families"] and (s.seg == 5).sum() > 20 and (s.seg == 1).any()
    wm, gm = _means(s, _tissue(s, 2)), _means(s, _tissue(s, 1, 0.7))
    bh, ms = _means(s, s.seg == 5), _means(s, s.seg == 1)
    assert bh["t1"] < 0.75 * wm["t1"] and bh["t1"] < gm["t1"]
    assert wm["flair"] < bh["flair"] < 1.1 * gm["flair"] and bh["flair"] < ms["flair"]
    assert bh["t2"] > wm["t2"]


def test_chronic_infarct_has_a_dark_core_and_a_bright_rim(lesioned):
    s = lesioned[2]
    assert s.info["families"][0] == "infarct"
    assert (s.seg == 6).sum() > 20 and (s.seg == 7).sum() > 20
    wm = _means(s, _tissue(s, 2))
    core, rim = _means(s, s.seg == 6), _means(s, s.seg == 7)
    assert core["flair"] < 0.7 * wm["flair"] and core["t2"] > wm["t2"] and core["t1"] < 0.6 * wm["t1"]
    assert rim["flair"] > 1.05 * wm["flair"] > core["flair"]


def test_isointense_mass_matches_grey_matter_and_displaces_the_anatomy(lesioned):
    s = lesioned[3]
    assert s.info["families"] == ["mass"]
    label = s.seg == 8
    assert label.sum() > 200
    gm = _means(s, _tissue(s, 1, 0.7))
    mass = _means(s, label)
    assert abs(mass["flair"] / gm["flair"] - 1) < 0.15
    # The same subject without the mass family (same anatomy draw, MS lesions instead, no mass):
    # tissue differs around the mass, not far from it.
    other = make_subject(3, True, realism=tuple(f for f in REALISM if f != "isointense_masses"))
    assert "mass" not in other.info["families"] and "tumour" not in other.info["families"]
    info = s.info["isointense_mass"]
    centre = np.linalg.solve(s.affine, np.append(info["centre_mm"], 1.0))[:3]
    r_mm = np.linalg.norm((np.indices(s.mask.shape).reshape(3, -1).T - centre) * 2.0, axis=1).reshape(s.mask.shape)
    diff = np.abs(s.tissue - other.tissue).sum(0)
    radius = info["radius_mm"]
    shell = (r_mm > 1.2 * radius) & (r_mm < 2.0 * radius) & (s.mask > 0)
    far = r_mm > 6 * radius
    assert diff[shell].mean() > 0.05  # pushed aside beyond the mass itself
    assert diff[far].max() < 1e-3


def test_cli_writes_a_realistic_phantom(tmp_path):
    assert main(["phantom", "--out", str(tmp_path / "p"), "--healthy", "1", "--lesioned", "1",
                 "--realistic", "caps,black_holes"]) == 0
    meta = json.loads((tmp_path / "p" / "phantom.json").read_text())
    assert meta["realism"] == ["caps", "black_holes"]
    assert meta["labels"] == {str(k): v for k, v in LABELS.items()}
    assert main(["phantom", "--out", str(tmp_path / "q"), "--healthy", "1", "--lesioned", "0",
                 "--realistic", "sparkles"]) == 2
    assert not (tmp_path / "q" / "phantom.json").exists()
