"""Allocation and loss functions (Eq. 4-8, 11-13) at their edges, against formulas written out
by hand: the precision they compute in, the device they create tensors on (the meta device
stands in for an accelerator), bin widths other than one, one or two modalities, masks that are
not symmetric. Found by mutation testing (docs/mutation-testing.md)."""

import math

import pytest
import torch

from macsc.method.allocation import (
    balanced_weights,
    class_prior,
    coarse_weights,
    cosine_agreement,
    debiased_distribution,
    pairwise_agreement,
    soft_bin_distribution,
)
from macsc.method.losses import (
    fused_regression,
    mixture_log_likelihood,
    self_balancing_contrastive_loss,
    weighted_regression_loss,
)

EXACT = {"rtol": 1e-13, "atol": 0.0}  # float64 throughout; float32 anywhere would show


def test_debiasing_runs_in_the_logits_precision_with_alpha_one_by_default():
    logits = torch.tensor([[0.3, -1.1, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    prior = torch.tensor([0.2, 0.3, 0.5])  # float32, as the buffer is
    log_prior = prior.double().log()
    for alpha in (1.0, 0.5):
        want = torch.softmax(logits - alpha * log_prior, dim=-1)
        torch.testing.assert_close(debiased_distribution(logits, prior, alpha), want, **EXACT)
    default = torch.softmax(logits - log_prior, dim=-1)
    torch.testing.assert_close(debiased_distribution(logits, prior), default, **EXACT)


def test_soft_bins_use_the_bin_width_of_any_grid():
    values = torch.tensor([0.1, 0.52, 0.9], dtype=torch.float64)
    centres = torch.tensor([0.1, 0.35, 0.6, 0.85])  # width 0.25, not starting at 0
    sigma = 0.25
    want = []
    for v in values.tolist():
        scores = [-((v - c) ** 2) / sigma**2 for c in centres.double().tolist()]
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        want.append([e / sum(exps) for e in exps])
    got = soft_bin_distribution(values, centres)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, dtype=torch.float64))
    assert got.dtype == torch.float64
    # one bin: every value is wholly in it
    assert soft_bin_distribution(values, torch.tensor([2.0])).tolist() == [[1.0]] * 3


def test_cosine_agreement_by_hand_and_zero_vectors():
    p = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
    q = torch.tensor([[0.0, 3.0, 4.0], [1.0, 1.0, 1.0]])

    def cos(a, b):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb) if na and nb else 0.0

    want = [[cos(a, b) for b in q.tolist()] for a in p.tolist()]
    torch.testing.assert_close(cosine_agreement(p, q), torch.tensor(want))


def test_the_agreement_of_every_modality_pair_at_once_by_hand():
    """Entry ``[m, k, i, j]`` is ``cos(p_i^m, p_j^k)`` (torch's own cosine), zero vectors
    included; the calibration computes all ``M x M`` pairs in one product (issue 20)."""
    p = torch.rand(3, 4, 5, dtype=torch.float64)
    p[1, 2] = 0.0  # a sample whose distribution is all zero (spans without an answer)
    got = pairwise_agreement(p)
    assert got.shape == (3, 3, 4, 4)
    for m in range(3):
        for k in range(3):
            want = torch.nn.functional.cosine_similarity(p[m, :, None], p[k, None], dim=-1)
            want[torch.isnan(want)] = 0.0
            torch.testing.assert_close(got[m, k], want, rtol=1e-12, atol=1e-12)


def test_balanced_weights_count_the_anchor_rows_that_have_a_positive():
    p = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    q = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.3, 0.7]])
    # not symmetric: anchors 0 and 1 have a positive, anchor 2 none (column 2 has two)
    mask = torch.tensor([[False, False, True], [True, False, True], [False, False, False]])
    w = cosine_agreement(p, q)
    eq5 = w / w.sum(-1, keepdim=True)
    masked = eq5 * mask
    torch.testing.assert_close(balanced_weights(p, q, mask), masked * 2 / masked.sum())


def test_coarse_weights_of_two_modalities_and_on_the_tensors_device():
    assert coarse_weights(torch.tensor([[5.0, -3.0], [0.0, 9.0]])).tolist() == [[0, 1], [1, 0]]
    z = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.0, -0.5], [1.0, 1.0, 0.0]])
    e = math.exp
    want = [
        [0, e(1) / (e(1) + e(2)), e(2) / (e(1) + e(2))],
        [e(0.5) / (e(0.5) + e(-0.5)), 0, e(-0.5) / (e(0.5) + e(-0.5))],
        [0.5, 0.5, 0],
    ]
    torch.testing.assert_close(coarse_weights(z), torch.tensor(want))
    assert coarse_weights(torch.zeros(3, 3, device="meta")).device.type == "meta"


def test_class_prior_of_one_class_and_its_errors():
    assert class_prior(torch.zeros(4, dtype=torch.long), 1).tolist() == [1.0]
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        class_prior(torch.zeros(1, dtype=torch.long), 0)


def test_contrastive_loss_in_the_features_precision_and_its_reduction_error():
    torch.manual_seed(0)
    m = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64), dim=-1)
    weights = torch.rand(4, 4)  # float32
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 1], [0, 0, 1, 1]]).bool()
    log_p = torch.log_softmax(m @ k.T / 0.1, dim=-1)
    want = -(mask * weights.double() * log_p).sum(-1)
    got = self_balancing_contrastive_loss(m, k, weights, mask, 0.1, "sum")
    torch.testing.assert_close(got, want.sum(), **EXACT)
    with pytest.raises(ValueError, match="reduction must be one of .*'max'"):
        self_balancing_contrastive_loss(m, k, weights, mask, 0.1, "max")


def test_mixtures_run_in_the_branch_outputs_precision():
    logits = torch.tensor(
        [[[2.0, 0.1], [0.3, 0.4]], [[-1.0, 1.0], [0.0, 0.5]]], dtype=torch.float64
    )
    rho_logits = torch.tensor([0.3, -0.7])  # float32, as the parameter is
    rho = torch.softmax(rho_logits.double(), 0)
    probs = torch.softmax(logits, -1)
    targets = torch.tensor([0, 1])
    want = torch.log(rho[0] * probs[0, [0, 1], targets] + rho[1] * probs[1, [0, 1], targets])
    torch.testing.assert_close(mixture_log_likelihood(logits, rho_logits, targets), want, **EXACT)

    preds = torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=torch.float64)
    fused = rho[0] * preds[0] + rho[1] * preds[1]
    torch.testing.assert_close(fused_regression(preds, rho_logits), fused, **EXACT)
    loss = weighted_regression_loss(preds.float(), rho_logits, torch.tensor([1.5, 4.0]).double())
    assert loss.dtype == torch.float32  # the targets take the predictions' dtype
    assert loss.item() == pytest.approx(((fused - torch.tensor([1.5, 4.0])) ** 2).mean().item())


def test_balanced_weights_count_the_anchors_that_have_a_positive():
    # one anchor (row 0) with three positives: its row carries all the mass, and the mean row
    # mass over the anchors with a positive (one anchor) is one
    from macsc.method.allocation import balanced_weights

    p = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    mask = torch.tensor([[True, True, True], [False, False, False], [False, False, False]])
    weights = balanced_weights(p, p, mask)
    assert torch.allclose(weights.sum(), torch.tensor(1.0)) and weights[1:].abs().sum() == 0


def test_soft_bins_of_two_centres_use_their_distance_as_width():
    from macsc.method.allocation import soft_bin_distribution

    centres = torch.tensor([0.0, 2.0])
    got = soft_bin_distribution(torch.tensor([0.0]), centres)
    # softmax(-(0 - c)^2 / 2^2) = softmax([0, -1])
    expected = torch.tensor([1.0, math.exp(-1.0)]) / (1.0 + math.exp(-1.0))
    assert torch.allclose(got[0], expected)


def test_mixture_follows_the_branch_dtype():
    from macsc.method.losses import mixture_probabilities

    logits = torch.randn(2, 3, 4)
    rho_logits = torch.tensor([0.3, -0.2])  # a float32 parameter, as in the objective
    fused = mixture_probabilities(logits.bfloat16(), rho_logits)
    assert fused.dtype == torch.bfloat16
    assert torch.allclose(fused.float(), mixture_probabilities(logits, rho_logits), atol=2e-2)
