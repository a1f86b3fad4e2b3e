"""Synthetic cardiac pathways (phems_clinical.privacy.synth.pathways).

Statistical comparisons use fixed keys; the bounds are 4 standard errors of the
synthetic-minus-source difference (two-sided nominal failure rate 6e-5 per
comparison if the generator were exact, ~1e-3 over the file), plus a stated
allowance for the piecewise-constant approximation where noted.
"""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.data.cardiac.pathways import COLUMNS, WEIGHT_LOG_SD, episodes
from phems_clinical.data.cardiac.simulate import (
    STATES,
    TRANSITIONS,
    expected_weight_kg,
    simulate_cardiac,
)
from phems_clinical.evaluation import cardiac_eval
from phems_clinical.evaluation.survival import aalen_johansen_multistate
from phems_clinical.models import multistate as ms
from phems_clinical.privacy.synth.pathways import (
    PathwayInputError,
    age_group_of,
    fit_pathways,
    sample_pathways,
)

N = 4000
Z = 4.0
AJ_ALLOWANCE = 0.002


@pytest.fixture(scope="module")
def source():
    return episodes(simulate_cardiac(jax.random.key(0), n_episodes=N).tables)[0]


@pytest.fixture(scope="module")
def model(source):
    return fit_pathways(source)


@pytest.fixture(scope="module")
def synth(model):
    return sample_pathways(jax.random.key(1), model, N)


@pytest.fixture(scope="module")
def censored_source():
    """Data extract 6 months after the last operation: recent episodes are
    censored before 365 days."""
    sim = simulate_cardiac(jax.random.key(2), n_episodes=600, extract_date="2024-07-01")
    return episodes(sim.tables)[0]


def _check_chains(df, followup=365.0):
    """Constraint checks of a sojourn table; returns nothing, asserts."""
    df = df.reset_index(drop=True)
    ep = df.episode_id.to_numpy()
    same = ep[1:] == ep[:-1]
    first = np.r_[True, ~same]
    last = np.r_[~same, True]
    # one block of rows per episode (blocks == episodes), ordered in time
    assert first.sum() == df.episode_id.nunique()
    assert (df.entry.to_numpy()[first] == 0.0).all()
    assert (df.exit >= df.entry).all() and (df.entry >= 0).all()
    assert (df.exit <= followup).all()
    # contiguous: entry = previous exit, state = previous next_state
    assert (df.entry.to_numpy()[1:][same] == df.exit.to_numpy()[:-1][same]).all()
    assert (df.state.to_numpy()[1:][same] == df.next_state.to_numpy()[:-1][same]).all()
    # chains end in DEAD or CENSORED and nothing follows either
    assert df.next_state[last].isin(["DEAD", "CENSORED"]).all()
    assert not df.next_state[~last].isin(["DEAD", "CENSORED"]).any()
    assert not (df.state == "DEAD").any()
    # only model transitions
    idx = {s: i for i, s in enumerate(STATES)}
    ev = df.next_state != "CENSORED"
    pairs = set(zip(df.state[ev].map(idx), df.next_state[ev].map(idx), strict=True))
    assert pairs <= set(TRANSITIONS)


def _ever_died(df):
    o = cardiac_eval.episode_outcomes(df)
    stat = df.groupby("episode_id").stat.first().reindex(o.episode_id).to_numpy()
    return o.death.to_numpy(), stat, o


def _z_mortality_by_stat(src, syn):
    d1, s1, _ = _ever_died(src)
    d2, s2, _ = _ever_died(syn)
    z = {}
    for c in range(1, 6):
        a, b = d1[s1 == c], d2[s2 == c]
        p = (a.sum() + b.sum()) / (a.size + b.size)
        se = np.sqrt(max(p * (1 - p), 1e-12) * (1 / a.size + 1 / b.size))
        z[c] = (b.mean() - a.mean()) / se
    return z


# ---------------------------------------------------------------- reproducibility
def test_same_key_same_table_and_new_key_differs(model):
    a = sample_pathways(jax.random.key(5), model, 200)
    b = sample_pathways(jax.random.key(5), model, 200)
    c = sample_pathways(jax.random.key(6), model, 200)
    pd.testing.assert_frame_equal(a, b)
    assert not a[["entry", "exit"]].equals(c[["entry", "exit"]])


def test_fit_is_deterministic(source, model):
    again = fit_pathways(source)
    np.testing.assert_array_equal(again.rates, model.rates)


# ---------------------------------------------------------------- constraints
def test_columns_dtypes_and_site(source, synth):
    assert list(synth.columns) == COLUMNS
    pd.testing.assert_series_equal(synth.dtypes, source.dtypes)
    assert set(synth.site) == {"hospital_a"}
    assert synth.episode_id.nunique() == N
    assert (synth.groupby("episode_id").person_id.nunique() == 1).all()


def test_chain_constraints(source, synth):
    _check_chains(source)  # the checks accept the real source
    _check_chains(synth)


def test_chain_checks_catch_a_broken_chain(synth):
    """Mutation: a gap between sojourns and an event after death must fail."""
    bad = synth.copy()
    i = int(np.flatnonzero(bad.entry.to_numpy() > 0)[0])
    bad.loc[i, "entry"] += 0.1
    with pytest.raises(AssertionError):
        _check_chains(bad)
    dead = synth[synth.next_state == "DEAD"].index[0]
    extra = synth.loc[[dead]].assign(
        state="HOME", next_state="CENSORED", entry=synth.loc[dead, "exit"], exit=365.0
    )
    bad = pd.concat([synth.loc[:dead], extra, synth.loc[dead + 1 :]], ignore_index=True)
    with pytest.raises(AssertionError):
        _check_chains(bad)


def test_no_real_ids(source, synth, model):
    for c in ("person_id", "episode_id"):
        assert not set(synth[c]) & set(source[c])
        assert synth[c].min() > max(source.person_id.max(), source.episode_id.max())
    assert model.id_start > source[["person_id", "episode_id"]].to_numpy().max()


def test_deterministic_covariates_recomputed(source, synth):
    # our rule reproduces the source's age groups (guards against drift from
    # data.cardiac.pathways.episodes)
    assert (age_group_of(source.age_days) == source.age_group.to_numpy()).all()
    cut = pd.cut(
        synth.age_days,
        [-np.inf, 30, 365, np.inf],
        labels=["neonate", "infant", "child"],
    ).astype(str)
    assert (cut.to_numpy() == synth.age_group.to_numpy()).all()
    wz = np.log(synth.weight_kg / expected_weight_kg(synth.age_days)) / WEIGHT_LOG_SD
    np.testing.assert_allclose(synth.weight_z, wz, rtol=0, atol=1e-12)
    np.testing.assert_allclose(synth.weight_kg, synth.weight_kg.round(2), atol=1e-12)
    assert (synth.weight_kg > 0).all()
    first = synth.groupby("episode_id").first()
    assert set(first.stat) <= {1, 2, 3, 4, 5} and set(first.ventilation) <= {0, 1}
    assert set(first.sex) <= {"M", "F"}
    # covariates constant within an episode
    assert (
        (synth.groupby("episode_id")[["age_days", "stat", "weight_kg"]].nunique() == 1)
        .all()
        .all()
    )


def test_reintervention_as_encoded(source, synth):
    """Reintervention only on a return to CICU or a readmission (as the source
    encodes it), at the source's share within 4 SE."""

    def shares(df):
        prev = df.groupby("episode_id").state.shift()
        into = prev.astype(str) + ">" + df.state
        return df.groupby(into).reintervention.agg(["sum", "size"])

    a, b = shares(source), shares(synth)
    assert set(b.index[b["sum"] > 0]) <= {"WARD>CICU", "HOME>READMIT"}
    for k in ("WARD>CICU", "HOME>READMIT"):
        p1, p2 = a.loc[k, "sum"] / a.loc[k, "size"], b.loc[k, "sum"] / b.loc[k, "size"]
        p = (a.loc[k, "sum"] + b.loc[k, "sum"]) / (a.loc[k, "size"] + b.loc[k, "size"])
        se = np.sqrt(p * (1 - p) * (1 / a.loc[k, "size"] + 1 / b.loc[k, "size"]))
        assert abs(p2 - p1) <= Z * se, (k, p1, p2)


# ---------------------------------------------------------------- fidelity
def test_mortality_by_stat_matches_source(source, synth):
    z = _z_mortality_by_stat(source, synth)
    assert max(abs(v) for v in z.values()) <= Z, z


def test_unstratified_model_fails_mortality_by_stat(source):
    """Negative check: one pooled process loses the STAT gradient."""
    flat = sample_pathways(jax.random.key(1), fit_pathways(source, strata=()), N)
    z = _z_mortality_by_stat(source, flat)
    assert max(abs(v) for v in z.values()) > Z, z
    _check_chains(flat)


def test_mean_first_cicu_stay_matches_source(source, synth):
    a = cardiac_eval.episode_outcomes(source).cicu_days
    b = cardiac_eval.episode_outcomes(synth).cicu_days
    se = np.sqrt(a.var() / a.size + b.var() / b.size)
    assert abs(b.mean() - a.mean()) <= Z * se, (a.mean(), b.mean(), se)


def test_aalen_johansen_occupation_matches_source(source, synth):
    """State occupation at 1, 7, 30, 180 and 360 days: |difference| <= 4 binomial
    SE of the difference + 0.002 (allowance for the piecewise-constant fit; over 8
    other source/sample seeds the largest |difference| was 0.67 x 4 SE)."""
    times = [1.0, 7.0, 30.0, 180.0, 360.0]
    p1 = aalen_johansen_multistate(source, list(STATES), times)
    p2 = aalen_johansen_multistate(synth, list(STATES), times)
    n1, n2 = source.episode_id.nunique(), synth.episode_id.nunique()
    pb = (p1 + p2) / 2
    tol = Z * np.sqrt(pb * (1 - pb) * (1 / n1 + 1 / n2)) + AJ_ALLOWANCE
    assert (np.abs(p2 - p1) <= tol).all(), np.round(p2 - p1, 3)
    np.testing.assert_allclose(p2.sum(1), 1.0, atol=1e-9)


def test_aalen_johansen_detects_doubled_death_rates(source, model):
    """Mutation: the same model with every death intensity doubled must fall
    outside the occupation tolerance (and the mortality bound)."""
    times = [1.0, 7.0, 30.0, 180.0, 360.0]
    K = len(model.transitions)
    dead = [
        k
        for k in range(model.rates.shape[1])
        if model.transitions[k % K][1] == STATES.index("DEAD")
    ]
    rates = model.rates.copy()
    rates[:, dead, :] *= 2.0
    bad = sample_pathways(jax.random.key(1), model._replace(rates=rates), N)
    p1 = aalen_johansen_multistate(source, list(STATES), times)
    p2 = aalen_johansen_multistate(bad, list(STATES), times)
    pb = (p1 + p2) / 2
    tol = Z * np.sqrt(pb * (1 - pb) * (2 / N)) + AJ_ALLOWANCE
    assert (np.abs(p2 - p1) > tol).any()
    assert max(abs(v) for v in _z_mortality_by_stat(source, bad).values()) > Z


def test_early_censoring_reproduced(censored_source):
    src = censored_source
    assert (src.groupby("episode_id").exit.max() < 365 - 1e-6).any()
    syn = sample_pathways(jax.random.key(3), fit_pathways(src), 2000)
    _check_chains(syn)

    def early(df):
        last = df.groupby("episode_id").tail(1)
        return ((last.next_state == "CENSORED") & (last.exit < 365 - 1e-6)).to_numpy()

    a, b = early(src), early(syn)
    p = (a.sum() + b.sum()) / (a.size + b.size)
    se = np.sqrt(p * (1 - p) * (1 / a.size + 1 / b.size))
    assert 0 < b.mean() and abs(b.mean() - a.mean()) <= Z * se


# ---------------------------------------------------------------- estimator
def test_occurrence_exposure_hand_worked():
    """Ten episodes: CICU [0, 0.25) then WARD [0.25, 0.75) then HOME to 365 days,
    two of them die in CICU at 0.25 instead. Piece [0, 0.5): CICU->WARD 8 events
    / 2.5 days = 3.2/day, CICU->DEAD 2 / 2.5 = 0.8/day; piece [0.5, 1): WARD->HOME
    8 / (8 x 0.25) = 4/day; unstratified, so shrinkage leaves them unchanged."""
    rows = []
    for i in range(10):
        cov = dict(
            site="s",
            person_id=i + 1,
            episode_id=100 + i,
            surgery_datetime=pd.Timestamp("2022-01-01") + pd.Timedelta(days=i),
            age_days=100.0 + i,
            age_group="infant",
            sex="MF"[i % 2],
            weight_kg=6.0,
            weight_z=0.0,
            stat=1 + i % 5,
            ventilation=i % 2,
        )
        if i < 2:
            rows.append(
                dict(
                    cov,
                    state="CICU",
                    entry=0.0,
                    exit=0.25,
                    next_state="DEAD",
                    reintervention=0,
                )
            )
            continue
        rows += [
            dict(
                cov,
                state="CICU",
                entry=0.0,
                exit=0.25,
                next_state="WARD",
                reintervention=0,
            ),
            dict(
                cov,
                state="WARD",
                entry=0.25,
                exit=0.75,
                next_state="HOME",
                reintervention=0,
            ),
            dict(
                cov,
                state="HOME",
                entry=0.75,
                exit=365.0,
                next_state="CENSORED",
                reintervention=0,
            ),
        ]
    df = pd.DataFrame(rows)[COLUMNS]
    m = fit_pathways(df, strata=(), repeat_visits=False)
    k = {t: i for i, t in enumerate(m.transitions)}
    r = m.rates[0]
    assert r[k[(0, 1)], 0] == pytest.approx(3.2)
    assert r[k[(0, 4)], 0] == pytest.approx(0.8)
    assert r[k[(1, 2)], 1] == pytest.approx(4.0)
    assert r[k[(1, 2)], 0] == 0.0 and r[k[(2, 3)]].sum() == 0.0
    np.testing.assert_allclose(m.rates[0], m.pooled_rates)
    assert m.censor_rates.sum() == 0.0
    out = sample_pathways(jax.random.key(0), m, 300)
    _check_chains(out)
    # no HOME->READMIT in the source, so none in the synthetic pathways
    assert not (out.state == "READMIT").any()


def test_counts_agree_with_multistate_design(source):
    """Independent implementation: the pooled events and exposures equal
    models.multistate's sufficient statistics (same grid via spec=)."""
    m = fit_pathways(source, spec=ms.DEFAULT_SPEC, repeat_visits=False)
    D, E = ms.sufficient_totals(ms.site_examples(source), ms.DEFAULT_SPEC)
    np.testing.assert_allclose(m.events.sum(0), np.asarray(D), rtol=0, atol=1e-9)
    np.testing.assert_allclose(m.exposure.sum(0), np.asarray(E), rtol=1e-12, atol=1e-9)


def test_sparse_stratum_shrinks_to_prior(source):
    """A stratum cell without exposure gets the prior mean r x RR; with no prior
    (prior_episodes=0) a cell with exposure is the raw occurrence/exposure."""
    m = fit_pathways(source, prior_episodes=0.0, repeat_visits=False)
    D, E = m.events, m.exposure
    raw = np.divide(D, E, out=np.zeros_like(D), where=E > 0)
    np.testing.assert_allclose(m.rates[:-1][E > 0], raw[E > 0], rtol=1e-12)
    m5 = fit_pathways(source, repeat_visits=False)
    zero = m5.exposure == 0
    assert zero.any()
    rr = (D.sum(-1) + 1.0) / ((E * m5.pooled_rates[None]).sum(-1) + 1.0)
    mu = m5.pooled_rates[None] * rr[:, :, None]
    np.testing.assert_allclose(m5.rates[:-1][zero], mu[zero], rtol=1e-12)


# ---------------------------------------------------------------- downstream
def test_downstream_consumers_run_unchanged(source, synth):
    ex = ms.site_examples(synth)
    assert ex.data["x"].shape == (N, len(ms.COVARIATES))
    params = ms.init_params(None, ms.DEFAULT_SPEC, ms.site_examples(source))
    res = cardiac_eval.evaluate(params, synth.iloc[:2000].reset_index(drop=True))
    assert res["n"] == synth.iloc[:2000].episode_id.nunique()
    assert np.isfinite(res["c_death"])


# ---------------------------------------------------------------- bad input
def test_refuses_three_episodes(source):
    tiny = source[source.episode_id.isin(source.episode_id.unique()[:3])]
    with pytest.raises(PathwayInputError, match="3 episodes.*min_episodes=10"):
        fit_pathways(tiny)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.drop(columns=["stat", "exit"]), r"missing.*\['exit', 'stat'\]"),
        (lambda d: d.assign(state=d.state.replace("WARD", "PICU")), "unknown.*PICU"),
        (
            lambda d: d.assign(next_state=d.next_state.replace("HOME", "Home")),
            "next_state.*Home",
        ),
        (lambda d: d.assign(exit=d.exit + 400.0), "followup_days"),
        (lambda d: d.assign(exit=d.entry - 1.0), "entry/exit"),
    ],
)
def test_bad_tables_named(source, mutate, match):
    with pytest.raises(PathwayInputError, match=match):
        fit_pathways(mutate(source.copy()))


def test_bad_options_named(source, model):
    with pytest.raises(PathwayInputError, match="strata.*'hospital'"):
        fit_pathways(source, strata=("hospital",))
    with pytest.raises(PathwayInputError, match="grid"):
        fit_pathways(source, grid=(1.0, 2.0))
    with pytest.raises(PathwayInputError, match="transitions"):
        fit_pathways(source, transitions=TRANSITIONS[1:])
    with pytest.raises(PathwayInputError, match="n_episodes"):
        sample_pathways(jax.random.key(0), model, 0)
    with pytest.raises(PathwayInputError, match="DataFrame"):
        fit_pathways(source.to_numpy())
    with pytest.raises(PathwayInputError, match="'age_days'.*levels"):
        fit_pathways(source, strata=("stat", "age_days"))


def test_unseen_stratum_uses_unstratified_rates(source):
    """No STAT 3 in the source: the integer copula may still interpolate a 3;
    such episodes get the unstratified row and valid chains."""
    src = source[source.stat != 3]
    m = fit_pathways(src)
    assert 3 not in m.levels[0]
    out = sample_pathways(jax.random.key(4), m, 20000)
    assert (out.stat == 3).any()  # the fallback row was exercised
    _check_chains(out)
