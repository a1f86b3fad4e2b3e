"""One interface for every federated algorithm: pure functions over explicit state.

A federated algorithm is an :class:`Algorithm`, a NamedTuple of pure functions:

* the **server** keeps a state pytree (global parameters, server optimiser state,
  round counters). ``broadcast(server)`` is what every site receives and
  ``aggregate(server, total, key)`` folds in the **sum** of the sites' payloads:
  the server never needs (and, with secure aggregation, never sees) one site's
  payload on its own;
* each **site** keeps its own state pytree (e.g. warm-start modes of its patients'
  random effects, or its EP site factor). ``local_update(message, data, state,
  key)`` returns ``(payload, new_state, metrics)``. The payload is a flat dict of
  population-level float arrays whose names and shapes are declared by
  ``message_spec`` and checked against ``data_schemas/federation_message.schema.json``;
  ``metrics`` are scalars the site keeps for its own log (they do not leave the site
  unless an algorithm puts them in the payload).

Weighted averages are sums too: a site sends ``n_k * delta_k`` and ``n_k``.

Keys: a site's key is its own (DP noise must be secret from the server); in a
simulation each site's key is derived from the run seed with
:func:`site_round_key`, so the in-process engine and the Flower deployment draw
identical numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical._typing import Array, Key

Payload = dict[str, Array]


class Algorithm(NamedTuple):
    """A federated algorithm as pure functions (see the module docstring).

    Attributes
    ----------
    name : str
        Key of its message declaration in ``federation_message.schema.json``.
    init_server : (key) -> server state pytree.
    init_site : (site data) -> site state pytree.
    broadcast : (server state) -> dict of population-level arrays sent to sites.
    local_update : (message, site data, site state, key) -> (payload, site state,
        metrics).
    aggregate : (server state, summed payload, key) -> server state.
    done : (server state) -> bool scalar; the engine stops when it is true.
    result : (server state) -> dict of population-level estimates (host side).
    message_spec : dict field -> shape tuple of the payload, e.g.
        ``{"ofv": (), "grad": (12,)}`` (fixed by the model, never by the data).
    max_rounds : int, the engine's default number of rounds.
    dp_steps_per_round : int, noisy releases of each patient per round (0 when the
        algorithm adds no patient-level DP noise); the privacy accountant composes
        ``rounds * dp_steps_per_round`` Gaussian mechanisms.
    dp : the patient-level ``DPConfig`` the algorithm applies at every site, or
        None (see :mod:`phems_clinical.federation.dp`).
    """

    name: str
    init_server: Callable[[Key], Any]
    init_site: Callable[[Any], Any]
    broadcast: Callable[[Any], Payload]
    local_update: Callable[[Payload, Any, Any, Key], tuple[Payload, Any, dict]]
    aggregate: Callable[[Any, Payload, Key], Any]
    done: Callable[[Any], Array]
    result: Callable[[Any], dict]
    message_spec: dict[str, tuple[int, ...]]
    max_rounds: int = 100
    dp_steps_per_round: int = 0
    dp: Any = None


def site_size(data: Any) -> int:
    """Number of real patients in a site's data (its ``mask``), as the site knows
    it (for DP accounting and the policy's minimum cohort size)."""
    return int(np.sum(np.asarray(data.mask)))


def site_round_key(site_key: Key, round_: int | Array) -> Key:
    """The key a site uses in ``round_`` (derived from its own secret key)."""
    return jax.random.fold_in(site_key, round_)


def simulated_site_keys(key: Key, n_sites: int) -> Key:
    """Per-site secret keys of a simulation, ``(n_sites,)``, derived from the run
    key (in a deployment each site draws its own)."""
    return jax.random.split(jax.random.fold_in(key, 0x517E), n_sites)


def server_round_key(key: Key, round_: int | Array) -> Key:
    """The server's key in ``round_`` (e.g. for site-level DP noise)."""
    return jax.random.fold_in(jax.random.fold_in(key, 0x5E4), round_)


def sum_payloads(payloads: Payload, participate: Array) -> Payload:
    """Sum stacked payloads ``(K, ...)`` over participating sites (a bool ``(K,)``).

    ``jnp.where`` rather than a product, so that a failed site's non-finite values
    cannot leak into the sum."""
    def total(x):
        w = participate.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sum(jnp.where(w, x, 0.0), axis=0)

    return {k: total(v) for k, v in payloads.items()}


def stack_sites(trees: list) -> Any:
    """Stack equal-shaped site pytrees along a new leading site axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_sites(tree: Any, n_sites: int) -> list:
    """Inverse of :func:`stack_sites`."""
    return [jax.tree.map(lambda x, k=k: x[k], tree) for k in range(n_sites)]


def payload_to_numpy(payload: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Host copies of a payload (float64), e.g. to serialise or to mask it."""
    return {k: np.asarray(v, dtype=np.float64) for k, v in payload.items()}


def flatten_payload(payload: Mapping[str, Any], spec: Mapping[str, tuple]
                    ) -> np.ndarray:
    """Concatenate a payload's arrays in ``spec`` order into one float64 vector
    (the form secure aggregation works on)."""
    return np.concatenate([np.asarray(payload[k], np.float64).reshape(-1)
                           for k in spec])


def unflatten_payload(vector: np.ndarray, spec: Mapping[str, tuple]) -> Payload:
    """Inverse of :func:`flatten_payload`."""
    out, i = {}, 0
    for k, shape in spec.items():
        n = int(np.prod(shape, dtype=int))
        out[k] = jnp.asarray(vector[i:i + n].reshape(shape))
        i += n
    return out


__all__ = ["Algorithm", "Payload", "flatten_payload", "payload_to_numpy",
           "server_round_key", "simulated_site_keys", "site_round_key", "site_size",
           "stack_sites",
           "sum_payloads", "unflatten_payload", "unstack_sites"]
