"""Gaussian copula synthesiser: tabular data and bad input."""

import jax
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from phems_clinical.privacy.synth import CopulaInputError, fit_copula, sample_copula

N_TRAIN, N_SYNTH = 2000, 4000


def _ks_threshold(n: int, m: int, alpha: float = 1e-3) -> float:
    """Two-sample KS critical value c(alpha) * sqrt((n + m) / (n m))."""
    return np.sqrt(-np.log(alpha / 2) / 2) * np.sqrt((n + m) / (n * m))


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    rng = np.random.default_rng(6)
    n = N_TRAIN
    x = rng.normal(size=n)
    y = 0.8 * x + 0.6 * rng.normal(size=n)  # Pearson rho 0.8
    ward = rng.choice(["picu", "ward", "nicu"], size=n, p=[0.5, 0.3, 0.2])
    shift = pd.Series(ward).map({"picu": 2.0, "ward": 1.0, "nicu": 0.0}).to_numpy()
    crp = np.exp(shift + 0.5 * rng.normal(size=n))  # positive, ward-dependent
    lab = rng.normal(size=n)
    lab[rng.random(n) < 1 / (1 + np.exp(-(2 * x - 1.5)))] = np.nan  # MNAR-ish on x
    return pd.DataFrame(
        {
            "x": x,
            "y": y,
            "age": rng.integers(0, 18, n),
            "ward": ward,
            "crp": crp,
            "lab": lab,
            "male": rng.random(n) < 0.55,
            "admitted": pd.Timestamp("2024-01-01")
            + pd.to_timedelta(rng.integers(0, 500_000, n), unit="min"),
            "n_drugs": pd.array(
                np.where(rng.random(n) < 0.1, None, rng.integers(0, 6, n)),
                dtype="Int64",
            ),
        }
    )


@pytest.fixture(scope="module")
def model(train):
    return fit_copula(train, bounds={"crp": (0.0, None)})


@pytest.fixture(scope="module")
def synth(model):
    return sample_copula(jax.random.key(11), model, N_SYNTH)


def test_reproducible_and_key_dependent(model):
    a = sample_copula(jax.random.key(3), model, 200)
    b = sample_copula(jax.random.key(3), model, 200)
    c = sample_copula(jax.random.key(4), model, 200)
    pd.testing.assert_frame_equal(a, b)
    assert not a["x"].equals(c["x"])


def test_columns_and_dtypes(train, synth):
    assert list(synth.columns) == list(train.columns)
    assert synth.dtypes.equals(train.dtypes)
    assert len(synth) == N_SYNTH


def test_marginals_ks(train, synth):
    thr = _ks_threshold(N_TRAIN, N_SYNTH)  # ~0.054 at alpha 1e-3
    cols = ["x", "y", "age", "crp", "lab"]
    for c in cols:
        ks = stats.ks_2samp(train[c].dropna(), synth[c].dropna()).statistic
        assert ks < thr, (c, ks, thr)
    t = train["admitted"].astype("int64")
    s = synth["admitted"].astype("int64")
    assert stats.ks_2samp(t, s).statistic < thr
    # the threshold has power: a shift of 0.2 sd is rejected
    assert stats.ks_2samp(train["x"], synth["x"] + 0.2).statistic > thr


def test_category_frequencies(train, synth):
    for c in ["ward", "male"]:
        p = train[c].value_counts(normalize=True)
        q = synth[c].value_counts(normalize=True).reindex(p.index, fill_value=0.0)
        tol = 4 * np.sqrt(p * (1 - p) / N_SYNTH) + 4 * np.sqrt(p * (1 - p) / N_TRAIN)
        assert (np.abs(q - p) < tol).all(), (c, p, q)
    assert set(synth["ward"]) == set(train["ward"])


def test_correlation_preserved(train, synth):
    r_in = np.corrcoef(train["x"], train["y"])[0, 1]
    r_out = np.corrcoef(synth["x"], synth["y"])[0, 1]
    assert abs(r_in - 0.8) < 0.03
    assert abs(r_out - r_in) < 0.05


def test_categorical_numeric_dependence(train, synth):
    order_in = train.groupby("ward")["crp"].median().sort_values().index.tolist()
    order_out = synth.groupby("ward")["crp"].median().sort_values().index.tolist()
    assert order_in == ["nicu", "ward", "picu"]
    assert order_out == order_in


def test_bounds_and_integers(train, synth, model):
    assert (synth["crp"] >= 0).all()
    assert synth["age"].between(train["age"].min(), train["age"].max()).all()
    assert (
        synth["admitted"]
        .between(train["admitted"].min(), train["admitted"].max())
        .all()
    )
    assert synth["x"].between(train["x"].min(), train["x"].max()).all()
    tight = fit_copula(train, bounds={"x": (-1.0, 1.0), "age": (2, 10)})
    s = sample_copula(jax.random.key(5), tight, 1000)
    assert s["x"].between(-1.0, 1.0).all() and s["age"].between(2, 10).all()
    assert synth["age"].dtype == np.int64
    nd = synth["n_drugs"].dropna().to_numpy(dtype=float)
    assert np.array_equal(nd, np.round(nd))


def test_missingness_rate_and_dependence(train, synth):
    for c in ["lab", "n_drugs"]:
        p = train[c].isna().mean()
        q = synth[c].isna().mean()
        assert abs(q - p) < 4 * np.sqrt(p * (1 - p) / N_SYNTH) + 0.01, (c, p, q)
    r_in = np.corrcoef(train["lab"].isna(), train["x"])[0, 1]
    r_out = np.corrcoef(synth["lab"].isna(), synth["x"])[0, 1]
    assert r_in > 0.3
    assert r_out > 0.5 * r_in  # same sign, not washed out
    assert synth["x"].notna().all()


def test_no_verbatim_copies():
    rng = np.random.default_rng(1)
    small = pd.DataFrame(
        {
            "a": rng.normal(size=40),
            "b": rng.gamma(2.0, size=40),
            "g": rng.choice(["u", "v"], size=40),
        }
    )
    s = sample_copula(jax.random.key(2), fit_copula(small), 2000)
    rows = set(map(tuple, small[["a", "b"]].to_numpy()))
    copies = sum(r in rows for r in map(tuple, s[["a", "b"]].to_numpy()))
    assert copies == 0
    assert s["a"].isin(small["a"]).mean() < 0.01


def test_constant_column_ok():
    df = pd.DataFrame({"c": [5.0] * 12, "k": ["x"] * 12, "z": np.arange(12.0)})
    s = sample_copula(jax.random.key(0), fit_copula(df), 50)
    assert (s["c"] == 5.0).all() and (s["k"] == "x").all()


def test_three_rows_fail_clearly():
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": ["x", "y", "x"]})
    with pytest.raises(CopulaInputError, match=r"3 rows.*min_rows=10"):
        fit_copula(df)
    assert issubclass(CopulaInputError, ValueError)


def test_bad_input_named(train, model):
    bad = train[["x"]].assign(zz=np.ones(len(train), dtype=complex))
    with pytest.raises(CopulaInputError, match="'zz'.*unsupported dtype"):
        fit_copula(bad)
    with pytest.raises(CopulaInputError, match="not in the table"):
        fit_copula(train, bounds={"nope": (0, 1)})
    with pytest.raises(CopulaInputError, match="categorical column 'ward'"):
        fit_copula(train, bounds={"ward": (0, 1)})
    for n in (0, -3, 2.5):
        with pytest.raises(CopulaInputError, match="positive integer"):
            sample_copula(jax.random.key(0), model, n)
