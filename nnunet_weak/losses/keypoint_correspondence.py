"""KAF's local objective: keypoint correspondences between neighbouring slices (Yang et al., NeurIPS 2023, §3.3;
``../shared/METHODS.md`` §4), with SuperGlue's optimal-transport matching (Sarlin et al., CVPR 2020).

Two neighbouring slices of one volume, under the same spatial augmentation, show mostly the same structures
near the same pixels. Without labels, which keypoint of one corresponds to which of the other is read from
the images:

1. :func:`image_descriptors`: a SIFT descriptor (``kornia.feature.SIFTDescriptor``, RootSIFT) of the patch
   around each keypoint (``kornia.feature.extract_patches_simple`` on an upright local affine frame);
2. :func:`correspondences`: pairs that are each other's nearest descriptor (``kornia.feature.match_mnn``) and
   lie at most ``max_distance`` pixels apart (30 in the authors' code).

The network's keypoint features then have to reproduce those matches: scores ``S = f_a f_bᵀ / √d``, a
dustbin row and column of learned score ``α``, and Sinkhorn iterations in the log domain
(:func:`log_optimal_transport`) give a soft assignment ``P`` ``(M+1, N+1)``;
:func:`correspondence_loss` is its negative log-likelihood over the matched pairs and over the keypoints left
unmatched (assigned to the dustbin).
"""
from __future__ import annotations

import math

import torch
from kornia.feature import SIFTDescriptor, extract_patches_simple, laf_from_center_scale_ori, match_mnn

from nnunet_weak.losses.local_window import in_single_precision


@torch.no_grad()
def image_descriptors(images: torch.Tensor, positions: torch.Tensor, patch_size: int = 32,
                      radius: float = 8.0) -> torch.Tensor:
    """RootSIFT descriptors of the patches around keypoints.

    Args:
        images: ``(B, C, H, W)``; the first channel is described.
        positions: ``(B, K, 2)`` ``(y, x)`` pixel positions.
        patch_size: side of the sampled patch.
        radius: half side, in image pixels, of the region the patch covers.

    Returns:
        ``(B, K, 128)``.
    """
    batch, count = positions.shape[:2]
    centres = positions.flip(-1).float()  # kornia's frames are (x, y)
    frames = laf_from_center_scale_ori(centres, torch.full((batch, count, 1, 1), radius, device=images.device),
                                       torch.zeros(batch, count, 1, device=images.device))
    patches = extract_patches_simple(images[:, :1].float(), frames, PS=patch_size)  # (B, K, 1, PS, PS)
    describe = SIFTDescriptor(patch_size, rootsift=True).to(images.device)
    return describe(patches.flatten(0, 1)).view(batch, count, -1)


@torch.no_grad()
def correspondences(descriptors_a: torch.Tensor, descriptors_b: torch.Tensor, positions_a: torch.Tensor,
                    positions_b: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Mutual nearest neighbours of descriptors within ``max_distance`` pixels.

    Args:
        descriptors_a, descriptors_b: ``(M, D)`` and ``(N, D)``.
        positions_a, positions_b: ``(M, 2)`` and ``(N, 2)`` pixel positions.

    Returns:
        ``(L, 2)`` long: index into ``a``, index into ``b``.
    """
    _, pairs = match_mnn(descriptors_a, descriptors_b)
    distance = (positions_a[pairs[:, 0]].float() - positions_b[pairs[:, 1]].float()).norm(dim=1)
    return pairs[distance <= max_distance].long()


class _LogSinkhorn(torch.autograd.Function):
    """``T`` unrolled Sinkhorn iterations in the log domain on couplings ``C`` ``(B, M', N')``::

        u_t = log μ - logsumexp_j(C_ij + v_{t-1,j})        v_t = log ν - logsumexp_i(C_ij + u_t,i)

    from ``u_0 = v_0 = 0``; returns ``(u_T, v_T)``. The gradient is that of the unrolled iterations (what autograd
    would give), written out: ``∂v_t/∂C = -softmax_i(C + u_t)`` and ``∂u_t/∂C = -softmax_j(C + v_{t-1})``,
    chained from ``t = T`` down to 1. Autograd would keep every iteration's intermediates and run about six
    small operations per ``logsumexp`` backwards; here only ``u_t`` and ``v_t`` are kept and each iteration's
    backward is two soft-maxes, about three times faster on CPU for SuperGlue's 100 iterations.
    """

    @staticmethod
    @in_single_precision
    def forward(ctx, couplings, log_mu, log_nu, iterations):
        batch = couplings.shape[0]
        u = torch.zeros_like(log_mu).expand(batch, -1)
        v = torch.zeros_like(log_nu).expand(batch, -1)
        previous_v, all_u = [], []
        for _ in range(iterations):
            previous_v.append(v)
            u = log_mu - torch.logsumexp(couplings + v[:, None, :], dim=2)
            all_u.append(u)
            v = log_nu - torch.logsumexp(couplings + u[:, :, None], dim=1)
        ctx.save_for_backward(couplings, torch.stack(all_u), torch.stack(previous_v))
        return u, v

    @staticmethod
    def backward(ctx, grad_u, grad_v):
        couplings, all_u, previous_v = ctx.saved_tensors
        grad_couplings = torch.zeros_like(couplings)
        for t in range(len(all_u) - 1, -1, -1):
            through_v = torch.softmax(couplings + all_u[t][:, :, None], dim=1) * grad_v[:, None, :]
            grad_couplings -= through_v
            grad_u = grad_u - through_v.sum(2)
            through_u = torch.softmax(couplings + previous_v[t][:, None, :], dim=2) * grad_u[:, :, None]
            grad_couplings -= through_u
            grad_v = -through_u.sum(1)
            grad_u = torch.zeros_like(grad_u)
        return grad_couplings, None, None, None


def log_optimal_transport(scores: torch.Tensor, dustbin: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """SuperGlue's entropic optimal transport with a dustbin, in the log domain.

    Args:
        scores: ``(B, M, N)`` matching scores.
        dustbin: scalar score ``α`` of matching a keypoint to nothing.
        iterations: Sinkhorn iterations (differentiated through, as in SuperGlue; ``_LogSinkhorn``).

    Returns:
        ``(B, M + 1, N + 1)`` log assignment ``log P``: the rows of ``P`` sum to 1 for the ``M`` keypoints of ``a``
        (and to ``N`` for the dustbin row), the columns to 1 for the ``N`` of ``b`` (``M`` for the dustbin column),
        all divided by ``M + N``, times ``M + N`` (so a certain match has ``P = 1``).
    """
    batch, m, n = scores.shape
    alpha = dustbin.to(scores.dtype).expand(batch, 1, 1)
    couplings = torch.cat((torch.cat((scores, alpha.expand(batch, m, 1)), 2),
                           torch.cat((alpha.expand(batch, 1, n), alpha), 2)), 1)
    norm = -math.log(m + n)
    log_mu = torch.cat((scores.new_full((m,), norm), scores.new_full((1,), math.log(n) + norm)))
    log_nu = torch.cat((scores.new_full((n,), norm), scores.new_full((1,), math.log(m) + norm)))
    u, v = _LogSinkhorn.apply(couplings, log_mu, log_nu, iterations)
    return couplings + u[:, :, None] + v[:, None, :] - norm


def correspondence_loss(log_assignment: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the matches: ``−log P[i, j]`` for each matched pair, ``−log P[i, N]`` for each
    unmatched keypoint ``i`` of ``a``, ``−log P[M, j]`` for each unmatched ``j`` of ``b``; the mean of all.

    Args:
        log_assignment: ``(M + 1, N + 1)`` from :func:`log_optimal_transport`.
        matches: ``(L, 2)`` long pairs ``(i, j)``.
    """
    m, n = log_assignment.shape[0] - 1, log_assignment.shape[1] - 1
    unmatched_a = torch.ones(m, dtype=torch.bool, device=log_assignment.device)
    unmatched_b = torch.ones(n, dtype=torch.bool, device=log_assignment.device)
    unmatched_a[matches[:, 0]] = False
    unmatched_b[matches[:, 1]] = False
    terms = torch.cat((log_assignment[matches[:, 0], matches[:, 1]], log_assignment[:m, n][unmatched_a],
                       log_assignment[m, :n][unmatched_b]))
    return -terms.mean()
