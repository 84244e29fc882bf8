"""Training-only modules beside the network that ``nnUNetv2_predict`` rebuilds.

Some methods train more than nnU-Net's network: a second network (CAML), an EMA teacher (ACTION),
projection heads, memory banks. They must be trained, synchronised under DDP, clipped, checkpointed
and resumed, yet the predictor must rebuild and load only the planned network. The one mechanism for
this is :class:`TrainingNetwork`: a module that holds the planned network as ``inference_network`` and
the method's training-only modules beside it, and stands in for ``self.network`` while training
(``nnUNetWeakTrainer.training_network`` builds it). Because it *is* ``self.network``, nnU-Net's
optimiser, gradient clipping and DDP wrapper cover every module in it. The checkpoint stores the
inference network's weights as nnU-Net's ``network_weights`` (what the predictor loads strictly) and
the rest under :data:`TRAINING_WEIGHTS_KEY` (what ``--c`` restores).

In ``eval()`` mode a ``TrainingNetwork`` is its inference network, so nnU-Net's validation predicts
with exactly the network the predictor rebuilds. In training mode, :meth:`TrainingNetwork.training_forward`
runs whatever the method needs; the whole training computation must go through ``forward`` so that
DDP sees it.
"""
from __future__ import annotations

from torch import nn

from nnunet_weak.networks.ema_teacher import EMATeacher

TRAINING_WEIGHTS_KEY = "nnunet_weak_training_weights"
INFERENCE_PREFIX = "inference_network."


class TrainingNetwork(nn.Module):
    """The planned network (``inference_network``) plus a method's training-only modules.

    Subclasses register their modules in ``__init__`` and implement :meth:`training_forward`.
    """

    def __init__(self, inference_network: nn.Module):
        super().__init__()
        self.inference_network = inference_network

    def forward(self, x, **training_arguments):
        return self.training_forward(x, **training_arguments) if self.training else self.inference_network(x)

    def training_forward(self, x, **training_arguments):
        """The forward pass of one training batch ``x`` ``(B, C, *patch)``; what the loss needs. Keyword arguments
        come from the trainer's ``training_forward_arguments``."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called by the trainer exactly once after every optimiser step: one update of every EMA teacher."""
        for module in self.modules():
            if isinstance(module, EMATeacher):
                module.update()

    def after_weights_loaded(self) -> None:
        """Called after pre-trained weights replaced the student's: every EMA teacher becomes its copy again."""
        for module in self.modules():
            if isinstance(module, EMATeacher):
                module.reset()

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """Switch deep supervision on every nnU-Net decoder in this module (nnU-Net's trainer does it
        on ``network.decoder``, which only reaches the inference network)."""
        for module in self.modules():
            if hasattr(module, "deep_supervision") and hasattr(module, "seg_layers"):
                module.deep_supervision = enabled

    def training_state_dict(self) -> dict:
        """The weights and buffers of everything but the inference network."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(INFERENCE_PREFIX)}

    def load_training_state_dict(self, state: dict) -> None:
        """Load :meth:`training_state_dict` output (strictly: every training-only entry, nothing else)."""
        expected = set(self.training_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise RuntimeError(f"The checkpoint's training-only weights do not match {type(self).__name__}: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}. Was it written by another trainer?")
        self.load_state_dict({**{INFERENCE_PREFIX + k: v for k, v in self.inference_network.state_dict().items()},
                              **state})
