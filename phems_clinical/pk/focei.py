"""First-order conditional estimation with interaction (FOCEI), as NONMEM defines it.

For subject ``i`` with random effects ``b = (eta, kappa_1..kappa_O)`` and prior
precision ``P = blockdiag(Omega^-1, Omega_IOV^-1 per occasion)``, the inner
objective is

    O_i(b) = sum_j [log V_ij + (y_ij - f_ij)^2 / V_ij] + b' P b

(BLQ samples contribute ``-2 log Phi((LLOQ - f)/sqrt(V))``, the M3 method). Its mode
``b_hat`` is the subject's conditional (MAP) estimate. NONMEM's FOCEI objective is the
Laplace approximation with the first-order (expected-information) Hessian

    H_i = P + sum_j [g_j g_j' / V_j + 1/2 dV_j dV_j' / V_j^2]   (g = df/db at b_hat)

    OFV = sum_i [ O_i(b_hat_i) + log det Omega_full + log det H_i ]

i.e. -2 log-likelihood without the ``n_obs * log(2 pi)`` constant, with the
eta-epsilon interaction (V depends on b). BLQ terms enter ``H_i`` through their exact
second derivative (NONMEM would require LAPLACIAN there).

References
----------
Wang Y. Derivation of various NONMEM estimation methods. J Pharmacokinet
Pharmacodyn 2007;34:575-593. Almquist J et al. Using sensitivity equations for
computing gradients of the FOCE and FOCEI approximations to the population
likelihood. J Pharmacokinet Pharmacodyn 2015;42:191-209.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical._typing import Array, Float
from phems_clinical.data.cohort import Cohort
from phems_clinical.pk._cache import per_model
from phems_clinical.pk._newton import newton_minimise
from phems_clinical.pk.model import (
    PopParams,
    initial_params,
    iov_covariance,
    likelihood_cohort,
    n_occasions,
    obs_neg2ll,
    predict,
    residual_variance,
)
from phems_clinical.pk.packing import build_packer
from phems_clinical.pk.spec import PopModel


class FOCEIFns(NamedTuple):
    """Pure per-subject functions of a compiled FOCEI problem (vmap over subjects)."""

    n_b: int
    unflatten: Callable  # b -> (eta, kappa)
    inner_objective: Callable  # (b, params, subject) -> O_i(b)
    map_estimate: Callable  # (params, subject, b0) -> b_hat
    subject_ofv: Callable  # (params, subject, b0) -> (ofv_i, b_hat)
    foce_hessian: Callable  # (b, params, subject) -> H_i


class FOCEIResult(NamedTuple):
    """Outcome of :func:`fit_focei`.

    ``se``/``se_sandwich`` are standard errors on NONMEM's scale (theta; omega and
    sigma as variances) from ``2 R^-1`` and ``R^-1 S R^-1``; ``shrinkage_sd`` is
    eta-shrinkage in percent, ``100 (1 - SD(eta_hat) / sqrt(omega))``.

    ``converged`` is true only when the objective, every subject's contribution and
    the gradient are finite at the final estimates and the optimiser stopped at a
    minimum (success, or a largest gradient component below 1e-3). A non-finite
    objective or gradient at the start values stops the fit at once
    (``n_iterations`` 0, estimates = start values). ``nonfinite_subjects`` are the
    cohort indices whose contribution or gradient was not finite where the fit
    stopped (empty when all were finite); ``message`` says what happened.
    """

    params: PopParams
    ofv: float
    ofv_subjects: np.ndarray
    etas: np.ndarray
    kappas: np.ndarray
    natural_names: tuple[str, ...]
    estimates: np.ndarray
    se: np.ndarray
    se_sandwich: np.ndarray
    shrinkage_sd: np.ndarray
    converged: bool
    n_iterations: int
    message: str
    seconds: float
    nonfinite_subjects: tuple[int, ...] = ()


def build_focei(model: PopModel, n_occ: int = 1) -> FOCEIFns:
    """Compile the per-subject FOCEI functions of ``model`` with ``n_occ`` occasions."""
    n_eta, n_kappa = model.n_eta, model.n_kappa
    n_b = n_eta + n_occ * n_kappa
    form = model.residual.form

    def unflatten(b):
        return b[:n_eta], b[n_eta:].reshape(n_occ, n_kappa)

    def precision(params: PopParams):
        parts = []
        if n_eta:
            parts.append(jnp.linalg.inv(params.omega))
        if n_kappa:
            parts.append(iov_covariance(jnp.linalg.inv(params.omega_iov), n_occ))
        return jax.scipy.linalg.block_diag(*parts) if parts else jnp.zeros((0, 0))

    def logdet_omega_full(params: PopParams):
        out = 0.0
        if n_eta:
            out = out + jnp.linalg.slogdet(params.omega)[1]
        if n_kappa:
            out = out + n_occ * jnp.linalg.slogdet(params.omega_iov)[1]
        return out

    def f_of_b(b, params, subject):
        eta, kappa = unflatten(b)
        return predict(model, subject, params.theta, eta, kappa, params.baseline)

    def inner_objective(b, params, subject):
        subject = likelihood_cohort(model, subject)
        f = f_of_b(b, params, subject)
        return (
            jnp.sum(obs_neg2ll(subject, f, params.sigma, form))
            + b @ precision(params) @ b
        )

    def foce_hessian(b, params, subject):
        subject = likelihood_cohort(model, subject)
        f = f_of_b(b, params, subject)
        g = jax.jacfwd(f_of_b)(b, params, subject)
        var, dvar_df = jax.jvp(
            lambda ff: residual_variance(ff, params.sigma, form),
            (f,),
            (jnp.ones_like(f),),
        )
        dvar = dvar_df[:, None] * g
        w = jnp.where(subject.obs_mask & ~subject.obs_blq, 1.0, 0.0)
        h = precision(params) + (g.T * (w / var)) @ g
        h = h + 0.5 * (dvar.T * (w / var**2)) @ dvar
        if model.blq == "m3":

            def blq_part(bb):
                ff = f_of_b(bb, params, subject)
                terms = obs_neg2ll(subject, ff, params.sigma, form)
                return jnp.sum(jnp.where(subject.obs_blq, terms, 0.0))

            h = h + 0.5 * jax.hessian(blq_part)(b)
        return h

    def map_estimate(params, subject, b0):
        if n_b == 0:
            return b0
        frozen = jax.lax.stop_gradient(params)
        b_hat = jax.lax.stop_gradient(
            newton_minimise(
                lambda b: inner_objective(b, frozen, subject), jax.lax.stop_gradient(b0)
            )
        )
        # One Newton step from the converged mode: its value is b_hat (the gradient is
        # ~0 there) and its derivative w.r.t. the population parameters is exactly the
        # implicit-function derivative -H^-1 d2O/db dparams.
        g = jax.grad(inner_objective)(b_hat, params, subject)
        h = jax.lax.stop_gradient(jax.hessian(inner_objective)(b_hat, frozen, subject))
        return b_hat - jnp.linalg.solve(h, g)

    def subject_ofv(params, subject, b0):
        b = map_estimate(params, subject, b0)
        ofv = inner_objective(b, params, subject) + logdet_omega_full(params)
        if n_b:
            ofv = ofv + jnp.linalg.slogdet(foce_hessian(b, params, subject))[1]
        return ofv, b

    return FOCEIFns(
        n_b, unflatten, inner_objective, map_estimate, subject_ofv, foce_hessian
    )


def compiled_focei(model: PopModel, n_occ: int) -> tuple[FOCEIFns, Callable]:
    """``build_focei`` and the jitted, subject-vmapped ``subject_ofv`` (cached per
    model object; see :mod:`phems_clinical.pk._cache`)."""

    def build():
        fns = build_focei(model, n_occ)
        return fns, jax.jit(jax.vmap(fns.subject_ofv, in_axes=(None, 0, 0)))

    return per_model(model, ("focei_ofv", n_occ), build)


def focei_objective(
    model: PopModel,
    cohort: Cohort,
    params: PopParams,
    b0: Float[Array, "n_sub n_b"] | None = None,
) -> tuple[Float[Array, ""], Float[Array, " n_sub"], Float[Array, "n_sub n_b"]]:
    """FOCEI objective (NONMEM OFV), per-subject contributions and conditional modes."""
    fns, per_subject = compiled_focei(model, n_occasions(cohort))
    if b0 is None:
        b0 = jnp.zeros((cohort.n_subjects, fns.n_b))
    per, b = per_subject(params, cohort, b0)
    return jnp.sum(per), per, b


def compiled_fit_functions(model: PopModel, n_occ: int):
    """Jitted per-subject OFV/mode/Jacobian for ``model`` (cached: warm refits)."""

    def build():
        fns = build_focei(model, n_occ)
        vm = jax.vmap(fns.subject_ofv, in_axes=(None, 0, 0))

        def per_subject(x, base, cohort, b0):
            return vm(build_packer(model, base).unpack(x), cohort, b0)

        def with_jac(x, base, cohort, b0):
            # Forward mode: n_free JVPs give every subject's gradient at once
            # (the optimiser sums them; the sandwich estimator needs each).
            def f(xx):
                per, b = per_subject(xx, base, cohort, b0)
                return per, (per, b)

            jac, (per, b) = jax.jacfwd(f, has_aux=True)(x)
            return per, b, jac

        return fns, jax.jit(with_jac)

    return per_model(model, ("focei_fit", n_occ), build)


def fit_focei(
    model: PopModel,
    cohort: Cohort,
    *,
    init: PopParams | None = None,
    maxiter: int = 1000,
    gtol: float = 1e-5,
    covariance: bool = True,
) -> FOCEIResult:
    """Estimate the population parameters of ``model`` by FOCEI.

    The outer problem is minimised with scipy's BFGS on the unconstrained scale
    (:mod:`phems_clinical.pk.packing`) using exact JAX gradients; the inner modes are
    warm-started from the previous evaluation and differentiated implicitly.
    Standard errors: ``R`` is the Hessian of the OFV (central differences of the
    exact gradient, as NONMEM differentiates numerically), ``S`` the cross-product
    of per-subject OFV gradients; both are mapped to NONMEM's scale (theta, omega,
    sigma variances) by the delta method, exact at the optimum.
    """
    start = time.perf_counter()
    base = initial_params(model) if init is None else init
    packer = build_packer(model, base)
    n_occ = n_occasions(cohort)
    fns, with_jac = compiled_fit_functions(model, n_occ)
    state = {"b": jnp.zeros((cohort.n_subjects, fns.n_b))}

    def evaluate(x):
        per, b, jac = with_jac(jnp.asarray(x), base, cohort, state["b"])
        return np.asarray(per), b, np.asarray(jac)

    def fun(x):
        per, b, jac = evaluate(x)
        val, g = float(per.sum()), jac.sum(axis=0)
        if np.isfinite(val) and np.all(np.isfinite(g)):
            state["b"] = b
            return val, g
        return np.inf, np.zeros_like(g)

    x0 = np.asarray(packer.pack(base), dtype=np.float64)
    per, b, jac = evaluate(x0)
    bad = _nonfinite_subjects(per, jac)
    if bad or not np.all(np.isfinite(x0)):
        # BFGS would see a zero gradient here and report success at once.
        x, n_iter, success = x0, 0, False
        message = (
            f"the objective or its gradient is not finite at the start "
            f"values ({len(bad)} of {cohort.n_subjects} subject(s)); "
            "nothing was estimated"
        )
    else:
        import scipy.optimize  # here: not on the dosing tool's start-up path

        res = scipy.optimize.minimize(
            fun, x0, jac=True, method="BFGS", options={"maxiter": maxiter, "gtol": gtol}
        )
        x, n_iter, message = res.x, int(res.nit), str(res.message)
        success = bool(res.success)
        per, b, jac = evaluate(x)
        bad = _nonfinite_subjects(per, jac)
        if bad or not np.all(np.isfinite(x)):
            message = (
                f"the objective or its gradient is not finite at the final "
                f"estimates ({len(bad)} of {cohort.n_subjects} subject(s)); "
                f"optimiser: {message}"
            )
    params = packer.unpack(jnp.asarray(x))
    eta, kappa = jax.vmap(fns.unflatten)(b)
    finite = not bad and bool(np.all(np.isfinite(x)))
    grad_norm = float(np.max(np.abs(jac.sum(axis=0)))) if jac.size else 0.0
    # BFGS reports "precision loss" when it sits at the optimum and cannot improve
    # further in double precision; judge convergence by the final gradient.
    converged = finite and (success or (n_iter > 0 and grad_norm < 1e-3))

    nat = np.asarray(packer.to_natural(params))
    se = se_sw = np.full(nat.shape, np.nan)
    if covariance and nat.size and finite:
        se, se_sw = _standard_errors(
            res.x,
            jac,
            lambda x: evaluate(x)[2].sum(0),
            lambda x: packer.to_natural(packer.unpack(x)),
        )
    omega_diag = np.diag(np.asarray(params.omega))
    eta_np = np.asarray(eta)
    # NONMEM >= 7.5 ETASHRINKSD uses the population SD (ddof=0) of the EBEs.
    shrink = (
        100.0 * (1.0 - eta_np.std(axis=0) / np.sqrt(omega_diag))
        if eta_np.size
        else np.zeros((0,))
    )
    return FOCEIResult(
        params=params,
        ofv=float(per.sum()),
        ofv_subjects=per,
        etas=eta_np,
        kappas=np.asarray(kappa),
        natural_names=packer.natural_names,
        estimates=nat,
        se=se,
        se_sandwich=se_sw,
        shrinkage_sd=shrink,
        converged=converged,
        n_iterations=n_iter,
        message=message,
        seconds=time.perf_counter() - start,
        nonfinite_subjects=tuple(bad),
    )


def _nonfinite_subjects(per: np.ndarray, jac: np.ndarray) -> list[int]:
    """Cohort indices whose OFV contribution or its gradient is not finite."""
    ok = np.isfinite(per) & np.all(np.isfinite(jac.reshape(per.shape[0], -1)), axis=1)
    return [int(i) for i in np.flatnonzero(~ok)]


def _standard_errors(x, jac, grad_fn, to_natural):
    """R-based (``2 R^-1``) and sandwich (``R^-1 S R^-1``) SEs on NONMEM's scale."""
    n = x.size
    r = np.zeros((n, n))
    for k in range(n):
        h = 1e-4 * max(1.0, abs(x[k]))
        e = np.zeros(n)
        e[k] = h
        r[:, k] = (grad_fn(x + e) - grad_fn(x - e)) / (2 * h)
    return r_standard_errors(x, r, to_natural, s=jac.T @ jac)


def r_standard_errors(x, r, to_natural, s=None):
    """Standard errors of the natural-scale estimates from ``R``, the Hessian of the
    OFV (-2 log-likelihood) with respect to the free parameters ``x``: the
    covariance is ``A (2 R^-1) A^T`` with ``A`` the Jacobian of ``to_natural`` at
    ``x`` (delta method), NONMEM's ``MATRIX=R``; with ``s`` (the summed outer
    products of the subjects' OFV gradients) also the sandwich ``A R^-1 S R^-1 A^T``
    (NONMEM's default). Returns ``(se_r, se_sandwich)``; NaN where ``R`` is
    singular, NaN sandwich without ``s``."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    r = 0.5 * (np.asarray(r, dtype=np.float64) + np.asarray(r, dtype=np.float64).T)
    a = np.asarray(jax.jacfwd(to_natural)(jnp.asarray(x)))
    nan = np.full(a.shape[0], np.nan)
    try:
        r_inv = np.linalg.inv(r)
    except np.linalg.LinAlgError:
        return nan, nan
    if not np.all(np.isfinite(r_inv)) or n == 0:
        return nan, nan
    cov_r = a @ (2.0 * r_inv) @ a.T
    with np.errstate(invalid="ignore"):
        se_r = np.sqrt(np.diag(cov_r))
        if s is None:
            return se_r, nan
        cov_sw = a @ (r_inv @ np.asarray(s) @ r_inv) @ a.T
        return se_r, np.sqrt(np.diag(cov_sw))


__all__ = [
    "FOCEIFns",
    "FOCEIResult",
    "build_focei",
    "compiled_focei",
    "fit_focei",
    "focei_objective",
    "r_standard_errors",
    "compiled_fit_functions",
]
