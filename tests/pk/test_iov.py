"""Inter-occasion variability: NONMEM's semantics against an ODE solve, correlated IOV
blocks (simulation, MAP prior, estimation refusal) and the residual error forms.

The reference for the IOV semantics is a numerical solution (SciPy's DOP853 at
``rtol=1e-13``) of the amount ODEs, integrated piece by piece between dose starts,
infusion ends and samples, with the rate matrix of the occasion of the latest dose
started at or before ``t``: independent of the eigenvector algebra of
:mod:`phems_clinical.pk.occasions`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from scipy.integrate import solve_ivp
from scipy.stats import multivariate_normal

from phems_clinical.data.cohort import stack_subjects
from phems_clinical.pk.analytic import concentration
from phems_clinical.pk.focei import build_focei
from phems_clinical.pk.forecast import fit_map
from phems_clinical.pk.model import (
    initial_params,
    obs_neg2ll,
    predict,
    residual_variance,
)
from phems_clinical.pk.occasions import occasion_concentration
from phems_clinical.pk.packing import build_packer
from phems_clinical.pk.simulate import draw_kappa
from phems_clinical.pk.spec import ModelSpecError, parse_model

occ_conc = jax.jit(occasion_concentration, static_argnames="n_cmt")

# --------------------------------------------------------------------------------
# independent reference: the ODE system, solved numerically


def _rate_matrix(p, n_cmt):
    """``dx/dt = K x`` for the amounts of a mammillary model (central first)."""
    cl, v1 = p[0], p[1]
    k = np.zeros((n_cmt, n_cmt))
    k[0, 0] = -cl / v1
    for j in range(1, n_cmt):
        q, vj = p[2 * j], p[2 * j + 1]
        k[0, 0] -= q / v1
        k[j, 0] += q / v1
        k[0, j] += q / vj
        k[j, j] -= q / vj
    return k


def ode_levels(t_obs, dose_time, dose_amt, dose_dur, dose_occ, occ_params, n_cmt):
    """Central levels by a piecewise ODE solve; parameters of the occasion of the
    latest dose started at or before ``t`` (samples at a dose time see the dose)."""
    real = np.asarray(dose_amt) > 0
    dt, da, dd, do = (
        np.asarray(x)[real] for x in (dose_time, dose_amt, dose_dur, dose_occ)
    )
    order = np.argsort(dt, kind="stable")
    dt, da, dd, do = dt[order], da[order], dd[order], do[order]
    mats = [_rate_matrix(p, n_cmt) for p in np.asarray(occ_params)]
    e0 = np.eye(n_cmt)[0]

    def occ_at(t):
        k = np.searchsorted(dt, t, side="right") - 1
        return None if k < 0 else do[k]

    def rate(t):
        on = (dd > 0) & (dt <= t) & (t < dt + dd)
        return float(np.sum(da[on] / dd[on]))

    marks = sorted(set(dt) | set(dt + dd) | set(np.asarray(t_obs).tolist()))
    x, out = np.zeros(n_cmt), {}
    for i, a in enumerate(marks):
        x[0] += np.sum(da[(dd == 0) & (dt == a)])
        occ = occ_at(a)
        out[a] = 0.0 if occ is None else x[0] / occ_params[occ][1]
        if i + 1 == len(marks) or occ is None:
            continue
        m, r = mats[occ], rate(0.5 * (a + marks[i + 1]))
        sol = solve_ivp(
            lambda _t, y, m=m, r=r: m @ y + r * e0,
            (a, marks[i + 1]),
            x,
            method="DOP853",
            rtol=1e-13,
            atol=1e-12,
        )
        x = sol.y[:, -1]
    return np.array([out[t] for t in np.asarray(t_obs).tolist()])


# --------------------------------------------------------------------------------
# NONMEM semantics against the ODE

BASE = {1: [2.0, 40.0], 2: [2.0, 40.0, 5.0, 20.0], 3: [2.0, 40.0, 5.0, 20.0, 0.5, 30.0]}
# prophylaxis without washout: every 48 h, bolus and infusions; the 12 h infusion
# at 96 h runs across the occasion change at 100 h; the last dose is padding
DOSE_TIME = np.array([0.0, 48.0, 96.0, 100.0, 144.0, 192.0, 0.0])
DOSE_AMT = np.array([1000.0, 1500.0, 800.0, 1200.0, 1000.0, 900.0, 0.0])
DOSE_DUR = np.array([0.0, 0.5, 12.0, 0.0, 1.0, 10 / 60, 0.0])
DOSE_OCC = np.array([0, 1, 1, 2, 3, 0, 0])
TIMES = np.array(
    [
        0.0,
        0.25,
        1.0,
        24.0,
        47.9,
        48.0,
        48.2,
        60.0,
        96.0,
        99.9,
        100.0,
        101.0,
        107.9,
        108.0,
        110.0,
        143.99,
        144.0,
        144.5,
        150.0,
        192.0,
        192.1,
        240.0,
    ]
)


@pytest.mark.parametrize("n_cmt", [1, 2, 3])
def test_occasion_switch_matches_ode(n_cmt):
    rng = np.random.default_rng(17 + n_cmt)
    occ_params = np.asarray(BASE[n_cmt]) * np.exp(rng.normal(0.0, 0.3, (4, 2 * n_cmt)))
    ref = ode_levels(TIMES, DOSE_TIME, DOSE_AMT, DOSE_DUR, DOSE_OCC, occ_params, n_cmt)
    got = np.asarray(
        occ_conc(
            TIMES, DOSE_TIME, DOSE_AMT, DOSE_DUR, DOSE_OCC, occ_params, n_cmt=n_cmt
        )
    )
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=0.0)
    # and the old per-dose semantics is measurably different here (no washout)
    old = np.asarray(
        concentration(TIMES, DOSE_TIME, DOSE_AMT, DOSE_DUR, occ_params[DOSE_OCC], n_cmt)
    )
    assert np.max(np.abs(old - ref) / ref) > 0.01


def test_unsorted_doses_and_baseline():
    """Dose order in the arrays does not matter; the baseline is added."""
    perm = np.array([3, 0, 6, 5, 1, 4, 2])
    occ_params = np.array(
        [
            [2.0, 40.0, 5.0, 20.0],
            [3.0, 35.0, 4.0, 25.0],
            [1.5, 45.0, 6.0, 15.0],
            [2.5, 38.0, 5.5, 22.0],
        ]
    )
    a = occ_conc(TIMES, DOSE_TIME, DOSE_AMT, DOSE_DUR, DOSE_OCC, occ_params, n_cmt=2)
    b = occ_conc(
        TIMES,
        DOSE_TIME[perm],
        DOSE_AMT[perm],
        DOSE_DUR[perm],
        DOSE_OCC[perm],
        occ_params,
        2,
        0.7,
    )
    np.testing.assert_allclose(np.asarray(b), np.asarray(a) + 0.7, rtol=1e-13)


def test_issue_example():
    """The issue's example: 1 compartment (V1 40 dL), 1000 IU at 0 h (occasion 1, CL
    2 dL/h) and 1000 IU at 24 h (occasion 2, CL 4 dL/h), level at 30 h.

    NONMEM's semantics: 1000 (exp(-1.2) + 1)/40 * exp(-0.6) = 17.85 IU/dL (the 301 IU
    left from the first dose are cleared at the new CL from 24 h on). The former
    per-dose semantics gave 19.30 IU/dL (25 exp(-1.5) + 25 exp(-0.6)).
    """
    p = np.array([[2.0, 40.0], [4.0, 40.0]])
    args = (
        np.array([30.0]),
        np.array([0.0, 24.0]),
        np.array([1000.0, 1000.0]),
        np.zeros(2),
    )
    new = float(occ_conc(*args, np.array([0, 1]), p, n_cmt=1)[0])
    old = float(concentration(*args, p, 1)[0])
    assert new == pytest.approx(
        1000 * (np.exp(-1.2) + 1) / 40 * np.exp(-0.6), rel=1e-13
    )
    assert old == pytest.approx(25 * np.exp(-1.5) + 25 * np.exp(-0.6), rel=1e-13)
    assert round(new, 2) == 17.85 and round(old, 2) == 19.30


def test_washout_makes_both_semantics_agree():
    """With washout between occasions (nothing left at the switch) the old per-dose
    and the NONMEM semantics coincide."""
    p = np.array([[2.0, 40.0, 5.0, 20.0], [4.0, 30.0, 3.0, 25.0]])
    dt, da, dd = np.array([0.0, 2000.0]), np.array([1000.0, 1000.0]), np.zeros(2)
    t = np.array([1.0, 24.0, 2001.0, 2024.0])
    new = occ_conc(t, dt, da, dd, np.array([0, 1]), p, n_cmt=2)
    old = concentration(t, dt, da, dd, p, 2)
    np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=1e-12)


def test_gradient_matches_finite_differences():
    """Differentiable through the switches (FOCEI, MAP Newton and NUTS need it)."""
    occ_params = np.array(
        [
            [2.0, 40.0, 5.0, 20.0],
            [3.0, 35.0, 4.0, 25.0],
            [1.5, 45.0, 6.0, 15.0],
            [2.5, 38.0, 5.5, 22.0],
        ]
    )

    def f(logp):
        c = occasion_concentration(
            TIMES, DOSE_TIME, DOSE_AMT, DOSE_DUR, DOSE_OCC, jnp.exp(logp), 2
        )
        return jnp.sum(jnp.log(c[1:]))

    x = np.log(occ_params)
    g = np.asarray(jax.jit(jax.grad(f))(x))
    h = 1e-6
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        fd[idx] = (float(f(x + e)) - float(f(x - e))) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


IOV_SPEC = {
    "name": "iov-test",
    "structure": {"compartments": 2},
    "parameters": {"CL": 2.5, "V1": 35.0, "Q2": 4.0, "V2": 12.0},
    "iiv": {"parameters": ["CL", "V1"], "sd": [0.3, 0.2]},
    # Eloctate's IOV block: CL 20.6 %, V1 12.0 %, r = 0.639 (Nestorov et al., Clin
    # Pharmacol Drug Dev 2015;4:163-174)
    "iov": {
        "parameters": ["CL", "V1"],
        "sd": [0.206, 0.120],
        "correlation": [[1.0, 0.639], [0.639, 1.0]],
        "fixed": True,
    },
    "residual": {"additive": 0.5, "proportional": 0.12},
}


def _subject(times, dv, occ_of_dose=(0, 1)):
    row = dict(
        dose_time=[0.0, 48.0],
        dose_amt=[1500.0, 1500.0],
        dose_dur=[0.25, 0.25],
        dose_occ=list(occ_of_dose),
        obs_time=times,
        obs_dv=dv,
        obs_blq=[False] * len(times),
        obs_lloq=[0.0] * len(times),
        obs_occ=[0 if t < 48 else 1 for t in times],
        covariates=[],
    )
    return jax.tree.map(lambda x: x[0], stack_subjects([row]))


def test_predict_uses_nonmem_semantics_and_keeps_the_single_occasion_path():
    model = parse_model(IOV_SPEC)
    p = initial_params(model)
    subject = _subject([4.0, 47.0, 52.0, 72.0], [30.0, 10.0, 40.0, 20.0])
    eta = jnp.array([0.1, -0.2])
    kappa = jnp.array([[0.15, 0.05], [-0.2, 0.1]])
    f = np.asarray(predict(model, subject, p.theta, eta, kappa, p.baseline))
    occ = np.asarray(p.theta)[None, :] * np.exp(
        np.c_[eta[None, :] + np.asarray(kappa), np.zeros((2, 2))]
    )
    ref = ode_levels(
        np.asarray(subject.obs_time),
        [0.0, 48.0],
        [1500.0, 1500.0],
        [0.25, 0.25],
        [0, 1],
        occ,
        2,
    )
    np.testing.assert_allclose(f, ref, rtol=1e-8)
    # one occasion: plain superposition (today's code path)
    one = _subject([4.0, 47.0, 52.0, 72.0], [30.0, 10.0, 40.0, 20.0], (0, 0))
    f1 = predict(model, one, p.theta, eta, kappa[:1], p.baseline)
    sup = concentration(
        one.obs_time, one.dose_time, one.dose_amt, one.dose_dur, occ[0], 2, p.baseline
    )
    np.testing.assert_allclose(np.asarray(f1), np.asarray(sup), rtol=1e-14)


# --------------------------------------------------------------------------------
# correlated IOV


def test_correlated_iov_parses_to_a_covariance_block():
    model = parse_model(IOV_SPEC)
    sd = np.array([0.206, 0.120])
    expected = np.array([[1.0, 0.639], [0.639, 1.0]]) * np.outer(sd, sd)
    np.testing.assert_allclose(model.omega_iov, expected, rtol=1e-15)
    assert model.iov_correlated and model.omega_iov_fixed


def test_simulated_kappas_have_the_stated_covariance():
    model = parse_model(IOV_SPEC)
    n = 200_000
    k = np.asarray(draw_kappa(jax.random.key(3), model.omega_iov, (n, 2)))
    flat = k.reshape(-1, 2)
    cov = np.cov(flat.T)
    # sampling SE of a covariance element: <= var * sqrt(2 / n), about 1e-4 here
    np.testing.assert_allclose(cov, model.omega_iov, atol=5 * 0.0425 * np.sqrt(2 / n))
    r = cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1])
    assert r == pytest.approx(0.639, abs=0.005)
    # occasions are independent
    assert abs(np.corrcoef(k[:, 0, 0], k[:, 1, 0])[0, 1]) < 0.01


def test_map_with_correlated_iov_matches_reference_objective():
    """The MAP objective with a correlated IOV prior equals the -2 log posterior
    computed independently: ODE predictions, the normal likelihood and
    scipy.stats.multivariate_normal for eta and each occasion's kappa; and the
    reference objective is stationary (central differences) at the MAP mode."""
    model = parse_model(IOV_SPEC)
    p = initial_params(model)
    times = np.array([4.0, 24.0, 47.0, 52.0, 72.0])
    dv = np.array([35.0, 14.0, 7.0, 45.0, 19.0])
    subject = _subject(times, dv)
    theta = np.asarray(p.theta)
    a, b = model.residual.additive, model.residual.proportional
    om, om_iov = np.asarray(model.omega), np.asarray(model.omega_iov)
    const = -2 * multivariate_normal(np.zeros(2), om).logpdf(
        np.zeros(2)
    ) - 2 * 2 * multivariate_normal(np.zeros(2), om_iov).logpdf(np.zeros(2))

    def reference(bvec):
        eta, kappa = bvec[:2], bvec[2:].reshape(2, 2)
        occ = theta[None, :] * np.exp(np.c_[eta[None, :] + kappa, np.zeros((2, 2))])
        f = ode_levels(
            times, [0.0, 48.0], [1500.0, 1500.0], [0.25, 0.25], [0, 1], occ, 2
        )
        var = a**2 + (b * f) ** 2
        lik = np.sum(np.log(var) + (dv - f) ** 2 / var)
        prior = -2 * multivariate_normal(np.zeros(2), om).logpdf(eta) - 2 * sum(
            multivariate_normal(np.zeros(2), om_iov).logpdf(k) for k in kappa
        )
        return lik + prior - const  # NONMEM drops the normalising constants

    fns = build_focei(model, 2)
    obj = jax.jit(lambda bb: fns.inner_objective(bb, p, subject))
    rng = np.random.default_rng(5)
    for _ in range(3):
        bvec = rng.normal(0.0, 0.15, 6)
        assert float(obj(bvec)) == pytest.approx(reference(bvec), rel=1e-9)

    res = fit_map(model, p, subject, n_occ=2)
    b_hat = np.asarray(res.b)
    assert float(res.objective) == pytest.approx(reference(b_hat), rel=1e-9)
    h = 1e-4
    grad = np.array(
        [
            (reference(b_hat + h * e) - reference(b_hat - h * e)) / (2 * h)
            for e in np.eye(6)
        ]
    )
    # O(h^2) truncation and ODE noise stay below 1e-4; one step away it is ~1
    assert np.max(np.abs(grad)) < 1e-4
    assert np.max(np.abs(b_hat)) > 0.01  # the data moved the mode off the prior


def test_correlated_iov_is_refused_in_estimation_unless_fixed():
    spec = {
        **IOV_SPEC,
        "iov": {k: v for k, v in IOV_SPEC["iov"].items() if k != "fixed"},
    }
    model = parse_model(spec)
    with pytest.raises(ModelSpecError, match=r"iov\.correlation.*iov\.fixed: true"):
        build_packer(model)
    fixed = parse_model(IOV_SPEC)
    packer = build_packer(fixed)
    back = packer.unpack(packer.pack(initial_params(fixed)))
    np.testing.assert_array_equal(np.asarray(back.omega_iov), fixed.omega_iov)
    # a diagonal IOV block is estimated as variances
    diag = parse_model({**spec, "iov": {"parameters": ["CL"], "sd": [0.2]}})
    packer = build_packer(diag)
    assert "log_omega_iov:CL" in packer.names
    back = packer.unpack(packer.pack(initial_params(diag)))
    np.testing.assert_allclose(np.asarray(back.omega_iov), [[0.04]], rtol=1e-14)


# --------------------------------------------------------------------------------
# residual forms


def test_residual_forms_hand_computed():
    f = jnp.array([0.0, 10.0, 80.0])
    sigma = jnp.array([0.5, 0.1])
    # NONMEM combined (combined2): 0.25 + (0.1 f)^2
    np.testing.assert_allclose(
        np.asarray(residual_variance(f, sigma)), [0.25, 1.25, 64.25], rtol=1e-15
    )
    # Monolix combined1: (0.5 + 0.1 f)^2
    np.testing.assert_allclose(
        np.asarray(residual_variance(f, sigma, "combined1")),
        [0.25, 2.25, 72.25],
        rtol=1e-15,
    )
    with pytest.raises(ValueError, match="combined3"):
        residual_variance(f, sigma, "combined3")


def test_residual_form_in_likelihood_and_m3():
    row = dict(
        dose_time=[0.0],
        dose_amt=[1000.0],
        dose_dur=[0.0],
        dose_occ=[0],
        obs_time=[1.0, 2.0],
        obs_dv=[12.0, 0.0],
        obs_blq=[False, True],
        obs_lloq=[0.0, 1.0],
        obs_occ=[0, 0],
        covariates=[],
    )
    s = jax.tree.map(lambda x: x[0], stack_subjects([row]))
    f = jnp.array([10.0, 2.0])
    sigma = jnp.array([0.5, 0.1])
    got = np.asarray(obs_neg2ll(s, f, sigma, "combined1"))
    sd1, sd2 = 0.5 + 0.1 * 10.0, 0.5 + 0.1 * 2.0
    quant = np.log(sd1**2) + (12.0 - 10.0) ** 2 / sd1**2
    m3 = -2 * np.log(scipy.stats.norm.cdf((1.0 - 2.0) / sd2))
    np.testing.assert_allclose(got, [quant, m3], rtol=1e-12)
    got2 = np.asarray(obs_neg2ll(s, f, sigma))
    v1 = 0.25 + 1.0
    np.testing.assert_allclose(got2[0], np.log(v1) + 4.0 / v1, rtol=1e-12)


def test_combined1_focei_hessian_has_the_variance_derivative():
    """FOCEI's first-order Hessian uses dV/db of the model's residual form."""
    spec = {
        **IOV_SPEC,
        "iov": {},
        "residual": {"additive": 0.5, "proportional": 0.12, "form": "combined1"},
    }
    model = parse_model(spec)
    p = initial_params(model)
    subject = _subject([4.0, 24.0, 47.0], [30.0, 14.0, 7.0], (0, 0))
    fns = build_focei(model, 1)
    bvec = jnp.array([0.1, -0.05])
    h = np.asarray(fns.foce_hessian(bvec, p, subject))

    def f_of_b(bb):
        return predict(model, subject, p.theta, bb, jnp.zeros((1, 0)), p.baseline)

    f = np.asarray(f_of_b(bvec))
    g = np.asarray(jax.jacfwd(f_of_b)(bvec))
    sd = 0.5 + 0.12 * f
    dvar = (2 * sd * 0.12)[:, None] * g
    ref = (
        np.linalg.inv(np.asarray(model.omega))
        + (g.T / sd**2) @ g
        + 0.5 * (dvar.T / sd**4) @ dvar
    )
    np.testing.assert_allclose(h, ref, rtol=1e-10)


def test_residual_form_is_validated_and_kept():
    spec = {
        **IOV_SPEC,
        "residual": {"additive": 0.5, "proportional": 0.1, "form": "combined1"},
    }
    assert parse_model(spec).residual.form == "combined1"
    assert parse_model(IOV_SPEC).residual.form == "combined2"
    with pytest.raises(ModelSpecError, match=r"residual\.form: 'combined3'"):
        parse_model({**spec, "residual": {"additive": 0.5, "form": "combined3"}})


# --------------------------------------------------------------------------------
# time to a threshold after the last infusion, through occasion changes


@pytest.mark.parametrize("threshold", [5.0, 1.0])
def test_time_to_level_through_occasions_matches_ode_root(threshold):
    """After the last infusion, every compartment follows the last occasion's
    parameters: the crossing found by ``derived.time_to_level`` on
    ``occasion_concentration`` equals a root of the piecewise ODE solution (brentq),
    and differs from superposition with each dose's own occasion (the old rule)."""
    from scipy.optimize import brentq

    from phems_clinical.pk.derived import time_to_level, time_to_threshold

    n_cmt = 2
    rng = np.random.default_rng(5)
    occ = np.asarray(BASE[n_cmt]) * np.exp(rng.normal(0.0, 0.3, (4, 2 * n_cmt)))
    end = float(np.max((DOSE_TIME + DOSE_DUR)[DOSE_AMT > 0]))

    def above(t, p):
        return occasion_concentration(
            t[None], DOSE_TIME, DOSE_AMT, DOSE_DUR, DOSE_OCC, p, n_cmt
        )[0]

    t_new = float(time_to_level(above, jnp.asarray(occ), threshold, end))

    def ode_excess(t):
        return (
            ode_levels([end, t], DOSE_TIME, DOSE_AMT, DOSE_DUR, DOSE_OCC, occ, n_cmt)[1]
            - threshold
        )

    t_ref = brentq(ode_excess, end + 1e-6, end + 2000.0, xtol=1e-10, rtol=1e-14)
    assert t_new == pytest.approx(t_ref, rel=1e-9)
    old = float(
        time_to_threshold(
            threshold, end, DOSE_TIME, DOSE_AMT, DOSE_DUR, occ[DOSE_OCC], n_cmt
        )
    )
    assert abs(old - t_ref) > 0.1  # the old rule is off by more than 6 minutes
