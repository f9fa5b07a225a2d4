"""The MaCSC objective ``L = L_wa + λ L_msb`` (Eq. 14) from the heads' outputs (SPEC 3-5)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from macsc.errors import ConfigError
from macsc.method.allocation import class_prior
from macsc.method.calibration import SelfBalancingCalibration
from macsc.method.heads import HeadOutput, TaskHead
from macsc.method.options import ObjectiveOptions


@dataclass
class DeviceGroup:
    """What gathering across DDP ranks needs: ``all_gather`` (a tensor -> ``(W, ...)``), the
    world size and this rank."""

    all_gather: Callable[[Tensor], Tensor]
    world_size: int
    rank: int


class MaCSCObjective(nn.Module):
    """Late-fusion weights ``ρ`` (Eq. 11), the class prior ``π_e`` and the self-balancing
    calibration (Eq. 4-8, 13); ``forward`` gives every loss term of one batch.

    Args:
        modalities: the run's modalities, ``text`` first.
        hidden_size: width of the pooled branch representations.
        head: the task head whose outputs the objective reads (its kind decides whether there
            is late fusion, a class prior, and which samples are positives; its
            ``default_lambda_msb`` is ``λ`` when the options leave it null).
        options: :class:`macsc.method.options.ObjectiveOptions`.
    """

    def __init__(
        self,
        modalities: list[str],
        hidden_size: int,
        head: TaskHead,
        options: ObjectiveOptions = ObjectiveOptions(),
    ) -> None:
        super().__init__()
        self.modalities = list(modalities)
        lambda_msb = head.default_lambda_msb if options.lambda_msb is None else options.lambda_msb
        self.lambda_msb = lambda_msb
        self.reduction = options.reduction
        self.gather_across_devices = options.gather_across_devices
        self.rho_logits = nn.Parameter(torch.zeros(len(modalities))) if head.late_fusion else None
        if lambda_msb != 0 and not head.late_fusion:
            raise ConfigError(
                f"model.objective.lambda_msb={lambda_msb}: a {head.spec.kind} task has one "
                "output, not one per modality, so there is no self-balancing loss (SPEC 6); set "
                "model.objective.lambda_msb: 0"
            )
        # no calibration parameters at all when L_msb is off: DDP rejects unused parameters
        self.calibration = (
            SelfBalancingCalibration(
                modalities,
                hidden_size,
                options.proj_dim,
                options.tau,
                options.weight_normalization,
                options.reduction,
            )
            if lambda_msb != 0 and len(modalities) > 1
            else None
        )
        self.register_buffer("class_prior", torch.full((head.prior_size,), 1.0 / head.prior_size))
        self.alpha = options.alpha if head.uses_prior else 0.0

    def set_class_prior(self, head: TaskHead, classes: Tensor) -> None:
        """``π_e`` from the class of every training example (SPEC 4)."""
        self.class_prior.copy_(class_prior(classes, head.prior_size).to(self.class_prior))

    @property
    def term_names(self) -> list[str]:
        """Names of the loss terms checked for NaN/Inf, in :meth:`terms` order."""
        if self.calibration is None:
            return ["wa"]
        return ["wa", "msb", *(f"pair {m}->{k}" for m, k in self.calibration.pair_names)]

    def terms(self, losses: dict[str, Any]) -> Tensor:
        """``(T,)`` detached float values of the terms of :attr:`term_names`."""
        values = [losses["wa"].detach().float().reshape(1)]
        if self.calibration is not None:
            values += [losses["msb"].detach().float().reshape(1), losses["pairs"].detach().float()]
        return torch.cat(values)

    def forward(
        self, head: TaskHead, output: HeadOutput, batch: dict, devices: DeviceGroup | None = None
    ) -> dict[str, Any]:
        """``{"wa", "total"}``, plus ``"msb"``, ``"pairs"`` (``L^(m,k)``), ``"pi_z"`` and
        ``"agreement"`` when the calibration is on. ``devices``: gather across ranks."""
        wa = head.aggregation_loss(output.outputs, self.rho_logits, batch)
        gather = self.gather_across_devices and devices is not None and devices.world_size > 1
        if self.reduction == "sum":
            # Eq. 12 sums over the examples as Eq. 8 does over the anchors, so that lambda keeps
            # its meaning; gathered, L_msb sums over every rank's anchors, and so must L_wa
            wa = wa * batch["input_ids"].shape[0] * (devices.world_size if gather else 1)
        result: dict[str, Any] = {"wa": wa}
        if self.calibration is None:
            result["total"] = wa
            return result
        features = self.calibration.project(output.features)
        distributions = head.allocation_distributions(
            output.outputs, self.class_prior, self.alpha, batch
        )
        keys = head.positive_keys(batch)
        if gather:
            features, distributions, keys = gather_batch(
                features, distributions, keys, devices, head.identity_positives
            )
        positives = keys.unsqueeze(0) == keys.unsqueeze(1)
        calibration = self.calibration(features, distributions.flatten(2), positives)
        result.update(
            msb=calibration.loss,
            pairs=calibration.pair_losses,
            pi_z=calibration.pi_z,
            agreement=calibration.agreement,
            total=wa + self.lambda_msb * calibration.loss,
        )
        return result


def gather_batch(
    features: Tensor,
    distributions: Tensor,
    keys: Tensor,
    devices: DeviceGroup,
    identity_positives: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """All-gather features ``(M, B, D)``, distributions ``(M, B, ..., C)`` and keys ``(B,)``
    along the batch; gradients flow through this rank's own slice. ``C`` may differ between
    ranks (span positions): each rank's is zero-padded to the longest.

    Every rank then computes the same ``L_msb`` over the global batch, and this rank's features
    get ``dL/df_rank`` only. DDP averages gradients over the ``W`` ranks, so the local slice's
    gradient is scaled by ``W`` (its value is unchanged): the averaged gradient is then exactly
    that of the single-process loss on the concatenated batch. The ranks' batches have one size
    because the training samplers pad every rank to the same number of examples
    (:class:`tasks.sampling.ResumableSampler`), so the all-gather cannot stall. Identity
    positives (keys ``0..B-1`` on every rank) are offset by ``rank * B`` to stay unique.
    """
    world, rank = devices.world_size, devices.rank
    # span distributions cover each rank's own padded length: pad them to the longest first
    # (with zeros, which no position of a shorter sample carries anyway)
    length = torch.tensor(distributions.shape[-1], device=distributions.device)
    longest = int(devices.all_gather(length).max())
    distributions = F.pad(distributions, (0, longest - distributions.shape[-1]))  # (M, B, ..., C')
    local = features + (features - features.detach()) * (world - 1)  # (M, B, D), gradient x W
    gathered = devices.all_gather(features.detach().transpose(0, 1).contiguous())  # (W, B, M, D)
    gathered = torch.cat(
        [local.transpose(0, 1) if r == rank else gathered[r] for r in range(world)]
    )  # (W*B, M, D)
    dists = devices.all_gather(distributions.transpose(0, 1).contiguous()).flatten(0, 1)
    # dists: (W*B, M, ..., C')
    all_keys = devices.all_gather(keys).flatten()  # (W*B,)
    if identity_positives:
        offset = torch.arange(world, device=keys.device).repeat_interleave(keys.numel())
        all_keys = all_keys + offset * keys.numel()
    return gathered.transpose(0, 1), dists.transpose(0, 1), all_keys  # (M, W*B, D), ...
