"""MST differentially private synthesiser (McKenna et al., J Priv Confid 2021)."""

import math

import dp_accounting
import jax
import numpy as np
import pandas as pd
import pytest
from dp_accounting import rdp
from scipy import optimize, stats

from phems_clinical.privacy.fidelity import column_fidelity
from phems_clinical.privacy.secret_rng import new_secret, secret_generator
from phems_clinical.privacy.synth.mst import (
    Categorical,
    MSTInputError,
    Numeric,
    cdp_rho,
    domain_from_frame,
    fit_mst,
    mst_budget,
    mst_input_report,
    sample_mst,
)

N = 2000
DOMAIN = {
    "A": Categorical(("a0", "a1", "a2"), missing=False),
    "B": Categorical((0, 1, 2), missing=False),
    "C": Categorical(("u", "v"), missing=False),
    "x": Numeric(0.0, 100.0, 20),  # 10 % missing: own cell
    "age": Numeric(0, 18, 6, missing=False),
    "flag": Categorical((False, True), missing=False),
}
# Fine order grid so the RDP -> (eps, delta) conversion is tight (dp_accounting's
# conversion is the Canonne-Kamath-Steinke one, minimised over this grid).
ORDERS = list(
    np.concatenate([np.linspace(1.001, 3.0, 2000), np.linspace(3.0, 400.0, 8000)])
)


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    """Chain A -> B -> C (strong), the rest independent of it and each other."""
    rng = np.random.default_rng(6)
    a = rng.choice(3, N, p=[0.5, 0.3, 0.2])
    b = (a + (rng.random(N) < 0.15) * rng.choice([1, 2], N)) % 3
    c = np.where((b == 0) ^ (rng.random(N) < 0.1), "u", "v")
    x = rng.normal(50.0, 12.0, N)
    x[rng.random(N) < 0.1] = np.nan
    return pd.DataFrame(
        {
            "A": np.array(["a0", "a1", "a2"], dtype=object)[a],
            "B": b.astype(np.int64),
            "C": c.astype(object),
            "x": x,
            "age": rng.integers(0, 18, N),
            "flag": rng.random(N) < 0.3,
        }
    )


# The statistical checks below replay kept test secrets, so they never depend on
# a fresh draw of the (secret by design) noise; test_noise_secret_... checks that
# default fits draw fresh noise.
@pytest.fixture(scope="module")
def model_hi(train):
    return fit_mst(
        jax.random.key(1), train, DOMAIN, epsilon=1e6, noise=secret_generator(1)
    )


@pytest.fixture(scope="module")
def model_1(train):
    return fit_mst(
        jax.random.key(2), train, DOMAIN, epsilon=1.0, noise=secret_generator(2)
    )


def _cells(s: pd.Series, spec) -> np.ndarray:
    """Declared cell of each value, computed independently of the module."""
    miss = s.isna().to_numpy()
    if isinstance(spec, Categorical):
        look = {v: i for i, v in enumerate(spec.categories)}
        out = np.array(
            [
                look.get(v, -1) if not m else len(spec.categories)
                for v, m in zip(s, miss, strict=True)
            ]
        )
    else:
        edges = np.linspace(spec.lower, spec.upper, spec.n_bins + 1)
        x = np.clip(s.to_numpy(float, na_value=np.nan), spec.lower, spec.upper)
        out = np.clip(np.digitize(x, edges[1:-1]), 0, spec.n_bins - 1)
        out = np.where(miss, spec.n_bins, out)
    return out


def _n_cells(spec) -> int:
    k = len(spec.categories) if isinstance(spec, Categorical) else spec.n_bins
    return k + int(spec.missing)


def _rho_from_dp_accounting(epsilon: float, delta: float) -> float:
    """rho whose single Gaussian (noise multiplier 1/sqrt(2 rho)) is (eps, delta)."""

    def gap(log_rho):
        acc = rdp.RdpAccountant(orders=ORDERS)
        acc.compose(
            dp_accounting.GaussianDpEvent(1.0 / math.sqrt(2 * math.exp(log_rho)))
        )
        return acc.get_epsilon(delta) - epsilon

    return math.exp(
        optimize.brentq(gap, math.log(epsilon) - 20, math.log(epsilon) + 2, xtol=1e-10)
    )


# ----------------------------------------------------------------- accounting
@pytest.mark.parametrize(
    "epsilon,delta", [(0.1, 1e-9), (1.0, 1e-9), (1.0, 1e-6), (8.0, 1e-5)]
)
def test_cdp_rho_matches_dp_accounting(epsilon, delta):
    rho = cdp_rho(epsilon, delta)
    assert rho == pytest.approx(_rho_from_dp_accounting(epsilon, delta), rel=1e-3)
    # Bun & Steinke 2016 Prop. 1.3 (looser): eps = rho + 2 sqrt(rho log 1/delta)
    rho_std = (
        math.sqrt(math.log(1 / delta) + epsilon) - math.sqrt(math.log(1 / delta))
    ) ** 2
    assert rho_std < rho < epsilon


def _mst_epsilon(d, sigma1, eps_em, sigma2, delta):
    acc = rdp.RdpAccountant(orders=ORDERS)
    acc.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.GaussianDpEvent(sigma1), d
                ),
                dp_accounting.SelfComposedDpEvent(  # EM: eps^2/8-zCDP (Cesar & Rogers 2021)
                    dp_accounting.ZCDpEvent(eps_em**2 / 8), d - 1
                ),
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.GaussianDpEvent(sigma2), d - 1
                ),
            ]
        )
    )
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("d", [2, 6, 15])
def test_budget_split_composes_to_epsilon(d):
    """d Gaussian 1-way + (d-1) exp. mechanisms + (d-1) Gaussian 2-way = (eps, d)."""
    eps, delta = 1.0, 1e-9
    b = mst_budget(eps, delta, d)
    assert _mst_epsilon(
        d, b.sigma_one_way, b.epsilon_select, b.sigma_two_way, delta
    ) == pytest.approx(eps, rel=1e-3)
    # mutation check: dropping the sqrt(d) share of the 1-way noise overspends
    assert (
        _mst_epsilon(
            d, b.sigma_one_way / math.sqrt(d), b.epsilon_select, b.sigma_two_way, delta
        )
        > 1.05 * eps
    )


def test_one_way_noise_matches_analytic_sigma(train, model_1):
    """Noisy 1-way counts minus true counts ~ N(0, sigma^2), sigma = sqrt(3 d / (2
    rho)), rho from dp_accounting: chi-square over all declared cells."""
    d = len(DOMAIN)
    sigma = math.sqrt(3 * d / (2 * _rho_from_dp_accounting(1.0, 1e-9)))
    resid = np.concatenate(
        [
            y - np.bincount(_cells(train[c], DOMAIN[c]), minlength=_n_cells(DOMAIN[c]))
            for c, y in zip(model_1.columns, model_1.one_way, strict=True)
        ]
    )
    k = resid.size
    lo, hi = stats.chi2.ppf([1e-4, 1 - 1e-4], k)
    assert lo < np.sum((resid / sigma) ** 2) < hi
    assert abs(resid.mean()) < 5 * sigma / math.sqrt(k)
    # the test can fail: a sigma without the 1/3 budget share is rejected
    assert np.sum((resid / (sigma / math.sqrt(3))) ** 2) > hi


# ------------------------------------------------------------------- utility
def test_large_epsilon_recovers_chain(model_hi):
    edges = {frozenset(e) for e in model_hi.tree}
    assert {frozenset("AB"), frozenset("BC")} <= edges
    assert frozenset("AC") not in edges
    assert len(edges) == len(DOMAIN) - 1


def test_large_epsilon_marginals_match(train, model_hi):
    syn = sample_mst(jax.random.key(5), model_hi, 20_000)
    m = len(syn)
    margins = [(c,) for c in DOMAIN] + [tuple(e) for e in model_hi.tree]
    for cols in margins:
        sizes = [_n_cells(DOMAIN[c]) for c in cols]
        idx_r = np.ravel_multi_index([_cells(train[c], DOMAIN[c]) for c in cols], sizes)
        idx_s = np.ravel_multi_index([_cells(syn[c], DOMAIN[c]) for c in cols], sizes)
        p = np.bincount(idx_r, minlength=math.prod(sizes)) / N
        o = np.bincount(idx_s, minlength=math.prod(sizes))
        assert o[p == 0].sum() <= 3e-3 * m, cols  # optimiser tolerance
        res = stats.chisquare(o[p > 0], p[p > 0] / p[p > 0].sum() * o[p > 0].sum())
        assert res.pvalue > 1e-6, (cols, res)
    # negative control: the same nodes with independent edges fail the A-B test
    k = [frozenset(e) for e in model_hi.tree].index(frozenset("AB"))
    a, b = model_hi.tree[k]
    ia, ib = model_hi.columns.index(a), model_hi.columns.index(b)
    indep = np.outer(model_hi.nodes[ia], model_hi.nodes[ib])
    broken = model_hi._replace(
        edges=model_hi.edges[:k] + (indep,) + model_hi.edges[k + 1 :]
    )
    bad = sample_mst(jax.random.key(5), broken, 20_000)
    tab_r = pd.crosstab(train[a], train[b]).to_numpy() / N
    tab_b = pd.crosstab(bad[a], bad[b]).to_numpy()
    assert stats.chisquare(tab_b.ravel(), tab_r.ravel() * tab_b.sum()).pvalue < 1e-6
    # and the chain's non-edge A-C dependence comes through the tree
    v_real = stats.contingency.association(pd.crosstab(train.A, train.C).to_numpy())
    v_syn = stats.contingency.association(pd.crosstab(syn.A, syn.C).to_numpy())
    assert v_syn == pytest.approx(v_real, abs=0.05)


def test_sample_types_bounds_and_missing(train, model_hi):
    syn = sample_mst(jax.random.key(6), model_hi, 5000)
    assert list(syn.columns) == list(train.columns)
    assert syn.dtypes.to_dict() == train.dtypes.to_dict()
    assert set(syn.A) <= {"a0", "a1", "a2"} and set(syn.B) <= {0, 1, 2}
    assert syn.age.between(0, 18).all()
    x = syn.x.dropna()
    assert x.between(0, 100).all() and x.nunique() > 1000  # uniform within bins
    assert syn.x.isna().mean() == pytest.approx(train.x.isna().mean(), abs=0.02)


def test_fidelity_at_epsilon_one(train, model_1):
    syn = sample_mst(jax.random.key(7), model_1, N)
    fid = column_fidelity(train, syn).set_index("column")
    tv = fid.loc[fid.metric == "tv", "statistic"]
    assert set(tv.index) == {"A", "C", "flag"}
    assert (tv < 0.05).all(), tv
    assert (fid.loc[fid.metric == "ks", "statistic"] < 0.1).all(), fid
    assert (fid.missing_diff < 0.05).all(), fid
    # negative control: a table drawn uniformly over the domain is far worse
    rng = np.random.default_rng(0)
    bad = syn.copy()
    bad["A"] = rng.choice(["a0", "a1", "a2"], N)
    assert column_fidelity(train, bad).set_index("column").loc["A", "statistic"] > 0.15


def test_noise_secret_sampling_reproducible(train, model_1):
    """The DP noise is not a function of the key (two fits with one key differ);
    a kept secret replays a fit exactly; sampling follows the key."""
    fresh = [
        fit_mst(jax.random.key(2), train, DOMAIN, epsilon=1.0, iters=200)
        for _ in range(2)
    ]
    assert not any(
        np.array_equal(u, v)
        for u, v in zip(fresh[0].one_way, fresh[1].one_way, strict=True)
    )
    assert "CSPRNG" in fresh[0].noise_source
    s = new_secret()
    kept = [
        fit_mst(
            jax.random.key(k),
            train,
            DOMAIN,
            epsilon=1.0,
            iters=200,
            noise=secret_generator(s),
        )
        for k in (0, 1)
    ]
    assert kept[0].tree == kept[1].tree
    for u, v in zip(
        kept[0].one_way + kept[0].edges, kept[1].one_way + kept[1].edges, strict=True
    ):
        np.testing.assert_array_equal(u, v)
    a = sample_mst(jax.random.key(3), model_1, 300)
    pd.testing.assert_frame_equal(a, sample_mst(jax.random.key(3), model_1, 300))
    assert not a.equals(sample_mst(jax.random.key(4), model_1, 300))


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(epsilon=float("inf")), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(epsilon=1.0, delta=0.0), "delta"),
        (dict(epsilon=1.0, delta=1.0), "delta"),
    ],
)
def test_bad_budget(train, kw, match):
    with pytest.raises(MSTInputError, match=match):
        fit_mst(jax.random.key(0), train, DOMAIN, **kw)


def test_bad_tables(train):
    key = jax.random.key(0)
    with pytest.raises(MSTInputError, match=r"without a domain entry \['age'\]"):
        fit_mst(
            key, train, {k: v for k, v in DOMAIN.items() if k != "age"}, epsilon=1.0
        )
    with pytest.raises(MSTInputError, match=r"without a column \['age'\]"):
        fit_mst(key, train.drop(columns="age"), DOMAIN, epsilon=1.0)
    with pytest.raises(MSTInputError, match="3 rows"):
        fit_mst(key, train.head(3), DOMAIN, epsilon=1.0)
    bad = train.copy()
    bad.loc[:4, "A"] = "zz"
    with pytest.raises(MSTInputError, match=r"'A': 5 value\(s\) not in .*zz"):
        fit_mst(key, bad, DOMAIN, epsilon=1.0)
    bad = train.copy()
    bad.loc[:1, "B"] = np.nan
    with pytest.raises(MSTInputError, match=r"'B': 2 missing.*missing=False"):
        fit_mst(key, bad, DOMAIN, epsilon=1.0)
    with pytest.raises(MSTInputError, match="'A'.*Numeric"):
        fit_mst(key, train, {**DOMAIN, "A": Numeric(0, 1, 2)}, epsilon=1.0)
    with pytest.raises(MSTInputError, match="'x'.*n_bins"):
        fit_mst(key, train, {**DOMAIN, "x": Numeric(0, 1, 0)}, epsilon=1.0)
    with pytest.raises(MSTInputError, match="'x'.*lower < upper"):
        fit_mst(key, train, {**DOMAIN, "x": Numeric(5, 1, 3)}, epsilon=1.0)
    with pytest.raises(MSTInputError, match="at least 2 columns"):
        fit_mst(key, train[["A"]], {"A": DOMAIN["A"]}, epsilon=1.0)


def test_clipping_reported_or_refused(train):
    dom = {**DOMAIN, "x": Numeric(40.0, 100.0, 6)}
    rep = mst_input_report(train, dom).set_index("column")
    assert rep.loc["x", "below_lower"] == int((train.x < 40).sum()) > 0
    assert rep.loc["x", "missing"] == int(train.x.isna().sum())
    assert rep.loc["A", "unknown"] == 0
    with pytest.raises(MSTInputError, match=r"'x': \d+ value\(s\) below 40"):
        fit_mst(jax.random.key(0), train, dom, epsilon=1.0, clip=False)


def test_sample_bad_n(model_1):
    with pytest.raises(MSTInputError, match="n must be"):
        sample_mst(jax.random.key(0), model_1, 0)


def test_domain_from_frame(train):
    dom = domain_from_frame(train, n_bins=10)
    assert dom["A"] == Categorical(("a0", "a1", "a2"))
    assert dom["flag"] == Categorical((False, True))
    assert dom["x"] == Numeric(float(train.x.min()), float(train.x.max()), 10)
    assert isinstance(dom["age"], Categorical)  # 18 values <= max_categories
    rep = mst_input_report(train, dom)
    assert (rep[["below_lower", "above_upper", "unknown"]].to_numpy() == 0).all()
