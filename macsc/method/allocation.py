"""Multi-scale information allocation estimation (paper Section 2.4, Eq. 4-6; SPEC section 4).

Pure functions on tensors. Shapes: ``B`` batch, ``C`` classes (or bins, or span positions),
``M`` modalities, ``P`` modality pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from macsc.method.stacked import as_dtype

_EPS = 1e-12


def class_prior(labels: Tensor, num_classes: int) -> Tensor:
    """``pi_e`` of Eq. 4: add-one smoothed class frequencies of the training labels.

    labels: ``(N,)`` long in ``[0, num_classes)``. Returns ``(C,)`` float summing to one; a class
    absent from ``labels`` keeps a count of one, so ``log pi_e`` stays finite.
    """
    labels = torch.as_tensor(labels).long().flatten()
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"class_prior: labels must lie in [0, {num_classes}); "
            f"got values from {int(labels.min())} to {int(labels.max())}"
        )
    counts = torch.bincount(labels, minlength=num_classes).double() + 1.0
    return (counts / counts.sum()).float()


def debiased_distribution(logits: Tensor, prior: Tensor, alpha: float = 1.0) -> Tensor:
    """Eq. 4: ``p_i = softmax(logits_i - alpha * log pi_e)``.

    logits: ``(..., C)``; prior: ``(C,)`` positive. Returns ``(..., C)``. Differentiable; the
    model detaches the result because these distributions are targets (Theorem 1's proof).
    """
    log_prior = as_dtype(prior, logits.dtype).clamp_min(_EPS).log()
    return torch.softmax(logits - alpha * log_prior, dim=-1)


def soft_bin_distribution(values: Tensor, centres: Tensor) -> Tensor:
    """Regression branches as distributions over label bins (SPEC 4, STS-B).

    values: ``(..., )`` predicted scalars; centres: ``(C,)`` equally spaced bin centres.
    Returns ``(..., C)``: ``softmax(-(value - c)^2 / sigma^2)`` with ``sigma`` the bin width.
    """
    centres = centres.to(values.dtype)
    sigma = (centres[1] - centres[0]).abs() if centres.numel() > 1 else centres.new_tensor(1.0)
    return torch.softmax(-((values.unsqueeze(-1) - centres) ** 2) / sigma**2, dim=-1)


def nearest_bin(values: Tensor, centres: Tensor | list[float]) -> Tensor:
    """Regression labels as classes (SPEC 4): index of the nearest bin centre.

    values: ``(...)``; centres: ``(C,)``. Returns ``(...)`` long; a value halfway between two
    centres goes to the lower one.
    """
    centres = torch.as_tensor(centres, dtype=torch.float, device=values.device)
    return (values.float().unsqueeze(-1) - centres).abs().argmin(dim=-1)


def cosine_agreement(p_m: Tensor, p_k: Tensor) -> Tensor:
    """``w_ij = cos(p_i^m, p_j^k)`` for every pair of samples.

    p_m, p_k: ``(..., B, C)``. Returns ``(..., B, B)``. A zero vector has zero similarity with
    everything (instead of NaN).
    """
    return unit_rows(p_m) @ unit_rows(p_k).transpose(-1, -2)


def pairwise_agreement(distributions: Tensor) -> Tensor:
    """:func:`cosine_agreement` of every ordered pair of modalities at once:
    ``(M, B, C)`` -> ``(M, M, B, B)``, entry ``[m, k]`` the agreement ``w^(m,k)``."""
    unit = unit_rows(distributions)
    return torch.einsum("mic,kjc->mkij", unit, unit)


def unit_rows(x: Tensor) -> Tensor:
    """``x`` with each row (last dim) scaled to length one; a zero row stays zero
    (``F.normalize`` with its ``eps``)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_EPS)


def allocation_weights(p_m: Tensor, p_k: Tensor) -> Tensor:
    """Eq. 5: ``p(w_ij) = w_ij / sum_b w_ib`` with ``w_ij = cos(p_i^m, p_j^k)``.

    p_m, p_k: ``(B, C)`` (or batched ``(..., B, C)``). Returns ``(B, B)``; each row sums to one
    over the whole batch (rows whose similarities are all zero stay zero). The label mask of Eq. 7
    is applied afterwards, in the loss.
    """
    return batch_normalized(cosine_agreement(p_m, p_k))


def positive_weights(p_m: Tensor, p_k: Tensor, positive_mask: Tensor) -> Tensor:
    """SPEC 5, ``weight_normalization: positives``: ``w_ij 1(y_i = y_j)`` normalised per row.

    Same shapes as :func:`allocation_weights`, ``positive_mask`` ``(B, B)`` bool. Every row with a
    positive sums to one, so losses of different modality pairs are on one scale; a row without
    positives is all zero and contributes nothing.
    """
    return positives_normalized(cosine_agreement(p_m, p_k), positive_mask)


def balanced_weights(p_m: Tensor, p_k: Tensor, positive_mask: Tensor) -> Tensor:
    """SPEC 5, ``weight_normalization: balanced`` (the default): Eq. 5 over the whole batch,
    masked by the positives, then rescaled by one scalar so that the mean row mass over the
    anchors that have a positive is one: ``W <- W * n_rows / sum W``.

    p_m, p_k: ``(..., B, C)``; positive_mask: ``(B, B)`` bool. Returns ``(..., B, B)``. Unlike
    :func:`positive_weights` it keeps which anchors count more (an anchor whose predictions agree
    with its positives more than with the rest of the batch keeps more mass), which is all the
    fine-grained signal there is under an identity mask (QA); the scalar makes the losses of
    different modality pairs comparable. All zero when no weight survives the mask.
    """
    return balanced_normalized(cosine_agreement(p_m, p_k), positive_mask)


def batch_normalized(agreement: Tensor, positive_mask: Tensor | None = None) -> Tensor:
    """:func:`allocation_weights` from the agreement ``w`` ``(..., B, B)`` (Eq. 5; the mask is
    the loss's business)."""
    return _normalize_rows(agreement)


def positives_normalized(agreement: Tensor, positive_mask: Tensor) -> Tensor:
    """:func:`positive_weights` from the agreement ``w`` ``(..., B, B)``."""
    return _normalize_rows(agreement * positive_mask.to(agreement.dtype))


def balanced_normalized(agreement: Tensor, positive_mask: Tensor) -> Tensor:
    """:func:`balanced_weights` from the agreement ``w`` ``(..., B, B)``."""
    weights = _normalize_rows(agreement) * positive_mask.to(agreement.dtype)
    rows = positive_mask.any(dim=-1).sum().to(weights.dtype)
    total = weights.sum(dim=(-1, -2), keepdim=True)
    return weights * (rows / total.clamp_min(_EPS))


#: SPEC 5's ``weight_normalization``: the weights that enter Eq. 7, from the agreement ``w``
#: and the positives
NORMALIZED_WEIGHTS = {
    "balanced": balanced_normalized,
    "batch": batch_normalized,
    "positives": positives_normalized,
}


def coarse_weights(z: Tensor) -> Tensor:
    """Eq. 6: ``pi_z^(m, k) = softmax_{k != m} z[m, k]``; the diagonal takes no part and is zero.

    z: ``(M, M)``. Returns ``(M, M)``; each row sums to one when ``M > 1``; ``M = 1`` gives ``[[0]]``.
    """
    size = z.shape[-1]
    diagonal = torch.eye(size, dtype=torch.bool, device=z.device)
    if size == 1:
        return torch.zeros_like(z)
    return torch.softmax(z.masked_fill(diagonal, float("-inf")), dim=-1).masked_fill(diagonal, 0.0)


def _normalize_rows(weights: Tensor) -> Tensor:
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(_EPS)
