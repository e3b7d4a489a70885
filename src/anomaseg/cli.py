"""The `anomaseg` command. Thin: parses arguments and calls the library."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

from anomaseg.cli_parser import build_parser
from anomaseg.errors import InputError, InputWarning, Stopped, one_line
from anomaseg.parallel import WorkerError


def _command_threads(args):
    """The command's --threads (None: auto) for everything it runs (`anomaseg.threads`)."""
    from anomaseg import threads

    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise InputError(None, f"--threads must be >= 1, got {args.threads}")
    return threads.pinned(getattr(args, "threads", None))


def _start_threads() -> None:
    """The thread policy at the start of a command that does not train (training adapts its own)."""
    from anomaseg import threads

    threads.start(log=lambda line: print(line, file=sys.stderr))


def _bids_query(args):
    from anomaseg.data.bids import BidsQuery

    return BidsQuery(tuple(args.derivatives), tuple(args.select))


def _overrides(args) -> dict:
    from anomaseg.config import merge, parse_set

    o: dict = {}
    pairs = [("model", ("model", "name")), ("epochs", ("train", "epochs")), ("batch_size", ("train", "batch_size")),
             ("lr", ("train", "lr")), ("image_size", ("data", "image_size")), ("precision", ("train", "precision")),
             ("seed", ("train", "seed")), ("devices", ("train", "devices")), ("num_nodes", ("train", "num_nodes")),
             ("strategy", ("train", "strategy")), ("accelerator", ("train", "accelerator")),
             ("threads", ("train", "threads"))]
    for attr, (section, key) in pairs:
        if getattr(args, attr, None) is not None:
            o.setdefault(section, {})[key] = getattr(args, attr)
    if getattr(args, "modality", None):
        o.setdefault("data", {})["modalities"] = [m.strip() for m in args.modality.split(",") if m.strip()]
    if getattr(args, "derivatives", None):
        o.setdefault("data", {})["bids_derivatives"] = list(args.derivatives)
    if getattr(args, "select", None):
        o.setdefault("data", {})["bids_select"] = list(args.select)
    return merge(o, parse_set(args.set))


def cmd_phantom(args) -> int:
    from anomaseg.data.phantom import make_phantom, realism_features

    try:
        realism = realism_features(args.realistic or False)
    except ValueError as exc:
        raise InputError(None, f"--realistic: {exc}") from None
    out = make_phantom(args.out, args.healthy, args.lesioned, seed=args.seed, resolution=args.resolution,
                       progress=True, realism=realism, lesion_load=args.lesions)
    print(f"phantom written to {args.out}: {len(out['train'])} healthy cases in {Path(args.out) / 'train'}, "
          f"{len(out['test'])} lesioned cases in {Path(args.out) / 'test'}")
    return 0


def cmd_train(args) -> int:
    from anomaseg import config as cfg
    from anomaseg.run import RunPaths
    from anomaseg.training import LAUNCH_KEYS, train_and_calibrate

    overrides = _overrides(args)
    saved = RunPaths(Path(args.out)).config
    if args.resume and saved.exists():
        config = cfg.resolve(saved)
        if args.data:  # the whole command again (a requeued job): it must describe the run in the folder
            asked = cfg.resolve(args.config, overrides)
            asked.train_dir = str(Path(args.data).resolve())
            differ = _run_differences(config, asked)
            if differ:
                raise InputError(saved, f"the run folder holds another run (its config differs in "
                                        f"{', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}); "
                                        "choose another --out, or resume with --out RUN --resume alone")
        if args.epochs is not None and args.epochs < 1:
            raise InputError(None, f"--epochs must be >= 1, got {args.epochs}")
    else:
        if not args.data:
            raise InputError(None, "--data is required (a folder of healthy cases or a datalist .json)")
        config = cfg.resolve(args.config, overrides)
    if args.data:
        config.train_dir = str(Path(args.data).resolve())
    cfg.check_model_and_predictor(config)
    _check_precision(config.train.precision)
    launch = {k: getattr(args, k) for k in LAUNCH_KEYS} if args.resume else None  # may change on resume
    summary, scorer = train_and_calibrate(config, args.out, resume=args.resume,
                                          epochs=args.epochs if args.resume else None, launch=launch)
    if scorer is None:  # the other training processes of a multi-process run end here
        return 0
    if config.score.calibration == "fp_lesions":
        rule = (f"with lesions of >= {scorer.post.min_lesion_ml_:g} ml: {scorer.post.healthy_fp_lesions_:.2f} "
                f"false-positive lesions per held-out healthy case")
    elif config.score.calibration == "hysteresis":
        rule = (f"components kept where they exceed {scorer.post.peak_threshold_:.4g}: "
                f"{scorer.post.healthy_fp_lesions_:.2f} false-positive lesions per held-out healthy case")
    else:
        rule = f"flags {config.score.healthy_fpr:.2%} of held-out healthy brain voxels"
    print(f"trained {config.model.name}: best validation loss {summary['best_val_loss']:.4g}; "
          f"{scorer.predictor.name} threshold {scorer.post.threshold_:.4g} ({rule}); run in {args.out}")
    return 0


def _run_differences(saved, asked) -> list[str]:
    """Config keys (dotted) in which two runs differ, but for those a resume may change: the number
    of epochs (extends the run) and how it is launched (processes, devices)."""
    from anomaseg.training import LAUNCH_KEYS

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v and prefix.count(".") < 1:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    ignored = {"train.epochs", *(f"train.{k}" for k in LAUNCH_KEYS)}
    a, b = dict(flat(saved.to_dict())), dict(flat(asked.to_dict()))
    return [k for k in sorted(a.keys() | b.keys()) if k not in ignored and _plain(a.get(k)) != _plain(b.get(k))]


def _plain(value):
    """A config value as YAML gives it back (tuples are lists), for comparison."""
    import json

    return json.loads(json.dumps(value, default=str))


def _check_precision(precision: str) -> None:
    from anomaseg.runtime import fabric_precision

    try:
        fabric_precision(precision)
    except ValueError as exc:
        raise InputError(None, f"--precision: {exc}") from None


def _predictor_params(args) -> dict:
    """--predictor-params '{name: {param: value}}' (YAML/JSON), checked by building each predictor."""
    import yaml

    from anomaseg.predictors import create_predictor

    if not getattr(args, "predictor_params", None):
        return {}
    try:
        params = yaml.safe_load(args.predictor_params)
    except yaml.YAMLError:
        params = None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise InputError(None, "--predictor-params expects a mapping {predictor: {param: value}}, "
                               f"got {args.predictor_params!r}")
    for name, p in params.items():
        try:
            create_predictor(name, **p)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(None, f"--predictor-params: {exc}") from None
    return params


def _workers(args) -> int:
    if args.workers < 1:
        raise InputError(None, f"--workers must be >= 1, got {args.workers}")
    return args.workers


def cmd_score(args) -> int:
    from anomaseg.scoring import score_dataset

    if (args.run is None) == (args.onnx is None):
        raise InputError(None, "score needs exactly one of --run RUN or --onnx MODEL.onnx")
    if args.onnx and (args.predictor or args.predictor_params):
        raise InputError(None, "--onnx scores with the predictor exported into the file; drop --predictor")
    out = args.out
    _start_threads()
    rows = score_dataset(args.run, args.data, out, predictor=args.predictor,
                         predictor_params=_predictor_params(args), workers=_workers(args), onnx=args.onnx,
                         bids=_bids_query(args), qa=args.qa, shard=_shard(args))
    print(f"wrote anomaly maps and segmentations of {len(rows)} cases to {out}")
    return 0


def _shard(args) -> tuple[int, int] | None:
    from anomaseg.shards import parse_shard

    return None if args.shard is None else parse_shard(args.shard)


def _default_score_out(data: str) -> str:
    """score's --out for BIDS data: DATA/derivatives/anomaseg."""
    from anomaseg.data.bids import PIPELINE, is_bids_root

    if not is_bids_root(data):
        raise InputError(None, "--out is required (it defaults to DATA/derivatives/anomaseg for BIDS data only)")
    return str(Path(data) / "derivatives" / PIPELINE)


def cmd_export(args) -> int:
    from anomaseg.export import export_onnx

    meta = export_onnx(args.run, args.out, predictor=args.predictor,
                       params=_predictor_params(args).get(args.predictor, {}) if args.predictor else None)
    print(f"exported {meta.model['name']} with the {meta.predictor['name']} map to {args.out} (ONNX, float32; "
          f"threshold {meta.threshold:.4g} and the preprocessing in its 'anomaseg' metadata); "
          f"score with: anomaseg score --onnx {args.out} --data DATA --out MAPS")
    return 0


def cmd_evaluate(args) -> int:
    from anomaseg.evaluation import baseline_line, evaluate_dataset, lesion_summary

    _start_threads()
    result = evaluate_dataset(args.run, args.data, args.out, predictors=args.predictor, save_maps=args.save_maps,
                              predictor_params=_predictor_params(args), baseline=not args.no_baseline,
                              workers=_workers(args), bids=_bids_query(args), qa=args.qa, shard=_shard(args))
    results = {result["predictor"]: result} if "per_case" in result else result
    lines = dict(results)
    if len(results) == 1 and result.get("baseline"):  # the baseline ran in the same pass: its line first
        lines = {f"{result['baseline']['predictor']} (baseline)": result["baseline"], **results}
    for name, r in lines.items():
        print(f"{name}: pixel AUROC {r['pixel_auroc']:.3f}, AUPRC {r['pixel_auprc']:.3f}, "
              f"best Dice {r['dice_best']:.3f}, Dice at threshold {r['dice_at_threshold']:.3f}, "
              f"image AUROC {r['image_auroc']:.3f}, {lesion_summary(r)}")
    for r in results.values():
        line = baseline_line(r)
        if line:
            print(line)
    print(f"metrics: {Path(args.out) / 'metrics.json' if len(results) == 1 else Path(args.out) / 'summary.json'}")
    print(f"report:  {Path(args.out) / 'report.html'}")
    return 0


def cmd_merge(args) -> int:
    from anomaseg.evaluation import baseline_line
    from anomaseg.merge import merge_evaluations

    result = merge_evaluations(args.shards, args.out)
    results = {result["predictor"]: result} if "per_case" in result else result
    first = next(iter(results.values()))
    print(f"merged {len(args.shards)} shards ({first['n_cases']} cases) into {args.out}: "
          f"{'metrics.json' if len(results) == 1 else 'summary.json'} and report.html")
    for r in results.values():
        print(f"{r['predictor']}: pixel AUROC {r['pixel_auroc']:.3f}, AUPRC {r['pixel_auprc']:.3f}, "
              f"best Dice {r['dice_best']:.3f}" + (f"; {baseline_line(r)}" if baseline_line(r) else ""))
    return 0


def cmd_bids(args) -> int:
    from anomaseg.bids_app import GROUP, run_group, run_participant
    from anomaseg.data.bids import BidsQuery

    query = BidsQuery(tuple(args.derivatives), tuple(args.select), tuple(args.participant_label or ()),
                      tuple(args.session_label or ()))
    _start_threads()
    if args.analysis_level == "participant":
        rows = run_participant(args.bids_dir, args.output_dir, args.run, query, args.predictor, _workers(args))
        print(f"participant level: anomaly maps and segmentations of {len(rows)} cases in {args.output_dir}")
        return 0
    result = run_group(args.bids_dir, args.output_dir, args.run, query, args.predictor, _workers(args))
    group = Path(args.output_dir) / GROUP
    print(f"group level: cohort table {group / 'cohort.tsv'}")
    if result is None:
        print("no lesion labels for these participants: no evaluation")
    else:
        print(f"evaluation on the labelled cases: {group / 'evaluation' / 'report.html'} (pixel AUPRC "
              f"{result['pixel_auprc']:.3f}, best Dice {result['dice_best']:.3f})")
    return 0


def cmd_preprocess(args) -> int:
    from anomaseg.preprocess import PreprocessConfig, preprocess_dataset

    modalities = [m.strip() for m in (args.modality or "").split(",") if m.strip()]
    try:
        config = PreprocessConfig(reference=args.reference or (modalities[0] if modalities else "flair"),
                                  spacing=args.spacing, n4=not args.no_n4, coregistration=args.coregistration,
                                  mni=args.mni, iterations=args.iterations)
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    rows = preprocess_dataset(args.data, args.out, config, workers=args.workers, bids=_bids_query(args),
                              modalities=modalities or None)
    done = sum(r["status"] == "done" for r in rows)
    print(f"preprocessed {len(rows)} cases into {args.out} ({done} done, {len(rows) - done} skipped: already "
          f"finished); per-case logs beside the volumes")
    return 0


def cmd_qa_fit(args) -> int:
    import dataclasses

    from anomaseg.config import merge, parse_set
    from anomaseg.quality.assessor import QualityConfig, fit_quality

    values = dataclasses.asdict(QualityConfig())
    if args.variant:
        values["variants"] = ["difference", "image", "both"] if args.variant == "all" else [args.variant]
    if args.modality:
        values["modalities"] = [m.strip() for m in args.modality.split(",") if m.strip()]
    for key, attr in (("image_size", "image_size"), ("pool_size", "pool_size"), ("rec_epochs", "epochs"),
                      ("reg_epochs", "epochs"), ("batch_size", "batch_size"), ("seed", "seed"),
                      ("precision", "precision")):
        if getattr(args, attr) is not None:
            values[key] = getattr(args, attr)
    if args.unet_pool:
        values["unet_pool"] = True
    try:
        config = QualityConfig(**merge(values, parse_set(args.set)))
    except (TypeError, ValueError) as exc:
        raise InputError(None, f"qa fit: {exc}") from None
    qa = fit_quality(args.data, args.out, config, segmentations=args.segmentations or [], resume=args.resume)
    pool, split = qa.meta["pool"], qa.meta["split"]
    print(f"fitted QA model ({', '.join(qa.regs)}) on a pool of {pool['candidates']} candidate segmentations "
          f"(mean Dice {pool['mean_dice']:.2f}) of {len(split['train'])} training and {len(split['val'])} "
          f"validation cases; in {args.out}")
    return 0


def cmd_qa_predict(args) -> int:
    from anomaseg.quality.assessor import predict_folders

    _start_threads()
    rows = predict_folders(args.qa, args.data, args.segmentations, args.out, variant=args.variant)
    low = sum(r["predicted_dice"] < 0.5 for r in rows)
    print(f"predicted the Dice of {len(rows)} segmentations ({low} below 0.5): "
          f"{Path(args.out) / 'predictions.csv'}")
    return 0


def cmd_demo(args) -> int:
    from anomaseg.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def cmd_models(args) -> int:
    from anomaseg.models import create_model, list_models, model_entry

    rows = []
    for name in list_models():
        model = create_model(name, image_size=128)
        n = sum(p.numel() for p in model.parameters())
        rows.append((name, f"{n / 1e6:.2f}M", model_entry(name).description))
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  params@128px  description")
    for name, n, desc in rows:
        print(f"{name:<{width}}  {n:>12}  {desc}")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, InputWarning):
        print(f"anomaseg: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning

COMMANDS = {"phantom": cmd_phantom, "train": cmd_train, "score": cmd_score, "evaluate": cmd_evaluate, "bids": cmd_bids,
            "merge": cmd_merge, "export": cmd_export, "preprocess": cmd_preprocess, "qa fit": cmd_qa_fit,
            "qa predict": cmd_qa_predict, "demo": cmd_demo, "models": cmd_models}

# Commands that write one output (a folder, or the run folder for train): they hold its lock from
# start to end, so a second command on the same --out stops at once rather than after its work.
LOCKED_COMMANDS = ("train", "score", "evaluate", "merge")


def main(argv: list[str] | None = None) -> int:
    from anomaseg.atomic import output_lock

    args = build_parser().parse_args(argv)
    try:
        if args.command == "score" and args.out is None:
            args.out = _default_score_out(args.data)
        from anomaseg.distributed import started_by_launcher

        locked = args.command in LOCKED_COMMANDS and not started_by_launcher()
        lock = output_lock(args.out) if locked else contextlib.nullcontext()
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            warnings.simplefilter("default", InputWarning)
            with lock, _command_threads(args):
                return COMMANDS[" ".join(filter(None, (args.command, getattr(args, "qa_command", None))))](args)
    except InputError as exc:
        print(f"anomaseg: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment: a full disk, a read-only folder, a file in the way
        if os.environ.get("ANOMASEG_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"anomaseg: error: {where}{one_line(exc.strerror or str(exc))} (outputs are written whole or "
              "not at all: nothing was left half-written)", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"anomaseg: error: {exc}", file=sys.stderr)
        return 1
    except Stopped as exc:  # a scheduler's SIGTERM / SIGUSR1: checkpoint written (see README, requeue)
        print(f"anomaseg: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("anomaseg: interrupted (a training run continues with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
