"""FedAvg, FedProx, FedAdam and FedYogi as federated ``Algorithm`` objects.

Every strategy is one function, :func:`fedopt`, with two optax optimisers: the
**local** one that each site runs for ``local_steps`` steps on its own patients'
mean loss, and the **server** one applied to the pseudo-gradient
``-sum_k n_k (x_k - x) / sum_k n_k`` (Reddi et al., "Adaptive federated
optimization", ICLR 2021, Algorithm 2):

* FedAvg (McMahan et al., AISTATS 2017): server ``optax.sgd(1.0)``, i.e. the
  weighted average of the sites' parameters;
* FedProx (Li et al., MLSys 2020): FedAvg plus the proximal term
  ``mu/2 ||x_k - x||^2`` in each site's objective;
* FedAdam / FedYogi: server ``optax.adam`` / ``optax.yogi``.

Patient-level differential privacy (optional, ``dp``): every local step sums the
per-patient gradients clipped to L2 norm ``C`` and adds ``N(0, (z C)^2)``
(:func:`phems_clinical.federation.dp.privatise_sum`): DP-SGD with the patient as
the unit, every local step of every round one Gaussian mechanism
(``dp_steps_per_round = local_steps``). Hospital-level DP (optional, ``site_dp``):
each site clips its change to ``S`` and sends it with weight 1; the server adds
``N(0, (z S)^2)`` to the sum and divides by the number of sites (DP-FedAvg,
McMahan et al., ICLR 2018).

Models plug in through an :class:`Objective`: per-patient loss terms and their
gradients on a flat parameter vector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from phems_clinical.federation import dp as dpm
from phems_clinical.federation.core import Algorithm
from phems_clinical.federation.focei import site_objective
from phems_clinical.federation.pk_sites import SiteCohort
from phems_clinical.pk.model import PopParams, initial_params
from phems_clinical.pk.spec import PopModel


class Objective(NamedTuple):
    """Per-patient loss terms of a model at one site, on a flat parameter vector.

    ``per_patient(x, data, local) -> (values (n,), grads (n, d), mask (n,), local)``
    gives every patient's loss term, its gradient and which rows are real patients
    (padding rows are ignored); ``local`` is the site's own state (e.g. warm
    starts of its patients' random effects). ``init_local(data)`` creates it.
    """

    init_local: Callable[[Any], Any]
    per_patient: Callable[[jax.Array, Any, Any], tuple]


class Examples(NamedTuple):
    """Generic per-example site data: a pytree with a leading example axis and a
    mask of real rows."""

    data: Any
    mask: jax.Array


def objective_from_loss(loss: Callable[[jax.Array, Any], jax.Array]) -> Objective:
    """An :class:`Objective` over :class:`Examples` from a single-example
    ``loss(x, example)`` (vmapped; no local state)."""
    vg = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))

    def per_patient(x, site: Examples, local):
        values, grads = vg(x, site.data)
        return values, grads, site.mask, local

    return Objective(lambda site: jnp.zeros(()), per_patient)


def focei_loss(
    model: PopModel, n_occ: int = 1, base: PopParams | None = None
) -> Objective:
    """Each patient's FOCEI objective term (-2 log-likelihood, NONMEM's OFV_i) on
    the packed population parameters of :func:`phems_clinical.pk.packing.build_packer`
    over :class:`~phems_clinical.federation.pk_sites.SiteCohort` data; the local
    state is the patients' conditional modes (warm starts, never sent)."""
    base = initial_params(model) if base is None else base
    objective = site_objective(model, n_occ, base)
    n_b = model.n_eta + n_occ * model.n_kappa

    def per_patient(x, site: SiteCohort, b0):
        per, jac, b = objective(x, site, b0)
        return per, jac, site.mask, b

    return Objective(lambda site: jnp.zeros((site.cohort.n_subjects, n_b)), per_patient)


class ServerState(NamedTuple):
    """Global parameters, the server optimiser's state and the round."""

    x: jax.Array
    opt_state: Any
    round: jax.Array


class SiteState(NamedTuple):
    """A site's own state: the objective's local state (never sent)."""

    local: Any


def fedopt(
    name: str,
    objective: Objective,
    x0: jax.Array,
    *,
    server_optimizer: optax.GradientTransformation,
    local_optimizer: optax.GradientTransformation,
    local_steps: int = 1,
    prox_mu: float = 0.0,
    dp: dpm.DPConfig | None = None,
    site_dp: dpm.SiteDPConfig | None = None,
    n_sites: int | None = None,
    max_rounds: int = 100,
    to_result: Callable[[jax.Array], dict] | None = None,
) -> Algorithm:
    """A FedOpt-family :class:`Algorithm` (see the module docstring).

    Parameters
    ----------
    name : {"fedavg", "fedprox", "fedadam", "fedyogi"}
        Declares the message (``delta`` (d,), ``weight`` ()).
    objective : Objective
        Per-patient losses; sites minimise their mean.
    x0 : (d,) array
        Initial global parameters.
    local_steps : int
        Local optimiser steps per round (E).
    prox_mu : float
        FedProx's mu (0: none).
    dp, site_dp : optional
        Patient-level DP-SGD at each site; hospital-level DP on the aggregate
        (``n_sites`` then fixes the denominator).
    to_result : callable, optional
        ``x -> dict`` of named estimates for ``result``.
    """
    x0 = jnp.asarray(x0, dtype=float)  # float64 with x64 on, else float32
    d = int(x0.shape[0])
    if dp is not None:
        dpm.validate_config(dp)
    if site_dp is not None:
        dpm.validate_config(site_dp)
        if n_sites is None:
            raise ValueError(
                "n_sites: required with site_dp (the DP-FedAvg denominator)"
            )
    if local_steps < 1:
        raise ValueError(f"local_steps: expected >= 1, got {local_steps}")

    def init_server(key):
        del key
        return ServerState(x0, server_optimizer.init(x0), jnp.zeros((), jnp.int32))

    def init_site(site):
        return SiteState(objective.init_local(site))

    def broadcast(server):
        return {"x": server.x}

    def local_update(message, site, state: SiteState, key):
        x_global = message["x"]

        def step(carry, k):
            x, opt_state, local = carry
            values, grads, mask, local = objective.per_patient(x, site, local)
            n = jnp.sum(mask)
            if dp is None:
                total = jnp.sum(jnp.where(mask[:, None], grads, 0.0), axis=0)
            else:
                total, _ = dpm.privatise_sum(k, grads, dp, mask)
            g = total / n + prox_mu * (x - x_global)
            updates, opt_state = local_optimizer.update(g, opt_state, x)
            loss = jnp.sum(jnp.where(mask, values, 0.0)) / n
            return (optax.apply_updates(x, updates), opt_state, local), loss

        carry = (x_global, local_optimizer.init(x_global), state.local)
        (x, _, local), losses = jax.lax.scan(
            step, carry, jax.random.split(key, local_steps)
        )
        weight = jnp.sum(site.mask).astype(x0.dtype)
        delta = x - x_global
        if site_dp is not None:
            delta, weight = dpm.clip_vector(delta, site_dp.clip), jnp.ones(())
        payload = {"delta": weight * delta, "weight": weight}
        return (
            payload,
            SiteState(local),
            {"loss_first": losses[0], "loss_last": losses[-1]},
        )

    def aggregate(server, total, key):
        if site_dp is None:
            mean_delta = total["delta"] / total["weight"]
        else:
            assert n_sites is not None  # required above whenever site_dp is set
            mean_delta = dpm.clip_and_noise_aggregate(
                key, total["delta"], n_sites, site_dp
            )
        updates, opt_state = server_optimizer.update(
            -mean_delta, server.opt_state, server.x
        )
        return ServerState(
            optax.apply_updates(server.x, updates), opt_state, server.round + 1
        )

    def done(server):
        return server.round >= max_rounds

    def result(server):
        out = {"x": server.x, "rounds": int(server.round)}
        if to_result is not None:
            out.update(to_result(server.x))
        return out

    return Algorithm(
        name,
        init_server,
        init_site,
        broadcast,
        local_update,
        aggregate,
        done,
        result,
        {"delta": (d,), "weight": ()},
        max_rounds=max_rounds,
        dp_steps_per_round=local_steps if dp is not None else 0,
        dp=dp,
        server_dp=site_dp,
    )


def fedavg(
    objective: Objective, x0, *, learning_rate: float, local_steps: int = 1, **kw
) -> Algorithm:
    """FedAvg: local SGD, server averages (server learning rate 1)."""
    return fedopt(
        "fedavg",
        objective,
        x0,
        server_optimizer=optax.sgd(1.0),
        local_optimizer=optax.sgd(learning_rate),
        local_steps=local_steps,
        **kw,
    )


def fedprox(
    objective: Objective,
    x0,
    *,
    learning_rate: float,
    mu: float,
    local_steps: int = 1,
    **kw,
) -> Algorithm:
    """FedProx: FedAvg with the proximal term ``mu/2 ||x_k - x||^2`` at sites."""
    return fedopt(
        "fedprox",
        objective,
        x0,
        server_optimizer=optax.sgd(1.0),
        local_optimizer=optax.sgd(learning_rate),
        local_steps=local_steps,
        prox_mu=mu,
        **kw,
    )


def fedadam(
    objective: Objective,
    x0,
    *,
    learning_rate: float,
    server_learning_rate: float,
    local_steps: int = 1,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
    **kw,
) -> Algorithm:
    """FedAdam: local SGD, Adam on the server (Reddi et al. 2021; eps = tau)."""
    return fedopt(
        "fedadam",
        objective,
        x0,
        server_optimizer=optax.adam(server_learning_rate, b1=b1, b2=b2, eps=eps),
        local_optimizer=optax.sgd(learning_rate),
        local_steps=local_steps,
        **kw,
    )


def fedyogi(
    objective: Objective,
    x0,
    *,
    learning_rate: float,
    server_learning_rate: float,
    local_steps: int = 1,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
    **kw,
) -> Algorithm:
    """FedYogi: local SGD, Yogi on the server (Reddi et al. 2021)."""
    return fedopt(
        "fedyogi",
        objective,
        x0,
        server_optimizer=optax.yogi(server_learning_rate, b1=b1, b2=b2, eps=eps),
        local_optimizer=optax.sgd(learning_rate),
        local_steps=local_steps,
        **kw,
    )


__all__ = [
    "Examples",
    "Objective",
    "ServerState",
    "SiteState",
    "fedadam",
    "fedavg",
    "fedopt",
    "fedprox",
    "fedyogi",
    "focei_loss",
    "objective_from_loss",
]
