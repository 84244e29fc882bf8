"""A per-class memory of labelled-voxel embeddings (CAML's memory bank, §2.3).

Each training step, the trainer offers the embeddings of labelled voxels that *both* networks predict
correctly (:func:`correctly_predicted_labelled_voxels`); :meth:`ClassMemoryBank.enqueue` keeps up to
``entries_per_step`` of them per class, evenly spaced through the offer (a stratified sample of the
voxels of every offered crop, and the same on every rank without sharing a random state), and pushes
them into a first-in-first-out queue of ``capacity`` entries per class. Under DDP the offered entries of every rank are gathered
first, so every rank enqueues the same entries and holds the same memory.

The authors' code keeps every correctly predicted voxel of the latest crop of each labelled volume
(up to millions of 32-d vectors) and samples 256 per class from them every step; a queue of 256 per
class refreshed with a sample of each step's voxels keeps the same kind of memory at a fixed,
small size. Entries are buffers, so checkpoints carry them and ``--c`` resumes them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def gather_from_all_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (``(n, ...)``, ``n`` may differ between ranks) of every DDP rank, concatenated in rank
    order; ``tensor`` itself outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
    longest = int(max(sizes).item())
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[:len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:int(size.item())] for part, size in zip(gathered, sizes)])


def correctly_predicted_labelled_voxels(first_labels: torch.Tensor, second_labels: torch.Tensor,
                                        target: torch.Tensor, ignore_label: int | None) -> torch.Tensor:
    """Boolean mask of the voxels whose annotated class both networks predict.

    Args:
        first_labels, second_labels: the two networks' argmax classes, any shape.
        target: the annotation of the same voxels (same shape); ``ignore_label`` marks un-annotated ones.
        ignore_label: nnU-Net's ignore label, or ``None``.
    """
    if not first_labels.shape == second_labels.shape == target.shape:
        raise ValueError(f"shapes differ: {tuple(first_labels.shape)}, {tuple(second_labels.shape)}, "
                         f"{tuple(target.shape)}")
    annotated = torch.ones_like(target, dtype=torch.bool) if ignore_label is None else target != ignore_label
    return annotated & (first_labels == target) & (second_labels == target)


def evenly_spaced(count: int, wanted: int, device=None) -> torch.Tensor:
    """``min(count, wanted)`` indices spread evenly over ``range(count)`` (all of them if ``count <= wanted``)."""
    if count <= wanted:
        return torch.arange(count, device=device)
    return torch.div(torch.arange(wanted, device=device) * count, wanted, rounding_mode="floor")


class ClassMemoryBank(nn.Module):
    """FIFO queues of ``capacity`` embeddings of dimension ``dim`` for each of ``num_classes`` classes.

    Args:
        num_classes: classes (background included).
        dim: embedding width.
        capacity: entries kept per class (256 in CAML).
        entries_per_step: entries per class taken from each step's offer (over all ranks).
    """

    def __init__(self, num_classes: int, dim: int, capacity: int = 256, entries_per_step: int = 64):
        super().__init__()
        if min(num_classes, dim, capacity, entries_per_step) < 1:
            raise ValueError("num_classes, dim, capacity and entries_per_step must be >= 1")
        self.entries_per_step = min(entries_per_step, capacity)
        self.register_buffer("entries", torch.zeros(num_classes, capacity, dim))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("next_slot", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, classes: torch.Tensor) -> None:
        """Offer ``(n, dim)`` embeddings of voxels of the given ``(n,)`` classes (detached here).

        Collective under DDP: every rank must call it at the same step.
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.entries.shape[2] or classes.shape != embeddings.shape[:1]:
            raise ValueError(f"expected (n, {self.entries.shape[2]}) embeddings and (n,) classes, got "
                             f"{tuple(embeddings.shape)} and {tuple(classes.shape)}")
        embeddings = gather_from_all_ranks(embeddings.detach().to(self.entries.dtype))
        classes = gather_from_all_ranks(classes.to(torch.long))
        capacity = self.entries.shape[1]
        for c in range(self.entries.shape[0]):
            candidates = torch.nonzero(classes == c).flatten()
            if len(candidates) == 0:
                continue
            chosen = candidates[evenly_spaced(len(candidates), self.entries_per_step, candidates.device)]
            slots = (self.next_slot[c] + torch.arange(len(chosen), device=chosen.device)) % capacity
            self.entries[c, slots] = embeddings[chosen]
            self.next_slot[c] = (self.next_slot[c] + len(chosen)) % capacity
            self.filled[c] = torch.clamp(self.filled[c] + len(chosen), max=capacity)

    def memory(self) -> torch.Tensor:
        """``(m, dim)``: every filled entry, class by class."""
        return torch.cat([self.entries[c, :int(self.filled[c])] for c in range(self.entries.shape[0])])
