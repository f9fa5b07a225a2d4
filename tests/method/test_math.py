"""Each equation of SPEC.md against an independent, loop-by-loop computation on small tensors."""

import math

import pytest
import torch

from macsc.method.allocation import (
    allocation_weights,
    class_prior,
    coarse_weights,
    debiased_distribution,
    positive_weights,
    soft_bin_distribution,
)
from macsc.method.losses import (
    multiscale_self_balancing_loss,
    self_balancing_contrastive_loss,
    weighted_aggregation_loss,
    weighted_regression_loss,
)

torch.manual_seed(0)


def _cos(a, b):
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb) if na and nb else 0.0


def test_class_prior_add_one_smoothing_and_absent_class():
    labels = torch.tensor([0, 0, 0, 2, 2])  # class 1 and class 3 absent
    prior = class_prior(labels, 4)
    expected = torch.tensor([4, 1, 3, 1], dtype=torch.float) / 9
    assert torch.allclose(prior, expected)
    assert torch.isfinite(prior.log()).all()


def test_class_prior_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_prior(torch.tensor([0, 2]), 2)


def test_debiased_distribution_eq4():
    logits = torch.randn(3, 4)
    prior = torch.tensor([0.5, 0.25, 0.125, 0.125])
    alpha = 0.7
    got = debiased_distribution(logits, prior, alpha)
    for i in range(3):
        shifted = [logits[i, c].item() - alpha * math.log(prior[c].item()) for c in range(4)]
        top = max(shifted)
        z = sum(math.exp(s - top) for s in shifted)
        for c in range(4):
            assert got[i, c].item() == pytest.approx(math.exp(shifted[c] - top) / z, rel=1e-5)


def test_debiased_distribution_with_uniform_prior_is_softmax():
    logits = torch.randn(5, 3)
    got = debiased_distribution(logits, torch.full((3,), 1 / 3), alpha=1.0)
    assert torch.allclose(got, torch.softmax(logits, -1), atol=1e-6)


def test_allocation_weights_eq5_rows_normalised_over_whole_batch():
    p_m = torch.softmax(torch.randn(4, 3), -1)
    p_k = torch.softmax(torch.randn(4, 3), -1)
    got = allocation_weights(p_m, p_k)
    for i in range(4):
        row = [_cos(p_m[i].tolist(), p_k[j].tolist()) for j in range(4)]
        for j in range(4):
            assert got[i, j].item() == pytest.approx(row[j] / sum(row), rel=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(4))


def test_allocation_weights_zero_vector_gives_zero_row_not_nan():
    p_m = torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    got = allocation_weights(p_m, torch.softmax(torch.randn(2, 2), -1))
    assert torch.isfinite(got).all()
    assert torch.equal(got[0], torch.zeros(2))


def test_positive_weights_normalised_over_positives():
    p_m = torch.softmax(torch.randn(5, 3), -1)
    p_k = torch.softmax(torch.randn(5, 3), -1)
    labels = torch.tensor([0, 1, 0, 2, 0])  # sample 1 and 3 have no other positive but themselves
    mask = labels[:, None] == labels[None, :]
    mask[3, 3] = False  # a row with no positive at all
    got = positive_weights(p_m, p_k, mask)
    for i in range(5):
        row = [_cos(p_m[i].tolist(), p_k[j].tolist()) * bool(mask[i, j]) for j in range(5)]
        total = sum(row)
        for j in range(5):
            assert got[i, j].item() == pytest.approx(row[j] / total if total else 0.0, abs=1e-6)
    assert torch.equal(got[3], torch.zeros(5))


def test_coarse_weights_eq6_off_diagonal_softmax():
    z = torch.randn(4, 4)
    got = coarse_weights(z)
    for m in range(4):
        others = [k for k in range(4) if k != m]
        denom = sum(math.exp(z[m, k].item()) for k in others)
        assert got[m, m].item() == 0.0
        for k in others:
            assert got[m, k].item() == pytest.approx(math.exp(z[m, k].item()) / denom, rel=1e-5)


def test_coarse_weights_single_modality_is_zero():
    assert torch.equal(coarse_weights(torch.zeros(1, 1)), torch.zeros(1, 1))


def _reference_sbc(m, k, w, mask, tau):
    B = m.shape[0]
    total = 0.0
    for i in range(B):
        sims = [
            sum(m[i, d].item() * k[j, d].item() for d in range(m.shape[1])) / tau for j in range(B)
        ]
        top = max(sims)
        log_z = top + math.log(sum(math.exp(s - top) for s in sims))
        total += -sum(bool(mask[i, j]) * w[i, j].item() * (sims[j] - log_z) for j in range(B))
    return total


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_self_balancing_contrastive_loss_eq7_8(reduction):
    B, D, tau = 5, 3, 0.1
    m = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    w = torch.rand(B, B)
    labels = torch.tensor([0, 1, 0, 1, 2])
    mask = labels[:, None] == labels[None, :]
    got = self_balancing_contrastive_loss(m, k, w, mask, tau, reduction=reduction)
    expected = _reference_sbc(m, k, w, mask, tau)
    expected = expected / B if reduction == "mean" else expected
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_self_balancing_contrastive_loss_row_without_positive_contributes_zero():
    m = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    loss = self_balancing_contrastive_loss(m, k, torch.ones(3, 3), mask, 0.1)
    assert loss.item() == 0.0


def test_self_balancing_contrastive_loss_batched_pairs_match_single_pairs():
    feats = torch.nn.functional.normalize(torch.randn(3, 6, 4), dim=-1)
    w = torch.rand(2, 6, 6)
    mask = torch.rand(6, 6) > 0.5
    batched = self_balancing_contrastive_loss(feats[[0, 1]], feats[[2, 0]], w, mask, 0.2)
    assert batched.shape == (2,)
    assert batched[0] == pytest.approx(
        self_balancing_contrastive_loss(feats[0], feats[2], w[0], mask, 0.2).item(), rel=1e-6
    )
    assert batched[1] == pytest.approx(
        self_balancing_contrastive_loss(feats[1], feats[0], w[1], mask, 0.2).item(), rel=1e-6
    )


def test_self_balancing_contrastive_loss_is_differentiable():
    m = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    loss = self_balancing_contrastive_loss(
        m, k, torch.rand(4, 4), torch.ones(4, 4, dtype=torch.bool), 0.1
    )
    loss.backward()
    assert m.grad is not None and k.grad is not None and m.grad.abs().sum() > 0


def test_theorem_1_optimal_logits_equal_allocation_weights():
    """Minimising L_i over free logits with the label mask off drives p_ij to p(w_ij)."""
    torch.manual_seed(1)
    B = 6
    p_m = torch.softmax(torch.randn(B, 3) * 2, -1)
    p_k = torch.softmax(torch.randn(B, 3) * 2, -1)
    target = allocation_weights(p_m, p_k)
    free = torch.zeros(B, B, requires_grad=True)
    optimizer = torch.optim.Adam([free], lr=0.1)
    no_mask = torch.ones(B, B, dtype=torch.bool)
    eye = torch.eye(B)
    for _ in range(1500):
        optimizer.zero_grad()
        # features chosen so that m_i . k_j / tau == free_ij: one-hot anchors against free rows
        loss = self_balancing_contrastive_loss(eye, free, target, no_mask, tau=1.0)
        loss.backward()
        optimizer.step()
    learned = torch.softmax(free.detach().T, dim=-1)
    assert torch.allclose(learned, target, atol=2e-3)


def test_multiscale_self_balancing_loss_eq13():
    modalities = ["text", "image", "audio"]
    pi_z = coarse_weights(torch.randn(3, 3))
    pair_losses = {
        (m, k): torch.tensor(float(1 + i))
        for i, (m, k) in enumerate((m, k) for m in modalities for k in modalities if m != k)
    }
    got = multiscale_self_balancing_loss(pair_losses, pi_z, modalities)
    expected = 0.0
    for a, m in enumerate(modalities):
        for b, k in enumerate(modalities):
            if a != b:
                expected += pi_z[a, b].item() * pair_losses[(m, k)].item()
    assert got.item() == pytest.approx(expected / 6, rel=1e-6)


def test_multiscale_self_balancing_loss_single_modality_is_zero():
    assert multiscale_self_balancing_loss({}, torch.zeros(1, 1), ["text"]).item() == 0.0


def test_multiscale_self_balancing_loss_missing_pair_names_it():
    with pytest.raises(KeyError, match="image"):
        multiscale_self_balancing_loss(
            {("text", "image"): torch.tensor(1.0)}, torch.zeros(2, 2), ["text", "image"]
        )


def test_weighted_aggregation_loss_eq11_12_mixture_of_probabilities():
    M, B, C = 3, 4, 5
    logits = torch.randn(M, B, C)
    rho_logits = torch.randn(M)
    targets = torch.tensor([0, 4, 2, 2])
    got = weighted_aggregation_loss(logits, rho_logits, targets)
    rho = [math.exp(r) for r in rho_logits.tolist()]
    rho = [r / sum(rho) for r in rho]
    expected = 0.0
    for i in range(B):
        mix = 0.0
        for m in range(M):
            row = logits[m, i].tolist()
            mix += rho[m] * math.exp(row[targets[i]]) / sum(math.exp(x) for x in row)
        expected += -math.log(mix)
    assert got.item() == pytest.approx(expected / B, rel=1e-5)
    # not the cross-entropy of mixed logits
    mixed = torch.einsum("m,mbc->bc", torch.softmax(rho_logits, 0), logits)
    assert abs(got.item() - torch.nn.functional.cross_entropy(mixed, targets).item()) > 1e-4


def test_weighted_aggregation_loss_stable_for_extreme_logits():
    logits = torch.tensor([[[1000.0, -1000.0]], [[-1000.0, 1000.0]]])
    loss = weighted_aggregation_loss(logits, torch.zeros(2), torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-5)


def test_weighted_regression_loss():
    preds = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    rho_logits = torch.tensor([0.0, math.log(3.0)])  # rho = [0.25, 0.75]
    fused = [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 0]
    targets = torch.tensor([2.0, 1.0])
    expected = ((fused[0] - 2) ** 2 + (fused[1] - 1) ** 2) / 2
    assert weighted_regression_loss(preds, rho_logits, targets).item() == pytest.approx(expected)


def test_soft_bin_distribution():
    centres = torch.arange(6, dtype=torch.float)
    got = soft_bin_distribution(torch.tensor([2.3]), centres)
    scores = [math.exp(-((2.3 - c) ** 2)) for c in range(6)]
    for c in range(6):
        assert got[0, c].item() == pytest.approx(scores[c] / sum(scores), rel=1e-5)
