"""Both decoders of one finished ConfKD run, scored on the fold's validation cases' dense labels.

A ``ConfKDTrainer`` checkpoint holds the student (the planned decoder, what ``nnUNetv2_predict`` and
``compare`` score) and the teacher (the second decoder, in ``nnunet_weak_training_weights``; the other way
round for ``ConfKDTrainer_predictWithTeacher``, which the script reads from the checkpoint). When
ConfKD loses to a baseline, the first question is whether the teacher learned what the student did not
(distillation too weak) or the teacher itself is poor (too few dense cases). This script predicts the
validation cases of the run's fold with nnU-Net's own predictor twice, the second time with the
teacher's weights in the planned decoder (same shape, shared encoder), and scores both on the dense
labels as ``compare`` does, without training ``ConfKDTrainer_predictWithTeacher`` again.

    python benchmarks/confkd_branches.py RESULTS/Dataset327_ACDC/ConfKDTrainer__nnUNetPlansCPU__2d/fold_0 \\
        --dense_labels $nnUNet_raw/Dataset328_ACDCDense/labelsTr -o OUT [--device cpu]

Prints a table (Dice per class and mean, over validation cases) and writes ``OUT/{student,teacher}/``
with the predictions and their ``summary_dense.json``.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_weak.environment import environment_with_trainers, find_trainer_class
from nnunet_weak.evaluation import score_cases
from nnunet_weak.networks.second_decoder import planned_weights_with_second_decoder
from nnunet_weak.networks.training_network import TRAINING_WEIGHTS_KEY


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fold_folder", type=Path, help="a finished run's fold_X folder (checkpoint_final.pth)")
    parser.add_argument("--dense_labels", type=Path, required=True,
                        help="the dense twin's labelsTr (the references the validation cases are scored on)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where predictions and scores go")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()
    checkpoint_file = args.fold_folder / "checkpoint_final.pth"
    if not checkpoint_file.is_file():
        print(f"{checkpoint_file} does not exist: give the fold_X folder of a finished run.", file=sys.stderr)
        return 2
    os.environ.update(environment_with_trainers(dict(os.environ)))
    model_folder, fold = args.fold_folder.parent, args.fold_folder.name.removeprefix("fold_")
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    cases = sorted(f.name[: -len(ending)] for f in (args.fold_folder / "validation").glob(f"*{ending}"))
    if not cases:
        print(f"{args.fold_folder / 'validation'} holds no predictions: was the run validated?", file=sys.stderr)
        return 2
    raw = Path(os.environ["nnUNet_raw"]) / model_folder.parent.name / "imagesTr"
    images = [[str(raw / f"{case}_{c:04d}{ending}") for c in range(len(dataset_json["channel_names"]))]
              for case in cases]
    labels = {name: value for name, value in dataset_json["labels"].items()
              if name not in ("background", "ignore")}
    missing = [c for c in cases if not (args.dense_labels / f"{c}{ending}").is_file()]
    if missing:
        print(f"{args.dense_labels} has no dense label for {missing[0]} ({len(missing)} of {len(cases)} validation "
              "cases): give the dense twin's labelsTr.", file=sys.stderr)
        return 2
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    teacher_decoder = getattr(find_trainer_class(checkpoint["trainer_name"]), "teacher_decoder", None)
    if teacher_decoder is None or TRAINING_WEIGHTS_KEY not in checkpoint:
        print(f"{checkpoint_file} is a {checkpoint['trainer_name']} run, not a ConfKD one: it has no teacher "
              "decoder.", file=sys.stderr)
        return 2
    second = planned_weights_with_second_decoder(checkpoint["network_weights"], checkpoint[TRAINING_WEIGHTS_KEY])
    planned_branch, second_branch = ("teacher", "student") if teacher_decoder == "planned" else ("student", "teacher")
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device(args.device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), (fold,), "checkpoint_final.pth")
    rows = {}
    for branch, weights in ((planned_branch, checkpoint["network_weights"]), (second_branch, second)):
        predictor.list_of_parameters = [weights]
        out = args.output / branch
        predictor.predict_from_files(images, [str(out / case) for case in cases], overwrite=True,
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
        summary = score_cases({c: (out / f"{c}{ending}", args.dense_labels / f"{c}{ending}") for c in cases},
                              labels, out / "summary_dense.json", description=f"Scoring the {branch}")
        rows[branch] = [summary["mean"][n]["Dice"] for n in labels] + [summary["foreground_mean"]["Dice"]]
    print(f"\n{len(cases)} validation cases of fold {fold}, dense labels ({args.fold_folder})\n")
    print("| decoder | " + " | ".join(f"Dice {n}" for n in labels) + " | Dice mean |")
    print("|---|" + "---|" * (len(labels) + 1))
    for branch, values in rows.items():
        print(f"| {branch} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
