"""``-tr CAMLTrainer``: correlation-aware mutual learning (Gao et al., MICCAI 2023, arXiv 2307.06312).

Semi-supervised: every batch holds labelled and unlabelled samples (``SemiSupervisedTrainer``, from
the supervision manifest). ``../shared/METHODS.md`` §5 specifies the method; this file composes it:

- **Two networks** (``MutualLearningNetworks``): nnU-Net's planned network, which ``nnUNetv2_predict``
  rebuilds and alone predicts, and a second instance of the same plans whose decoder up-samples by
  interpolation and whose stride-8 encoder stage is followed by **cross-sample mutual attention**
  (§2.2, training only). Projection and prediction heads embed each network's last decoder features.
- **Loss** (Eq. 9): ``L = w_sup · L_sup + λ_c(t) · L_cons + λ_o(t) · L_omni``, ``w_sup`` =
  ``supervised_weight``

  - ``L_sup``: nnU-Net's Dice + CE (deep supervision, ignore label) on the labelled samples, summed
    over both networks (the authors use Dice only).
  - ``L_cons`` (Eq. 8, from MC-Net+): ``sharpened_cross_consistency_loss``, T = 0.1, all samples.
  - ``L_omni`` (Eq. 6–7): ``omni_correlation_loss`` between the two networks' correlations to the
    memory bank (``ClassMemoryBank``: embeddings of labelled voxels that both networks predict
    correctly, projected with the heads in eval mode as in the authors' code), over the unlabelled
    voxels where both agree, the ``omni_voxels_per_class`` most confident per class
    (``agreeing_confident_voxels``); τ = 0.1.
  - ``λ_c(t) = lambda_consistency · w(t)``, ``λ_o(t) = lambda_omni · w(t)``, ``w`` the ramp-up
    ``sigmoid_rampup`` over the first ``consistency_rampup`` of the epochs.

Options (``NNUNET_WEAK_TRAINER_OPTIONS``), defaults from the authors' LA setting with 4 labelled
cases but for two chosen on ACDC validation cases at 1000 iterations (documentation/CAMLTrainer.md):
``supervised_weight`` 1 (theirs 0.5, which left RV unlearned in some seeds) and ``labelled_per_batch``
0.75, three quarters of the batch labelled (theirs half: 6 of 8 led half over 3 seeds, paired
p < 0.001; a share, so that it fits every planned batch: 1 of LA's 3D batch of 2, as half);
``lambda_consistency`` 1, ``lambda_omni`` 0.05, ``consistency_rampup`` 0.4 (6,000 of their 15,000
iterations), ``omni_voxels_per_class`` 12800.
Not reproduced from the released code: the checkpoint chosen on the test set; the second network's
labelled embeddings taken from unpermuted (scrambled) features.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_weak.losses.mutual_consistency import sharpened_cross_consistency_loss
from nnunet_weak.losses.omni_correlation import omni_correlation_loss
from nnunet_weak.networks.decoder_stages import per_scale
from nnunet_weak.networks.encoder_stages import unwrap_network
from nnunet_weak.networks.mutual_learning import MutualLearningNetworks, MutualLearningOutput, voxel_rows
from nnunet_weak.training.memory_bank import correctly_predicted_labelled_voxels, evenly_spaced
from nnunet_weak.training.schedules import sigmoid_rampup
from nnunet_weak.training.semi_supervised import SemiSupervisedTrainer

__all__ = ["CAMLTrainer"]


class CAMLTrainer(SemiSupervisedTrainer):
    """CAML: two networks, cross-sample attention, sharpened cross-consistency, omni-correlation."""

    attention_stride = 8
    sharpen_temperature = 0.1
    correlation_temperature = 0.1
    tunable_options = {**SemiSupervisedTrainer.tunable_options, "labelled_per_batch": 0.75,
                       "supervised_weight": 1.0, "lambda_consistency": 1.0, "lambda_omni": 0.05,
                       "consistency_rampup": 0.4, "omni_voxels_per_class": 12800.0}
    training_loss_components = ("supervised", "cross_consistency", "omni_correlation")

    def _do_i_compile(self):
        # the decoder-feature hooks hand features to the loss by side effect, which torch.compile would drop
        return False

    def training_network(self, network):
        second = nnUNetTrainer.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, self.enable_deep_supervision)
        return MutualLearningNetworks(network, second, self.label_manager.num_segmentation_heads,
                                      attention_stride=self.attention_stride,
                                      omni_voxels_per_class=int(self.omni_voxels_per_class))

    def training_forward_arguments(self, extras: dict) -> dict:
        return {"labelled": extras["labelled"]}

    def consistency_weight(self) -> float:
        """``w(t)`` of the ramp-up at the current epoch."""
        return sigmoid_rampup(self.current_epoch, self.consistency_rampup * self.num_epochs)

    def compute_training_loss(self, data, target, output: MutualLearningOutput, labelled):
        targets = per_scale(target)
        supervised = (self._labelled_loss(output.first_logits, targets, labelled)
                      + self._labelled_loss(output.second_logits, targets, labelled))
        first = torch.softmax(output.first_logits[0].float(), dim=1)
        second = torch.softmax(output.second_logits[0].float(), dim=1)
        consistency = sharpened_cross_consistency_loss(first, second, self.sharpen_temperature)
        omni = self._omni_correlation(output, first, second, targets[0], labelled)
        weight = self.consistency_weight()
        total = (self.supervised_weight * supervised + self.lambda_consistency * weight * consistency
                 + self.lambda_omni * weight * omni)
        return total, {"supervised": supervised, "cross_consistency": consistency, "omni_correlation": omni}

    def _labelled_loss(self, logits: list, targets: list, labelled: torch.Tensor) -> torch.Tensor:
        """nnU-Net's loss on the labelled samples only."""
        if self.enable_deep_supervision:
            return self.loss([o[labelled] for o in logits], [t[labelled] for t in targets])
        return self.loss(logits[0][labelled], targets[0][labelled])

    def _omni_correlation(self, output: MutualLearningOutput, first: torch.Tensor, second: torch.Tensor,
                          target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Update the memory bank from the labelled samples, then ``L_omni`` on the queries of the forward pass."""
        networks: MutualLearningNetworks = unwrap_network(self.network)
        self._update_memory_bank(networks, output, first, second, target, labelled)
        memory = networks.memory_bank.memory()
        if output.queries_chosen and len(memory) > 0:
            return omni_correlation_loss(output.first_queries, output.second_queries, memory,
                                         self.correlation_temperature)
        # nothing to compare on this rank yet; the heads ran all the same and stay in the graph, as DDP requires
        return (output.first_queries.sum() + output.second_queries.sum()) * 0

    def _update_memory_bank(self, networks: MutualLearningNetworks, output: MutualLearningOutput,
                            first: torch.Tensor, second: torch.Tensor, target: torch.Tensor,
                            labelled: torch.Tensor) -> None:
        """Offer the bank the projections (``memory_entries``: eval mode, as the authors) of labelled voxels that
        both networks predict correctly, up to ``entries_per_step`` per class (collective under DDP: every rank
        calls it every step)."""
        bank = networks.memory_bank
        classes = target[labelled][:, 0].flatten().long()
        correct = correctly_predicted_labelled_voxels(first[labelled].argmax(1).flatten(),
                                                      second[labelled].argmax(1).flatten(), classes,
                                                      self.label_manager.ignore_label)
        offered = []
        for c in range(first.shape[1]):
            candidates = torch.nonzero(correct & (classes == c)).flatten()
            offered.append(candidates[evenly_spaced(len(candidates), bank.entries_per_step, candidates.device)])
        offered = torch.cat(offered)
        entries = networks.memory_entries(voxel_rows(output.first_features[labelled], offered),
                                          voxel_rows(output.second_features[labelled], offered))
        bank.enqueue(entries, classes[offered])
