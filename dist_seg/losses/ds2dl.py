"""DS²DL losses (SPEC §4): pure functions of tensors, no collectives.

Shapes follow one convention: the cluster dimension is dim 1 and any number of trailing spatial
dimensions may follow (``[B, K, H, W]``, ``[B, K, N]``, ...). Logits are cosine inner products between
L2-normalised features and prototypes; the temperature ``tau`` is applied inside the functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["affinity_loss", "l2g_loss", "orthogonality_loss", "self_label_loss", "sinkhorn"]


def affinity_loss(sim: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | float, r: float) -> torch.Tensor:
    """Binary pair classification with reversed directional mining (paper Eq. 1–3, SPEC §4).

    With ``t = sim + bias`` the loss of a pair is ``y·softplus(−t/r) + (1−y)·softplus(r·t)``: positives are
    scaled by ``1/r`` (easy positives weigh more), negatives by ``r`` (hard negatives weigh more). For
    ``r = 1`` this is binary cross-entropy with logits ``t``. The gradient into ``y`` is
    ``softplus(−t/r) − softplus(r·t)``: pairs with ``sim > −bias`` are pulled towards sharing a label.

    Pure: nothing is detached here. What carries gradient is the caller's choice (SPEC §4's default: ``sim``
    is the frozen backbone similarity, a constant; ``target = L_i·L_j`` and ``bias`` are trained).

    Args:
        sim: pair similarities ``S_ij``, any shape.
        target: soft pair labels ``y`` in [0, 1], same shape as ``sim``.
        bias: the learnable scalar ``b`` (tensor or float).
        r: mining strength, ``r > 0``.

    Returns:
        Scalar mean over all pairs.
    """
    if sim.shape != target.shape:
        raise ValueError(f"sim and target must have the same shape, got {tuple(sim.shape)} and {tuple(target.shape)}")
    if r <= 0:
        raise ValueError(f"the mining strength r must be positive, got r={r}")
    t = sim + bias
    return (target * F.softplus(-t / r) + (1 - target) * F.softplus(r * t)).mean()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float, num_iters: int) -> torch.Tensor:
    """Balanced soft assignments of each image's pixels to K prototypes (paper Eq. 5, SwAV-style).

    Per image, with ``M = scores`` (K × N, N = number of pixels): ``Q = exp(M/ε)``, then ``num_iters``
    rounds of (rows scaled to sum N/K, columns scaled to sum 1). The iterations run in the log domain
    (``logsumexp``) in at least fp32, so small ``ε`` or large scores neither overflow nor underflow.
    Converged, ``Q`` equals ``N ×`` the entropic optimal-transport plan with uniform marginals
    (POT: ``ot.sinkhorn(1/K·𝟙, 1/N·𝟙, −M, reg=ε)``).

    Args:
        scores: ``[B, K, *spatial]``; no gradient flows through the result.
        eps: entropic regularisation ε > 0.
        num_iters: number of (row, column) rounds, at least 1.

    Returns:
        ``Q`` with the shape of ``scores`` (dtype fp32, or fp64 for fp64 input); each pixel's column
        sums to 1 (the last step is the column step), rows sum to about N/K.
    """
    if scores.dim() < 3:
        raise ValueError(f"scores must be [B, K, N, ...] (cluster dim second), got shape {tuple(scores.shape)}")
    if eps <= 0:
        raise ValueError(f"sinkhorn eps must be positive, got {eps}")
    if num_iters < 1:
        raise ValueError(f"sinkhorn needs at least one iteration (columns must sum to 1), got {num_iters}")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    b, k = scores.shape[:2]
    log_q = scores.detach().to(dtype).reshape(b, k, -1) / eps
    n = log_q.shape[-1]
    log_row_mass = torch.log(torch.tensor(n / k, dtype=dtype, device=scores.device))
    for _ in range(num_iters):
        log_q = log_q - torch.logsumexp(log_q, dim=2, keepdim=True) + log_row_mass
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp().reshape(scores.shape)


def l2g_loss(codes: torch.Tensor, local_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Local-to-global code prediction (paper Eq. 4): ``mean over pixels of −Σ_k Q_k log softmax(l/τ)_k``.

    Args:
        codes: Sinkhorn codes ``Q`` ``[B, K, *spatial]`` (targets: no gradient flows into them).
        local_logits: ``<norm(x), norm(P_l)>`` ``[B, K, *spatial]``.
        tau: softmax temperature.

    Returns:
        Scalar mean over pixels.
    """
    if codes.shape != local_logits.shape:
        raise ValueError(f"codes and local_logits must match, got {tuple(codes.shape)} and {tuple(local_logits.shape)}")
    log_q = F.log_softmax(local_logits / tau, dim=1)
    return -(codes.detach().to(log_q.dtype) * log_q).sum(dim=1).mean()


def orthogonality_loss(prototypes: torch.Tensor) -> torch.Tensor:
    """Prototype orthogonality (paper Eq. 6): ``Σ |norm(P) norm(P)ᵀ − I|`` (element-wise L1).

    Args:
        prototypes: ``[K, D]``; rows are L2-normalised here.

    Returns:
        Scalar sum over all K² entries.
    """
    if prototypes.dim() != 2:
        raise ValueError(f"prototypes must be [K, D], got shape {tuple(prototypes.shape)}")
    p = F.normalize(prototypes, dim=1, eps=1e-10)
    gram = p @ p.T
    eye = torch.eye(p.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).abs().sum()


def self_label_loss(local_logits: torch.Tensor, global_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Self-labelling (paper Eq. 7): cross-entropy of ``local_logits/τ`` against ``argmax_k global_logits``.

    Args:
        local_logits: ``<norm(x).detach(), norm(P_l)>`` ``[B, K, *spatial]``.
        global_logits: ``<norm(x), norm(P_g)>`` ``[B, K, *spatial]``; its argmax is the pseudo label
            (no gradient).
        tau: softmax temperature.

    Returns:
        Scalar mean over pixels.
    """
    if local_logits.shape != global_logits.shape:
        raise ValueError(
            f"local and global logits must match, got {tuple(local_logits.shape)} and {tuple(global_logits.shape)}"
        )
    pseudo = global_logits.detach().argmax(dim=1)
    return F.cross_entropy(local_logits / tau, pseudo)
