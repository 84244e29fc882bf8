"""The one mechanism that reaches into the auto-planned encoder, extended for KAF: a block that also sees the
network's input (computed once per forward pass) and a block that widens its stage (every consumer widened,
keeping its weights for the old channels)."""
import copy

import pytest
import torch

from nnunet_weak.networks.encoder_stages import attach_after_encoder_stage, stage_channels

from conftest import small_unet


class AppendZeros(torch.nn.Module):
    """Appends ``added`` channels of ``value``, 0 by default: a widened network must then compute exactly what the
    plain one did."""

    def __init__(self, added, value=0.0):
        super().__init__()
        self.added, self.value = added, value

    def forward(self, x):
        return torch.cat((x, x.new_full((x.shape[0], self.added, *x.shape[2:]), self.value)), 1)


def sample(dims, batch=2):
    torch.manual_seed(3)
    return torch.randn(batch, 1, *([4, 16, 16] if dims == 3 else [16, 16]))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_widening_a_plain_stage_keeps_the_network_it_was(dims, stage):
    torch.manual_seed(0)
    network = small_unet("plain", dims).eval()
    plain = copy.deepcopy(network)
    channels = stage_channels(network, stage)
    block = AppendZeros(3)
    attach_after_encoder_stage(network, stage, block, added_channels=3)
    assert stage_channels(network, stage) == channels + 3
    x = sample(dims)
    with torch.no_grad():
        for widened, original in zip(network(x), plain(x)):
            torch.testing.assert_close(widened, original)
    # the added input weights are trained like the others (non-zero added channels give them a gradient)
    block.value = 1.0
    network.train()
    network(x)[0].sum().backward()
    consumer = network.decoder.transpconvs[0] if stage == 3 else network.encoder.stages[stage + 1][-1].convs[0].conv
    added_weights = consumer.weight.grad[channels:] if stage == 3 else consumer.weight.grad[:, channels:]
    assert consumer.in_channels == channels + 3 and added_weights.abs().sum() > 0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_widening_a_residual_stage(stage):
    torch.manual_seed(0)
    network = small_unet("residual", 2).eval()
    plain = copy.deepcopy(network)
    attach_after_encoder_stage(network, stage, AppendZeros(2), added_channels=2)
    x = sample(2)
    with torch.no_grad():
        outputs, original = network(x), plain(x)
    assert [o.shape for o in outputs] == [o.shape for o in original]
    if stage != 2:
        # the next block already projects its skip (4 -> 8, 8 -> 16) or the stage is the bottleneck: nothing but the
        # consumers' inputs changed
        for widened, expected in zip(outputs, original):
            torch.testing.assert_close(widened, expected)
    else:
        # stage 3 keeps 16 channels, so its skip was a pooling only: it gains a projection of the 18 channels
        skip = network.encoder.stages[3].blocks[0].skip
        assert skip[-1].conv.in_channels == 18 and skip[-1].conv.out_channels == 16


def test_a_block_sees_the_network_input_computed_once_per_forward():
    torch.manual_seed(0)
    network = small_unet("residual", 2)
    calls, seen = [], []

    class InputSummary(torch.nn.Module):
        def forward(self, image):
            calls.append(image.shape)
            return image.mean(dim=(1, 2, 3))

    class AddSummary(torch.nn.Module):
        def forward(self, features, summary):
            seen.append((features.shape[2:], summary))
            return features + summary[:, None, None, None]

    summary = InputSummary()
    attach_after_encoder_stage(network, 1, AddSummary(), input_context=summary)
    attach_after_encoder_stage(network, 3, AddSummary(), input_context=summary)
    x = sample(2)
    network(x)
    # once per forward, on the input of the whole network (the residual encoder's stem runs after it)
    assert calls == [x.shape]
    assert [s[0] for s in seen] == [(8, 8), (2, 2)]
    for _, value in seen:
        torch.testing.assert_close(value, x.mean(dim=(1, 2, 3)))
    assert network.encoder.stages[1].context is None
    # a copy (an EMA teacher) computes its own context
    teacher = copy.deepcopy(network)
    teacher(x)
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match="network's input"):
        network.encoder.stages[1](torch.randn(2, 4, 16, 16))


def test_widening_refuses_what_it_cannot_do():
    network = small_unet("plain", 2)
    with pytest.raises(ValueError, match="added_channels"):
        attach_after_encoder_stage(network, 1, torch.nn.Identity(), added_channels=-1)


def test_widening_leaves_the_plans_the_network_was_built_from_alone():
    features = [4, 8, 16, 16]
    network = small_unet("plain", 2)
    network.encoder.output_channels = features  # as dynamic_network_architectures keeps the list it was given
    attach_after_encoder_stage(network, 1, AppendZeros(2), added_channels=2)
    assert features == [4, 8, 16, 16] and stage_channels(network, 1) == 10
