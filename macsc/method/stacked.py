"""Layers with one set of weights per modality (or per branch), stored stacked along a leading
axis so that all of them run as one batched operation: a GPU step at the paper's batch size is
bound by how many operators the host launches, not by their arithmetic (issue 20)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype products run in: autocast's where it is on for ``tensor``'s device, else
    ``tensor``'s own."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensor.dtype


def as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``, dispatching no operator when it already is."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def stacked_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x_m W_m^T + b_m`` for each slice ``m`` of the leading axis: ``(M, ..., d)``, weight
    ``(M or 1, out, d)``, bias ``(M or 1, out)`` -> ``(M, ..., out)``."""
    dtype = compute_dtype(x)
    out = torch.einsum("m...d,mod->m...o", x, as_dtype(weight, dtype))
    return out + as_dtype(bias, dtype).view(bias.shape[0], *([1] * (x.dim() - 2)), -1)


class StackedLinear(nn.Module):
    """``M`` independent linear maps applied at once: ``(M, ..., d)`` -> ``(M, ..., out)``.

    weight ``(M, out, d)``, bias ``(M, out)``; with ``M = 1`` the one map applies to every
    slice of an input with a longer leading axis (a shared block). ``initialise=False`` leaves
    the values to the caller (and draws no random numbers)."""

    def __init__(
        self, branches: int, in_features: int, out_features: int, initialise: bool = True
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(branches, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(branches, out_features))
        if initialise:
            bound = 1.0 / math.sqrt(in_features)
            with torch.no_grad():
                self.weight.uniform_(-bound, bound)
                self.bias.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return stacked_linear(x, self.weight, self.bias)


class StackedLayerNorm(nn.Module):
    """A LayerNorm per slice of the leading axis: weight and bias ``(M or 1, d)``."""

    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(blocks, width))
        self.bias = nn.Parameter(torch.zeros(blocks, width))

    def forward(self, x: Tensor) -> Tensor:
        """``(M, ..., d)`` -> ``(M, ..., d)``."""
        if self.weight.shape[0] == 1:  # one norm for every slice: the kernel's own affine
            return F.layer_norm(x, x.shape[-1:], self.weight[0], self.bias[0])
        shape = (self.weight.shape[0], *([1] * (x.dim() - 2)), -1)
        normed = F.layer_norm(x, x.shape[-1:])
        return torch.addcmul(self.bias.view(shape), normed, self.weight.view(shape))


class BlockProjection(nn.Module):
    """``Linear_m(H^m)`` of every modality in one product, although their widths ``d_m`` differ.

    weight ``(d, Σ d_m)``: modality ``m``'s ``(d, d_m)`` weight is its block of columns
    (``weight[:, o_m : o_m + d_m]``); bias ``(M, d)``. Each modality's input is placed in its
    block of a zero ``(M, B, n, Σ d_m)`` tensor, so one product computes every ``H^m W_m^T``.
    """

    def __init__(self, in_features: list[int], out_features: int) -> None:
        super().__init__()
        self.in_features = list(in_features)
        self.offsets = [sum(in_features[:i]) for i in range(len(in_features))]
        self.weight = nn.Parameter(torch.zeros(out_features, sum(in_features)))
        self.bias = nn.Parameter(torch.zeros(len(in_features), out_features))

    def block(self, index: int) -> slice:
        """The columns of ``weight`` that are modality ``index``'s weight."""
        return slice(self.offsets[index], self.offsets[index] + self.in_features[index])

    def forward(self, inputs: list[Tensor], rows: int, extra_bias: Tensor | None = None) -> Tensor:
        """inputs ``(B, n_m, d_m)`` per modality -> ``(M, B, rows, out)``; a modality with
        fewer than ``rows`` rows gets zero rows (its mask says so). ``extra_bias`` ``(M, out)``
        is added with the bias (the type embeddings)."""
        total, dtype = self.weight.shape[1], compute_dtype(self.weight)
        # stacked in their stored dtype (CPU autocast refuses to stack float16), then cast once
        with torch.autocast(self.weight.device.type, enabled=False):
            blocks = torch.stack(
                [
                    F.pad(x, (offset, total - offset - x.shape[-1], 0, rows - x.shape[1]))
                    for x, offset in zip(inputs, self.offsets, strict=True)
                ]
            )  # (M, B, rows, Σ d_m), zero outside each modality's block
        blocks = as_dtype(blocks, dtype)
        bias = self.bias if extra_bias is None else self.bias + extra_bias
        return F.linear(blocks, self.weight) + bias.view(len(inputs), 1, 1, -1)
