"""``-tr ConfKDTrainer``: mixed supervision with confidence-maximising knowledge distillation.

Liu, Desrosiers, Ben Ayed, Dolz, "Segmentation with mixed supervision: Confidence maximization helps
knowledge distillation", Medical Image Analysis 2023 (arXiv 2109.10902; ``../shared/METHODS.md`` §2).
A few cases carry dense ("strong") labels, the others weak ones (eroded masks, scribbles, boxes);
every batch holds both, and every strong sample carries its dense and its weak map, aligned through
one augmentation (``MixedSupervisionTrainer``, from the supervision manifest). The authors released no
training code; this file composes the method:

- **Network**: one shared encoder, two decoders (``TwoDecoderNetwork``). The planned decoder is the
  **student**, the model ``nnUNetv2_predict`` rebuilds and the one reported; a second decoder of the same
  shape on the same encoder is the **teacher** (training only).
- **Loss**: ``L = L_teacher + L_student + λ_KL · KL(p_teacher ‖ p_student) + λ_H · H(p_student)``

  - ``L_teacher``: nnU-Net's Dice + CE (deep supervision) of the teacher on the strong samples' dense
    labels (the paper: CE).
  - ``L_student``: nnU-Net's Dice + CE with the ignore label (annotated voxels only: partial Dice + CE) of
    the student on the weak maps of *all* samples, strong ones included (the paper: partial CE).
  - ``KL(p_teacher ‖ p_student)``: ``teacher_student_kl`` per voxel, full resolution, weak samples only;
    by default not detached, so that it also moves the teacher (``detach_teacher=1``: the student only).
  - ``H(p_student)``: ``prediction_entropy`` per voxel, full resolution, weak samples only.

Options (``NNUNET_WEAK_TRAINER_OPTIONS``): ``lambda_kl`` (1), ``lambda_entropy`` (0.1), ``detach_teacher`` (0:
the KL term moves both branches; 1: the student only), ``strong_per_batch`` (0: half the batch, rounded up).
The defaults are the validation sweep's choice over eroded and scribbled ACDC (documentation/ConfKDTrainer.md).

Variants (same everything else): ``ConfKDTrainer_noKL`` (λ_KL = 0), ``ConfKDTrainer_noEntropy`` (λ_H = 0),
``ConfKDTrainer_predictWithTeacher`` (the planned decoder is the teacher and the second the student, so that
the checkpoint, the validation and ``nnUNetv2_predict`` use the teacher).
"""
import torch

from nnunet_weak.losses.confidence_distillation import prediction_entropy, teacher_student_kl
from nnunet_weak.networks.decoder_stages import per_scale
from nnunet_weak.networks.second_decoder import TwoDecoderNetwork
from nnunet_weak.training.mixed_supervision import MixedSupervisionTrainer


class ConfKDTrainer(MixedSupervisionTrainer):
    """ConfKD: a teacher decoder on dense labels, a confident student decoder on weak labels, one encoder."""

    tunable_options = {**MixedSupervisionTrainer.tunable_options, "lambda_kl": 1.0, "lambda_entropy": 0.1,
                       "detach_teacher": 0.0}
    training_loss_components = ("teacher_dense", "student_weak", "kl_teacher_student", "student_entropy")
    #: which decoder is the teacher: the "second" (ConfKD; the planned decoder is the student) or the "planned"
    teacher_decoder = "second"

    def training_network(self, network):
        return TwoDecoderNetwork(network)

    def training_forward_arguments(self, extras: dict) -> dict:
        # unless the KL term moves the teacher, its prediction on weak samples is only the KL target: decoded
        # without its backward pass
        if self.lambda_kl != 0 and not self.detach_teacher:
            return {}
        return {f"{self.teacher_decoder}_without_gradient": ~extras["strong"]}

    def _branch_loss(self, logits: list, targets: list, samples: torch.Tensor | None = None) -> torch.Tensor:
        """nnU-Net's loss of one decoder's outputs on the selected samples (all when ``samples`` is None)."""
        if samples is not None:
            logits, targets = [o[samples] for o in logits], [t[samples] for t in targets]
        if self.enable_deep_supervision:
            return self.loss(logits, targets)
        return self.loss(logits[0], targets[0])

    def compute_training_loss(self, data, target, output, strong, weak_target):
        planned, second = (per_scale(o) for o in output)
        teacher, student = (second, planned) if self.teacher_decoder == "second" else (planned, second)
        weak = ~strong
        teacher_dense = self._branch_loss(teacher, per_scale(target), strong)
        student_weak = self._branch_loss(student, per_scale(weak_target))
        kl = teacher_student_kl(student[0].float(), teacher[0].float(), weak, detach_teacher=bool(self.detach_teacher))
        entropy = prediction_entropy(student[0].float(), weak)
        total = teacher_dense + student_weak + self.lambda_kl * kl + self.lambda_entropy * entropy
        return total, {"teacher_dense": teacher_dense, "student_weak": student_weak, "kl_teacher_student": kl,
                       "student_entropy": entropy}


class ConfKDTrainer_noKL(ConfKDTrainer):
    """Ablation: no distillation term (λ_KL = 0): the student learns from weak labels and its own entropy."""

    tunable_options = {**ConfKDTrainer.tunable_options, "lambda_kl": 0.0}


class ConfKDTrainer_noEntropy(ConfKDTrainer):
    """Ablation: no confidence term (λ_H = 0): plain distillation from the teacher."""

    tunable_options = {**ConfKDTrainer.tunable_options, "lambda_entropy": 0.0}


class ConfKDTrainer_predictWithTeacher(ConfKDTrainer):
    """ConfKD whose reported model is the teacher: the planned decoder (what the predictor rebuilds) learns
    from the dense labels, the second decoder is the student."""

    teacher_decoder = "planned"
