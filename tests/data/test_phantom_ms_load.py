"""Realistic MS lesion loads (lesion_load="ms"): counts, sizes, regions, contrast, determinism (2 mm)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy import stats

from anomaseg.cli import main
from anomaseg.data.phantom import make_phantom, make_subject
from anomaseg.data.phantom.ms_load import (DEEP_MM, JUXTACORTICAL_MM, N_LESIONS, PERIVENTRICULAR_MM, REGIONS,
                                           SIGMA_LN, VOLUME_ML, draw_volume_ml)

MODS = ("t1", "flair")


@pytest.fixture(scope="module")
def subjects():
    return [make_subject(i, True, seed=0, modalities=MODS, lesion_load="ms") for i in range(2)]


def components(s, labels=(1, 5)):
    """Connected lesions (26-connectivity) of the MS labels and their volumes in ml."""
    lab, n = ndi.label(np.isin(s.seg, labels), structure=np.ones((3, 3, 3)))
    voxel_ml = abs(np.linalg.det(s.affine[:3, :3])) / 1000.0
    return lab, n, np.bincount(lab.ravel())[1:] * voxel_ml


def voxel_of(s, centre_mm) -> tuple[int, ...]:
    return tuple(np.rint(np.linalg.solve(s.affine, np.append(centre_mm, 1.0))[:3]).astype(int))


def test_volume_distribution_is_truncated_log_normal():
    """ln(volume) follows scipy's truncated normal (KS test); the tail is long."""
    rng = np.random.default_rng(0)
    for median in sorted({m for _, m in REGIONS.values()}):
        v = np.array([draw_volume_ml(rng, median) for _ in range(4000)])
        assert v.min() >= VOLUME_ML[0] and v.max() <= VOLUME_ML[1]
        lo, hi = ((np.log(x) - np.log(median)) / SIGMA_LN for x in VOLUME_ML)
        law = stats.truncnorm(lo, hi, loc=np.log(median), scale=SIGMA_LN)
        assert stats.kstest(np.log(v), law.cdf).pvalue > 0.01
        assert stats.kstest(np.log(v) + 0.2, law.cdf).pvalue < 1e-6  # the test can tell a shifted law
        assert v.mean() > 1.3 * np.median(v) and (v >= 5 * median).mean() > 0.02  # long-tailed


def test_counts_and_labelled_sizes(subjects):
    for s in subjects:
        load = s.info["ms_load"]
        assert N_LESIONS[0] <= load["n_lesions"] <= N_LESIONS[1]
        assert len(load["lesions"]) == load["n_lesions"]
        assert "ms" in s.info["families"]
        _, n, vols = components(s)
        # chance contacts and confluent blobs merge a few lesions, none is lost
        assert 15 <= n <= load["n_lesions"]
        assert np.median(vols) < 0.1  # most lesions are small
        assert vols.max() > 0.2  # ... and some are not
        # a lone blob's labelled volume is its drawn volume (2 mm voxels: within the quantisation)
        lab, _, _ = components(s)
        for lesion in load["lesions"]:
            if lesion["blobs"] == 1 and lesion["volume_ml"] >= 0.1:
                k = lab[voxel_of(s, lesion["centre_mm"])]
                if k and sum(lab[voxel_of(s, o["centre_mm"])] == k for o in load["lesions"]) == 1:
                    assert 0.5 < vols[k - 1] / lesion["volume_ml"] < 1.5, lesion
    regions = [lesion["region"] for s in subjects for lesion in s.info["ms_load"]["lesions"]]
    assert set(regions) == set(REGIONS)
    assert any(lesion["blobs"] > 1 for s in subjects for lesion in s.info["ms_load"]["lesions"])


def test_lesions_lie_where_their_region_says(subjects):
    """Checked on the subject's own (deformed) tissue maps, not the template's distance maps."""
    for s in subjects:
        csf, gm, wm = s.tissue
        vox = float(np.sqrt((s.affine[:3, :3] ** 2).sum(0)).mean())
        to_csf = ndi.distance_transform_edt(csf <= 0.5, sampling=vox)
        to_gm = ndi.distance_transform_edt(gm <= 0.5, sampling=vox)
        slack = 2.5  # mm: the deformation moves the template's distances a little
        for lesion in s.info["ms_load"]["lesions"]:
            c = voxel_of(s, lesion["centre_mm"])
            assert wm[c] > 0.5 and s.seg[c] in (1, 5), lesion
            if lesion["region"] == "periventricular":
                assert to_csf[c] <= PERIVENTRICULAR_MM + slack, lesion
            elif lesion["region"] == "juxtacortical":
                assert to_gm[c] <= JUXTACORTICAL_MM + slack, lesion
            else:  # (grey matter here includes the deep nuclei, which deep lesions may border)
                assert to_csf[c] >= DEEP_MM - slack, lesion


def test_flair_bright_and_t1_dark_inside_the_labels(subjects):
    for s in subjects:
        lab, n, _ = components(s, labels=(1,))
        wm_clean = (s.tissue[2] > 0.9) & (s.seg == 0)
        brighter = []
        for k in range(1, n + 1):
            lesion = lab == k
            shell = ndi.binary_dilation(lesion, iterations=2) & wm_clean
            if shell.sum() < 5:
                continue
            brighter.append(s.images["flair"][lesion].mean() > s.images["flair"][shell].mean())
            assert s.images["t1"][lesion].mean() < 1.05 * s.images["t1"][shell].mean()  # hypo- or iso-intense
        assert len(brighter) >= 10 and np.mean(brighter) >= 0.9
        inside, around = s.images["flair"][s.seg == 1].mean(), s.images["flair"][wm_clean].mean()
        assert inside > 1.2 * around


def test_black_holes_are_part_of_the_load():
    s = make_subject(0, True, seed=0, modalities=MODS, realism="black_holes", lesion_load="ms")
    lesions = s.info["ms_load"]["lesions"]
    holes = [lesion for lesion in lesions if lesion["black_hole"]]
    assert 0 < len(holes) < len(lesions)
    assert (s.seg == 5).any() and (s.seg == 1).any()
    assert s.images["t1"][s.seg == 5].mean() < s.images["t1"][s.seg == 1].mean()


def test_deterministic_per_seed_and_opt_in(subjects):
    again = make_subject(0, True, seed=0, modalities=MODS, lesion_load="ms")
    assert np.array_equal(again.seg, subjects[0].seg)
    assert np.array_equal(again.images["flair"], subjects[0].images["flair"])
    assert again.info["ms_load"] == subjects[0].info["ms_load"]
    other = make_subject(0, True, seed=1, modalities=MODS, lesion_load="ms")
    assert not np.array_equal(other.seg, subjects[0].seg)
    default = make_subject(0, True, seed=0, modalities=MODS)
    assert "ms_load" not in default.info
    assert np.array_equal(make_subject(0, True, seed=0, modalities=MODS, lesion_load="default").seg, default.seg)
    # healthy (training) subjects are the default ones whatever the lesion load
    healthy = [make_subject(0, False, seed=0, modalities=("flair",), lesion_load=load) for load in ("ms", "default")]
    assert np.array_equal(healthy[0].images["flair"], healthy[1].images["flair"])
    with pytest.raises(ValueError, match="lesion load"):
        make_subject(0, True, lesion_load="many")


def test_phantom_and_cli_write_the_load(tmp_path):
    assert main(["phantom", "--out", str(tmp_path / "p"), "--healthy", "0", "--lesioned", "1",
                 "--lesions", "ms"]) == 0
    meta = json.loads((tmp_path / "p" / "phantom.json").read_text())
    assert meta["lesion_load"] == "ms"
    assert len(meta["cases"]["lesioned_000"]["ms_load"]["lesions"]) >= N_LESIONS[0]
    make_phantom(tmp_path / "d", 0, 0)  # the default writes no lesion_load entry (phantom.json unchanged)
    assert "lesion_load" not in json.loads((tmp_path / "d" / "phantom.json").read_text())
    with pytest.raises(SystemExit) as exc:
        main(["phantom", "--out", str(tmp_path / "q"), "--lesions", "many"])
    assert exc.value.code == 2
