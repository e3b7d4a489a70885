"""The `anomaseg` command. Thin: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise). Read once, when
# torch loads, so it is set here, before anything imports torch: on a machine shared with other
# work, spinning threads made a 2-thread training step 4.5x slower (benchmarks/bench_threads.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from anomaseg.errors import InputError  # noqa: E402
from anomaseg.parallel import WorkerError  # noqa: E402


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registered model name (see `anomaseg models`), default spatial_vae")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--image-size", type=int, help="model input size, a power of two >= 32 (default 128)")
    p.add_argument("--modality", help="modality or comma-separated modalities used as channels (default flair)")
    p.add_argument("--precision", choices=["auto", "bf16", "32", "16"],
                   help="auto = bf16 autocast where the CPU/GPU runs it fast, else fp32")
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="YAML preset (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.params.beta=4 (repeatable)")


def _overrides(args) -> dict:
    from anomaseg.config import merge, parse_set

    o: dict = {}
    pairs = [("model", ("model", "name")), ("epochs", ("train", "epochs")), ("batch_size", ("train", "batch_size")),
             ("lr", ("train", "lr")), ("image_size", ("data", "image_size")), ("precision", ("train", "precision")),
             ("seed", ("train", "seed"))]
    for attr, (section, key) in pairs:
        if getattr(args, attr, None) is not None:
            o.setdefault(section, {})[key] = getattr(args, attr)
    if getattr(args, "modality", None):
        o.setdefault("data", {})["modalities"] = [m.strip() for m in args.modality.split(",") if m.strip()]
    return merge(o, parse_set(args.set))


def cmd_phantom(args) -> int:
    from anomaseg.data.phantom import make_phantom

    out = make_phantom(args.out, args.healthy, args.lesioned, seed=args.seed, resolution=args.resolution,
                       progress=True)
    print(f"phantom written to {args.out}: {len(out['train'])} healthy cases in {Path(args.out) / 'train'}, "
          f"{len(out['test'])} lesioned cases in {Path(args.out) / 'test'}")
    return 0


def cmd_train(args) -> int:
    from anomaseg import config as cfg
    from anomaseg.run import RunPaths
    from anomaseg.scoring import calibrate
    from anomaseg.training import train

    overrides = _overrides(args)
    if args.resume and RunPaths(Path(args.out)).config.exists():
        config = cfg.resolve(RunPaths(Path(args.out)).config)
    else:
        if not args.data:
            raise InputError(None, "--data is required (a folder of healthy cases or a datalist .json)")
        config = cfg.resolve(args.config, overrides)
    if args.data:
        config.train_dir = str(Path(args.data).resolve())
    summary = train(config, args.out, resume=args.resume, epochs=args.epochs if args.resume else None)
    scorer = calibrate(args.out, force=True)
    print(f"trained {config.model.name}: best validation loss {summary['best_val_loss']:.4g}; "
          f"{scorer.predictor.name} threshold {scorer.post.threshold_:.4g} "
          f"(flags {config.score.healthy_fpr:.2%} of held-out healthy brain voxels); run in {args.out}")
    return 0


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
    rows = score_dataset(args.run, args.data, args.out, predictor=args.predictor,
                         predictor_params=_predictor_params(args), workers=_workers(args), onnx=args.onnx)
    print(f"wrote anomaly maps and segmentations of {len(rows)} cases to {args.out}")
    return 0


def cmd_export(args) -> int:
    from anomaseg.export import export_onnx

    meta = export_onnx(args.run, args.out, predictor=args.predictor,
                       params=_predictor_params(args).get(args.predictor, {}) if args.predictor else None)
    print(f"exported {meta.model['name']} with the {meta.predictor['name']} map to {args.out} (ONNX, float32; "
          f"threshold {meta.threshold:.4g} and the preprocessing in its 'anomaseg' metadata); "
          f"score with: anomaseg score --onnx {args.out} --data DATA --out MAPS")
    return 0


def cmd_evaluate(args) -> int:
    from anomaseg.evaluation import baseline_line, evaluate_dataset

    result = evaluate_dataset(args.run, args.data, args.out, predictors=args.predictor, save_maps=args.save_maps,
                              predictor_params=_predictor_params(args), baseline=not args.no_baseline,
                              workers=_workers(args))
    results = {result["predictor"]: result} if "per_case" in result else result
    for name, r in results.items():
        print(f"{name}: pixel AUROC {r['pixel_auroc']:.3f}, AUPRC {r['pixel_auprc']:.3f}, "
              f"best Dice {r['dice_best']:.3f}, Dice at threshold {r['dice_at_threshold']:.3f}, "
              f"image AUROC {r['image_auroc']:.3f}")
    for r in results.values():
        line = baseline_line(r)
        if line:
            print(line)
    print(f"metrics: {Path(args.out) / 'metrics.json' if len(results) == 1 else Path(args.out) / 'summary.json'}")
    print(f"report:  {Path(args.out) / 'report.html'}")
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


WORKERS_HELP = ("processes to split the cases over (default 1); the outputs are the same with any number; "
                "the machine's cores are divided between them, and on GPUs worker i uses GPU i mod count")
PREDICTOR_PARAMS_HELP = ("hyper-parameters of named predictors, e.g. '{projection: {steps: 50}, grad_kl: {sigma: 1}}' "
                         "(the run's default predictor takes --set score.predictor_params at training)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaseg", description="Unsupervised anomaly segmentation in medical images.")
    from anomaseg import __version__

    parser.add_argument("--version", action="version", version=f"anomaseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the built-in brain MR phantom (healthy train/ and lesioned test/ cases)")
    p.add_argument("--out", required=True)
    p.add_argument("--healthy", type=int, default=20)
    p.add_argument("--lesioned", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, choices=[1, 2], default=2, help="voxel size in mm")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("train", help="train a model on healthy cases")
    p.add_argument("--data", help="healthy training cases (folder or datalist .json)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="write anomaly maps and segmentations (NIfTI) for a dataset")
    p.add_argument("--run", help="run folder (or --onnx)")
    p.add_argument("--onnx", metavar="MODEL.onnx", help="score with a model exported by `anomaseg export` and "
                                                        "ONNX Runtime, without the run folder")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--predictor", help="predictor name (default: the run's, residual)")
    p.add_argument("--predictor-params", metavar="YAML", help=PREDICTOR_PARAMS_HELP)
    p.add_argument("--workers", type=int, default=1, help=WORKERS_HELP)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="metrics and an HTML report on a labelled test set")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--predictor", help="predictor name, comma-separated names, or 'all'")
    p.add_argument("--predictor-params", metavar="YAML", help=PREDICTOR_PARAMS_HELP)
    p.add_argument("--save-maps", action="store_true", help="also write the NIfTI maps and segmentations")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the intensity baseline (by default evaluated in the same pass and reported beside)")
    p.add_argument("--workers", type=int, default=1, help=WORKERS_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a run's model and anomaly map to ONNX (scoring without PyTorch)")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, metavar="MODEL.onnx")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--predictor", help="predictor whose map is exported (default: the run's; exportable: residual)")
    p.add_argument("--predictor-params", metavar="YAML", help=PREDICTOR_PARAMS_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="phantom -> train -> evaluate on built-in data, in minutes")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a much smaller run (for smoke tests)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"anomaseg: error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"anomaseg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("anomaseg: interrupted (a training run continues with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
