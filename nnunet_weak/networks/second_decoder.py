"""A second decoder on the encoder of an auto-planned nnU-Net network.

ConfKD (Liu et al., MedIA 2023; ``../shared/METHODS.md`` §2) shares one encoder between two decoders:
the planned decoder, trained on weak labels, is the student and the model ``nnUNetv2_predict``
rebuilds; a second decoder of the same shape, trained on dense labels, is the teacher. nnU-Net's
``UNetDecoder`` keeps its encoder as a submodule, so ``copy.deepcopy`` of the decoder copies the
encoder too: a second encoder that no loss reaches (frozen in effect, and an unused-parameter error
under DDP). :func:`second_decoder` copies the decoder with the encoder shared and not registered, and
initialises the copy as nnU-Net initialises a new network, so that the two branches start apart.
"""
from __future__ import annotations

from copy import deepcopy

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_weak.networks.decoder_stages import decoder_of
from nnunet_weak.networks.encoder_stages import encoder_of, unwrap_network
from nnunet_weak.networks.training_network import TrainingNetwork


def second_decoder(network: nn.Module) -> nn.Module:
    """A new decoder of the same architecture as ``network``'s, reading the same encoder's skips.

    The encoder is referenced (the decoder's shape helpers use it) but not registered: its parameters
    stay ``network``'s, counted, synchronised and checkpointed once. The copy's weights are drawn anew
    (``InitWeights_He(1e-2)``, nnU-Net's initialisation).
    """
    decoder, encoder = decoder_of(network), encoder_of(network)
    copy = deepcopy(decoder, memo={id(encoder): encoder})
    del copy._modules["encoder"]
    copy.__dict__["encoder"] = encoder
    copy.apply(InitWeights_He(1e-2))
    return copy


def decode_without_gradient_for(decoder: nn.Module, skips: list, samples: torch.Tensor | None):
    """``decoder(skips)``, with the selected samples decoded under ``torch.no_grad()``.

    Args:
        decoder: an nnU-Net decoder (its output: a list of ``(B, K, *scale)`` logits, or one tensor).
        skips: the encoder's skips, each ``(B, C_i, *spatial_i)``.
        samples: ``(B,)`` bool, the samples whose output needs no gradient (``None``: none). Decoding them
            apart saves their backward pass; exact for nnU-Net's per-sample normalisation (instance norm). A
            decoder with batch norm, whose statistics span the batch, decodes the whole batch and detaches them.
    """
    if samples is None or not samples.any():
        return decoder(skips)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in decoder.modules()):
        output = decoder(skips)
        detach = (lambda o: torch.where(samples.view(-1, *[1] * (o.dim() - 1)), o.detach(), o))
        return [detach(o) for o in output] if isinstance(output, (list, tuple)) else detach(output)
    with_gradient = torch.nonzero(~samples).flatten()
    without_gradient = torch.nonzero(samples).flatten()
    if len(with_gradient) == 0:
        with torch.no_grad():
            return decoder(skips)
    first = decoder([s[with_gradient] for s in skips])
    with torch.no_grad():
        second = decoder([s[without_gradient] for s in skips])
    order = torch.argsort(torch.cat((with_gradient, without_gradient)))
    if isinstance(first, (list, tuple)):
        return [torch.cat(pair)[order] for pair in zip(first, second)]
    return torch.cat((first, second))[order]


class TwoDecoderNetwork(TrainingNetwork):
    """The planned network (its encoder and decoder) and a second decoder on the same encoder.

    ``training_forward(x)`` with ``x`` ``(B, C, *patch)`` returns ``(planned decoder output, second
    decoder output)``, each as nnU-Net's decoder returns it (a list of logits ``(B, K, *scale)``, full
    resolution first, with deep supervision; one ``(B, K, *patch)`` tensor without). A ``(B,)`` bool mask
    ``planned_without_gradient`` or ``second_without_gradient`` decodes those samples under ``torch.no_grad()``
    (:func:`decode_without_gradient_for`): for outputs that only serve as a detached target, whose backward
    pass would compute nothing but zeros. In ``eval()`` the module is the planned network alone.
    """

    def __init__(self, inference_network: nn.Module):
        super().__init__(inference_network)
        self.second_decoder = second_decoder(inference_network)

    def training_forward(self, x, planned_without_gradient: torch.Tensor | None = None,
                         second_without_gradient: torch.Tensor | None = None):
        planned = unwrap_network(self.inference_network)
        skips = planned.encoder(x)
        return (decode_without_gradient_for(planned.decoder, skips, planned_without_gradient),
                decode_without_gradient_for(self.second_decoder, skips, second_without_gradient))


def planned_weights_with_second_decoder(network_weights: dict, training_weights: dict) -> dict:
    """The planned network's state dict with the second decoder's weights in place of its decoder's.

    A checkpoint of a :class:`TwoDecoderNetwork` keeps the planned network's weights under
    ``network_weights`` (what ``nnUNetv2_predict`` loads) and the second decoder's among the training weights
    (``second_decoder.*``). Loaded into the planned network, the result computes what the second decoder
    computes on the shared encoder: for scoring both decoders of one run without training again.

    Args:
        network_weights: the planned network's state dict (keys ``encoder.*``, ``decoder.*``).
        training_weights: the training-only weights, ``second_decoder.*`` among them.

    Raises:
        ValueError: no second decoder in ``training_weights``, or the two decoders' weights differing in
            names or shapes.
    """
    prefix = "second_decoder."
    second = {k[len(prefix):]: v for k, v in training_weights.items() if k.startswith(prefix)}
    if not second:
        raise ValueError("The training weights hold no second decoder: not a two-decoder run's checkpoint.")
    weights = dict(network_weights)
    # nnU-Net's decoder lists its encoder among its weights (decoder.encoder.*): shared, not the decoder's own
    own = {k[len("decoder."):] for k in weights if k.startswith("decoder.") and not k.startswith("decoder.encoder.")}
    if own - set(second):
        raise ValueError(f"The planned decoder's '{sorted(own - set(second))[0]}' has no counterpart in the second "
                         "decoder: the checkpoint was not written by this network.")
    for key, value in second.items():
        planned = f"decoder.{key}"
        if planned not in weights or weights[planned].shape != value.shape:
            raise ValueError(f"The second decoder's '{key}' has no weight of the same name and shape in the "
                             "planned decoder: the checkpoint was not written by this network.")
        weights[planned] = value
    return weights
