"""U-Net candidates for REG-Net's pool: real segmenters of varied quality, never fitted on the case they segment."""

import numpy as np

from anomaseg.data.cases import Case
from anomaseg.data.io import load_volume
from anomaseg.data.layout import find_cases
from anomaseg.data.slices import SliceSpec, prepare_case
from anomaseg.metrics import dice_score
from anomaseg.quality.candidates import find_candidates
from anomaseg.quality.segmenters import (UNetSpec, balanced_candidates, unet_candidates, write_candidates)
from conftest import write_dataset


def _prepared(tmp_path, n=4):
    data = write_dataset(tmp_path / "labelled", n, lesioned=True, seed=5)
    cases = find_cases(data, ["flair"], require_seg=True)
    return cases, [prepare_case(c, SliceSpec(("flair",), 32)) for c in cases]


def test_unet_candidates_have_varied_dice_and_are_readable(tmp_path):
    cases, prepared = _prepared(tmp_path)
    specs = (UNetSpec(2, 2, 1), UNetSpec(2, 8, 12))
    out = unet_candidates(prepared, specs=specs, thresholds=(0.3, 0.5, 0.7), folds=2, seed=0)
    assert set(out) == {c.case_id for c in cases}
    dices = {}
    for p in prepared:
        assert [s for s, _ in out[p.case_id]] == [f"unet_d2_w{w}_e{e}_p{t}" for w, e in ((2, 1), (8, 12))
                                                  for t in ("0.3", "0.5", "0.7")]
        for source, seg in out[p.case_id]:
            assert seg.shape == p.truth.shape and not (seg & ~p.brain).any()
            dices.setdefault(source.split("_p")[0], []).append(dice_score(seg, p.truth))
    best = {net: np.max(np.reshape(d, (len(prepared), 3)), axis=1) for net, d in dices.items()}
    # the longer-trained, wider net finds the held-out subjects' lesions; the one-epoch net with 2
    # channels hardly does (and at p 0.3 both flag much of the brain): a wide spread of quality
    assert best["unet_d2_w8_e12"].mean() > best["unet_d2_w2_e1"].mean() + 0.1
    assert best["unet_d2_w8_e12"].max() > 0.3
    assert np.ptp(np.concatenate(list(dices.values()))) > 0.25
    chosen = balanced_candidates(prepared[0].truth, out[prepared[0].case_id], 3, np.random.default_rng(0))
    assert len(chosen) == 3 and len({round(d, 1) for _, _, d in chosen}) >= 2

    refs = {p.case_id: load_volume(p.reference, header_only=True) for p in prepared}
    folders = write_candidates(out, refs, tmp_path / "candidates")
    assert len(folders) == 6
    found = find_candidates(folders[-1], [c.case_id for c in cases])
    cid = prepared[1].case_id
    np.testing.assert_array_equal(found[cid].load(refs[cid]), dict(out[cid])[folders[-1].name])


def test_unet_candidates_of_new_cases_come_from_networks_fitted_on_the_others(tmp_path):
    _, prepared = _prepared(tmp_path, n=3)
    out = unet_candidates(prepared[:2], specs=(UNetSpec(2, 2, 1),), thresholds=(0.5,), predict=prepared[2:])
    assert list(out) == [prepared[2].case_id] and len(out[prepared[2].case_id]) == 1
