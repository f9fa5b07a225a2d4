"""The calibration module around Eq. 13 (SPEC 5), against formulas written out by hand: the
projector, the defaults SPEC 5 names, one and two modalities, and the agreement it reports.
Found by mutation testing (docs/mutation-testing.md)."""

import math

import pytest
import torch

from macsc.method.calibration import SelfBalancingCalibration
from tests.method.test_calibration_reference import reference_msb


def test_projection_is_a_normalised_linear_map_per_modality_in_the_inputs_precision():
    torch.manual_seed(0)
    calibration = SelfBalancingCalibration(["text", "image"], hidden_size=5, proj_dim=3)
    pooled = torch.randn(2, 4, 5, dtype=torch.float64)
    got = calibration.project(pooled)
    assert got.dtype == torch.float64
    for m in range(2):
        w, b = calibration.proj_weight[m].double(), calibration.proj_bias[m].double()
        for i in range(4):
            row = pooled[m, i] @ w.T + b
            torch.testing.assert_close(got[m, i], row / row.norm(), rtol=1e-12, atol=0)


def test_projector_starts_like_a_linear_layer():
    torch.manual_seed(0)
    calibration = SelfBalancingCalibration(["text", "image", "audio"], hidden_size=64)
    bound = 1 / math.sqrt(64)
    for values in (calibration.proj_weight, calibration.proj_bias):
        assert values.abs().max() <= bound
        assert values.max() > 0.9 * bound and values.min() < -0.9 * bound


def test_the_defaults_are_spec_5s():
    torch.manual_seed(3)
    calibration = SelfBalancingCalibration(["text", "image", "audio"], hidden_size=6).double()
    with torch.no_grad():
        calibration.z.copy_(torch.randn(3, 3))
    features = calibration.project(torch.randn(3, 5, 6, dtype=torch.double))
    assert features.shape[-1] == 128
    distributions = torch.softmax(torch.randn(3, 5, 4, dtype=torch.double), -1)
    labels = torch.tensor([0, 1, 0, 1, 1])
    positive = labels[:, None] == labels[None]
    want = reference_msb(
        features.tolist(),
        distributions.tolist(),
        positive.tolist(),
        0.1,
        "balanced",
        calibration.z.tolist(),
        "mean",
    )
    assert calibration(features, distributions, positive).loss.item() == pytest.approx(want, 1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weight_normalization": "rows"}, "weight_normalization must be one of .*'rows'"),
        ({"reduction": "max"}, "reduction must be one of .*'max'"),
        ({"tau": 0.0}, "tau must be > 0, got 0.0"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        SelfBalancingCalibration(["text", "image"], hidden_size=4, **options)


def test_two_modalities_compute_the_reference_msb():
    torch.manual_seed(4)
    calibration = SelfBalancingCalibration(["text", "image"], 6, proj_dim=4, tau=0.2).double()
    features = calibration.project(torch.randn(2, 5, 6, dtype=torch.double))
    distributions = torch.softmax(torch.randn(2, 5, 3, dtype=torch.double), -1)
    labels = torch.tensor([2, 0, 2, 1, 0])
    positive = labels[:, None] == labels[None]
    out = calibration(features, distributions, positive)
    want = reference_msb(
        features.tolist(),
        distributions.tolist(),
        positive.tolist(),
        0.2,
        "balanced",
        [[0.0, 0.0]] * 2,
    )
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.pi_z.tolist() == [[0, 1], [1, 0]]


def test_one_modality_has_a_zero_loss_that_still_backpropagates():
    calibration = SelfBalancingCalibration(["text"], hidden_size=4, proj_dim=3)
    features = calibration.project(torch.randn(1, 5, 4))
    out = calibration(features, torch.rand(1, 5, 2), torch.eye(5, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert calibration.proj_weight.grad is not None and not calibration.proj_weight.grad.any()
    assert out.pair_losses.shape == (0,) and out.agreement.shape == (0,)
    assert out.pi_z.tolist() == [[0.0]]


def test_agreement_is_the_mean_similarity_over_positive_pairs():
    torch.manual_seed(5)
    modalities = ["text", "image", "audio"]
    calibration = SelfBalancingCalibration(modalities, 4, proj_dim=3)
    with torch.no_grad():
        calibration.z.copy_(torch.randn(3, 3))
    distributions = torch.softmax(torch.randn(3, 4, 3), -1)
    labels = torch.tensor([0, 1, 0, 0])
    positive = labels[:, None] == labels[None]
    out = calibration(calibration.project(torch.randn(3, 4, 4)), distributions, positive)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )

    p = distributions.tolist()
    pairs = [(m, k) for m in range(3) for k in range(3) if m != k]
    positives = [(i, j) for i in range(4) for j in range(4) if labels[i] == labels[j]]
    want = [sum(cos(p[m][i], p[k][j]) for i, j in positives) / len(positives) for m, k in pairs]
    torch.testing.assert_close(out.agreement, torch.tensor(want))
    z = calibration.z.detach()
    for m in range(3):
        others = [k for k in range(3) if k != m]
        total = sum(math.exp(z[m, k]) for k in others)
        for k in others:
            assert out.pi_z[m, k].item() == pytest.approx(math.exp(z[m, k]) / total, rel=1e-6)


def test_pair_index_buffers_stay_out_of_the_state_dict():
    # the checkpoint holds only proj_weight, proj_bias and z (the pair indices follow from the
    # modality list), so old checkpoints load strictly
    calibration = SelfBalancingCalibration(["text", "image", "audio"], hidden_size=4)
    assert sorted(calibration.state_dict()) == ["proj_bias", "proj_weight", "z"]


def test_projection_computes_in_the_input_dtype():
    calibration = SelfBalancingCalibration(["text", "image"], hidden_size=8, proj_dim=4)
    pooled = torch.randn(2, 3, 8)
    projected = calibration.project(pooled.bfloat16())
    assert projected.dtype == torch.bfloat16
    assert torch.allclose(projected.float(), calibration.project(pooled), atol=3e-2)


def test_agreement_is_the_mean_cosine_over_the_positive_pairs_of_a_single_example():
    # one example (an identity mask with one positive): agreement is that pair's cosine
    calibration = SelfBalancingCalibration(["text", "image"], hidden_size=4, proj_dim=3)
    features = calibration.project(torch.randn(2, 1, 4))
    distributions = torch.tensor([[[0.6, 0.8]], [[1.0, 0.0]]])  # unit vectors: cosine 0.6
    out = calibration(features, distributions, torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(out.agreement, torch.tensor([0.6, 0.6]))
