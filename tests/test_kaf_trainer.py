"""KAF's two trainers inside nnU-Net on a tiny phantom: every pre-training term acts on pairs of neighbouring
slices, no label is read, the decoder is not trained, exact resume; the pre-training checkpoint loads into the
fine-tuning trainer's encoder strictly (a deeper or shallower attention stack is refused) with a fresh decoder;
stock train → predict reproduces the validation."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch


from conftest import (PROBE, assert_predictor_reproduces_validation, copy_workspace, planned_phantom_semi, probe,
                      scramble_preprocessed_labels, stock_pretrain_then_finetune, subprocess_env)

SEMI = "Dataset992_PhantomSemi"
PRETRAIN = "KAFPretrainTrainer"
FINETUNE = "KAFTrainer"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folders, env = planned_phantom_semi(tmp_path_factory.mktemp("kaf"), 990, 992, ("2d",))
    # three pairs per batch: with one pair, each slice's only other is its positive and contrast is trivially 0
    plans_file = folders["nnUNet_preprocessed"] / SEMI / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    plans["configurations"]["2d"]["batch_size"] = 6
    plans_file.write_text(json.dumps(plans), encoding="utf-8")
    return folders, dict(env, nnUNet_n_proc_DA="0")


def test_pretraining_terms_act_on_neighbouring_slices_and_leave_the_decoder_alone(workspace):
    _, env = workspace
    result = probe(env, "steps", "992", "2d", PRETRAIN, "2")
    for composition in result["batches"]:
        keys, partner, positions = composition["keys"], composition["neighbour"], composition["slice_position"]
        pairs = len(keys) // 2
        assert partner == list(range(pairs, 2 * pairs)) + list(range(pairs))
        for i in range(pairs):
            assert keys[i] == keys[partner[i]] and 0 < abs(positions[i] - positions[partner[i]]) <= 0.5
    for step in result["losses"]:
        assert step["global_cnn"] > 0 and step["global_keypoint"] > 0 and step["correspondence"] > 0
        assert step["loss"] == pytest.approx(step["global_cnn"] + step["global_keypoint"]
                                             + 0.01 * step["correspondence"], rel=1e-5)
    gradients = result["parameters"]
    assert all(g is None for name, (_, g) in gradients.items() if ".decoder." in name)
    for name in ("bottleneck_head.0.weight", "keypoint_head.0.weight", "match_projection.weight", "dustbin",
                 "inference_network.encoder.stages.0.block.attention.layers.0.self_attn.in_proj_weight"):
        assert gradients[name][1] > 0, name


def test_pretraining_reads_no_label(workspace, tmp_path):
    folders, _ = workspace
    copies = copy_workspace(folders, tmp_path)
    env = subprocess_env(copies, NNUNET_WEAK_BUDGET="smoke", nnUNet_n_proc_DA="0")
    before = probe(env, "steps", "992", "2d", PRETRAIN, "2")
    preprocessed = copies["nnUNet_preprocessed"] / SEMI / "nnUNetPlans_2d"
    cases = [f.name[:-len("_seg.b2nd")] for f in preprocessed.glob("*_seg.b2nd")]
    scramble_preprocessed_labels(preprocessed, cases, np.random.default_rng(0))
    assert probe(env, "steps", "992", "2d", PRETRAIN, "2")["losses"] == before["losses"]


def test_pretraining_resumes_exactly(workspace):
    _, env = workspace
    result = probe(env, "resume", "992", "2d", PRETRAIN, "2")
    assert result["same_keys"] and result["same_state"] and result["same_after_step"]


def test_the_encoder_loads_strictly_and_the_decoder_starts_fresh(workspace, tmp_path):
    _, env = workspace
    checkpoint = tmp_path / "pretrained.pth"
    probe(env, "checkpoint", "992", "2d", PRETRAIN, str(checkpoint))
    saved = torch.load(checkpoint, weights_only=False)
    weights = saved["network_weights"]
    # pre-training leaves the decoder as initialised, as the fine-tuning's is: mark it to see it is not loaded
    marked = {k: v + 1 if k.startswith("decoder.") and not k.startswith("decoder.encoder.") and v.is_floating_point()
              else v for k, v in weights.items()}
    torch.save(dict(saved, network_weights=marked), checkpoint)
    finetune = probe(env, "pretrained", "992", "2d", FINETUNE, str(checkpoint))
    different = finetune["different_planned"]
    assert different and all(k.startswith("decoder.") and not k.startswith("decoder.encoder.") for k in different)
    # everything else, the encoder with every fusion layer, is the pre-trained one
    assert finetune["same_planned"] == finetune["planned_keys"] - len(different)
    assert any(".block.attention." in k for k in weights if not k.startswith("decoder."))
    assert finetune["record"]["trainer"] == PRETRAIN

    layer = "encoder.stages.0.block.attention.layers."
    # a pre-training with a deeper attention stack (the authors' flaw, the other way round) ...
    deeper = dict(weights, **{k.replace(layer + "1.", layer + "2."): v for k, v in weights.items()
                              if k.startswith(layer + "1.")})
    # ... and with a shallower one
    shallower = {k: v for k, v in weights.items() if not k.startswith(layer + "1.")}
    for variant, message in ((deeper, "they have 'encoder.stages.0.block.attention.layers.2."),
                             (shallower, "it has no 'encoder.stages.0.block.attention.layers.1.")):
        torch.save(dict(saved, network_weights=variant), tmp_path / "variant.pth")
        refused = subprocess.run([sys.executable, str(PROBE), "pretrained", "992", "2d", FINETUNE,
                                  str(tmp_path / "variant.pth")], env=env, capture_output=True, text=True)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr.split("UserInputError")[-1]


def test_ddp_keeps_the_pretraining_network_and_heads_identical(workspace):
    _, env = workspace
    result = probe(env, "ddp", "992", "2d", PRETRAIN, "2")
    # the frozen decoder is outside DDP's reduction; everything trained is synchronised
    assert result["modules_with_parameters_outside_network"] == [] and result["different"] == []
    assert all(loss["correspondence"] > 0 for loss in result["losses"])


@pytest.mark.slow
def test_stock_pretrain_then_finetune_then_predict(workspace, tmp_path):
    folders, env = workspace
    env = dict(env, nnUNet_n_proc_DA="1")
    stock_pretrain_then_finetune(folders, env, "992", SEMI, PRETRAIN, FINETUNE)
    assert_predictor_reproduces_validation(folders, env, SEMI, FINETUNE, tmp_path)
