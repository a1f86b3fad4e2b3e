"""Map population parameters to an unconstrained vector for optimisation, and back.

Transforms follow NONMEM's bounds: a fixed effect with ``lower == 0`` is optimised on
the log scale, one with two finite bounds on a logit scale between them, an unbounded
one as is. Each IIV block is a Cholesky factor with log-diagonal (so Omega stays
positive definite and keeps its declared zero pattern); IOV variances (only the
diagonal is estimated, see :func:`build_packer`) and residual SDs are on the log
scale. Fixed quantities (``fixed: true``, a zero residual component, a non-estimated
baseline) are held at their specification values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

from phems_clinical._typing import Array, Float
from phems_clinical.pk.model import PopParams, initial_params
from phems_clinical.pk.spec import PopModel, check_iov_estimable


class Packer(NamedTuple):
    """Pure functions between :class:`PopParams` and a free vector ``x``.

    ``names`` label the entries of ``x`` for reports; ``natural_names`` label the
    NONMEM-scale vector returned by ``to_natural`` (theta, omega, sigma variances).
    """

    pack: Callable[[PopParams], Float[Array, " n_free"]]
    unpack: Callable[[Float[Array, " n_free"]], PopParams]
    names: tuple[str, ...]
    to_natural: Callable[[PopParams], Float[Array, " n_nat"]]
    from_natural: Callable[[Float[Array, " n_nat"]], PopParams]
    natural_names: tuple[str, ...]


def _theta_fwd(v, lo, hi):
    if math.isfinite(lo) and math.isfinite(hi):
        u = (v - lo) / (hi - lo)
        return jnp.log(u) - jnp.log1p(-u)
    if lo == 0.0 and not math.isfinite(hi):
        return jnp.log(v)
    return v


def _theta_inv(x, lo, hi):
    if math.isfinite(lo) and math.isfinite(hi):
        return lo + (hi - lo) / (1.0 + jnp.exp(-x))
    if lo == 0.0 and not math.isfinite(hi):
        return jnp.exp(x)
    return x


def build_packer(model: PopModel, init: PopParams | None = None) -> Packer:
    """Build the packer for ``model``; non-free values are taken from ``init``.

    IOV is estimated as variances (a diagonal ``omega_iov``) unless ``iov.fixed``;
    a correlated IOV block must be fixed (:func:`~.spec.check_iov_estimable`).
    """
    check_iov_estimable(model)
    base = initial_params(model) if init is None else init
    names_t = model.theta_names
    free_t = [i for i, t in enumerate(model.thetas) if not t.fixed]
    eta_names = model.iiv_parameters
    blocks = [[eta_names.index(p) for p in b] for b in model.omega_blocks]
    omega_free = not model.omega_fixed and model.n_eta > 0
    kappa_free = not model.omega_iov_fixed and model.n_kappa > 0
    spec_sd = (model.residual.additive, model.residual.proportional)
    sig_free = [k for k in (0, 1) if not model.residual.fixed and spec_sd[k] > 0]
    base_free = model.baseline_estimated

    names: list[str] = [f"theta:{names_t[i]}" for i in free_t]
    if omega_free:
        for b in blocks:
            for r in range(len(b)):
                for c in range(r + 1):
                    names.append(f"omega_chol:{eta_names[b[r]]},{eta_names[b[c]]}")
    if kappa_free:
        names += [f"log_omega_iov:{p}" for p in model.iov_parameters]
    names += [f"log_sigma:{('additive', 'proportional')[k]}" for k in sig_free]
    if base_free:
        names.append("log_baseline")

    def pack(p: PopParams) -> Float[Array, " n_free"]:
        parts = (
            [
                jnp.stack(
                    [
                        _theta_fwd(
                            p.theta[i], model.thetas[i].lower, model.thetas[i].upper
                        )
                        for i in free_t
                    ]
                )
            ]
            if free_t
            else []
        )
        if omega_free:
            for b in blocks:
                sub = p.omega[jnp.ix_(jnp.array(b), jnp.array(b))]
                chol = jnp.linalg.cholesky(sub)
                vals = []
                for r in range(len(b)):
                    for c in range(r + 1):
                        vals.append(jnp.log(chol[r, c]) if r == c else chol[r, c])
                parts.append(jnp.stack(vals))
        if kappa_free:
            parts.append(jnp.log(jnp.diag(p.omega_iov)))
        if sig_free:
            parts.append(jnp.log(p.sigma[jnp.array(sig_free)]))
        if base_free:
            parts.append(jnp.log(p.baseline)[None])
        return jnp.concatenate(parts) if parts else jnp.zeros((0,))

    def unpack(x: Float[Array, " n_free"]) -> PopParams:
        k = 0
        theta = base.theta
        for i in free_t:
            t = model.thetas[i]
            theta = theta.at[i].set(_theta_inv(x[k], t.lower, t.upper))
            k += 1
        omega = base.omega
        if omega_free:
            omega = jnp.zeros_like(base.omega)
            for b in blocks:
                n = len(b)
                chol = jnp.zeros((n, n))
                for r in range(n):
                    for c in range(r + 1):
                        chol = chol.at[r, c].set(jnp.exp(x[k]) if r == c else x[k])
                        k += 1
                idx = jnp.array(b)
                omega = omega.at[jnp.ix_(idx, idx)].set(chol @ chol.T)
        omega_iov = base.omega_iov
        if kappa_free:
            omega_iov = jnp.diag(jnp.exp(x[k : k + model.n_kappa]))
            k += model.n_kappa
        sigma = base.sigma
        for j in sig_free:
            sigma = sigma.at[j].set(jnp.exp(x[k]))
            k += 1
        baseline = jnp.exp(x[k]) if base_free else base.baseline
        return PopParams(theta, omega, omega_iov, sigma, baseline)

    # NONMEM-scale vector: free thetas, omega elements (lower triangle within
    # blocks), IOV variances, sigma *variances*, baseline.
    nat_names: list[str] = [f"THETA({names_t[i]})" for i in free_t]
    if omega_free:
        for b in blocks:
            for r in range(len(b)):
                for c in range(r + 1):
                    nat_names.append(f"OMEGA({eta_names[b[r]]},{eta_names[b[c]]})")
    if kappa_free:
        nat_names += [f"OMEGA_IOV({p})" for p in model.iov_parameters]
    nat_names += [f"SIGMA({('additive', 'proportional')[k]})" for k in sig_free]
    if base_free:
        nat_names.append("BASELINE")

    def to_natural(p: PopParams) -> Float[Array, " n_nat"]:
        parts = [p.theta[jnp.array(free_t)]] if free_t else []
        if omega_free:
            for b in blocks:
                parts.append(
                    jnp.stack(
                        [
                            p.omega[b[r], b[c]]
                            for r in range(len(b))
                            for c in range(r + 1)
                        ]
                    )
                )
        if kappa_free:
            parts.append(jnp.diag(p.omega_iov))
        if sig_free:
            parts.append(p.sigma[jnp.array(sig_free)] ** 2)
        if base_free:
            parts.append(p.baseline[None])
        return jnp.concatenate(parts) if parts else jnp.zeros((0,))

    def from_natural(v: Float[Array, " n_nat"]) -> PopParams:
        k = 0
        theta = base.theta
        for i in free_t:
            theta = theta.at[i].set(v[k])
            k += 1
        omega = base.omega
        if omega_free:
            for b in blocks:
                for r in range(len(b)):
                    for c in range(r + 1):
                        omega = omega.at[b[r], b[c]].set(v[k]).at[b[c], b[r]].set(v[k])
                        k += 1
        omega_iov = base.omega_iov
        if kappa_free:
            omega_iov = jnp.diag(v[k : k + model.n_kappa])
            k += model.n_kappa
        sigma = base.sigma
        for j in sig_free:
            sigma = sigma.at[j].set(jnp.sqrt(v[k]))
            k += 1
        baseline = v[k] if base_free else base.baseline
        return PopParams(theta, omega, omega_iov, sigma, baseline)

    return Packer(
        pack, unpack, tuple(names), to_natural, from_natural, tuple(nat_names)
    )


__all__ = ["Packer", "build_packer"]
