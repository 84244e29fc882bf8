"""CAML's pieces on their own: the second network's up-sampling, the decoder feature tap."""
import pytest
import torch

from nnunet_weak.networks.decoder_stages import (InterpolatingUpsampling, LastDecoderFeatures,
                                                 use_interpolating_upsampling)

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


def test_last_decoder_features_are_the_input_of_the_final_segmentation_layer():
    torch.manual_seed(0)
    network = small_unet("plain", 2)
    tap = LastDecoderFeatures(network)
    assert tap.features is None
    network.decoder.deep_supervision = False
    logits = network(torch.randn(2, 1, 16, 16))
    assert tap.features.shape == (2, 4, 16, 16)
    torch.testing.assert_close(network.decoder.seg_layers[-1](tap.features), logits)
