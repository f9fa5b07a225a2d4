"""The objective of MaCSC (paper Sections 2.5-2.6, Eq. 7-8 and 11-14; SPEC sections 3 and 5).

Pure, differentiable functions. ``M`` modalities, ``P`` modality pairs, ``B`` batch, ``D``
projector width, ``C`` classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from macsc.method.stacked import as_dtype

REDUCTIONS = ("mean", "sum")


def self_balancing_contrastive_loss(
    m_feats: Tensor,
    k_feats: Tensor,
    weights: Tensor,
    positive_mask: Tensor,
    tau: float,
    reduction: str = "mean",
) -> Tensor:
    """Eq. 7-8: ``L_i = -sum_j 1(y_i = y_j) w_ij log p_ij``, ``p_ij = softmax_j(m_i . k_j / tau)``.

    m_feats, k_feats: ``(..., B, D)`` used as given (the caller L2-normalises them).
    weights: ``(..., B, B)`` allocation weights; positive_mask: ``(B, B)`` or ``(..., B, B)`` bool.
    Returns the mean (or sum) over ``i``, with shape ``(...)``: a scalar for one pair, ``(P,)``
    when a stack of ``P`` pairs is given at once.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = m_feats @ k_feats.transpose(-1, -2) / tau
    log_p = torch.log_softmax(logits, dim=-1)
    mask = positive_mask.to(log_p.dtype)
    per_anchor = -(mask * as_dtype(weights, log_p.dtype) * log_p).sum(dim=-1)
    return per_anchor.mean(dim=-1) if reduction == "mean" else per_anchor.sum(dim=-1)


def multiscale_self_balancing_loss(
    pair_losses: Mapping[tuple[str, str], Tensor], pi_z: Tensor, modalities: Sequence[str]
) -> Tensor:
    """Eq. 13: ``L_msb = sum_m sum_{k != m} pi_z^(m,k) L^(m,k) / (|M| (|M| - 1))``.

    pair_losses: ``{(m, k): scalar}`` for every ordered pair ``m != k``; pi_z: ``(M, M)`` whose
    rows and columns follow ``modalities``. ``|M| = 1`` gives zero.
    """
    size = len(modalities)
    if size < 2:
        return pi_z.new_zeros(())
    index = {name: i for i, name in enumerate(modalities)}
    missing = [
        (m, k) for m in modalities for k in modalities if m != k and (m, k) not in pair_losses
    ]
    if missing:
        raise KeyError(f"multiscale_self_balancing_loss: no loss for modality pairs {missing}")
    total = sum(pi_z[index[m], index[k]] * pair_losses[(m, k)] for (m, k) in pair_losses if m != k)
    return total / (size * (size - 1))


def weighted_aggregation_loss(branch_logits: Tensor, rho_logits: Tensor, targets: Tensor) -> Tensor:
    """Eq. 11-12: cross-entropy of the mixture ``p(y|x) = sum_m rho_m softmax(z_m)[y]``.

    branch_logits: ``(M, B, C)``; rho_logits: ``(M,)`` (``rho = softmax(rho_logits)``);
    targets: ``(B,)`` long. Computed stably as ``-logsumexp_m(log rho_m + log_softmax(z_m)[y])``
    and averaged over the batch. This is the loss of a mixture of probabilities, not of mixed
    logits.
    """
    return -mixture_log_likelihood(branch_logits, rho_logits, targets).mean()


def mixture_log_likelihood(branch_logits: Tensor, rho_logits: Tensor, targets: Tensor) -> Tensor:
    """``log sum_m rho_m softmax(z_m)[y]`` per sample: ``(B,)``. Shapes as in Eq. 11."""
    log_rho = torch.log_softmax(rho_logits.to(branch_logits.dtype), dim=0)
    log_probs = torch.log_softmax(branch_logits, dim=-1)
    index = targets.long().view(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    picked = log_probs.gather(-1, index).squeeze(-1)
    return torch.logsumexp(log_rho.unsqueeze(-1) + picked, dim=0)


def mixture_probabilities(branch_logits: Tensor, rho_logits: Tensor) -> Tensor:
    """Eq. 11, the fused prediction: ``(M, B, C)`` logits -> ``(B, C)`` probabilities."""
    rho = torch.softmax(rho_logits.to(branch_logits.dtype), dim=0)
    return torch.einsum("m,mbc->bc", rho, torch.softmax(branch_logits, dim=-1))


def weighted_regression_loss(branch_preds: Tensor, rho_logits: Tensor, targets: Tensor) -> Tensor:
    """SPEC 3, regression: ``MSE(sum_m rho_m y_m, y)``. branch_preds ``(M, B)``, targets ``(B,)``."""
    return torch.mean((fused_regression(branch_preds, rho_logits) - targets.to(branch_preds)) ** 2)


def fused_regression(branch_preds: Tensor, rho_logits: Tensor) -> Tensor:
    """``sum_m rho_m y_m``: ``(M, B)`` -> ``(B,)``."""
    return torch.softmax(rho_logits.to(branch_preds.dtype), dim=0) @ branch_preds
