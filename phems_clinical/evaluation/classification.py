"""Binary-classification metrics for risk models (numpy, vectorised).

Discrimination, calibration and the PhysioNet/Computing in Cardiology Challenge 2019
utility (Reyna et al., "Early prediction of sepsis from clinical data", Crit Care Med
2020;48(2):210-217):

* :func:`auroc`: area under the ROC curve, ties counted one half (midranks; the
  Mann-Whitney U statistic over ``n_pos * n_neg``); equal to the trapezoidal area of
  the official challenge code's ``compute_auc``.
* :func:`auprc`: average precision, the step-wise area under the precision-recall
  curve ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds
  (scikit-learn's ``average_precision_score``; the challenge's ``compute_auc`` uses
  the same step rule).
* :func:`calibration_slope_intercept`: logistic recalibration on ``logit(p)``
  (Cox, Biometrika 1958; Van Calster et al., J Clin Epidemiol 2016;74:167-176).
* :func:`expected_calibration_error` and :func:`brier_score`.
* :func:`cinc_utility` / :func:`cinc_normalised_utility`: the challenge utility,
  per stay and normalised, computed exactly as the official
  ``evaluate_sepsis_score.py`` (github.com/physionetchallenges/evaluation-2019).

Degenerate inputs (one class only) give ``nan`` rather than raising, so a small site
without events can still be reported.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "CINC_2019",
    "CalibrationFit",
    "CincUtilityParams",
    "UtilityTotals",
    "auprc",
    "auroc",
    "brier_score",
    "calibration_slope_intercept",
    "cinc_labels",
    "cinc_normalised_utility",
    "cinc_utility",
    "cinc_utility_totals",
    "expected_calibration_error",
]


class ClassificationInputError(ValueError):
    """Labels/scores of the wrong shape or range (the message names the field)."""


def _check(y, p, *, probabilities: bool = False) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1 or y.shape != p.shape:
        raise ClassificationInputError(
            f"y, score: expected two 1-D arrays of equal length, got shapes "
            f"{y.shape} and {p.shape}"
        )
    if not np.all((y == 0) | (y == 1)):
        raise ClassificationInputError("y: expected labels 0/1 (bool or numeric)")
    if not np.all(np.isfinite(p)):
        raise ClassificationInputError("score: expected finite values")
    if probabilities and (np.any(p < 0) or np.any(p > 1)):
        raise ClassificationInputError("p: expected probabilities in [0, 1]")
    return y.astype(np.float64), p


def auroc(y, score) -> float:
    """Area under the ROC curve; ties between a positive and a negative count 1/2.

    ``(sum of the positives' midranks - n1 (n1 + 1) / 2) / (n1 n0)``, O(n log n).
    ``nan`` when ``y`` holds one class only.
    """
    y, s = _check(y, score)
    n1 = y.sum()
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    midrank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average ranks
    r1 = np.sum(midrank[inv] * y)
    return float((r1 - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def auprc(y, score) -> float:
    """Average precision: ``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds
    taken in decreasing order (tied scores enter together), ``R_0 = 0``.

    This is scikit-learn's ``average_precision_score`` (no interpolation).
    ``nan`` when there is no positive.
    """
    y, s = _check(y, score)
    n1 = y.sum()
    if n1 == 0:
        return float("nan")
    _, inv = np.unique(-s, return_inverse=True)  # group 0 = highest score
    pos = np.bincount(inv, weights=y)
    tot = np.bincount(inv)
    tp = np.cumsum(pos)
    precision = tp / np.cumsum(tot)
    recall = tp / n1
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def brier_score(y, p) -> float:
    """Mean squared error of the probabilities, ``mean((p - y)^2)`` (Brier 1950)."""
    y, p = _check(y, p, probabilities=True)
    return float(np.mean((p - y) ** 2))


def _logit(p: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(p, eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class CalibrationFit(NamedTuple):
    """Logistic recalibration of ``logit(p)``.

    slope : b in ``logit P(y=1) = a + b logit(p)`` (1 = ideal; < 1 overfitted).
    intercept : calibration-in-the-large, ``a`` with the slope fixed at 1, i.e.
        ``logit P(y=1) = a + offset(logit(p))`` (0 = ideal; > 0 the model
        under-predicts on average). This is the definition of Van Calster et al.
        2016 and of OHDSI PatientLevelPrediction.
    intercept_joint : ``a`` of the two-parameter fit (reported for completeness).
    """

    slope: float
    intercept: float
    intercept_joint: float


def calibration_slope_intercept(
    y, p, *, eps: float = 1e-12, max_iter: int = 100, tol: float = 1e-12
) -> CalibrationFit:
    """Calibration slope and intercept by maximum likelihood (Newton-Raphson).

    Probabilities are clipped to ``[eps, 1 - eps]`` before ``logit``. ``nan``
    fields when ``y`` holds one class only (the fit does not exist), and for the
    slope when ``logit(p)`` is constant.
    """
    y, p = _check(y, p, probabilities=True)
    nan = float("nan")
    if y.sum() == 0 or y.sum() == y.size:
        return CalibrationFit(nan, nan, nan)
    lp = _logit(p, eps)

    # Calibration-in-the-large: 1-D Newton on a with offset lp.
    a = 0.0
    for _ in range(max_iter):
        mu = _sigmoid(a + lp)
        step = np.sum(y - mu) / max(np.sum(mu * (1.0 - mu)), 1e-300)
        a += step
        if abs(step) < tol:
            break
    intercept = float(a)

    if np.ptp(lp) == 0.0:
        return CalibrationFit(nan, intercept, nan)
    # Slope: 2-D Newton (IRLS) on (a, b), started at the null model.
    X = np.column_stack([np.ones_like(lp), lp])
    beta = np.array([np.log(y.mean() / (1.0 - y.mean())), 0.0])
    for _ in range(max_iter):
        mu = _sigmoid(X @ beta)
        grad = X.T @ (y - mu)
        hess = (X * (mu * (1.0 - mu))[:, None]).T @ X
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.max(np.abs(step)) < tol:
            break
    return CalibrationFit(float(beta[1]), intercept, float(beta[0]))


def expected_calibration_error(
    y, p, *, n_bins: int = 10, strategy: str = "uniform"
) -> float:
    """``sum_b (n_b / n) |mean(y_b) - mean(p_b)|`` over probability bins.

    strategy : ``"uniform"`` (default): equal-width bins ``[0, 1/B), ..., [(B-1)/B,
        1]``; ``"quantile"``: equal-mass bins, the predictions sorted and split into
        ``n_bins`` groups whose sizes differ by at most one (ties may straddle).
    """
    y, p = _check(y, p, probabilities=True)
    if n_bins < 1:
        raise ClassificationInputError(f"n_bins: expected >= 1, got {n_bins}")
    if y.size == 0:
        return float("nan")
    if strategy == "uniform":
        b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    elif strategy == "quantile":
        b = np.empty(y.size, dtype=np.int64)
        b[np.argsort(p, kind="stable")] = (np.arange(y.size) * n_bins) // y.size
    else:
        raise ClassificationInputError(
            f"strategy: expected 'uniform' or 'quantile', got {strategy!r}"
        )
    n_b = np.bincount(b, minlength=n_bins)
    gap = np.abs(
        np.bincount(b, weights=y, minlength=n_bins)
        - np.bincount(b, weights=p, minlength=n_bins)
    )
    # |sum y - sum p| / n = (n_b / n) |mean y - mean p| per bin.
    return float(np.sum(gap[n_b > 0]) / y.size)


# --- PhysioNet/CinC 2019 utility -------------------------------------------------


class CincUtilityParams(NamedTuple):
    """The challenge's utility parameters (hours relative to ``t_sepsis``).

    Values of the official ``evaluate_sepsis_score.py`` (Reyna et al. 2020).
    """

    dt_early: float = -12.0
    dt_optimal: float = -6.0
    dt_late: float = 3.0
    max_u_tp: float = 1.0
    min_u_fn: float = -2.0
    u_fp: float = -0.05
    u_tn: float = 0.0


CINC_2019 = CincUtilityParams()


def cinc_labels(hour, onset, *, params: CincUtilityParams = CINC_2019) -> np.ndarray:
    """The challenge's ``SepsisLabel``: 1 from ``onset + dt_optimal`` (6 h before
    onset) onward, 0 before and for stays without onset (``onset`` NaN).

    hour, onset : arrays of equal length (one row per stay-hour; ``onset`` repeated
    over the stay's rows), hours.
    """
    hour = np.asarray(hour, dtype=np.float64)
    onset = np.asarray(onset, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (np.isfinite(onset) & (hour >= onset + params.dt_optimal)).astype(
            np.int64
        )


def _stay_codes(stay) -> tuple[np.ndarray, int]:
    stay = np.asarray(stay)
    if stay.ndim != 1:
        raise ClassificationInputError("stay: expected a 1-D array of stay ids")
    _, codes = np.unique(stay, return_inverse=True)
    return codes.ravel(), int(codes.max()) + 1 if codes.size else 0


def _row_position(codes: np.ndarray, n: int) -> np.ndarray:
    """0-based row index within each stay, in the given row order."""
    order = np.argsort(codes, kind="stable")
    first = np.searchsorted(codes[order], np.arange(n))
    pos = np.empty(codes.size, dtype=np.int64)
    pos[order] = np.arange(codes.size) - np.repeat(
        first, np.bincount(codes, minlength=n)
    )
    return pos


def _row_utility(t, t_sepsis, septic, pred, prm: CincUtilityParams) -> np.ndarray:
    """The official per-row utility, vectorised (same branches and formulas)."""
    m1 = prm.max_u_tp / (prm.dt_optimal - prm.dt_early)
    b1 = -m1 * prm.dt_early
    m2 = -prm.max_u_tp / (prm.dt_late - prm.dt_optimal)
    b2 = -m2 * prm.dt_late
    m3 = prm.min_u_fn / (prm.dt_late - prm.dt_optimal)
    b3 = -m3 * prm.dt_optimal
    d = np.where(septic, t - np.where(septic, t_sepsis, 0.0), 0.0)
    early = d <= prm.dt_optimal
    u_tp = np.where(early, np.maximum(m1 * d + b1, prm.u_fp), m2 * d + b2)
    u_fn = np.where(early, 0.0, m3 * d + b3)
    u_septic = np.where(pred, u_tp, u_fn)
    u_other = np.where(pred, prm.u_fp, prm.u_tn)
    u = np.where(septic, u_septic, u_other)
    # Rows after t_sepsis + dt_late score 0 (septic stays only; t_sepsis = inf else).
    return np.where(septic & (d > prm.dt_late), 0.0, u)


def cinc_utility(
    stay, labels, predictions, *, params: CincUtilityParams = CINC_2019
) -> tuple[np.ndarray, np.ndarray]:
    """Per-stay utility of binary predictions, as the official
    ``compute_prediction_utility``, for many stays at once.

    Rows are in time order within each stay (rows of different stays may
    interleave); a row's time is its position within its stay. A stay is septic
    when any label is 1, with ``t_sepsis = (first row labelled 1) - dt_optimal``.

    Returns ``(stay_ids (sorted unique), utility per stay)``.
    """
    stay = np.asarray(stay)
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if not (stay.shape == labels.shape == predictions.shape) or stay.ndim != 1:
        raise ClassificationInputError(
            "stay, labels, predictions: expected 1-D arrays of equal length"
        )
    for name, v in (("labels", labels), ("predictions", predictions)):
        if not np.all((v == 0) | (v == 1)):
            raise ClassificationInputError(f"{name}: expected 0/1 values")
    ids = np.unique(stay)
    codes, n = _stay_codes(stay)
    t = _row_position(codes, n).astype(np.float64)
    first = np.full(n, np.inf)
    lab = labels.astype(bool)
    np.minimum.at(first, codes[lab], t[lab])
    septic_stay = np.isfinite(first)
    t_sepsis = (first - params.dt_optimal)[codes]
    u = _row_utility(t, t_sepsis, septic_stay[codes], predictions.astype(bool), params)
    return ids, np.bincount(codes, weights=u, minlength=n)


class UtilityTotals(NamedTuple):
    """Summed challenge utilities over a cohort (additive across sites).

    observed : of the predictions; best : of the optimal alarms (1 on
    ``[t_sepsis + dt_early, t_sepsis + dt_late]`` of septic stays); inaction : of
    no alarm. ``normalised = (observed - inaction) / (best - inaction)``.
    """

    observed: float
    best: float
    inaction: float

    def __add__(self, other):  # type: ignore[override]
        return UtilityTotals(*(a + b for a, b in zip(self, other, strict=True)))

    @property
    def normalised(self) -> float:
        den = self.best - self.inaction
        return (
            float((self.observed - self.inaction) / den) if den != 0 else float("nan")
        )


def cinc_utility_totals(
    stay, labels, predictions, *, params: CincUtilityParams = CINC_2019
) -> UtilityTotals:
    """Observed, best and inaction utility totals over all stays (the terms of the
    official normalised score)."""
    labels = np.asarray(labels)
    stay = np.asarray(stay)
    codes, n = _stay_codes(stay)
    t = _row_position(codes, n).astype(np.float64)
    lab = labels.astype(bool)
    first = np.full(n, np.inf)
    np.minimum.at(first, codes[lab], t[lab])
    t_sep = (first - params.dt_optimal)[codes]
    # Official: best[max(0, t_s + dt_early) : min(t_s + dt_late + 1, n)] = 1.
    best = (t >= t_sep + params.dt_early) & (t <= t_sep + params.dt_late)
    observed = cinc_utility(stay, labels, predictions, params=params)[1].sum()
    best_u = cinc_utility(stay, labels, best, params=params)[1].sum()
    none_u = cinc_utility(stay, labels, np.zeros_like(best), params=params)[1].sum()
    return UtilityTotals(float(observed), float(best_u), float(none_u))


def cinc_normalised_utility(
    stay, labels, predictions, *, params: CincUtilityParams = CINC_2019
) -> float:
    """The challenge score: ``(U - U_inaction) / (U_best - U_inaction)`` summed over
    stays (1 = optimal alarms, 0 = never alarm)."""
    return cinc_utility_totals(stay, labels, predictions, params=params).normalised
