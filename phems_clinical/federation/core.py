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

Keys: a site's key is its own. Without patient-level DP, a simulated site's key is
derived from the run seed (:func:`simulated_site_keys`, :func:`site_round_key`), so
the in-process engine and the Flower deployment draw identical numbers and a seed
reproduces a run bit for bit. With DP (``Algorithm.dp``) the noise must be secret
from everyone who knows the seed (the server sets it, the outputs record it): a
mechanism that is deterministic given public inputs is not DP at any epsilon. Each
site's key then comes from its own OS CSPRNG (:func:`site_secret_key`, or in a
deployment :func:`kept_site_secret` and :func:`derive_site_key`), is never derived
from the run configuration and never written to any output; only a site that keeps
its own secret can replay its noise.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical._typing import Array, Key
from phems_clinical.keyfiles import create_secret_file

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
    server_dp : the hospital-level ``SiteDPConfig`` whose noise the server adds in
        ``aggregate``, or None; the engines then draw the server's key from its
        own OS CSPRNG (:func:`site_secret_key`), never from the run seed.
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
    server_dp: Any = None


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


SECRET_FILE = "site-secret.key"
"""Name of a site's kept secret in its node-local state folder (mode 0600)."""

_SECRET_BYTES = 32  # 256-bit master secret of a site (HMAC-SHA256 key)
_KEY_BYTES = 8  # threefry2x32 keys are 2 x uint32
_KEY_INFO = b"phems_clinical/site-dp-key/v1"


def key_from_bytes(raw: bytes) -> Key:
    """A typed threefry2x32 JAX key made of 8 bytes (e.g. from the CSPRNG)."""
    if len(raw) != _KEY_BYTES:
        raise ValueError(f"key bytes: expected {_KEY_BYTES}, got {len(raw)}")
    data = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
    return jax.random.wrap_key_data(jnp.asarray(data), impl="threefry2x32")


def site_secret_key() -> Key:
    """A fresh secret key for one site's private randomness (DP-SGD noise and
    Poisson sampling), from the OS CSPRNG (``secrets.token_bytes``).

    Its 64 bits are the whole key of JAX's threefry2x32 generator, and every draw
    of the site's noise is a function of them and of nothing public, so the noise
    cannot be regenerated from the run seed or the outputs; a blind search costs
    about 2**63 regenerations of the site's noise per site and run. That is the
    key size of threefry (Salmon et al., SC 2011), not a 128-bit cryptographic
    margin: an adversary with that much compute is out of scope.
    """
    return key_from_bytes(secrets.token_bytes(_KEY_BYTES))


def site_secret_keys(n_sites: int) -> Key:
    """``(n_sites,)`` independent :func:`site_secret_key` keys (a simulation's
    sites; keep them to replay a DP run exactly)."""
    return jnp.stack([site_secret_key() for _ in range(int(n_sites))])


def run_site_keys(
    key: Key, n_sites: int, *, private: bool, site_secrets: Key | None = None
) -> Key:
    """Each simulated site's key for a run, ``(n_sites,)``.

    ``site_secrets`` (the keys the sites kept) when given; otherwise, for a run
    with patient-level DP (``private``), fresh :func:`site_secret_key` keys that
    nobody keeps, and without DP keys derived from the run ``key``
    (:func:`simulated_site_keys`: the same seed, the same run).
    """
    if site_secrets is not None:
        shape = getattr(site_secrets, "shape", None)
        if not (
            hasattr(site_secrets, "dtype")
            and jax.dtypes.issubdtype(site_secrets.dtype, jax.dtypes.prng_key)
            and shape == (n_sites,)
        ):
            raise ValueError(
                f"site_secrets: expected {n_sites} typed JAX keys "
                f"(shape ({n_sites},), e.g. from site_secret_keys), "
                f"got shape {shape}"
            )
        return site_secrets
    if private:
        return site_secret_keys(n_sites)
    return simulated_site_keys(key, n_sites)


def kept_site_secret(folder: str | Path) -> bytes:
    """The site's 256-bit secret kept in ``folder`` (its node-local state folder),
    created from the OS CSPRNG at first use with file mode 0600.

    Creation is atomic (written to a private temporary file, then hard-linked to
    :data:`SECRET_FILE`, which fails if it exists), so two processes of one site
    never hold different secrets. The secret never leaves the node: no message,
    no result, no log carries it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRET_FILE
    if not path.exists():
        tmp = folder / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        create_secret_file(tmp, secrets.token_bytes(_SECRET_BYTES))
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process of this site created it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
    raw = path.read_bytes()
    if len(raw) != _SECRET_BYTES:
        raise ValueError(
            f"site secret file {SECRET_FILE}: expected {_SECRET_BYTES} "
            f"bytes, got {len(raw)} (refusing to use a damaged secret)"
        )
    return raw


def tree_digest(*trees: Any) -> bytes:
    """SHA-256 of pytrees of arrays (structure, shapes, dtypes, values), so that a
    site's DP key depends on exactly what it computes on: the broadcast message,
    its data and its state. Computed and used at the site only."""
    h = hashlib.sha256()
    for tree in trees:
        leaves, treedef = jax.tree.flatten(tree)
        h.update(repr(treedef).encode() + b"\0")
        for leaf in leaves:
            if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            v = np.ascontiguousarray(np.asarray(leaf))
            h.update(f"{v.dtype.str}{v.shape}".encode() + b"\0" + v.tobytes())
    return h.digest()


def derive_site_key(secret: bytes, round_: int, context: bytes = b"") -> Key:
    """The site's key for one round of a DP run: HMAC-SHA256 (RFC 2104; the
    ``cryptography`` package) of the round and ``context`` under the site's kept
    ``secret``, truncated to a threefry key.

    Pass as ``context`` what the round computes on (:func:`tree_digest` of the
    broadcast, the site's data and state): a repeated identical request gets the
    identical answer (no new information), while the same round asked again with
    anything changed (another broadcast, new patients at the site) gets
    independent noise, never the same noise twice -- two releases with equal
    noise would let their difference cancel it.
    """
    from cryptography.hazmat.primitives import hashes, hmac

    mac = hmac.HMAC(secret, hashes.SHA256())
    mac.update(_KEY_INFO + int(round_).to_bytes(8, "big") + context)
    return key_from_bytes(mac.finalize()[:_KEY_BYTES])


def server_run_key(key: Key, algorithm: Algorithm) -> Key:
    """The key the server's ``aggregate`` draws from in a run: the run ``key``,
    except with hospital-level DP (``algorithm.server_dp``), whose noise must not
    be replayable from the seed that the outputs record: then a fresh secret key
    from the server's OS CSPRNG (:func:`site_secret_key`) that nobody keeps."""
    return key if algorithm.server_dp is None else site_secret_key()


def server_round_key(key: Key, round_: int | Array) -> Key:
    """The server's key in ``round_`` (e.g. for hospital-level DP noise); pass
    :func:`server_run_key`'s key."""
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


def flatten_payload(
    payload: Mapping[str, Any], spec: Mapping[str, tuple]
) -> np.ndarray:
    """Concatenate a payload's arrays in ``spec`` order into one float64 vector
    (the form secure aggregation works on)."""
    return np.concatenate(
        [np.asarray(payload[k], np.float64).reshape(-1) for k in spec]
    )


def unflatten_payload(vector: np.ndarray, spec: Mapping[str, tuple]) -> Payload:
    """Inverse of :func:`flatten_payload`."""
    out, i = {}, 0
    for k, shape in spec.items():
        n = int(np.prod(shape, dtype=int))
        out[k] = jnp.asarray(vector[i : i + n].reshape(shape))
        i += n
    return out


__all__ = [
    "SECRET_FILE",
    "Algorithm",
    "Payload",
    "derive_site_key",
    "flatten_payload",
    "kept_site_secret",
    "key_from_bytes",
    "payload_to_numpy",
    "run_site_keys",
    "server_round_key",
    "server_run_key",
    "simulated_site_keys",
    "site_round_key",
    "site_secret_key",
    "site_secret_keys",
    "site_size",
    "stack_sites",
    "sum_payloads",
    "tree_digest",
    "unflatten_payload",
    "unstack_sites",
]
