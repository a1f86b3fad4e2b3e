"""Tests of the fidelity metrics of the scorecard."""

import jax
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from phems_clinical.privacy.fidelity import (
    FidelityInputError,
    column_fidelity,
    cramers_v,
    detection_auc,
    fidelity_summary,
    pairwise_fidelity,
    pmse,
    pmse_ratio,
    total_variation,
)


def _table(seed, n=1000, rho=0.8, shift=0.0):
    """Two correlated normals, a categorical tied to x, a noise categorical."""
    rng = np.random.default_rng(seed)
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
    x = z[:, 0] + shift
    ward = np.where(x + rng.normal(0, 1, n) > 0, "picu", "nicu")
    sex = rng.choice(["f", "m"], size=n, p=[0.45, 0.55])
    return pd.DataFrame({"x": x, "y": z[:, 1], "ward": ward, "sex": sex})


def test_ks_equals_scipy_and_missing_rates():
    real, syn = _table(1, 300), _table(2, 200, shift=0.3)
    syn.loc[:19, "x"] = np.nan
    out = column_fidelity(real, syn).set_index("column")
    for c in ("x", "y"):
        want = stats.ks_2samp(real[c].dropna(), syn[c].dropna()).statistic
        assert out.loc[c, "metric"] == "ks"
        assert out.loc[c, "statistic"] == pytest.approx(want, abs=1e-15)
    assert out.loc["x", "missing_syn"] == pytest.approx(0.1)
    assert out.loc["x", "missing_diff"] == pytest.approx(0.1)
    assert out.loc["y", "missing_diff"] == 0.0
    assert out.loc["ward", "metric"] == "tv"


def test_total_variation_hand_worked():
    # real: a .5 b .5 ; syn: a .25 b .25 c .5 -> TV = .5(.25+.25+.5) = .5
    real = pd.DataFrame({"c": ["a", "b", "a", "b"]})
    syn = pd.DataFrame({"c": ["a", "b", "c", "c"]})
    assert total_variation(real.c, syn.c) == pytest.approx(0.5)
    out = column_fidelity(real, syn)
    assert out.statistic.iloc[0] == pytest.approx(0.5)
    assert out.score.iloc[0] == pytest.approx(0.5)
    # missing values are excluded from TV and show in the missing rate instead
    syn2 = pd.DataFrame({"c": ["a", "b", None, None]})
    out2 = column_fidelity(real, syn2)
    assert out2.statistic.iloc[0] == pytest.approx(0.0)
    assert out2.missing_diff.iloc[0] == pytest.approx(0.5)


def test_cramers_v_hand_worked_2x2():
    # table [[30, 10], [10, 50]]: V = |ad - bc| / sqrt(r1 r2 c1 c2)
    a = ["u"] * 40 + ["v"] * 60
    b = ["p"] * 30 + ["q"] * 10 + ["p"] * 10 + ["q"] * 50
    want = (30 * 50 - 10 * 10) / np.sqrt(40 * 60 * 40 * 60)  # = 1400/2400
    assert cramers_v(a, b) == pytest.approx(want)
    assert cramers_v(a, ["p"] * 100) == 0.0


def test_pairwise_detects_broken_correlation():
    real, same, broken = _table(1), _table(2), _table(3, rho=0.0)
    ok = pairwise_fidelity(real, same).set_index(["col_a", "col_b"])
    bad = pairwise_fidelity(real, broken).set_index(["col_a", "col_b"])
    assert ok.loc[("x", "y"), "metric"] == "pearson"
    assert ok.loc[("x", "y"), "abs_diff"] < 0.1
    assert bad.loc[("x", "y"), "abs_diff"] > 0.6
    assert ok.loc[("x", "ward"), "kind"] == "mixed"
    assert ok.loc[("ward", "sex"), "kind"] == "categorical"
    assert bad.attrs["mean_abs_diff_pearson"] > 0.6
    assert len(ok) == 6


def test_same_distribution_is_indistinguishable(key):
    aucs, snoke, perm = [], [], []
    for i in range(3):
        k = jax.random.fold_in(key, i)
        real, syn = _table(10 + 2 * i), _table(11 + 2 * i)
        aucs.append(detection_auc(k, real, syn))
        snoke.append(pmse_ratio(k, real, syn))
        perm.append(pmse_ratio(k, real, syn, n_permutations=20))
    # AUC: 0.5 +/- 0.06 per key. pMSE: k = 8 parameters, the ratio is about
    # chi2_7 / 7 (sd ~0.53 per key, ~0.31 for a mean of three). The permutation
    # null centres at 1: mean of three in [0.4, 1.8]. The published null
    # (k-1)(1-c)^2 c/N centres at 1/(1-c) = 2 here: mean of three in [0.9, 3.5].
    assert all(abs(a - 0.5) < 0.06 for a in aucs), aucs
    assert 0.4 < np.mean(perm) < 1.8, perm
    assert 0.9 < np.mean(snoke) < 3.5, snoke


def test_pmse_null_expectation_by_simulation(key):
    """E[N pMSE / (k-1)] = c(1-c) for independent samples, not (1-c)^2 c."""
    rng = np.random.default_rng(5)
    vals = []
    for _ in range(40):
        real = pd.DataFrame(rng.normal(size=(400, 6)), columns=list("abcdef"))
        syn = pd.DataFrame(rng.normal(size=(400, 6)), columns=list("abcdef"))
        vals.append(pmse(key, real, syn, quadratic=False) * 800 / 6)
    # c = 1/2: c(1-c) = 0.25 vs published (1-c)^2 c = 0.125; the mean of 40
    # draws of c(1-c) chi2_6/6 has relative sd 0.09.
    assert np.mean(vals) == pytest.approx(0.25, rel=0.25)


@pytest.mark.parametrize("kw", [dict(shift=1.0), dict(rho=0.0)])
def test_shift_or_broken_correlation_is_detected(key, kw):
    real, syn = _table(1), _table(2, **kw)
    assert detection_auc(key, real, syn) > 0.7
    assert pmse_ratio(key, real, syn) > 10
    assert pmse_ratio(key, real, syn, n_permutations=8) > 10


def test_reproducible_with_same_key(key):
    real, syn = _table(1, 400), _table(2, 300, shift=0.3)
    a = detection_auc(key, real, syn)
    assert detection_auc(key, real, syn) == a
    assert detection_auc(jax.random.fold_in(key, 1), real, syn) != a
    r = pmse_ratio(key, real, syn, n_permutations=4)
    assert pmse_ratio(key, real, syn, n_permutations=4) == r
    assert pmse(key, real, syn) == pmse(jax.random.fold_in(key, 1), real, syn)


def test_summary(key):
    real, syn = _table(1, 400), _table(2, 400)
    s = fidelity_summary(key, real, syn)
    assert set(s) >= {
        "column_shapes",
        "detection_auc",
        "pmse_ratio",
        "mean_abs_diff_pearson",
        "pair_trends",
    }
    assert all(isinstance(v, float) for v in s.values())
    assert s["column_shapes"] > 0.9 and s["pair_trends"] > 0.9
    assert 0.2 < s["pmse_ratio_perm"] < 3
    assert s == fidelity_summary(key, real, syn)


def test_clear_errors(key):
    real = _table(1, 50)
    with pytest.raises(FidelityInputError, match=r"missing from syn \['sex'\]"):
        column_fidelity(real, real.drop(columns="sex"))
    with pytest.raises(FidelityInputError, match=r"only in syn \['extra'\]"):
        pairwise_fidelity(real, real.assign(extra=1))
    with pytest.raises(FidelityInputError, match="syn table is empty"):
        detection_auc(key, real, real.iloc[:0])
    with pytest.raises(FidelityInputError, match="real table is empty"):
        pmse(key, pd.DataFrame(), real)
    with pytest.raises(FidelityInputError, match=r"\['x'\]"):
        column_fidelity(real, real.assign(x="a"))
    with pytest.raises(FidelityInputError, match="at least folds"):
        detection_auc(key, real, real.iloc[:3])
