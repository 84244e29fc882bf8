"""The ``nnunet-weak`` command: one sub-command per job, each with ``--help``."""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial

from nnunet_weak.errors import StepFailed, UserInputError


def _cmd_env(args) -> None:
    import torch
    from nnunet_weak.environment import export_lines
    print("# nnunet-weak: add these lines to your shell profile, or run: eval \"$(nnunet-weak env)\"")
    for line in export_lines(args.root, torch.cuda.is_available(), os.cpu_count() or 1):
        print(line)


def _cmd_plan_and_preprocess(args) -> None:
    from nnunet_weak.planners.plan_and_preprocess import plan_and_preprocess
    plan_and_preprocess(
        args.d, fingerprint_extractor=args.fpe, planner=args.pl, gpu_memory_target=args.gpu_memory_target,
        preprocessor=args.preprocessor_name, overwrite_target_spacing=args.overwrite_target_spacing,
        overwrite_plans_name=args.overwrite_plans_name, configurations=args.c,
        num_processes_fingerprint=args.npfp, num_processes=args.np,
        verify_dataset_integrity=args.verify_dataset_integrity, no_pp=args.no_pp, clean=args.clean,
        verbose=args.verbose, plans_from=args.plans_from)


def _cmd_convert(module: str, args) -> None:
    """Run ``nnunet_weak.dataset_conversion.<module>.convert_from_args`` and list what it wrote."""
    import importlib
    converter = importlib.import_module(f"nnunet_weak.dataset_conversion.{module}")
    for folder in converter.convert_from_args(args):
        print(f"Wrote {folder}")


def _add_output_arguments(parser) -> None:
    parser.add_argument("--output", default=None, help="raw data folder (default: $nnUNet_raw; give "
                                                       "--preprocessed_output with it)")
    parser.add_argument("--preprocessed_output", default=None,
                        help="where the datasets' splits_final.json go (default: $nnUNet_preprocessed; required "
                             "with --output)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing datasets of the same name")
    parser.add_argument("-np", type=int, default=1, help="worker processes (default 1)")


def _add_held_out_arguments(parser, old_name: str, unit: str, default: int, example: str) -> None:
    """Every converter's two ways to hold out test units: a seeded draw of a count, or a pinned list."""
    parser.add_argument("--test_count", old_name, dest="test_count", type=int, default=None,
                        help=f"{unit} held out for testing, a seeded draw (default {default}; at least 5 must remain "
                             f"for training)")
    parser.add_argument("--test_list", default=None,
                        help=f"file of the {unit.split(' (')[0]} to hold out for testing ({example}), one per line, "
                             f"instead of --test_count")


def _cmd_evaluate(args) -> None:
    from pathlib import Path
    from nnunet_weak.evaluation import reference_labels, score_cases
    from nnunet_weak.raw_dataset import load_raw_dataset
    if (args.d is None) == (args.labels is None):
        raise UserInputError("Give the references either as a dataset (-d, with --reference test or train) or as a "
                             "folder (--labels DIR), not both.")
    dataset = load_raw_dataset(args.d) if args.d is not None else None
    predictions = Path(args.predictions)
    if not predictions.is_dir():
        raise UserInputError(f"Prediction folder {predictions} does not exist.")
    if dataset is not None and args.classes:
        raise UserInputError("--classes is for --labels; a dataset's classes come from its dataset.json.")
    ending = dataset.file_ending if dataset else args.file_ending
    predicted = {f.name[: -len(ending)] for f in predictions.iterdir() if f.name.endswith(ending)}
    if not predicted:
        raise UserInputError(f"{predictions} holds no '*{ending}' predictions.")
    if dataset is None:
        references = reference_labels(Path(args.labels), ending)
        source = f"{args.labels}"
    elif args.reference == "test":
        references = {case: label for case, (_, label) in dataset.test_cases().items() if label is not None}
        source = f"labelsTs of {dataset.name}"
    else:
        references = {case: dataset.dense_label_path(case) for case in dataset.training_cases}
        references = {case: path for case, path in references.items() if path is not None}
        source = f"the dense training labels of {dataset.name}"
    unmatched = sorted(predicted - set(references))
    if unmatched:
        raise UserInputError(f"{len(unmatched)} prediction(s) have no reference in {source}, e.g. {unmatched[:3]}."
                             + (" Use --reference test for imagesTs predictions." if dataset else ""))
    # a fold's validation predictions cover some training cases by design; a test set is scored whole
    complete = dataset is None or args.reference == "test"
    missing = sorted(set(references) - predicted) if complete else []
    if missing and not args.allow_missing:
        raise UserInputError(f"{len(missing)} of the {len(references)} cases in {source} have no prediction in "
                             f"{predictions}, e.g. {missing[:3]}: a mean over a subset is not the set's score. Predict "
                             f"them, or pass --allow_missing to score the {len(predicted)} predicted cases only.")
    if dataset is not None:
        class_labels, ignore_label = dataset.class_labels, dataset.ignore_label
    elif args.classes:
        class_labels, ignore_label = {name: value for value, name in enumerate(args.classes, start=1)}, None
    else:
        class_labels, ignore_label = None, None
    pairs = {case: (predictions / f"{case}{ending}", references[case]) for case in sorted(predicted)}
    output = Path(args.o) if args.o else predictions / "summary_dense.json"
    summary = score_cases(pairs, class_labels, output, ignore_label, args.np, convention=args.convention,
                          extra={"references": source, "cases_scored": len(pairs),
                                 "cases_with_reference": len(pairs) + len(missing), "cases_missing": missing})
    unit, surface = ("voxels", "ASD") if args.convention == "wsl4mis" else ("mm", "ASSD")
    for name, values in [*summary["mean"].items(), ("mean", summary["foreground_mean"])]:
        print(f"{name:>12s}  Dice {values['Dice']:.4f}  HD95 {values['HD95']:.2f} {unit}  "
              f"{surface} {values[surface]:.2f} {unit}")
    scored = f"{len(pairs)} of {len(pairs) + len(missing)} cases" if missing else f"{len(pairs)} cases"
    print(f"Wrote {output} ({scored}, convention {args.convention})")


def _cmd_compare(args) -> None:
    from nnunet_weak.compare import compare_from_args
    compare_from_args(args)


def _cmd_tune(args) -> None:
    from nnunet_weak.tune import tune_from_args
    tune_from_args(args)


def _cmd_demo(args) -> None:
    from nnunet_weak.demo import run_demo
    run_demo(args)


def _add_training_arguments(parser, folds_help: str) -> None:
    """What ``compare`` and ``tune`` train with: budget, configuration, folds, plans, device, retraining."""
    from nnunet_weak.budget import BUDGET_ENV, DEFAULT_BUDGET, NAMED_BUDGETS
    parser.add_argument("--budget", default=os.environ.get(BUDGET_ENV) or DEFAULT_BUDGET,
                        help=f"training budget: {', '.join(NAMED_BUDGETS)} or <epochs>x<iterations> (default: "
                             f"$NNUNET_WEAK_BUDGET if set, else nnunet, nnU-Net's 1000x250: what nnUNetv2_train "
                             f"would run)")
    parser.add_argument("-c", dest="configuration", default="2d", help="nnU-Net configuration (default: 2d)")
    parser.add_argument("-f", dest="folds", nargs="+", default=["0"], help=folds_help)
    parser.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--retrain", action="store_true",
                        help="train again even if a finished run exists (required when its budget, seed or options "
                             "differ)")
    parser.add_argument("--records", default=None, metavar="DIR",
                        help="folder of score records (created if missing): a run this machine does not hold finished "
                             "is scored from its record there instead of trained, and every run scored writes its "
                             "record there (per case validation and test scores, what identifies the run), so that "
                             "tables can be rebuilt and extended elsewhere (documentation/comparing_methods.md)")


def build_parser() -> argparse.ArgumentParser:
    from nnunet_weak.budget import NAMED_BUDGETS
    from nnunet_weak.supervision_choice import add_supervision_arguments
    budgets = f"{', '.join(NAMED_BUDGETS)} or <epochs>x<iterations>"
    parser = argparse.ArgumentParser(
        prog="nnunet-weak",
        description="Label-efficient learning (scribbles, mixed and semi-supervision) inside nnU-Net v2.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("env", help="print the export lines that let stock nnU-Net commands find the trainers",
                       description="Print the environment (nnU-Net folders, nnUNet_extTrainer, CPU worker "
                                   "counts) as export lines. Use: eval \"$(nnunet-weak env)\".")
    p.add_argument("--root", help="put nnUNet_raw/_preprocessed/_results under this folder "
                                  "(default: keep the current values, else ~/nnUNet_data)")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("plan_and_preprocess", help="nnU-Net planning with an ignore-aware fingerprint",
                       description="nnUNetv2_plan_and_preprocess with the ignore-aware fingerprint extractor "
                                   "(intensity statistics from annotated, non-ignore foreground only), or with "
                                   "the plans and splits of a twin dataset (--plans_from).")
    p.add_argument("-d", nargs="+", required=True, help="dataset id(s) or name(s)")
    p.add_argument("-fpe", default="ignore_aware", choices=["ignore_aware", "nnunet"],
                   help="fingerprint extractor (default: ignore_aware)")
    p.add_argument("-pl", default="ExperimentPlanner",
                   help="experiment planner: nnU-Net's (default: ExperimentPlanner) or nnUNetPlannerCPU (half "
                        "resolution, batch <= 8, plans 'nnUNetPlansCPU', for CPU benchmarks)")
    p.add_argument("-gpu_memory_target", type=float, default=None, help="GPU memory target in GB for the planner")
    p.add_argument("-preprocessor_name", default="DefaultPreprocessor", help="preprocessor class name")
    p.add_argument("-overwrite_target_spacing", nargs="+", type=float, default=None,
                   help="target spacing for 3d_fullres (z y x)")
    p.add_argument("-overwrite_plans_name", default=None, help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-c", nargs="+", default=["2d", "3d_fullres", "3d_lowres"], help="configurations to preprocess")
    p.add_argument("-npfp", type=int, default=int(os.environ.get("nnUNet_def_n_proc", 8)),
                   help="processes for fingerprint extraction")
    p.add_argument("-np", type=int, nargs="+", default=None, help="processes for preprocessing (one or one per -c)")
    p.add_argument("--verify_dataset_integrity", action="store_true", help="run nnU-Net's integrity check first")
    p.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    p.add_argument("--clean", action="store_true", help="recompute an existing fingerprint")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--plans_from", default=None,
                   help="copy plans (those named by -overwrite_plans_name, default nnUNetPlans), fingerprint and "
                        "splits from this (dense twin) dataset instead of planning")
    p.set_defaults(func=_cmd_plan_and_preprocess)

    p = sub.add_parser("convert", help="write nnU-Net datasets with a supervision manifest",
                       description="Convert data into nnU-Net raw datasets with a supervision manifest.")
    conv = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    q = conv.add_parser("phantom", help="the synthetic cardiac phantom: a dense dataset and its scribble twin",
                        description="Generate the synthetic short-axis cardiac phantom and write a dense "
                                    "dataset and a scribble dataset (same images, same test cases).")
    q.add_argument("--id", "--sparse_id", dest="id", type=int, default=991, help="id of the scribble dataset (default 991)")
    q.add_argument("--dense_id", type=int, default=990, help="id of the dense dataset (default 990)")
    q.add_argument("--num_train", type=int, default=20, help="training cases (default 20; at least 5)")
    q.add_argument("--test_count", "--num_test", dest="test_count", type=int, default=8,
                   help="held-out test cases (default 8)")
    q.add_argument("--size", type=int, default=48, help="in-plane size in voxels (default 48)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_output_arguments(q)
    q.set_defaults(func=partial(_cmd_convert, "phantom"))

    q = conv.add_parser("acdc", help="ACDC (official layout or WSL4MIS HDF5) as a scribble dataset + dense twin",
                        description="Convert ACDC into Dataset027_ACDC (scribbles in labelsTr: hand-drawn when "
                                    "given, simulated otherwise; dense labels in labelsTr_dense) and its dense "
                                    "twin, with whole test patients in imagesTs/labelsTs and the same "
                                    "patient-grouped 5-fold splits for both.")
    q.add_argument("--official", default=None, help="folder of patientXXX/ folders (Info.cfg, frames, _gt)")
    q.add_argument("--h5", default=None, help="folder of WSL4MIS patientXXX_frameYY.h5 files (or its volumes/)")
    q.add_argument("--spacing", default=None, help="CSV case,spacing_x_mm,spacing_y_mm,spacing_z_mm (for --h5)")
    q.add_argument("--scribbles", default=None, help="folder of patientXXX_frameYY_scribble.nii.gz (Valvano et al.)")
    q.add_argument("--id", "--scribble_id", dest="id", type=int, default=27, help="id of the scribble dataset (default 27)")
    q.add_argument("--dense_id", type=int, default=127, help="id of the dense twin (default 127)")
    _add_held_out_arguments(q, "--test_patients", "whole patients (both frames)", 20, "patient001")
    q.add_argument("--test_only", action="store_true",
                   help="every patient is a held-out test case (e.g. the official release's testing folder): one "
                        "dataset DatasetID_ACDCTest for prediction and scoring, no training cases, no twin")
    add_supervision_arguments(q)
    _add_output_arguments(q)
    q.set_defaults(func=partial(_cmd_convert, "acdc"))

    q = conv.add_parser("la", help="LA (official NRRD or UA-MT HDF5), semi-supervised, with a dense twin",
                        description="Convert the left atrium data into a semi-supervised dataset (the first "
                                    "--labelled_count cases of the training list keep labels, the rest are "
                                    "unlabelled) and its dense twin, with the test list in imagesTs/labelsTs.")
    q.add_argument("--official", default=None, help="folder of <ID>/lgemri.nrrd + laendo.nrrd")
    q.add_argument("--h5", default=None, help="folder of <ID>/mri_norm2.h5 (UA-MT layout)")
    q.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm for --h5 (the originals: 0.625 0.625 0.625)")
    q.add_argument("--train_list", default=None, help="ordered training case ids, one per line (default: all, sorted)")
    q.add_argument("--test_list", default=None, help="test case ids, one per line (default: no test set)")
    q.add_argument("--id", type=int, default=37, help="id of the semi-supervised dataset (default 37)")
    q.add_argument("--dense_id", type=int, default=137, help="id of the dense twin (default 137)")
    _add_output_arguments(q)
    add_supervision_arguments(q, default_mode="semi")
    q.set_defaults(func=partial(_cmd_convert, "la"))

    q = conv.add_parser("chaos", help="CHAOS MRI (official DICOM + PNG or NIfTI), weak labels, with a dense twin",
                        description="Convert CHAOS MRI (liver, kidneys, spleen) into a dataset with generated "
                                    "weak labels (scribbles by default) and its dense twin, with held-out test "
                                    "subjects.")
    q.add_argument("--official", default=None, help="folder of subject folders <ID>/T2SPIR|T1DUAL/{DICOM_anon,Ground}")
    q.add_argument("--nifti", default=None, help="folder of image_<id>.nii.gz + label_<id>.nii.gz")
    q.add_argument("--modality", choices=["T2SPIR", "T1DUAL"], default=None,
                   help="official layout: which sequence (default T2SPIR; T1DUAL gives in- and out-phase channels)")
    _add_held_out_arguments(q, "--test_subjects", "subjects", 4, "chaos_<ID>")
    q.add_argument("--id", type=int, default=38, help="id of the weakly labelled dataset (default 38)")
    q.add_argument("--dense_id", type=int, default=138, help="id of the dense twin (default 138)")
    _add_output_arguments(q)
    add_supervision_arguments(q)
    q.set_defaults(func=partial(_cmd_convert, "chaos"))

    q = conv.add_parser("folders", help="your own folders of images, dense labels and/or scribbles",
                        description="Convert your own data: --images (<case>.nii.gz or <case>_0000.nii.gz ...), "
                                    "optional --labels and --scribbles (<case>.nii.gz). With dense labels: a "
                                    "dataset with the chosen supervision and its dense twin; without: one "
                                    "dataset of scribbled (sparse) and unlabelled cases.")
    q.add_argument("--images", required=True, help="folder of images")
    q.add_argument("--labels", default=None, help="folder of dense labels (values 0..number of classes)")
    q.add_argument("--scribbles", default=None, help="folder of scribbles")
    q.add_argument("--scribble_ignore", type=int, default=None,
                   help="value of un-annotated voxels in your scribbles (default: number of classes + 1)")
    q.add_argument("--classes", nargs="+", required=True, help="class names for label values 1, 2, ...")
    q.add_argument("--channel_names", nargs="+", default=None, help="one name per image channel (e.g. CT, T2)")
    q.add_argument("--name", required=True, help="dataset name (DatasetXXX_<name>)")
    q.add_argument("--id", type=int, required=True, help="dataset id")
    q.add_argument("--dense_id", type=int, default=None, help="id of the dense twin (with --labels)")
    _add_held_out_arguments(q, "--test_cases", "cases (with --labels)", 0, "your case ids")
    q.add_argument("--test_only", action="store_true",
                   help="every case of --images, with its --labels, is a held-out test case: one dataset for "
                        "prediction and scoring, no training cases, no twin")
    q.add_argument("--test_images", default=None,
                   help="folder of held-out test images, named like --images (e.g. a release whose training scans "
                        "have scribbles only and whose test scans are labelled densely)")
    q.add_argument("--test_labels", default=None, help="folder of the dense labels of --test_images")
    q.add_argument("--file_ending", default=".nii.gz", help="ending of your files (default .nii.gz)")
    _add_output_arguments(q)
    add_supervision_arguments(q)
    q.set_defaults(func=partial(_cmd_convert, "folders"))

    from nnunet_weak.evaluation import DEFAULT_CONVENTION, METRIC_CONVENTIONS
    p = sub.add_parser("evaluate", help="score predictions against dense labels (Dice, HD95, ASSD; MedPy)",
                       description="Score a folder of predictions against dense labels: those of a dataset "
                                   "(-d: labelsTs with --reference test, or the dense training labels named by the "
                                   "supervision manifest with --reference train) or a folder of label maps named "
                                   "like the predictions (--labels). Every prediction needs a reference with the "
                                   "same grid; with -d --reference test or --labels every reference needs a "
                                   "prediction (unless --allow_missing).")
    p.add_argument("-d", default=None, help="dataset id or name whose dense labels are the references")
    p.add_argument("-i", dest="predictions", required=True, help="folder of predicted label maps")
    p.add_argument("--reference", choices=["test", "train"], default="test",
                   help="with -d: which dense labels to score against (default: test)")
    p.add_argument("--labels", default=None, help="folder of reference label maps, instead of -d")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                   help="with --labels: class names of the values 1, 2, ... (default: every value found in the "
                        "references, named by its value)")
    p.add_argument("--file_ending", default=".nii.gz", help="with --labels: file ending (default: .nii.gz)")
    p.add_argument("--allow_missing", action="store_true",
                   help="score the predicted cases only when some references have no prediction (the JSON records "
                        "how many were scored of how many)")
    p.add_argument("-o", default=None, help="output JSON (default: <predictions>/summary_dense.json)")
    p.add_argument("-np", type=int, default=1, help="processes (default 1)")
    p.add_argument("--convention", choices=METRIC_CONVENTIONS, default=DEFAULT_CONVENTION,
                   help="how distances and empty classes are scored: nnunet-weak (mm; every table of this "
                        "project) or wsl4mis (voxels, ASD, an empty prediction scores 0: the published ACDC "
                        "scribble tables' convention, to set numbers beside them). Default: %(default)s")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("compare", help="train, predict and score several trainers on the same plans and folds",
                       description="Train each trainer on the sparse dataset (and nnUNetWeakTrainer on the dense "
                                   "twin as the upper bound) on the same plans, fold and budget with the stock "
                                   "nnU-Net commands, predict the held-out test cases, score them against dense "
                                   "labels, and write a table (markdown, CSV) and a per-class Dice chart (PNG): the "
                                   "validation score (on which choices are made) beside the test score, and each "
                                   "method against the partial-loss baseline case by case (mean difference, "
                                   "bootstrap 95 %% interval, Wilcoxon p). Finished runs are reused.")
    p.add_argument("--dense", default=None, help="dense twin dataset id or name (the upper bound; required "
                                                 "unless --no_dense)")
    p.add_argument("--sparse", required=True, help="sparse (scribble/weak) twin dataset id or name")
    p.add_argument("--trainers", nargs="+", default=["nnUNetWeakTrainer"],
                   help="trainers to train on the sparse dataset (default: nnUNetWeakTrainer, the partial-loss "
                        "baseline); PRETRAINER:TRAINER trains PRETRAINER (default options, same fold and seed) and "
                        "starts TRAINER from its final checkpoint with -pretrained_weights, e.g. "
                        "KAFPretrainTrainer:KAFTrainer")
    _add_training_arguments(p, "fold(s) to train; several are ensembled for the test prediction (default: 0)")
    p.add_argument("--baseline", default=None,
                   help="the trainer (one of --trainers) every other row is paired against, case by case (default: "
                        "nnUNetWeakTrainer, the partial loss; the full method when the other rows are its ablations)")
    p.add_argument("--no_dense", action="store_true", help="skip the dense upper bound")
    p.add_argument("--disable_tta", action="store_true", help="predict without mirroring")
    p.add_argument("--seeds", type=int, default=0,
                   help="train every run N times with NNUNET_WEAK_SEED 0..N-1, each seed under "
                        "$nnUNet_results/nnunet_weak_seeds/seed_K, and report mean ± sd over seeds (default 0: "
                        "one unseeded run in $nnUNet_results)")
    p.add_argument("-o", dest="output", default=None,
                   help="output folder (default: $nnUNet_results/nnunet_weak_compare/<sparse>__<config>__fold<folds>__<budget>)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("tune", help="choose a trainer's option values on validation cases (never the test set)",
                       description="Train one trainer for every combination of the option values given (its "
                                   "current defaults always included), with the stock nnU-Net commands and several "
                                   "seeds, score each on the dense labels of the folds' validation cases, and write "
                                   "a table (markdown, CSV), a chart and each combination against the defaults case "
                                   "by case (mean difference, bootstrap 95 %% interval, Wilcoxon p). Never reads "
                                   "imagesTs or labelsTs. Finished runs are reused, also those of compare.")
    p.add_argument("-d", required=True, nargs="+",
                   help="dataset id(s) or name(s); with several, every combination is trained on each and the "
                        "choice is the highest mean validation Dice averaged over them")
    p.add_argument("-tr", dest="trainer", required=True, help="trainer whose options are tuned")
    p.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2",
                   help="option values to try, e.g. --grid lambda_crf=0.05,0.1,0.2 crf_rampup=0,0.5 (every "
                        "combination is trained)")
    _add_training_arguments(p, "fold(s) to train and validate (default: 0)")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds per combination, NNUNET_WEAK_SEED 0..N-1, the layout of compare --seeds (default 3)")
    p.add_argument("-o", dest="output", default=None,
                   help="output folder (default: $nnUNet_results/nnunet_weak_tune/<dataset[+dataset...]>__<trainer>__"
                        "<config>__fold<folds>__<budget>)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("demo", help="phantom -> convert -> plan -> compare dense vs scribbles, on CPU in minutes",
                       description="Generate the phantom, convert it into a dense and a scribble dataset, plan "
                                   "and preprocess (2d), and compare dense nnU-Net (upper bound) with nnU-Net + "
                                   "partial loss and ScribbleAttentionTrainer on the scribbles, scored on dense "
                                   "test labels, with the validation scores, paired statistics and figures.")
    p.add_argument("--id", "--sparse_id", dest="id", type=int, default=991,
                   help="id of the scribble phantom dataset (default 991)")
    p.add_argument("--dense_id", type=int, default=990, help="id of the dense phantom dataset (default 990)")
    p.add_argument("--num_train", type=int, default=20, help="training cases (default 20)")
    p.add_argument("--test_count", "--num_test", dest="test_count", type=int, default=8, help="test cases (default 8)")
    p.add_argument("--budget", default="demo", help=f"training budget: {budgets} (default: demo)")
    p.add_argument("--trainers", nargs="+", default=["nnUNetWeakTrainer", "ScribbleAttentionTrainer"],
                   help="trainers to compare on the scribbles (default: nnUNetWeakTrainer, the partial-loss "
                        "baseline, and ScribbleAttentionTrainer)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # tables hold ± and ×: a terminal whose locale cannot show them gets a stand-in, not a crash
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserInputError as e:
        print(f"nnunet-weak {args.command}: error: {e}", file=sys.stderr)
        return 2
    except StepFailed as e:
        print(f"nnunet-weak {args.command}: failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
