"""Second-order federated FOCEI: the site Hessian against an independent reference,
padding and failure conventions, the exact trust-region subproblem, the message
contract and SecAgg with a Hessian, and convergence to the pooled fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phems_clinical.federation.core import sum_payloads
from phems_clinical.federation.engine import run_federated
from phems_clinical.federation.focei import (
    fd_steps,
    fed_focei,
    site_hessian,
    site_objective,
    trust_region_step,
)
from phems_clinical.federation.messages import (
    MessageRejected,
    check_payload,
    declared_fields,
)
from phems_clinical.federation.pk_sites import (
    SiteCohort,
    cohorts_by_site,
    n_occasions_all,
    pad_sites,
)
from phems_clinical.federation.secagg import SecAggConfig
from phems_clinical.federation.secure import FOCEI_SECAGG, secagg_aggregator
from phems_clinical.pk.focei import compiled_focei, fit_focei
from phems_clinical.pk.library import load_product
from phems_clinical.pk.model import initial_params
from phems_clinical.pk.packing import build_packer
from phems_clinical.pk.simulate import default_hospitals, simulate_hospitals


@pytest.fixture(scope="module")
def one_site():
    """Advate, the first of the conftest's three hospitals: (model, padded site,
    its unpadded cohort, n_occ, free start vector)."""
    model = load_product("advate")
    events, _ = simulate_hospitals(jax.random.key(7), model, default_hospitals(24))
    _, cohorts = cohorts_by_site(events, model)
    sites, n_occ = pad_sites(cohorts), n_occasions_all(cohorts)
    x0 = jnp.asarray(build_packer(model).pack(initial_params(model)), jnp.float64)
    return model, sites[0], cohorts[0], n_occ, x0


@pytest.fixture(scope="module")
def hessian_fn(one_site):
    model, _, _, n_occ, _ = one_site
    base = initial_params(model)
    return (
        jax.jit(site_hessian(model, n_occ, base)),
        jax.jit(site_objective(model, n_occ, base)),
    )


def _richardson_hessian(ofv, x, rel):
    """Central second differences of ``ofv`` with steps ``rel * max(1, |x|)`` and
    ``rel/2 * ...``, Richardson-extrapolated (error O(h^4))."""

    def second(h):
        d = x.size
        f0 = ofv(x)
        out = np.zeros((d, d))
        e = np.diag(h)
        for i in range(d):
            out[i, i] = (ofv(x + e[i]) - 2 * f0 + ofv(x - e[i])) / h[i] ** 2
            for j in range(i):
                out[i, j] = out[j, i] = (
                    ofv(x + e[i] + e[j])
                    - ofv(x + e[i] - e[j])
                    - ofv(x - e[i] + e[j])
                    + ofv(x - e[i] - e[j])
                ) / (4 * h[i] * h[j])
        return out

    h = rel * np.maximum(1.0, np.abs(x))
    return (4.0 * second(h / 2) - second(h)) / 3.0


@pytest.mark.slow
def test_site_hessian_matches_richardson_second_differences(one_site, hessian_fn):
    """The site Hessian (central differences of the exact gradient) against the
    pooled FOCEI objective of the site's own (unpadded) patients, differentiated
    twice numerically with Richardson extrapolation -- an independent route: no
    gradient, other steps. Each entry agrees within 2e-5 of the geometric mean
    of its diagonal entries (measured 3.5e-6): the reference's own error is its
    O(h^4) truncation (with h = 1e-2 instead of 3e-3 it reaches 1.2e-4 on the
    stiffest entry) plus the objective's noise (inner modes to ~1e-10) / h^2."""
    model, site, cohort, n_occ, x0 = one_site
    hess_fn, obj_fn = hessian_fn
    _, _, b = obj_fn(
        x0,
        site,
        jnp.zeros((site.cohort.n_subjects, model.n_eta + n_occ * model.n_kappa)),
    )
    hess = np.asarray(hess_fn(x0, site, b))
    n = cohort.n_subjects
    _, per_subject = compiled_focei(model, n_occ)
    packer = build_packer(model)
    b_real = b[:n]

    def ofv(x):
        per, _ = per_subject(packer.unpack(jnp.asarray(x)), cohort, b_real)
        return float(jnp.sum(per))

    ref = _richardson_hessian(ofv, np.asarray(x0), 3e-3)
    scale = np.sqrt(np.outer(np.abs(np.diag(ref)), np.abs(np.diag(ref))))
    err = np.abs(hess - ref) / scale
    assert np.all(np.isfinite(hess))
    np.testing.assert_allclose(hess, hess.T, rtol=1e-13, atol=0)
    assert np.max(err) < 2e-5, err


@pytest.mark.slow
def test_padded_rows_contribute_nothing_and_failures_are_refused(one_site, hessian_fn):
    """A padding row's data never reaches the Hessian (another patient's data in
    it gives the identical matrix), and a non-finite answer leaves as +inf ofv
    with zero gradient and Hessian, the site's warm start kept."""
    model, site, _, n_occ, x0 = one_site
    hess_fn, obj_fn = hessian_fn
    n_sub = site.cohort.n_subjects
    b0 = jnp.zeros((n_sub, model.n_eta + n_occ * model.n_kappa))
    mask = site.mask.at[-1].set(False)
    a = SiteCohort(site.cohort, mask)
    other = jax.tree.map(lambda v: v.at[-1].set(v[0]), site.cohort)
    b = SiteCohort(other, mask)
    ha = np.asarray(hess_fn(x0, a, obj_fn(x0, a, b0)[2]))
    hb = np.asarray(hess_fn(x0, b, obj_fn(x0, b, b0)[2]))
    np.testing.assert_array_equal(ha, hb)
    assert not np.allclose(ha, np.asarray(hess_fn(x0, site, obj_fn(x0, site, b0)[2])))

    alg = fed_focei(model, n_occ)
    bad = SiteCohort(
        site.cohort._replace(obs_dv=site.cohort.obs_dv.at[0, 0].set(jnp.nan)), site.mask
    )
    payload, state, _ = jax.jit(alg.local_update)({"x": x0}, bad, b0, jax.random.key(0))
    assert float(payload["ofv"]) == np.inf
    assert not np.any(np.asarray(payload["grad"]))
    assert not np.any(np.asarray(payload["hess"]))
    np.testing.assert_array_equal(np.asarray(state), np.asarray(b0))


def _kkt(g, h, radius, p):
    """Moré & Sorensen (1983): p solves the trust-region subproblem iff for some
    mu >= 0, (H + mu I) p = -g, mu (radius - |p|) = 0 and H + mu I is PSD."""
    d = g.size
    norm = np.linalg.norm(p)
    assert norm <= radius * (1 + 1e-10)
    lam_min = np.linalg.eigvalsh(h)[0]
    if norm < radius * (1 - 1e-8):
        np.testing.assert_allclose(h @ p, -g, rtol=1e-8, atol=1e-10)
        assert lam_min > 0
        return
    mu = -np.dot(p, h @ p + g) / np.dot(p, p)  # least squares for (H + mu I) p = -g
    assert mu >= -1e-8 * max(1.0, abs(lam_min))
    assert lam_min + mu >= -1e-8 * np.max(np.abs(np.linalg.eigvalsh(h)))
    np.testing.assert_allclose(
        (h + mu * np.eye(d)) @ p, -g, atol=1e-7 * (np.linalg.norm(g) + 1)
    )


@pytest.mark.parametrize("case", range(8))
def test_trust_region_step_solves_the_subproblem(case):
    """Random positive definite, indefinite and badly scaled models, inside and
    on the boundary, plus the hard case: the optimality conditions hold and no
    point of a dense boundary/interior sample has a lower model value."""
    rng = np.random.default_rng(case)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.exp(rng.uniform(0, 10, d)) if case < 4 else rng.normal(0, 5, d)
    g = rng.normal(size=d)
    if case == 7:  # hard case: g orthogonal to the lowest eigenvector
        lam[0] = np.min(lam) - 1.0
        g = g - np.dot(g, q[:, 0]) * q[:, 0]
    h = (q * lam) @ q.T
    radius = [10.0, 1e-3, 0.5, 1.0, 2.0, 0.1, 1.0, 10.0][case]
    p = np.asarray(
        trust_region_step(jnp.asarray(g), jnp.asarray(h), jnp.asarray(radius))
    )
    _kkt(g, h, radius, p)
    model = lambda s: g @ s + 0.5 * s @ h @ s  # noqa: E731
    z = rng.normal(size=(4000, d))
    z = (
        z
        / np.linalg.norm(z, axis=1, keepdims=True)
        * radius
        * rng.uniform(0, 1, (4000, 1)) ** (1 / d)
    )
    assert model(p) <= min(model(s) for s in z) + 1e-9 * (1 + abs(model(p)))


def test_message_spec_declares_the_hessian(one_site):
    model, _, _, n_occ, x0 = one_site
    d = x0.shape[0]
    assert declared_fields("fed_focei") == {
        "ofv": [],
        "grad": ["d"],
        "hess": ["d", "d"],
    }
    for hessian in ("exact", "bhhh"):
        alg = fed_focei(model, n_occ, hessian=hessian)
        assert alg.message_spec == {"ofv": (), "grad": (d,), "hess": (d, d)}
        check_payload(
            alg, {"ofv": jnp.zeros(()), "grad": jnp.zeros(d), "hess": jnp.zeros((d, d))}
        )
        with pytest.raises(MessageRejected, match="hess"):
            check_payload(
                alg,
                {
                    "ofv": jnp.zeros(()),
                    "grad": jnp.zeros(d),
                    "hess": jnp.zeros((d, d + 1)),
                },
            )
    bfgs = fed_focei(model, n_occ, hessian="bfgs")
    assert bfgs.message_spec == {"ofv": (), "grad": (d,)}
    with pytest.raises(ValueError, match="hessian: expected one of exact, bhhh"):
        fed_focei(model, n_occ, hessian="newton")
    with pytest.raises(ValueError, match="fd_step"):
        fed_focei(model, n_occ, fd_step=0.0)


def test_hessian_round_through_secagg(one_site):
    """A Newton round's payloads (Hessian entries up to 5e5 per site, i.e. up to
    1e7 summed over 20 sites) summed under SecAgg with the FOCEI encoding: every
    coordinate within the protocol's bound (20 * 2e6 / (2^48 - 1) = 1.4e-7) of
    the plain sum, and the server's next point equal to 1e-9."""
    model, _, _, n_occ, x0 = one_site
    d, k = x0.shape[0], 20
    alg = fed_focei(model, n_occ)
    rng = np.random.default_rng(0)
    payloads = {}
    for s in range(k):
        a = rng.normal(size=(d, d)) * np.logspace(0, 2.7, d)
        payloads[s] = {
            "ofv": jnp.asarray(rng.uniform(50, 500)),
            "grad": jnp.asarray(rng.normal(0, 1e3, d)),
            "hess": jnp.asarray(np.clip(a @ a.T, -5e5, 5e5)),
        }
    log = []
    agg = secagg_aggregator(
        SecAggConfig(threshold=k - 1, **FOCEI_SECAGG), log, n_sites=k
    )
    secure = agg(jax.random.key(1), payloads, alg)
    stacked = {f: jnp.stack([payloads[s][f] for s in range(k)]) for f in payloads[0]}
    plain = sum_payloads(stacked, jnp.ones(k, bool))
    bound = log[0].max_error_bound
    assert bound < 1.5e-7 and max(log[0].n_clipped.values()) == 0
    for f in plain:
        assert np.max(np.abs(np.asarray(secure[f]) - np.asarray(plain[f]))) <= bound
    server = alg.init_server(jax.random.key(0))
    a = alg.aggregate(server, plain, jax.random.key(0))
    b = alg.aggregate(server, secure, jax.random.key(0))
    a = alg.aggregate(a._replace(y_eval=a.y + 0.01), plain, jax.random.key(0))
    b = alg.aggregate(b._replace(y_eval=b.y + 0.01), secure, jax.random.key(0))
    np.testing.assert_allclose(
        np.asarray(b.y_eval), np.asarray(a.y_eval), rtol=1e-9, atol=1e-9
    )


def test_fd_steps_are_relative():
    x = jnp.asarray([0.0, 0.5, -3.0, 200.0])
    np.testing.assert_allclose(np.asarray(fd_steps(x, 1e-4)), [1e-4, 1e-4, 3e-4, 2e-2])


@pytest.mark.slow
@pytest.mark.parametrize("hessian,max_rounds", [("exact", 15), ("bfgs", 200)])
def test_reaches_the_pooled_optimum(advate_sites, hessian, max_rounds):
    """Every estimate within 1e-6 relative of the pooled scipy-BFGS fit (24
    patients, 3 hospitals); the exact Newton server in at most 15 rounds, with
    R-based standard errors equal to the pooled fit's (its R matrix by central
    differences of the pooled gradient, ``fit_focei(covariance=True)``)."""
    model, sites, pooled, n_occ = advate_sites
    ref = fit_focei(model, pooled, covariance=hessian == "exact")
    run = run_federated(
        jax.random.key(0), fed_focei(model, n_occ, hessian=hessian), sites
    )
    assert run.converged and run.rounds <= max_rounds, run.rounds
    est = np.asarray(run.result["estimates"])
    np.testing.assert_allclose(est, ref.estimates, rtol=1e-6)
    np.testing.assert_allclose(float(run.result["ofv"]), ref.ofv, rtol=1e-9)
    if hessian == "exact":
        se = np.asarray(run.result["se"])
        assert np.all(np.isfinite(se)) and np.all(se > 0)
        np.testing.assert_allclose(se, ref.se, rtol=1e-3)
    else:
        assert "se" not in run.result
