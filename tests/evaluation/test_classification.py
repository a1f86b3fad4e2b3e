"""Classification metrics against hand-worked cases, brute force and scipy, and the
CinC 2019 utility against the published rules (Reyna et al., Crit Care Med 2020)."""

import numpy as np
import pytest
from scipy import optimize, stats

from phems_clinical.evaluation import classification as cm


def _pairwise_auroc(y, s):
    """O(n^2) definition: P(s+ > s-) + P(s+ = s-)/2 over all pairs."""
    pos, neg = s[y == 1], s[y == 0]
    d = pos[:, None] - neg[None, :]
    return np.mean((d > 0) + 0.5 * (d == 0))


def _loop_average_precision(y, s):
    """Step-wise AP by a loop over the distinct thresholds, highest first."""
    ap, r_prev = 0.0, 0.0
    for thr in sorted(set(s.tolist()), reverse=True):
        sel = s >= thr
        tp = np.sum(y[sel])
        prec, rec = tp / np.sum(sel), tp / np.sum(y)
        ap += (rec - r_prev) * prec
        r_prev = rec
    return ap


def test_auroc_auprc_hand_worked():
    # scikit-learn's documented example: roc_auc 0.75, average precision 0.8333.
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert cm.auroc(y, s) == pytest.approx(0.75, abs=1e-15)
    assert cm.auprc(y, s) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3, abs=1e-15)
    # Ties: the positive at 0.5 ties with the negative -> counts 1/2.
    y2, s2 = np.array([1, 0, 1]), np.array([0.5, 0.5, 0.2])
    assert cm.auroc(y2, s2) == pytest.approx((0.5 + 0.0) / 2, abs=1e-15)
    assert cm.auprc(y2, s2) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3, abs=1e-15)
    # The official challenge code's docstring example: AUROC = AUPRC = 1.
    y3 = np.array([0, 0, 0, 0, 1, 1])
    s3 = np.array([0.3, 0.4, 0.6, 0.7, 0.8, 0.8])
    assert cm.auroc(y3, s3) == 1.0 and cm.auprc(y3, s3) == 1.0
    assert np.isnan(cm.auroc(np.zeros(3), np.arange(3.0)))
    assert np.isnan(cm.auprc(np.zeros(3), np.arange(3.0)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_auprc_random_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n) + 0.7 * y, 1)  # many ties
    a = cm.auroc(y, s)
    assert a == pytest.approx(_pairwise_auroc(y, s), abs=1e-12)
    u = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert a == pytest.approx(u / (y.sum() * (n - y.sum())), abs=1e-12)
    assert cm.auprc(y, s) == pytest.approx(_loop_average_precision(y, s), abs=1e-12)


def test_brier_and_ece_hand_worked():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.15, 0.95])
    assert cm.brier_score(y, p) == pytest.approx(
        (0.05**2 + 0.85**2 + 0.15**2 + 0.05**2) / 4, abs=1e-15
    )
    # Equal width: bins 0, 1, 9 -> (0.05 * 1 + 0.35 * 2 + 0.05 * 1) / 4.
    assert cm.expected_calibration_error(y, p) == pytest.approx(0.2, abs=1e-15)
    # Equal mass, 2 bins: {0.05, 0.15 (y=1)}, {0.15 (y=0), 0.95}.
    assert cm.expected_calibration_error(y, p, n_bins=2, strategy="quantile") == (
        pytest.approx(0.5 * 0.4 + 0.5 * 0.05, abs=1e-15)
    )
    # p = 1.0 falls in the last bin.
    assert cm.expected_calibration_error([1], [1.0]) == 0.0
    with pytest.raises(ValueError, match="strategy"):
        cm.expected_calibration_error(y, p, strategy="x")
    with pytest.raises(ValueError, match="probabilities"):
        cm.brier_score(y, p + 1)


def _nll(theta, y, lp, offset=False):
    z = theta[0] + (lp if offset else theta[1] * lp)
    return np.sum(np.logaddexp(0.0, z) - y * z)


def test_calibration_slope_intercept_vs_scipy_and_recalibration():
    rng = np.random.default_rng(3)
    n = 4000
    lp = rng.normal(-1.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    p = 1 / (1 + np.exp(-2.0 * lp + 0.3))  # overconfident, shifted
    fit = cm.calibration_slope_intercept(y, p)
    lpp = np.log(p / (1 - p))
    ref2 = optimize.minimize(
        _nll, [0.0, 1.0], args=(y, lpp), method="BFGS", options={"gtol": 1e-10}
    ).x
    ref1 = optimize.minimize_scalar(
        lambda a: _nll([a], y, lpp, True),
        bounds=(-5, 5),
        method="bounded",
        options={"xatol": 1e-10},
    ).x
    assert fit.slope == pytest.approx(ref2[1], abs=1e-6)
    assert fit.intercept_joint == pytest.approx(ref2[0], abs=1e-6)
    assert fit.intercept == pytest.approx(ref1, abs=1e-6)
    assert fit.slope == pytest.approx(0.5, abs=0.05)  # 1/2 of the true logit
    # Recalibrated predictions are exactly calibrated (score equations).
    q = 1 / (1 + np.exp(-(fit.intercept_joint + fit.slope * lpp)))
    refit = cm.calibration_slope_intercept(y, q)
    assert refit.slope == pytest.approx(1.0, abs=1e-9)
    assert refit.intercept == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(cm.calibration_slope_intercept(np.ones(4), np.full(4, 0.5)).slope)


# --- CinC 2019 utility ------------------------------------------------------------


def _rule_utility(labels, preds):
    """Per-hour utility from the published rules (Reyna et al. 2020, Fig. 2), one
    stay, written independently of the implementation."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if not labels.any():
        return -0.05 * preds.sum()
    ts = np.argmax(labels) + 6  # SepsisLabel starts 6 h early
    total = 0.0
    for t, a in enumerate(preds):
        d = t - ts
        if d > 3:
            continue
        if a:
            total += max(-0.05, (d + 12) / 6) if d <= -6 else (3 - d) / 9
        else:
            total += 0.0 if d <= -6 else -2 * (d + 6) / 9
    return total


def test_cinc_utility_official_example_and_rules():
    # The official compute_prediction_utility docstring: 3.388888888888889.
    ids, u = cm.cinc_utility(np.zeros(6), [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1])
    assert u[0] == pytest.approx(3.388888888888889, abs=1e-12)
    rng = np.random.default_rng(5)
    stays, labs, preds, per = [], [], [], {}
    for k in range(40):
        n = int(rng.integers(1, 60))
        lab = np.zeros(n, int)
        if k % 2 and n > 1:
            lab[int(rng.integers(0, n)) :] = 1
        pr = (rng.random(n) < 0.3).astype(int)
        stays.append(np.full(n, 100 + k))
        labs.append(lab)
        preds.append(pr)
        per[100 + k] = _rule_utility(lab, pr)
    # Interleave stays' rows (time order within a stay is kept).
    s, la, pr = (np.concatenate(v) for v in (stays, labs, preds))
    pos = np.concatenate([np.arange(len(x)) for x in labs])
    order = np.lexsort((s, pos))  # hour first, then stay
    ids, u = cm.cinc_utility(s[order], la[order], pr[order])
    np.testing.assert_allclose(u, [per[i] for i in ids], atol=1e-12)
    # Normalised score: optimal alarms score 1, none 0, the rule-based totals
    # for the random ones.
    tot = cm.cinc_utility_totals(s, la, pr)
    best = sum(_rule_utility(lab, _best(lab)) for lab in labs)
    assert tot.best == pytest.approx(best, abs=1e-10)
    assert tot.inaction == pytest.approx(
        sum(_rule_utility(lab, 0 * lab) for lab in labs), abs=1e-10
    )
    assert cm.cinc_normalised_utility(s, la, pr) == pytest.approx(
        (sum(per.values()) - tot.inaction) / (best - tot.inaction), abs=1e-12
    )
    best_all = np.concatenate([_best(lab) for lab in labs])
    assert cm.cinc_normalised_utility(s, la, best_all) == pytest.approx(1.0)
    assert cm.cinc_normalised_utility(s, la, 0 * la) == 0.0
    assert (tot + tot).observed == 2 * tot.observed


def _best(lab):
    out = np.zeros_like(lab)
    if lab.any():
        ts = np.argmax(lab) + 6
        out[max(0, ts - 12) : ts + 4] = 1
    return out


def test_cinc_labels():
    hour = np.arange(10)
    np.testing.assert_array_equal(
        cm.cinc_labels(hour, np.full(10, 8.0)), [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    )
    np.testing.assert_array_equal(cm.cinc_labels(hour, np.full(10, np.nan)), 0)
