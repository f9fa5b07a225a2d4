"""The modality-weight heatmaps TensorBoard shows at each validation (SPEC 7)."""

from __future__ import annotations

import lightning as L
import torch

from macsc.method.allocation import coarse_weights
from macsc.method.calibration import ordered_pairs


class ModalityWeightHeatmaps(L.Callback):
    """At each validation end: ``weights/pi_z`` (the coarse pair weights, Eq. 6) and
    ``weights/W_fine`` (the batch mean of the fine-grained similarities ``w_ij`` on positive
    pairs per modality pair, over the training steps since the last validation), as labelled
    figures in a logger that takes figures (TensorBoard). The model adds it itself
    (``configure_callbacks``); it does nothing when the run has no calibration."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        agreement = outputs.get("agreement") if isinstance(outputs, dict) else None
        if agreement is None:
            return
        agreement = agreement.detach()
        self._sum = agreement if self._sum is None else self._sum + agreement
        self._count += 1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        calibration = pl_module.objective.calibration
        if (
            trainer.sanity_checking
            or not trainer.is_global_zero
            or not hasattr(experiment, "add_figure")
            or calibration is None
        ):
            return
        from macsc.training.figures import pair_heatmap

        modalities = pl_module.modalities
        pi_z = coarse_weights(calibration.z.detach())
        experiment.add_figure(
            "weights/pi_z", pair_heatmap(pi_z, modalities, "pi_z (coarse)"), trainer.global_step
        )
        if self._count:
            size = len(modalities)
            matrix = torch.zeros(size, size)
            mean = (self._sum / self._count).cpu()
            for value, (m, k) in zip(mean, ordered_pairs(modalities), strict=True):
                matrix[m, k] = value
            experiment.add_figure(
                "weights/W_fine",
                pair_heatmap(matrix, modalities, "mean fine-grained w_ij on positives"),
                trainer.global_step,
            )
        self._sum, self._count = None, 0
