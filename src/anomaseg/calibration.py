"""Calibration of a run's scorer: predictor and threshold fitted on the run's held-out healthy cases
(never on test data), stored in RUN/calibration.json and read back while the checkpoint, predictor
and post-processing settings are the same.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from anomaseg import config as cfg
from anomaseg.atomic import write_text
from anomaseg.data.layout import find_cases
from anomaseg.data.slices import CaseCache, prepare_cases
from anomaseg.errors import InputError
from anomaseg.faults import kill_point
from anomaseg.predictors.base import Predictor, create_predictor, list_predictors
from anomaseg.run import RunPaths, checkpoint_stamp, load_model, load_split
from anomaseg.runtime import default_device
from anomaseg.scorer import Scorer, make_postprocessor, predictor_key, vars_of


def calibrate(run_dir: str | Path, predictor: str | None = None, params: dict | None = None,
              progress: bool = True, force: bool = False, device: str | None = None,
              score: dict | None = None) -> Scorer:
    """A fitted Scorer for a run: read from RUN/calibration.json (if it was fitted for the same
    checkpoint, predictor and post-processing), or fitted on the run's held-out healthy cases and
    stored there. `score`: post-processing settings that replace the run's (`score` section keys,
    e.g. {"calibration": "fp_lesions"}); such a scorer is stored under its own entry, so one run
    can be evaluated under several post-processing rules."""
    model, config = load_model(run_dir)
    if score:
        config.score = with_score_overrides(config.score, score)
    name = predictor or config.score.predictor
    params = dict(config.score.predictor_params if predictor is None else (params or {}))
    key = predictor_key(name, params) + (" | " + predictor_key("score", score) if score else "")
    paths = RunPaths(Path(run_dir))
    store = read_calibration(paths.calibration)
    post_settings = make_postprocessor(config.score)
    pred = _predictor(name, params, config)
    if not pred.supports(model):
        raise InputError(paths.root, f"predictor {name!r} needs a model with {', '.join(pred.requires)}; "
                                     f"{config.model.name} has not")
    # a patch run's model sees windows; a predictor that ignores the model (the intensity baseline) sees
    # whole slices, so the baseline is the same as beside a whole-slice run of the same image size
    patch = config.data.patch_size if pred.requires else 0
    scorer = Scorer(model, pred, post_settings, config.score.batch_size, device=device or default_device(),
                    precision=config.train.precision, patch_size=patch)
    entry = store.get(key)
    stamp = checkpoint_stamp(run_dir)
    if entry and not force and entry.get("postprocess") == vars_of(post_settings) and entry.get("checkpoint") == stamp:
        try:  # an entry of another anomaseg version may not load: it is then fitted again
            pred.load_fitted_state(entry["predictor_state"])
            scorer.post.threshold_ = float(entry["threshold"])
            scorer.post.load_fitted_state(entry.get("postprocess_fitted", {}))
            return scorer
        except (KeyError, TypeError, ValueError, AttributeError):
            pred = _predictor(name, params, config)
            scorer.predictor = pred

    split = load_split(run_dir)
    ids = split["val"] or split["train"]
    if not split["val"]:
        print("warning: the run held out no healthy cases; calibrating on training cases (threshold biased low)")
    try:
        cases = [c for c in find_cases(config.train_dir, config.data.modalities, bids=config.data.bids_query())
                 if c.case_id in set(ids)]
    except InputError as exc:
        raise InputError(paths.calibration, f"has no calibration of {key} for this checkpoint, and it cannot be "
                                            f"fitted: the run's healthy training data is unusable ({exc})") from None
    prepared = prepare_cases(cases, config.data.slice_spec(), CaseCache.at(config.data.cache_dir), progress,
                             "preparing calibration cases")
    scorer.fit(prepared, progress)
    kill_point("calibration")
    store[key] = {"predictor": name, "params": params, "checkpoint": stamp, "predictor_state": pred.fitted_state(),
                  "postprocess": vars_of(post_settings), "threshold": scorer.post.threshold_,
                  "postprocess_fitted": scorer.post.fitted_state(),
                  "healthy_fpr": config.score.healthy_fpr, "calibration_cases": ids,
                  "n_calibration_voxels": scorer.post.n_calibration_voxels_}
    write_text(paths.calibration, json.dumps(store, indent=1))
    return scorer


def with_score_overrides(score: cfg.ScoreConfig, overrides: dict) -> cfg.ScoreConfig:
    """`score` with the post-processing keys of `overrides` replaced (checked like a config file's)."""
    allowed = {f.name for f in dataclasses.fields(cfg.ScoreConfig)} - {"predictor", "predictor_params", "batch_size"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise InputError(None, f"post-processing override(s) {', '.join(unknown)} unknown; known: {', '.join(sorted(allowed))}")
    d = {**score.__dict__, **overrides}
    return cfg.RunConfig.from_dict({"score": d}).score


def _predictor(name: str, params: dict, config: cfg.RunConfig) -> Predictor:
    try:
        return create_predictor(name, **params).set_modalities(config.data.modalities)
    except (KeyError, TypeError, ValueError) as exc:  # an unknown name or parameter
        raise InputError(None, exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)) from None


def read_calibration(path: Path) -> dict:
    """RUN/calibration.json ({} when absent). A damaged file is an error, never silently replaced."""
    if not path.exists():
        return {}
    try:
        store = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"calibration file is damaged ({exc}); delete it and it is fitted again on the "
                               "run's held-out healthy cases") from None
    if not isinstance(store, dict) or not all(isinstance(v, dict) for v in store.values()):
        raise InputError(path, "calibration file is not a map of predictor entries (another version of anomaseg?); "
                               "delete it and it is fitted again on the run's held-out healthy cases")
    return store


def resolve_predictors(run_dir: str | Path, names: str | None) -> list[str]:
    """'residual' / 'residual,grad_kl' / 'all' (every predictor the run's model supports)."""
    if not names:
        return [None]  # the run's configured predictor
    model, _ = load_model(run_dir)
    if names == "all":
        return [n for n in list_predictors() if create_predictor(n).supports(model)]
    out = [n.strip() for n in names.split(",") if n.strip()]
    for n in out:
        if n not in list_predictors():
            raise InputError(None, f"unknown predictor {n!r}; available: {', '.join(list_predictors())}, all")
    return out
