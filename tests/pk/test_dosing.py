"""Regimen design and per-draw summaries against brute-force and analytic references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phems_clinical.data.cohort import stack_subjects
from phems_clinical.pk.analytic import concentration, steady_state
from phems_clinical.pk.dosing import (
    default_intervals,
    detect_regimen,
    future_kappa,
    minimal_dose,
    recommend,
    round_down_to_vials,
    round_to_vials,
    steady_state_schedule,
    time_above_per_week,
    trough_probability,
    validated_range,
    vial_combination,
)
from phems_clinical.pk.forecast import fit_map, laplace_draws
from phems_clinical.pk.library import load_product
from phems_clinical.pk.model import individual_parameters, initial_params


def _subject(
    model,
    cov,
    times=(4.0, 24.0, 48.0),
    dv=(40.2, 10.1, 1.5),
    dose=1000.0,
    dur=0.0,
    dose_times=(0.0,),
):
    n, m = len(times), len(dose_times)
    row = dict(
        dose_time=list(dose_times),
        dose_amt=[dose] * m,
        dose_dur=[dur] * m,
        dose_occ=[0] * m,
        obs_time=list(times),
        obs_dv=list(dv),
        obs_blq=[False] * n,
        obs_lloq=[0.0] * n,
        obs_occ=[0] * n,
        covariates=list(cov),
    )
    return jax.tree.map(lambda x: x[0], stack_subjects([row], n_obs=4))


@pytest.mark.parametrize(
    "sizes", [(250, 500, 1000), (500, 1000), (250, 750, 2000), (1000,)]
)
def test_round_to_vials_is_the_smallest_combination(sizes):
    combos = sorted(
        {
            sum(c)
            for r in range(1, 9)
            for c in itertools.combinations_with_replacement(sizes, r)
        }
    )
    for dose in [1.0, 249.0, 250.0, 251.0, 760.0, 1130.0, 1999.0, 3333.0]:
        expected = min(c for c in combos if c >= dose)
        assert round_to_vials(dose, sizes) == expected


def test_detect_regimen():
    assert detect_regimen(np.array([0.0, 48, 96, 144]), np.full(4, 1000.0)) == (
        48.0,
        1000.0,
    )
    assert detect_regimen(np.array([0.0, 48]), np.full(2, 1000.0)) is None
    assert detect_regimen(np.array([0.0, 24, 96]), np.full(3, 1000.0)) is None
    assert (
        detect_regimen(np.array([0.0, 48, 96]), np.array([1000.0, 500, 1000])) is None
    )


def test_intervals_and_validated_range():
    assert default_intervals(load_product("advate")) == (24.0, 48.0, 72.0)
    assert max(default_intervals(load_product("alprolix"))) == 168.0
    assert max(default_intervals(load_product("eloctate"))) == 168.0
    rng = validated_range(load_product("advate"))
    assert rng["AGE"] == (1, 65)
    lo, hi = rng["WT"]
    assert 5.0 < lo < 9.6 < 81.0 < hi < 130.0  # around the 1 y and adult medians


@pytest.mark.parametrize("product,tau", [("advate", 48.0), ("alprolix", 168.0)])
def test_regimen_dose_rule_by_superposition(product, tau, key):
    """The dose reaches P(trough >= target) >= 0.9 by brute force (300 doses
    superposed) and the next smaller vial total does not."""
    model = load_product(product)
    params = initial_params(model)
    cov = [30.0, 10.0] if product == "advate" else [30.0]
    dv = (40.2, 10.1, 1.5) if product == "advate" else (30.0, 8.0, 3.0)
    times = (4.0, 24.0, 48.0) if product == "advate" else (4.0, 72.0, 168.0)
    subject = _subject(model, cov, times, dv, dose=1500.0, dur=0.2)
    draws = laplace_draws(key, fit_map(model, params, subject), 400)
    vials = tuple(model.metadata["vial_sizes_IU"])
    rec = recommend(
        key,
        model,
        params,
        subject,
        draws,
        n_occ=1,
        weight_kg=30.0,
        targets=(1.0, 3.0),
        intervals=(tau,),
        vial_sizes=vials,
    )

    k_future = jax.random.normal(key, (400, model.n_kappa))  # no IOV here
    assert model.n_kappa == 0 and k_future.shape[1] == 0
    n_eta = model.n_eta
    own = jax.vmap(
        lambda b: individual_parameters(
            model, params.theta, b[:n_eta], jnp.zeros((1, 0)), subject.covariates
        )[0]
    )(draws)

    def p_trough(dose, target):
        starts = jnp.arange(300) * tau

        def trough(p):
            return concentration(
                starts[-1:] + tau - 1e-9,
                starts,
                jnp.full(300, dose),
                jnp.full(300, 0.2),
                p,
                model.n_cmt,
            )[0]

        return float(np.mean(np.asarray(jax.vmap(trough)(own)) >= target))

    reachable = [r for r in rec.regimens if math.isfinite(r.dose_IU)]
    assert reachable
    for r in reachable:
        assert p_trough(r.dose_IU, r.target_IU_dL) >= 0.9
        assert p_trough(r.dose_IU, r.target_IU_dL) == pytest.approx(
            r.trough_prob, abs=1e-9
        )
        smaller = [round_to_vials(d, vials) for d in np.arange(1.0, r.dose_IU, 25.0)]
        below = max([s for s in smaller if s < r.dose_IU], default=None)
        if below is not None:
            assert p_trough(below, r.target_IU_dL) < 0.9
        # hours below target per week: a fine grid over the steady-state interval
        starts = jnp.arange(300) * tau
        grid = starts[-1] + jnp.linspace(0.2, tau, 4001)
        level = concentration(
            grid,
            starts,
            jnp.full(300, r.dose_IU),
            jnp.full(300, 0.2),
            own[0],
            model.n_cmt,
        )
        frac = float(np.mean(np.asarray(level) < r.target_IU_dL)) * (tau - 0.2) / tau
        assert r.hours_below_target_per_week[0] == pytest.approx(
            168 * frac, abs=168 * 2e-3
        )


def test_time_to_threshold_one_compartment_analytic(key):
    """Jivi is one-compartment: t(x) = ln(D / (V x)) V / CL after a bolus."""
    model = load_product("jivi")
    params = initial_params(model)
    cov = [40.0, 100.0]  # LBW, VWF
    subject = _subject(model, cov, times=(4.0, 48.0), dv=(60.0, 15.0), dose=2000.0)
    draws = laplace_draws(key, fit_map(model, params, subject), 50)
    rec = recommend(
        key,
        model,
        params,
        subject,
        draws,
        n_occ=1,
        weight_kg=50.0,
        thresholds=(1.0, 5.0),
        standard_dose_IU_kg=50.0,
    )
    cl, v = rec.parameters["clearance"], rec.parameters["v1"]
    for x in (1.0, 5.0):
        np.testing.assert_allclose(
            rec.time_to_threshold[x], np.log(2000.0 / (v * x)) * v / cl, rtol=1e-8
        )
        np.testing.assert_allclose(
            rec.time_to_threshold_standard[x],
            np.log(2500.0 / (v * x)) * v / cl,
            rtol=1e-8,
        )
    np.testing.assert_allclose(
        rec.parameters["terminal_half_life"], np.log(2) * v / cl, rtol=1e-12
    )
    np.testing.assert_allclose(rec.parameters["incremental_recovery"], 50.0 / v)


def test_current_regimen_probability(key):
    """Three 1000 IU doses every 48 h: the trough probability is that of the
    steady state of this regimen, by superposition."""
    model = load_product("advate")
    params = initial_params(model)
    subject = _subject(
        model,
        [30.0, 10.0],
        times=(100.0, 140.0),
        dv=(30.0, 2.0),
        dose_times=(0.0, 48.0, 96.0),
    )
    draws = laplace_draws(key, fit_map(model, params, subject), 300)
    rec = recommend(
        key, model, params, subject, draws, n_occ=1, weight_kg=30.0, targets=(1.0, 2.0)
    )
    assert rec.current_regimen == (48.0, 1000.0)
    own = jax.vmap(
        lambda b: individual_parameters(
            model, params.theta, b, jnp.zeros((1, 0)), subject.covariates
        )[0]
    )(draws)
    starts = jnp.arange(300) * 48.0
    troughs = jax.vmap(
        lambda p: concentration(
            starts[-1:] + 48.0 - 1e-9,
            starts,
            jnp.full(300, 1000.0),
            jnp.zeros(300),
            p,
            2,
        )[0]
    )(own)
    for t in (1.0, 2.0):
        assert rec.current_trough_prob[t] == pytest.approx(
            float(np.mean(np.asarray(troughs) >= t)), abs=1e-9
        )


# --------------------------------------------------------------------------------
# steady state of any schedule: fixed interval and weekdays

# (CL, V1[, Q2, V2[, Q3, V3]]) in dL/h and dL: a 1-compartment FVIII-like patient, a
# 2-compartment one (Kovaltry-like), an extended half-life one with a slow
# peripheral exchange, and a 3-compartment one
_PATIENTS = [
    (1, [2.0, 40.0]),
    (2, [1.9, 30.0, 1.9, 6.4]),
    (2, [1.2, 35.0, 0.4, 12.0]),
    (3, [2.0, 30.0, 1.5, 10.0, 0.3, 15.0]),
]


def _brute_week(p, n_cmt, offsets, period, dur, n_periods, step=0.005):
    """The last period of ``n_periods`` repetitions of the pattern, summed dose by
    dose (:func:`concentration`), on a grid of ``step`` h: (t, level per IU)."""
    starts = (np.arange(n_periods)[:, None] * period + np.asarray(offsets)).ravel()
    t = (n_periods - 1) * period + np.arange(0.0, period + step / 2, step)
    level = concentration(
        jnp.asarray(t),
        jnp.asarray(starts),
        jnp.ones(starts.size),
        jnp.full(starts.size, dur),
        jnp.asarray(p),
        n_cmt,
    )
    return t, np.asarray(level)


_MWF, _MON_THU = (0.0, 48.0, 96.0), (0.0, 72.0)


@pytest.mark.parametrize(
    "patient,offsets,period,dur",
    [
        (0, _MWF, 168.0, 0.25),  # 15 min infusions
        (1, _MON_THU, 168.0, 0.0),  # bolus
        (2, (24.0, 96.0, 120.0, 144.0), 168.0, 1.0),  # Tue/Fri/Sat/Sun
        (3, _MWF, 168.0, 0.25),
        (1, (0.0,), 48.0, 0.5),  # every 48 h
        (2, (0.0,), 168.0, 0.0),  # weekly
    ],
)
def test_schedule_steady_state_by_superposition(patient, offsets, period, dur):
    """Trough, peak and hours above levels at steady state against 20 weeks of
    repeated infusions summed dose by dose (last period, 0.005 h grid)."""
    n_cmt, p = _PATIENTS[patient]
    ss = steady_state_schedule(jnp.asarray([p]), n_cmt, offsets, period, dur)
    n_periods = int(np.ceil(20 * 168 / period))
    t, level = _brute_week(p, n_cmt, offsets, period, dur, n_periods)
    starts = (np.arange(n_periods)[:, None] * period + np.asarray(offsets)).ravel()
    pre = np.asarray(
        concentration(
            jnp.asarray(t[0] + np.asarray(offsets) - 1e-9),
            jnp.asarray(starts),
            jnp.ones(starts.size),
            jnp.full(starts.size, dur),
            jnp.asarray(p),
            n_cmt,
        )
    )
    assert ss.trough_per_IU[0] == pytest.approx(level.min(), rel=1e-6)
    assert ss.trough_per_IU[0] == pytest.approx(pre.min(), rel=1e-6)
    assert ss.peak_per_IU[0] == pytest.approx(level.max(), rel=1e-6)
    dose, base = 1000.0, 0.5
    levels = base + dose * np.array(
        [
            0.5 * level.min(),
            1.01 * level.min(),
            np.median(level),
            0.3 * level.max(),
            0.9 * level.max(),
            1.1 * level.max(),
        ]
    )
    above = time_above_per_week(ss, dose, base, levels)[0]
    on_grid = np.array([np.mean(base + dose * level[:-1] >= x) for x in levels])
    # a grid count errs by at most one step per crossing
    np.testing.assert_allclose(above, on_grid * 168.0, atol=0.03)
    assert above[0] == 168.0 and above[-1] == 0.0


@pytest.mark.parametrize("n_cmt,p", _PATIENTS)
def test_fixed_interval_is_the_closed_form(n_cmt, p):
    """A one-infusion pattern is :func:`steady_state` (trough at tau, peak at the
    end of the infusion)."""
    for tau, dur in [(24.0, 0.0), (72.0, 0.3), (168.0, 2.0)]:
        ss = steady_state_schedule(jnp.asarray([p]), n_cmt, [0.0], tau, dur)
        assert ss.trough_per_IU[0] == pytest.approx(
            float(steady_state(tau, tau, 1.0, dur, jnp.asarray(p), n_cmt)), rel=1e-12
        )
        assert ss.peak_per_IU[0] == pytest.approx(
            float(steady_state(dur, tau, 1.0, dur, jnp.asarray(p), n_cmt)), rel=1e-12
        )


def test_one_compartment_time_above_analytic():
    """1 compartment, bolus every tau: the level is ``C0 exp(-k t)`` with ``C0 =
    D/V / (1 - exp(-k tau))``, above ``x`` for ``ln(C0/x)/k`` h of each interval."""
    cl, v, tau, dose = 2.0, 40.0, 48.0, 1000.0
    k = cl / v
    ss = steady_state_schedule(jnp.asarray([[cl, v]]), 1, [0.0], tau, 0.0)
    c0 = dose / v / -math.expm1(-k * tau)
    xs = np.array([2.0, 5.0, 10.0, 20.0])
    expected = np.clip(np.log(c0 / xs) / k, 0.0, tau) * 168.0 / tau
    np.testing.assert_allclose(
        time_above_per_week(ss, dose, 0.0, xs)[0], expected, rtol=1e-10
    )


def test_pattern_checks():
    p = jnp.asarray([[2.0, 40.0]])
    with pytest.raises(ValueError, match="infusion duration"):
        steady_state_schedule(p, 1, [0.0, 24.0], 168.0, 24.0)
    with pytest.raises(ValueError, match="ascending"):
        steady_state_schedule(p, 1, [48.0, 0.0], 168.0, 0.1)
    with pytest.raises(ValueError, match="period"):
        steady_state_schedule(p, 1, [0.0], float("nan"), 0.1)


def test_minimal_dose_meets_the_probability_exactly():
    """At the quantile dose P(trough >= target) >= p; just below it P < p, also
    where a linear-interpolation quantile would fall short (n = 10, p = 0.95)."""
    rng = np.random.default_rng(1)
    for n, prob in [(10, 0.95), (400, 0.9), (1000, 0.9), (37, 0.5)]:
        params = np.column_stack(
            [rng.lognormal(np.log(2.0), 0.3, n), rng.lognormal(np.log(40.0), 0.1, n)]
        )
        ss = steady_state_schedule(jnp.asarray(params), 1, [0.0], 48.0, 0.2)
        d = minimal_dose(ss, 1.0, 0.2, prob)
        troughs = 0.2 + d * ss.trough_per_IU
        assert np.mean(troughs >= 1.0 - 1e-12) >= prob
        assert np.mean(0.2 + d * (1 - 1e-9) * ss.trough_per_IU >= 1.0) < prob
        assert trough_probability(ss, d * 1.001, 0.2, 1.0) >= prob


@pytest.mark.parametrize(
    "sizes",
    [
        (250, 500, 1000),
        (250, 500, 1000, 2000, 3000),
        (500, 750, 1000),
        (250, 1500),
        (1000,),
    ],
)
def test_vial_combination_fewest_vials(sizes):
    """Brute force over up to 8 vials: the smallest total at or above the dose,
    made of as few vials as that total allows."""
    combos = {}
    for r in range(1, 9):
        for c in itertools.combinations_with_replacement(sizes, r):
            combos.setdefault(sum(c), r)
    for dose in [1.0, 250.0, 260.0, 1130.0, 1500.0, 2250.0, 3333.0, 4750.0]:
        total = min(t for t in combos if t >= dose)
        got = vial_combination(dose, sizes)
        assert sum(s * c for s, c in got) == total
        assert sum(c for _, c in got) == combos[total]
        below = [t for t in combos if t <= dose]
        if below:
            assert round_down_to_vials(dose, sizes) == max(below)
        else:
            assert math.isnan(round_down_to_vials(dose, sizes))


def test_future_kappa_covariance(key):
    """Future-occasion IOV draws have the given covariance (correlated block), and
    variances give the same draws as their diagonal matrix."""
    om = np.array([[0.04, 0.024], [0.024, 0.09]])
    k = np.asarray(future_kappa(key, om, 40000, 2))
    np.testing.assert_allclose(np.cov(k.T), om, atol=0.004)
    np.testing.assert_array_equal(
        np.asarray(future_kappa(key, np.array([0.04, 0.09]), 5, 2)),
        np.asarray(future_kappa(key, np.diag([0.04, 0.09]), 5, 2)),
    )
    assert future_kappa(key, np.zeros((0, 0)), 5, 0).shape == (5, 0)
