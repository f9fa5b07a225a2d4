"""SPEC 5's three weight normalisations, Eq. 5 then Eq. 7-8 and 13, written out loop by loop on
plain Python numbers and compared with the functional API and the batched calibration module."""

import math

import pytest
import torch

from macsc.method.allocation import balanced_weights, coarse_weights
from macsc.method.calibration import SelfBalancingCalibration, ordered_pairs


def cos(a, b):
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb) if na and nb else 0.0


def reference_weights(p_m, p_k, positive, normalization):
    """The weights of Eq. 7 for one modality pair, as SPEC 5 defines each option."""
    size = len(p_m)
    w = [[cos(p_m[i], p_k[j]) for j in range(size)] for i in range(size)]
    if normalization == "positives":
        out = []
        for i in range(size):
            row = [w[i][j] if positive[i][j] else 0.0 for j in range(size)]
            total = sum(row)
            out.append([x / total if total else 0.0 for x in row])
        return out
    eq5 = [[w[i][j] / sum(w[i]) if sum(w[i]) else 0.0 for j in range(size)] for i in range(size)]
    if normalization == "batch":
        return eq5  # masked in the loss
    masked = [[eq5[i][j] if positive[i][j] else 0.0 for j in range(size)] for i in range(size)]
    rows = sum(any(positive[i]) for i in range(size))
    mass = sum(sum(row) for row in masked)
    return [[x * rows / mass for x in row] for row in masked]


def reference_msb(features, distributions, positive, tau, normalization, z, reduction="mean"):
    """L_msb (Eq. 13) of features (M, B, D) and distributions (M, B, C) as nested lists."""
    size, batch = len(features), len(positive)
    pi = coarse_weights(torch.tensor(z)).tolist()
    total = 0.0
    for m in range(size):
        for k in range(size):
            if m == k:
                continue
            weights = reference_weights(distributions[m], distributions[k], positive, normalization)
            losses = []
            for i in range(batch):
                logits = [
                    sum(a * b for a, b in zip(features[m][i], features[k][j], strict=True)) / tau
                    for j in range(batch)
                ]
                top = max(logits)
                log_z = top + math.log(sum(math.exp(x - top) for x in logits))
                losses.append(
                    -sum(
                        weights[i][j] * (logits[j] - log_z) for j in range(batch) if positive[i][j]
                    )
                )
            pair = sum(losses) / batch if reduction == "mean" else sum(losses)
            total += pi[m][k] * pair
    return total / (size * (size - 1))


def test_balanced_weights_by_hand():
    torch.manual_seed(0)
    p_m, p_k = torch.softmax(torch.randn(5, 3), -1), torch.softmax(torch.randn(5, 3), -1)
    positive = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0] * 5, [0] * 5])
    positive = positive.bool()
    got = balanced_weights(p_m, p_k, positive)
    expected = reference_weights(p_m.tolist(), p_k.tolist(), positive.tolist(), "balanced")
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    # three anchors have a positive: their mean row mass is one
    assert got.sum().item() == pytest.approx(3.0)


def test_balanced_weights_keep_the_fine_signal_under_an_identity_mask():
    """The QA case: positives are the example itself. `positives` makes every weight one;
    `balanced` keeps Eq. 5's w_ii / sum_b w_ib, which differs across anchors."""
    torch.manual_seed(1)
    p_m, p_k = torch.softmax(3 * torch.randn(6, 4), -1), torch.softmax(3 * torch.randn(6, 4), -1)
    identity = torch.eye(6, dtype=torch.bool)
    got = balanced_weights(p_m, p_k, identity).diagonal()
    assert got.mean().item() == pytest.approx(1.0)
    assert got.std() > 0.05  # anchors that agree across modalities count more
    eq5 = reference_weights(p_m.tolist(), p_k.tolist(), identity.tolist(), "batch")
    ratio = got / torch.tensor([eq5[i][i] for i in range(6)])
    torch.testing.assert_close(ratio, ratio[0].expand(6))  # one scalar for the whole pair


@pytest.mark.parametrize("normalization", ["balanced", "batch", "positives"])
@pytest.mark.parametrize("identity", [False, True], ids=["class", "identity"])
def test_the_module_computes_the_reference_msb(normalization, identity):
    torch.manual_seed(2)
    modalities = ["text", "image", "audio"]
    calibration = SelfBalancingCalibration(
        modalities, 8, proj_dim=4, tau=0.3, weight_normalization=normalization
    ).double()
    with torch.no_grad():
        calibration.z.copy_(torch.randn(3, 3))
    features = calibration.project(torch.randn(3, 6, 8, dtype=torch.double))
    distributions = torch.softmax(torch.randn(3, 6, 4, dtype=torch.double), -1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    positive = torch.eye(6, dtype=torch.bool) if identity else labels[:, None] == labels[None]
    out = calibration(features, distributions, positive)
    expected = reference_msb(
        features.tolist(),
        distributions.tolist(),
        positive.tolist(),
        0.3,
        normalization,
        calibration.z.tolist(),
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)  # the module computes in fp32
    assert len(out.pair_losses) == len(ordered_pairs(modalities))
