"""End to end with the stock nnU-Net commands on a tiny phantom (a few minutes on 2 CPU cores).

convert -> nnUNetv2_plan_and_preprocess (dense) -> nnunet-weak plan_and_preprocess --plans_from (scribbles)
-> nnUNetv2_train -tr nnUNetWeakTrainer (data-augmentation workers on), --c, --val -> nnUNetv2_predict
-> scoring on dense labels -> nnunet-weak compare reusing the finished run.
"""
import csv
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch


from conftest import BIN, planned_phantom_twins, probe, run_checked

pytestmark = pytest.mark.slow

DENSE, SPARSE, SEMI = "Dataset950_PhantomDense", "Dataset951_PhantomScribble", "Dataset952_PhantomSemi"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return planned_phantom_twins(tmp_path_factory.mktemp("e2e"), 950, 951)


def fold_folder(folders, dataset):
    return folders["nnUNet_results"] / dataset / "nnUNetWeakTrainer__nnUNetPlans__2d" / "fold_0"


def test_train_continue_validate_predict_score(workspace):
    folders, env = workspace
    train = [BIN / "nnUNetv2_train", "951", "2d", "0", "-tr", "nnUNetWeakTrainer", "-device", "cpu"]
    env = dict(env, NNUNET_WEAK_SEED="5")
    run_checked(train, env)
    fold = fold_folder(folders, SPARSE)
    assert (fold / "checkpoint_final.pth").is_file()
    record = json.loads((fold / "nnunet_weak_run.json").read_text(encoding="utf-8"))
    assert record["budget"]["name"] == "smoke" and record["seed"] == 5

    # the dense-label monitor scored every epoch, and drew it
    logged = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    for key in ("dense_dice_per_class", "dense_background_as_class"):
        assert len(logged[key]) == 2 and all(len(v) == 3 for v in logged[key])
    assert all(0 <= v <= 1 for epoch in logged["dense_background_as_class"] for v in epoch)
    assert (fold / "dense_monitor.png").is_file()
    dense_summary = json.loads((fold / "validation" / "summary_dense.json").read_text(encoding="utf-8"))
    assert dense_summary["reference"] == "dense labels"
    val_cases = json.loads((folders["nnUNet_preprocessed"] / SPARSE / "splits_final.json").read_text(encoding="utf-8"))[0]["val"]
    assert sorted(c["case"] for c in dense_summary["metric_per_case"]) == sorted(val_cases)
    assert all("labelsTr_dense" in c["reference"] for c in dense_summary["metric_per_case"])
    assert set(dense_summary["mean"]) == {"RV", "MYO", "LV"}

    # --c on a finished run, and a changed budget is refused
    run_checked(train + ["--c"], env)
    refused = subprocess.run(train + ["--c"], env=dict(env, NNUNET_WEAK_BUDGET="3x3"), capture_output=True,
                             encoding="utf-8", errors="replace")
    assert refused.returncode != 0
    assert "was started with budget 'smoke'" in refused.stdout + refused.stderr
    refused = subprocess.run(train + ["--c"], env=dict(env, NNUNET_WEAK_SEED="6"), capture_output=True,
                             encoding="utf-8", errors="replace")
    assert refused.returncode != 0
    assert "NNUNET_WEAK_SEED=5" in refused.stdout + refused.stderr

    (fold / "validation" / "summary_dense.json").unlink()
    run_checked(train + ["--val"], env)
    assert (fold / "validation" / "summary_dense.json").is_file()

    predictions = folders["nnUNet_results"] / "test_predictions"
    run_checked([BIN / "nnUNetv2_predict", "-i", folders["nnUNet_raw"] / SPARSE / "imagesTs", "-o", predictions,
         "-d", "951", "-c", "2d", "-f", "0", "-tr", "nnUNetWeakTrainer", "-chk", "checkpoint_final.pth",
         "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    out = run_checked([BIN / "nnunet-weak", "evaluate", "-d", "951", "-i", predictions], env)
    assert "mean  Dice" in out.stdout
    test_summary = json.loads((predictions / "summary_dense.json").read_text(encoding="utf-8"))
    assert len(test_summary["metric_per_case"]) == 2
    assert all("labelsTs" in c["reference"] for c in test_summary["metric_per_case"])


def test_seed_decides_the_initial_weights(workspace):
    _, env = workspace
    env = dict(env, nnUNet_n_proc_DA="0")
    first, again, other = (probe(dict(env, NNUNET_WEAK_SEED=seed), "initial", "951", "2d", "nnUNetWeakTrainer")
                           for seed in ("3", "3", "4"))
    assert first["checksum"] == again["checksum"] != other["checksum"]
    refused = subprocess.run([BIN / "nnUNetv2_train", "951", "2d", "0", "-tr", "nnUNetWeakTrainer", "-device", "cpu"],
                             env=dict(env, NNUNET_WEAK_SEED="three"), capture_output=True, encoding="utf-8")
    assert refused.returncode != 0 and "NNUNET_WEAK_SEED must be a non-negative integer" in refused.stderr


def test_compare_reuses_finished_runs(workspace):
    folders, env = workspace
    fold = fold_folder(folders, SPARSE)
    if not (fold / "checkpoint_final.pth").is_file():
        pytest.skip("needs the training of test_train_continue_validate_predict_score")
    before = (fold / "checkpoint_final.pth").stat().st_mtime
    # a run stopped during its validation (trained to the end): validated again, not retrained
    summary = fold / "validation" / "summary_dense.json"
    scores = json.loads(summary.read_text(encoding="utf-8"))["mean"]
    summary.unlink()
    output = folders["nnUNet_results"] / "comparison"
    run_checked([BIN / "nnunet-weak", "compare", "--dense", "950", "--sparse", "951", "--budget", "smoke",
         "--device", "cpu", "--disable_tta", "-o", output], env)
    assert (fold / "checkpoint_final.pth").stat().st_mtime == before
    assert json.loads(summary.read_text(encoding="utf-8"))["mean"] == scores
    assert (fold_folder(folders, DENSE) / "checkpoint_final.pth").is_file()
    table = (output / "comparison.md").read_text(encoding="utf-8")
    assert "nnU-Net dense (upper bound)" in table and "nnU-Net + partial loss" in table
    assert "budget smoke" in table
    rows = (output / "comparison.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("method,trainer,dataset,Dice RV,Dice MYO,Dice LV,Dice mean")
    assert len(rows) == 3
    worst = "background as one class, worst (%)"
    reported = sorted(float(r[worst]) for r in csv.DictReader(rows))
    scored = sorted(100 * max(v["BackgroundShare"] for v in json.loads(f.read_text(encoding="utf-8"))["mean"].values())
                    for f in (output / "scores").glob("*.json"))
    assert reported == pytest.approx(scored)
    assert (output / "comparison_dice.png").stat().st_size > 1000

    # a finished run under another budget is not silently reused
    refused = subprocess.run([BIN / "nnunet-weak", "compare", "--dense", "950", "--sparse", "951", "--budget",
                              "3x3", "--device", "cpu", "-o", output], env=env, capture_output=True,
                             encoding="utf-8", errors="replace")
    assert refused.returncode == 2 and "--retrain" in refused.stderr


def test_compare_with_seeds_reports_validation_and_paired_differences(workspace):
    folders, env = workspace
    output = folders["nnUNet_results"] / "comparison_seeds"
    trainers = ["nnUNetWeakTrainer", "nnUNetWeakTrainer_nearestDSTargets"]
    command = [BIN / "nnunet-weak", "compare", "--sparse", "951", "--no_dense", "--budget", "smoke", "--device", "cpu",
               "--disable_tta", "--seeds", "2", "--trainers", *trainers, "-o", output]
    run_checked(command, env)

    def fold(trainer, seed):
        return (folders["nnUNet_results"] / "nnunet_weak_seeds" / f"seed_{seed}" / SPARSE /
                f"{trainer}__nnUNetPlans__2d" / "fold_0")

    for trainer in trainers:
        for seed in (0, 1):
            assert json.loads((fold(trainer, seed) / "nnunet_weak_run.json").read_text(encoding="utf-8"))["seed"] == seed

    def validation(trainer, seed):
        return json.loads((fold(trainer, seed) / "validation" / "summary_dense.json").read_text(encoding="utf-8"))

    rows = {r["trainer"]: r for r in csv.DictReader((output / "comparison.csv").read_text(encoding="utf-8").splitlines())}
    for trainer in trainers:
        means = [validation(trainer, seed)["foreground_mean"]["Dice"] for seed in (0, 1)]
        assert float(rows[trainer]["validation Dice mean"]) == pytest.approx(np.mean(means))
        assert float(rows[trainer]["validation Dice mean sd"]) == pytest.approx(np.std(means, ddof=1))
        assert rows[trainer]["seeds"] == "2"

    def per_case_mean_dice(trainer):
        cases = {}
        for seed in (0, 1):
            for entry in validation(trainer, seed)["metric_per_case"]:
                dice = [v["Dice"] for v in entry["metrics"].values() if not np.isnan(v["Dice"])]
                cases.setdefault(entry["case"], []).append(np.mean(dice) if dice else np.nan)
        return {case: np.nanmean(values) for case, values in cases.items()}

    method, baseline = per_case_mean_dice(trainers[1]), per_case_mean_dice(trainers[0])
    expected = np.nanmean([method[c] - baseline[c] for c in sorted(method)])
    paired = [r for r in csv.DictReader((output / "comparison_paired.csv").read_text(encoding="utf-8").splitlines())
              if r["split"] == "validation" and r["score"] == "Dice mean"]
    assert len(paired) == 1 and paired[0]["method"] == trainers[1]
    all_validation_rows = [r["score"] for r in csv.DictReader((output / "comparison_paired.csv").read_text(
        encoding="utf-8").splitlines()) if r["split"] == "validation"]
    classes = ["RV", "MYO", "LV"]
    assert all_validation_rows == [f"Dice {c}" for c in classes] + ["Dice mean"] + [f"HD95 {c} (mm)" for c in classes] \
        + ["HD95 mean (mm)"]
    assert paired[0]["baseline"] == "nnU-Net + partial loss"
    assert float(paired[0]["mean difference"]) == pytest.approx(expected)
    table = (output / "comparison.md").read_text(encoding="utf-8")
    assert "Validation: dense labels" in table and "Test: held-out" in table and "±" in table
    assert "Paired differences, method minus nnU-Net + partial loss" in table
    for figure in ("comparison_dice.png", "comparison_cases.png", "comparison_paired.png"):
        assert (output / figure).stat().st_size > 10_000

    # finished seeds are reused; with --records each run's scores are recorded
    before = fold(trainers[0], 1).joinpath("checkpoint_final.pth").stat().st_mtime
    records = folders["nnUNet_results"].parent / "records"
    run_checked(command + ["--records", records], env)
    assert fold(trainers[0], 1).joinpath("checkpoint_final.pth").stat().st_mtime == before
    assert len(list(records.glob("*.json"))) == len(trainers) * 2

    # where none of the runs exists, the records rebuild the same table without training or predicting
    elsewhere = folders["nnUNet_results"].parent / "results_elsewhere"
    elsewhere.mkdir()
    rebuilt = elsewhere / "comparison"
    out = run_checked(command[:-1] + [rebuilt, "--records", records], dict(env, nnUNet_results=str(elsewhere)))
    assert "scored from its record" in out.stdout
    assert sorted(p.name for p in elsewhere.iterdir()) == ["comparison"]
    for table in ("comparison.csv", "comparison_paired.csv"):
        assert (rebuilt / table).read_text(encoding="utf-8") == (output / table).read_text(encoding="utf-8")


AUDIT_HOOK = """
import os
import sys

_forbidden = tuple(os.environ["FORBIDDEN_FOLDERS"].split(os.pathsep))
_log = os.environ["FORBIDDEN_LOG"]


def _record_forbidden(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(_forbidden):
            with open(_log, "a") as log:
                log.write(f"{event} {path}\\n")


sys.addaudithook(_record_forbidden)
"""


def test_tune_chooses_on_validation_and_never_opens_the_test_set(workspace, tmp_path):
    folders, env = workspace
    raw = folders["nnUNet_raw"] / SPARSE
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(AUDIT_HOOK, encoding="utf-8")
    log = tmp_path / "forbidden.log"
    python_path = os.pathsep.join(filter(None, [str(tmp_path / "hook"), env.get("PYTHONPATH")]))
    watched = dict(env, PYTHONPATH=python_path, FORBIDDEN_LOG=str(log),
                   FORBIDDEN_FOLDERS=os.pathsep.join(str(raw / f) for f in ("imagesTs", "labelsTs")))
    # the hook sees what a process opens there (and reaches subprocesses)
    run_checked([BIN / "python", "-c", f"import os; os.listdir({str(raw / 'labelsTs')!r})"], watched)
    assert "os.listdir" in log.read_text(encoding="utf-8")
    log.unlink()

    output = folders["nnUNet_results"] / "tuning"
    run_checked([BIN / "nnunet-weak", "tune", "-d", "951", "-tr", "ScribbleAttentionTrainer", "--grid", "crf_rampup=0",
                 "--budget", "smoke", "--device", "cpu", "--seeds", "1", "-o", output, "--records", tmp_path / "records"],
                watched)
    assert not log.exists(), log.read_text(encoding="utf-8")
    # its score records hold validation scores only
    records = [json.loads(f.read_text(encoding="utf-8")) for f in (tmp_path / "records").glob("*.json")]
    assert len(records) == 2 and all(r["test"] is None and set(r["validation"]) == {"0"} for r in records)

    def fold(root):
        return root / "nnunet_weak_seeds" / "seed_0" / SPARSE / "ScribbleAttentionTrainer__nnUNetPlans__2d" / "fold_0"

    folds = {"defaults": fold(folders["nnUNet_results"]),
             "crf_rampup=0": fold(folders["nnUNet_results"] / "nnunet_weak_options" / "crf_rampup=0")}
    assert json.loads((folds["crf_rampup=0"] / "nnunet_weak_run.json").read_text(encoding="utf-8"))["options"][
        "crf_rampup"] == 0
    assert json.loads((folds["defaults"] / "nnunet_weak_run.json").read_text(encoding="utf-8"))["options"][
        "crf_rampup"] == 0.5
    rows = {r["method"]: r for r in csv.DictReader((output / "tuning.csv").read_text(encoding="utf-8").splitlines())}
    assert set(rows) == set(folds)
    for method, folder in folds.items():
        summary = json.loads((folder / "validation" / "summary_dense.json").read_text(encoding="utf-8"))
        assert float(rows[method]["Dice mean"]) == pytest.approx(summary["foreground_mean"]["Dice"])
    paired = list(csv.DictReader((output / "tuning_paired.csv").read_text(encoding="utf-8").splitlines()))
    assert {r["split"] for r in paired} == {"validation"} and {r["method"] for r in paired} == {"crf_rampup=0"}
    assert {r["baseline"] for r in paired} == {"defaults"}
    table = (output / "tuning.md").read_text(encoding="utf-8")
    best = max(rows, key=lambda m: float(rows[m]["Dice mean"]))
    assert "Highest mean validation Dice: " + ("the defaults" if best == "defaults" else best) in table
    assert "no test case used" in table


def test_unlabelled_cases_never_reach_the_supervised_stream(workspace, monkeypatch):
    folders, env = workspace
    raw = folders["nnUNet_raw"]
    shutil.copytree(raw / SPARSE, raw / SEMI)
    manifest_file = raw / SEMI / "supervision.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    unlabelled = sorted(manifest["cases"])[:2]
    from nnunet_weak.raw_dataset import write_volume
    import SimpleITK as sitk
    for case in unlabelled:
        manifest["cases"][case]["supervision"] = "unlabelled"
        label_file = raw / SEMI / "labelsTr" / f"{case}.nii.gz"
        image = sitk.ReadImage(str(label_file))
        write_volume(np.full(sitk.GetArrayFromImage(image).shape, 4, np.uint8),
                     tuple(reversed(image.GetSpacing())), label_file)
    manifest_file.write_text(json.dumps(manifest))
    run_checked([BIN / "nnunet-weak", "plan_and_preprocess", "-d", "952", "-c", "2d", "-np", "2", "--plans_from", "950"], env)

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from nnunet_weak.training.weak_trainer import nnUNetWeakTrainer
    pre = folders["nnUNet_preprocessed"] / SEMI
    trainer = nnUNetWeakTrainer(dict(json.loads((pre / "nnUNetPlans.json").read_text(encoding="utf-8")), continue_training=False),
                                "2d", 0, json.loads((pre / "dataset.json").read_text(encoding="utf-8")), torch.device("cpu"))
    splits = json.loads((pre / "splits_final.json").read_text(encoding="utf-8"))[0]
    tr_keys, val_keys = trainer.do_split()
    assert set(tr_keys) == set(splits["train"]) - set(unlabelled)
    assert val_keys == splits["val"]
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    assert not set(dataset_tr.identifiers) & set(unlabelled)
