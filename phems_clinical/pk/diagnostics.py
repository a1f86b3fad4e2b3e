"""Goodness-of-fit quantities: PRED, IPRED, IWRES, CWRES and VPC simulations.

CWRES follow Hooker, Staatz & Karlsson (Pharm Res 2007;24:2187-2197): with the
conditional modes ``b_hat``, ``G = df/db`` at ``b_hat`` and the FOCE (interaction)
linearisation

    E[y] = f(b_hat) - G b_hat,   Cov[y] = G Omega_full G' + diag(V(b_hat)),

``CWRES = Cov^(-1/2) (y - E[y])`` with the symmetric (eigenvalue) square root, as
NONMEM's default ``WRESCHOL=EIGENVALUE``. BLQ and padded samples are excluded from
the decorrelation and returned as NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical._typing import Array, Float, Key
from phems_clinical.data.cohort import Cohort
from phems_clinical.pk.model import (
    PopParams,
    iov_covariance,
    n_occasions,
    predict,
    residual_variance,
)
from phems_clinical.pk.spec import PopModel


class Diagnostics(NamedTuple):
    """Per-observation diagnostics, arrays shaped like ``cohort.obs_time``."""

    pred: np.ndarray
    ipred: np.ndarray
    iwres: np.ndarray
    cwres: np.ndarray


def _omega_full(model: PopModel, params: PopParams, n_occ: int):
    parts = []
    if model.n_eta:
        parts.append(params.omega)
    if model.n_kappa:
        parts.append(iov_covariance(params.omega_iov, n_occ))
    return jax.scipy.linalg.block_diag(*parts) if parts else jnp.zeros((0, 0))


def compute_diagnostics(
    model: PopModel, cohort: Cohort, params: PopParams, b_hat: Float[Array, "n_sub n_b"]
) -> Diagnostics:
    """PRED, IPRED, IWRES and CWRES for every observation of ``cohort``."""
    n_occ = n_occasions(cohort)
    n_eta, n_kappa = model.n_eta, model.n_kappa
    om = _omega_full(model, params, n_occ)

    def f_of_b(b, subject):
        eta, kappa = b[:n_eta], b[n_eta:].reshape(n_occ, n_kappa)
        return predict(model, subject, params.theta, eta, kappa, params.baseline)

    def one(subject, b):
        ipred = f_of_b(b, subject)
        pred = f_of_b(jnp.zeros_like(b), subject)
        g = jax.jacfwd(f_of_b)(b, subject)
        var = residual_variance(ipred, params.sigma, model.residual.form)
        use = subject.obs_mask & ~subject.obs_blq
        mean = ipred - g @ b
        cov = g @ om @ g.T + jnp.diag(var)
        w = use.astype(cov.dtype)
        # decorrelate only the used samples: unused rows/cols become identity
        cov = cov * jnp.outer(w, w) + jnp.diag(1.0 - w)
        evals, evecs = jnp.linalg.eigh(cov)
        inv_sqrt = (evecs / jnp.sqrt(evals)) @ evecs.T
        cwres = inv_sqrt @ ((subject.obs_dv - mean) * w)
        iwres = (subject.obs_dv - ipred) / jnp.sqrt(var)
        nan = jnp.nan
        return (pred, ipred, jnp.where(use, iwres, nan), jnp.where(use, cwres, nan))

    out = jax.jit(jax.vmap(one))(cohort, jnp.asarray(b_hat))
    return Diagnostics(*(np.asarray(x) for x in out))


def simulate_replicates(
    key: Key, model: PopModel, cohort: Cohort, params: PopParams, n_rep: int = 200
) -> np.ndarray:
    """Simulated observations (with residual error) for a visual predictive check.

    Returns an array ``(n_rep, n_sub, n_obs)`` on the cohort's own design, drawing new
    etas/kappas and residuals for each replicate.
    """
    n_occ = n_occasions(cohort)
    om = _omega_full(model, params, n_occ)
    n_b = om.shape[0]

    def one_rep(k):
        kb, ke = jax.random.split(k)
        b = (
            jax.random.multivariate_normal(kb, jnp.zeros(n_b), om, (cohort.n_subjects,))
            if n_b
            else jnp.zeros((cohort.n_subjects, 0))
        )

        def subj(s, bb):
            eta, kappa = (
                bb[: model.n_eta],
                bb[model.n_eta :].reshape(n_occ, model.n_kappa),
            )
            return predict(model, s, params.theta, eta, kappa, params.baseline)

        f = jax.vmap(subj)(cohort, b)
        sd = jnp.sqrt(residual_variance(f, params.sigma, model.residual.form))
        return f + sd * jax.random.normal(ke, f.shape)

    return np.asarray(jax.jit(jax.vmap(one_rep))(jax.random.split(key, n_rep)))


__all__ = ["Diagnostics", "compute_diagnostics", "simulate_replicates"]
