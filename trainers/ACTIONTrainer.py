"""ACTION (You et al., IPMI 2023, arXiv 2206.02307; ``../shared/METHODS.md`` §3): a semi-supervised recipe in two
stages, chained through nnU-Net's ``-pretrained_weights``::

    nnUNetv2_train D 2d 0 -tr ACTIONPretrainTrainer
    nnUNetv2_train D 2d 0 -tr ACTIONTrainer -pretrained_weights <pre-training fold_0/checkpoint_final.pth>

Both train on two-stream batches, labelled then unlabelled samples (``SemiSupervisedTrainer``).

``-tr ACTIONPretrainTrainer``, stage A, contrastive distillation:

- **Networks** (``ContrastiveDistillationNetwork``): the planned network (student) with global and local
  projection heads and predictors, an EMA teacher of network and heads (updated once per optimiser step by
  the base trainer), and FIFO queues of past teacher embeddings.
- **Loss**: ``L = w_sup(t) · L_sup + L_lat + L_out``

  - ``L_lat``: ``soft_negative_kl`` between the student's and the teacher's global embeddings (pooled
    bottleneck) against the global queue, ``T_s`` = ``student_temperature``, ``T_t`` = ``teacher_temperature``;
    all samples. Zero until the queue holds an entry.
  - ``L_out``: the same on the embeddings of the output map's windows, against the local queue.
  - ``L_sup``: nnU-Net's Dice + CE on the labelled samples; ``w_sup`` is 0 during the first
    ``unsupervised_fraction`` of the epochs (the contrastive phase), then 1 (the phase that adds it).

  The teacher's embeddings of each step join the queues after the loss.

Options (``NNUNET_WEAK_TRAINER_OPTIONS``), defaults from the authors' 2D ACDC setting where the paper or
code gives one: ``student_temperature`` 0.1, ``teacher_temperature`` 0.01 (0.6 for LA:
``ACTIONPretrainTrainer_teacherTemperature06``), ``momentum`` 0.99,
``queue_size`` 36; and, where it gives none, ``unsupervised_fraction`` 0.5, ``embedding_dim`` 128,
``local_windows_per_axis`` 4 (the output map cut into 4 windows along each axis, fewer along an axis that 4 does
not divide: the largest number that tiles it), ``labelled_per_batch`` (0: half the batch).

``-tr ACTIONTrainer``, stage B, fine-tuning with anatomical contrast:

- **Networks** (``AnatomicalContrastNetwork``): the planned network (student), its EMA teacher, whose
  probabilities on the unlabelled samples are their pseudo-labels, the strong view of the unlabelled samples
  (CutMix among them, image and pseudo-label with the same boxes, then intensity jitter), and a representation
  head on the student's decoder features at stride ``representation_stride`` (4).
- **Loss**: ``L = L_sup + λ_u · L_unsup + λ_anat · L_anat``

  - ``L_sup``: nnU-Net's Dice + CE (deep supervision) on the labelled samples;
  - ``L_unsup``: ``confidence_weighted_pseudo_label_ce`` of the student's full-resolution output on the strong
    view against the mixed teacher probabilities, threshold ``confidence_threshold``;
  - ``L_anat``: ``anatomical_contrast_loss`` on the representation's voxels: labelled voxels with their
    labels (the deep-supervision target at that resolution; ignore-label voxels left out) and the student's
    probability of them, unlabelled voxels with the teacher's mixed pseudo-labels and probabilities (both
    averaged to that resolution); keys are the student's representation, detached.

Options: ``momentum`` 0.99, ``confidence_threshold`` 0.97, ``lambda_unsupervised`` 1, ``lambda_anatomical``
0.01, ``representation_dim`` 512, ``queries_per_class`` 256, ``negatives_per_query`` 512,
``anatomical_temperature`` 0.5 (the authors' values), ``cutmix_probability`` 0.5 (UniMatch's box rule),
``labelled_per_batch``. The released code's second EMA update per step is not reproduced: the base trainer
updates the teacher exactly once.
"""
import torch
from torch.nn import functional as F

from nnunet_weak.losses.anatomical_contrast import anatomical_contrast_loss
from nnunet_weak.losses.contrastive_distillation import soft_negative_kl
from nnunet_weak.losses.local_window import largest_divisors_at_most
from nnunet_weak.losses.pseudo_label import confidence_weighted_pseudo_label_ce
from nnunet_weak.networks.anatomical_contrast import AnatomicalContrastNetwork, AnatomicalContrastOutput
from nnunet_weak.networks.contrastive_distillation import ContrastiveDistillationNetwork, ContrastiveDistillationOutput
from nnunet_weak.networks.decoder_stages import per_scale
from nnunet_weak.networks.encoder_stages import unwrap_network
from nnunet_weak.training.memory_bank import ClassMemoryBank
from nnunet_weak.training.semi_supervised import SemiSupervisedTrainer


class ACTIONPretrainTrainer(SemiSupervisedTrainer):
    """ACTION stage A: global and local contrastive distillation with soft negatives, then the supervised loss added."""

    tunable_options = {**SemiSupervisedTrainer.tunable_options, "student_temperature": 0.1,
                       "teacher_temperature": 0.01, "momentum": 0.99, "queue_size": 36.0,
                       "unsupervised_fraction": 0.5, "embedding_dim": 128.0, "local_windows_per_axis": 4.0}
    training_loss_components = ("supervised", "global_distillation", "local_distillation")

    def _do_i_compile(self):
        # the feature taps hand features to the loss by side effect, which torch.compile would drop
        return False

    def training_network(self, network):
        if self.local_windows_per_axis < 1:
            raise RuntimeError(f"local_windows_per_axis must be at least 1, got {self.local_windows_per_axis} in "
                               f"NNUNET_WEAK_TRAINER_OPTIONS.")
        patch = [int(p) for p in self.configuration_manager.patch_size]
        # a thin 3D axis (ACDC 3d_fullres: 10 slices) takes fewer windows, so that they tile the patch
        windows = largest_divisors_at_most(patch, int(self.local_windows_per_axis))
        self.print_to_log_file(f"local distillation: {'x'.join(map(str, windows))} windows of the output map")
        return ContrastiveDistillationNetwork(network, tuple(p // w for p, w in zip(patch, windows)),
                                              int(self.embedding_dim), int(self.queue_size), self.momentum)

    def supervised_weight(self) -> float:
        """``w_sup(t)``: 0 in the contrastive phase, 1 after it."""
        return float(self.current_epoch >= self.unsupervised_fraction * self.num_epochs)

    def _distillation(self, student, teacher, queue: ClassMemoryBank):
        """``soft_negative_kl`` against the queue, then the teacher's embeddings enqueued."""
        memory = queue.memory()
        loss = (soft_negative_kl(student.float(), teacher.float(), memory, self.student_temperature,
                                 self.teacher_temperature) if len(memory) else student.sum() * 0)
        queue.enqueue(teacher, teacher.new_zeros(len(teacher), dtype=torch.long))
        return loss

    def compute_training_loss(self, data, target, output: ContrastiveDistillationOutput, labelled):
        network: ContrastiveDistillationNetwork = unwrap_network(self.network)
        targets = per_scale(target)
        if self.enable_deep_supervision:
            supervised = self.loss([o[labelled] for o in output.logits], [t[labelled] for t in targets])
        else:
            supervised = self.loss(output.logits[0][labelled], targets[0][labelled])
        global_distillation = self._distillation(output.student_global, output.teacher_global, network.global_queue)
        local_distillation = self._distillation(output.student_local, output.teacher_local, network.local_queue)
        total = self.supervised_weight() * supervised + global_distillation + local_distillation
        return total, {"supervised": supervised, "global_distillation": global_distillation,
                       "local_distillation": local_distillation}


class ACTIONPretrainTrainer_teacherTemperature06(ACTIONPretrainTrainer):
    """The authors' LA setting: teacher temperature ``T_t`` = 0.6 (0.01 is their ACDC value). A trainer of its own
    so that ``compare`` can chain it (``ACTIONPretrainTrainer_teacherTemperature06:ACTIONTrainer``)."""

    tunable_options = {**ACTIONPretrainTrainer.tunable_options, "teacher_temperature": 0.6}


class ACTIONTrainer(SemiSupervisedTrainer):
    """ACTION stage B: EMA-teacher pseudo-labels on a CutMixed strong view, and anatomical contrast."""

    tunable_options = {**SemiSupervisedTrainer.tunable_options, "momentum": 0.99, "confidence_threshold": 0.97,
                       "lambda_unsupervised": 1.0, "lambda_anatomical": 0.01, "representation_dim": 512.0,
                       "queries_per_class": 256.0, "negatives_per_query": 512.0, "anatomical_temperature": 0.5,
                       "cutmix_probability": 0.5}
    training_loss_components = ("supervised", "pseudo_label", "anatomical_contrast")
    representation_stride = 4

    def _do_i_compile(self):
        return False

    def training_network(self, network):
        return AnatomicalContrastNetwork(network, self.representation_stride, int(self.representation_dim),
                                         self.momentum, self.cutmix_probability)

    def training_forward_arguments(self, extras: dict) -> dict:
        return {"labelled": extras["labelled"]}

    def compute_training_loss(self, data, target, output: AnatomicalContrastOutput, labelled):
        targets = per_scale(target)
        if self.enable_deep_supervision:
            supervised = self.loss([o[labelled] for o in output.logits], [t[labelled] for t in targets])
        else:
            supervised = self.loss(output.logits[0][labelled], targets[0][labelled])
        pseudo_label = confidence_weighted_pseudo_label_ce(output.logits[0][~labelled].float(),
                                                           output.pseudo_probabilities, self.confidence_threshold)
        anatomical = self._anatomical_contrast(output, targets, labelled)
        total = supervised + self.lambda_unsupervised * pseudo_label + self.lambda_anatomical * anatomical
        return total, {"supervised": supervised, "pseudo_label": pseudo_label, "anatomical_contrast": anatomical}

    def _anatomical_contrast(self, output: AnatomicalContrastOutput, targets: list, labelled) -> torch.Tensor:
        """``L_anat`` over the representation's voxels (labels and their probabilities as the class docstring says)."""
        representation = output.representation
        size = representation.shape[2:]
        student = F.adaptive_avg_pool2d if len(size) == 2 else F.adaptive_avg_pool3d
        student_probabilities = student(torch.softmax(output.logits[0].detach().float(), 1), size)
        pseudo_probabilities = student(output.pseudo_probabilities, size)
        at_size = [t for t in targets if t.shape[2:] == size]
        labels = (at_size[0] if at_size else F.interpolate(targets[0].float(), size=size, mode="nearest"))
        labels = labels[labelled][:, 0].long()
        ignore = self.label_manager.ignore_label
        annotated = labels != ignore if ignore is not None else torch.ones_like(labels, dtype=torch.bool)
        labelled_confidence = torch.gather(student_probabilities[labelled], 1,
                                           labels.clamp(max=student_probabilities.shape[1] - 1)[:, None])[:, 0]
        pseudo_confidence, pseudo_labels = pseudo_probabilities.max(1)
        voxels = representation.movedim(1, -1)
        queries = torch.cat((voxels[labelled][annotated], voxels[~labelled].reshape(-1, voxels.shape[-1])))
        classes = torch.cat((labels[annotated], pseudo_labels.flatten()))
        confidence = torch.cat((labelled_confidence[annotated], pseudo_confidence.flatten()))
        return anatomical_contrast_loss(queries.float(), queries.detach().float(), classes, confidence,
                                        self.label_manager.num_segmentation_heads, self.confidence_threshold,
                                        int(self.queries_per_class), int(self.negatives_per_query),
                                        self.anatomical_temperature)
