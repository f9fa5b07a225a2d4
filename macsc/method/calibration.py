"""Multi-scale self-balancing calibration as a module (SPEC sections 4-5).

Composes the functions of :mod:`macsc.method.allocation` and :mod:`macsc.method.losses`: one linear projector
per modality, the learnable coarse weights ``Z``, and every ordered modality pair of the
self-balancing loss computed at once on stacked tensors, with no Python loop: the terms of all
``M x M`` pairs ``(m, k)`` are one batched computation, and the pairs ``m = k``, which Eq. 13
leaves out, get the weight ``π_z^(m,m) = 0`` (four modalities: 16 pairs computed for 12 used,
in fewer operators than picking the 12 out first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from macsc.method.allocation import (
    NORMALIZED_WEIGHTS,
    coarse_weights,
    pairwise_agreement,
    unit_rows,
)
from macsc.method.losses import REDUCTIONS, self_balancing_contrastive_loss
from macsc.method.stacked import as_dtype

#: which fine-grained weights enter the loss (SPEC 5): Eq. 5 rescaled per pair (the default),
#: Eq. 5 as written, or normalised over each row's positives
WEIGHT_NORMALIZATIONS = ("balanced", "batch", "positives")


@dataclass
class CalibrationOutput:
    """loss: ``L_msb`` (scalar). pair_losses: ``L^(m,k)`` per ordered pair ``(P,)``.
    pi_z: ``(M, M)`` coarse weights. agreement: ``(P,)`` batch mean of the fine-grained
    similarities ``w_ij`` over positive pairs (what the ``W`` heatmap shows).
    """

    loss: Tensor
    pair_losses: Tensor
    pi_z: Tensor
    agreement: Tensor


def ordered_pairs(modalities: list[str]) -> list[tuple[int, int]]:
    """Every ordered pair ``(m, k)``, ``m != k``, as indices into ``modalities``."""
    size = len(modalities)
    return [(m, k) for m in range(size) for k in range(size) if m != k]


class SelfBalancingCalibration(nn.Module):
    """``L_msb`` of Eq. 13 from pooled branch representations and debiased predictions."""

    def __init__(
        self,
        modalities: list[str],
        hidden_size: int,
        proj_dim: int = 128,
        tau: float = 0.1,
        weight_normalization: str = "balanced",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if weight_normalization not in WEIGHT_NORMALIZATIONS:
            raise ValueError(
                f"weight_normalization must be one of {WEIGHT_NORMALIZATIONS}, "
                f"got {weight_normalization!r}"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.modalities = list(modalities)
        size = len(self.modalities)
        self.tau = tau
        self.weight_normalization = weight_normalization
        self.reduction = reduction
        # one projector g_m per modality, stored stacked so all modalities project in one einsum
        bound = 1.0 / hidden_size**0.5
        self.proj_weight = nn.Parameter(
            torch.empty(size, proj_dim, hidden_size).uniform_(-bound, bound)
        )
        self.proj_bias = nn.Parameter(torch.empty(size, proj_dim).uniform_(-bound, bound))
        self.z = nn.Parameter(torch.zeros(size, size))
        pairs = ordered_pairs(self.modalities)
        self.register_buffer(
            "anchor", torch.tensor([p[0] for p in pairs], dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "other", torch.tensor([p[1] for p in pairs], dtype=torch.long), persistent=False
        )

    @property
    def pair_names(self) -> list[tuple[str, str]]:
        return [(self.modalities[m], self.modalities[k]) for m, k in ordered_pairs(self.modalities)]

    def project(self, pooled: Tensor) -> Tensor:
        """``m_i = normalize(g_m(pool_m(i)))``: ``(M, B, d)`` -> ``(M, B, proj_dim)``."""
        weight, bias = (
            as_dtype(self.proj_weight, pooled.dtype),
            as_dtype(self.proj_bias, pooled.dtype),
        )
        return unit_rows(torch.baddbmm(bias.unsqueeze(1), pooled, weight.transpose(1, 2)))

    def forward(
        self, features: Tensor, distributions: Tensor, positive_mask: Tensor
    ) -> CalibrationOutput:
        """features: ``(M, B, proj_dim)`` from :meth:`project` (possibly gathered across devices);
        distributions: ``(M, B, C)`` debiased predictions, detached; positive_mask: ``(B, B)``.
        """
        pi_z = coarse_weights(self.z)  # (M, M), zero on the diagonal
        size = len(self.modalities)
        if size < 2:
            zero = features.sum() * 0.0
            return CalibrationOutput(zero, features.new_zeros(0), pi_z, features.new_zeros(0))
        agreement = pairwise_agreement(as_dtype(distributions, torch.float32))  # (M, M, B, B)
        weights = NORMALIZED_WEIGHTS[self.weight_normalization](agreement, positive_mask)
        features = as_dtype(features, torch.float32)
        pair_losses = self_balancing_contrastive_loss(
            features.unsqueeze(1),  # anchors m: (M, 1, B, D)
            features.unsqueeze(0),  # others k: (1, M, B, D)
            weights,
            positive_mask,
            self.tau,
            self.reduction,
        )  # L^(m,k): (M, M)
        loss = (pi_z * pair_losses).sum() / (size * (size - 1))
        with torch.no_grad():
            mask = positive_mask.to(agreement.dtype)
            agreement = (agreement * mask).sum((-1, -2)) / mask.sum().clamp_min(1.0)
        pairs = (self.anchor, self.other)
        return CalibrationOutput(loss, pair_losses[pairs], pi_z, agreement[pairs])
