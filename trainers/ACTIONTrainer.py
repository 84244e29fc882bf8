"""``-tr ACTIONPretrainTrainer``: ACTION's contrastive-distillation pre-training (You et al., IPMI 2023,
arXiv 2206.02307; ``../shared/METHODS.md`` §3, stage A), the first stage of a semi-supervised recipe whose
fine-tuning stage loads its checkpoint through ``nnUNetv2_train ... -pretrained_weights``.

Semi-supervised: every batch holds labelled and unlabelled samples (``SemiSupervisedTrainer``). The method:

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
code gives one: ``student_temperature`` 0.1, ``teacher_temperature`` 0.01 (0.6 for LA), ``momentum`` 0.99,
``queue_size`` 36; and, where it gives none, ``unsupervised_fraction`` 0.5, ``embedding_dim`` 128,
``local_windows_per_axis`` 4 (the output map cut into 4 windows along each axis), ``labelled_per_batch`` (0:
half the batch).
"""
import torch

from nnunet_weak.losses.contrastive_distillation import soft_negative_kl
from nnunet_weak.networks.contrastive_distillation import ContrastiveDistillationNetwork, ContrastiveDistillationOutput
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
        windows = int(self.local_windows_per_axis)
        patch = [int(p) for p in self.configuration_manager.patch_size]
        if windows < 1 or any(p % windows for p in patch):
            raise ValueError(f"local_windows_per_axis={windows} does not divide the patch {patch}")
        return ContrastiveDistillationNetwork(network, tuple(p // windows for p in patch), int(self.embedding_dim),
                                              int(self.queue_size), self.momentum)

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
        targets = target if isinstance(target, list) else [target]
        if self.enable_deep_supervision:
            supervised = self.loss([o[labelled] for o in output.logits], [t[labelled] for t in targets])
        else:
            supervised = self.loss(output.logits[0][labelled], targets[0][labelled])
        global_distillation = self._distillation(output.student_global, output.teacher_global, network.global_queue)
        local_distillation = self._distillation(output.student_local, output.teacher_local, network.local_queue)
        total = self.supervised_weight() * supervised + global_distillation + local_distillation
        return total, {"supervised": supervised, "global_distillation": global_distillation,
                       "local_distillation": local_distillation}
