"""Federated Bayesian population PK: expectation propagation and consensus Monte Carlo.

The population parameters are the free vector ``x`` of
:func:`phems_clinical.pk.packing.build_packer` (``d`` entries: free thetas on their
unconstrained scale, the log-diagonal Cholesky entries of each IIV block, log IOV
variances, log residual SDs, log baseline). Their prior is a Gaussian
``N(m0, S0)`` on ``x`` (:func:`gaussian_prior`). Each patient has random effects
``eta_i`` (and ``kappa_io`` per occasion), sampled centred (``log P_i = log TV_i +
eta_i ~ N(log TV_i, Omega)``, the default) or non-centred (``eta_i = L z_i``,
``L L' = Omega``); they are integrated out by sampling and never leave the
hospital. The likelihood is that of
:func:`phems_clinical.pk.bayes.population_model` (NONMEM's -2LL per sample, M3 for
BLQ).

Site ``k``'s data define the likelihood factor ``p(y_k | x)`` (its patients'
random effects integrated out), so the posterior is
``p(x | y) ∝ N(x; m0, S0) * prod_k p(y_k | x)``.

:func:`ep` -- expectation propagation "as a way of life" (Vehtari et al. 2020)
    The global approximation is ``q(x) = N(m0, S0) prod_k t_k(x)`` with Gaussian
    site factors ``t_k`` in natural parameters (precision ``Q_k``, shift
    ``r_k = Q_k mu_k``). The server holds the global natural parameters
    ``(Q, r)``. In a round, every site forms its cavity ``(Q - Q_k, r - r_k)``,
    samples the tilted distribution ``cavity(x) p(y_k | x)`` (with its patients'
    random effects) by NUTS, matches its moments and moves its factor by a damped
    step ``delta (tilted - cavity - t_k) = delta (tilted - global)``; it sends the
    change of its factor (``delta_prec`` ``(d, d)``, ``delta_shift`` ``(d,)``) and
    the server adds the **sum** (secure aggregation applies).
:func:`consensus_mc` -- consensus Monte Carlo (Scott et al. 2016), one round
    Every site samples its subposterior ``N(x; m0, K S0) p(y_k | x)`` (the prior
    to the power ``1/K``), and sends ``W_k x_k^(s)`` for its draws and
    ``W_k`` (inverse sample covariance); the server's draws are
    ``(sum_k W_k)^-1 sum_k W_k x_k^(s)``.
:func:`pooled_reference` -- NUTS on all patients in one place with the same prior
    and likelihood (what the federated methods should reproduce).

The NUTS runs use NumPyro's functional kernel inside ``jit`` (the pattern of
:func:`phems_clinical.pk.forecast._nuts_runner`), so a site's sampler is
``vmap``-able across hospitals. ``x`` is sampled whitened, ``x = a + B u``, with
``(a, B B')`` the mean and covariance of the current global approximation (the
prior for the pooled reference and consensus MC): a linear change of variables
with a constant Jacobian, so the target is unchanged while NUTS sees a nearly
isotropic ``u`` and adapts quickly.

References
----------
Vehtari A, Gelman A, Sivula T, et al. Expectation propagation as a way of life: a
framework for Bayesian inference on partitioned data. JMLR 2020;21(17):1-53.
Scott SL, Blocker AW, Bonassi FV, et al. Bayes and big data: the consensus Monte
Carlo algorithm. Int J Manag Sci Eng Manag 2016;11:78-88.
Minka TP. Expectation propagation for approximate Bayesian inference. UAI 2001.
Hoffman MD, Gelman A. The No-U-Turn sampler. JMLR 2014;15:1593-1623.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from numpyro.infer.util import potential_energy

from phems_clinical._typing import Array, Bool, Float, Key
from phems_clinical.data.cohort import Cohort
from phems_clinical.federation.core import Algorithm
from phems_clinical.federation.pk_sites import SiteCohort
from phems_clinical.pk._cache import per_model
from phems_clinical.pk.bayes import (
    coef_scale,
    log_typical_iiv,
    sample_random_effects,
    subject_loglik,
)
from phems_clinical.pk.model import PopParams, initial_params, likelihood_cohort
from phems_clinical.pk.packing import Packer, build_packer
from phems_clinical.pk.spec import PopModel

_NATURAL_DRAWS = 4000
"""Draws of a Gaussian approximation used for its natural-scale summaries."""


class Gaussian(NamedTuple):
    """A Gaussian on ``x`` in natural parameters.

    prec : (d, d) precision matrix ``Q = Sigma^-1``.
    shift : (d,) precision times mean, ``r = Q mu``.
    """

    prec: Float[Array, "d d"]
    shift: Float[Array, " d"]


class PosteriorSummary(NamedTuple):
    """Moments of a posterior of the population parameters.

    mean, sd : (d,) on the unconstrained ``x`` scale (``names``).
    cov : (d, d) covariance of ``x``.
    natural_mean, natural_sd : (n_nat,) on NONMEM's scale (``natural_names``:
        ``THETA(CL)`` in dL/h, ``OMEGA(CL,CL)`` a log-scale variance,
        ``SIGMA(proportional)`` a variance, ...), from draws of ``x``.
    ess : (d,) bulk effective sample size of each entry of ``x`` (NaN when the
        moments are those of a Gaussian approximation rather than of MCMC draws).
    n_divergent : divergent NUTS transitions after warm-up, over all chains (0 for
        a Gaussian approximation).
    seconds : wall-clock time of the computation (NaN when not measured).
    """

    mean: np.ndarray
    sd: np.ndarray
    cov: np.ndarray
    names: tuple[str, ...]
    natural_mean: np.ndarray
    natural_sd: np.ndarray
    natural_names: tuple[str, ...]
    ess: np.ndarray
    n_divergent: int
    seconds: float


class EPServer(NamedTuple):
    """EP server state.

    post : Gaussian, the global approximation ``q`` in natural parameters.
    round : () int32, completed rounds.
    change : () largest standardised change of ``q`` in the last round:
        ``max(|mean' - mean| / sd', |log(sd' / sd)|)`` over the entries of ``x``.
    valid : () bool, false once the global precision stopped being positive
        definite (only possible with ``damping > 1 / n_sites``); the run then stops.
    """

    post: Gaussian
    round: jax.Array
    change: jax.Array
    valid: jax.Array


class ConsensusServer(NamedTuple):
    """Consensus MC server state: the sums of the sites' payloads.

    weighted_draws : (S, d) ``sum_k W_k x_k^(s)``.
    precision : (d, d) ``sum_k W_k``.
    round : () int32.
    """

    weighted_draws: jax.Array
    precision: jax.Array
    round: jax.Array


class NUTSSettings(NamedTuple):
    """Sampler settings of one (site or pooled) NUTS run.

    num_warmup, num_samples : per chain; step size and a diagonal mass matrix are
        adapted in warm-up (NumPyro's windowed adaptation).
    num_chains : independent chains, ``vmap``-ed.
    target_accept : NUTS target acceptance probability.
    max_tree_depth : NUTS tree depth limit (at most ``2**depth`` leapfrog steps).
    centered : sample ``phi_i = log TV_i + eta_i ~ N(log TV_i, Omega)`` (default)
        instead of ``z_i`` with ``eta_i = L z_i`` (non-centred). On the tests'
        3-sample FVIII-style designs centred NUTS gave 1.3-6x the bulk ESS per
        second of non-centred for every entry of ``x`` (the ``x``-``z`` ridge of
        the non-centred form needs a dense mass matrix); see
        :func:`phems_clinical.pk.bayes.population_model`.
    """

    num_warmup: int = 200
    num_samples: int = 800
    num_chains: int = 2
    target_accept: float = 0.85
    max_tree_depth: int = 8
    centered: bool = True

    @property
    def n_draws(self) -> int:
        """Draws per run, ``num_chains * num_samples``."""
        return self.num_chains * self.num_samples


SITE_NUTS = NUTSSettings()
"""Default NUTS settings of a site's run in one round of :func:`ep` or in
:func:`consensus_mc` (1600 draws)."""

POOLED_NUTS = NUTSSettings(num_warmup=500, num_samples=2000, num_chains=4)
"""Default NUTS settings of :func:`pooled_reference` (8000 draws)."""

# ---------------------------------------------------------------------------
# Gaussians


def gaussian_prior(
    model: PopModel,
    base: PopParams | None = None,
    *,
    sd: float | Float[Array, " d"] | None = None,
) -> Gaussian:
    """The prior ``N(m0, S0)`` of the packed population parameters ``x``.

    ``m0 = pack(base)`` (default: the specification's values) and ``S0`` is
    diagonal. Default SDs (``sd=None``) are weak: 1 on every log- or logit-scale
    entry (a factor ``e`` either way for typical values, IIV SDs and residual SDs)
    and, for an unbounded linear or exponential covariate coefficient (per covariate
    unit), ``max(2 |value|, 0.01)`` as in :func:`phems_clinical.pk.bayes.weak_priors`
    (power exponents get 1). A scalar or ``(d,)`` ``sd`` overrides them.

    Examples
    --------
    >>> import jax
    >>> jax.config.update("jax_enable_x64", True)
    >>> from phems_clinical.pk import load_product
    >>> p = gaussian_prior(load_product("advate"))  # d = 13
    >>> [round(float(s), 4) for s in 1 / jnp.sqrt(jnp.diag(p.prec))[4:7]]
    [1.0, 0.01, 1.0]

    (the WT exponent of CL, its linear AGE coefficient per year, the WT exponent of
    V1).
    """
    base = initial_params(model) if base is None else base
    packer = build_packer(model, base)
    m0 = jnp.asarray(packer.pack(base), dtype=jnp.float64)
    d = m0.shape[0]
    if sd is None:
        scales = np.ones(d)
        for k, name in enumerate(packer.names):
            if name.startswith("theta:"):
                t = model.thetas[model.theta_names.index(name[len("theta:") :])]
                unbounded = not (math.isfinite(t.lower) or math.isfinite(t.upper))
                if unbounded:
                    scales[k] = coef_scale(model, t)
    else:
        scales = np.broadcast_to(np.asarray(sd, np.float64), (d,))
    prec = jnp.diag(jnp.asarray(1.0 / scales**2))
    return Gaussian(prec, prec @ m0)


def moments(g: Gaussian) -> tuple[Float[Array, " d"], Float[Array, "d d"]]:
    """Mean and covariance of a Gaussian given in natural parameters."""
    cov = jnp.linalg.inv(g.prec)
    cov = 0.5 * (cov + cov.T)
    return cov @ g.shift, cov


def from_moments(mean: Float[Array, " d"], cov: Float[Array, "d d"]) -> Gaussian:
    """Natural parameters of ``N(mean, cov)``."""
    prec = jnp.linalg.inv(cov)
    prec = 0.5 * (prec + prec.T)
    return Gaussian(prec, prec @ mean)


def _is_pd(a: Float[Array, "d d"]) -> Bool[Array, ""]:
    """True when the symmetric ``a`` is positive definite (finite Cholesky)."""
    return jnp.all(jnp.isfinite(jnp.linalg.cholesky(a)))


def _draw_moments(draws: Float[Array, "S d"]):
    mean = jnp.mean(draws, axis=0)
    c = draws - mean
    cov = c.T @ c / (draws.shape[0] - 1)
    return mean, 0.5 * (cov + cov.T)


def _precision_estimate(cov: Float[Array, "d d"], n_draws: int) -> Float[Array, "d d"]:
    """``(S - d - 2) / (S - 1) * cov^-1``: unbiased for the precision when ``cov``
    is the sample covariance of ``S`` independent Gaussian draws (Wishart; as in
    Vehtari et al. 2020's ep-stan code). NUTS draws are correlated, so this is only
    an approximate correction (a factor ``1 - (d + 1) / S``)."""
    d = cov.shape[0]
    prec = jnp.linalg.inv(cov) * ((n_draws - d - 2) / (n_draws - 1))
    return 0.5 * (prec + prec.T)


# ---------------------------------------------------------------------------
# The site model and its sampler


def site_model(
    model: PopModel,
    packer: Packer,
    cohort: Cohort,
    mask: Bool[Array, " n_sub"],
    cavity: Gaussian,
    *,
    n_occ: int = 1,
    centered: bool = True,
) -> None:
    """NumPyro model of one hospital's patients under a Gaussian prior on ``x``.

    ``x ~ N(Q^-1 r, Q^-1)`` for ``cavity = (Q, r)`` (the prior, an EP cavity or
    a tempered prior); ``PopParams = packer.unpack(x)`` (so ``Omega = L L'`` from
    the packed Cholesky entries, ``sigma = exp(log sigma)``); per subject (plate
    ``subject``) the log individual parameters ``phi_i ~ N(log TV_i(theta, cov_i),
    Omega)`` (site ``phi``, ``eta_i = phi_i - log TV_i``; with ``centered=False``
    ``z_i ~ N(0, I)`` and ``eta_i = L z_i``) and ``kappa_z ~ N(0, I)`` per occasion
    (plate ``occasion``) with ``kappa = chol(omega_iov) kappa_z``; the observations
    enter as :func:`phems_clinical.pk.bayes.population_model`'s factor (levels
    IU/dL, times h).

    Subjects with ``mask == False`` (padding) contribute no likelihood; their
    random effects still follow their (proper) prior, which integrates to one and so
    leaves the distribution of ``x`` unchanged.
    """
    loc = jnp.linalg.solve(cavity.prec, cavity.shift)
    x = numpyro.sample("x", dist.MultivariateNormal(loc, precision_matrix=cavity.prec))
    params = packer.unpack(x)
    n_sub, n_eta = cohort.n_subjects, model.n_eta
    scale = jnp.linalg.cholesky(params.omega) if n_eta else jnp.zeros((0, 0))
    iov_scale = (
        jnp.linalg.cholesky(params.omega_iov) if model.n_kappa else jnp.zeros((0, 0))
    )
    data = likelihood_cohort(model, cohort)
    with numpyro.plate("subject", n_sub, dim=-1):
        eta, kappa = sample_random_effects(
            model,
            params.theta,
            scale,
            iov_scale,
            cohort.covariates,
            n_occ,
            centered,
            record_eta=False,
        )
        ll = subject_loglik(model)(data, params, eta, kappa)
        numpyro.factor("obs", jnp.where(mask, ll, 0.0))


class _Run(NamedTuple):
    draws: jax.Array  # (num_chains, num_samples, d)
    n_divergent: jax.Array  # ()


def _sampler(model: PopModel, packer: Packer, n_occ: int, s: NUTSSettings):
    """``(key, cohort, mask, cavity, loc, chol) -> _Run``: NUTS on ``site_model``
    with ``x = loc + chol @ u``; uncompiled (so it can be ``vmap``-ed and fused into
    a federated round), built once per model and settings."""

    def build():
        from numpyro.infer.hmc import hmc

        fn = partial(site_model, model, packer, n_occ=n_occ, centered=s.centered)

        def potential_gen(cohort, mask, cavity, loc, chol):
            def potential(p):
                values = {k: v for k, v in p.items() if k != "u"}
                values["x"] = loc + chol @ p["u"]
                return potential_energy(fn, (cohort, mask, cavity), {}, values)

            return potential

        init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo="NUTS")

        def init_values(cohort, loc):
            n_sub = cohort.n_subjects
            v = {"u": jnp.zeros_like(loc)}
            if model.n_eta and s.centered:
                v["phi"] = log_typical_iiv(
                    model, packer.unpack(loc).theta, cohort.covariates
                )
            elif model.n_eta:
                v["z"] = jnp.zeros((n_sub, model.n_eta))
            if model.n_kappa:
                v["kappa_z"] = jnp.zeros((n_occ, n_sub, model.n_kappa))
            return v

        def one_chain(key, args):
            cohort, _, _, loc, chol = args
            state = init_kernel(
                init_values(cohort, loc),
                s.num_warmup,
                target_accept_prob=s.target_accept,
                max_tree_depth=s.max_tree_depth,
                model_args=args,
                rng_key=key,
            )

            def step(state, _):
                state = sample_kernel(state, model_args=args)
                return state, (state.z["u"], state.diverging)

            _, (u, diverging) = jax.lax.scan(
                step, state, None, length=s.num_warmup + s.num_samples
            )
            x = loc + u[s.num_warmup :] @ chol.T
            return x, jnp.sum(diverging[s.num_warmup :])

        def run(key, cohort, mask, cavity, loc, chol):
            keys = jax.random.split(key, s.num_chains)
            x, div = jax.vmap(one_chain, in_axes=(0, None))(
                keys, (cohort, mask, cavity, loc, chol)
            )
            return _Run(x, jnp.sum(div))

        return run

    return per_model(model, ("fed_bayes_sampler", packer.names, n_occ, s), build)


def _whitening(g: Gaussian):
    mean, cov = moments(g)
    return mean, jnp.linalg.cholesky(cov)


def _natural_fn(model: PopModel):
    """Draws of ``x`` -> natural-scale draws (one compiled function per model)."""

    def build():
        packer = build_packer(model)
        return jax.jit(jax.vmap(lambda x: packer.to_natural(packer.unpack(x))))

    return per_model(model, ("fed_bayes_natural",), build)


def _summary(
    packer: Packer, mean, cov, natural, *, ess=None, n_divergent=0, seconds=math.nan
) -> PosteriorSummary:
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    natural = np.asarray(natural, np.float64)
    d = mean.shape[0]
    return PosteriorSummary(
        mean=mean,
        sd=np.sqrt(np.diag(cov)),
        cov=cov,
        names=packer.names,
        natural_mean=natural.mean(axis=0),
        natural_sd=natural.std(axis=0, ddof=1),
        natural_names=packer.natural_names,
        ess=np.full(d, np.nan) if ess is None else np.asarray(ess, np.float64),
        n_divergent=int(n_divergent),
        seconds=float(seconds),
    )


def summarise_gaussian(
    model: PopModel, g: Gaussian, *, n_draws: int = _NATURAL_DRAWS
) -> PosteriorSummary:
    """Summary of a Gaussian approximation of ``x``; the natural-scale moments come
    from ``n_draws`` draws of it (a fixed key, so the summary is deterministic)."""
    mean, cov = moments(g)
    draws = jax.random.multivariate_normal(
        jax.random.key(0), mean, cov, (n_draws,), method="eigh"
    )
    return _summary(build_packer(model), mean, cov, _natural_fn(model)(draws))


def summarise_draws(
    model: PopModel,
    draws: Float[Array, "n_chains n_samples d"],
    *,
    n_divergent: int = 0,
    seconds: float = math.nan,
) -> PosteriorSummary:
    """Summary of MCMC draws of ``x`` (chains on the leading axis), with bulk ESS."""
    from numpyro.diagnostics import effective_sample_size

    chains = np.asarray(draws, np.float64)
    flat = chains.reshape(-1, chains.shape[-1])
    mean = flat.mean(axis=0)
    cov = np.cov(flat, rowvar=False).reshape(flat.shape[1], flat.shape[1])
    ess = effective_sample_size(chains) if chains.shape[1] > 3 else None
    return _summary(
        build_packer(model),
        mean,
        cov,
        _natural_fn(model)(jnp.asarray(flat)),
        ess=ess,
        n_divergent=n_divergent,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------
# Pooled reference


def pooled_reference(
    key: Key,
    model: PopModel,
    cohort: Cohort,
    *,
    n_occ: int = 1,
    prior: Gaussian | None = None,
    settings: NUTSSettings | None = None,
) -> PosteriorSummary:
    """The pooled posterior of ``x``: NUTS on every patient in one place.

    Same model (:func:`site_model` with all subjects and ``cavity = prior``, default
    :func:`gaussian_prior`) and same sampler (whitened by the prior) as the sites of
    :func:`ep` and :func:`consensus_mc`; default settings :data:`POOLED_NUTS`.
    ``seconds`` includes compilation on the first call for a model and shape.
    """
    start = time.perf_counter()
    settings = POOLED_NUTS if settings is None else settings
    prior = gaussian_prior(model) if prior is None else prior
    packer = build_packer(model)
    run = jax.jit(_sampler(model, packer, n_occ, settings))
    mask = jnp.ones(cohort.n_subjects, dtype=bool)
    loc, chol = _whitening(prior)
    out = jax.block_until_ready(run(key, cohort, mask, prior, loc, chol))
    return summarise_draws(
        model,
        out.draws,
        n_divergent=int(out.n_divergent),
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------
# EP


def _ep_site(model: PopModel, n_occ: int, settings: NUTSSettings):
    """EP's ``local_update``, one function object per model and settings (the
    server's damping travels in the message), so every EP run of the same model
    and settings reuses the compiled site computation."""

    def build():
        packer = build_packer(model)
        sample = _sampler(model, packer, n_occ, settings)
        n_draws = settings.n_draws

        def local_update(message, site: SiteCohort, factor: Gaussian, key):
            glob = Gaussian(message["prec"], message["shift"])
            d = glob.shift.shape[0]
            cavity = Gaussian(glob.prec - factor.prec, glob.shift - factor.shift)
            cavity_ok = _is_pd(cavity.prec)
            # A non-PD cavity is no distribution: sample under the global q instead
            # (so that every number stays finite) and discard the result.
            safe = jax.tree.map(lambda c, g: jnp.where(cavity_ok, c, g), cavity, glob)
            loc, chol = _whitening(glob)
            out = sample(key, site.cohort, site.mask, safe, loc, chol)
            mean, cov = _draw_moments(out.draws.reshape(-1, d))
            prec = _precision_estimate(cov, n_draws)
            shift = prec @ mean
            ok = cavity_ok & _is_pd(prec) & jnp.all(jnp.isfinite(shift))
            # new factor - old factor = damping * (tilted - cavity - old factor)
            #                         = damping * (tilted - global)
            step = message["damping"]
            d_prec = jnp.where(ok, step * (prec - glob.prec), 0.0)
            d_shift = jnp.where(ok, step * (shift - glob.shift), 0.0)
            new = Gaussian(factor.prec + d_prec, factor.shift + d_shift)
            metrics = {
                "n_divergent": out.n_divergent,
                "updated": ok,
                "cavity_pd": cavity_ok,
            }
            return {"delta_prec": d_prec, "delta_shift": d_shift}, new, metrics

        return local_update

    return per_model(model, ("ep_site", n_occ, settings), build)


def ep(
    model: PopModel,
    n_sites: int,
    n_occ: int = 1,
    *,
    prior: Gaussian | None = None,
    damping: float | None = None,
    settings: NUTSSettings | None = None,
    max_rounds: int | None = None,
    tol: float = 0.0,
    min_rounds: int = 3,
) -> Algorithm:
    """Expectation propagation across ``n_sites`` hospitals (Vehtari et al. 2020).

    Parameters
    ----------
    model : PopModel
        The population model; ``x`` is its packed free-parameter vector.
    n_sites : int
        ``K``, the number of hospitals (sets the default damping).
    n_occ : int
        Occasions (static; the largest over the sites).
    prior : Gaussian, optional
        Prior on ``x`` (default :func:`gaussian_prior`).
    damping : float, optional
        ``delta`` in ``t_k <- t_k + delta (t_k^new - t_k)``, sent by the server.
        Default ``1 / K``: all sites update in parallel, and then the new global
        precision is ``(1 - m / K) Q + (1 / K) sum_k Q_k^tilted`` over the ``m``
        sites that updated, positive definite whenever the tilted ones are (a
        guarantee lost for ``delta > 1 / K``). Damping also averages the Monte
        Carlo noise of the moments over rounds (an exponential moving average
        with weight ``delta``). In the Gaussian case a factor's error shrinks by
        ``1 - delta`` per round, hence the rounds: about ``3K`` for a 1 %
        transient (Vehtari et al. suggest ``max(4K, 20)``).
    settings : NUTSSettings
        Each site's NUTS run per round (fixed warm-up and draws).
    max_rounds : int, optional
        The engine's default number of rounds; default ``max(4 K, 10)``.
    tol, min_rounds : float, int
        Stop after at least ``min_rounds`` rounds once :attr:`EPServer.change` is
        below ``tol`` (default 0: run ``max_rounds``). Monte Carlo noise keeps the
        change at about ``delta`` times the moments' Monte Carlo error.

    Returns
    -------
    Algorithm
        Named ``"ep"``. Broadcast: the global ``(Q, r)`` as ``prec``, ``shift``
        and the ``damping``. Site state: its factor (a :class:`Gaussian`, zero at
        the start). Payload: ``delta_prec`` ``(d, d)`` and ``delta_shift``
        ``(d,)``, the change of the site's factor. A site skips its update (sends
        zeros) when its cavity precision is not positive definite, or its tilted
        moments are not finite or not positive definite (the standard EP fixes).
        ``result``: ``summary`` (a :class:`PosteriorSummary` of ``q``), ``mean``,
        ``cov``, ``names``, ``natural_names``, ``natural_mean``, ``natural_sd``,
        ``rounds``, ``valid``, ``change``.

    Warnings
    --------
    The same key gives the same result in the same engine mode. The vmapped and
    the looped modes (``run_federated(vectorise=...)``) compile batched and
    unbatched code whose last-bit differences grow along the Markov chains, so
    their draws differ (statistically equivalent, not bitwise).
    """
    settings = SITE_NUTS if settings is None else settings
    prior = gaussian_prior(model) if prior is None else prior
    packer = build_packer(model)
    d = int(prior.shift.shape[0])
    step = jnp.asarray(1.0 / n_sites if damping is None else damping, jnp.float64)

    def init_server(key):
        del key
        return EPServer(
            prior,
            jnp.zeros((), jnp.int32),
            jnp.full((), jnp.inf, jnp.float64),
            jnp.ones((), bool),
        )

    def init_site(site: SiteCohort):
        del site
        return Gaussian(jnp.zeros((d, d)), jnp.zeros(d))

    def broadcast(server: EPServer):
        return {"prec": server.post.prec, "shift": server.post.shift, "damping": step}

    def aggregate(server: EPServer, total, key):
        del key
        prec = server.post.prec + total["delta_prec"]
        post = Gaussian(0.5 * (prec + prec.T), server.post.shift + total["delta_shift"])
        valid = server.valid & _is_pd(post.prec)
        m0, c0 = moments(server.post)
        m1, c1 = moments(post)
        sd0, sd1 = jnp.sqrt(jnp.diag(c0)), jnp.sqrt(jnp.diag(c1))
        change = jnp.maximum(
            jnp.max(jnp.abs(m1 - m0) / sd1), jnp.max(jnp.abs(jnp.log(sd1 / sd0)))
        )
        return EPServer(
            post, server.round + 1, jnp.where(valid, change, jnp.inf), valid
        )

    def done(server: EPServer):
        return ~server.valid | ((server.round >= min_rounds) & (server.change < tol))

    def result(server: EPServer):
        summary = summarise_gaussian(model, server.post)
        return {
            "summary": summary,
            "mean": summary.mean,
            "cov": summary.cov,
            "names": packer.names,
            "natural_names": packer.natural_names,
            "natural_mean": summary.natural_mean,
            "natural_sd": summary.natural_sd,
            "rounds": int(server.round),
            "valid": bool(server.valid),
            "change": float(server.change),
        }

    return Algorithm(
        "ep",
        init_server,
        init_site,
        broadcast,
        _ep_site(model, n_occ, settings),
        aggregate,
        done,
        result,
        {"delta_prec": (d, d), "delta_shift": (d,)},
        max_rounds=max(4 * n_sites, 10) if max_rounds is None else int(max_rounds),
    )


# ---------------------------------------------------------------------------
# Consensus Monte Carlo


def _consensus_site(model: PopModel, n_occ: int, settings: NUTSSettings):
    """Consensus MC's ``local_update``, one function object per model and settings
    (the tempered prior travels in the message)."""

    def build():
        sample = _sampler(model, build_packer(model), n_occ, settings)

        def local_update(message, site: SiteCohort, state, key):
            tempered = Gaussian(message["prec"], message["shift"])
            loc, chol = _whitening(tempered)
            out = sample(key, site.cohort, site.mask, tempered, loc, chol)
            draws = out.draws.reshape(-1, loc.shape[0])
            _, cov = _draw_moments(draws)
            w = jnp.linalg.inv(cov)
            w = 0.5 * (w + w.T)
            return (
                {"weighted_draws": draws @ w, "precision": w},
                state,
                {"n_divergent": out.n_divergent},
            )

        return local_update

    return per_model(model, ("consensus_site", n_occ, settings), build)


def consensus_mc(
    model: PopModel,
    n_sites: int,
    n_occ: int = 1,
    *,
    prior: Gaussian | None = None,
    settings: NUTSSettings | None = None,
) -> Algorithm:
    """One-shot consensus Monte Carlo (Scott et al. 2016) across ``n_sites`` sites.

    The server broadcasts the tempered prior ``N(x; m0, K S0)`` (the prior to the
    power ``1/K``: precision and shift divided by ``K``). Site ``k`` samples its
    subposterior, tempered prior times ``p(y_k | x)``, by NUTS (whitened by the
    tempered prior) and sends ``weighted_draws = x_k W_k`` (``(S, d)``,
    ``S = settings.n_draws``; ``W_k`` is symmetric) and ``precision = W_k``, the
    inverse sample covariance of its draws. The server combines draw ``s`` of every
    site: ``x^(s) = (sum_k W_k)^-1 sum_k W_k x_k^(s)``; exact when every
    subposterior is Gaussian, biased when they are skewed (small sites, variance
    parameters). ``result`` summarises the combined draws as :func:`ep` does
    (``summary``, ``mean``, ``cov``, ...) and adds them as ``draws``.
    """
    settings = SITE_NUTS if settings is None else settings
    prior = gaussian_prior(model) if prior is None else prior
    packer = build_packer(model)
    d = int(prior.shift.shape[0])
    tempered = Gaussian(prior.prec / n_sites, prior.shift / n_sites)
    n_draws = settings.n_draws

    def init_server(key):
        del key
        return ConsensusServer(
            jnp.zeros((n_draws, d)), jnp.zeros((d, d)), jnp.zeros((), jnp.int32)
        )

    def init_site(site: SiteCohort):
        del site
        return jnp.zeros(())

    def broadcast(server: ConsensusServer):
        del server
        return {"prec": tempered.prec, "shift": tempered.shift}

    def aggregate(server: ConsensusServer, total, key):
        del key
        return ConsensusServer(
            total["weighted_draws"], total["precision"], server.round + 1
        )

    def done(server: ConsensusServer):
        return server.round >= 1

    def result(server: ConsensusServer):
        draws = jnp.linalg.solve(server.precision, server.weighted_draws.T).T
        summary = summarise_draws(model, draws[None])
        return {
            "summary": summary,
            "mean": summary.mean,
            "cov": summary.cov,
            "names": packer.names,
            "natural_names": packer.natural_names,
            "natural_mean": summary.natural_mean,
            "natural_sd": summary.natural_sd,
            "draws": np.asarray(draws),
            "rounds": int(server.round),
        }

    return Algorithm(
        "consensus_mc",
        init_server,
        init_site,
        broadcast,
        _consensus_site(model, n_occ, settings),
        aggregate,
        done,
        result,
        {"weighted_draws": (n_draws, d), "precision": (d, d)},
        max_rounds=1,
    )


# ---------------------------------------------------------------------------
# Comparison


def compare(approx: PosteriorSummary, reference: PosteriorSummary) -> pd.DataFrame:
    """Per entry of ``x`` and of the natural-scale vector: reference and approximate
    mean and SD, ``|mean_approx - mean_ref| / sd_ref`` and ``sd_approx / sd_ref``
    (index: ``x:<name>`` and ``natural:<NAME>``)."""
    rows = {}
    for scale, names, ma, sa, mr, sr in (
        ("x", approx.names, approx.mean, approx.sd, reference.mean, reference.sd),
        (
            "natural",
            approx.natural_names,
            approx.natural_mean,
            approx.natural_sd,
            reference.natural_mean,
            reference.natural_sd,
        ),
    ):
        for k, name in enumerate(names):
            rows[f"{scale}:{name}"] = {
                "ref_mean": mr[k],
                "ref_sd": sr[k],
                "mean": ma[k],
                "sd": sa[k],
                "dmean_over_sd": abs(ma[k] - mr[k]) / sr[k],
                "sd_ratio": sa[k] / sr[k],
            }
    return pd.DataFrame.from_dict(rows, orient="index")


__all__ = [
    "POOLED_NUTS",
    "SITE_NUTS",
    "ConsensusServer",
    "EPServer",
    "Gaussian",
    "NUTSSettings",
    "PosteriorSummary",
    "compare",
    "consensus_mc",
    "ep",
    "from_moments",
    "gaussian_prior",
    "moments",
    "pooled_reference",
    "site_model",
    "summarise_draws",
    "summarise_gaussian",
]
