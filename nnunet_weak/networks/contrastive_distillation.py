"""ACTION's pre-training networks as one ``TrainingNetwork`` (You et al., IPMI 2023, stage A; ``../shared/METHODS.md`` §3).

- ``inference_network``: the planned network, the **student**; what the fine-tuning stage loads through
  ``-pretrained_weights``.
- **Global branch**: the student's bottleneck (:func:`bottleneck_features`), averaged over space, through a
  projection head and a predictor (``EmbeddingHead``); the teacher's through the projection head alone.
- **Local branch**: the output map (the last decoder stage's features, from which the segmentation layer
  reads; :func:`last_decoder_features`) cut into non-overlapping windows (``local_window_embeddings``),
  each window's mean through a projection head and a predictor; the teacher's through the head alone.
- **EMA teacher** of the network and of both projection heads (``EMATeacher``, momentum ``m``), updated once
  per optimiser step by the base trainer. It sees the student's input plus clamped Gaussian noise
  (σ 0.1, clamped to ±0.2), the mean-teacher perturbation of ACTION's pre-training code.
- **Queues** of past teacher embeddings, global and local (``ClassMemoryBank`` with one class: a FIFO
  queue, gathered across DDP ranks, checkpointed).

``training_forward(x)`` returns :class:`ContrastiveDistillationOutput`; in ``eval()`` the module is the
planned network.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from nnunet_weak.losses.contrastive_distillation import local_window_embeddings
from nnunet_weak.networks.decoder_stages import bottleneck_features, last_decoder_features, per_scale
from nnunet_weak.networks.ema_teacher import EMATeacher
from nnunet_weak.networks.embedding_head import EmbeddingHead
from nnunet_weak.networks.encoder_stages import stage_channels, unwrap_network
from nnunet_weak.networks.training_network import TrainingNetwork
from nnunet_weak.training.memory_bank import ClassMemoryBank


class ContrastiveDistillationOutput(NamedTuple):
    """One training forward pass.

    ``logits``: the student's segmentation output (a list per deep-supervision scale, full resolution first).
    ``student_global`` / ``teacher_global``: ``(B, D)`` embeddings (the student's after its predictor).
    ``student_local`` / ``teacher_local``: ``(B · windows, D)`` embeddings of the output map's windows.
    """

    logits: list
    student_global: torch.Tensor
    teacher_global: torch.Tensor
    student_local: torch.Tensor
    teacher_local: torch.Tensor


def global_average(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` → ``(B, C)``."""
    return features.flatten(2).mean(2)


class ContrastiveDistillationNetwork(TrainingNetwork):
    """The planned network (student), its EMA teacher, global and local heads and queues.

    Args:
        network: the planned network.
        local_window: the output map's window size per spatial axis (each must divide the patch).
        embedding_dim: ``D``, the embeddings' width.
        queue_size: past teacher embeddings kept per queue.
        momentum: the EMA teacher's ``m``.
    """

    teacher_noise_std = 0.1
    teacher_noise_clamp = 0.2

    def __init__(self, network: nn.Module, local_window: tuple[int, ...], embedding_dim: int = 128,
                 queue_size: int = 36, momentum: float = 0.99):
        super().__init__(network)
        self.local_window = tuple(local_window)
        bottleneck_channels = stage_channels(network, -1)
        output_channels = stage_channels(network, 0)
        self.global_head = EmbeddingHead(bottleneck_channels, embedding_dim, hidden_features=2 * embedding_dim)
        self.global_predictor = EmbeddingHead(embedding_dim, embedding_dim, hidden_features=2 * embedding_dim)
        self.local_head = EmbeddingHead(output_channels, embedding_dim, hidden_features=2 * embedding_dim)
        self.local_predictor = EmbeddingHead(embedding_dim, embedding_dim, hidden_features=2 * embedding_dim)
        self.teacher = EMATeacher(unwrap_network(network), momentum)
        self.teacher_global_head = EMATeacher(self.global_head, momentum)
        self.teacher_local_head = EMATeacher(self.local_head, momentum)
        self.global_queue = ClassMemoryBank(1, embedding_dim, queue_size, queue_size)
        self.local_queue = ClassMemoryBank(1, embedding_dim, queue_size, queue_size)
        self._student_bottleneck = bottleneck_features(network)
        self._student_output_map = last_decoder_features(network)
        self._teacher_bottleneck = bottleneck_features(self.teacher.network)
        self._teacher_output_map = last_decoder_features(self.teacher.network)

    def training_forward(self, x: torch.Tensor) -> ContrastiveDistillationOutput:
        logits = self.inference_network(x)
        noise = torch.clamp(torch.randn_like(x) * self.teacher_noise_std, -self.teacher_noise_clamp,
                            self.teacher_noise_clamp)
        self.teacher(x + noise)
        student_local = local_window_embeddings(self._student_output_map.features, self.local_window)
        with torch.no_grad():
            teacher_global = self.teacher_global_head(global_average(self._teacher_bottleneck.features))
            teacher_local = self.teacher_local_head(
                local_window_embeddings(self._teacher_output_map.features, self.local_window))
        return ContrastiveDistillationOutput(
            per_scale(logits),
            self.global_predictor(self.global_head(global_average(self._student_bottleneck.features))),
            teacher_global,
            self.local_predictor(self.local_head(student_local)),
            teacher_local)
