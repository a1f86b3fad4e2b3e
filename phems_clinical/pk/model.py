"""Pure JAX building blocks shared by every estimator (FOCEI, NUTS, SVI, MAP).

All functions are single-subject and take the :class:`~phems_clinical.pk.spec.PopModel`
as a plain Python argument (it fixes shapes and structure); close over it with
``functools.partial`` before ``jax.jit``/``jax.vmap``.

Parameter scales (NONMEM conventions, so estimates compare directly):

* ``theta``: natural-scale fixed effects in ``model.theta_names`` order;
* ``omega``: IIV covariance of ``eta`` (log scale), ``omega_iov``: IOV covariance of
  ``kappa`` (the same for every occasion, occasions independent);
* ``sigma``: residual standard deviations ``(additive IU/dL, proportional fraction)``
  combined as ``model.residual.form`` says (:func:`residual_variance`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from phems_clinical._typing import Array, Float
from phems_clinical.data.cohort import Cohort
from phems_clinical.pk.analytic import concentration
from phems_clinical.pk.occasions import occasion_concentration
from phems_clinical.pk.spec import PopModel, Residual

_OPS = {
    "<": jnp.less,
    "<=": jnp.less_equal,
    ">": jnp.greater,
    ">=": jnp.greater_equal,
    "==": jnp.equal,
    "!=": jnp.not_equal,
}


class PopParams(NamedTuple):
    """Population parameters on their natural (reported) scale.

    theta : (n_theta,) fixed effects, ``model.theta_names`` order.
    omega : (n_eta, n_eta) IIV covariance (log-scale variances).
    omega_iov : (n_kappa, n_kappa) IOV covariance of one occasion's ``kappa``.
    sigma : (2,) residual SDs: additive (IU/dL), proportional (fraction).
    baseline : () endogenous level (IU/dL) added to every prediction.
    """

    theta: Float[Array, " n_theta"]
    omega: Float[Array, "n_eta n_eta"]
    omega_iov: Float[Array, "n_kappa n_kappa"]
    sigma: Float[Array, 2]
    baseline: Float[Array, ""]


def _log_positive(x: Float[Array, ""], eps: float = 1e-3) -> Float[Array, ""]:
    """``log(x)`` for ``x > eps``, continued below ``eps`` by ``log(eps) - (eps - x)``.

    A linear covariate effect ``1 + theta (cov - ref)`` is only a valid multiplier
    while positive; NONMEM would fail on a negative clearance. The continuation is
    finite and increasing, so estimators stay finite (a steeper continuation would
    underflow the parameter to 0) and are pushed back to the valid region.
    """
    safe = jnp.maximum(x, eps)
    return jnp.where(x > eps, jnp.log(safe), jnp.log(eps) - (eps - x))


def initial_params(model: PopModel) -> PopParams:
    """The values written in the model specification, as a :class:`PopParams`."""
    return PopParams(
        theta=jnp.asarray(model.theta_values),
        omega=jnp.asarray(model.omega, dtype=jnp.float64).reshape(
            model.n_eta, model.n_eta
        ),
        omega_iov=jnp.asarray(model.omega_iov, dtype=jnp.float64).reshape(
            model.n_kappa, model.n_kappa
        ),
        sigma=jnp.asarray(
            [model.residual.additive, model.residual.proportional], dtype=jnp.float64
        ),
        baseline=jnp.asarray(model.baseline, dtype=jnp.float64),
    )


def covariate_vector(model: PopModel, values: dict[str, float]) -> np.ndarray:
    """Covariates in ``model.covariate_names`` order (KeyError if one is missing)."""
    missing = [c for c in model.covariate_names if c not in values]
    if missing:
        raise KeyError(f"model {model.name!r} needs covariates {missing}")
    return np.array([float(values[c]) for c in model.covariate_names])


def typical_parameters(
    model: PopModel, theta: Float[Array, " n_theta"], covariates: Float[Array, " n_cov"]
) -> Float[Array, " n_par"]:
    """Typical structural parameters (CL, V1, ...) for one subject's covariates."""
    names = model.theta_names
    cov_names = model.covariate_names
    log_tv = {p: jnp.log(theta[names.index(p)]) for p in model.structural}
    for e in model.covariate_effects:
        coef = theta[names.index(e.theta)]
        x = covariates[cov_names.index(e.covariate)]
        if e.effect == "power":
            term = coef * jnp.log(x / e.reference)
        elif e.effect == "exponential":
            term = coef * (x - e.reference)
        elif e.effect == "linear":
            d = x - e.reference
            if e.piecewise == "above":
                d = jnp.maximum(d, 0.0)
            elif e.piecewise == "below":
                d = jnp.minimum(d, 0.0)
            term = _log_positive(1.0 + coef * d)
        else:  # indicator
            if e.condition is None:
                raise ValueError(
                    f"covariate effect {e.theta}: an indicator effect "
                    "needs a condition such as ('==', 1.0)"
                )
            op, value = e.condition
            term = jnp.where(_OPS[op](x, value), jnp.log1p(coef), 0.0)
        log_tv[e.parameter] = log_tv[e.parameter] + term
    return jnp.exp(jnp.stack([log_tv[p] for p in model.structural]))


def individual_parameters(
    model: PopModel,
    theta: Float[Array, " n_theta"],
    eta: Float[Array, " n_eta"],
    kappa: Float[Array, "n_occ n_kappa"],
    covariates: Float[Array, " n_cov"],
) -> Float[Array, "n_occ n_par"]:
    """Individual parameters per occasion: ``TV * exp(eta + kappa_occ)``."""
    tv = typical_parameters(model, theta, covariates)
    n_occ = kappa.shape[0]
    log_p = jnp.broadcast_to(jnp.log(tv), (n_occ, len(model.structural)))
    for k, p in enumerate(model.iiv_parameters):
        j = model.structural.index(p)
        log_p = log_p.at[:, j].add(eta[k])
    for k, p in enumerate(model.iov_parameters):
        j = model.structural.index(p)
        log_p = log_p.at[:, j].add(kappa[:, k])
    return jnp.exp(log_p)


def predict(
    model: PopModel,
    subject: Cohort,
    theta: Float[Array, " n_theta"],
    eta: Float[Array, " n_eta"],
    kappa: Float[Array, "n_occ n_kappa"],
    baseline: Float[Array, ""],
    times: Float[Array, " n_t"] | None = None,
) -> Float[Array, " n_t"]:
    """Predicted level (IU/dL) at ``times`` (default: the subject's observation times).

    With IOV and more than one occasion, the parameters switch with NONMEM's
    semantics: from each dose on, all drug in the body follows the parameters of
    that dose's occasion (occasion ``k`` starts at its first dose), see
    :func:`phems_clinical.pk.occasions.occasion_concentration`. Otherwise (no IOV,
    or one occasion: ``kappa.shape[0] == 1``) plain superposition,
    :func:`phems_clinical.pk.analytic.concentration`.
    """
    params = individual_parameters(model, theta, eta, kappa, subject.covariates)
    t = subject.obs_time if times is None else times
    if model.n_kappa and kappa.shape[0] > 1:
        return occasion_concentration(
            t,
            subject.dose_time,
            subject.dose_amt,
            subject.dose_dur,
            subject.dose_occ,
            params,
            model.n_cmt,
            baseline,
        )
    per_dose = params[subject.dose_occ]
    return concentration(
        t,
        subject.dose_time,
        subject.dose_amt,
        subject.dose_dur,
        per_dose,
        model.n_cmt,
        baseline,
    )


def residual_variance(
    f: Float[Array, " n_obs"], sigma: Float[Array, 2], form: str = "combined2"
) -> Float[Array, " n_obs"]:
    """Residual variance of a level given its prediction ``f`` (IU/dL).

    ``combined2`` (NONMEM ``Y = F + F*EPS(1) + EPS(2)``): ``add**2 + (prop * f)**2``;
    ``combined1`` (Monolix): ``(add + prop * f)**2``, Allard et al., Pharmaceutics
    2020;12:380, Eq. 3. ``form`` is ``model.residual.form`` (static).
    """
    if form == "combined1":
        return (sigma[0] + sigma[1] * jnp.abs(f)) ** 2
    if form != "combined2":
        raise ValueError(f"residual form {form!r} is not combined1 or combined2")
    return sigma[0] ** 2 + (sigma[1] * f) ** 2


def iov_covariance(
    omega_iov: Float[Array, "n_kappa n_kappa"], n_occ: int
) -> Float[Array, "n n"]:
    """Covariance of ``kappa`` flattened occasion by occasion (``(n_occ, n_kappa)``
    row-major): ``n_occ`` independent copies of ``omega_iov`` on the diagonal."""
    return jnp.kron(jnp.eye(n_occ), jnp.asarray(omega_iov))


def obs_neg2ll(
    subject: Cohort,
    f: Float[Array, " n_obs"],
    sigma: Float[Array, 2],
    form: str = "combined2",
) -> Float[Array, " n_obs"]:
    """Per-observation -2 log-likelihood without the 2*pi constant (NONMEM style).

    Quantified samples: ``log V + (y - f)**2 / V`` with ``V`` from
    :func:`residual_variance` in the residual ``form``. BLQ samples use the M3 method
    (Beal, J Pharmacokinet Pharmacodyn 2001;28:481-504): ``-2 log Phi((LLOQ - f)/sd)``.
    Padded observations contribute 0.
    """
    var = residual_variance(f, sigma, form)
    quant = jnp.log(var) + (subject.obs_dv - f) ** 2 / var
    blq = -2.0 * log_ndtr((subject.obs_lloq - f) / jnp.sqrt(var))
    out = jnp.where(subject.obs_blq, blq, quant)
    return jnp.where(subject.obs_mask, out, 0.0)


def likelihood_cohort(model: PopModel, cohort: Cohort) -> Cohort:
    """The cohort as the likelihood sees it: with ``blq: drop`` BLQ samples are
    masked out; with ``blq: m3`` they stay and enter through M3."""
    if model.blq == "drop":
        return cohort._replace(obs_mask=cohort.obs_mask & ~cohort.obs_blq)
    return cohort


def n_occasions(cohort: Cohort) -> int:
    """Number of occasions present in a cohort (static shape for ``kappa``)."""
    return int(max(int(jnp.max(cohort.dose_occ)), int(jnp.max(cohort.obs_occ)))) + 1


def residual_from_sigma(
    sigma: np.ndarray, fixed: bool = False, form: str = "combined2"
) -> Residual:
    """Convert estimated residual SDs back into a spec :class:`Residual`."""
    return Residual(float(sigma[0]), float(sigma[1]), fixed, form)


__all__ = [
    "PopParams",
    "covariate_vector",
    "individual_parameters",
    "initial_params",
    "iov_covariance",
    "likelihood_cohort",
    "n_occasions",
    "obs_neg2ll",
    "predict",
    "residual_from_sigma",
    "residual_variance",
    "typical_parameters",
]
