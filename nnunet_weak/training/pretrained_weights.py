"""``nnUNetv2_train ... -pretrained_weights FILE`` for the project's trainers.

nnU-Net loads the file with ``load_pretrained_weights(trainer.network, FILE)`` after ``initialize()``,
which cannot work for a trainer whose ``self.network`` is a ``TrainingNetwork`` (the planned network's
keys carry the ``inference_network.`` prefix there, nnU-Net's loader demands every key of the module,
and an EMA teacher was copied from the random weights before the load). :func:`route_pretrained_weights_to`
makes nnU-Net's call reach the trainer's own hook (``nnUNetWeakTrainer.load_pretrained_weights``), which
uses :func:`load_pretrained_state`:

- the **planned network** gets the checkpoint's ``network_weights``: every key except the skipped ones (the
  segmentation layers, as nnU-Net: fine-tuning may change the classes; a trainer may skip more, e.g. KAF's
  fresh decoder) must be in the checkpoint with the same shape, and every key of the checkpoint but the
  skipped ones must be in the network, or the load is refused naming the first key that does not fit (a
  pre-training with a deeper or shallower module is not loaded in part);
- **training-only modules both trainers share** (a top-level module of the ``TrainingNetwork`` with the
  same name in the checkpoint's training weights, e.g. projection heads) are loaded with the same rule;
  the others keep their initialisation;
- then ``TrainingNetwork.after_weights_loaded`` resets every EMA teacher to the loaded student.

The trainer records the source checkpoint in ``nnunet_weak_run.json``.
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from nnunet_weak.errors import UserInputError
from nnunet_weak.networks.training_network import TRAINING_WEIGHTS_KEY, TrainingNetwork

#: keys nnU-Net never transfers from pre-trained weights: the 1×1 convolutions that output the classes
SKIPPED_KEYS = (".seg_layers.",)


def load_matching_state(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str,
                        skipped: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``module``: every key of the module and of ``state`` (but those containing a ``skipped``
    string) must be in the other, with the same shape. Returns the loaded keys.

    Raises:
        UserInputError: naming the first missing, unexpected or mis-shaped key.
    """
    own = module.state_dict()
    loaded = [key for key in own if not any(s in key for s in skipped)]
    unexpected = [key for key in state if key not in own and not any(s in key for s in skipped)]
    if unexpected:
        raise UserInputError(f"The pre-trained weights {source} do not fit the {what}: they have '{unexpected[0]}' "
                             f"({len(unexpected)} such tensor(s)), which it lacks. They were written for another "
                             f"architecture (other plans, configuration, trainer or trainer variant); pre-train with "
                             f"the same ones.")
    for key in loaded:
        if key not in state:
            raise UserInputError(f"The pre-trained weights {source} do not fit the {what}: it has no '{key}'. They were "
                                 f"written for another architecture (other plans, configuration or trainer); pre-train "
                                 f"with the same plans and configuration.")
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise UserInputError(f"The pre-trained weights {source} do not fit the {what}: '{key}' has shape "
                                 f"{tuple(state[key].shape)} there and {tuple(own[key].shape)} here. Pre-train with the "
                                 f"same plans and configuration.")
    # skipped tensors keep their values (strict=False only lets them be absent: every other key was checked above)
    module.load_state_dict({key: state[key] for key in loaded}, strict=False)
    return loaded


def load_pretrained_state(network: nn.Module, checkpoint: Mapping, source: str,
                          skipped: tuple[str, ...] = SKIPPED_KEYS) -> dict:
    """Load a checkpoint of ``nnUNetWeakTrainer.save_checkpoint`` (or nnU-Net's) into ``network``, the planned
    network or a ``TrainingNetwork`` around it (see the module docstring). Returns what was loaded:
    ``{"network": number of keys, "training_modules": [names]}``. Keys of the planned network containing a
    ``skipped`` string are neither loaded nor checked."""
    if "network_weights" not in checkpoint:
        raise UserInputError(f"{source} is not an nnU-Net checkpoint (no 'network_weights').")
    weights = {k[7:] if k.startswith("module.") else k: v for k, v in checkpoint["network_weights"].items()}
    planned = network.inference_network if isinstance(network, TrainingNetwork) else network
    loaded = load_matching_state(planned, weights, "planned network", source, skipped)
    shared = []
    if isinstance(network, TrainingNetwork):
        training_weights = checkpoint.get(TRAINING_WEIGHTS_KEY, {})
        present = {key.split(".")[0] for key in training_weights}
        for name, module in network.named_children():
            if name != "inference_network" and name in present:
                load_matching_state(module, {k[len(name) + 1:]: v for k, v in training_weights.items()
                                             if k.startswith(name + ".")}, f"training module '{name}'", source)
                shared.append(name)
        network.after_weights_loaded()
    return {"network": len(loaded), "training_modules": shared}


def route_pretrained_weights_to(trainer) -> None:
    """Make ``nnUNetv2_train -pretrained_weights`` call ``trainer.load_pretrained_weights`` for this trainer's network.

    nnU-Net's ``run_training`` calls its module-level ``load_pretrained_weights(trainer.network, file)``; that name
    is replaced by a function that hands the file to the trainer whose network it is given, and to nnU-Net's own
    loader for any other network.
    """
    import nnunetv2.run.run_training as run_training
    nnunet_loader = getattr(run_training.load_pretrained_weights, "nnunet_loader", run_training.load_pretrained_weights)
    owner = weakref.ref(trainer)

    def load_pretrained_weights(network, fname, verbose=False):
        current = owner()
        if current is not None and network is current.network:
            return current.load_pretrained_weights(fname)
        return nnunet_loader(network, fname, verbose=verbose)

    load_pretrained_weights.nnunet_loader = nnunet_loader
    run_training.load_pretrained_weights = load_pretrained_weights
