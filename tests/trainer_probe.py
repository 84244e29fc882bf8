"""Runs a project trainer in-process for a few steps and prints what the tests compare, as JSON.

Run as a subprocess (``python tests/trainer_probe.py MODE ...``) because nnU-Net reads its folders
from the environment once, when ``nnunetv2.paths`` is imported. Modes:

- ``steps DATASET CONFIG TRAINER N``: N training steps from a fixed seed; the loss components and the
  batch composition (keys, stream mask) of each step, and a checksum of every parameter and of its
  last gradient.
- ``targets DATASET CONFIG TRAINER N``: N training batches' targets at every deep-supervision scale, with
  their keys and stream masks.
- ``resume DATASET CONFIG TRAINER N``: N steps, a checkpoint, a fresh trainer loaded from it; whether
  the two agree on every parameter and optimiser state, and on one more step on the same batch.
- ``checkpoint DATASET CONFIG TRAINER PATH``: one training step, then the trainer's checkpoint at PATH.
- ``pretrained DATASET CONFIG TRAINER CHECKPOINT``: a trainer given CHECKPOINT through nnU-Net's
  ``-pretrained_weights`` path; which of its weights now equal the checkpoint's, whether its EMA teachers
  equal their students, and what it recorded.
- ``initial DATASET CONFIG TRAINER``: a trainer built from a random global state (as ``nnUNetv2_train``
  would be); a checksum of its initial weights, which ``NNUNET_WEAK_SEED`` alone must decide.
- ``ddp DATASET CONFIG TRAINER [STEPS]``: two gloo processes through nnU-Net's own DDP set-up (SyncBatchNorm
  included, CPU stand-ins for what needs CUDA), the planned batch on each rank, STEPS steps (default 1) each on
  different batches; whether every parameter and buffer ended identical on both ranks, and each rank's last
  loss and stream mask. ``PROBE_NO_SELECTED_VOXELS_ON_RANK=R``: CAML selects no unlabelled voxel on rank R.
"""
import json
import os
import random
import sys
import tempfile

import numpy as np
import torch


def seeded(seed: int = 0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_trainer(dataset: str, configuration: str, trainer_name: str):
    from nnunetv2.run.run_training import get_trainer_from_args
    seeded(0)
    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, "nnUNetPlans", device=torch.device("cpu"))
    trainer.initialize()
    trainer.network.train()
    return trainer


def batches(trainer, seed: int):
    seeded(seed)
    train_loader, _ = trainer.get_dataloaders()
    return train_loader


def checksums(trainer) -> dict:
    result = {}
    for name, parameter in trainer.network.named_parameters():
        result[name] = [float(parameter.detach().double().sum()),
                        None if parameter.grad is None else float(parameter.grad.double().abs().sum())]
    return result


def numbers(output: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in output.items()}


def stream_masks(batch: dict) -> dict:
    """The stream masks of a two-stream batch (``labelled``, ``strong``), as lists."""
    return {k: v.tolist() for k, v in batch.items() if k not in ("data", "target", "keys")}


def steps(dataset, configuration, trainer_name, count):
    trainer = make_trainer(dataset, configuration, trainer_name)
    loader = batches(trainer, 0)
    seeded(1)
    losses, compositions = [], []
    hook_calls = []
    trainer.after_optimizer_step = (lambda step=trainer.after_optimizer_step: hook_calls.append(1) or step())
    for _ in range(int(count)):
        batch = next(loader)
        compositions.append({"keys": list(batch["keys"]), **stream_masks(batch)})
        losses.append(numbers(trainer.train_step(batch)))
    print(json.dumps({"losses": losses, "parameters": checksums(trainer), "batches": compositions,
                      "after_optimizer_step_calls": len(hook_calls)}))


def targets(dataset, configuration, trainer_name, count):
    """N training batches' targets (every deep-supervision scale) with their keys and stream masks."""
    trainer = make_trainer(dataset, configuration, trainer_name)
    loader = batches(trainer, 0)
    result = []
    for _ in range(int(count)):
        batch = next(loader)
        target = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
        result.append({"keys": list(batch["keys"]), **stream_masks(batch), "target": [t.tolist() for t in target]})
    print(json.dumps(result))


def resume(dataset, configuration, trainer_name, count):
    first = make_trainer(dataset, configuration, trainer_name)
    loader = batches(first, 0)
    seeded(1)
    for _ in range(int(count)):
        first.train_step(next(loader))
    checkpoint = os.path.join(tempfile.mkdtemp(), "checkpoint.pth")
    first.save_checkpoint(checkpoint)
    # as nnU-Net's on_epoch_end: the checkpoint is written at the end of an epoch, which then advances
    first.current_epoch += 1
    second = make_trainer(dataset, configuration, trainer_name)
    second.load_checkpoint(checkpoint)
    same_state = all(torch.equal(a, b) for a, b in zip(first.network.state_dict().values(),
                                                       second.network.state_dict().values()))
    same_keys = list(first.network.state_dict()) == list(second.network.state_dict())
    batch = next(loader)
    seeded(2)
    after_first = numbers(first.train_step({k: v for k, v in batch.items()}))
    seeded(2)
    after_second = numbers(second.train_step({k: v for k, v in batch.items()}))
    same_after = all(torch.equal(a, b) for a, b in zip(first.network.parameters(), second.network.parameters()))
    print(json.dumps({"same_state": same_state, "same_keys": same_keys, "losses": [after_first, after_second],
                      "same_after_step": same_after,
                      "keys": [k for k in first.network.state_dict() if "block" in k]}))


def checkpoint(dataset, configuration, trainer_name, path):
    """One training step, then the trainer's checkpoint written to PATH."""
    trainer = make_trainer(dataset, configuration, trainer_name)
    seeded(1)
    trainer.train_step(next(batches(trainer, 0)))
    trainer.save_checkpoint(path)
    print(json.dumps({"written": path}))


def pretrained(dataset, configuration, trainer_name, checkpoint):
    """A trainer given CHECKPOINT through nnU-Net's own -pretrained_weights path; whether its planned network and
    its training-only modules now hold the checkpoint's weights, and what it recorded."""
    from nnunetv2.run import run_training
    trainer = make_trainer(dataset, configuration, trainer_name)
    run_training.maybe_load_checkpoint(trainer, False, False, checkpoint)
    saved = torch.load(checkpoint, weights_only=False)
    network = trainer.network
    planned = network.inference_network if hasattr(network, "inference_network") else network
    own = planned.state_dict()
    same = [k for k, v in saved["network_weights"].items() if k in own and torch.equal(own[k], v.to(own[k].dtype))]
    training = network.training_state_dict() if hasattr(network, "training_state_dict") else {}
    saved_training = saved.get("nnunet_weak_training_weights", {})
    same_training = [k for k, v in saved_training.items() if k in training and torch.equal(training[k], v)]
    from nnunet_weak.networks.ema_teacher import EMATeacher
    teachers_equal_students = [all(torch.equal(a, b) for a, b in zip(m.network.state_dict().values(),
                                                                      m.student.state_dict().values()))
                               for m in network.modules() if isinstance(m, EMATeacher)]
    print(json.dumps({"planned_keys": len(own), "same_planned": len(same), "different_planned":
                      [k for k in own if k not in same], "training_keys": len(training),
                      "same_training": len(same_training), "record": trainer.pretrained_weights,
                      "teachers_equal_students": teachers_equal_students}))


def compiled(dataset, configuration, trainer_name, path):
    """The trainer initialised as nnU-Net does on CUDA, with torch.compile on (lazy: nothing runs); what self.network
    is, and the keys of the planned network's weights in the checkpoint written to PATH."""
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, "nnUNetPlans", device=torch.device("cpu"))
    type(trainer)._do_i_compile = lambda self: True
    trainer.initialize()
    trainer.save_checkpoint(path)
    keys = list(torch.load(path, weights_only=False)["network_weights"])
    print(json.dumps({"network": type(trainer.network).__name__, "keys": keys}))


def initial(dataset, configuration, trainer_name):
    from nnunetv2.run.run_training import get_trainer_from_args
    seeded(int.from_bytes(os.urandom(4), "little"))
    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, "nnUNetPlans", device=torch.device("cpu"))
    trainer.initialize()
    print(json.dumps({"checksum": float(sum(p.detach().double().sum() for p in trainer.network.parameters()))}))


def _cpu_sync_batch_norm(self, input):
    """SyncBatchNorm's training forward on CPU, where torch's refuses to run: the per-channel sum, sum of squares and
    count of every rank's input, combined by one autograd-aware all-reduce (one collective forward, one backward,
    as torch's all-gather and all-reduce), so that a rank that skips a call leaves the ranks' collectives
    unmatched, as it would on GPUs."""
    from torch.distributed.nn.functional import all_reduce
    if not (self.training and torch.distributed.is_initialized()):
        return torch.nn.modules.batchnorm._BatchNorm.forward(self, input)
    dims = [0, *range(2, input.dim())]
    channels = input.shape[1]
    local = torch.cat([input.sum(dims), (input * input).sum(dims), input.new_tensor([input.numel() / channels])])
    total = all_reduce(local)
    count = total[-1]
    mean = total[:channels] / count
    variance = total[channels:2 * channels] / count - mean * mean
    with torch.no_grad():
        self.num_batches_tracked.add_(1)
        self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
        self.running_var.mul_(1 - self.momentum).add_(self.momentum * variance * count / (count - 1))
    shape = (1, channels) + (1,) * (input.dim() - 2)
    normalised = (input - mean.view(shape)) / torch.sqrt(variance.view(shape) + self.eps)
    return normalised * self.weight.view(shape) + self.bias.view(shape)


def _ddp_worker(rank, dataset, configuration, trainer_name, port, result_file, steps):
    from datetime import timedelta

    import torch.distributed as dist
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module
    from torch.nn.parallel import DistributedDataParallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # unmatched collectives fail within a minute instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    # nnU-Net's own DDP set-up (it sees the process group: per-rank batch size and oversampling, a DDP-aware loss,
    # BatchNorm converted to SyncBatchNorm, DDP), with CPU stand-ins for what needs CUDA: the device, DDP's
    # device_ids (CPU modules take none) and its refusal of SyncBatchNorm on CPU, SyncBatchNorm's training forward
    # (same collectives, on CPU)
    nnunet_trainer_module.DDP = lambda module, device_ids: DistributedDataParallel(module)
    DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None
    torch.nn.SyncBatchNorm.forward = _cpu_sync_batch_norm
    seeded(0)
    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, "nnUNetPlans", device=torch.device("cpu"))
    trainer.device = torch.device("cpu")
    # the planned batch on each rank (nnU-Net divides the global batch between ranks)
    trainer.configuration_manager.configuration["batch_size"] *= 2
    no_selection_rank = os.environ.get("PROBE_NO_SELECTED_VOXELS_ON_RANK")
    if no_selection_rank is not None and int(no_selection_rank) == rank:
        from nnunet_weak.networks import mutual_learning
        mutual_learning.agreeing_confident_voxels = lambda first, *_: torch.zeros(0, dtype=torch.long,
                                                                                 device=first.device)
    trainer.initialize()
    trainer.network.train()
    loader = batches(trainer, 100 + rank)
    seeded(rank)
    for _ in range(steps):
        batch = next(loader)
        output = numbers(trainer.train_step(batch))
    output.update(stream_masks(batch))
    # per parameter and buffer (memory banks, normalisation statistics), its value on rank 0 and on rank 1
    state = trainer.network.state_dict()
    gathered = []
    for value in state.values():
        copies = [torch.zeros_like(value) for _ in range(2)]
        dist.all_gather(copies, value.detach().contiguous())
        gathered.append(copies)
    losses = [None, None]
    dist.all_gather_object(losses, output)
    if rank == 0:
        inside = {id(p) for p in trainer.network.parameters()}
        outside = [name for name, value in vars(trainer).items() if isinstance(value, torch.nn.Module)
                   and any(id(p) not in inside for p in value.parameters())]
        norms = [type(m).__name__ for m in trainer.network.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        result = {"different": [n for n, (a, b) in zip(state, gathered) if not torch.equal(a, b)], "losses": losses,
                  "modules_with_parameters_outside_network": outside, "batch_norms": sorted(set(norms)),
                  "trainable": sum(p.numel() for p in trainer.network.parameters() if p.requires_grad)}
        with open(result_file, "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


def ddp(dataset, configuration, trainer_name, steps="1"):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = os.path.join(tempfile.mkdtemp(), "ddp.json")
    torch.multiprocessing.spawn(_ddp_worker, args=(dataset, configuration, trainer_name, port, result_file, int(steps)),
                                nprocs=2)
    with open(result_file) as handle:
        print(json.dumps(json.load(handle)))


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *arguments = sys.argv[1:]
    {"steps": steps, "targets": targets, "resume": resume, "checkpoint": checkpoint, "pretrained": pretrained, "initial": initial, "ddp": ddp,
     "compiled": compiled}[mode](*arguments)
