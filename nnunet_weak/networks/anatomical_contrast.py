"""ACTION's fine-tuning networks as one ``TrainingNetwork`` (You et al., IPMI 2023, stage B; ``../shared/METHODS.md`` §3).

- ``inference_network``: the planned network, the **student**, what ``nnUNetv2_predict`` rebuilds.
- **EMA teacher** of it (``EMATeacher``), updated once per optimiser step by the base trainer; it predicts the
  unlabelled samples as they come from nnU-Net's pipeline, and its probabilities are their soft pseudo-labels.
- **Strong view**: the unlabelled samples and their pseudo-labels CutMixed among themselves with the same
  boxes (``cutmix_boxes``, ``cutmix``), then intensity-jittered (``intensity_jitter``); the labelled samples
  pass unchanged. The student sees the labelled samples and the strong view in one forward pass.
- **Representation head** on the student's decoder features: every decoder stage at least as coarse as the
  stage of stride ``representation_stride`` (:func:`decoder_stage_features`), up-sampled to that stage's
  size and concatenated, through ``1×1 conv → BatchNorm → ReLU → 1×1 conv`` to ``representation_dim``
  channels (ReCo's head; ACTION: 512).

``training_forward(x, labelled)`` returns :class:`AnatomicalContrastOutput`; in ``eval()`` the module is the
planned network.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from nnunet_weak.networks.decoder_stages import decoder_stage_features, per_scale
from nnunet_weak.networks.ema_teacher import EMATeacher
from nnunet_weak.networks.encoder_stages import cumulative_stage_strides, unwrap_network
from nnunet_weak.networks.training_network import TrainingNetwork
from nnunet_weak.transforms.strong_view import cutmix, cutmix_boxes, intensity_jitter


class AnatomicalContrastOutput(NamedTuple):
    """One training forward pass.

    ``logits``: the student's output on the labelled samples and the strong view (a list per deep-supervision
    scale, full resolution first). ``pseudo_probabilities``: ``(U, K, *patch)`` teacher probabilities of the
    unlabelled samples, mixed as their images were. ``representation``: ``(B, D, *stage)`` the student's
    representation at ``representation_stride``.
    """

    logits: list
    pseudo_probabilities: torch.Tensor
    representation: torch.Tensor


class AnatomicalContrastNetwork(TrainingNetwork):
    """The planned network (student), its EMA teacher and the representation head.

    Args:
        network: the planned network.
        representation_stride: stride of the decoder stage whose resolution the representation has.
        representation_dim: ``D``.
        momentum: the EMA teacher's ``m``.
        cutmix_probability: chance that an unlabelled sample gets a box.
        jitter_strength: ``intensity_jitter``'s ``s``.
    """

    def __init__(self, network: nn.Module, representation_stride: int = 4, representation_dim: int = 512,
                 momentum: float = 0.99, cutmix_probability: float = 0.5, jitter_strength: float = 0.2):
        super().__init__(network)
        planned = unwrap_network(network)
        # decoder stage s (coarsest first) up-samples to the resolution of encoder stage n - 2 - s
        strides = [max(s) for s in cumulative_stage_strides(planned)][::-1][1:]
        if representation_stride not in strides:
            raise ValueError(f"No decoder stage has stride {representation_stride}; the planned decoder's stages have "
                             f"strides {strides}.")
        self.representation_stage = strides.index(representation_stride)
        # a decoder stage's output is its segmentation layer's input
        channels = [int(planned.decoder.seg_layers[s].in_channels) for s in range(self.representation_stage + 1)]
        convolution = nn.Conv2d if planned.decoder.seg_layers[0].weight.dim() == 4 else nn.Conv3d
        norm = nn.BatchNorm2d if convolution is nn.Conv2d else nn.BatchNorm3d
        self.representation_head = nn.Sequential(convolution(sum(channels), representation_dim, 1),
                                                 norm(representation_dim), nn.ReLU(inplace=True),
                                                 convolution(representation_dim, representation_dim, 1))
        self.teacher = EMATeacher(planned, momentum)
        self.cutmix_probability, self.jitter_strength = cutmix_probability, jitter_strength
        self._decoder_stages = decoder_stage_features(network)

    def representation(self) -> torch.Tensor:
        """The representation of the latest student pass: ``(B, D, *stage)``."""
        features = [tap.features for tap in self._decoder_stages[:self.representation_stage + 1]]
        size = features[-1].shape[2:]
        mode = "bilinear" if len(size) == 2 else "trilinear"
        upsampled = [F.interpolate(f, size=size, mode=mode, align_corners=False) if f.shape[2:] != size else f
                     for f in features]
        return self.representation_head(torch.cat(upsampled, 1))

    def training_forward(self, x: torch.Tensor, labelled: torch.Tensor) -> AnatomicalContrastOutput:
        unlabelled = ~labelled
        teacher_logits = self.teacher(x[unlabelled])
        teacher_logits = teacher_logits[0] if isinstance(teacher_logits, (list, tuple)) else teacher_logits
        probabilities = torch.softmax(teacher_logits.float(), 1)
        count = int(unlabelled.sum())
        boxes = cutmix_boxes(count, tuple(x.shape[2:]), self.cutmix_probability)
        mixed, mixed_probabilities = cutmix(x[unlabelled], probabilities, boxes, torch.randperm(count))
        strong = x.clone()
        strong[unlabelled] = intensity_jitter(mixed, self.jitter_strength)
        logits = self.inference_network(strong)
        return AnatomicalContrastOutput(per_scale(logits), mixed_probabilities,
                                        self.representation())
