"""Tests for kiqa.metrics: hand-checked vectors, ties, constant inputs, the logistic fit."""

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from kiqa import metrics
from kiqa.metrics import ConstantInputWarning, LogisticFitWarning

# Hand-checked example, n = 5:
#   y = [1, 2, 3, 4, 5], p = [2, 1, 4, 3, 5]
#   ranks equal the values; d = y - p = [-1, 1, -1, 1, 0], sum(d^2) = 4
#   SRCC = 1 - 6 * 4 / (5 * (25 - 1)) = 1 - 24 / 120 = 0.8
#   PLCC: deviations from the mean 3 are y' = [-2, -1, 0, 1, 2], p' = [-1, -2, 1, 0, 2];
#         sum(y'p') = 2 + 2 + 0 + 0 + 4 = 8, sum(y'^2) = sum(p'^2) = 10 -> 8 / 10 = 0.8
#   KRCC: 10 pairs, discordant (1,2) and (3,4) -> C = 8, D = 2 -> (8 - 2) / 10 = 0.6
#   RMSE = sqrt((1 + 1 + 1 + 1 + 0) / 5) = sqrt(0.8); MAE = 4 / 5 = 0.8
Y = [1.0, 2.0, 3.0, 4.0, 5.0]
P = [2.0, 1.0, 4.0, 3.0, 5.0]


def test_hand_checked_vector():
    assert metrics.srcc(Y, P) == pytest.approx(0.8)
    assert metrics.plcc(Y, P) == pytest.approx(0.8)
    assert metrics.krcc(Y, P) == pytest.approx(0.6)
    assert metrics.rmse(Y, P) == pytest.approx(math.sqrt(0.8))
    assert metrics.mae(Y, P) == pytest.approx(0.8)


def test_perfect_and_reversed_ranking():
    assert metrics.srcc(Y, Y[::-1]) == pytest.approx(-1.0)
    assert metrics.krcc(Y, Y[::-1]) == pytest.approx(-1.0)
    # A monotone but nonlinear prediction ranks perfectly but is not linear.
    squares = [v ** 2 for v in Y]
    assert metrics.srcc(Y, squares) == pytest.approx(1.0)
    assert metrics.plcc(Y, squares) < 0.99


def test_ties_use_average_ranks():
    # y = [1, 1, 2, 3] -> ranks [1.5, 1.5, 3, 4]; p = [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4]
    # rank deviations from 2.5: [-1, -1, 0.5, 1.5] and [-1.5, 0, 0, 1.5]
    # SRCC = (1.5 + 0 + 0 + 2.25) / sqrt(4.5 * 4.5) = 3.75 / 4.5 = 0.8333...
    # Kendall tau-b: 6 pairs, 4 concordant, 0 discordant, one tie in y, one tie in p
    #   -> 4 / sqrt((6 - 1) * (6 - 1)) = 0.8
    y = [1.0, 1.0, 2.0, 3.0]
    p = [1.0, 2.0, 2.0, 3.0]
    assert metrics.srcc(y, p) == pytest.approx(3.75 / 4.5)
    assert metrics.krcc(y, p) == pytest.approx(0.8)


def test_accepts_column_vectors_like_keras_outputs():
    column = np.array(P)[:, None]
    assert metrics.srcc(Y, column) == pytest.approx(0.8)


def test_evaluate_scores_keys_and_values():
    result = metrics.evaluate_scores(Y, P)
    assert set(result) == set(metrics.METRIC_KEYS)
    assert result["n"] == 5
    assert result["srcc"] == pytest.approx(0.8)
    assert result["krcc"] == pytest.approx(0.6)
    assert result["plcc"] == pytest.approx(0.8)
    assert result["rmse"] == pytest.approx(math.sqrt(0.8))
    assert result["mae"] == pytest.approx(0.8)
    # The logistic is at least as good a fit as the identity line it can approximate.
    assert result["plcc_logistic4"] >= result["plcc"] - 1e-6
    assert all(isinstance(result[k], float) for k in result if k != "n")


@pytest.mark.parametrize("constant_side", ["pred", "true"])
def test_constant_input_warns_and_returns_nan(constant_side):
    varied = [30.0, 50.0, 70.0, 60.0]
    constant = [58.7] * 4
    y_true, y_pred = (varied, constant) if constant_side == "pred" else (constant, varied)
    for function in (metrics.plcc, metrics.srcc, metrics.krcc, metrics.plcc_logistic):
        with pytest.warns(ConstantInputWarning, match="constant"):
            assert math.isnan(function(y_true, y_pred))
    with pytest.warns(ConstantInputWarning) as caught:
        result = metrics.evaluate_scores(y_true, y_pred)
    assert len(caught) == 1  # one warning per evaluation, not one per metric
    if constant_side == "pred":
        assert "collapsed to the mean" in str(caught[0].message)
    for key in metrics.CORRELATIONS:
        assert math.isnan(result[key])
    # Errors are still defined: |58.7 - each| averaged.
    assert result["mae"] == pytest.approx(np.mean(np.abs(np.array(varied) - 58.7)))


def test_constant_input_warning_is_a_runtime_warning():
    assert issubclass(ConstantInputWarning, RuntimeWarning)


@pytest.mark.parametrize(
    "y_true, y_pred, message",
    [
        ([1.0, 2.0], [1.0, 2.0], "at least 3"),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], "3 values but y_pred has 4"),
        ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], "y_true has 1 NaN or infinite"),
        ([1.0, 2.0, 3.0], [1.0, 2.0, float("inf")], "y_pred has 1 NaN or infinite"),
        (np.ones((3, 2)), np.ones((3, 2)), "1-D"),
    ],
)
def test_invalid_input_raises_value_error(y_true, y_pred, message):
    for function in (metrics.plcc, metrics.srcc, metrics.rmse, metrics.evaluate_scores):
        with pytest.raises(ValueError, match=message):
            function(y_true, y_pred)


def test_logistic_fit_recovers_a_sigmoid_nonlinearity():
    rng = np.random.default_rng(0)
    predictions = rng.uniform(0.0, 100.0, 300)
    # Targets through a known logistic: b1 = 90, b2 = 10, b3 = 50, b4 = 8, plus noise.
    targets = metrics.logistic_4p(predictions, 90.0, 10.0, 50.0, 8.0) + rng.normal(0.0, 1.0, 300)
    mapping = metrics.logistic_4p_fit(predictions, targets)
    assert mapping.fitted
    b1, b2, b3, b4 = mapping.params
    assert b1 == pytest.approx(90.0, abs=1.5)
    assert b2 == pytest.approx(10.0, abs=1.5)
    assert b3 == pytest.approx(50.0, abs=1.5)
    assert abs(b4) == pytest.approx(8.0, abs=1.0)
    plain = metrics.plcc(targets, predictions)
    mapped = metrics.plcc_logistic(targets, predictions)
    assert mapped > plain + 0.02
    assert mapped > 0.99
    # The mapping is monotone, so rank correlations are unchanged by it.
    assert metrics.srcc(targets, mapping(predictions)) == pytest.approx(metrics.srcc(targets, predictions))


def test_logistic_fit_falls_back_to_identity_with_a_warning(monkeypatch):
    def no_convergence(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found: maxfev reached")

    monkeypatch.setattr(metrics.optimize, "curve_fit", no_convergence)
    with pytest.warns(LogisticFitWarning, match="identity"):
        mapping = metrics.logistic_4p_fit(P, Y)
    assert not mapping.fitted
    np.testing.assert_array_equal(mapping(P), np.array(P))
    with pytest.warns(LogisticFitWarning):
        assert metrics.plcc_logistic(Y, P) == pytest.approx(metrics.plcc(Y, P))


def test_logistic_4p_does_not_overflow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exp overflow would raise here
        values = metrics.logistic_4p(np.array([-1e6, 0.0, 1e6]), 90.0, 10.0, 0.0, 1e-3)
    np.testing.assert_allclose(values, [10.0, 50.0, 90.0])


def test_summarize_repeats():
    repeats = [
        dict(srcc=0.90, plcc=0.91, n=2015),
        dict(srcc=0.80, plcc=0.85, n=2015),
        dict(srcc=0.86, plcc=0.88, n=2015),
    ]
    summary = metrics.summarize_repeats(repeats)
    assert list(summary) == ["srcc", "plcc", "n"]
    srcc = summary["srcc"]
    assert srcc["median"] == pytest.approx(0.86)
    assert srcc["mean"] == pytest.approx((0.90 + 0.80 + 0.86) / 3)
    # Sample std (ddof=1): deviations from 0.85333 are 0.04667, -0.05333, 0.00667
    assert srcc["std"] == pytest.approx(math.sqrt((0.04667**2 + 0.05333**2 + 0.00667**2) / 2), abs=1e-4)
    assert (srcc["min"], srcc["max"]) == (pytest.approx(0.80), pytest.approx(0.90))
    assert summary["n"]["std"] == 0.0


def test_summarize_repeats_keeps_a_collapsed_repeat_visible():
    summary = metrics.summarize_repeats([dict(srcc=0.9), dict(srcc=math.nan)])
    assert math.isnan(summary["srcc"]["median"])


def test_summarize_repeats_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        metrics.summarize_repeats([])
    with pytest.raises(ValueError, match=r"repeat 1 has no \['plcc'\]"):
        metrics.summarize_repeats([dict(srcc=0.9, plcc=0.9), dict(srcc=0.8)])


def test_importing_metrics_does_not_load_tensorflow():
    code = "import sys, kiqa.metrics; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_logistic_fit_with_too_few_points_falls_back_to_identity():
    with pytest.warns(metrics.LogisticFitWarning, match="too few"):
        mapping = metrics.logistic_4p_fit([1.0, 2.0, 3.0], [10.0, 30.0, 20.0])
    assert mapping.params is None and list(mapping(np.array([1.0, 2.0]))) == [1.0, 2.0]
    scores = metrics.evaluate_scores([10.0, 30.0, 20.0, 40.0], [1.0, 2.0, 3.0, 4.0])
    assert scores["plcc_logistic4"] == pytest.approx(scores["plcc"])


# ----------------------------------------------------------------------------- confidence


def _scores(n, slope, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.uniform(0, 100, n)
    return y, slope * y + rng.normal(0, 20, n)


def test_bootstrap_intervals_are_seeded_and_hold_the_estimate():
    y, p = _scores(60, 1.0)
    first = metrics.evaluate_with_confidence(y, p, seed=3)
    assert first == metrics.evaluate_with_confidence(y, p, seed=3)  # same seed, same interval
    other = metrics.evaluate_with_confidence(y, p, seed=4)
    assert (other["srcc_ci_low"], other["srcc_ci_high"]) != (first["srcc_ci_low"], first["srcc_ci_high"])
    for metric in ("plcc", "srcc"):
        assert first[f"{metric}_ci_low"] < first[metric] < first[f"{metric}_ci_high"] <= 1.0
    assert "bootstrap over images" in first["ci"] and "seed 3" in first["ci"] and "BCa" in first["ci"]
    assert metrics.ci_method(10_073) == "percentile"


def test_interval_narrows_with_more_images_and_large_clean_sets_get_no_caution():
    small = metrics.evaluate_with_confidence(*_scores(12, 1.0))
    large = metrics.evaluate_with_confidence(*_scores(400, 1.0))
    width = lambda r: r["srcc_ci_high"] - r["srcc_ci_low"]  # noqa: E731
    assert width(large) < width(small) / 2
    assert metrics.cautions(large) == []
    assert large["plcc_logistic4_caution"] is None


def test_ten_images_get_cautions_and_the_logistic_is_flagged():
    # Today's failure: 10 images, raw PLCC negative, "PLCC after logistic" positive, no caution.
    y, p = _scores(10, -0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LogisticFitWarning)
        result = metrics.evaluate_with_confidence(y, p)
    assert result["plcc"] < 0
    found = metrics.cautions(result)
    assert any("only 10 images" in c for c in found)
    assert any("wider than" in c for c in found)
    assert any("4-parameter logistic is unreliable" in c for c in found)
    report = metrics.format_report(result)
    assert "(unreliable, see below)" in report and "95% CI [" in report and "caution: only 10 images" in report


def test_a_decreasing_logistic_fit_is_flagged_even_on_many_images():
    y, p = _scores(200, -1.0)
    assert "decreases" in metrics.logistic_caution(y, p)
    assert metrics.logistic_caution(*_scores(200, 1.0)) is None


def test_constant_predictions_give_nan_intervals():
    y = np.arange(10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low, high = metrics.correlation_ci(y, np.ones(10), "plcc")
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="correlation_ci computes"):
        metrics.correlation_ci(y, y, "krcc")
