"""Bayesian forecasting: one patient's posterior given a population model (the prior).

The population model is the prior. For a patient with random effects
``b = (eta, kappa_1..kappa_O)`` (IIV and one IOV vector per occasion) and measured
levels ``y``, the negative twice log posterior is FOCEI's inner objective

    O(b) = sum_j [log V_j + (y_j - f_j)^2 / V_j] + b' P b        (+ const)

with M3 terms ``-2 log Phi((LLOQ - f_j) / sqrt(V_j))`` for BLQ levels (Beal 2001) and
``P`` the prior precision (``Omega^-1`` and ``Omega_IOV^-1`` per occasion, the full
IOV block), exactly what NONMEM's ``MAXEVAL=0 POSTHOC`` and mapbayr minimise
(``V_j`` in the model's residual form). BLQ levels follow the
model's ``blq`` setting (a ``blq: drop`` model ignores them); ``phems dose`` always
forecasts with ``blq: m3``.

Two posteriors are offered:

* :func:`fit_map`: the posterior mode by damped Newton steps and the Laplace
  (Gaussian) approximation ``N(b_hat, 2 H^-1)`` with ``H`` the exact Hessian of ``O``
  at the mode; :func:`laplace_draws` samples it;
* :func:`fit_nuts_individual`: the full posterior by NUTS (NumPyro), initialised at the
  mode with a dense mass matrix.

Both work for a single patient (a :class:`~phems_clinical.data.cohort.Cohort` row)
and, with :func:`fit_map_batch`, for thousands of patients at once (``jax.vmap``).

References
----------
Le Louedec F, Puisset F, Thomas F, et al. Easy and reliable maximum a posteriori
Bayesian estimation of pharmacokinetic parameters with the open-source R package
mapbayr. CPT Pharmacometrics Syst Pharmacol 2021;10:1208-1220.
Beal SL. Ways to fit a PK model with some data below the quantification limit.
J Pharmacokinet Pharmacodyn 2001;28:481-504.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical._typing import Array, Float, Key
from phems_clinical.data.cohort import Cohort
from phems_clinical.pk._cache import per_model
from phems_clinical.pk._newton import newton_minimise
from phems_clinical.pk.focei import build_focei
from phems_clinical.pk.model import PopParams
from phems_clinical.pk.spec import PopModel

__all__ = [
    "MAPResult",
    "NUTSIndividual",
    "fit_map",
    "fit_map_batch",
    "fit_nuts_individual",
    "laplace_draws",
]


class MAPResult(NamedTuple):
    """Posterior mode and Laplace covariance of one patient (or a batch: leading axis).

    b : (n_b,) mode of ``(eta, kappa per occasion)`` (log-parameter deviations).
    cov : (n_b, n_b) Laplace covariance ``2 H^-1``.
    objective : () ``O(b_hat)``, -2 log posterior up to a constant.
    grad_norm : () ``max |dO/db|`` at the mode (0 at an exact optimum).
    """

    b: Float[Array, "... n_b"]
    cov: Float[Array, "... n_b n_b"]
    objective: Float[Array, ...]
    grad_norm: Float[Array, ...]


class NUTSIndividual(NamedTuple):
    """Posterior draws of one patient's random effects by NUTS, with diagnostics."""

    b: Float[Array, "n_draws n_b"]
    n_divergent: int
    r_hat: np.ndarray
    ess: np.ndarray
    map: MAPResult


def _map_fn(model: PopModel, n_occ: int):
    """The single-patient MAP + Laplace function (uncompiled)."""
    fns = build_focei(model, n_occ)

    def one(params: PopParams, subject: Cohort) -> MAPResult:
        def obj(b):
            return fns.inner_objective(b, params, subject)

        b0 = jnp.zeros(fns.n_b)
        if fns.n_b == 0:
            z = jnp.zeros((0, 0))
            return MAPResult(b0, z, obj(b0), jnp.zeros(()))
        b = newton_minimise(obj, b0)
        h = jax.hessian(obj)(b)
        cov = 2.0 * jnp.linalg.inv(0.5 * (h + h.T))
        return MAPResult(b, cov, obj(b), jnp.max(jnp.abs(jax.grad(obj)(b))))

    return one


def _compiled_map(model: PopModel, n_occ: int, batched: bool):
    def build():
        one = _map_fn(model, n_occ)
        fn = jax.vmap(one, in_axes=(None, 0)) if batched else one
        return jax.jit(fn)

    return per_model(model, ("map", n_occ, batched), build, persist=True)


def fit_map(
    model: PopModel, params: PopParams, subject: Cohort, *, n_occ: int = 1
) -> MAPResult:
    """Posterior mode and Laplace covariance of one patient's random effects.

    Parameters
    ----------
    model, params
        The population model and its values (the prior).
    subject : Cohort
        One patient (no leading axis); occasions ``0..n_occ-1`` in ``dose_occ`` and
        ``obs_occ``. With no observations the mode is 0 and the covariance the prior.
    n_occ : int
        Number of occasions (static: one IOV vector each).

    Examples
    --------
    One bolus of 1000 IU and one level of 20 IU/dL at 24 h under the Advate model:

    >>> import jax, numpy as np
    >>> from phems_clinical.data.cohort import stack_subjects
    >>> from phems_clinical.pk import load_product
    >>> from phems_clinical.pk.model import initial_params
    >>> jax.config.update("jax_enable_x64", True)
    >>> m = load_product("advate")
    >>> row = dict(dose_time=[0.0], dose_amt=[1000.0], dose_dur=[0.0], dose_occ=[0],
    ...            obs_time=[24.0], obs_dv=[20.0], obs_blq=[False], obs_lloq=[0.0],
    ...            obs_occ=[0], covariates=[25.0, 8.0])
    >>> subject = jax.tree.map(lambda x: x[0], stack_subjects([row]))
    >>> res = fit_map(m, initial_params(m), subject)
    >>> bool(res.b[0] < 0), float(res.grad_norm) < 1e-6  # high level -> lower CL
    (True, True)
    """
    return _compiled_map(model, n_occ, False)(params, subject)


def fit_map_batch(
    model: PopModel, params: PopParams, cohort: Cohort, *, n_occ: int = 1
) -> MAPResult:
    """:func:`fit_map` for every patient of a batched cohort (one compiled vmap)."""
    return _compiled_map(model, n_occ, True)(params, cohort)


def laplace_draws(key: Key, res: MAPResult, n: int) -> Float[Array, "n n_b"]:
    """``n`` draws from the Laplace approximation ``N(b_hat, 2 H^-1)``."""
    if res.b.shape[-1] == 0:
        return jnp.zeros((n, 0))
    return _laplace_program(n)(key, res.b, res.cov)


@cache
def _laplace_program(n: int):
    """The compiled draw of :func:`laplace_draws`, kept between processes."""
    from phems_clinical.pk.export_cache import persistent_jit

    def draw(key, b, cov):
        return jax.random.multivariate_normal(key, b, cov, shape=(n,), method="eigh")

    return persistent_jit(draw, ("laplace_draws", n))


def _nuts_runner(
    model: PopModel, n_occ: int, num_warmup: int, num_samples: int, num_chains: int
):
    """One jitted function running ``num_chains`` vectorised NUTS chains (NumPyro's
    functional ``hmc`` kernel: step-size and diagonal mass adaptation in warm-up).

    Patient data are arguments, so the compiled sampler is reused for every patient
    of the same array shapes (cached per model).
    """

    def build():
        from numpyro.infer.hmc import hmc

        fns = build_focei(model, n_occ)

        def potential_gen(params, subject, centre, chol):
            # The sampler works on z with b = centre + chol z: the posterior whitened by
            # its Laplace approximation, close to N(0, I), so warm-up is short. A linear
            # change of variables has a constant Jacobian: the target is still exactly
            # exp(-O(b) / 2).
            def potential(z):
                return 0.5 * fns.inner_objective(centre + chol @ z, params, subject)

            return potential

        init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo="NUTS")

        def one_chain(key, args):
            state = init_kernel(
                jnp.zeros(fns.n_b),
                num_warmup,
                target_accept_prob=0.9,
                model_args=args,
                rng_key=key,
            )

            def step(state, _):
                state = sample_kernel(state, model_args=args)
                return state, (state.z, state.diverging)

            _, (z, diverging) = jax.lax.scan(
                step, state, None, length=num_warmup + num_samples
            )
            centre, chol = args[2], args[3]
            b = centre + z[num_warmup:] @ chol.T
            return b, diverging[num_warmup:]

        return jax.jit(jax.vmap(one_chain, in_axes=(0, None)))

    return per_model(
        model, ("nuts_individual", n_occ, num_warmup, num_samples, num_chains), build
    )


def fit_nuts_individual(
    key: Key,
    model: PopModel,
    params: PopParams,
    subject: Cohort,
    *,
    n_occ: int = 1,
    num_warmup: int = 500,
    num_samples: int = 1000,
    num_chains: int = 4,
) -> NUTSIndividual:
    """The full individual posterior of ``b`` by NUTS, started at the mode.

    The chains run vectorised on one device. The target is the exact posterior
    ``exp(-O(b)/2)``; the Laplace fit only reparameterises it (a linear change of
    variables, whose constant Jacobian does not change the distribution of ``b``).

    Returns
    -------
    NUTSIndividual
        ``b`` with ``num_chains * num_samples`` draws, divergences, split R-hat and
        bulk ESS per component, and the :class:`MAPResult` used to start.
    """
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

    mode = fit_map(model, params, subject, n_occ=n_occ)
    n_b = int(mode.b.shape[0])
    if n_b == 0:
        z = jnp.zeros((num_chains * num_samples, 0))
        return NUTSIndividual(z, 0, np.zeros(0), np.zeros(0), mode)
    chol = jnp.linalg.cholesky(mode.cov)
    run = _nuts_runner(model, n_occ, num_warmup, num_samples, num_chains)
    b, diverging = run(
        jax.random.split(key, num_chains), (params, subject, mode.b, chol)
    )
    b_np = np.asarray(b)
    r_hat = (
        np.asarray(split_gelman_rubin(b_np)) if num_chains > 1 else np.full(n_b, np.nan)
    )
    ess = np.asarray(effective_sample_size(b_np))
    n_div = int(np.asarray(diverging).sum())
    return NUTSIndividual(b.reshape(-1, n_b), n_div, r_hat, ess, mode)
