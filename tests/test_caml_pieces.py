"""CAML's pieces on their own: the second network's up-sampling, the decoder feature tap, cross-sample
attention, the omni-correlation loss and its voxel choice, the memory bank (with two gloo ranks)."""
import copy
import math

import pytest
import torch

from nnunet_weak.losses.omni_correlation import agreeing_confident_voxels, omni_correlation_loss
from nnunet_weak.networks.cross_sample_attention import CrossSampleMutualAttention
from nnunet_weak.networks.decoder_stages import (InterpolatingUpsampling, bottleneck_features, decoder_stage_features,
                                                 last_decoder_features, use_interpolating_upsampling)
from nnunet_weak.training.memory_bank import ClassMemoryBank, correctly_predicted_labelled_voxels, evenly_spaced

from conftest import small_unet


@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_interpolating_upsampling_keeps_every_shape_and_changes_the_output(kind, dims, mode):
    torch.manual_seed(0)
    network = small_unet(kind, dims)
    x = torch.randn(2, 1, *([16] * dims))
    before = network(x)
    use_interpolating_upsampling(network, mode)
    assert all(isinstance(t, InterpolatingUpsampling) for t in network.decoder.transpconvs)
    after = network(x)
    assert [o.shape for o in after] == [o.shape for o in before]
    assert not torch.allclose(after[0], before[0])
    with pytest.raises(TypeError, match="already replaced"):
        use_interpolating_upsampling(network, mode)


def test_feature_taps_record_the_decoder_stages_and_the_bottleneck():
    torch.manual_seed(0)
    network = small_unet("plain", 2)
    tap, stages = last_decoder_features(network), decoder_stage_features(network)
    bottleneck = bottleneck_features(network)
    assert tap.features is None
    network.decoder.deep_supervision = False
    x = torch.randn(2, 1, 16, 16)
    logits = network(x)
    assert tap.features.shape == (2, 4, 16, 16)
    torch.testing.assert_close(network.decoder.seg_layers[-1](tap.features), logits)
    assert [t.features.shape for t in stages] == [(2, 16, 4, 4), (2, 8, 8, 8), (2, 4, 16, 16)]
    assert stages[-1].features is tap.features
    torch.testing.assert_close(bottleneck.features, network.encoder(x)[-1])


@pytest.mark.parametrize("dims", [2, 3])
def test_cross_sample_attention_mixes_samples_in_training_only(dims):
    torch.manual_seed(0)
    attention = CrossSampleMutualAttention(8, num_heads=4, dropout=0.0)
    x = torch.randn(3, 8, *([4] * dims))
    changed = x.clone()
    changed[2] += torch.randn_like(changed[2])
    attention.train()
    out, out_changed = attention(x), attention(changed)
    assert out.shape == x.shape
    # sample 2 changed: samples 0 and 1 see it through the cross-sample layer
    assert not torch.allclose(out[0], out_changed[0]) and not torch.allclose(out[1], out_changed[1])
    attention.eval()
    assert torch.equal(attention(x), x) and torch.equal(attention(changed)[0], x[0])


def test_cross_sample_attention_is_the_two_layers_in_that_order():
    torch.manual_seed(0)
    attention = CrossSampleMutualAttention(8, num_heads=2, dropout=0.0).train()
    x = torch.randn(2, 8, 3, 5)
    tokens = x.flatten(2).transpose(1, 2)
    intra = torch.stack([attention.intra_sample(tokens[b:b + 1])[0] for b in range(2)])
    positions = [attention.cross_sample(intra[:, n][None])[0] for n in range(15)]
    expected = torch.stack(positions, dim=1).transpose(1, 2).reshape(2, 8, 3, 5)
    torch.testing.assert_close(attention(x), expected)
    with pytest.raises(ValueError, match="expected"):
        attention(torch.randn(2, 4, 3, 5))


def test_agreeing_confident_voxels_against_explicit_selection():
    torch.manual_seed(0)
    first = torch.softmax(torch.randn(200, 3), dim=1)
    second = torch.softmax(torch.randn(200, 3), dim=1)
    chosen = agreeing_confident_voxels(first, second, max_per_class=7)
    expected = []
    for c in range(3):
        voxels = [i for i in range(200) if int(first[i].argmax()) == c and int(second[i].argmax()) == c]
        voxels.sort(key=lambda i: -float(first[i].max()))
        expected += voxels[:7]
    assert chosen.tolist() == expected


def test_agreeing_confident_voxels_is_empty_where_the_networks_never_agree():
    first = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert agreeing_confident_voxels(first, first.flip(1)).numel() == 0


def test_omni_correlation_loss_against_explicit_loops_and_gradcheck():
    torch.manual_seed(0)
    r1 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    r2 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(6, 4, dtype=torch.float64)
    total = 0.0
    for i in range(5):
        logits1 = [float(r1[i].detach() @ memory[j]) / 0.1 for j in range(6)]
        logits2 = [float(r2[i].detach() @ memory[j]) / 0.1 for j in range(6)]
        norm1 = sum(math.exp(v) for v in logits1)
        norm2 = sum(math.exp(v) for v in logits2)
        total += -sum(math.exp(logits2[j]) / norm2 * math.log(math.exp(logits1[j]) / norm1) for j in range(6))
    assert omni_correlation_loss(r1, r2, memory).item() == pytest.approx(total / 5, rel=1e-9)
    assert omni_correlation_loss(r1, r2, memory, rows_per_chunk=2).item() == pytest.approx(total / 5, rel=1e-9)
    for rows_per_chunk in (None, 2, 1):   # one chunk; uneven chunks; a row at a time
        assert torch.autograd.gradcheck(lambda a, b: omni_correlation_loss(a, b, memory, rows_per_chunk=rows_per_chunk),
                                        (r1, r2))


def test_omni_correlation_loss_gradients_match_autograd_through_the_plain_formula():
    torch.manual_seed(1)
    r1 = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    r2 = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(30, 8, dtype=torch.float64)
    plain = -(torch.softmax(r2 @ memory.T / 0.1, 1) * torch.log_softmax(r1 @ memory.T / 0.1, 1)).sum(1).mean()
    expected = torch.autograd.grad(3 * plain, (r1, r2))
    chunked = torch.autograd.grad(3 * omni_correlation_loss(r1, r2, memory, rows_per_chunk=7), (r1, r2))
    for got, want in zip(chunked, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_omni_correlation_loss_is_zero_without_voxels_or_memory():
    r = torch.randn(3, 4, requires_grad=True)
    assert omni_correlation_loss(r, r, torch.zeros(0, 4)).item() == 0
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = omni_correlation_loss(empty, empty, torch.randn(5, 4))
    loss.backward()
    assert loss.item() == 0


def test_correctly_predicted_labelled_voxels_needs_an_annotation_and_both_networks_right():
    target = torch.tensor([0, 1, 2, 3, 1, 1])          # 3 = ignore
    first = torch.tensor([0, 1, 2, 1, 0, 1])
    second = torch.tensor([0, 1, 1, 1, 1, 1])
    mask = correctly_predicted_labelled_voxels(first, second, target, ignore_label=3)
    assert mask.tolist() == [True, True, False, False, False, True]


def test_memory_bank_is_a_fifo_queue_per_class():
    bank = ClassMemoryBank(num_classes=2, dim=1, capacity=4, entries_per_step=3)
    bank.enqueue(torch.arange(5.0)[:, None], torch.tensor([0, 0, 0, 0, 1]))
    # class 0: three of its four offers, evenly spaced; class 1: its one offer
    assert bank.filled.tolist() == [3, 1]
    assert bank.memory().flatten().tolist() == [0.0, 1.0, 2.0, 4.0]
    bank.enqueue(torch.tensor([[10.0], [11.0]]), torch.tensor([0, 0]))
    assert bank.filled.tolist() == [4, 1]
    # the oldest entry of class 0 was overwritten by the newest
    assert sorted(bank.memory().flatten().tolist()) == [1.0, 2.0, 4.0, 10.0, 11.0]
    assert bank.entries[0, 0].item() == 11.0
    assert evenly_spaced(10, 4).tolist() == [0, 2, 5, 7] and evenly_spaced(3, 4).tolist() == [0, 1, 2]


def _bank_on_two_ranks(rank, folder):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    bank = ClassMemoryBank(num_classes=2, dim=2, capacity=8, entries_per_step=8)
    # rank 0 offers 3 class-0 entries, rank 1 offers 1 class-0 and 2 class-1 entries
    if rank == 0:
        bank.enqueue(torch.tensor([[1.0, 1], [2, 2], [3, 3]]), torch.tensor([0, 0, 0]))
    else:
        bank.enqueue(torch.tensor([[4.0, 4], [5, 5], [6, 6]]), torch.tensor([0, 1, 1]))
    torch.save(bank.state_dict(), f"{folder}/bank{rank}.pt")
    dist.destroy_process_group()


def test_memory_bank_gathers_every_rank_and_ends_identical(tmp_path):
    torch.multiprocessing.spawn(_bank_on_two_ranks, args=(str(tmp_path),), nprocs=2)
    states = [torch.load(tmp_path / f"bank{r}.pt") for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key])
    bank = ClassMemoryBank(num_classes=2, dim=2, capacity=8, entries_per_step=8)
    bank.load_state_dict(states[0])
    assert bank.filled.tolist() == [4, 2]
    assert bank.memory()[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_the_bank_takes_only_annotated_labelled_voxels_that_both_networks_predict_correctly():
    from types import SimpleNamespace

    from nnunet_weak.networks.mutual_learning import MutualLearningNetworks, MutualLearningOutput
    from nnunet_weak.trainers.CAMLTrainer import CAMLTrainer

    torch.manual_seed(0)
    networks = MutualLearningNetworks(small_unet("plain", 2), small_unet("plain", 2), num_classes=3)
    trainer = SimpleNamespace(label_manager=SimpleNamespace(ignore_label=3))
    target = torch.randint(0, 3, (2, 1, 4, 4))
    target[0, 0, 0] = 3                                   # four un-annotated voxels of the labelled sample
    labelled = torch.tensor([True, False])
    first_labels, second_labels = target[:, 0].clone() % 3, target[:, 0].clone() % 3
    first_labels[0, 1, :2] = (first_labels[0, 1, :2] + 1) % 3      # the first network wrong at two voxels
    second_labels[0, 2, 1:] = (second_labels[0, 2, 1:] + 1) % 3    # the second wrong at three
    target[1] = 0                                         # garbage on the unlabelled sample: never read
    first = torch.nn.functional.one_hot(first_labels, 3).movedim(-1, 1).float()
    second = torch.nn.functional.one_hot(second_labels, 3).movedim(-1, 1).float()
    output = MutualLearningOutput([first], [second], torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4),
                                  torch.zeros(0, 32), torch.zeros(0, 32), False)
    CAMLTrainer._update_memory_bank(trainer, networks, output, first, second, target, labelled)

    correct = (target[0, 0] != 3) & (first_labels[0] == target[0, 0]) & (second_labels[0] == target[0, 0])
    expected = [int((correct & (target[0, 0] == c)).sum()) for c in range(3)]
    assert sum(expected) == 16 - 4 - 2 - 3
    assert networks.memory_bank.filled.tolist() == expected


def _head_calls(networks) -> dict:
    """Per head, the training flags of its BatchNorm at each call (filled by forward hooks)."""
    calls = {}
    for name in ("first_projection", "first_prediction", "second_projection", "second_prediction"):
        norm = getattr(networks, name)[1]
        calls[name] = []
        norm.register_forward_hook(lambda module, inputs, output, name=name: calls[name].append(module.training))
    return calls


def test_omni_queries_embed_the_chosen_unlabelled_voxels_and_run_every_head_once_whatever_the_data():
    from nnunet_weak.networks.mutual_learning import MutualLearningNetworks, voxel_rows

    torch.manual_seed(0)
    networks = MutualLearningNetworks(small_unet("plain", 2), small_unet("plain", 2), num_classes=3,
                                      omni_voxels_per_class=5)
    calls = _head_calls(networks)
    logits = torch.randn(3, 3, 4, 4)
    features = [torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)]
    labelled = torch.tensor([True, False, False])
    first_queries, second_queries, chosen = networks.omni_queries(logits, logits, *features, labelled)
    probabilities = torch.softmax(logits[1:], 1).movedim(1, -1).reshape(-1, 3)
    voxels = agreeing_confident_voxels(probabilities, probabilities, 5)
    assert chosen and len(voxels) == 15
    assert calls == {name: [True] for name in calls}
    assert first_queries.shape == second_queries.shape == (15, 32)
    # the heads' training-mode output on exactly the chosen voxels (copies, so that the hooks do not count them)
    for (projection, prediction), rows, queries in (
            (("first_projection", "first_prediction"), voxel_rows(features[0][1:], voxels), first_queries),
            (("second_projection", "second_prediction"), voxel_rows(features[1][1:], voxels), second_queries)):
        heads = copy.deepcopy(torch.nn.Sequential(getattr(networks, projection), getattr(networks, prediction)))
        torch.testing.assert_close(queries, heads(rows))

    # a rank whose batch has no unlabelled sample, or networks that agree nowhere: the same calls, flagged unusable
    for labels, second in ((torch.ones(3, dtype=torch.bool), logits), (labelled, -logits)):
        for name in calls:
            calls[name].clear()
        first_queries, second_queries, chosen = networks.omni_queries(logits, second, *features, labels)
        assert not chosen and first_queries.shape == second_queries.shape == (2, 32)
        assert calls == {name: [True] for name in calls}


def test_memory_entries_use_the_heads_in_eval_mode_and_leave_their_statistics_alone():
    from nnunet_weak.networks.mutual_learning import MutualLearningNetworks

    torch.manual_seed(0)
    networks = MutualLearningNetworks(small_unet("plain", 2), small_unet("plain", 2), num_classes=3)
    for head in (networks.first_projection, networks.second_projection):  # running statistics away from (0, 1)
        head[1].running_mean.uniform_(-1, 1)
        head[1].running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in networks.state_dict().items()}
    calls = _head_calls(networks)
    first_rows, second_rows = torch.randn(1, 4), torch.randn(1, 4)  # one row: a training-mode BatchNorm refuses it
    entries = networks.memory_entries(first_rows, second_rows)

    def eval_projection(head, rows):
        norm = head[1]
        hidden = (head[0](rows) - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
        return head[3](torch.relu(hidden))

    expected = (eval_projection(networks.first_projection, first_rows)
                + eval_projection(networks.second_projection, second_rows)) / 2
    torch.testing.assert_close(entries, expected)
    assert not entries.requires_grad
    assert calls["first_projection"] == calls["second_projection"] == [False]
    assert networks.training and networks.first_projection.training and networks.second_projection.training
    assert all(torch.equal(before[k], v) for k, v in networks.state_dict().items())
