"""Fully Bayesian population PK: a NumPyro model, NUTS and structured SVI.

Generative model (units: time h, amounts IU, volumes dL, clearances dL/h, levels
IU/dL), for a :class:`~phems_clinical.pk.spec.PopModel` and a padded
:class:`~phems_clinical.data.cohort.Cohort` of ``N`` subjects with ``O`` occasions:

Population (global) sites

* ``theta_<NAME>`` for every *free* fixed effect (``not theta.fixed``; fixed ones
  are constants at their specification value): typical values such as ``CL``
  (dL/h) and ``V1`` (dL) with ``lower == 0`` get a LogNormal prior, covariate
  coefficients without bounds a Normal prior, and bounded ones a Normal prior on
  the scale that maps their bounds onto the real line (logit between two bounds,
  log of the distance to a single bound), see :func:`weak_priors`;
* ``omega_sd_<P>``: SD of the log-scale IIV of structural parameter ``P``
  (approximately its CV), for ``P`` in ``model.iiv_parameters``;
  ``omega_corr_<P1>_<P2>...``: an LKJ Cholesky factor (concentration 2) of the
  correlation within each IIV block with more than one parameter
  (``model.omega_blocks``). The IIV covariance is
  ``Omega = L L'`` with ``L = blockdiag(diag(omega_sd_b) R_b)``. With
  ``model.omega_fixed`` these are constants (``Omega`` of the specification) and
  none of the sites exist;
* ``omega_iov_sd_<P>``: SD of the log-scale inter-occasion variability of ``P``
  (absent with ``model.omega_iov_fixed``: the specification's IOV block is used);
* ``sigma_additive`` (IU/dL), ``sigma_proportional`` (fraction): residual SDs, for
  the components that are non-zero in the specification (unless
  ``model.residual.fixed``);
* ``baseline`` (IU/dL): endogenous level, if ``model.baseline_estimated``.

Subjects (local sites, ``numpyro.plate("subject", N)``), non-centred

* ``z``: ``(N, n_eta)`` standard normal; ``eta_i = L z_i`` so
  ``eta_i ~ N(0, Omega)``;
* ``kappa_z``: ``(O, N, n_kappa)`` standard normal inside the nested
  ``numpyro.plate("occasion", O, dim=-2)``; ``kappa_io = omega_iov_sd * kappa_z``
  (a fixed IOV block, ``iov.fixed: true``, may be correlated: ``kappa_io =
  L_iov kappa_z``; an estimated one is diagonal).

Likelihood: individual parameters ``P_io = TV(theta, cov_i) exp(eta_i + kappa_io)``,
prediction ``f_ij`` from :func:`phems_clinical.pk.model.predict` (IU/dL), and
``y_ij ~ N(f_ij, V_ij)`` with ``V_ij`` of the model's residual form
(:func:`~phems_clinical.pk.model.residual_variance`); a BLQ sample contributes
``Phi((LLOQ - f_ij) / sd_ij)`` (M3). It enters as
``numpyro.factor("obs", -0.5 * sum_j obs_neg2ll_ij)`` per subject, i.e. NONMEM's
-2LL without the ``log(2 pi)`` per quantified sample: a constant that does not
depend on any parameter, so it changes neither the posterior, nor NUTS, nor the
ELBO's gradients (only the ELBO's value, by a constant). With ``model.blq ==
"drop"`` the BLQ rows are excluded from the likelihood instead.

References
----------
Lewandowski D, Kurowicka D, Joe H. Generating random correlation matrices based on
vines and extended onion method. J Multivar Anal 2009;100:1989-2001 (LKJ).
Beal SL. Ways to fit a PK model with some data below the quantification limit.
J Pharmacokinet Pharmacodyn 2001;28:481-504 (M3).
Hoffman MD, Gelman A. The No-U-Turn sampler. JMLR 2014;15:1593-1623.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pandas as pd
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO, init_to_value
from numpyro.infer.autoguide import AutoGuideList, AutoMultivariateNormal, AutoNormal
from numpyro.optim import optax_to_numpyro

from phems_clinical._typing import Array, Float, Key
from phems_clinical.data.cohort import Cohort
from phems_clinical.pk._cache import per_model
from phems_clinical.pk.focei import build_focei
from phems_clinical.pk.model import (
    PopParams,
    initial_params,
    likelihood_cohort,
    n_occasions,
    obs_neg2ll,
    predict,
    typical_parameters,
)
from phems_clinical.pk.packing import build_packer
from phems_clinical.pk.spec import PopModel, Theta, check_iov_estimable

LOCAL_SITES = ("z", "phi", "eta", "kappa_z")
"""Per-subject latent sites (the federated engine keeps these at the site)."""

RHAT_MAX = 1.1
"""Largest split R-hat of a converged NUTS fit (rank-normalised, Vehtari et al.,
Bayesian Anal 2021;16:667-718): the conventional 1.1 of Gelman & Rubin (Stat Sci
1992;7:457-472), as in ``tests/pk/test_recovery.py``. Vehtari et al. recommend 1.01
for final results; pass ``max_r_hat`` to be stricter."""

MAX_DIVERGENT = 0
"""Most divergent transitions after warm-up in a converged NUTS fit: a divergence
means the sampler missed part of the posterior, so its draws may be biased
(Betancourt, arXiv:1701.02434, 2017, section 6.2)."""

_SIGMA_NAMES = ("additive", "proportional")
_SUMMARY_COLUMNS = (
    "mean",
    "sd",
    "median",
    "q5",
    "q95",
    "r_hat",
    "ess_bulk",
    "ess_tail",
)


class Priors(NamedTuple):
    """Prior distributions of the population sites, on their natural scale.

    theta : dict name -> Distribution
        One entry per free fixed effect (``model.theta_names`` with
        ``not fixed``); its support must respect the NONMEM bounds.
    omega_sd : dict parameter -> Distribution
        SD of the log-scale IIV of each parameter in ``model.iiv_parameters``.
    omega_corr_concentration : float
        LKJ concentration of every IIV block with correlations (1 is uniform over
        correlation matrices, 2 shrinks gently towards independence).
    omega_iov_sd : dict parameter -> Distribution
        SD of the log-scale IOV of each parameter in ``model.iov_parameters``.
    sigma : dict ``"additive"``/``"proportional"`` -> Distribution
        Residual SDs (IU/dL and fraction), for the estimated components.
    baseline : Distribution or None
        Endogenous level (IU/dL) if ``model.baseline_estimated``.
    """

    theta: dict
    omega_sd: dict
    omega_corr_concentration: float
    omega_iov_sd: dict
    sigma: dict
    baseline: dist.Distribution | None


class BayesResult(NamedTuple):
    """Outcome of :func:`fit_nuts` or :func:`fit_svi`.

    samples : dict natural name -> (n_draws,) array
        Draws on NONMEM's scale, keyed by
        :func:`~phems_clinical.pk.packing.build_packer`'s ``natural_names``
        (``THETA(CL)``, ``OMEGA(CL,CL)`` as a variance/covariance,
        ``OMEGA_IOV(CL)`` and ``SIGMA(proportional)`` as variances, ``BASELINE``).
    summary : DataFrame
        Index natural names; columns mean, sd, median, q5, q95, r_hat, ess_bulk,
        ess_tail (R-hat/ESS are NaN for SVI, whose draws are independent).
    etas, eta_sd : (n_sub, n_eta)
        Posterior mean and SD of each subject's IIV ``eta``.
    params : PopParams
        The posterior mean of the natural-scale vector, as :class:`PopParams`
        (``sigma`` holds SDs, the square roots of the posterior mean variances).
    n_divergent : int
        Divergent NUTS transitions after warm-up (0 for SVI).
    method : ``"nuts"`` or ``"svi"``
    seconds : float
        Wall-clock time of the fit.
    elbo : (num_steps,) array or None
        SVI loss (negative ELBO, up to the constant above) per step.
    inference_data : arviz.InferenceData or None
        NUTS draws of every site, plus the natural-scale draws in ``posterior``.
    converged : bool
        Every draw, posterior mean and (SVI) the final loss are finite; for NUTS
        also the largest split R-hat is below ``max_r_hat`` and there are at most
        ``max_divergent`` divergent transitions (:data:`RHAT_MAX`,
        :data:`MAX_DIVERGENT` by default).
    message : str
        Why the fit is not converged ('' when it is).
    """

    samples: dict
    summary: pd.DataFrame
    etas: np.ndarray
    eta_sd: np.ndarray
    params: PopParams
    n_divergent: int
    method: str
    seconds: float
    elbo: np.ndarray | None
    inference_data: object
    converged: bool = True
    message: str = ""


# ---------------------------------------------------------------------------
# Priors


def _block_name(block: tuple[str, ...]) -> str:
    return "omega_corr_" + "_".join(block)


def _theta_prior(t: Theta, scale: float, coef_scale: float) -> dist.Distribution:
    """Normal on the scale that maps ``(lower, upper)`` onto the real line.

    The transforms are :func:`numpyro.distributions.transforms.biject_to` of the
    bounded constraint, so the prior's ``support`` is the bounded interval and NUTS
    and the autoguides sample on the matching unconstrained scale.
    """
    lo, hi, v = t.lower, t.upper, t.value
    if math.isfinite(lo) and math.isfinite(hi):
        u = min(max((v - lo) / (hi - lo), 1e-9), 1.0 - 1e-9)
        return dist.TransformedDistribution(
            dist.Normal(math.log(u) - math.log1p(-u), scale),
            biject_to(constraints.interval(lo, hi)),
        )
    if lo == 0.0:
        return dist.LogNormal(math.log(max(v, 1e-12)), scale)
    if math.isfinite(lo):
        d = max(v - lo, 1e-9 * (1.0 + abs(lo)))
        return dist.TransformedDistribution(
            dist.Normal(math.log(d), scale), biject_to(constraints.greater_than(lo))
        )
    if math.isfinite(hi):
        d = max(hi - v, 1e-9 * (1.0 + abs(hi)))
        return dist.TransformedDistribution(
            dist.Normal(math.log(d), scale), biject_to(constraints.less_than(hi))
        )
    return dist.Normal(v, coef_scale)


def _spec_sds(model: PopModel) -> tuple[dict, dict, dict]:
    om = np.asarray(model.omega, dtype=np.float64).reshape(model.n_eta, model.n_eta)
    iiv = {p: float(np.sqrt(om[k, k])) for k, p in enumerate(model.iiv_parameters)}
    iov = {
        p: float(np.sqrt(model.omega_iov[k, k]))
        for k, p in enumerate(model.iov_parameters)
    }
    res = {
        "additive": model.residual.additive,
        "proportional": model.residual.proportional,
    }
    return iiv, iov, res


def _estimated_sigma(model: PopModel) -> tuple[str, ...]:
    if model.residual.fixed:
        return ()
    return tuple(
        n
        for n, v in zip(
            _SIGMA_NAMES,
            (model.residual.additive, model.residual.proportional),
            strict=True,
        )
        if v > 0
    )


def coef_scale(model: PopModel, t: Theta) -> float:
    """Weak prior SD of an unbounded covariate coefficient, on its own scale.

    Power exponents are O(1): SD 1. Linear and exponential coefficients are per
    covariate unit (e.g. per year of age), so a unit SD would be absurdly wide (and
    makes 1 + theta (cov - ref) negative); use ``max(2 |value|, 0.01)``.
    """
    for e in model.covariate_effects:
        if e.theta == t.name and e.effect in ("linear", "exponential"):
            return max(2.0 * abs(t.value), 0.01)
    return 1.0


def weak_priors(model: PopModel) -> Priors:
    """Weakly informative priors centred on the specification's values.

    * positive typical values (``lower == 0``): ``LogNormal(log value, 1)`` (a
      factor e either way is one prior SD);
    * unbounded covariate coefficients: ``Normal(value, s)`` with ``s = 1`` for power
      exponents and ``max(2|value|, 0.01)`` for linear/exponential coefficients
      (per covariate unit); bounded fixed effects:
      ``Normal(transformed value, 1)`` on the logit / log-distance scale;
    * IIV and IOV SDs (log scale): ``HalfNormal(1)``; LKJ concentration 2;
    * residual SDs: ``HalfNormal(max(2 * value, 0.01))`` (IU/dL or fraction);
    * baseline (IU/dL): ``HalfNormal(max(2 * value, 1))``.
    """
    _, _, res = _spec_sds(model)
    return Priors(
        theta={
            t.name: _theta_prior(t, 1.0, coef_scale(model, t))
            for t in model.thetas
            if not t.fixed
        },
        omega_sd={p: dist.HalfNormal(1.0) for p in model.iiv_parameters},
        omega_corr_concentration=2.0,
        omega_iov_sd={p: dist.HalfNormal(1.0) for p in model.iov_parameters},
        sigma={
            n: dist.HalfNormal(max(2.0 * res[n], 0.01)) for n in _estimated_sigma(model)
        },
        baseline=(
            dist.HalfNormal(max(2.0 * model.baseline, 1.0))
            if model.baseline_estimated
            else None
        ),
    )


def library_priors(
    model: PopModel, *, theta_cv: float = 0.2, sd_cv: float = 0.3
) -> Priors:
    """Informative priors centred on a product-library model's published values.

    ``model`` is the library entry (:func:`~phems_clinical.pk.library.load_product`).
    Typical values get ``LogNormal(log value, theta_cv)`` (bounded ones ``theta_cv``
    on their transformed scale; unbounded coefficients
    ``Normal(value, theta_cv * max(|value|, 0.05))``); IIV, IOV and residual SDs and
    a positive baseline get ``LogNormal(log value, sd_cv)``. This is the prior of the
    clinician-facing (MAP / posterior) dosing use-case.

    .. warning:: The library values must be in the cohort's units (dL, dL/h, IU/dL).
    """
    iiv, iov, res = _spec_sds(model)
    base = None
    if model.baseline_estimated:
        base = (
            dist.LogNormal(math.log(model.baseline), sd_cv)
            if model.baseline > 0
            else dist.HalfNormal(1.0)
        )
    return Priors(
        theta={
            t.name: _theta_prior(t, theta_cv, theta_cv * max(abs(t.value), 0.05))
            for t in model.thetas
            if not t.fixed
        },
        omega_sd={p: dist.LogNormal(math.log(s), sd_cv) for p, s in iiv.items()},
        omega_corr_concentration=2.0,
        omega_iov_sd={p: dist.LogNormal(math.log(s), sd_cv) for p, s in iov.items()},
        sigma={
            n: dist.LogNormal(math.log(res[n]), sd_cv) for n in _estimated_sigma(model)
        },
        baseline=base,
    )


def _check_priors(model: PopModel, priors: Priors) -> None:
    check_iov_estimable(model)
    need = {
        "theta": [t.name for t in model.thetas if not t.fixed],
        "omega_sd": [] if model.omega_fixed else list(model.iiv_parameters),
        "omega_iov_sd": [] if model.omega_iov_fixed else list(model.iov_parameters),
        "sigma": list(_estimated_sigma(model)),
    }
    for field_name, names in need.items():
        missing = [n for n in names if n not in getattr(priors, field_name)]
        if missing:
            raise KeyError(f"priors.{field_name} lacks entries for {missing}")
    if model.baseline_estimated and priors.baseline is None:
        raise KeyError("priors.baseline is None but the model estimates a baseline")


# ---------------------------------------------------------------------------
# The model


def _sample_population(model: PopModel, priors: Priors) -> dict:
    g = {}
    for t in model.thetas:
        if not t.fixed:
            g[f"theta_{t.name}"] = numpyro.sample(
                f"theta_{t.name}", priors.theta[t.name]
            )
    if not model.omega_fixed:
        for p in model.iiv_parameters:
            g[f"omega_sd_{p}"] = numpyro.sample(f"omega_sd_{p}", priors.omega_sd[p])
        for b in model.omega_blocks:
            if len(b) > 1:
                g[_block_name(b)] = numpyro.sample(
                    _block_name(b),
                    dist.LKJCholesky(len(b), priors.omega_corr_concentration),
                )
    if not model.omega_iov_fixed:
        for p in model.iov_parameters:
            g[f"omega_iov_sd_{p}"] = numpyro.sample(
                f"omega_iov_sd_{p}", priors.omega_iov_sd[p]
            )
    for n in _estimated_sigma(model):
        g[f"sigma_{n}"] = numpyro.sample(f"sigma_{n}", priors.sigma[n])
    if model.baseline_estimated:
        g["baseline"] = numpyro.sample("baseline", priors.baseline)
    return g


def _assemble(model: PopModel, g: dict):
    """Population sites -> (PopParams, IIV scale L with ``L L' = Omega``, IOV scale
    ``L_iov`` with ``L_iov L_iov' = omega_iov``: the Cholesky factor of a fixed
    (possibly correlated) block, else the diagonal of the sampled SDs)."""
    theta = jnp.asarray(model.theta_values)
    for i, t in enumerate(model.thetas):
        if not t.fixed:
            theta = theta.at[i].set(g[f"theta_{t.name}"])
    n_eta = model.n_eta
    if model.omega_fixed:
        om = np.asarray(model.omega, np.float64).reshape(n_eta, n_eta)
        scale = jnp.asarray(np.linalg.cholesky(om) if n_eta else om)
    else:
        eta_names = model.iiv_parameters
        scale = jnp.zeros((n_eta, n_eta))
        for b in model.omega_blocks:
            idx = np.array([eta_names.index(p) for p in b])
            sd = jnp.stack([g[f"omega_sd_{p}"] for p in b])
            corr = g[_block_name(b)] if len(b) > 1 else jnp.ones((1, 1))
            scale = scale.at[np.ix_(idx, idx)].set(sd[:, None] * corr)
    if model.omega_iov_fixed or not model.n_kappa:
        om_iov = np.asarray(model.omega_iov, np.float64).reshape(
            model.n_kappa, model.n_kappa
        )
        iov_scale = jnp.asarray(np.linalg.cholesky(om_iov) if model.n_kappa else om_iov)
    else:
        iov_scale = jnp.diag(
            jnp.stack([g[f"omega_iov_sd_{p}"] for p in model.iov_parameters])
        )
    sigma = jnp.asarray(
        [model.residual.additive, model.residual.proportional], dtype=jnp.float64
    )
    for k, n in enumerate(_SIGMA_NAMES):
        if f"sigma_{n}" in g:
            sigma = sigma.at[k].set(g[f"sigma_{n}"])
    baseline = g.get("baseline", jnp.asarray(model.baseline, jnp.float64))
    params = PopParams(theta, scale @ scale.T, iov_scale @ iov_scale.T, sigma, baseline)
    return params, scale, iov_scale


def _subject_loglik_impl(
    model: PopModel,
    data: Cohort,
    params: PopParams,
    eta: Float[Array, "n_sub n_eta"],
    kappa: Float[Array, "n_sub n_occ n_kappa"],
) -> Float[Array, " n_sub"]:
    """``-0.5 * sum_j obs_neg2ll`` per subject: single-subject ``predict``, vmapped."""
    f = jax.vmap(partial(predict, model), in_axes=(0, None, 0, 0, None))(
        data, params.theta, eta, kappa, params.baseline
    )
    n2ll = jax.vmap(
        partial(obs_neg2ll, form=model.residual.form), in_axes=(0, 0, None)
    )(data, f, params.sigma)
    return -0.5 * jnp.sum(n2ll, axis=-1)


def subject_loglik(model: PopModel):
    """A jitted :func:`_subject_loglik_impl` for ``model``, one per model object.

    Why jit inside the library: NumPyro evaluates the model eagerly while it
    initialises NUTS and autoguides (and in ``log_density``); eagerly, every
    primitive of the PK engine and of its gradient is compiled on its own (hundreds
    of small XLA compilations). One jitted function compiles once; inside the
    estimators' own ``jit``/``grad`` it is simply inlined.
    """
    return per_model(
        model, ("loglik",), lambda: jax.jit(partial(_subject_loglik_impl, model))
    )


def population_model(
    model: PopModel,
    cohort: Cohort,
    *,
    priors: Priors,
    n_occ: int = 1,
    centered: bool = False,
) -> None:
    """NumPyro model of a population PK study (see the module docstring).

    Parameters
    ----------
    model : PopModel
        Structure, bounds, fixed flags and IIV blocks (values are used only
        through ``priors`` and for fixed quantities).
    cohort : Cohort
        Batched cohort, leading axis ``n_sub``.
    priors : Priors
        From :func:`weak_priors`, :func:`library_priors` or hand-built.
    n_occ : int
        Number of occasions (static), at least ``n_occasions(cohort)`` when the
        model has IOV.
    centered : bool
        Sample the log individual parameters ``phi_i ~ MVN(log TV_i(theta), Omega)``
        (site ``phi``; ``eta = phi - log TV`` is recorded as ``eta``) instead of the
        non-centred ``eta = L z`` (site ``z``). Centred suits rich individual data,
        non-centred sparse data (Papaspiliopoulos, Roberts & Skold, Stat Sci
        2007;22:59-73).
    """
    _check_priors(model, priors)
    g = _sample_population(model, priors)
    params, scale, iov_scale = _assemble(model, g)
    n_sub = cohort.n_subjects
    data = likelihood_cohort(model, cohort)
    with numpyro.plate("subject", n_sub, dim=-1):
        eta, kappa = sample_random_effects(
            model, params.theta, scale, iov_scale, cohort.covariates, n_occ, centered
        )
        numpyro.factor("obs", subject_loglik(model)(data, params, eta, kappa))


def sample_random_effects(
    model: PopModel,
    theta,
    scale,
    iov_scale,
    covariates,
    n_occ: int,
    centered: bool,
    *,
    record_eta: bool = True,
):
    """Inside ``numpyro.plate("subject", N)``: each subject's IIV ``eta`` (N, n_eta)
    and IOV ``kappa`` (N, n_occ, n_kappa), centred (site ``phi``) or non-centred
    (site ``z``), and ``kappa_z`` in a nested ``occasion`` plate (see
    :func:`population_model`), ``kappa = L_iov kappa_z`` with ``iov_scale`` the
    lower-triangular ``L_iov`` (``L_iov L_iov' = omega_iov``; a 1-D array is taken
    as SDs). ``record_eta`` keeps ``eta`` as a deterministic site when centred."""
    iov_scale = jnp.asarray(iov_scale)
    if iov_scale.ndim == 1:
        iov_scale = jnp.diag(iov_scale)
    n_sub, n_eta, n_kappa = covariates.shape[0], model.n_eta, model.n_kappa
    if n_eta and centered:
        mu = log_typical_iiv(model, theta, covariates)
        phi = numpyro.sample("phi", dist.MultivariateNormal(mu, scale_tril=scale))
        eta = numpyro.deterministic("eta", phi - mu) if record_eta else phi - mu
    elif n_eta:
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([n_eta]).to_event(1))
        eta = z @ scale.T
    else:
        eta = jnp.zeros((n_sub, 0))
    if n_kappa:
        with numpyro.plate("occasion", n_occ, dim=-2):
            kz = numpyro.sample(
                "kappa_z", dist.Normal(0.0, 1.0).expand([n_kappa]).to_event(1)
            )
        kappa = jnp.swapaxes(kz, 0, 1) @ iov_scale.T
    else:
        kappa = jnp.zeros((n_sub, n_occ, 0))
    return eta, kappa


def log_typical_iiv(model: PopModel, theta, covariates):
    """log typical values of the IIV parameters per subject, (n_sub, n_eta)."""
    idx = np.array([model.structural.index(p) for p in model.iiv_parameters])
    tv = jax.vmap(lambda c: typical_parameters(model, theta, c))(covariates)
    return jnp.log(tv[:, idx])


def _site_values(model: PopModel, params: PopParams) -> dict:
    """Population site values that reproduce ``params`` (a point in the support)."""
    v = {
        f"theta_{t.name}": params.theta[i]
        for i, t in enumerate(model.thetas)
        if not t.fixed
    }
    if not model.omega_fixed:
        om = np.asarray(params.omega, np.float64).reshape(model.n_eta, model.n_eta)
        for k, p in enumerate(model.iiv_parameters):
            v[f"omega_sd_{p}"] = jnp.sqrt(om[k, k])
        for b in model.omega_blocks:
            if len(b) > 1:
                idx = [model.iiv_parameters.index(p) for p in b]
                sub = om[np.ix_(idx, idx)]
                sd = np.sqrt(np.diag(sub))
                v[_block_name(b)] = jnp.asarray(
                    np.linalg.cholesky(sub / np.outer(sd, sd))
                )
    if not model.omega_iov_fixed:
        for k, p in enumerate(model.iov_parameters):
            v[f"omega_iov_sd_{p}"] = jnp.sqrt(params.omega_iov[k, k])
    for n in _estimated_sigma(model):
        v[f"sigma_{n}"] = params.sigma[_SIGMA_NAMES.index(n)]
    if model.baseline_estimated:
        v["baseline"] = jnp.where(params.baseline > 0, params.baseline, 0.5)
    return v


def _init_values(model: PopModel, n_sub: int, n_occ: int) -> dict:
    """Specification values of every site, random effects at 0."""
    v = _site_values(model, initial_params(model))
    if model.n_eta:
        v["z"] = jnp.zeros((n_sub, model.n_eta))
    if model.n_kappa:
        v["kappa_z"] = jnp.zeros((n_occ, n_sub, model.n_kappa))
    return v


def _mode_solver(model: PopModel, n_occ: int):
    """Per-subject conditional modes of ``b = (eta, kappa)`` and their Laplace
    covariances ``2 H^-1`` (``H``: Hessian of the -2 log posterior), vmapped over
    subjects: FOCEI's inner objective and conditional-mode solver."""
    fns = build_focei(model, n_occ)

    def solve(params, subject):
        b = fns.map_estimate(params, subject, jnp.zeros(fns.n_b))
        h = jax.hessian(fns.inner_objective)(b, params, subject)
        return b, 2.0 * jnp.linalg.inv(h + 1e-8 * jnp.eye(fns.n_b))

    return jax.jit(jax.vmap(solve, in_axes=(None, 0)))


def _warm_start(model: PopModel, cohort: Cohort, n_occ: int, n_rounds: int = 3) -> dict:
    """Data-informed starting values for SVI (a few Laplace-EM rounds).

    Starting the non-centred model at the specification is slow to optimise: the
    ridge ``eta = L z`` (rescaling ``Omega`` against every ``z_i``) and the shift of
    a typical value against the mean of its etas have tiny, noisy ELBO gradients. So
    we alternate the conditional modes ``b_i`` and Laplace covariances ``C_i`` of
    the random effects with EM moment updates: the mean eta moves into its typical
    value (where that is a free ``lower == 0`` theta) and
    ``Omega = mean_i(b_i b_i' + C_i)`` within each block (IOV alike), floored at SD
    0.05 with correlations shrunk by 10% to stay well inside positive definiteness.
    ``C_i`` keeps poorly informed variances at their previous value instead of
    letting the shrunken modes collapse them. Finally ``z = L^-1 eta`` and
    ``kappa_z = L_iov^-1 kappa`` at the updated values.
    """
    n_sub, n_eta, n_kappa = cohort.n_subjects, model.n_eta, model.n_kappa
    params = initial_params(model)
    if n_eta + n_kappa == 0:
        return _init_values(model, n_sub, n_occ)
    data = likelihood_cohort(model, cohort)
    modes = per_model(model, ("modes", n_occ), lambda: _mode_solver(model, n_occ))
    floor = 0.05**2
    for _ in range(n_rounds):
        b, cov = (np.array(x) for x in modes(params, data))
        eta = b[:, :n_eta]
        theta = np.asarray(params.theta).copy()
        for k, p in enumerate(model.iiv_parameters):
            i = model.theta_names.index(p)
            t = model.thetas[i]
            shifted = theta[i] * np.exp(eta[:, k].mean())
            if not t.fixed and t.lower == 0.0 and shifted < t.upper:
                theta[i] = shifted
                eta[:, k] -= eta[:, k].mean()
        omega = np.asarray(params.omega)
        omega_iov = np.asarray(params.omega_iov)
        if not model.omega_fixed:
            omega = np.zeros((n_eta, n_eta))
            for blk in model.omega_blocks:
                idx = np.array([model.iiv_parameters.index(p) for p in blk])
                second = np.einsum("si,sj->ij", eta[:, idx], eta[:, idx]) / n_sub + cov[
                    :, idx[:, None], idx[None, :]
                ].mean(axis=0)
                var = np.diag(second)
                corr = second / np.sqrt(np.outer(var, var))
                corr = 0.9 * corr + 0.1 * np.eye(len(idx))
                sd = np.sqrt(np.maximum(var, floor))
                omega[np.ix_(idx, idx)] = corr * np.outer(sd, sd)
        if n_kappa and not model.omega_iov_fixed:
            kappa = b[:, n_eta:].reshape(n_sub, n_occ, n_kappa)
            kvar = np.diagonal(cov, axis1=1, axis2=2)[:, n_eta:]
            kvar = kvar.reshape(n_sub, n_occ, n_kappa)
            omega_iov = np.diag(np.maximum((kappa**2 + kvar).mean(axis=(0, 1)), floor))
        params = params._replace(
            theta=jnp.asarray(theta),
            omega=jnp.asarray(omega),
            omega_iov=jnp.asarray(omega_iov),
        )
    values = _site_values(model, params)
    _, scale, iov_scale = _assemble(model, values)
    b = modes(params, data)[0]
    if n_eta:
        values["z"] = jnp.linalg.solve(scale, b[:, :n_eta].T).T
    if n_kappa:
        kappa = b[:, n_eta:].reshape(n_sub, n_occ, n_kappa)
        values["kappa_z"] = jnp.swapaxes(
            jnp.linalg.solve(iov_scale, kappa.reshape(-1, n_kappa).T).T.reshape(
                n_sub, n_occ, n_kappa
            ),
            0,
            1,
        )
    return values


# ---------------------------------------------------------------------------
# Post-processing


def _natural_draws(model: PopModel, draws: dict):
    """Flat draws of every site -> (natural-scale matrix, eta draws, packer)."""
    packer = build_packer(model)
    glob = {k: v for k, v in draws.items() if k not in LOCAL_SITES}

    centred = "eta" in draws

    def one(g, z):
        params, scale, _ = _assemble(model, g)
        eta = None if z is None else (z if centred else z @ scale.T)
        return packer.to_natural(params), eta

    z = draws.get("eta") if centred else draws.get("z")
    if z is None and not glob:  # nothing population-level is estimated
        n_draws = next(iter(draws.values())).shape[0] if draws else 1
        nat = jnp.broadcast_to(one({}, None)[0], (n_draws, len(packer.natural_names)))
        eta = None
    elif z is None:
        nat, eta = jax.vmap(lambda g: one(g, None))(glob)
    else:
        nat, eta = jax.vmap(one)(glob, z)
    return np.asarray(nat), (None if eta is None else np.asarray(eta)), packer


def _arviz():
    """Import arviz lazily: it is slow to import and announces its refactor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _summary(names, nat_chains: np.ndarray, diagnostics: bool) -> pd.DataFrame:
    """``nat_chains``: (n_chain, n_draw, n_nat)."""
    flat = nat_chains.reshape(-1, nat_chains.shape[-1])
    rows = {}
    for k, name in enumerate(names):
        x = flat[:, k]
        row = {
            "mean": x.mean(),
            "sd": x.std(ddof=1),
            "median": np.median(x),
            "q5": np.quantile(x, 0.05),
            "q95": np.quantile(x, 0.95),
            "r_hat": np.nan,
            "ess_bulk": np.nan,
            "ess_tail": np.nan,
        }
        if diagnostics:
            az = _arviz()
            c = nat_chains[..., k]
            if c.shape[0] == 1:
                # arviz wants >= 2 chains: use the two halves of the single chain
                # (its split statistics then compare four quarters).
                half = c.shape[1] // 2
                c = c[0, : 2 * half].reshape(2, half)
            row["r_hat"] = float(az.rhat(c))
            row["ess_bulk"] = float(az.ess(c, method="bulk"))
            row["ess_tail"] = float(az.ess(c, method="tail"))
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(_SUMMARY_COLUMNS))


def _convergence(
    summary: pd.DataFrame,
    nat_chains: np.ndarray,
    eta,
    elbo,
    n_divergent: int,
    max_r_hat: float | None,
    max_divergent: int | None,
) -> str:
    """Why a fit is not converged, '' when it is (see ``BayesResult.converged``)."""
    problems = []
    finite = np.all(np.isfinite(nat_chains.reshape(-1, nat_chains.shape[-1])), axis=0)
    bad = [n for n, ok in zip(summary.index, finite, strict=True) if not ok]
    if bad:
        problems.append("non-finite draws of " + ", ".join(bad))
    if eta is not None and not np.all(np.isfinite(eta)):
        problems.append("non-finite random effects")
    if elbo is not None and (elbo.size == 0 or not np.isfinite(elbo[-1])):
        problems.append("the final SVI loss is not finite")
    if max_r_hat is not None:
        r_hat = summary["r_hat"].to_numpy(dtype=float)
        high = summary.index[~(r_hat < max_r_hat)].tolist()
        if high:
            problems.append(
                f"split R-hat >= {max_r_hat:g} for {', '.join(high)} "
                f"(largest {np.nanmax(r_hat, initial=np.nan):.3g}); "
                "run more warm-up/samples or chains"
            )
    if max_divergent is not None and n_divergent > max_divergent:
        problems.append(
            f"{n_divergent} divergent transitions (at most {max_divergent} allowed)"
        )
    return "; ".join(problems)


def _result(
    n_sub,
    nat_chains,
    packer,
    eta,
    *,
    method,
    start,
    n_divergent=0,
    elbo=None,
    idata=None,
    diagnostics=False,
    max_r_hat=None,
    max_divergent=None,
) -> BayesResult:
    names = packer.natural_names
    flat = nat_chains.reshape(-1, nat_chains.shape[-1])
    samples = {name: flat[:, k] for k, name in enumerate(names)}
    summary = _summary(names, nat_chains, diagnostics)
    why = _convergence(
        summary, nat_chains, eta, elbo, int(n_divergent), max_r_hat, max_divergent
    )
    if eta is None:
        etas = np.zeros((n_sub, 0))
        eta_sd = np.zeros((n_sub, 0))
    else:
        etas, eta_sd = eta.mean(axis=0), eta.std(axis=0, ddof=1)
    params = packer.from_natural(jnp.asarray(flat.mean(axis=0)))
    return BayesResult(
        samples=samples,
        summary=summary,
        etas=etas,
        eta_sd=eta_sd,
        params=params,
        n_divergent=int(n_divergent),
        method=method,
        seconds=time.perf_counter() - start,
        elbo=elbo,
        inference_data=idata,
        converged=not why,
        message=why,
    )


# ---------------------------------------------------------------------------
# Estimators


def fit_nuts(
    key: Key,
    model: PopModel,
    cohort: Cohort,
    *,
    priors: Priors | None = None,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 2,
    target_accept: float = 0.85,
    chain_method: str = "sequential",
    parameterization: str = "auto",
    max_r_hat: float = RHAT_MAX,
    max_divergent: int = MAX_DIVERGENT,
) -> BayesResult:
    """Sample the posterior of :func:`population_model` with NUTS.

    Diagonal mass matrix adapted during warm-up, chains started at the
    specification values (etas at 0). R-hat and bulk/tail ESS are the rank-normalised
    split statistics of Vehtari et al. (Bayesian Anal 2021;16:667-718), computed by
    arviz on the natural-scale draws (a single chain is split into its two halves
    first, as arviz needs two chains). ``n_divergent`` counts divergent transitions
    after warm-up over all chains. ``converged`` needs finite draws, R-hat below
    ``max_r_hat`` for every parameter and at most ``max_divergent`` divergences.

    ``parameterization``: ``"noncentered"`` suits sparse sampling (the usual
    FVIII/FIX clinical design); with rich individual data the posterior of
    ``theta`` is then tied to the mean of the ``z_i``, which a diagonal mass matrix
    cannot follow (bulk ESS of ``THETA(CL)`` ~20-40 per 300 draws with 8 samples
    per subject), and ``"centered"`` mixes far better. ``"auto"`` (default) chooses
    centred when the median subject has at least 4 quantified samples.

    Parameters
    ----------
    key : PRNG key
        Same key, same draws (chains get ``split`` keys inside NumPyro).
    priors : Priors, optional
        Defaults to :func:`weak_priors`.
    """
    start = time.perf_counter()
    priors = weak_priors(model) if priors is None else priors
    n_occ = n_occasions(cohort)
    if parameterization == "auto":
        per_subject = np.sum(np.asarray(cohort.obs_mask & ~cohort.obs_blq), axis=-1)
        parameterization = "centered" if np.median(per_subject) >= 4 else "noncentered"
    if parameterization not in ("centered", "noncentered"):
        raise ValueError("parameterization: expected auto, centered or noncentered")
    centered = parameterization == "centered"
    init = _init_values(model, cohort.n_subjects, n_occ)
    if centered and "z" in init:
        init.pop("z")
        init["phi"] = log_typical_iiv(
            model, jnp.asarray(model.theta_values), cohort.covariates
        )
    kernel = NUTS(
        partial(population_model, centered=centered),
        dense_mass=False,
        target_accept_prob=target_accept,
        init_strategy=init_to_value(values=init),
    )
    mcmc = MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method=chain_method,
        progress_bar=False,
    )
    with _finite_start():
        mcmc.run(
            key, model, cohort, priors=priors, n_occ=n_occ, extra_fields=("diverging",)
        )
    grouped = mcmc.get_samples(group_by_chain=True)
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), grouped)
    nat, eta, packer = _natural_draws(model, flat)
    nat_chains = nat.reshape(num_chains, num_samples, -1)
    n_div = int(np.sum(np.asarray(mcmc.get_extra_fields()["diverging"])))
    idata = _arviz().from_dict(
        posterior={
            **{k: np.asarray(v) for k, v in grouped.items()},
            **{name: nat_chains[..., k] for k, name in enumerate(packer.natural_names)},
        },
        sample_stats={
            "diverging": np.asarray(
                mcmc.get_extra_fields(group_by_chain=True)["diverging"]
            )
        },
    )
    return _result(
        cohort.n_subjects,
        nat_chains,
        packer,
        eta,
        method="nuts",
        start=start,
        n_divergent=n_div,
        idata=idata,
        diagnostics=True,
        max_r_hat=max_r_hat,
        max_divergent=max_divergent,
    )


class NonFiniteStartError(ValueError):
    """The log posterior (or its gradient) is not finite at the start values."""


@contextlib.contextmanager
def _finite_start():
    """NumPyro's refusal of non-finite start values as :class:`NonFiniteStartError`
    (a RuntimeError there; the cause is the data or the model's start values)."""
    try:
        yield
    except RuntimeError as err:
        if "valid initial parameters" not in str(err):
            raise
        raise NonFiniteStartError(
            "the log posterior or its gradient is not finite at the start values; "
            "nothing was estimated"
        ) from err


def _is_global_sample(msg: dict) -> bool:
    # ``block(expose=...)`` would also hide the plate messages AutoNormal needs.
    return msg["type"] == "sample" and msg["name"] not in LOCAL_SITES


def build_guide(
    model: PopModel, cohort: Cohort, *, init_values: dict | None = None
) -> AutoGuideList:
    """The structured guide: full-rank MVN over population sites, mean-field locals.

    Population sites (``theta_*``, ``omega_*``, ``sigma_*``, ``baseline``) share one
    :class:`~numpyro.infer.autoguide.AutoMultivariateNormal` (prefix ``"global"``,
    parameters ``global_loc``, ``global_scale_tril``) on the unconstrained scale, so
    their posterior correlations (CL with V1, IIV with residual) are kept; the
    per-subject sites :data:`LOCAL_SITES` get an
    :class:`~numpyro.infer.autoguide.AutoNormal` (prefix ``"local"``, parameters
    ``z_local_loc``, ``z_local_scale``, ...), which stays ``O(n_sub)`` and partitions
    by subject (what a federated site keeps to itself). Both start at
    ``init_values`` (site name -> value; default the specification, etas at 0).
    """
    if init_values is None:
        init_values = _init_values(model, cohort.n_subjects, n_occasions(cohort))
    init = init_to_value(values=init_values)
    guide = AutoGuideList(population_model, init_loc_fn=init)
    guide.append(
        AutoMultivariateNormal(
            handlers.block(population_model, hide=list(LOCAL_SITES)),
            prefix="global",
            init_loc_fn=init,
            init_scale=0.05,
        )
    )
    if model.n_eta or model.n_kappa:
        guide.append(
            AutoNormal(
                handlers.block(population_model, hide_fn=_is_global_sample),
                prefix="local",
                init_loc_fn=init,
                init_scale=0.1,
            )
        )
    return guide


def fit_svi(
    key: Key,
    model: PopModel,
    cohort: Cohort,
    *,
    priors: Priors | None = None,
    num_steps: int = 6000,
    learning_rate: float = 0.01,
    num_posterior_samples: int = 1000,
    warm_start: bool = True,
) -> BayesResult:
    """Approximate the posterior of :func:`population_model` by SVI.

    Maximises the ELBO (``Trace_ELBO``, one particle) of the guide of
    :func:`build_guide` with Adam (optax), then draws ``num_posterior_samples``
    from the guide. ``elbo`` in the result is the per-step loss (negative ELBO, up
    to the omitted ``log(2 pi)`` constant). ``converged`` needs a finite final loss
    and finite draws (SVI has no R-hat; judge the loss trace too).

    Parameters
    ----------
    key : PRNG key
        Split into the optimisation and the posterior-draw keys; same key, same
        result.
    warm_start : bool
        Start the guide at data-informed values (a few Laplace-EM rounds, see
        ``_warm_start``) instead of the specification. Without it, the non-centred
        ridges make Adam at ``learning_rate=0.01`` need many thousands of steps when
        the specification is far from the data.

    Warnings
    --------
    The guide is independent between population and subject sites while the
    etas are non-centred, so it cannot represent how the typical values and IIV
    SDs trade off against every ``z_i``. Point estimates are close to NUTS, but
    posterior SDs of typical values and IIV variances come out too small (5-10x
    on the tests' rich-data cohort) and weakly identified IIV variances are
    pulled towards 0. Use :func:`fit_nuts` for uncertainty.
    """
    start = time.perf_counter()
    priors = weak_priors(model) if priors is None else priors
    n_occ = n_occasions(cohort)
    init = (
        _warm_start(model, cohort, n_occ)
        if warm_start
        else _init_values(model, cohort.n_subjects, n_occ)
    )
    guide = build_guide(model, cohort, init_values=init)
    optim = optax_to_numpyro(optax.adam(learning_rate))
    svi = SVI(population_model, guide, optim, Trace_ELBO())
    k_fit, k_post = jax.random.split(key)
    args = (model, cohort)
    kwargs = {"priors": priors, "n_occ": n_occ}
    with _finite_start():
        run = svi.run(k_fit, num_steps, *args, progress_bar=False, **kwargs)
    draws = guide.sample_posterior(
        k_post, run.params, *args, sample_shape=(num_posterior_samples,), **kwargs
    )
    nat, eta, packer = _natural_draws(model, draws)
    return _result(
        cohort.n_subjects,
        nat[None],
        packer,
        eta,
        method="svi",
        start=start,
        elbo=np.asarray(run.losses),
    )


__all__ = [
    "LOCAL_SITES",
    "MAX_DIVERGENT",
    "RHAT_MAX",
    "BayesResult",
    "NonFiniteStartError",
    "Priors",
    "build_guide",
    "fit_nuts",
    "fit_svi",
    "library_priors",
    "population_model",
    "weak_priors",
    "coef_scale",
    "log_typical_iiv",
    "subject_loglik",
]
