"""``-tr KAFPretrainTrainer`` and ``-tr KAFTrainer``: KAF (Yang, Ren, Ding, Gerig, Wang, NeurIPS 2023,
arXiv 2310.01680) inside nnU-Net, two stages chained through nnU-Net's ``-pretrained_weights``::

    nnUNetv2_train D 2d 0 -tr KAFPretrainTrainer          # no labels needed
    nnUNetv2_train D 2d 0 -tr KAFTrainer -pretrained_weights <pre-training fold_0/checkpoint_final.pth>

2D configurations only (``../shared/METHODS.md`` §4).

- **Network** (§3.1), both stages: after every encoder stage of the auto-planned 2D network, a keypoint fusion
  layer (``KeypointFusion``, attached by ``attach_keypoint_fusion``): stage features gathered at the input
  slice's keypoints, plus a learned position encoding, ``fusion_layers`` layers of ``fusion_heads``-head
  self-attention among the keypoints (width ``fusion_dim``), scattered back, refined by two convolutions and
  concatenated (``fusion_channel_fraction`` of the stage's channels more); the next stage and the decoder take
  the wider features. The keypoints (``keypoint_count`` per slice) are found by the network in its own input
  (``KeypointDetector``: Shi–Tomasi corners where the authors use SIFT), so ``nnUNetv2_predict`` needs nothing
  else and a slice's prediction does not depend on its batch; the ``_DoGKeypoints`` variants use SIFT's
  difference-of-Gaussian detector instead, as the authors. Architecture attributes change the network,
  which ``nnUNetv2_predict`` rebuilds from the trainer's name: change them with a subclass, not an option.
- **Pre-training** (§3.2–3.3), ``KAFPretrainTrainer``, no label read: batches of neighbouring-slice pairs with
  their relative positions (``NeighbourSliceDataLoader``) and
  ``L = λ_cnn · L_pcl(bottleneck) + λ_kp · L_pcl(keypoint descriptors) + λ_corr · L_corr``:

  - ``L_pcl``: ``positional_contrastive_loss`` (positives: slices at most ``position_threshold`` apart in
    relative position, temperature ``temperature``) on pooled bottleneck embeddings and on pooled keypoint
    tokens of the deepest fusion layer (``KeypointPretrainingNetwork``);
  - ``L_corr``: between each anchor and its neighbour, SIFT mutual-nearest-neighbour matches within
    ``match_distance`` pixels (``correspondences``) supervise the optimal-transport assignment of the shallowest
    fusion layer's keypoint features (``log_optimal_transport``, ``correspondence_loss``).

  Options: ``lambda_cnn`` 1, ``lambda_keypoint`` 1, ``lambda_correspondence`` 0.01 (the authors'),
  ``temperature`` 0.1, ``position_threshold`` 0.35 (PCL's setting for ACDC's ~10-slice volumes; 0.1 for their CT),
  ``match_distance`` 30 (pixels of the network input).
- **Fine-tuning**, ``KAFTrainer``: nnU-Net's loss on the labelled cases; ``-pretrained_weights`` loads the
  encoder with its fusion layers strictly (a missing, extra or mis-shaped tensor is an error naming it: the
  authors' fine-tuning built a deeper attention stack than it pre-trained and left part of it random) and
  leaves the decoder fresh. Without ``-pretrained_weights`` it is the KAF network trained from scratch.
"""
import math

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_weak.losses.keypoint_correspondence import (correspondence_loss, correspondences, image_descriptors,
                                                        log_optimal_transport)
from nnunet_weak.losses.positional_contrastive import positional_contrastive_loss
from nnunet_weak.networks.keypoint_fusion import attach_keypoint_fusion
from nnunet_weak.networks.keypoint_pretraining import KeypointPretrainingNetwork, KeypointPretrainingOutput
from nnunet_weak.training.neighbour_slices import NeighbourSliceDataLoader
from nnunet_weak.training.pretrained_weights import SKIPPED_KEYS
from nnunet_weak.training.weak_trainer import nnUNetWeakTrainer


class KAFTrainer(nnUNetWeakTrainer):
    """The KAF network (keypoint fusion after every encoder stage), fine-tuned with nnU-Net's loss."""

    keypoint_count = 64
    keypoint_detector = "corners"
    fusion_channel_fraction = 0.25
    fusion_dim = 256
    fusion_heads = 4
    fusion_layers = 2
    # the decoder starts fresh: only the encoder and its fusion layers are pre-trained
    pretrained_skipped_keys = SKIPPED_KEYS + ("decoder.",)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision=True):
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        attach_keypoint_fusion(network, cls.keypoint_count, cls.fusion_channel_fraction, cls.fusion_dim,
                               cls.fusion_heads, cls.fusion_layers, cls.keypoint_detector)
        return network

    def _do_i_compile(self):
        # the keypoints reach the fusion layers through an encoder hook, which torch.compile would not keep
        return False


class KAFPretrainTrainer(KAFTrainer):
    """KAF's self-supervised pre-training: global positional contrast and local keypoint correspondence."""

    trains_on_unlabelled_cases = True
    trains_on_sparse_cases = True
    dense_monitor_cases = 0  # the decoder is not trained here: there is no segmentation to monitor
    embedding_size = 128
    tunable_options = {"lambda_cnn": 1.0, "lambda_keypoint": 1.0, "lambda_correspondence": 0.01,
                       "temperature": 0.1, "position_threshold": 0.35, "match_distance": 30.0}
    training_loss_components = ("global_cnn", "global_keypoint", "correspondence")

    def training_network(self, network):
        return KeypointPretrainingNetwork(network, self.embedding_size)

    def training_data_loader(self, make_loader, initial_patch_size, transforms, training_keys):
        loader = make_loader(training_keys, self.batch_size, initial_patch_size, transforms,
                             loader_class=NeighbourSliceDataLoader)
        self.print_to_log_file(f"Neighbouring-slice batches: {loader.pairs} pairs per GPU; labels are not used.")
        return loader

    def compute_training_loss(self, data, target, output: KeypointPretrainingOutput, slice_position, neighbour,
                              **batch_extras):
        global_cnn = positional_contrastive_loss(output.bottleneck_embedding, slice_position,
                                                 self.position_threshold, self.temperature)
        global_keypoint = positional_contrastive_loss(output.keypoint_embedding, slice_position,
                                                      self.position_threshold, self.temperature)
        correspondence = self._keypoint_correspondence(data, output, neighbour)
        loss = (self.lambda_cnn * global_cnn + self.lambda_keypoint * global_keypoint
                + self.lambda_correspondence * correspondence)
        return loss, {"global_cnn": global_cnn, "global_keypoint": global_keypoint, "correspondence": correspondence}

    def _keypoint_correspondence(self, data, output: KeypointPretrainingOutput, neighbour) -> torch.Tensor:
        """``L_corr``, the mean over the batch's anchor–neighbour pairs."""
        positions = output.keypoints.positions
        anchors = torch.nonzero(torch.arange(len(neighbour), device=neighbour.device) < neighbour).flatten()
        partners = neighbour[anchors]
        descriptors = image_descriptors(data, positions)
        features = output.matching_features
        scores = features[anchors] @ features[partners].transpose(1, 2) / math.sqrt(features.shape[2])
        log_assignment = log_optimal_transport(scores, output.dustbin)
        losses = [correspondence_loss(log_assignment[p], correspondences(
            descriptors[a], descriptors[b], positions[a], positions[b], self.match_distance))
            for p, (a, b) in enumerate(zip(anchors.tolist(), partners.tolist()))]
        return torch.stack(losses).mean()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("No validation: KAF pre-training learns no segmentation. Fine-tune with KAFTrainer "
                               "-pretrained_weights on this run's checkpoint_final.pth.")


class KAFTrainer_DoGKeypoints(KAFTrainer):
    """KAFTrainer with SIFT's difference-of-Gaussian keypoints (the authors' detector) instead of corners."""

    keypoint_detector = "dog"


class KAFPretrainTrainer_DoGKeypoints(KAFPretrainTrainer):
    """KAFPretrainTrainer with SIFT's difference-of-Gaussian keypoints (pre-trains ``KAFTrainer_DoGKeypoints``)."""

    keypoint_detector = "dog"
