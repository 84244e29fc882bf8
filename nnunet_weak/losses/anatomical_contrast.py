"""ACTION's anatomical contrast with active negative sampling (You et al., IPMI 2023, stage B; ReCo's regional
contrast, Liu et al., ICLR 2022; ``../shared/METHODS.md`` §3).

Voxel representations ``r`` (a head on the concatenated, up-sampled decoder features) are pulled towards
their class prototype and pushed from voxels of *other* classes:

- **prototypes**: per class present, the mean key representation of its confident voxels (class
  probability ≥ ``confidence_threshold``, 0.97);
- **queries**: up to ``queries_per_class`` (256) *hard* voxels of each class (probability below the
  threshold), drawn uniformly;
- **active negatives**: for a query of class ``c``, each of its ``negatives_per_query`` (512) negatives is a
  voxel of class ``j ≠ c`` drawn uniformly within the class, the class drawn with probability
  ``softmax_j(cos(proto_c, proto_j) / τ)`` over the other present classes (hard negatives: classes that
  look alike are drawn more often);
- **InfoNCE** with the prototype as the positive, temperature ``τ`` (0.5):
  ``ℓ = −log( exp(cos(q, p)/τ) / (exp(cos(q, p)/τ) + Σ_n exp(cos(q, n)/τ)) )``, averaged over each class's
  queries, then over the classes that have queries.

Queries carry the gradient; prototypes and negatives come from the ``keys`` (the EMA teacher's
representation, or the student's detached) and carry none. Negatives are drawn from a random pool of at
most ``pool_per_class`` voxels per class, so that the similarity matrix is ``queries × pool`` and never
``queries × negatives × D``.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def negative_class_probabilities(prototypes: torch.Tensor, present: torch.Tensor,
                                 temperature: float = 0.5) -> torch.Tensor:
    """``P[c, j] = softmax_j(cos(proto_c, proto_j) / τ)`` over the present classes ``j ≠ c``; 0 elsewhere.

    Args:
        prototypes: ``(K, D)``; rows of absent classes are ignored.
        present: ``(K,)`` bool.

    Returns:
        ``(K, K)``; a row sums to 1 when its class is present and another class is, else it is all 0.
    """
    similarity = F.normalize(prototypes, dim=1) @ F.normalize(prototypes, dim=1).T / temperature
    allowed = present[None, :] & present[:, None] & ~torch.eye(len(present), dtype=torch.bool, device=present.device)
    probabilities = torch.softmax(similarity.masked_fill(~allowed, float("-inf")), dim=1)
    return torch.nan_to_num(probabilities, nan=0.0) * allowed


def sample_negative_classes(probabilities: torch.Tensor, count: int, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
    """``count`` class indices drawn with replacement from one row of :func:`negative_class_probabilities`."""
    return torch.multinomial(probabilities, count, replacement=True, generator=generator)


def _uniform_choice(count: int, size: int, generator, device) -> torch.Tensor:
    return torch.randperm(count, generator=generator, device="cpu")[:size].to(device)


def anatomical_contrast_loss(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
                             confidence: torch.Tensor, num_classes: int, confidence_threshold: float = 0.97,
                             queries_per_class: int = 256, negatives_per_query: int = 512,
                             temperature: float = 0.5, pool_per_class: int = 2048,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """The anatomical contrast loss of the module docstring.

    Args:
        queries: ``(M, D)`` voxel representations that learn (the student's).
        keys: ``(M, D)`` representations of the same voxels for prototypes and negatives (detached here).
        labels: ``(M,)`` class of each voxel (label or pseudo-label), in ``0 … num_classes - 1``.
        confidence: ``(M,)`` probability of that class.
        generator: a CPU generator for the random draws (``None``: the global one).

    Returns:
        A scalar; ``0`` (in the graph) when fewer than two classes have a prototype or no class has a hard voxel.
    """
    if queries.dim() != 2 or keys.shape != queries.shape:
        raise ValueError(f"queries and keys must both be (M, D), got {tuple(queries.shape)}, {tuple(keys.shape)}")
    if labels.shape != queries.shape[:1] or confidence.shape != queries.shape[:1]:
        raise ValueError(f"labels and confidence must be ({queries.shape[0]},), got {tuple(labels.shape)}, "
                         f"{tuple(confidence.shape)}")
    keys = F.normalize(keys.detach(), dim=1)
    confident = confidence >= confidence_threshold
    prototypes = keys.new_zeros((num_classes, keys.shape[1]))
    present = torch.zeros(num_classes, dtype=torch.bool, device=keys.device)
    pools = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        pools.append(members[_uniform_choice(len(members), pool_per_class, generator, members.device)])
        confident_members = torch.nonzero((labels == c) & confident).flatten()
        if len(confident_members):
            prototypes[c] = keys[confident_members].mean(0)
            present[c] = True
    total = queries.sum() * 0.0
    if present.sum() < 2:
        return total
    probabilities = negative_class_probabilities(prototypes, present, temperature)
    pool = torch.cat(pools)
    pool_start = torch.cumsum(torch.tensor([0] + [len(p) for p in pools[:-1]], device=keys.device), 0)
    pool_size = torch.tensor([len(p) for p in pools], device=keys.device)
    losses = []
    for c in torch.nonzero(present).flatten().tolist():
        hard = torch.nonzero((labels == c) & ~confident).flatten()
        if not len(hard):
            continue
        chosen = hard[_uniform_choice(len(hard), queries_per_class, generator, hard.device)]
        classes = sample_negative_classes(probabilities[c].cpu(), len(chosen) * negatives_per_query, generator)
        classes = classes.to(keys.device).view(len(chosen), negatives_per_query)
        within = (torch.rand(classes.shape, generator=generator).to(keys.device) * pool_size[classes]).long()
        q = F.normalize(queries[chosen], dim=1)
        # similarities to the pool (queries × pool), then each query's drawn negatives picked from them
        negative = torch.gather(q @ keys[pool].T, 1, pool_start[classes] + within)
        positive = q @ prototypes[c] / prototypes[c].norm().clamp_min(1e-12)
        logits = torch.cat((positive[:, None], negative), 1) / temperature
        losses.append(F.cross_entropy(logits, torch.zeros(len(chosen), dtype=torch.long, device=keys.device)))
    return total + torch.stack(losses).mean() if losses else total
