"""Rating distributions: the 1-5 to 0-100 map, the distribution head's loss and layer, and
how a predicted distribution is judged (EMD, JS divergence, spread, calibration).

KonIQ-10k publishes, per image, the share of votes on each of its five rating levels
(`c1..c5`, 1 = bad ... 5 = excellent). A distribution model (TrainConfig
`head="distribution"`) predicts those five shares `p1..p5`; its `mos` and `mos_sd` outputs are
derived from them inside the model by the rules below, so every consumer (Keras file,
SavedModel, ONNX, client) sees the same three outputs.

The rules:

- `mos` = `KONIQ_MOS_SLOPE * mean + KONIQ_MOS_INTERCEPT`, where `mean` = sum_k k * p_k is
  the distribution's mean on the raw 1-5 scale. KonIQ's 0-100 `MOS` is a rescaled z-score,
  not a linear function of the raw mean by definition, but over all 10,073 images of
  `koniq10k_distributions_sets.csv` a least-squares line fits it with r = 0.9954, residual
  SD 1.49 points and largest residual 5.5 points (`fit_mean_to_mos` recomputes it; a test
  checks these figures against the real file).
- `mos_sd` = `KONIQ_MOS_SLOPE * sd`, where `sd` = sqrt(sum_k p_k (k - mean)^2) is the
  distribution's spread on 1-5 (the population SD of the votes; KonIQ's `SD` column is the
  sample SD, 0.005 larger at most). The same line maps 1-5 to 0-100, so one rating level
  is 27.8 points and the spread is in the same points as `mos`.

Intervals (calibration): the predicted rating distribution is made continuous by spreading
each level's share uniformly over [k - 0.5, k + 0.5]; the central q-interval runs from its
(1 - q) / 2 to its (1 + q) / 2 quantile and is mapped to 0-100 by the line above. It
describes where one rater's rating falls. Two coverages are reported for it: the share of
held-out images whose true MOS falls inside (what a user reading "55 +- spread" checks),
and the share of the true votes that fall inside (what the interval means; it should be
near q when the distribution is right). A true MOS is a mean of ~120 votes, so it is far
less spread than one rater's rating, and its coverage sits above q by design: the report
says so instead of calling it calibrated.
"""

import math
from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np
from keras import ops

from kiqa.contract import (
    DIST_OUTPUT, KONIQ_MOS_INTERCEPT, KONIQ_MOS_SLOPE, MOS_OUTPUT, MOS_SCALE, RATING_LEVELS, SD_OUTPUT,
)

KONIQ_FIT = dict(slope=KONIQ_MOS_SLOPE, intercept=KONIQ_MOS_INTERCEPT, r=0.99536, residual_sd=1.485,
                 max_residual=5.50, n=10073)
KONIQ_MEAN_SHARES = (0.023, 0.165, 0.456, 0.339, 0.017)
LEVELS = np.arange(1, RATING_LEVELS + 1, dtype=np.float64)
SHARE_LABEL_COLUMNS = tuple(f"c{k}" for k in range(1, RATING_LEVELS + 1))
# Nominal coverages of the reliability diagram; 0.5 and 0.9 are the headline intervals.
COVERAGE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
HEADLINE_LEVELS = (0.5, 0.9)
# An interval counts as calibrated when its coverage is within this many points of the
# nominal share, or within two binomial standard errors on small sets (whichever is wider).
CALIBRATION_TOLERANCE = 0.05


def mean_to_mos(mean):
    """Maps a mean rating on KonIQ's raw 1-5 scale to the 0-100 MOS scale (the fitted line)."""
    return KONIQ_MOS_SLOPE * np.asarray(mean, np.float64) + KONIQ_MOS_INTERCEPT


def rating_moments(shares) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and SD on the raw 1-5 scale of rating distributions.

    Args:
        shares: array [n, 5] (or [5]) of the share of votes per level; rows sum to 1.

    Returns:
        (mean, sd), each [n] (or scalars), on 1-5; sd is the population SD.
    """
    shares = np.asarray(shares, np.float64)
    mean = shares @ LEVELS
    second = shares @ (LEVELS ** 2)
    return mean, np.sqrt(np.maximum(second - mean ** 2, 0.0))


def fit_mean_to_mos(shares, mos) -> Dict[str, float]:
    """Least-squares line from the 1-5 mean of rating distributions to a 0-100 MOS.

    Args:
        shares: [n, 5] shares of votes per level.
        mos: [n] 0-100 MOS of the same images.

    Returns:
        dict slope, intercept, r (Pearson), residual_sd, max_residual, n.
    """
    mean, _ = rating_moments(shares)
    mos = np.asarray(mos, np.float64)
    slope, intercept = np.polyfit(mean, mos, 1)
    residual = mos - (slope * mean + intercept)
    return dict(slope=float(slope), intercept=float(intercept), r=float(np.corrcoef(mean, mos)[0, 1]),
                residual_sd=float(residual.std()), max_residual=float(np.abs(residual).max()), n=int(mos.size))


def _aligned(y_true, y_pred):
    """(y_true, y_pred) as tensors of y_pred's dtype and shape: reshaped, not broadcast."""
    y_pred = ops.convert_to_tensor(y_pred)
    return ops.reshape(ops.cast(y_true, y_pred.dtype), ops.shape(y_pred)), y_pred


def _squared_emd(y_true, y_pred):
    """`emd_loss` of aligned shares."""
    return ops.mean(ops.square(ops.cumsum(y_true, axis=-1) - ops.cumsum(y_pred, axis=-1)), axis=-1)


@keras.saving.register_keras_serializable(package="kiqa")
def emd_loss(y_true, y_pred):
    """Squared earth mover's distance between rating distributions: mean_k (CDF_true - CDF_pred)^2.

    NIMA's loss (Talebi & Milanfar 2018, r = 2, here without the square root, which has an
    unbounded gradient at a perfect fit). It compares cumulative shares, so it knows the
    levels are ordered: putting the mass one level off costs less than four levels off,
    which cross-entropy or KL (blind to the order) cannot tell apart.

    Args:
        y_true: true shares [batch, 5].
        y_pred: predicted shares [batch, 5].

    Returns:
        Per-image loss [batch].
    """
    return _squared_emd(*_aligned(y_true, y_pred))


def _moments(shares):
    """(mean, sd) on the raw 1-5 scale of shares [batch, 5], in the graph."""
    levels = ops.arange(1, RATING_LEVELS + 1, dtype=shares.dtype)
    mean = ops.sum(shares * levels, axis=-1)
    variance = ops.sum(shares * ops.square(levels), axis=-1) - ops.square(mean)
    # Rounding can make the variance of a one-level distribution a hair below 0.
    return mean, ops.sqrt(ops.maximum(variance, 0.0))


@keras.saving.register_keras_serializable(package="kiqa")
class RatingLoss(keras.losses.Loss):
    """The distribution head's loss: squared EMD (`emd_loss`) plus `spread_weight` times the
    squared error of the spread, ((mos_sd_true - mos_sd_pred) / 100)^2 in the 0-100 points
    of `mos_sd`: the same units as the MOS term of the regression head's loss.

    Why the spread term: squared EMD is dominated by where the mass sits (the mean), and a
    softmax trained on it alone learned the spread in some runs and not in others (held-out
    SD SRCC from 0.63 down to -0.26 on the demo data over seeds: the spread then followed
    the mean's distance to the scale's ends, which ranks the demo's spreads backwards).
    Spread has to be trained as directly as the MOS is.

    Args:
        spread_weight: weight of the spread term (TrainConfig `sd_loss_weight`); 0 gives
            plain squared EMD.
    """

    def __init__(self, spread_weight: float, name: str = "rating_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.spread_weight = float(spread_weight)

    def call(self, y_true, y_pred):
        y_true, y_pred = _aligned(y_true, y_pred)
        loss = _squared_emd(y_true, y_pred)
        if self.spread_weight:
            _, sd_true = _moments(y_true)
            _, sd_pred = _moments(y_pred)
            loss = loss + self.spread_weight * ops.square((sd_true - sd_pred) * (KONIQ_MOS_SLOPE / MOS_SCALE))
        return loss

    def get_config(self):
        return dict(super().get_config(), spread_weight=self.spread_weight)


@keras.saving.register_keras_serializable(package="kiqa")
class RatingMoments(keras.layers.Layer):
    """Shares of the five rating levels -> (mos, mos_sd) on 0-100 by this module's rules.

    Args:
        slope: 0-100 points per rating level (`KONIQ_MOS_SLOPE`).
        intercept: the line's intercept (`KONIQ_MOS_INTERCEPT`).
    """

    def __init__(self, slope: float = KONIQ_MOS_SLOPE, intercept: float = KONIQ_MOS_INTERCEPT, **kwargs):
        super().__init__(**kwargs)
        self.slope, self.intercept = float(slope), float(intercept)

    def call(self, shares):
        mean, sd = _moments(ops.cast(shares, "float32"))
        return self.slope * mean + self.intercept, self.slope * sd

    def compute_output_shape(self, input_shape):
        return (input_shape[0],), (input_shape[0],)

    def get_config(self):
        return dict(super().get_config(), slope=self.slope, intercept=self.intercept)


def distribution_head(features, dtype="float32"):
    """The distribution head on pooled features: Dense(5) + softmax, then `RatingMoments`.

    Args:
        features: pooled features [batch, channels].
        dtype: the head's dtype (float32 also under mixed precision).

    Returns:
        dict of the model outputs `mos`, `mos_sd` ([batch], 0-100) and `dist` ([batch, 5]).
    """
    logits = keras.layers.Dense(
        RATING_LEVELS,
        # Small weights: the first predictions sit at the bias's distribution, KonIQ's
        # average shares over all 10,073 images (c1..c5 means), not at random.
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
        bias_initializer=keras.initializers.Constant(np.log(KONIQ_MEAN_SHARES).tolist()),
        dtype=dtype, name="head_dense",
    )(features)
    shares = keras.layers.Softmax(dtype=dtype, name=DIST_OUTPUT)(logits)
    mos, sd = RatingMoments(dtype=dtype, name="rating_moments")(shares)
    # Identity layers only to give the outputs their contract names.
    mos = keras.layers.Identity(dtype=dtype, name=MOS_OUTPUT)(mos)
    sd = keras.layers.Identity(dtype=dtype, name=SD_OUTPUT)(sd)
    return {MOS_OUTPUT: mos, SD_OUTPUT: sd, DIST_OUTPUT: shares}


# ---------------------------------------------------------------- judging predictions


def emd(true_shares, predicted_shares) -> np.ndarray:
    """Per-image earth mover's distance (NIMA's r = 2 form: sqrt(mean_k (CDF diff)^2)).

    Args:
        true_shares, predicted_shares: [n, 5].

    Returns:
        [n], 0 for identical distributions, at most 0.894 (all mass at opposite ends).
    """
    diff = np.cumsum(np.asarray(true_shares, np.float64), -1) - np.cumsum(np.asarray(predicted_shares, np.float64), -1)
    return np.sqrt(np.mean(diff ** 2, axis=-1))


def js_divergence(true_shares, predicted_shares) -> np.ndarray:
    """Per-image Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint).

    Args:
        true_shares, predicted_shares: [n, 5].

    Returns:
        [n].
    """
    p, q = np.asarray(true_shares, np.float64), np.asarray(predicted_shares, np.float64)
    m = (p + q) / 2

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sum(np.where(a > 0, a * np.log2(a / b), 0.0), axis=-1)

    return np.maximum(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)


def _continuous_cdf(shares, x):
    """CDF at rating `x` (any real) of the distribution with each level uniform on [k-0.5, k+0.5]."""
    shares = np.asarray(shares, np.float64)
    x = np.asarray(x, np.float64)
    # Fraction of each level's unit interval lying below x: [n, 5] (broadcast over levels).
    below = np.clip(x[..., None] - (LEVELS - 0.5), 0.0, 1.0)
    return np.sum(shares * below, axis=-1)


def rating_quantiles(shares, q) -> np.ndarray:
    """Quantiles on the raw 1-5 scale (0.5 ... 5.5) of the continuous rating distributions.

    Args:
        shares: [n, 5].
        q: probability in [0, 1].

    Returns:
        [n] ratings x with CDF(x) = q (levels uniform on [k - 0.5, k + 0.5]).
    """
    shares = np.asarray(shares, np.float64)
    cdf = np.concatenate([np.zeros(shares.shape[:-1] + (1,)), np.cumsum(shares, -1)], -1)
    out = np.empty(shares.shape[:-1])
    for i in np.ndindex(out.shape):
        # cdf[i] runs 0 at 0.5 to 1 at 5.5, linear inside each level.
        out[i] = np.interp(q, cdf[i], np.arange(RATING_LEVELS + 1) + 0.5)
    return out


def intervals(shares, level) -> Tuple[np.ndarray, np.ndarray]:
    """The central `level` interval of each predicted rating distribution, on 0-100.

    Args:
        shares: [n, 5] predicted shares.
        level: nominal coverage, e.g. 0.9.

    Returns:
        (low, high), each [n] on 0-100 (the mapped ends, clipped to 0 and 100).
    """
    low = rating_quantiles(shares, (1 - level) / 2)
    high = rating_quantiles(shares, (1 + level) / 2)
    return np.clip(mean_to_mos(low), 0, MOS_SCALE), np.clip(mean_to_mos(high), 0, MOS_SCALE)


def coverage(true_shares, true_mos, predicted_shares, level) -> Dict[str, float]:
    """How often a predicted central `level` interval holds the truth.

    Args:
        true_shares: [n, 5] true shares (the votes).
        true_mos: [n] true 0-100 MOS.
        predicted_shares: [n, 5].
        level: nominal coverage.

    Returns:
        dict `mos`: share of images whose true MOS is inside; `votes`: mean share of the
        true votes inside (levels spread uniformly as for the prediction).
    """
    low = rating_quantiles(predicted_shares, (1 - level) / 2)
    high = rating_quantiles(predicted_shares, (1 + level) / 2)
    mos_low, mos_high = mean_to_mos(low), mean_to_mos(high)
    true_mos = np.asarray(true_mos, np.float64)
    inside_mos = (true_mos >= mos_low) & (true_mos <= mos_high)
    votes = _continuous_cdf(true_shares, high) - _continuous_cdf(true_shares, low)
    return dict(mos=float(np.mean(inside_mos)), votes=float(np.mean(votes)))


def calibration_verdict(observed: float, nominal: float, n: int) -> str:
    """"calibrated", "too wide" or "too narrow" for an observed coverage against the nominal one."""
    tolerance = max(CALIBRATION_TOLERANCE, 2 * math.sqrt(nominal * (1 - nominal) / max(n, 1)))
    if abs(observed - nominal) <= tolerance:
        return "calibrated"
    return "too wide" if observed > nominal else "too narrow"


def evaluate_distributions(true_shares, true_mos, predicted_shares, predicted_sd=None) -> dict:
    """Everything reported about predicted rating distributions on a labelled set.

    Args:
        true_shares: [n, 5] the labels' c1..c5.
        true_mos: [n] the labels' 0-100 MOS.
        predicted_shares: [n, 5] the model's p1..p5.
        predicted_sd: [n] the model's mos_sd; None derives it from `predicted_shares`.

    Returns:
        dict: emd and js (means over images), sd_plcc and sd_srcc (predicted vs true
        spread, both in 0-100 points), true_sd_mean and predicted_sd_mean, coverage
        {level: {mos, votes, mos_verdict, votes_verdict}} for every `COVERAGE_LEVELS`,
        n, the interval rule in words (`interval_rule`) and plain-language `cautions`
        for every headline interval that is not calibrated.
    """
    from kiqa.metrics import plcc, srcc

    true_shares = np.asarray(true_shares, np.float64)
    predicted_shares = np.asarray(predicted_shares, np.float64)
    n = int(len(true_shares))
    true_sd = KONIQ_MOS_SLOPE * rating_moments(true_shares)[1]
    if predicted_sd is None:
        predicted_sd = KONIQ_MOS_SLOPE * rating_moments(predicted_shares)[1]
    predicted_sd = np.asarray(predicted_sd, np.float64)
    result = dict(
        n=n,
        emd=float(np.mean(emd(true_shares, predicted_shares))),
        js=float(np.mean(js_divergence(true_shares, predicted_shares))),
        sd_plcc=plcc(true_sd, predicted_sd) if n >= 3 else float("nan"),
        sd_srcc=srcc(true_sd, predicted_sd) if n >= 3 else float("nan"),
        true_sd_mean=float(true_sd.mean()) if n else float("nan"),
        predicted_sd_mean=float(predicted_sd.mean()) if n else float("nan"),
        interval_rule=INTERVAL_RULE,
        coverage={},
        cautions=[],
    )
    for level in COVERAGE_LEVELS:
        covered = coverage(true_shares, true_mos, predicted_shares, level)
        result["coverage"][f"{level:.1f}"] = dict(
            covered, mos_verdict=calibration_verdict(covered["mos"], level, n),
            votes_verdict=calibration_verdict(covered["votes"], level, n),
        )
    for level in HEADLINE_LEVELS:
        entry = result["coverage"][f"{level:.1f}"]
        for what, name in (("votes", "the true votes"), ("mos", "the true MOS")):
            verdict = entry[f"{what}_verdict"]
            if verdict != "calibrated":
                result["cautions"].append(
                    f"the {level:.0%} interval is not calibrated for {name}: it holds {entry[what]:.0%} "
                    f"({verdict})" + (MOS_COVERAGE_NOTE if what == "mos" else "")
                )
    return result


INTERVAL_RULE = (
    "central interval of the predicted rating distribution (each level's share spread uniformly "
    "over [k-0.5, k+0.5] on 1-5), its ends mapped to 0-100 by MOS = "
    f"{KONIQ_MOS_SLOPE} * rating + ({KONIQ_MOS_INTERCEPT})"
)
MOS_COVERAGE_NOTE = (
    "; the interval is where one rater's rating falls, and a MOS (a mean of many votes) is far "
    "less spread, so this coverage runs high by design"
)


def format_distribution_report(result: dict, indent: str = "  ") -> str:
    """The distribution metrics as lines for a console report."""
    lines = [
        f"{indent}rating distribution: EMD {result['emd']:.4f}  JS divergence {result['js']:.4f} bits  (n={result['n']})",
        f"{indent}spread (mos_sd vs true SD, 0-100 points): PLCC {result['sd_plcc']:.4f}  SRCC {result['sd_srcc']:.4f}  "
        f"mean predicted {result['predicted_sd_mean']:.2f} / true {result['true_sd_mean']:.2f}",
    ]
    for level in HEADLINE_LEVELS:
        entry = result["coverage"][f"{level:.1f}"]
        lines.append(
            f"{indent}{level:.0%} interval holds {entry['votes']:.1%} of the true votes ({entry['votes_verdict']}) "
            f"and {entry['mos']:.1%} of the true MOS ({entry['mos_verdict']})"
        )
    lines.append(f"{indent}interval: {result['interval_rule']}")
    lines.extend(f"{indent}caution: {text}" for text in result["cautions"])
    return "\n".join(lines)


def plot_reliability(result: dict, path, title: str = "Interval calibration", warning: Optional[str] = None):
    """Reliability diagram: observed against nominal coverage of the predicted intervals.

    Args:
        result: a dict from `evaluate_distributions`.
        path: PNG file to write.
        title: figure title.
        warning: the model's provenance warning, drawn on the figure (`kiqa.plots.save_figure`).

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure

    from kiqa.plots import legend_off_the_data, save_figure

    nominal = [float(k) for k in result["coverage"]]
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    ax.plot(nominal, [e["votes"] for e in result["coverage"].values()], marker="o", label="true votes inside")
    ax.plot(nominal, [e["mos"] for e in result["coverage"].values()], marker="s", label="true MOS inside")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="nominal coverage of the predicted interval",
           ylabel="observed share inside", title=f"{title} (n={result['n']})")
    legend_off_the_data(ax)
    ax.grid(alpha=0.3)
    save_figure(fig, path, warning=warning)
    return path


def label_shares(frame) -> Optional[np.ndarray]:
    """The true shares c1..c5 of a label table as [n, 5], or None when it has none."""
    if not all(column in frame.columns for column in SHARE_LABEL_COLUMNS):
        return None
    return frame[list(SHARE_LABEL_COLUMNS)].to_numpy(np.float64)


def share_columns(shares: Sequence[Sequence[float]]) -> Dict[str, np.ndarray]:
    """[n, 5] shares as the columns p1..p5 outputs carry."""
    from kiqa.contract import SHARE_COLUMNS

    shares = np.asarray(shares, np.float64).reshape(-1, RATING_LEVELS)
    return {name: shares[:, k] for k, name in enumerate(SHARE_COLUMNS)}
