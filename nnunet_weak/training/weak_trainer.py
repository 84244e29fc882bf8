"""The base of every nnunet-weak trainer.

``nnUNetWeakTrainer`` is nnU-Net's trainer with three changes and nothing else:

1. **Budget.** Epochs and iterations come from ``NNUNET_WEAK_BUDGET`` (``nnunet_weak.budget``), so
   that short CPU runs use the stock ``nnUNetv2_train``; the budget is recorded beside the
   checkpoints (``nnunet_weak_run.json``) and ``--c`` refuses to continue under another budget.
2. **Supervision.** The supervision manifest of the raw dataset is read; cases marked
   ``unlabelled`` are removed from the supervised training stream (they stay in the validation set,
   which is scored on dense labels). Dense and sparse cases train with nnU-Net's loss, which skips
   ignore-label voxels: on a scribble dataset this is the "nnU-Net + partial loss" baseline.
3. **Scoring.** After nnU-Net's final validation (whose ``summary.json`` scores whatever is in
   ``labelsTr``: scribbles, for a scribble dataset), the validation predictions are scored against
   dense labels (Dice and HD95 per class) into ``validation/summary_dense.json``.

4. **Sparse deep-supervision targets.** On a dataset with an ignore label the coarse
   deep-supervision targets are pooled so that annotated voxels stay annotated
   (``nnunet_weak.transforms.sparse_downsampling``) instead of nnU-Net's nearest-neighbour
   down-sampling, which erases thin scribbles; ``nnUNetWeakTrainer_nearestDSTargets`` keeps nnU-Net's.
   Voxels outside the image (padding, augmentation borders) stay nnU-Net's annotated background
   unless a subclass sets ``outside_image_label = "ignore"``. A subclass that sets
   ``marks_image_extent = True`` also learns where the image is: its training batches carry the
   image's extent through the augmentation (``nnunet_weak.transforms.image_extent``) and its
   ``compute_training_loss`` receives ``inside_image``, so that losses coupling voxels leave padding out.

5. **Dense-label monitor.** After every epoch, ``dense_monitor_cases`` validation cases with dense
   labels are predicted whole and scored against them (``nnunet_weak.training.dense_monitor``): the
   Dice per class and the share of the true background predicted as each class are logged, printed
   and drawn in ``fold_X/dense_monitor.png`` beside nnU-Net's pseudo-Dice, which on a sparse dataset
   is blind to false positives where no scribble lies.
6. **Seed.** ``NNUNET_WEAK_SEED`` (an integer) seeds Python, NumPy and PyTorch before the network is
   built, and is recorded with the budget. nnU-Net's data-augmentation workers keep their own random
   streams, so two runs with one seed start from the same weights but are not identical.

7. **Training-only modules.** :meth:`nnUNetWeakTrainer.training_network` may wrap the planned network in a
   ``TrainingNetwork`` (``nnunet_weak.networks.training_network``) that adds a method's second network,
   teacher or heads; checkpoints keep the planned network's weights where ``nnUNetv2_predict`` reads
   them and the rest beside them, and are written atomically.

Method trainers subclass it and override :meth:`nnUNetWeakTrainer.compute_training_loss` (the loss of
one training batch, with named components that are logged per epoch) and, where the method changes
the network, ``build_network_architecture`` (what the predictor rebuilds) or ``training_network``
(what only training uses).

On a dataset without manifest and without ignore label it trains exactly as nnU-Net does.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_weak.atomic import write_json_atomic
from nnunet_weak.budget import Budget, budget_from_environment, parse_budget
from nnunet_weak.errors import UserInputError
from nnunet_weak.evaluation import score_cases
from nnunet_weak.networks.encoder_stages import unwrap_network
from nnunet_weak.networks.training_network import TRAINING_WEIGHTS_KEY, TrainingNetwork
from nnunet_weak.plots import plot_dense_monitor, plot_loss_components
from nnunet_weak.raw_dataset import RawDataset, load_raw_dataset
from nnunet_weak.supervision import SupervisionManifest
from nnunet_weak.training.dense_monitor import DenseValidationMonitor
from nnunet_weak.training.options import OPTIONS_ENV, trainer_options_from_environment
from nnunet_weak.training.pretrained_weights import SKIPPED_KEYS, load_pretrained_state, route_pretrained_weights_to
from nnunet_weak.transforms.image_extent import AppendImageExtentChannel, split_image_extent
from nnunet_weak.transforms.sparse_downsampling import SparsePreservingDownsampleSegForDSTransform

RUN_RECORD = "nnunet_weak_run.json"
DENSE_SUMMARY = "summary_dense.json"
LOSS_COMPONENTS_PLOT = "loss_components.png"
DENSE_MONITOR_PLOT = "dense_monitor.png"
SEED_ENV = "NNUNET_WEAK_SEED"
#: logger keys of the dense-label monitor, one list over the foreground classes per epoch
DENSE_MONITOR_KEYS = ("dense_dice_per_class", "dense_background_as_class")


def seed_from_environment() -> int | None:
    """The integer in ``NNUNET_WEAK_SEED``, or ``None`` when it is unset."""
    text = os.environ.get(SEED_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise UserInputError(f"{SEED_ENV} must be a non-negative integer, got '{text}'.")
    return int(text)


class nnUNetWeakTrainer(nnUNetTrainer):
    """nnU-Net's trainer with a configurable budget, manifest-aware training and dense scoring."""

    #: down-sampling of sparse deep-supervision targets: "sparse_preserving" or nnU-Net's "nearest"
    sparse_target_downsampling = "sparse_preserving"
    #: what voxels outside the image (padding, augmentation borders; nnU-Net's -1) become on sparse
    #: datasets: nnU-Net's "background" (annotated), or "ignore" (un-annotated, like every voxel that
    #: no scribble covers)
    outside_image_label = "background"
    #: names of the loss components returned by compute_training_loss, logged per epoch
    training_loss_components: tuple[str, ...] = ()
    #: hyper-parameters settable through NNUNET_WEAK_TRAINER_OPTIONS, with their defaults; each becomes
    #: an attribute of the trainer (see nnunet_weak.training.options)
    tunable_options: dict[str, float] = {}
    #: whether cases marked unlabelled in the manifest stay in the training keys (semi-supervised
    #: trainers); otherwise they are left out of training
    trains_on_unlabelled_cases = False
    #: whether cases marked sparse (weak labels) in the manifest are trained on; otherwise only dense cases are
    #: (nnU-Net on the densely labelled cases of a mixed dataset)
    trains_on_sparse_cases = True
    #: whether compute_training_loss receives ``inside_image``, the (B, *patch) mask of the voxels inside the
    #: image (not padding, not brought in from outside by rotation or scaling)
    marks_image_extent = False
    #: validation cases with dense labels predicted and scored after every epoch (0: none), evenly
    #: spaced over the sorted validation cases
    dense_monitor_cases = 8
    #: ``-pretrained_weights`` leaves the planned network's tensors whose names contain one of these at their
    #: initialisation (nnU-Net: the segmentation layers, since fine-tuning may change the classes)
    pretrained_skipped_keys: tuple[str, ...] = SKIPPED_KEYS

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.seed = seed_from_environment()
        if self.seed is not None:
            # before nnU-Net's constructor and initialize(), which draw the network's initial weights
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget: Budget = budget_from_environment()
        self.num_epochs = self.budget.num_epochs
        self.num_iterations_per_epoch = self.budget.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.budget.val_iterations_per_epoch
        # nnU-Net checkpoints every 50 epochs; short budgets need checkpoints to resume with --c
        self.save_every = max(1, min(50, self.num_epochs // 5))
        self._raw_dataset: RawDataset | None = None
        self._raw_dataset_loaded = False
        self._register_logged_keys()
        self.dense_monitor: DenseValidationMonitor | None = None
        self.options = trainer_options_from_environment(self.tunable_options, self.__class__.__name__)
        for name, value in self.options.items():
            setattr(self, name, value)
        #: what -pretrained_weights loaded (source file, loaded parts), recorded with the run
        self.pretrained_weights: dict | None = None
        route_pretrained_weights_to(self)

    def _register_logged_keys(self) -> None:
        """Add the project's keys to nnU-Net's logger, which refuses keys it was not created with; a key
        missing from a checkpoint of an older run gets NaN for the epochs it has already done."""
        logged = self.logger.local_logger.my_fantastic_logging
        for key in self.training_loss_components:
            logged.setdefault(key, [float("nan")] * self.current_epoch)
        per_class = [float("nan")] * (self.label_manager.num_segmentation_heads - 1)
        for key in DENSE_MONITOR_KEYS:
            logged.setdefault(key, [list(per_class) for _ in range(self.current_epoch)])

    # ---- supervision -------------------------------------------------------------------------

    @property
    def raw_dataset(self) -> RawDataset | None:
        """The checked raw dataset (with its manifest), or ``None`` if nnUNet_raw does not hold it."""
        if not self._raw_dataset_loaded:
            raw_root = os.environ.get("nnUNet_raw")
            folder = Path(raw_root) / self.plans_manager.dataset_name if raw_root else None
            self._raw_dataset = load_raw_dataset(folder) if folder is not None and folder.is_dir() else None
            self._raw_dataset_loaded = True
        return self._raw_dataset

    @property
    def supervision_manifest(self) -> SupervisionManifest | None:
        return None if self.raw_dataset is None else self.raw_dataset.manifest

    def do_split(self):
        """nnU-Net's split, without the cases the trainer does not train on (unlabelled ones unless
        ``trains_on_unlabelled_cases``, sparse ones unless ``trains_on_sparse_cases``) in the training keys."""
        tr_keys, val_keys = super().do_split()
        manifest = self.supervision_manifest
        if manifest is None:
            return tr_keys, val_keys
        left_out = set()
        for kind, trained in (("unlabelled", self.trains_on_unlabelled_cases), ("sparse", self.trains_on_sparse_cases)):
            if not trained:
                left_out |= set(manifest.cases_with(kind))
        supervised = [k for k in tr_keys if k not in left_out]
        if len(supervised) < len(tr_keys):
            kinds = " and ".join(kind for kind, trained in (("unlabelled", self.trains_on_unlabelled_cases),
                                                            ("sparse", self.trains_on_sparse_cases)) if not trained)
            self.print_to_log_file(f"{len(tr_keys) - len(supervised)} {kinds} case(s) of this fold are left out of "
                                   f"the training stream.")
        if not supervised:
            raise RuntimeError(f"Fold {self.fold} has no training case that {self.__class__.__name__} trains on: every "
                               f"training case is marked unlabelled or sparse in the supervision manifest.")
        return supervised, val_keys

    # ---- training-only modules and checkpoints ----------------------------------------------

    def training_network(self, network: torch.nn.Module) -> torch.nn.Module:
        """What trains in place of the planned ``network``: the network itself, or a ``TrainingNetwork``
        around it that adds a method's training-only modules."""
        return network

    def configure_optimizers(self):
        # nnU-Net calls this after building (and, on CUDA, compiling) self.network and before wrapping it in DDP:
        # the one place where training-only modules can join it so that the optimiser, clipping and DDP cover them
        planned = unwrap_network(self.network)
        trained = self.training_network(planned)
        if trained is planned:
            trained = self.network  # compiled, if nnU-Net compiled it
        elif planned is not self.network:
            # a compiled module inside a TrainingNetwork saves its weights as '_orig_mod.*', which
            # nnUNetv2_predict cannot load, and the training forward passes are not what was compiled
            self.print_to_log_file(f"INFO: torch.compile disabled: {self.__class__.__name__} trains the planned network "
                                   f"inside a {type(trained).__name__} with training-only modules.")
        self.network = trained.to(self.device)
        return super().configure_optimizers()

    def set_deep_supervision_enabled(self, enabled: bool):
        network = unwrap_network(self.network)
        if isinstance(network, TrainingNetwork):
            network.set_deep_supervision_enabled(enabled)
        else:
            super().set_deep_supervision_enabled(enabled)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (the planned network's weights as ``network_weights``, what the predictor
        loads), plus the weights of training-only modules; written to a temporary name, then renamed."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        network = unwrap_network(self.network)
        checkpoint = {
            "network_weights": (network.inference_network if isinstance(network, TrainingNetwork)
                                else network).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
        }
        if isinstance(network, TrainingNetwork):
            checkpoint[TRAINING_WEIGHTS_KEY] = network.training_state_dict()
        temporary = Path(f"{filename}.partial")
        torch.save(checkpoint, temporary)
        os.replace(temporary, filename)

    def load_pretrained_weights(self, filename: str) -> None:
        """``nnUNetv2_train -pretrained_weights FILE``: the planned network's weights and those of the training-only
        modules this trainer shares with the checkpoint's, each part whole or refused with the first key that does
        not fit; EMA teachers reset to the loaded student (``nnunet_weak.training.pretrained_weights``)."""
        if not self.was_initialized:
            self.initialize()
        path = Path(filename)
        if not path.is_file():
            raise UserInputError(f"-pretrained_weights {filename}: no such file. Give the checkpoint of the pre-training "
                                 f"run (its fold_X/checkpoint_final.pth).")
        checkpoint = torch.load(path, map_location=self.device, weights_only=False)
        loaded = load_pretrained_state(unwrap_network(self.network), checkpoint, str(path), self.pretrained_skipped_keys)
        self.pretrained_weights = {"file": str(path.resolve()), "trainer": checkpoint.get("trainer_name"), **loaded}
        self.print_to_log_file(f"Pre-trained weights from {path} (written by {checkpoint.get('trainer_name')}): the "
                               f"planned network ({loaded['network']} tensors; not loaded: names containing "
                               f"{', '.join(self.pretrained_skipped_keys)})"
                               + (f" and {', '.join(loaded['training_modules'])}" if loaded["training_modules"] else ""))

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """Restore what :meth:`save_checkpoint` wrote (a path or the loaded dictionary)."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = (filename_or_checkpoint if isinstance(filename_or_checkpoint, dict)
                      else torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False))
        network = unwrap_network(self.network)
        inference_network = network.inference_network if isinstance(network, TrainingNetwork) else network
        # checkpoints of nn.DataParallel-wrapped networks carry a 'module.' prefix
        inference_network.load_state_dict({k[7:] if k.startswith("module.") else k: v
                                           for k, v in checkpoint["network_weights"].items()})
        if isinstance(network, TrainingNetwork):
            if TRAINING_WEIGHTS_KEY not in checkpoint:
                raise RuntimeError(f"This checkpoint has no training-only weights ({TRAINING_WEIGHTS_KEY}), which "
                                   f"{self.__class__.__name__} needs to continue: it was written by another trainer.")
            network.load_training_state_dict(checkpoint[TRAINING_WEIGHTS_KEY])
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._register_logged_keys()
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    # ---- training loss -------------------------------------------------------------------------

    def compute_training_loss(self, data: torch.Tensor, target, output, **batch_extras) -> tuple[torch.Tensor, dict]:
        """The loss of one training batch and its named components (``training_loss_components``).

        Args:
            data: ``(B, C, *patch)`` network input.
            target: nnU-Net's targets, a list per deep-supervision scale when it is enabled.
            output: the network's output for ``data`` (a list per scale under deep supervision).
            batch_extras: what the batch carries beyond nnU-Net's (the stream mask of two-stream batches,
                a ``(B,)`` bool tensor, e.g. ``labelled``; ``inside_image``, a ``(B, *patch)`` bool tensor, for trainers that set
                ``marks_image_extent``).
        """
        return self.loss(output, target), {}

    def split_target(self, target) -> tuple:
        """nnU-Net's targets without the channels that carry something else than the labels, and what those
        carry, by the name ``compute_training_loss`` receives it (``inside_image`` for ``marks_image_extent``)."""
        if self.marks_image_extent:
            target, inside_image = split_image_extent(target)
            return target, {"inside_image": inside_image}
        return target, {}

    def after_optimizer_step(self) -> None:
        """Runs exactly once after every optimiser step; a ``TrainingNetwork`` updates its EMA teachers here."""
        network = unwrap_network(self.network)
        if isinstance(network, TrainingNetwork):
            network.after_optimizer_step()

    def training_forward_arguments(self, extras: dict) -> dict:
        """Keyword arguments of the training network's forward pass, from what the batch carries (``extras``, as
        ``compute_training_loss`` receives them); only a ``TrainingNetwork`` takes any."""
        return {}

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step, with the loss from :meth:`compute_training_loss`."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))
        # what a batch carries beyond nnU-Net's (the stream mask of two-stream batches) goes to the loss
        extras = {key: value.to(self.device) for key, value in batch.items() if key not in ("data", "target", "keys")}
        target, carried = self.split_target(target)
        extras.update(carried)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data, **self.training_forward_arguments(extras))
            loss, components = self.compute_training_loss(data, target, output, **extras)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        self.after_optimizer_step()
        return {"loss": loss.detach().cpu().numpy(),
                **{name: value.detach().float().cpu().numpy() for name, value in components.items()}}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        for component in self.training_loss_components:
            values = [float(o[component]) for o in train_outputs if component in o]
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, values)
                values = [v for rank_values in gathered for v in rank_values]
            if values:
                self.logger.log(component, float(np.mean(values)), self.current_epoch)

    def on_epoch_end(self):
        if self.dense_monitor is not None:
            self.log_dense_monitor()
        for component in self.training_loss_components:
            self.print_to_log_file(component, np.round(self.logger.get_value(component, step=-1), decimals=4))
        if self.training_loss_components and self.local_rank == 0:
            plot_loss_components({c: self.logger.get_value(c, step=None) for c in self.training_loss_components},
                                 Path(self.output_folder) / LOSS_COMPONENTS_PLOT)
        super().on_epoch_end()

    # ---- dense-label monitor -----------------------------------------------------------------

    def build_dense_monitor(self) -> DenseValidationMonitor | None:
        """The monitor over up to ``dense_monitor_cases`` validation cases that have dense labels."""
        dataset = self.raw_dataset
        if self.dense_monitor_cases <= 0 or dataset is None or self.label_manager.has_regions:
            return None
        _, val_keys = self.do_split()
        with_dense = [k for k in sorted(val_keys) if dataset.dense_label_path(k) is not None]
        if not with_dense:
            self.print_to_log_file("No validation case has a dense label: no per-epoch dense-label monitor.")
            return None
        count = min(self.dense_monitor_cases, len(with_dense))
        chosen = [with_dense[i] for i in np.linspace(0, len(with_dense) - 1, count).round().astype(int)]
        self.print_to_log_file(f"Dense-label monitor: {count} of {len(val_keys)} validation cases scored on their "
                               f"dense labels after every epoch: {chosen}")
        return DenseValidationMonitor.from_raw_cases(
            {k: (dataset.training_images(k), dataset.dense_label_path(k)) for k in chosen}, self.plans_manager,
            self.configuration_manager, self.dataset_json, self.label_manager.num_segmentation_heads)

    def log_dense_monitor(self) -> None:
        """Score the monitored validation cases with the planned network as the predictor rebuilds it."""
        network = unwrap_network(self.network)
        inference_network = network.inference_network if isinstance(network, TrainingNetwork) else network
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=True, device=self.device, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(inference_network, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, self.__class__.__name__,
                                        self.inference_allowed_mirroring_axes)
        inference_network.decoder.deep_supervision = False
        inference_network.eval()
        try:
            scores = self.dense_monitor.measure(predictor.predict_sliding_window_return_logits)
        finally:
            inference_network.train()
            inference_network.decoder.deep_supervision = self.enable_deep_supervision
        self.logger.log("dense_dice_per_class", scores.dice, self.current_epoch)
        self.logger.log("dense_background_as_class", scores.background_as, self.current_epoch)
        names = [name for name, _ in sorted(self.raw_dataset.class_labels.items(), key=lambda item: item[1])]
        self.print_to_log_file("Dice on dense labels of monitored validation cases: " +
                               ", ".join(f"{n} {d:.4f}" for n, d in zip(names, scores.dice)))
        self.print_to_log_file("their true background predicted as: " +
                               ", ".join(f"{n} {100 * b:.2f} %" for n, b in zip(names, scores.background_as)))
        plot_dense_monitor(names, self.logger.get_value("dense_dice_per_class", step=None),
                           self.logger.get_value("dense_background_as_class", step=None),
                           self.logger.get_value("dice_per_class_or_region", step=None),
                           Path(self.output_folder) / DENSE_MONITOR_PLOT)

    # ---- deep-supervision targets ------------------------------------------------------------

    @classmethod
    def _adapted_to_sparse_labels(cls, transforms, ignore_label, regions):
        """nnU-Net's transforms with ``sparse_target_downsampling`` and ``outside_image_label`` applied."""
        if ignore_label is None or regions is not None:
            return transforms
        if cls.sparse_target_downsampling not in ("sparse_preserving", "nearest"):
            raise ValueError(f"sparse_target_downsampling must be 'sparse_preserving' or 'nearest', got "
                             f"{cls.sparse_target_downsampling!r}")
        if cls.outside_image_label not in ("background", "ignore"):
            raise ValueError(f"outside_image_label must be 'background' or 'ignore', got {cls.outside_image_label!r}")
        adapted = []
        for transform in transforms.transforms:
            if isinstance(transform, DownsampleSegForDSTransform) and cls.sparse_target_downsampling != "nearest":
                transform = SparsePreservingDownsampleSegForDSTransform(transform.ds_scales, ignore_label)
            elif (isinstance(transform, RemoveLabelTransform) and transform.label_value == -1
                  and cls.outside_image_label == "ignore"):
                transform = RemoveLabelTransform(-1, ignore_label, transform.segmentation_channels)
            adapted.append(transform)
        transforms.transforms = adapted
        return transforms

    # ---- data loading ------------------------------------------------------------------------

    def get_dataloaders(self):
        """nnU-Net's loaders and augmentation workers; the training loader comes from :meth:`training_data_loader`
        and the per-epoch pseudo-Dice's cases from :meth:`pseudo_dice_validation_keys`, so that a method changes
        what a batch holds without a second copy of this set-up."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        training_transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        validation_transforms = self.get_validation_transforms(
            deep_supervision_scales, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)

        def make_loader(keys, batch_size, loader_patch_size, transforms,
                        appended_segs=self.folder_with_segs_from_previous_stage, loader_class=nnUNetDataLoader):
            dataset = self.dataset_class(self.preprocessed_dataset_folder, keys,
                                         folder_with_segs_from_previous_stage=appended_segs)
            return loader_class(dataset, batch_size, loader_patch_size, patch_size, self.label_manager,
                                oversample_foreground_percent=self.oversample_foreground_percent,
                                sampling_probabilities=None, pad_sides=None, transforms=transforms,
                                probabilistic_oversampling=self.probabilistic_oversampling)

        training_keys, validation_keys = self.do_split()
        training_loader = self.training_data_loader(make_loader, initial_patch_size, training_transforms, training_keys)
        validation_keys, annotated = self.pseudo_dice_validation_keys(validation_keys)
        validation_loader = make_loader(validation_keys, self.batch_size, patch_size, validation_transforms)
        if not annotated:
            validation_loader.has_ignore = False

        processes = get_allowed_n_proc_DA()
        if processes == 0:
            training, validation = SingleThreadedAugmenter(training_loader, None), SingleThreadedAugmenter(
                validation_loader, None)
        else:
            pin_memory = self.device.type == "cuda"
            training = NonDetMultiThreadedAugmenter(training_loader, None, num_processes=processes,
                                                    num_cached=max(6, processes // 2), pin_memory=pin_memory,
                                                    wait_time=0.002)
            validation = NonDetMultiThreadedAugmenter(validation_loader, None, num_processes=max(1, processes // 2),
                                                      num_cached=max(3, processes // 4), pin_memory=pin_memory,
                                                      wait_time=0.002)
        # as nnU-Net does: start the workers now, not inside the first training step
        next(training)
        next(validation)
        return training, validation

    def training_data_loader(self, make_loader, initial_patch_size, transforms, training_keys: list[str]):
        """The training loader: nnU-Net's over ``training_keys`` (this fold's, from ``do_split``). ``make_loader(keys,
        batch_size, patch_size, transforms, appended_segs=..., loader_class=nnUNetDataLoader)`` builds one as nnU-Net
        does."""
        return make_loader(training_keys, self.batch_size, initial_patch_size, transforms)

    def pseudo_dice_validation_keys(self, validation_keys: list[str]) -> tuple[list[str], bool]:
        """Of this fold's validation cases, those of nnU-Net's per-epoch pseudo-Dice, and whether they carry annotated
        voxels (else crops are uniform, not centred on annotations)."""
        return validation_keys, True

    @classmethod
    def get_training_transforms(cls, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        transforms = nnUNetTrainer.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        if cls.marks_image_extent:
            transforms.transforms.insert(0, AppendImageExtentChannel())
        return cls._adapted_to_sparse_labels(transforms, ignore_label, regions)

    @classmethod
    def get_validation_transforms(cls, deep_supervision_scales, is_cascaded=False, foreground_labels=None,
                                  regions=None, ignore_label=None):
        transforms = nnUNetTrainer.get_validation_transforms(
            deep_supervision_scales, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        return cls._adapted_to_sparse_labels(transforms, ignore_label, regions)

    # ---- budget ------------------------------------------------------------------------------

    def on_train_start(self):
        # checked before nnU-Net starts its data-augmentation workers, so that a refusal exits cleanly
        record_file = Path(self.output_folder) / RUN_RECORD
        if self.current_epoch > 0 and record_file.is_file():
            recorded = json.loads(record_file.read_text(encoding="utf-8"))
            if parse_budget(recorded["budget"]["name"]) != self.budget:
                raise RuntimeError(
                    f"This run was started with budget '{recorded['budget']['name']}' but NNUNET_WEAK_BUDGET is "
                    f"'{self.budget.name}'. Set NNUNET_WEAK_BUDGET={recorded['budget']['name']} to continue it, "
                    f"or start a new run without --c."
                )
            if recorded.get("options", {}) != self.options:
                raise RuntimeError(
                    f"This run was started with options {recorded.get('options', {})} but {OPTIONS_ENV} gives "
                    f"{self.options}. Set {OPTIONS_ENV} to the recorded values to continue it, or start a new "
                    f"run without --c."
                )
            # a continued run keeps the record of the weights it started from
            self.pretrained_weights = recorded.get("pretrained_weights")
            if recorded.get("seed") != self.seed:
                raise RuntimeError(
                    f"This run was started with {SEED_ENV}={recorded.get('seed')} but it is now {self.seed}. Set "
                    f"it to the recorded value to continue it, or start a new run without --c."
                )
        super().on_train_start()
        if self.local_rank == 0:
            self.dense_monitor = self.build_dense_monitor()
        self.print_to_log_file(f"nnunet-weak budget {self.budget.describe()}")
        if self.seed is not None:
            self.print_to_log_file(f"{SEED_ENV} {self.seed}")
        if self.options:
            self.print_to_log_file(f"{self.__class__.__name__} options: {self.options}")
        if self.local_rank == 0:
            write_json_atomic({"trainer": self.__class__.__name__, "dataset": self.plans_manager.dataset_name,
                               "configuration": self.configuration_name, "fold": self.fold,
                               "budget": self.budget.to_json(), "options": self.options, "seed": self.seed,
                               "pretrained_weights": self.pretrained_weights},
                              record_file)

    # ---- scoring on dense labels ----------------------------------------------------------------

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            self.score_validation_on_dense_labels()

    def score_validation_on_dense_labels(self) -> dict | None:
        """Score ``validation/`` against dense labels into ``validation/summary_dense.json``."""
        ignore = self.label_manager.ignore_label
        if ignore is not None:
            self.print_to_log_file("nnU-Net's validation/summary.json scores the sparse labels of labelsTr, "
                                   "not the anatomy: do not report it as accuracy.")
        dataset = self.raw_dataset
        if dataset is None:
            self.print_to_log_file(f"WARNING: no scoring on dense labels: {self.plans_manager.dataset_name} is "
                                   f"not in nnUNet_raw ({os.environ.get('nnUNet_raw')}).")
            return None
        _, val_keys = self.do_split()
        validation_folder = Path(self.output_folder) / "validation"
        pairs, without_dense = {}, []
        for case in sorted(val_keys):
            dense = dataset.dense_label_path(case)
            if dense is None:
                without_dense.append(case)
            else:
                pairs[case] = (validation_folder / f"{case}{dataset.file_ending}", dense)
        if without_dense:
            self.print_to_log_file(f"WARNING: {len(without_dense)} validation case(s) have no dense label and "
                                   f"are not scored: {without_dense}")
        if not pairs:
            self.print_to_log_file("WARNING: no validation case has a dense label; nothing scored.")
            return None
        summary = score_cases(pairs, dataset.class_labels, validation_folder / DENSE_SUMMARY,
                              ignore_label=ignore, extra={"cases_without_dense_label": without_dense,
                                                          "budget": self.budget.to_json()})
        per_class = ", ".join(f"{name} {v['Dice']:.4f}" for name, v in summary["mean"].items())
        self.print_to_log_file(f"Dice on dense labels: mean {summary['foreground_mean']['Dice']:.4f} "
                               f"({per_class}); HD95 {summary['foreground_mean']['HD95']:.2f} mm")
        return summary
