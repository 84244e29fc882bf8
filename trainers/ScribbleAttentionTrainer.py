"""``-tr ScribbleAttentionTrainer``: AttenScribble (Tian, Yang, Gao, arXiv 2312.06614) inside nnU-Net.

Scribble supervision with attentive similarity learning, on nnU-Net's auto-planned network and data
pipeline, 2D and 3D (``../shared/METHODS.md`` §1):

- **Network** (§3.2): a spatial self-attention block after the encoder stage of stride
  ``attention_stride`` (4 in the paper), its output replacing that stage's features
  (``SpatialSelfAttentionBlock`` attached by ``attach_after_encoder_stage``). It is part of the network
  that ``nnUNetv2_predict`` rebuilds.
- **Loss** (Eq. 7): ``L = pCE + λ_crf(t) · L_crf + λ_att(t) · L_att``, both pairwise terms on the voxels inside
  the image only (``inside_image``: not nnU-Net's padding or augmentation borders, which the paper's
  resized whole slices do not have)

  - ``pCE``: nnU-Net's Dice + cross-entropy with the ignore label (annotated voxels only), with deep
    supervision; coarse targets keep thin scribbles (``nnUNetWeakTrainer.sparse_target_downsampling``).
  - ``L_crf`` (Eq. 6): ``masked_gated_crf_loss`` on the full-resolution prediction, un-annotated voxels
    only, intensity kernel on the [0, 1]-rescaled input (per patch on MRI, nnU-Net's fixed clipping window
    on CT), window in physical units.
  - ``L_att`` (Eq. 3–5): ``attentive_similarity_loss`` between the block's attention affinity
    ``K = sigmoid(w·(A + Aᵀ) + b)`` and the prediction resized to the attention grid, memory linear in
    the number of positions.

Options (``NNUNET_WEAK_TRAINER_OPTIONS``): ``lambda_crf`` (0.1), ``lambda_attentive`` (0.1), and
``crf_rampup`` (0.5) and ``attentive_rampup`` (0.5), the fractions of the epochs over which ``λ_crf`` and
``λ_att`` ramp up from ``exp(-5)·λ`` with ``nnunet_weak.training.schedules.sigmoid_rampup`` (0: the
paper's constant weight; a constant λ_crf floods the background with one class in the first epoch on
ACDC, documentation/ScribbleAttentionTrainer.md). The window (radius 5, σ 6 voxels) and σ_I = 0.1
are the paper's. Not reproduced from the released code: a
per-slice switch of ``L_att`` computed from the dense ground truth; nothing here reads a dense label.

Ablations (same everything else): ``ScribbleAttentionTrainer_noCRF`` (λ_crf = 0),
``ScribbleAttentionTrainer_noAttentiveLoss`` (λ_att = 0, block kept), ``ScribbleAttentionTrainer_noAttentionBlock``
(no block, hence no L_att: nnU-Net's network with pCE + gated CRF), ``ScribbleAttentionTrainer_outsideBackground``
(voxels outside the image annotated background in pCE, as in nnU-Net).

Cheaper attention for 3D grids (not in the paper; cost in documentation/ScribbleAttentionTrainer.md):
``ScribbleAttentionTrainer_stride8`` (the global block at stride 8) and ``ScribbleAttentionTrainer_window8``
(windowed attention at stride 4, ``L_att`` on the same windows).
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_weak.losses.attentive_similarity import attentive_similarity_loss, resize_to_grid
from nnunet_weak.losses.gated_crf import ct_intensity_windows, masked_gated_crf_loss
from nnunet_weak.losses.local_window import LocalWindow
from nnunet_weak.networks.encoder_stages import (attach_after_encoder_stage, attached_blocks,
                                                 cumulative_stage_strides, stage_channels, stage_index_for_stride)
from nnunet_weak.networks.spatial_self_attention import SpatialSelfAttentionBlock
from nnunet_weak.training.schedules import sigmoid_rampup
from nnunet_weak.training.weak_trainer import nnUNetWeakTrainer


class ScribbleAttentionTrainer(nnUNetWeakTrainer):
    """AttenScribble: pCE + masked gated CRF + attentive similarity, with a self-attention block."""

    attention_stride = 4
    use_attention_block = True
    # None: every position attends to every other (the paper's); an int: windowed attention
    # (SpatialSelfAttentionBlock), L_att on the same windows
    attention_window_size: int | None = None
    # nnU-Net labels padding and augmentation borders as annotated background: on ACDC 2D patches that
    # is ~30x more "background scribble" than the real ones, which drowns the foreground scribbles in
    # pCE's mean while L_crf pulls towards one class everywhere; the network collapsed to background
    # within one epoch (measured). pCE here is over the drawn scribbles only, as in the paper.
    outside_image_label = "ignore"
    # the CRF and L_att couple voxels inside the image only (see masked_gated_crf_loss)
    marks_image_extent = True
    window_radius = 5
    window_sigma = 6.0
    intensity_sigma = 0.1
    # the ramps (the paper: none): a constant λ_crf put 78-92 % of ACDC's validation background in one class
    # within 50 iterations; 0.5 for λ_crf follows λ_att's, untuned (documentation/ScribbleAttentionTrainer.md)
    tunable_options = {"lambda_crf": 0.1, "lambda_attentive": 0.1, "crf_rampup": 0.5, "attentive_rampup": 0.5}
    training_loss_components = ("partial_ce_dice", "gated_crf", "attentive_similarity")

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision=True):
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        if cls.use_attention_block:
            stage = stage_index_for_stride(network, cls.attention_stride)
            attach_after_encoder_stage(network, stage, SpatialSelfAttentionBlock(
                stage_channels(network, stage), spatial_dims=len(configuration_manager.patch_size),
                window_size=cls.attention_window_size))
        return network

    def _do_i_compile(self):
        # the block hands Q and K to the loss through attributes, a side effect torch.compile would not keep
        return False if self.use_attention_block else super()._do_i_compile()

    def initialize(self):
        super().initialize()
        if self.label_manager.ignore_label is None:
            self.print_to_log_file("WARNING: this dataset has no ignore label, so every voxel is annotated and the "
                                   "gated CRF term is zero: ScribbleAttentionTrainer is meant for scribble datasets.")
        for name, weight in (("crf_rampup", "lambda_crf"), ("attentive_rampup", "lambda_attentive")):
            if getattr(self, name) > 1:
                raise RuntimeError(f"{name} is the fraction of the epochs over which {weight} ramps up, between 0 "
                                   f"and 1; got {getattr(self, name)} in NNUNET_WEAK_TRAINER_OPTIONS.")
        spacing = [float(s) for s in self.configuration_manager.spacing]
        self.crf_window = LocalWindow.gaussian(self.window_radius, self.window_sigma, spacing)
        self.crf_intensity_windows = ct_intensity_windows(
            self.configuration_manager.normalization_schemes, self.plans_manager.foreground_intensity_properties_per_channel)
        if any(window is not None for window in self.crf_intensity_windows):
            self.print_to_log_file(f"gated CRF intensity kernel on fixed CT windows (normalised units, per channel): "
                                   f"{self.crf_intensity_windows}")
        self.attention_block, self.attention_window = None, None
        if not self.use_attention_block and self.lambda_attentive > 0:
            raise RuntimeError(f"{self.__class__.__name__} has no attention block, so it has no attentive similarity "
                               f"term: set lambda_attentive=0 in NNUNET_WEAK_TRAINER_OPTIONS.")
        if self.use_attention_block:
            (stage, self.attention_block), = attached_blocks(self.network).items()
            stride = cumulative_stage_strides(self.network)[stage]
            self.attention_window = LocalWindow.gaussian(self.window_radius, self.window_sigma,
                                                         [s * t for s, t in zip(spacing, stride)])

    def configure_optimizers(self):
        # nnU-Net calls this before wrapping the network in DDP, whose reducer then waits for a gradient of every
        # parameter that requires one: w and b only enter L_att, so without it they are frozen here, not later
        if self.use_attention_block and self.lambda_attentive == 0:
            (block,) = attached_blocks(self.network).values()
            block.affinity_weight.requires_grad_(False)
            block.affinity_bias.requires_grad_(False)
        return super().configure_optimizers()

    def crf_weight(self) -> float:
        """``λ_crf`` at the current epoch, ramped up over the first ``crf_rampup`` of the epochs."""
        return self.lambda_crf * sigmoid_rampup(self.current_epoch, self.crf_rampup * self.num_epochs)

    def attentive_weight(self) -> float:
        """``λ_att`` at the current epoch, ramped up over the first ``attentive_rampup`` of the epochs."""
        return self.lambda_attentive * sigmoid_rampup(self.current_epoch, self.attentive_rampup * self.num_epochs)

    def on_epoch_end(self):
        self.print_to_log_file(f"gated CRF weight {self.crf_weight():.4g}")
        if self.attention_block is not None and self.lambda_attentive > 0:
            # L_att falls to zero when b runs to -inf (K -> 0 everywhere): the log shows whether it did
            self.print_to_log_file(f"attentive similarity weight {self.attentive_weight():.4g}, affinity "
                                   f"w {self.attention_block.affinity_weight.item():.4g} "
                                   f"b {self.attention_block.affinity_bias.item():.4g}")
        super().on_epoch_end()

    def compute_training_loss(self, data, target, output, inside_image):
        logits = output[0] if isinstance(output, (list, tuple)) else output
        labels = target[0] if isinstance(target, list) else target
        partial_ce_dice = self.loss(output, target)
        probabilities = torch.softmax(logits.float(), dim=1)
        zero = probabilities.new_zeros(())
        gated_crf = zero
        if self.lambda_crf > 0 and self.label_manager.ignore_label is not None:
            unannotated = labels[:, 0] == self.label_manager.ignore_label
            gated_crf = masked_gated_crf_loss(probabilities, data, unannotated, self.crf_window, self.intensity_sigma,
                                              inside=inside_image, intensity_windows=self.crf_intensity_windows)
        attentive = zero
        if self.attention_block is not None and self.lambda_attentive > 0:
            block = self.attention_block
            grid = tuple(block.last_queries.shape[2:])
            # a grid position counts as inside when its whole block of voxels is
            inside_grid = resize_to_grid(inside_image[:, None].float(), grid)[:, 0] > 1 - 1e-6
            attentive = attentive_similarity_loss(probabilities, block.last_queries, block.last_keys,
                                                  block.affinity_weight, block.affinity_bias, self.attention_window,
                                                  inside=inside_grid, attention_window=block.last_window)
        total = partial_ce_dice + self.crf_weight() * gated_crf + self.attentive_weight() * attentive
        return total, {"partial_ce_dice": partial_ce_dice, "gated_crf": gated_crf, "attentive_similarity": attentive}


class ScribbleAttentionTrainer_noCRF(ScribbleAttentionTrainer):
    """Ablation: without the masked gated CRF term."""

    tunable_options = {**ScribbleAttentionTrainer.tunable_options, "lambda_crf": 0.0}


class ScribbleAttentionTrainer_noAttentiveLoss(ScribbleAttentionTrainer):
    """Ablation: the attention block is kept, the attentive similarity term is dropped."""

    tunable_options = {**ScribbleAttentionTrainer.tunable_options, "lambda_attentive": 0.0}


class ScribbleAttentionTrainer_noAttentionBlock(ScribbleAttentionTrainer):
    """Ablation: nnU-Net's network without the attention block (so no attentive term): pCE + gated CRF."""

    use_attention_block = False
    tunable_options = {**ScribbleAttentionTrainer.tunable_options, "lambda_attentive": 0.0}


class ScribbleAttentionTrainer_outsideBackground(ScribbleAttentionTrainer):
    """Voxels outside the image are annotated background in pCE, as in nnU-Net and the partial-loss baseline."""

    outside_image_label = "background"


class ScribbleAttentionTrainer_stride8(ScribbleAttentionTrainer):
    """The attention block after the encoder stage of stride 8 (a quarter of the positions in 2D, an eighth in
    isotropic 3D): global attention at a coarser grid."""

    attention_stride = 8


class ScribbleAttentionTrainer_window8(ScribbleAttentionTrainer):
    """Windowed attention at stride 4: each position attends within its window of at most 8 positions per axis
    (``largest_divisors_at_most``), and ``L_att`` couples the pairs of the same window."""

    attention_window_size = 8
