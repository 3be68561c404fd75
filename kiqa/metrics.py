"""The field's quality metrics: PLCC, SRCC, KRCC, RMSE, MAE, and PLCC after a logistic mapping.

Plain numpy in, Python floats out; no TensorFlow import, so evaluation reports,
benchmarks and notebooks can use this module without loading TF.

Conventions of the IQA literature (KonIQ-10k, KonCept512, MUSIQ, ...):

- SRCC (Spearman) and KRCC (Kendall tau-b) rank ties by their average rank.
- `plcc_logistic4` is the PLCC after fitting VQEG's 4-parameter logistic
  from predictions to targets on the same data (it removes a monotone
  nonlinearity between the model's scale and the MOS scale); it is reported
  beside the plain `plcc`, labelled as such, never instead of it.
- Repeated random splits are reported as median and spread (`summarize_repeats`).

Constant predictions (a model collapsed to the mean) or constant targets make
correlations undefined: they come back NaN with a `ConstantInputWarning`, never
as an exception, so an evaluation report is still written.
"""

import dataclasses
import math
import warnings
from typing import Optional, Tuple

import numpy as np
from scipy import optimize, special, stats

CORRELATIONS = ("plcc", "srcc", "krcc", "plcc_logistic4")
METRIC_KEYS = ("plcc", "srcc", "krcc", "rmse", "mae", "plcc_logistic4", "n")
MIN_SAMPLES = 3


class ConstantInputWarning(RuntimeWarning):
    """Predictions or targets are all equal, so correlations are undefined (NaN)."""


class LogisticFitWarning(RuntimeWarning):
    """The 4-parameter logistic did not converge; the identity mapping was used instead."""


def _as_vector(values, name):
    array = np.asarray(values, dtype=np.float64)
    # [n, 1] is what a Keras model with a [batch, 1] output returns; accept it.
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of scores, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} NaN or infinite value(s) (first at index {bad[0]}: "
            f"{array[bad[0]]}); drop or fix those images before computing metrics"
        )
    return array


def _validate(y_true, y_pred):
    """Returns (y_true, y_pred) as float64 vectors; raises ValueError naming the problem."""
    y_true = _as_vector(y_true, "y_true")
    y_pred = _as_vector(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true has {y_true.size} values but y_pred has {y_pred.size}; "
            f"pass one prediction per target"
        )
    if y_true.size < MIN_SAMPLES:
        raise ValueError(
            f"metrics need at least {MIN_SAMPLES} scores, got {y_true.size}; "
            f"correlations of fewer are meaningless"
        )
    return y_true, y_pred


def _constant_reason(y_true, y_pred):
    """Returns why correlations are undefined, or None if they are defined."""
    if np.ptp(y_pred) == 0:
        return (
            f"the predictions are constant (all {y_pred.size} equal {y_pred[0]:.6g}; "
            f"model collapsed to the mean?)"
        )
    if np.ptp(y_true) == 0:
        return f"the targets are constant (all {y_true.size} equal {y_true[0]:.6g})"
    return None


def _warn_constant(reason, what, stacklevel=4):
    # stacklevel points the warning at the caller of the public function.
    warnings.warn(f"{what} undefined, returning NaN: {reason}", ConstantInputWarning, stacklevel=stacklevel)


def _correlation(y_true, y_pred, name, compute):
    y_true, y_pred = _validate(y_true, y_pred)
    reason = _constant_reason(y_true, y_pred)
    if reason:
        _warn_constant(reason, name)
        return math.nan
    return compute(y_true, y_pred)


def _plcc(y_true, y_pred):
    return float(stats.pearsonr(y_true, y_pred).statistic)


def _srcc(y_true, y_pred):
    return float(stats.spearmanr(y_true, y_pred).statistic)


def _krcc(y_true, y_pred):
    # tau-b: the tie-corrected Kendall tau the IQA literature reports.
    return float(stats.kendalltau(y_true, y_pred, variant="b").statistic)


def plcc(y_true, y_pred):
    """Pearson linear correlation coefficient.

    Args:
        y_true: target scores (e.g. MOS, 0-100), at least 3.
        y_pred: predicted scores, one per target.

    Returns:
        PLCC as a float; NaN (with a `ConstantInputWarning`) if either side is constant.

    Raises:
        ValueError: fewer than 3 scores, mismatched lengths, or NaN/inf values.
    """
    return _correlation(y_true, y_pred, "PLCC", _plcc)


def srcc(y_true, y_pred):
    """Spearman rank correlation coefficient; ties get their average rank.

    Args:
        y_true: target scores, at least 3.
        y_pred: predicted scores, one per target.

    Returns:
        SRCC as a float; NaN (with a `ConstantInputWarning`) if either side is constant.

    Raises:
        ValueError: fewer than 3 scores, mismatched lengths, or NaN/inf values.
    """
    return _correlation(y_true, y_pred, "SRCC", _srcc)


def krcc(y_true, y_pred):
    """Kendall rank correlation coefficient (tau-b, tie-corrected).

    Args:
        y_true: target scores, at least 3.
        y_pred: predicted scores, one per target.

    Returns:
        KRCC as a float; NaN (with a `ConstantInputWarning`) if either side is constant.

    Raises:
        ValueError: fewer than 3 scores, mismatched lengths, or NaN/inf values.
    """
    return _correlation(y_true, y_pred, "KRCC", _krcc)


def rmse(y_true, y_pred):
    """Root mean squared error, on the scale of the inputs (0-100 MOS points for kiqa).

    Raises:
        ValueError: fewer than 3 scores, mismatched lengths, or NaN/inf values.
    """
    y_true, y_pred = _validate(y_true, y_pred)
    return float(np.sqrt(np.mean(np.square(y_true - y_pred))))


def mae(y_true, y_pred):
    """Mean absolute error, on the scale of the inputs (0-100 MOS points for kiqa).

    Raises:
        ValueError: fewer than 3 scores, mismatched lengths, or NaN/inf values.
    """
    y_true, y_pred = _validate(y_true, y_pred)
    return float(np.mean(np.abs(y_true - y_pred)))


def logistic_4p(x, b1, b2, b3, b4):
    """VQEG's 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2.

    b1 and b2 are the upper and lower asymptotes, b3 the midpoint, |b4| the
    width. Computed with `scipy.special.expit`, so large |x - b3| / |b4| does
    not overflow.
    """
    width = max(abs(b4), np.finfo(np.float64).tiny)
    return (b1 - b2) * special.expit((np.asarray(x, dtype=np.float64) - b3) / width) + b2


@dataclasses.dataclass(frozen=True)
class LogisticMapping:
    """A fitted monotone mapping from predictions to the target scale.

    Attributes:
        params: (b1, b2, b3, b4) of `logistic_4p`, or None when the fit failed
            and the mapping is the identity.
    """

    params: Optional[Tuple[float, float, float, float]]

    @property
    def fitted(self):
        """True if the logistic converged; False for the identity fallback."""
        return self.params is not None

    def __call__(self, y_pred):
        """Maps predictions to the target scale."""
        if self.params is None:
            return np.asarray(y_pred, dtype=np.float64)
        return logistic_4p(y_pred, *self.params)


def logistic_4p_fit(y_pred, y_true):
    """Fits VQEG's 4-parameter logistic from predictions to targets.

    Starts from b1 = max(y_true), b2 = min(y_true), b3 = mean(y_pred),
    b4 = std(y_pred) / 4, the usual initial values for MOS data, and fits with
    `scipy.optimize.curve_fit` (Levenberg-Marquardt).

    Args:
        y_pred: predicted scores (the x of the mapping), at least 3.
        y_true: target scores (the y of the mapping), one per prediction.

    Returns:
        A `LogisticMapping`. If the fit does not converge (or the predictions
        are constant), it is the identity mapping and a `LogisticFitWarning`
        says why.

    Raises:
        ValueError: fewer than 3 scores, mismatched lengths, or NaN/inf values.
    """
    y_true, y_pred = _validate(y_true, y_pred)
    if np.ptp(y_pred) == 0:
        return _identity_fallback("the predictions are constant")
    if len(y_pred) <= 4:
        # Four parameters through four or fewer points is no fit at all (curve_fit
        # raises TypeError for fewer points than parameters).
        return _identity_fallback(f"{len(y_pred)} scores are too few for 4 parameters")
    spread = float(np.std(y_pred)) / 4.0
    initial = [float(np.max(y_true)), float(np.min(y_true)), float(np.mean(y_pred)), spread]
    try:
        with warnings.catch_warnings():
            # OptimizeWarning (covariance not estimable) does not make the fit wrong;
            # only the parameters are used.
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(logistic_4p, y_pred, y_true, p0=initial, maxfev=20000)
    except (RuntimeError, ValueError, FloatingPointError) as err:
        return _identity_fallback(f"curve_fit failed: {err}")
    if not np.all(np.isfinite(params)) or not np.all(np.isfinite(logistic_4p(y_pred, *params))):
        return _identity_fallback(f"curve_fit returned non-finite parameters {params.tolist()}")
    return LogisticMapping(tuple(float(p) for p in params))


def _identity_fallback(reason):
    warnings.warn(
        f"4-parameter logistic fit did not converge ({reason}); using the identity mapping, "
        f"so plcc_logistic4 equals plcc",
        LogisticFitWarning,
        stacklevel=3,
    )
    return LogisticMapping(None)


def _plcc_logistic(y_true, y_pred):
    mapped = logistic_4p_fit(y_pred, y_true)(y_pred)
    if np.ptp(mapped) == 0:
        _warn_constant("the logistic mapped every prediction to one value", "PLCC after logistic")
        return math.nan
    return _plcc(y_true, mapped)


def plcc_logistic(y_true, y_pred):
    """PLCC after mapping predictions through the fitted 4-parameter logistic.

    The logistic is fitted on the same pairs it is evaluated on, as in VQEG
    and the IQA literature; report it labelled as "PLCC (4-parameter
    logistic)" beside the plain PLCC.

    Args:
        y_true: target scores, at least 3.
        y_pred: predicted scores, one per target.

    Returns:
        The PLCC as a float; NaN (with a `ConstantInputWarning`) if either side
        is constant.

    Raises:
        ValueError: fewer than 3 scores, mismatched lengths, or NaN/inf values.
    """
    return _correlation(y_true, y_pred, "PLCC after logistic", _plcc_logistic)


def evaluate_scores(y_true, y_pred):
    """Computes every kiqa metric for one set of predictions.

    Args:
        y_true: target MOS (0-100), at least 3.
        y_pred: predicted MOS, one per target.

    Returns:
        A dict with float values for "plcc", "srcc", "krcc", "rmse", "mae",
        "plcc_logistic4" and the int "n" (number of images). If predictions or
        targets are constant, the four correlations are NaN and one
        `ConstantInputWarning` is issued; RMSE and MAE are still computed.

    Raises:
        ValueError: fewer than 3 scores, mismatched lengths, or NaN/inf values.
    """
    y_true, y_pred = _validate(y_true, y_pred)
    reason = _constant_reason(y_true, y_pred)
    if reason:
        _warn_constant(reason, "PLCC, SRCC, KRCC", stacklevel=3)
        correlations = dict.fromkeys(("plcc", "srcc", "krcc", "plcc_logistic4"), math.nan)
    else:
        correlations = dict(
            plcc=_plcc(y_true, y_pred),
            srcc=_srcc(y_true, y_pred),
            krcc=_krcc(y_true, y_pred),
            plcc_logistic4=_plcc_logistic(y_true, y_pred),
        )
    return dict(
        plcc=correlations["plcc"],
        srcc=correlations["srcc"],
        krcc=correlations["krcc"],
        rmse=float(np.sqrt(np.mean(np.square(y_true - y_pred)))),
        mae=float(np.mean(np.abs(y_true - y_pred))),
        plcc_logistic4=correlations["plcc_logistic4"],
        n=int(y_true.size),
    )


def summarize_repeats(results):
    """Summarises metrics over repeated random splits (the literature's 80/20 x N protocol).

    A NaN in any repeat (e.g. a collapsed model) propagates into that metric's
    summary instead of being skipped, so a broken repeat is not hidden.

    Args:
        results: a list of metric dicts, one per repeat (e.g. from
            `evaluate_scores`), all with the same numeric keys.

    Returns:
        `{metric: {"median", "mean", "std", "min", "max"}}` for every numeric
        key, in the order of the first dict. "std" is the sample standard
        deviation (ddof=1); NaN for a single repeat.

    Raises:
        ValueError: no results, or the dicts do not share the same keys.
    """
    results = list(results)
    if not results:
        raise ValueError("summarize_repeats needs at least one metrics dict, got none")
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float, np.number))]
    for index, result in enumerate(results):
        missing = [k for k in keys if k not in result]
        if missing:
            raise ValueError(
                f"repeat {index} has no {missing} (repeat 0 has {keys}); every repeat must "
                f"report the same metrics"
            )
    summary = {}
    for key in keys:
        values = np.array([float(result[key]) for result in results], dtype=np.float64)
        summary[key] = dict(
            median=float(np.median(values)),
            mean=float(np.mean(values)),
            std=float(np.std(values, ddof=1)) if values.size > 1 else math.nan,
            min=float(np.min(values)),
            max=float(np.max(values)),
        )
    return summary


# ----------------------------------------------------------------------------- confidence

# Below this many images a correlation's sampling spread is too wide to rank models
# (at n = 10 a true SRCC of 0.5 gives 95% intervals from about -0.2 to 0.9), and four
# logistic parameters fitted on the same few points bend to them.
MIN_RELIABLE_N = 30
# A 95% interval wider than this (on the -1..1 correlation scale) says little.
MAX_CI_WIDTH = 0.3
DEFAULT_CI_RESAMPLES = 2000
# Above this many images the BCa interval's jackknife (n statistics of n - 1 images)
# costs more than the interval gains (2.5 s at KonIQ's 2015 test images, O(n^2)); the
# percentile interval is used instead.
BCA_MAX_N = 2500
_CI_BATCH = 200  # resamples computed at once (bounds memory at n = 10,073 to ~16 MB per array)


def _pearson_along(x, y, axis=-1):
    """Pearson r along `axis`, NaN where a resample is constant (vectorised bootstrap statistic)."""
    x = x - np.mean(x, axis=axis, keepdims=True)
    y = y - np.mean(y, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(x * y, axis=axis) / np.sqrt(np.sum(x * x, axis=axis) * np.sum(y * y, axis=axis))


def _spearman_along(x, y, axis=-1):
    return _pearson_along(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis=axis)


_CI_STATISTICS = {"plcc": _pearson_along, "srcc": _spearman_along}


def correlation_ci(y_true, y_pred, metric="srcc", confidence=0.95, n_resamples=DEFAULT_CI_RESAMPLES, seed=0):
    """Bootstrap confidence interval of PLCC or SRCC, resampling images (pairs), seeded.

    `scipy.stats.bootstrap` with `paired=True`: each resample draws n images with
    replacement and keeps every image's (target, prediction) pair together. BCa up to
    `BCA_MAX_N` images, percentile above (see `ci_method`). Resamples that happen to be
    constant give NaN and are left out of the interval.

    Args:
        y_true: target scores, at least 3.
        y_pred: predicted scores, one per target.
        metric: "plcc" or "srcc".
        confidence: interval level, e.g. 0.95.
        n_resamples: bootstrap resamples.
        seed: seeds numpy's generator: the same seed gives the same interval.

    Returns:
        (low, high) floats; (nan, nan) if the correlation itself is undefined.

    Raises:
        ValueError: unknown metric, fewer than 3 scores, mismatched lengths, NaN/inf.
    """
    if metric not in _CI_STATISTICS:
        raise ValueError(f"correlation_ci computes {sorted(_CI_STATISTICS)}, not {metric!r}")
    y_true, y_pred = _validate(y_true, y_pred)
    if _constant_reason(y_true, y_pred):
        return math.nan, math.nan
    statistic = _CI_STATISTICS[metric]
    with warnings.catch_warnings():
        # DegenerateDataWarning (a constant resample) is expected on few images; those
        # resamples are NaN and dropped below.
        warnings.simplefilter("ignore")
        result = stats.bootstrap(
            (y_true, y_pred), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
            batch=_CI_BATCH, confidence_level=confidence, method=ci_method(y_true.size),
            random_state=np.random.default_rng(seed),
        )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        # BCa and scipy's percentile both give NaN once any resample is NaN: take the
        # percentile interval over the defined resamples.
        values = result.bootstrap_distribution[np.isfinite(result.bootstrap_distribution)]
        alpha = (1.0 - confidence) / 2.0
        low, high = (float(q) for q in np.quantile(values, [alpha, 1.0 - alpha]))
    return low, high


def ci_method(n):
    """The bootstrap interval used for n images: "BCa" or "percentile"."""
    return "BCa" if n <= BCA_MAX_N else "percentile"


def describe_ci(n, confidence=0.95, n_resamples=DEFAULT_CI_RESAMPLES, seed=0):
    """How the intervals were computed, in words for reports."""
    return (f"{confidence:.0%} CI: bootstrap over images ({n_resamples} paired resamples, seed {seed}, "
            f"{ci_method(n)} interval)")


def logistic_caution(y_true, y_pred):
    """Why `plcc_logistic4` should not be read for these scores, or None if it can be.

    Unreliable when fitted on fewer than `MIN_RELIABLE_N` images, when the fit fell
    back to the identity, or when the fitted curve decreases (b1 < b2): then it maps
    a negative correlation to a positive one, and the "PLCC after logistic" reports a
    model that ranks images backwards as a good one.
    """
    y_true, y_pred = _validate(y_true, y_pred)
    n = y_true.size
    if n < MIN_RELIABLE_N:
        return f"fitted on only {n} images (four parameters need at least {MIN_RELIABLE_N} to mean anything)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LogisticFitWarning)
        mapping = logistic_4p_fit(y_pred, y_true)
    if not mapping.fitted:
        return "the logistic fit did not converge (it equals the plain PLCC)"
    b1, b2 = mapping.params[:2]
    if b1 < b2:
        return ("the fitted curve decreases (higher predictions mapped to lower MOS), which turns "
                "a negative correlation positive")
    return None


def evaluate_with_confidence(y_true, y_pred, confidence=0.95, n_resamples=DEFAULT_CI_RESAMPLES, seed=0):
    """`evaluate_scores` plus bootstrap intervals for PLCC and SRCC and the logistic's reliability.

    The report every kiqa evaluation uses (training's test set, `kiqa evaluate`, the
    notebooks). The dict stays flat (numbers and strings), so it can be compared and
    written as one CSV row.

    Args:
        y_true: target MOS (0-100), at least 3.
        y_pred: predicted MOS, one per target.
        confidence: interval level.
        n_resamples: bootstrap resamples.
        seed: bootstrap seed (same seed, same intervals).

    Returns:
        `evaluate_scores`' dict plus "plcc_ci_low", "plcc_ci_high", "srcc_ci_low",
        "srcc_ci_high", "ci" (how they were computed, in words) and
        "plcc_logistic4_caution" (a reason string, or None when it can be read).
    """
    result = evaluate_scores(y_true, y_pred)
    for metric in ("plcc", "srcc"):
        low, high = correlation_ci(y_true, y_pred, metric, confidence, n_resamples, seed)
        result[f"{metric}_ci_low"], result[f"{metric}_ci_high"] = low, high
    result["ci"] = describe_ci(result["n"], confidence, n_resamples, seed)
    result["plcc_logistic4_caution"] = (
        None if math.isnan(result["plcc_logistic4"]) else logistic_caution(y_true, y_pred)
    )
    return result


def cautions(result):
    """Plain warnings about how far a report's numbers can be trusted.

    Args:
        result: a dict from `evaluate_with_confidence` (or a metrics.json holding one).

    Returns:
        list of sentences; empty when n is large enough and the intervals are narrow.
    """
    found = []
    n = result.get("n")
    if n is not None and n < MIN_RELIABLE_N:
        found.append(
            f"only {n} images: correlations from fewer than {MIN_RELIABLE_N} vary widely from one "
            f"sample to the next (see the intervals); do not read them as the model's accuracy"
        )
    for metric in ("plcc", "srcc"):
        low, high = result.get(f"{metric}_ci_low"), result.get(f"{metric}_ci_high")
        if low is not None and high is not None and high - low > MAX_CI_WIDTH:
            found.append(
                f"the {metric.upper()} interval [{low:.2f}, {high:.2f}] is wider than {MAX_CI_WIDTH}: "
                f"more images are needed to pin it down"
            )
    if result.get("plcc_logistic4_caution"):
        found.append(f"PLCC after the 4-parameter logistic is unreliable: {result['plcc_logistic4_caution']}")
    return found


def format_report(result, indent=""):
    """The metrics as printed by `kiqa evaluate` and `kiqa-train`: one metric a line, with intervals."""

    def interval(metric):
        low, high = result.get(f"{metric}_ci_low"), result.get(f"{metric}_ci_high")
        if low is None or high is None or math.isnan(low):
            return ""
        return f"  95% CI [{low:.4f}, {high:.4f}]"

    logistic = f"{result['plcc_logistic4']:.4f}"
    if result.get("plcc_logistic4_caution"):
        logistic += "  (unreliable, see below)"
    lines = [
        f"PLCC  {result['plcc']:.4f}{interval('plcc')}",
        f"SRCC  {result['srcc']:.4f}{interval('srcc')}",
        f"KRCC  {result['krcc']:.4f}",
        f"RMSE  {result['rmse']:.2f}  MAE {result['mae']:.2f}  (MOS points on 0-100)",
        f"PLCC after 4-parameter logistic  {logistic}",
    ]
    if result.get("ci"):
        lines.append(result["ci"])
    lines += [f"caution: {text}" for text in cautions(result)]
    return "\n".join(indent + line for line in lines)
