"""Closed-form mammillary PK against a stiff ODE solver, the eigendecomposition, and
the JAX transformations it must survive (vmap, jit, grad with bolus/padding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from phems_clinical.pk import spec
from phems_clinical.pk.analytic import (
    PARAM_NAMES,
    concentration,
    dose_response,
    macro_constants,
    macro_constants_eigh,
    macro_response_slope,
)

N_DOSE = 6  # histories are padded to this many doses (amt == 0), one compiled shape
N_OBS = 40
ODE_RTOL = 1e-6  # vs LSODA at rtol 1e-12; observed max 1e-8, the ODE global error
# jitted once per n_cmt at module level: eager dispatch would dominate the run time
conc = jax.jit(concentration, static_argnames="n_cmt")
response = jax.jit(dose_response, static_argnames="n_cmt")
RANGES = {  # log-uniform, plausible FVIII/FIX values
    "CL": (0.5, 5.0),
    "V1": (10.0, 80.0),
    "Q2": (0.05, 40.0),
    "V2": (3.0, 100.0),
    "Q3": (0.05, 40.0),
    "V3": (3.0, 100.0),
}


def random_params(rng, n_cmt, size=None):
    names = PARAM_NAMES[n_cmt]
    shape = (() if size is None else (size,)) + (len(names),)
    lo = np.log([RANGES[n][0] for n in names])
    hi = np.log([RANGES[n][1] for n in names])
    return np.exp(rng.uniform(lo, hi, shape))


def random_history(rng):
    """1-6 doses (boluses and 0.01-4 h infusions, some overlapping), padded."""
    n = int(rng.integers(1, N_DOSE + 1))
    time = np.empty(n)
    dur = np.where(
        rng.random(n) < 0.4, 0.0, np.exp(rng.uniform(np.log(0.01), np.log(4.0), n))
    )
    amt = rng.uniform(250.0, 5000.0, n)
    time[0] = rng.uniform(0.0, 5.0)
    for i in range(1, n):
        if dur[i - 1] > 0 and rng.random() < 0.4:
            time[i] = time[i - 1] + rng.uniform(0.0, dur[i - 1])  # overlap
        else:
            time[i] = time[i - 1] + rng.uniform(0.5, 30.0)
    pad = N_DOSE - n
    return (
        np.concatenate([time, np.zeros(pad)]),
        np.concatenate([amt, np.zeros(pad)]),
        np.concatenate([dur, np.zeros(pad)]),
    )


def ode_central(params, n_cmt, t_obs, dose_time, dose_amt, dose_dur):
    """Central level from the amount ODEs, integrated piecewise between dose events."""
    cl, v1 = params[0], params[1]
    q, v = params[2::2], params[3::2]
    k = np.zeros((n_cmt, n_cmt))
    k[0, 0] = -(cl + q.sum()) / v1
    k[0, 1:] = q / v
    k[1:, 0] = q / v1
    k[np.arange(1, n_cmt), np.arange(1, n_cmt)] = -q / v
    real = dose_amt > 0
    dose_time, dose_amt, dose_dur = dose_time[real], dose_amt[real], dose_dur[real]
    infusion = dose_dur > 0
    events = np.unique(
        np.concatenate(
            [dose_time, dose_time[infusion] + dose_dur[infusion], [t_obs.max() + 1.0]]
        )
    )
    out = np.zeros_like(t_obs)
    state = np.zeros(n_cmt)
    for t_a, t_b in zip(events[:-1], events[1:], strict=True):
        state[0] += dose_amt[(dose_time == t_a) & ~infusion].sum()
        running = infusion & (dose_time <= t_a) & (dose_time + dose_dur > t_a)
        rate = np.zeros(n_cmt)
        rate[0] = (dose_amt[running] / dose_dur[running]).sum()
        at = (t_obs >= t_a) & (t_obs < t_b)
        sol = solve_ivp(
            lambda _, a, r=rate: k @ a + r,
            (t_a, t_b),
            state,
            method="LSODA",
            jac=lambda *_: k,
            t_eval=np.append(t_obs[at], t_b),
            rtol=1e-12,
            atol=1e-14,
        )
        assert sol.success, sol.message
        out[at] = sol.y[0, :-1] / v1
        state = sol.y[:, -1]
    return out


@pytest.mark.parametrize("n_cmt", [1, 2, 3])
def test_matches_ode(n_cmt):
    rng = np.random.default_rng(20240 + n_cmt)
    for _ in range(20):
        params = random_params(rng, n_cmt)
        history = random_history(rng)
        baseline = rng.uniform(0.0, 2.0)
        last = history[0][history[1] > 0].max()
        t_obs = np.sort(rng.uniform(0.0, last + 150.0, N_OBS))
        ref = ode_central(params, n_cmt, t_obs, *history)
        got = np.asarray(conc(t_obs, *history, params, n_cmt, baseline)) - baseline
        positive = ref > 1e-8
        np.testing.assert_allclose(got[positive], ref[positive], rtol=ODE_RTOL)
        np.testing.assert_allclose(got[~positive], ref[~positive], atol=1e-8)


def test_param_names_match_spec():
    assert PARAM_NAMES == spec.STRUCTURAL


@pytest.mark.parametrize("n_cmt", [1, 2, 3])
def test_closed_form_matches_eigh(n_cmt):
    params = jnp.asarray(random_params(np.random.default_rng(n_cmt), n_cmt, 200))
    lam, a = jax.jit(jax.vmap(lambda p: macro_constants(p, n_cmt)))(params)
    lam_e, a_e = jax.jit(jax.vmap(lambda p: macro_constants_eigh(p, n_cmt)))(params)
    np.testing.assert_allclose(lam, lam_e, rtol=1e-10)
    # eigh resolves U_1i to eps * ||S||: a tiny A_i only to that absolute accuracy
    v1 = params[:, 1:2]
    np.testing.assert_allclose(a * v1, a_e * v1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_cmt", [1, 2, 3])
def test_macro_constant_identities(n_cmt):
    params = jnp.asarray(random_params(np.random.default_rng(7 + n_cmt), n_cmt, 100))
    lam, a = jax.jit(jax.vmap(lambda p: macro_constants(p, n_cmt)))(params)
    assert np.all(lam > 0) and np.all(a > 0)
    assert np.all(np.diff(lam, axis=1) > 0)
    np.testing.assert_allclose(a.sum(axis=1), 1.0 / params[:, 1], rtol=1e-12)
    np.testing.assert_allclose((a / lam).sum(axis=1), 1.0 / params[:, 0], rtol=1e-11)


def test_one_compartment_closed_form():
    cl, v = 2.5, 35.0
    t = jnp.linspace(-1.0, 100.0, 50)
    c = response(t, 1000.0, 0.0, jnp.array([cl, v]), 1)
    expect = np.where(t >= 0, 1000.0 / v * np.exp(-cl / v * np.asarray(t)), 0.0)
    np.testing.assert_allclose(c, expect, rtol=1e-14)
    # infusion: rate/CL * (1 - exp(-k t)) during, decaying afterwards
    k, rate, dur = cl / v, 500.0, 2.0
    c_inf = response(t, rate * dur, dur, jnp.array([cl, v]), 1)
    tt = np.asarray(t)
    during = rate / cl * -np.expm1(-k * np.clip(tt, 0, dur))
    expect = during * np.exp(-k * np.maximum(tt - dur, 0.0))
    np.testing.assert_allclose(c_inf, expect, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("n_cmt", [1, 2, 3])
def test_short_infusion_tends_to_bolus(n_cmt):
    params = jnp.asarray(random_params(np.random.default_rng(3), n_cmt))
    t = jnp.array([-5.0, -1e-9, 0.0, 1e-3, 0.5, 3.0, 48.0])
    bolus = response(t, 1000.0, 0.0, params, n_cmt)
    short = response(t, 1000.0, 1e-7, params, n_cmt)
    np.testing.assert_allclose(short[3:], bolus[3:], rtol=1e-6)
    assert np.all(bolus[:2] == 0.0) and np.all(short[:3] == 0.0)
    assert float(bolus[2]) == pytest.approx(1000.0 / float(params[1]), rel=1e-13)


@pytest.mark.parametrize("n_cmt", [2, 3])
def test_vmap_and_jit_match_loop(n_cmt):
    rng = np.random.default_rng(11)
    params = random_params(rng, n_cmt, 8)
    history = random_history(rng)
    t = np.linspace(0.0, 96.0, 25)

    def one(p):
        return concentration(t, *history, p, n_cmt, 0.7)

    batched = jax.jit(jax.vmap(one))(jnp.asarray(params))
    single = jax.jit(one)
    looped = np.stack([np.asarray(single(jnp.asarray(p))) for p in params])
    np.testing.assert_allclose(batched, looped, rtol=1e-14)


@pytest.mark.parametrize("n_cmt", [1, 2, 3])
def test_gradients_finite_and_match_finite_differences(n_cmt):
    params = jnp.asarray(random_params(np.random.default_rng(5), n_cmt))
    # a bolus, an infusion, a zero-amount pad with zero duration, and an overlap
    dose_time = jnp.array([0.0, 12.0, 0.0, 12.5])
    dose_amt = jnp.array([2000.0, 1500.0, 0.0, 800.0])
    dose_dur = jnp.array([0.0, 1.0, 0.0, 2.0])
    t = jnp.array([0.0, 0.3, 12.0, 12.7, 14.0, 30.0, 72.0])

    @jax.jit
    def loss(log_p):
        return jnp.sum(
            jnp.log(
                concentration(
                    t, dose_time, dose_amt, dose_dur, jnp.exp(log_p), n_cmt, 0.1
                )
            )
        )

    log_p = jnp.log(params)
    g = jax.grad(loss)(log_p)
    assert np.all(np.isfinite(g))
    h = 1e-6
    fd = np.array(
        [
            (loss(log_p.at[i].add(h)) - loss(log_p.at[i].add(-h))) / (2 * h)
            for i in range(log_p.shape[0])
        ]
    )
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dur", [0.0, 0.5])
def test_gradient_at_padding_and_bolus(dur):
    params = jnp.array([2.0, 40.0, 1.0, 10.0])
    t = jnp.array([0.0, 1.0, 5.0])

    def f(p, amt, d):
        return jnp.sum(dose_response(t, amt, d, p, 2))

    grad = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    for amt in (0.0, 1000.0):
        grads = grad(params, amt, dur)
        assert all(np.all(np.isfinite(x)) for x in grads)
    assert np.all(grad(params, 0.0, dur)[0] == 0.0)


def test_response_smooth_in_duration_at_bolus():
    params = jnp.array([2.0, 40.0, 1.0, 10.0])
    t = jnp.array(6.0)

    @jax.jit
    def c(d):
        return dose_response(t, 1000.0, d, params, 2)

    h = 1e-4  # one-sided, second order: dur < 0 is not defined
    fd = (-3 * c(0.0) + 4 * c(h) - c(2 * h)) / (2 * h)
    d_dur = jax.grad(c)(0.0)
    np.testing.assert_allclose(d_dur, fd, rtol=1e-6)
    # d/d(dur) at 0 is -C'(t)/2 for a bolus response C (midpoint of the infusion)
    slope = jax.jit(jax.grad(lambda s: dose_response(s, 1000.0, 0.0, params, 2)))(t)
    np.testing.assert_allclose(d_dur, -0.5 * slope, rtol=1e-10)


@pytest.mark.parametrize("dur", [0.0, 1.5])
def test_analytic_slope_matches_autodiff(dur):
    # the private slope drives Newton and the implicit gradient of time_to_threshold
    params = jnp.array([2.0, 40.0, 1.0, 10.0, 5.0, 20.0])
    t = jnp.array([-1.0, 0.2, 1.0, 1.6, 5.0, 50.0])
    lam, a = macro_constants(params, 3)
    got = jax.jit(macro_response_slope)(t, 1000.0, dur, lam, a)
    expect = jax.jit(
        jax.vmap(jax.grad(lambda s: dose_response(s, 1000.0, dur, params, 3)))
    )(t)
    np.testing.assert_allclose(got, expect, rtol=1e-12)


@pytest.mark.parametrize("n_cmt", [1, 2, 3])
def test_per_dose_params_superpose(n_cmt):
    rng = np.random.default_rng(21)
    dose_time, dose_amt, dose_dur = random_history(rng)
    occasions = jnp.asarray(random_params(rng, n_cmt, N_DOSE))
    t = jnp.linspace(0.0, 200.0, 30)
    got = conc(t, dose_time, dose_amt, dose_dur, occasions, n_cmt, 0.3)
    expect = 0.3 + sum(
        response(t - dose_time[i], dose_amt[i], dose_dur[i], occasions[i], n_cmt)
        for i in range(N_DOSE)
    )
    np.testing.assert_allclose(got, expect, rtol=1e-13)
    same = jnp.broadcast_to(occasions[0], occasions.shape)
    np.testing.assert_allclose(
        conc(t, dose_time, dose_amt, dose_dur, same, n_cmt),
        conc(t, dose_time, dose_amt, dose_dur, occasions[0], n_cmt),
        rtol=1e-14,
    )


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="4 parameters"):
        macro_constants(jnp.ones(3), 2)
    with pytest.raises(ValueError, match="n_cmt"):
        macro_constants(jnp.ones(8), 4)
    with pytest.raises(ValueError, match="shape"):
        concentration(
            jnp.ones(2), jnp.zeros(3), jnp.ones(3), jnp.zeros(3), jnp.ones((2, 4)), 2
        )


@pytest.mark.parametrize("n_cmt", [1, 2, 3])
def test_steady_state_equals_long_superposition(n_cmt):
    """The closed-form steady state equals 300 superposed doses (rtol 1e-10)."""
    from phems_clinical.pk.analytic import steady_state

    params = {
        1: [2.0, 40.0],
        2: [1.9, 22.0, 1.5, 7.3],
        3: [2.4, 71.4, 1.67, 87.0, 39.3, 39.9],
    }[n_cmt]
    params = jnp.asarray(params)
    for tau, dur in [(24.0, 0.0), (48.0, 0.5), (168.0, 1.0)]:
        n = 300
        starts = jnp.arange(n) * tau
        t_rel = jnp.linspace(0.0, tau, 13)
        brute = concentration(
            starts[-1] + t_rel,
            starts,
            jnp.full(n, 1000.0),
            jnp.full(n, dur),
            params,
            n_cmt,
        )
        closed = steady_state(t_rel, tau, 1000.0, dur, params, n_cmt)
        np.testing.assert_allclose(closed, brute, rtol=1e-10)
