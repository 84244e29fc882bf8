"""ConfKDTrainer inside nnU-Net on a tiny mixed-supervision phantom (2 strong cases, 4 with scribbles):
strong and weak samples in every batch, both maps of a strong case aligned through augmentation, every
loss term and which branch it reaches, weak cases' dense labels never read, exact resume, DDP (gloo, two
processes), stock train → predict."""
import json

import numpy as np
import pytest
import SimpleITK as sitk


from conftest import (BIN, assert_predictor_reproduces_validation, copy_workspace, planned_phantom_semi, probe, run_checked,
                      scramble_preprocessed_labels, subprocess_env)

DENSE = "Dataset970_PhantomDense"
MIXED = "Dataset972_PhantomMixed"
TRAINER = "ConfKDTrainer"
STRONG = {"phantom_0000", "phantom_0001"}
IGNORE = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folders, env = planned_phantom_semi(tmp_path_factory.mktemp("confkd"), 970, 972, ("2d", "3d_fullres"),
                                        supervision="mixed", name="PhantomMixed")
    return folders, dict(env, nnUNet_n_proc_DA="0")


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_batches_mix_strong_and_weak_cases_and_every_term_acts(workspace, configuration):
    _, env = workspace
    result = probe(env, "steps", "972", configuration, TRAINER, "2")
    for composition in result["batches"]:
        strong = composition["strong"]
        # nnU-Net's planned batch (3 in 2D, 2 in 3D), half of it strong, rounded up
        assert strong == ([True, True, False] if configuration == "2d" else [True, False])
        for key, is_strong in zip(composition["keys"], strong):
            assert (key in STRONG) == is_strong
    for step in result["losses"]:
        assert all(np.isfinite(v) for v in step.values())
        assert step["teacher_dense"] > 0 and step["student_weak"] > 0
        assert step["kl_teacher_student"] > 0 and step["student_entropy"] > 0
        assert step["loss"] == pytest.approx(step["teacher_dense"] + step["student_weak"] + step["kl_teacher_student"]
                                             + 0.1 * step["student_entropy"], rel=1e-5)
    gradients = result["parameters"]
    assert gradients["second_decoder.seg_layers.2.weight"][1] > 0
    assert gradients["inference_network.decoder.seg_layers.2.weight"][1] > 0
    assert not any(name.startswith("second_decoder.encoder") for name in gradients)


def test_the_dense_cases_only_baseline_never_sees_a_weak_case(workspace):
    _, env = workspace
    result = probe(env, "steps", "972", "2d", "nnUNetWeakTrainer_denseCasesOnly", "3")
    assert {key for batch in result["batches"] for key in batch["keys"]} == STRONG


@pytest.mark.parametrize("trainer, teacher_prefix, student_prefix", [
    (TRAINER, "second_decoder.", "inference_network.decoder."),
    ("ConfKDTrainer_predictWithTeacher", "inference_network.decoder.", "second_decoder.")])
def test_the_teacher_learns_from_dense_labels_only_unless_the_kl_term_may_reach_it(workspace, trainer, teacher_prefix,
                                                                                  student_prefix):
    _, env = workspace

    def first_step_gradients(options):
        parameters = probe(dict(env, NNUNET_WEAK_TRAINER_OPTIONS=options), "steps", "972", "2d", trainer, "1")["parameters"]
        return {name: g for name, (_, g) in parameters.items()}

    base = first_step_gradients("lambda_kl=1,lambda_entropy=0.1,detach_teacher=1")
    more_entropy = first_step_gradients("lambda_kl=1,lambda_entropy=2,detach_teacher=1")
    more_kl = first_step_gradients("lambda_kl=3,lambda_entropy=0.1,detach_teacher=1")
    both_branches = first_step_gradients("lambda_kl=3,lambda_entropy=0.1,detach_teacher=0")
    no_kl_not_detached = first_step_gradients("lambda_kl=0,lambda_entropy=0.1,detach_teacher=0")
    teacher = [n for n in base if n.startswith(teacher_prefix) and base[n] is not None]
    student = [n for n in base if n.startswith(student_prefix) and base[n] is not None]
    assert teacher and student
    # detached, the first step's teacher gradient sees only the dense loss: the terms on the student do not reach it
    assert all(base[n] == more_entropy[n] == more_kl[n] for n in teacher)
    assert any(base[n] != more_entropy[n] for n in student) and any(base[n] != more_kl[n] for n in student)
    # with detach_teacher=0 the KL term moves the teacher too, and without a KL term nothing but the dense loss does
    assert any(more_kl[n] != both_branches[n] for n in teacher)
    assert all(base[n] == no_kl_not_detached[n] for n in teacher)


def test_a_strong_case_weak_and_dense_maps_stay_aligned_through_augmentation(workspace, tmp_path):
    folders, _ = workspace
    copies = copy_workspace(folders, tmp_path)
    # the known pattern: each strong case's weak label is its dense label on a checkerboard, ignore elsewhere
    raw = copies["nnUNet_raw"] / MIXED
    for case in STRONG:
        dense = sitk.ReadImage(str(raw / "labelsTr_dense" / f"{case}.nii.gz"))
        labels = sitk.GetArrayFromImage(dense)
        checkerboard = np.indices(labels.shape).sum(0) % 2 == 0
        weak = sitk.GetImageFromArray(np.where(checkerboard, labels, IGNORE).astype(labels.dtype))
        weak.CopyInformation(dense)
        sitk.WriteImage(weak, str(raw / "labelsTr_weak" / f"{case}.nii.gz"))
    env = subprocess_env(copies, NNUNET_WEAK_BUDGET="smoke", nnUNet_n_proc_DA="0")
    batches = probe(env, "targets", "972", "2d", TRAINER, "6")
    annotated = ignored = disagreeing = disagreeing_if_shifted = 0
    for batch in batches:
        for scales in zip(*batch["target"]):  # per sample: its (2, *scale) target at every scale
            assert all(np.asarray(s).shape[0] == 2 for s in scales)
        full_resolution = np.asarray(batch["target"][0])
        for sample, is_strong in zip(full_resolution, batch["strong"]):
            labels_tr, weak = sample
            if is_strong:
                assert IGNORE not in labels_tr
                where = weak != IGNORE
                annotated, ignored = annotated + where.sum(), ignored + (~where).sum()
                disagreeing += (weak[where] != labels_tr[where]).sum()
                disagreeing_if_shifted += (weak[where] != np.roll(labels_tr, 1, axis=-1)[where]).sum()
            else:  # a weak case's weak map is its labelsTr map
                np.testing.assert_array_equal(weak, labels_tr)
    # the pattern survived: about half of the strong samples' voxels annotated (rotation and scaling resample it)
    assert 0.3 < annotated / (annotated + ignored) < 0.7
    # each channel is resampled as its own label map, so a rotated checkerboard may pick another of the labels
    # meeting at a class boundary than the dense map does: a few voxels; a one-voxel shift would be many more
    assert disagreeing / annotated < 0.02 < 5 * disagreeing_if_shifted / annotated


def test_dense_labels_of_weak_cases_never_reach_a_loss(workspace, tmp_path):
    folders, _ = workspace
    copies = copy_workspace(folders, tmp_path)
    env = subprocess_env(copies, NNUNET_WEAK_BUDGET="smoke", nnUNet_n_proc_DA="0")
    before = probe(env, "steps", "972", "2d", TRAINER, "3")

    rng = np.random.default_rng(0)
    manifest = json.loads((copies["nnUNet_raw"] / MIXED / "supervision.json").read_text(encoding="utf-8"))["cases"]
    weak_cases = [case for case, entry in manifest.items() if entry["supervision"] == "sparse"]
    assert len(weak_cases) == 4
    scrambled = 0
    for case in weak_cases:
        for dense_file in (copies["nnUNet_raw"] / MIXED / manifest[case]["dense_label"],
                           copies["nnUNet_raw"] / DENSE / "labelsTr" / f"{case}.nii.gz"):
            image = sitk.ReadImage(str(dense_file))
            noise = sitk.GetImageFromArray(rng.integers(0, 4, sitk.GetArrayFromImage(image).shape).astype(np.uint8))
            noise.CopyInformation(image)
            sitk.WriteImage(noise, str(dense_file))
            scrambled += 1
        for configuration in ("2d", "3d_fullres"):
            scramble_preprocessed_labels(copies["nnUNet_preprocessed"] / DENSE / f"nnUNetPlans_{configuration}", [case],
                                         rng)
            scrambled += 1
    assert scrambled == 16
    after = probe(env, "steps", "972", "2d", TRAINER, "3")
    assert after == before


def test_weak_maps_are_the_preprocessed_weak_labels_and_bad_ones_are_refused(workspace, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_weak.errors import UserInputError
    from nnunet_weak.training.mixed_supervision import write_weak_target_maps
    folders, _ = workspace
    raw, preprocessed = folders["nnUNet_raw"] / MIXED, folders["nnUNet_preprocessed"] / MIXED
    plans = PlansManager(str(preprocessed / "nnUNetPlans.json"))
    dataset_json = json.loads((preprocessed / "dataset.json").read_text(encoding="utf-8"))
    cases = nnUNetDatasetBlosc2(str(preprocessed / "nnUNetPlans_2d"))

    def write(folder, weak_label):
        strong = {"phantom_0000": ([raw / "imagesTr" / "phantom_0000_0000.nii.gz"], weak_label)}
        return write_weak_target_maps(folder, strong, ["phantom_0002"], preprocessed / "nnUNetPlans_2d",
                                      nnUNetDatasetBlosc2, plans, plans.get_configuration("2d"), dataset_json)

    folder = write(tmp_path / "maps", raw / "labelsTr_weak" / "phantom_0000.nii.gz")
    assert sorted(p.name for p in folder.iterdir()) == ["phantom_0000.b2nd", "phantom_0002.b2nd"]
    maps = nnUNetDatasetBlosc2(str(preprocessed / "nnUNetPlans_2d"), ["phantom_0000", "phantom_0002"],
                               folder_with_segs_from_previous_stage=str(folder))
    np.testing.assert_array_equal(np.asarray(maps.load_case("phantom_0002")[2]),
                                  np.asarray(cases.load_case("phantom_0002")[1])[0])
    weak, dense = np.asarray(maps.load_case("phantom_0000")[2]), np.asarray(cases.load_case("phantom_0000")[1])[0]
    scribbled = weak != IGNORE
    assert weak.shape == dense.shape and 0 < scribbled.mean() < 0.5
    assert (weak[scribbled] == dense[scribbled]).mean() > 0.95  # scribbles lie inside their class

    with pytest.raises(UserInputError, match="is missing"):
        write(tmp_path / "missing", raw / "labelsTr_weak" / "nowhere.nii.gz")
    cropped = tmp_path / "cropped.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(raw / "labelsTr_weak" / "phantom_0000.nii.gz"))[:20], str(cropped))
    with pytest.raises(UserInputError, match="not on the image's grid"):
        write(tmp_path / "cropped", cropped)
    assert not any(p.name.startswith(("missing", "cropped.")) and p.is_dir() for p in tmp_path.iterdir())


def test_resume_restores_both_decoders_exactly(workspace):
    _, env = workspace
    result = probe(env, "resume", "972", "2d", TRAINER, "2")
    assert result["same_keys"] and result["same_state"] and result["same_after_step"]


def test_ddp_keeps_both_decoders_in_sync_with_strong_and_weak_samples_per_rank(workspace):
    _, env = workspace
    result = probe(env, "ddp", "972", "2d", TRAINER, "3")
    assert result["modules_with_parameters_outside_network"] == []
    assert result["different"] == []
    assert [loss["strong"] for loss in result["losses"]] == [[True, True, False]] * 2
    assert result["losses"][0]["loss"] != result["losses"][1]["loss"]


@pytest.mark.slow
def test_stock_train_then_predict_uses_the_student_decoder(workspace, tmp_path):
    folders, env = workspace
    env = dict(env, nnUNet_n_proc_DA="1", NNUNET_WEAK_TRAINER_OPTIONS="lambda_entropy=0.2")
    run_checked([BIN / "nnUNetv2_train", "972", "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    fold = folders["nnUNet_results"] / MIXED / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    assert json.loads((fold / "nnunet_weak_run.json").read_text(encoding="utf-8"))["options"]["lambda_entropy"] == 0.2
    assert (fold / "validation" / "summary_dense.json").is_file()

    assert_predictor_reproduces_validation(folders, env, MIXED, TRAINER, tmp_path)


@pytest.mark.parametrize("trainer, stays_compiled", [("nnUNetWeakTrainer", True), (TRAINER, False)])
def test_torch_compile_leaves_checkpoints_the_predictor_loads(workspace, tmp_path, trainer, stays_compiled):
    # nnU-Net compiles on CUDA; a compiled module inside a TrainingNetwork would save '_orig_mod.' keys
    _, env = workspace
    result = probe(env, "compiled", "972", "2d", trainer, str(tmp_path / "checkpoint.pth"))
    assert (result["network"] == "OptimizedModule") == stays_compiled
    assert result["keys"] and not any("_orig_mod" in key for key in result["keys"])
    assert any(key.startswith("encoder.stages.0.") for key in result["keys"])
