"""Regimen design and per-draw summaries against brute-force and analytic references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phems_clinical.data.cohort import stack_subjects
from phems_clinical.pk.analytic import concentration
from phems_clinical.pk.dosing import (
    default_intervals,
    detect_regimen,
    recommend,
    round_to_vials,
    validated_range,
)
from phems_clinical.pk.forecast import fit_map, laplace_draws
from phems_clinical.pk.library import load_product
from phems_clinical.pk.model import individual_parameters, initial_params


def _subject(model, cov, times=(4.0, 24.0, 48.0), dv=(40.2, 10.1, 1.5), dose=1000.0,
             dur=0.0, dose_times=(0.0,)):
    n, m = len(times), len(dose_times)
    row = dict(dose_time=list(dose_times), dose_amt=[dose] * m, dose_dur=[dur] * m,
               dose_occ=[0] * m, obs_time=list(times), obs_dv=list(dv),
               obs_blq=[False] * n, obs_lloq=[0.0] * n, obs_occ=[0] * n,
               covariates=list(cov))
    return jax.tree.map(lambda x: x[0], stack_subjects([row], n_obs=4))


@pytest.mark.parametrize("sizes", [(250, 500, 1000), (500, 1000), (250, 750, 2000),
                                   (1000,)])
def test_round_to_vials_is_the_smallest_combination(sizes):
    combos = sorted({sum(c) for r in range(1, 9)
                     for c in itertools.combinations_with_replacement(sizes, r)})
    for dose in [1.0, 249.0, 250.0, 251.0, 760.0, 1130.0, 1999.0, 3333.0]:
        expected = min(c for c in combos if c >= dose)
        assert round_to_vials(dose, sizes) == expected


def test_detect_regimen():
    assert detect_regimen(np.array([0.0, 48, 96, 144]), np.full(4, 1000.0)) == \
        (48.0, 1000.0)
    assert detect_regimen(np.array([0.0, 48]), np.full(2, 1000.0)) is None
    assert detect_regimen(np.array([0.0, 24, 96]), np.full(3, 1000.0)) is None
    assert detect_regimen(np.array([0.0, 48, 96]), np.array([1000.0, 500, 1000])) \
        is None


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
    rec = recommend(key, model, params, subject, draws, n_occ=1, weight_kg=30.0,
                    targets=(1.0, 3.0), intervals=(tau,), vial_sizes=vials)

    k_future = jax.random.normal(key, (400, model.n_kappa))  # no IOV here
    assert model.n_kappa == 0 and k_future.shape[1] == 0
    n_eta = model.n_eta
    own = jax.vmap(lambda b: individual_parameters(
        model, params.theta, b[:n_eta], jnp.zeros((1, 0)), subject.covariates)[0]
    )(draws)

    def p_trough(dose, target):
        starts = jnp.arange(300) * tau

        def trough(p):
            return concentration(starts[-1:] + tau - 1e-9, starts, jnp.full(300, dose),
                                 jnp.full(300, 0.2), p, model.n_cmt)[0]
        return float(np.mean(np.asarray(jax.vmap(trough)(own)) >= target))

    reachable = [r for r in rec.regimens if math.isfinite(r.dose_IU)]
    assert reachable
    for r in reachable:
        assert p_trough(r.dose_IU, r.target_IU_dL) >= 0.9
        assert p_trough(r.dose_IU, r.target_IU_dL) == pytest.approx(r.trough_prob,
                                                                     abs=1e-9)
        smaller = [round_to_vials(d, vials) for d in np.arange(1.0, r.dose_IU, 25.0)]
        below = max([s for s in smaller if s < r.dose_IU], default=None)
        if below is not None:
            assert p_trough(below, r.target_IU_dL) < 0.9
        # hours below target per week: a fine grid over the steady-state interval
        starts = jnp.arange(300) * tau
        grid = starts[-1] + jnp.linspace(0.2, tau, 4001)
        level = concentration(grid, starts, jnp.full(300, r.dose_IU),
                              jnp.full(300, 0.2), own[0], model.n_cmt)
        frac = float(np.mean(np.asarray(level) < r.target_IU_dL)) * (tau - 0.2) / tau
        assert r.hours_below_target_per_week[0] == pytest.approx(168 * frac,
                                                                 abs=168 * 2e-3)


def test_time_to_threshold_one_compartment_analytic(key):
    """Jivi is one-compartment: t(x) = ln(D / (V x)) V / CL after a bolus."""
    model = load_product("jivi")
    params = initial_params(model)
    cov = [40.0, 100.0]  # LBW, VWF
    subject = _subject(model, cov, times=(4.0, 48.0), dv=(60.0, 15.0), dose=2000.0)
    draws = laplace_draws(key, fit_map(model, params, subject), 50)
    rec = recommend(key, model, params, subject, draws, n_occ=1, weight_kg=50.0,
                    thresholds=(1.0, 5.0), standard_dose_IU_kg=50.0)
    cl, v = rec.parameters["clearance"], rec.parameters["v1"]
    for x in (1.0, 5.0):
        np.testing.assert_allclose(rec.time_to_threshold[x],
                                   np.log(2000.0 / (v * x)) * v / cl, rtol=1e-8)
        np.testing.assert_allclose(rec.time_to_threshold_standard[x],
                                   np.log(2500.0 / (v * x)) * v / cl, rtol=1e-8)
    np.testing.assert_allclose(rec.parameters["terminal_half_life"],
                               np.log(2) * v / cl, rtol=1e-12)
    np.testing.assert_allclose(rec.parameters["incremental_recovery"], 50.0 / v)


def test_current_regimen_probability(key):
    """Three 1000 IU doses every 48 h: the trough probability is that of the
    steady state of this regimen, by superposition."""
    model = load_product("advate")
    params = initial_params(model)
    subject = _subject(model, [30.0, 10.0], times=(100.0, 140.0), dv=(30.0, 2.0),
                       dose_times=(0.0, 48.0, 96.0))
    draws = laplace_draws(key, fit_map(model, params, subject), 300)
    rec = recommend(key, model, params, subject, draws, n_occ=1, weight_kg=30.0,
                    targets=(1.0, 2.0))
    assert rec.current_regimen == (48.0, 1000.0)
    own = jax.vmap(lambda b: individual_parameters(
        model, params.theta, b, jnp.zeros((1, 0)), subject.covariates)[0])(draws)
    starts = jnp.arange(300) * 48.0
    troughs = jax.vmap(lambda p: concentration(
        starts[-1:] + 48.0 - 1e-9, starts, jnp.full(300, 1000.0), jnp.zeros(300), p,
        2)[0])(own)
    for t in (1.0, 2.0):
        assert rec.current_trough_prob[t] == pytest.approx(
            float(np.mean(np.asarray(troughs) >= t)), abs=1e-9)
