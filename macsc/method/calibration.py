"""Multi-scale self-balancing calibration as a module (SPEC sections 4-5).

Composes the functions of :mod:`macsc.method.allocation` and :mod:`macsc.method.losses`: one linear projector
per modality, the learnable coarse weights ``Z``, and every ordered modality pair of the
self-balancing loss computed at once on stacked tensors (12 pairs for four modalities in one
batched matmul, not a Python loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from macsc.method.allocation import (
    allocation_weights,
    balanced_weights,
    coarse_weights,
    cosine_agreement,
    positive_weights,
)
from macsc.method.losses import REDUCTIONS, self_balancing_contrastive_loss

#: which fine-grained weights enter the loss (SPEC 5): Eq. 5 rescaled per pair (the default),
#: Eq. 5 as written, or normalised over each row's positives
WEIGHT_NORMALIZATIONS = ("balanced", "batch", "positives")
_WEIGHTS = {"balanced": balanced_weights, "positives": positive_weights}


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
        projected = torch.einsum("mbd,mpd->mbp", pooled, self.proj_weight.to(pooled.dtype))
        return F.normalize(projected + self.proj_bias.to(pooled.dtype).unsqueeze(1), dim=-1)

    def forward(
        self, features: Tensor, distributions: Tensor, positive_mask: Tensor
    ) -> CalibrationOutput:
        """features: ``(M, B, proj_dim)`` from :meth:`project` (possibly gathered across devices);
        distributions: ``(M, B, C)`` debiased predictions, detached; positive_mask: ``(B, B)``.
        """
        pi_z = coarse_weights(self.z)
        if len(self.modalities) < 2:
            zero = features.sum() * 0.0
            return CalibrationOutput(zero, features.new_zeros(0), pi_z, features.new_zeros(0))
        distributions = distributions.float()
        p_anchor, p_other = distributions[self.anchor], distributions[self.other]
        if self.weight_normalization == "batch":
            weights = allocation_weights(p_anchor, p_other)
        else:
            weights = _WEIGHTS[self.weight_normalization](p_anchor, p_other, positive_mask)
        pair_losses = self_balancing_contrastive_loss(
            features[self.anchor].float(),
            features[self.other].float(),
            weights,
            positive_mask,
            self.tau,
            self.reduction,
        )
        size = len(self.modalities)
        loss = (pi_z[self.anchor, self.other] * pair_losses).sum() / (size * (size - 1))
        with torch.no_grad():
            similarity = cosine_agreement(p_anchor, p_other)
            mask = positive_mask.to(similarity.dtype)
            agreement = (similarity * mask).sum((-1, -2)) / mask.sum().clamp_min(1.0)
        return CalibrationOutput(loss, pair_losses, pi_z, agreement)
