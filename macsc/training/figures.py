"""Figures for TensorBoard (SPEC section 7): modality-pair matrices as labelled heatmaps."""

from __future__ import annotations

from typing import Any

import torch


def pair_heatmap(matrix: torch.Tensor, modalities: list[str], title: str) -> Any:
    """A matplotlib figure of an ``(M, M)`` matrix; rows are anchors ``m``, columns partners ``k``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    values = matrix.detach().float().cpu().numpy()
    size = len(modalities)
    figure, axes = plt.subplots(figsize=(1.2 * size + 2, 1.1 * size + 1.5))
    image = axes.imshow(values, cmap="viridis", vmin=0.0, vmax=max(1e-6, float(values.max())))
    axes.set_xticks(range(size), modalities)
    axes.set_yticks(range(size), modalities)
    axes.set_xlabel("k (partner)")
    axes.set_ylabel("m (anchor)")
    axes.set_title(title)
    for row in range(size):
        for col in range(size):
            axes.text(col, row, f"{values[row, col]:.2f}", ha="center", va="center", color="w")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return figure
