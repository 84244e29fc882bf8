"""A second decoder on the planned network's encoder: shared encoder, own weights, one set of parameters."""
import pytest
import torch

from conftest import small_unet
from nnunet_weak.networks.second_decoder import TwoDecoderNetwork, planned_weights_with_second_decoder


def decoder_parameters(network):
    encoder = {id(p) for p in network.encoder.parameters()}
    return [p for p in network.decoder.parameters() if id(p) not in encoder]


@pytest.mark.parametrize("kind,dims", [("plain", 2), ("residual", 2), ("plain", 3), ("residual", 3)])
def test_two_decoders_share_one_encoder(kind, dims):
    torch.manual_seed(0)
    planned = small_unet(kind, dims)
    network = TwoDecoderNetwork(planned)
    shape = (2, 1, 32, 32) if dims == 2 else (2, 1, 8, 32, 32)
    x = torch.randn(shape)

    # every parameter once: the planned network's and the second decoder's own, no second encoder
    own = decoder_parameters(planned)
    assert len(list(network.parameters())) == len(list(planned.parameters())) + len(own)
    assert all("encoder" not in key for key in network.training_state_dict())
    assert all(key.startswith("second_decoder.") for key in network.training_state_dict())
    # drawn anew, not a copy of the planned decoder's weights
    assert not any(torch.equal(a, b) for a, b in zip(own, network.second_decoder.parameters()) if a.dim() > 1)

    network.train()
    planned_out, second_out = network(x)
    assert [o.shape for o in planned_out] == [o.shape for o in second_out]
    torch.testing.assert_close(planned_out[0], planned(x)[0])

    # the second decoder's loss trains the shared encoder and itself, not the planned decoder
    network.zero_grad()
    sum(o.square().mean() for o in second_out).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in planned.encoder.parameters() if p.dim() > 1)
    assert all(p.grad is None for p in own)
    assert all(p.grad is not None for p in network.second_decoder.parameters() if p.dim() > 1)

    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(network(x)[0], planned(x)[0])


def test_deep_supervision_switch_reaches_both_decoders():
    network = TwoDecoderNetwork(small_unet("plain", 2))
    network.set_deep_supervision_enabled(False)
    network.train()
    planned_out, second_out = network(torch.randn(1, 1, 32, 32))
    assert planned_out.shape == second_out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("which", ["planned", "second"])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_samples_decoded_without_gradient_give_the_same_outputs_and_no_gradient(which, norm):
    torch.manual_seed(0)
    planned = small_unet("plain", 2)
    if norm == "batch":
        for stage in planned.modules():
            for name, child in list(stage.named_children()):
                if isinstance(child, torch.nn.InstanceNorm2d):
                    setattr(stage, name, torch.nn.BatchNorm2d(child.num_features))
    network = TwoDecoderNetwork(planned)
    assert (norm == "batch") == any(isinstance(m, torch.nn.BatchNorm2d) for m in network.second_decoder.modules())
    network.train()
    x = torch.randn(4, 1, 32, 32)
    frozen = torch.tensor([False, True, False, True])
    reference = network(x)
    outputs = network(x, **{f"{which}_without_gradient": frozen})
    for reference_scales, scales in zip(reference, outputs):
        for a, b in zip(reference_scales, scales):
            torch.testing.assert_close(a, b)
    branch = outputs[0] if which == "planned" else outputs[1]
    # the loss of the frozen samples reaches nothing; that of the others is unchanged
    network.zero_grad()
    sum(o[frozen].sum() for o in branch).backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in network.parameters())
    network.zero_grad()
    sum(o[~frozen].square().mean() for o in branch).backward()
    with_mask = [p.grad.clone() for p in network.parameters() if p.grad is not None]
    network.zero_grad()
    sum(o[~frozen].square().mean() for o in (reference[0] if which == "planned" else reference[1])).backward()
    without_mask = [p.grad for p in network.parameters() if p.grad is not None]
    assert len(with_mask) == len(without_mask) > 0
    for a, b in zip(with_mask, without_mask):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_the_second_decoder_loaded_into_the_planned_network_computes_what_it_computed(kind):
    torch.manual_seed(0)
    network = TwoDecoderNetwork(small_unet(kind, 2))
    x = torch.randn(2, 1, 32, 32)
    network.train()
    _, second_out = network(x)
    weights = planned_weights_with_second_decoder(network.inference_network.state_dict(),
                                                  network.training_state_dict())
    rebuilt = small_unet(kind, 2)
    rebuilt.load_state_dict(weights)
    rebuilt.train()
    for rebuilt_output, second_output in zip(rebuilt(x), second_out):
        torch.testing.assert_close(rebuilt_output, second_output)
    # the planned decoder's own weights are gone, the encoder's kept
    planned_output = network.inference_network(x)[0]
    assert not torch.allclose(rebuilt(x)[0], planned_output)
    assert all(torch.equal(weights[k], v) for k, v in network.inference_network.state_dict().items()
               if k.startswith("encoder."))


def test_weights_from_another_network_are_refused_by_name():
    network = TwoDecoderNetwork(small_unet("plain", 2))
    other = TwoDecoderNetwork(small_unet("residual", 2))
    with pytest.raises(ValueError, match="no second decoder"):
        planned_weights_with_second_decoder(network.inference_network.state_dict(), {})
    with pytest.raises(ValueError, match="no counterpart in the second decoder"):
        planned_weights_with_second_decoder(network.inference_network.state_dict(), other.training_state_dict())
    with pytest.raises(ValueError, match="no weight of the same name and shape"):
        planned_weights_with_second_decoder(other.inference_network.state_dict(), network.training_state_dict())
