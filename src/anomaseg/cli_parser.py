"""The `anomaseg` command line: its subcommands, options and help (`cli` runs them)."""

from __future__ import annotations

import argparse


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registered model name (see `anomaseg models`), default spatial_vae")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--image-size", type=int, help="model input size, a power of two >= 32 (default 64)")
    p.add_argument("--modality", help="modality or comma-separated modalities used as channels (default flair)")
    p.add_argument("--precision", choices=["auto", "bf16", "32", "16"],
                   help="auto = bf16 autocast where the CPU/GPU runs it fast, else fp32")
    p.add_argument("--seed", type=int)
    p.add_argument("--devices", type=int, help="training processes per machine (devices: CPU processes or GPUs), "
                                               "default 1; --batch-size is the global batch")
    p.add_argument("--num-nodes", type=int, help="machines (with torchrun or SLURM, see the README), default 1")
    p.add_argument("--strategy", choices=["auto", "ddp"], help="auto: one process, or ddp for several")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu", "cuda", "mps"], help="default auto")
    _add_threads_option(p)
    p.add_argument("--config", help="YAML preset (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.params.beta=4 (repeatable)")


THREADS_HELP = ("CPU threads, pinned (default: the CPUs this process may use that other work leaves free, "
                "adapted while it runs; pin it for bit-identical reruns)")


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)


def _add_bids_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--derivatives", action="append", default=[], metavar="NAME",
                   help="BIDS data: pipeline under derivatives/ (or a path) holding brain masks and lesion "
                        "labels (repeatable; default: every pipeline)")
    p.add_argument("--select", action="append", default=[], metavar="COLUMN=VALUE",
                   help="BIDS data: participants.tsv condition, e.g. group=control (repeatable; "
                        "group=a,b for either value)")


WORKERS_HELP = ("processes to split the cases over (default 1); the outputs are the same with any number; "
                "the machine's cores are divided between them, and on GPUs worker i uses GPU i mod count")
SHARD_HELP = ("only shard I of N (0 <= I < N) of the cases, sorted by case id (every N-th from the I-th), e.g. "
              "for array jobs; 'slurm': from SLURM_ARRAY_TASK_ID / _MIN / _STEP and SLURM_ARRAY_TASK_COUNT")
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
    p.add_argument("--realistic", nargs="?", const="all", metavar="FEATURES",
                   help="add FLAIR's normal hyperintensities (unlabelled) and lesions that are not the brightest "
                        "tissue: every feature, or a comma-separated subset (see README, `anomaseg phantom`)")
    p.add_argument("--lesions", choices=["default", "ms"], default="default",
                   help="ms: every lesioned case carries a realistic MS lesion load (20-50 mostly 0.01-0.5 ml "
                        "periventricular, juxtacortical and deep white-matter lesions, some confluent)")

    p = sub.add_parser("train", help="train a model on healthy cases")
    p.add_argument("--data", help="healthy training cases (folder or datalist .json)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint; with --data, the same command starts "
                        "the run when it has none yet (requeued jobs) and refuses another run's folder")
    _add_train_options(p)
    _add_bids_options(p)

    p = sub.add_parser("score", help="write anomaly maps and segmentations (NIfTI) for a dataset")
    p.add_argument("--run", help="run folder (or --onnx)")
    p.add_argument("--onnx", metavar="MODEL.onnx", help="score with a model exported by `anomaseg export` and "
                                                        "ONNX Runtime, without the run folder")
    p.add_argument("--data", required=True)
    p.add_argument("--out", help="output folder (BIDS data: default DATA/derivatives/anomaseg, a BIDS-derivatives dataset)")
    _add_bids_options(p)
    p.add_argument("--predictor", help="predictor name (default: the run's; without a config, grad_elbo for small-beta VAEs, else residual)")
    p.add_argument("--predictor-params", metavar="YAML", help=PREDICTOR_PARAMS_HELP)
    p.add_argument("--workers", type=int, default=1, help=WORKERS_HELP)
    p.add_argument("--qa", metavar="QA", help="QA model (`anomaseg qa fit`): add each segmentation's predicted Dice")
    _add_threads_option(p)
    p.add_argument("--shard", metavar="I/N", help=SHARD_HELP)

    p = sub.add_parser("evaluate", help="metrics and an HTML report on a labelled test set")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--predictor", help="predictor name, comma-separated names, or 'all'")
    p.add_argument("--predictor-params", metavar="YAML", help=PREDICTOR_PARAMS_HELP)
    p.add_argument("--save-maps", action="store_true",
                   help="also write the NIfTI maps and segmentations (BIDS data: as a BIDS-derivatives dataset in OUT/maps)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the intensity baseline (by default evaluated in the same pass and reported beside)")
    p.add_argument("--workers", type=int, default=1, help=WORKERS_HELP)
    _add_bids_options(p)
    p.add_argument("--qa", metavar="QA", help="QA model (`anomaseg qa fit`): add each segmentation's predicted Dice "
                                              "next to its true Dice")
    _add_threads_option(p)
    p.add_argument("--shard", metavar="I/N", help=SHARD_HELP + "; `anomaseg merge` combines the shards' outputs")

    p = sub.add_parser("bids", help="the BIDS-Apps command line: score participants into a BIDS-derivatives "
                                    "dataset, then evaluate the cohort",
                       description="BIDS App (https://bids-apps.neuroimaging.io): `participant` scores the named "
                                   "participants of BIDS_DIR into OUTPUT_DIR, a BIDS-derivatives dataset (participant "
                                   "jobs may run in parallel into one OUTPUT_DIR); `group` writes OUTPUT_DIR/group: "
                                   "cohort.tsv and, where lesion labels exist, the evaluation and its report. "
                                   "Exit code 0 on success, 2 on bad input, 1 on other failures.")
    p.add_argument("bids_dir", help="the BIDS dataset (read only)")
    p.add_argument("output_dir", help="the derivatives dataset to write, e.g. BIDS_DIR/derivatives/anomaseg")
    p.add_argument("analysis_level", choices=["participant", "group"], help="participant: score; group: cohort "
                                                                            "table and evaluation")
    p.add_argument("--run", required=True, help="the trained run folder (anomaseg train)")
    p.add_argument("--participant_label", "--participant-label", nargs="+", metavar="LABEL",
                   help="participants to analyse, without 'sub-' (default: all)")
    p.add_argument("--session_label", "--session-label", nargs="+", metavar="LABEL",
                   help="sessions to analyse, without 'ses-' (default: all)")
    p.add_argument("--predictor", help="predictor name (default: the run's)")
    p.add_argument("--workers", type=int, default=1, help=WORKERS_HELP)
    _add_bids_options(p)

    p = sub.add_parser("merge", help="combine the outputs of `evaluate --shard` (array jobs) into one evaluation, "
                                     "equal to one `evaluate` over all cases")
    p.add_argument("shards", nargs="+", metavar="SHARD_DIR", help="the --out folders of every shard, once each")
    p.add_argument("--out", required=True, help="output folder (metrics.json and report.html)")

    p = sub.add_parser("export", help="export a run's model and anomaly map to ONNX (scoring without PyTorch)")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, metavar="MODEL.onnx")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--predictor", help="predictor whose map is exported (default: the run's; all export but "
                                       "projection and skip_ganomaly)")
    p.add_argument("--predictor-params", metavar="YAML", help=PREDICTOR_PARAMS_HELP)

    p = sub.add_parser("preprocess", help="raw scans -> model-ready volumes: reorient, N4, isotropic resampling, "
                                          "co-registration, optional MNI152 registration, brain mask")
    p.add_argument("--data", required=True, help="dataset (case folders, datalist or BIDS root)")
    p.add_argument("--out", required=True, help="output dataset (same kind as the input; BIDS: a derivatives dataset)")
    p.add_argument("--modality", help="modalities to process, comma-separated (default: every image of a case)")
    p.add_argument("--reference", help="modality the others are registered to (default: the first --modality, or flair)")
    p.add_argument("--spacing", type=float, default=1.0, help="isotropic voxel size in mm (default 1)")
    p.add_argument("--coregistration", choices=["rigid", "affine", "none"], default="rigid")
    p.add_argument("--mni", action="store_true", help="affine registration to nilearn's MNI152 template (outputs on its grid)")
    p.add_argument("--no-n4", action="store_true", help="skip N4 bias-field correction")
    p.add_argument("--iterations", type=int, default=100, help="registration iterations per pyramid level")
    p.add_argument("--workers", type=int, help="cases processed in parallel (default: the CPUs this process may "
                                               "use, see --threads)")
    _add_threads_option(p)
    _add_bids_options(p)
    p = sub.add_parser("qa", help="segmentation quality assessment without ground truth (REC-Net + REG-Net)")
    qa = p.add_subparsers(dest="qa_command", required=True)
    q = qa.add_parser("fit", help="fit a QA model on labelled cases and candidate segmentations")
    q.add_argument("--data", required=True, help="labelled cases (folder or datalist .json)")
    q.add_argument("--segmentations", nargs="*", metavar="SEGS",
                   help="folders of candidate segmentations, <case>[_segmentation].nii.gz (any segmenter's output)")
    q.add_argument("--out", required=True, help="QA model folder")
    q.add_argument("--variant", choices=["difference", "image", "both", "all"],
                   help="REG-Net input: difference image (the paper, default), image (Robinson et al.), both, all")
    q.add_argument("--pool-size", type=int, help="candidates per case, completed by perturbations (default 24)")
    q.add_argument("--unet-pool", action="store_true",
                   help="add segmentations of small supervised U-Nets, cross-fitted on the labelled cases, to the pool "
                        "(up to half of it; written to OUT/unet_candidates)")
    q.add_argument("--epochs", type=int, help="epochs of REC-Net and of REG-Net (default 20)")
    q.add_argument("--batch-size", type=int)
    q.add_argument("--image-size", type=int, help="slice size, a power of two >= 32 (default 64)")
    q.add_argument("--modality", help="modality or comma-separated modalities (default flair)")
    q.add_argument("--precision", choices=["auto", "bf16", "32", "16"])
    q.add_argument("--seed", type=int)
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any QA setting, e.g. --set rec_params.base_channels=16 --set reg_epochs=40 (repeatable)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted fit in --out (its own settings)")
    _add_threads_option(q)
    q = qa.add_parser("predict", help="predict the Dice of segmentations without ground truth")
    q.add_argument("--qa", required=True, help="QA model folder (from `anomaseg qa fit`)")
    q.add_argument("--data", required=True, help="the cases the segmentations belong to (images only are read)")
    q.add_argument("--segmentations", nargs="+", required=True, metavar="SEGS", help="folders of segmentations")
    q.add_argument("--out", required=True, help="output folder: predictions.json and predictions.csv")
    q.add_argument("--variant", choices=["difference", "image", "both"], help="default: the first fitted")
    _add_threads_option(q)

    p = sub.add_parser("demo", help="phantom -> train -> evaluate on built-in data, in minutes")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a much smaller run (for smoke tests)")

    p = sub.add_parser("models", help="list the registered models")
    return parser
