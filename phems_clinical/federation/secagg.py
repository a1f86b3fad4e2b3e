"""Secure aggregation: the server learns the sum of the sites' vectors and nothing more.

The protocol of Bonawitz et al. [1]_ in its version against an *active* (malicious)
server ([1]_, sections 4 and 6): signed key advertisements and a consistency-check
round. Each site holds a float64 vector of the same length ``d`` (a flattened
payload). It

1. clips every coordinate to ``[-clip, clip]`` and stochastically rounds it onto the
   ``2**bits`` levels spanning that interval (unbiased; the randomness comes from an
   explicit JAX key, so the encoding is reproducible): :func:`encode`;
2. adds, modulo ``2**ring_bits``, a self mask ``PRG(b_i)`` and pairwise masks
   ``+PRG(s_ij)`` for peers ``j`` after it (in sorted site-id order) and
   ``-PRG(s_ij)`` for peers before it, so the pairwise masks cancel in the sum;
3. Shamir-shares (threshold ``t``) its self-mask seed ``b_i`` and its masking private
   key, encrypted to each peer and routed through the server, so that the server can
   remove the masks of sites that drop out.

Identities. Every site holds a long-term Ed25519 identity key
(:func:`generate_identity`) and the identity public keys of all the federation's
sites, ``trusted`` (site id -> 32 bytes). The hospitals exchange that roster among
themselves, out of band, not through the coordinator; ``K = len(trusted)``.

Five stages, each a site-side function returning ``(message, new_state)`` and a
server-side function; every message is a NamedTuple of bytes, ints, strings, dicts
and numpy arrays, so a transport (the in-process engine, a Flower adapter) can
serialise it:

0. :func:`site_advertise_keys` sends :class:`AdvertiseKeys`, its two public keys
   signed with its identity key over (round, site id, keys);
   :func:`server_collect_keys` returns the roster U1 to broadcast.
1. :func:`site_share_keys` verifies every roster entry against ``trusted`` and
   sends :class:`ShareKeys`; :func:`server_route_shares` returns each site's inbox.
2. :func:`site_masked_input` opens and checks its shares (sender, receiver, round,
   evaluation point) and sends :class:`MaskedInput`; :func:`server_collect_masked`
   returns the :class:`ConsistencyRequest` (U3).
3. :func:`site_consistency_check` checks ``|U3| >= t`` and that it is in U3, and
   signs (round, sorted U3): :class:`ConsistencySignature`;
   :func:`server_collect_consistency` returns the :class:`UnmaskRequest`, which
   carries the signatures.
4. :func:`site_unmask` verifies at least ``t`` signatures by members of U3 over the
   U3 it signed itself, and that ``dropped`` is exactly ``U2 \\ U3``, before it
   reveals any share; it answers one request per round. :func:`server_unmask`
   returns the :class:`AggregateResult`.

:func:`secure_sum` runs the five stages in process, with simulated dropouts.

Cryptography (``cryptography``): Ed25519 identity signatures; two X25519 key pairs per
site and round (masking agreement, share encryption); ``s_ij = HKDF-SHA256(ECDH)``
with the round id and the sorted pair ids in ``info``; masks are ChaCha20 key streams
(zero nonce: every key expands exactly one stream) read as little-endian words mod
``2**ring_bits``; shares travel under ChaCha20-Poly1305 with a key per (round,
sender, receiver), the ids as associated data and (sender, receiver, round) again in
the plaintext. All secrets come from the OS CSPRNG (``os.urandom``, ``secrets``,
``cryptography``'s key generation), never from ``jax.random``: a JAX key is a
reproducible seed, which is what the encoding wants and what a mask must not be.

Shamir sharing is over GF(2**521 - 1) with Python ints (a Mersenne prime above every
32-byte secret; one polynomial per secret). pycryptodome's ``Shamir`` works on
16-byte secrets only, so a 32-byte seed or X25519 key would need two independently
shared halves; the 30 lines here are simpler and keep another dependency out. A
site's evaluation point is its 1-based rank in ``sorted(trusted)``, so the server
cannot move it.

Dropout semantics (Bonawitz): ``U1`` advertised keys, ``U2 ⊆ U1`` shared keys,
``U3 ⊆ U2`` sent a masked input, ``U4 ⊆ U3`` signed the consistency check,
``U5 ⊆ U4`` answered the unmasking request.

* The sum is over ``U3``: every site whose masked input arrived is **included**,
  even if it drops before unmasking (the survivors reveal shares of its ``b_i``).
* A site in ``U2 \\ U3`` (dropped before its masked input arrived) is **excluded**;
  the survivors reveal shares of its masking key, and the server removes its
  pairwise masks from the others' inputs.
* A site reveals, for each peer, either the ``b`` share (peer in ``U3``) or the
  masking-key share (peer in ``U2 \\ U3``), never both, and answers one unmasking
  request per round.
* Fewer than ``threshold`` sites at any stage raises :class:`SecAggAbort`.

Threat model and limits
-----------------------
Covered, against a server that deviates arbitrarily from the protocol (substitutes
or drops keys, misroutes shares, tells different sites different dropout sets,
forges or replays messages) and colludes with a set C of sites: the honest sites'
inputs stay hidden beyond sums over sets of at least ``t`` sites provided
``t > (K + |C|) / 2`` ([1]_, section 6 and appendix; two different U3 accepted by
honest sites would need ``2 t`` signatures, of which only the ``|C|`` colluders can
give two). :func:`check_config` refuses ``t <= K / 2`` (then the server alone can
split the honest sites into two groups) and warns
(:class:`SecAggThresholdWarning`) below ``2 K / 3``, where a third of the sites
colluding with the server break it. Key advertisements and consistency signatures
bind the round id, so they cannot be replayed into another round.

Not covered:

* **The sum itself is revealed.** With K = 2 each hospital learns the other's input
  by subtracting its own, and with K = 1 the server learns the input: SecAgg then
  protects nothing, and only differential privacy (noise added at each site before
  encoding) does. A site colluding with the server learns the sum of the others.
  Pair SecAgg with DP.
* **Correctness against malicious sites**: a site may send any vector in range (or
  garbage shares, which make the round abort); nothing proves that an input is a
  clipped payload (that needs zero-knowledge range proofs, out of scope).
* **Availability**: the server, or ``K - t + 1`` sites, can always make a round
  abort; a refusal raises :class:`SecAggError` and the round is lost, never the
  secrets.
* **Identity keys**: the guarantee rests on ``trusted`` being right and the
  identity private keys staying at their sites.
* **Across rounds**: sums of different subsets over several rounds can be
  subtracted; keep the participating set stable or rely on DP.

Encoding error: ``Δ = 2 clip / (2**bits - 1)``; each included site contributes an
error below ``Δ`` per coordinate (zero mean), so the decoded sum is within
``n_included * Δ`` of the sum of the *clipped* inputs. Clipping is not reported to
the server: :func:`encode` returns the count to the site.

References
----------
.. [1] Bonawitz K, Ivanov V, Kreuter B, et al. Practical secure aggregation for
   privacy-preserving machine learning. ACM CCS 2017, 1175-1191. IACR ePrint
   2017/281.
.. [2] Bell JH, Bonawitz KA, Gascón A, Lepoint T, Raykova M. Secure single-server
   aggregation with (poly)logarithmic overhead (SecAgg+). ACM CCS 2020, 1253-1269.
   IACR ePrint 2020/704. With K ≤ 10 sites the complete graph of [1]_ costs little;
   [2]_'s sparse graph matters for thousands of clients.

Examples
--------
>>> import jax
>>> import numpy as np
>>> x = {s: np.full(4, v) for s, v in [("a", 0.25), ("b", -0.5), ("c", 0.1)]}
>>> cfg = SecAggConfig(clip=1.0, bits=16, threshold=2)
>>> res = secure_sum(jax.random.key(0), x, cfg, drop_before_masking=("c",))
>>> res.included, res.dropped
(('a', 'b'), (('c', 2),))
>>> bool(np.all(np.abs(res.total - (-0.25)) <= res.max_error_bound))
True
"""

from __future__ import annotations

import math
import numbers
import os
import secrets
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jaxtyping import Float, Integer, UInt

from phems_clinical._typing import Key

__all__ = [
    "STAGES",
    "AdvertiseKeys",
    "AggregateResult",
    "ConsistencyRequest",
    "ConsistencySignature",
    "Encoding",
    "MaskedInput",
    "SecAggAbort",
    "SecAggConfig",
    "SecAggError",
    "SecAggResult",
    "SecAggThresholdWarning",
    "ServerState",
    "ShareKeys",
    "SiteState",
    "UnmaskRequest",
    "UnmaskShares",
    "check_config",
    "decode",
    "encode",
    "generate_identity",
    "grid_step",
    "plain_sum",
    "safe_threshold",
    "saturate",
    "secure_sum",
    "server_collect_consistency",
    "server_collect_keys",
    "server_collect_masked",
    "server_route_shares",
    "server_unmask",
    "site_advertise_keys",
    "site_consistency_check",
    "site_masked_input",
    "site_share_keys",
    "site_unmask",
]

STAGES = (
    "advertise_keys",
    "share_keys",
    "masked_input",
    "consistency_check",
    "unmasking",
)
"""Stage names by index, as used in transcripts and ``dropped`` lists."""

_PRIME = 2**521 - 1  # Mersenne prime > 2**256: every 32-byte secret is a field element
_SHARE_X_BYTES = 2
_SHARE_Y_BYTES = 66  # ceil(521 / 8)
_SHARE_BYTES = _SHARE_X_BYTES + _SHARE_Y_BYTES
_SECRET_BYTES = 32
_AEAD_NONCE_BYTES = 12
_PUBLIC_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_MAX_BITS = 52  # a finer grid than float64 resolves on [-clip, clip] adds nothing
_DOMAIN = b"phems_clinical/secagg/v2/"


class SecAggError(RuntimeError):
    """The protocol was not followed (a malformed, unverifiable or unexpected
    message); the site or server refuses it and the round is lost."""


class SecAggAbort(SecAggError):
    """Fewer than ``threshold`` sites survived a stage: the round aborts."""

    def __init__(self, stage: int, n_survivors: int, threshold: int):
        self.stage = stage
        self.n_survivors = n_survivors
        self.threshold = threshold
        super().__init__(
            f"secure aggregation aborted at stage {stage} ({STAGES[stage]}): "
            f"{n_survivors} site(s) survived, fewer than threshold={threshold}"
        )


class SecAggThresholdWarning(UserWarning):
    """``threshold < 2 K / 3``: a server colluding with about a third of the sites
    could unmask an honest site's input (Bonawitz et al. 2017, section 6)."""


class SecAggConfig(NamedTuple):
    """Options of a secure-aggregation round (shared by the sites and the server)."""

    clip: float  # coordinates are clipped to [-clip, clip], in the payload's units
    bits: int  # b: stochastic rounding onto 2**b levels spanning [-clip, clip]
    threshold: int  # t: Shamir threshold, fewest sites that may survive any stage
    ring_bits: int = 64  # m: masked arithmetic in Z_{2**m}; 32 or 64


class Encoding(NamedTuple):
    """A site's quantised vector; ``n_clipped`` stays at the site."""

    q: UInt[np.ndarray, " d"]  # grid indices in [0, 2**bits - 1], dtype uint64
    n_clipped: int  # coordinates with |x| > clip


class AdvertiseKeys(NamedTuple):
    """Stage 0, site -> server (broadcast to all sites as the roster)."""

    mask_pk: bytes  # X25519 public key (32 bytes) for the pairwise mask seeds
    enc_pk: bytes  # X25519 public key (32 bytes) for encrypting shares
    signature: bytes  # Ed25519 (64 bytes) over (domain, round, site id, keys)


class ShareKeys(NamedTuple):
    """Stage 1, site -> server: Shamir shares encrypted to each peer."""

    ciphertexts: dict[str, bytes]  # recipient id -> nonce || ChaCha20-Poly1305 box


class MaskedInput(NamedTuple):
    """Stage 2, site -> server: ``y_i`` in Z_{2**m} (uint32 for m = 32, else uint64)."""

    y: UInt[np.ndarray, " d"]


class ConsistencyRequest(NamedTuple):
    """Stage 3, server -> the sites of U3: whose masked inputs arrived."""

    survivors: tuple[str, ...]  # U3, sorted


class ConsistencySignature(NamedTuple):
    """Stage 3, site -> server: Ed25519 signature over (domain, round, sorted U3)."""

    signature: bytes  # 64 bytes


class UnmaskRequest(NamedTuple):
    """Stage 4, server -> the sites of U4: U3, U2 \\ U3 and the U3 signatures."""

    survivors: tuple[str, ...]  # U3: reveal shares of their self-mask seeds
    dropped: tuple[str, ...]  # U2 \\ U3: reveal shares of their masking keys
    signatures: dict[str, bytes]  # signer in U3 -> its ConsistencySignature


class UnmaskShares(NamedTuple):
    """Stage 4, site -> server: the shares this site holds, one kind per peer."""

    self_mask_shares: dict[str, bytes]  # peer in U3 -> share of b_peer
    mask_key_shares: dict[str, bytes]  # peer in U2 \\ U3 -> share of its masking key


class SiteState(NamedTuple):
    """A site's protocol state. Holds secrets: it never leaves the site."""

    site_id: str
    cfg: SecAggConfig
    round_id: int
    stage: int  # the next stage this site may run
    identity_sk: bytes  # Ed25519 private key (raw, 32 bytes), long-term
    trusted: dict[str, bytes]  # site id -> Ed25519 public key, out of band
    mask_sk: bytes  # X25519 private key (raw, 32 bytes)
    enc_sk: bytes  # X25519 private key (raw, 32 bytes)
    self_seed: bytes  # b_i (32 bytes) from stage 1 on, else b""
    roster: dict[str, AdvertiseKeys]  # U1 as verified, from stage 1 on
    shares: dict[str, tuple[bytes, bytes]]  # peer -> (mask-key share, b share) held
    peers: tuple[str, ...]  # U2 including this site, from stage 2 on
    u3: tuple[str, ...]  # the U3 this site signed, from stage 3 on


class ServerState(NamedTuple):
    """The server's protocol state (public keys, participant sets, masked sum)."""

    cfg: SecAggConfig
    round_id: int
    stage: int  # the next stage the server expects
    n_sites: int  # K, the sites of the federation (the threshold is checked on it)
    roster: dict[str, AdvertiseKeys]  # U1
    u2: tuple[str, ...]  # shared keys
    u3: tuple[str, ...]  # masked input arrived
    u4: tuple[str, ...]  # signed the consistency check
    masked_sum: UInt[np.ndarray, " d"] | None  # sum of y_i over U3 mod 2**m, uint64


class AggregateResult(NamedTuple):
    """What the server learns: the sum over ``included`` and who dropped when."""

    total: Float[np.ndarray, " d"]  # decoded sum of the included sites' inputs
    sum_q: UInt[np.ndarray, " d"]  # sum of their grid indices mod 2**m, uint64
    included: tuple[str, ...]  # U3
    dropped: tuple[tuple[str, int], ...]  # (site, first stage it did not answer)


class SecAggResult(NamedTuple):
    """Output of :func:`secure_sum`."""

    total: Float[np.ndarray, " d"]  # sum over ``included`` of the clipped inputs
    included: tuple[str, ...]  # sites whose input is in ``total`` (U3)
    dropped: tuple[tuple[str, int], ...]  # (site, stage index into STAGES)
    transcript: list[tuple[int, str, Any]]  # (stage, sender, message) at the server
    max_error_bound: float  # n_included * grid_step(cfg), per coordinate
    bytes_sent: dict[str, int]  # payload bytes each site sent to the server
    n_clipped: dict[str, int]  # clipped coordinates per site; local, never sent


# --------------------------------------------------------------------- config


def _check_fields(cfg: SecAggConfig) -> None:
    if not (
        isinstance(cfg.clip, numbers.Real) and math.isfinite(cfg.clip) and cfg.clip > 0
    ):
        raise ValueError(f"clip: expected a finite number > 0, got {cfg.clip!r}")
    if cfg.ring_bits not in (32, 64):
        raise ValueError(f"ring_bits: expected 32 or 64, got {cfg.ring_bits!r}")
    if not (isinstance(cfg.bits, numbers.Integral) and 1 <= cfg.bits <= _MAX_BITS):
        raise ValueError(
            f"bits: expected an int in 1..{_MAX_BITS} (float64 resolves "
            f"no finer grid), got {cfg.bits!r}"
        )
    if not (isinstance(cfg.threshold, numbers.Integral) and cfg.threshold >= 1):
        raise ValueError(f"threshold: expected an int >= 1, got {cfg.threshold!r}")


def _check_overflow(cfg: SecAggConfig, n_sites: int) -> None:
    top = n_sites * (2**cfg.bits - 1)
    max_bits = ((2**cfg.ring_bits - 1) // n_sites + 1).bit_length() - 1
    if top >= 2**cfg.ring_bits:
        raise ValueError(
            f"overflow: n_sites * (2**bits - 1) = {n_sites} * {2**cfg.bits - 1} = "
            f"{top} must be < 2**ring_bits = 2**{cfg.ring_bits}; lower bits "
            f"(at most {max_bits} here), "
            "use ring_bits=64, or aggregate fewer sites per round"
        )


def safe_threshold(n_sites: int) -> int:
    """The smallest threshold :func:`check_config` accepts for ``K = n_sites``:
    ``floor(K / 2) + 1``, the least ``t > K / 2``."""
    return n_sites // 2 + 1


def _check_threshold(cfg: SecAggConfig, n_sites: int) -> None:
    """``threshold`` in ``(K / 2, K]`` for ``K = n_sites``; raises ``ValueError``."""
    if not (isinstance(n_sites, int) and 1 <= n_sites < 2 ** (8 * _SHARE_X_BYTES)):
        raise ValueError(f"n_sites: expected an int in 1..65535, got {n_sites!r}")
    if cfg.threshold > n_sites:
        raise ValueError(
            f"threshold: expected at most n_sites={n_sites} (the number "
            f"of sites), got threshold={cfg.threshold}"
        )
    if 2 * cfg.threshold <= n_sites:
        raise ValueError(
            f"threshold: expected more than half of the {n_sites} sites (at least "
            f"{safe_threshold(n_sites)}), got threshold={cfg.threshold}: a server "
            "that tells two halves of the sites different dropout sets would "
            "unmask a site's input (Bonawitz et al. 2017, section 6)"
        )


def check_config(cfg: SecAggConfig, n_sites: int) -> None:
    """Raise ``ValueError`` unless ``cfg`` is usable for a federation of ``n_sites``.

    ``n_sites`` is K, the number of sites in the federation (the trusted identity
    roster), not of those answering one round. Checks ``clip > 0``, ``ring_bits`` in
    {32, 64}, ``1 <= bits <= 52``, ``K / 2 < threshold <= K`` and the overflow
    guard ``n_sites * (2**bits - 1) < 2**ring_bits``, under which the sum of the
    grid indices is recovered exactly from its residue mod ``2**ring_bits``. Warns
    (:class:`SecAggThresholdWarning`) when ``threshold < 2 K / 3``.

    Call it when the federation is configured: at run time the server checks only
    that enough sites survive (:class:`SecAggAbort`).
    """
    _check_fields(cfg)
    _check_threshold(cfg, n_sites)
    _check_overflow(cfg, n_sites)
    if 3 * cfg.threshold < 2 * n_sites:
        warnings.warn(
            f"threshold={cfg.threshold} is below 2/3 of the {n_sites} sites: a "
            f"server colluding with {2 * cfg.threshold - n_sites} site(s) could "
            f"unmask an honest site's input; use threshold >= "
            f"{-(-2 * n_sites // 3)} (Bonawitz et al. 2017, section 6)",
            SecAggThresholdWarning,
            stacklevel=2,
        )


def grid_step(cfg: SecAggConfig) -> float:
    """The quantisation step ``Δ = 2 clip / (2**bits - 1)``, in the payload's units."""
    return 2.0 * cfg.clip / (2**cfg.bits - 1)


# ------------------------------------------------------------------- encoding


def _uniform53(key: Key, d: int) -> np.ndarray:
    """``d`` uniforms on the 2**-53 grid of [0, 1), independent of jax_enable_x64."""
    bits = np.asarray(jax.random.bits(key, (2, d), dtype=jnp.uint32), np.uint64)
    return ((bits[0] >> 5) << 26 | bits[1] >> 6).astype(np.float64) * 2.0**-53


def saturate(x: Float[np.ndarray, " d"], cfg: SecAggConfig) -> Float[np.ndarray, " d"]:
    """A payload vector made encodable: a non-finite entry (e.g. FOCEI's +inf for
    a failed inner problem) becomes ``+clip`` (NaN, +inf) or ``-clip`` (-inf), so
    the decoded sum stays at the edge of the range and the server still rejects
    it, instead of the site failing the round."""
    return np.nan_to_num(
        np.asarray(x, np.float64), nan=cfg.clip, posinf=cfg.clip, neginf=-cfg.clip
    )


def encode(key: Key, x: Float[np.ndarray, " d"], cfg: SecAggConfig) -> Encoding:
    """Clip ``x`` to ``[-clip, clip]`` and stochastically round it onto the grid.

    Level ``k`` in ``0 .. 2**bits - 1`` stands for ``-clip + k Δ``. A coordinate
    ``u = (x + clip) / Δ`` becomes ``floor(u) + 1`` with probability ``u - floor(u)``,
    else ``floor(u)``: unbiased, error below ``Δ``.

    Parameters
    ----------
    key : PRNG key
        Randomness of the rounding only (reproducible by design; masks never use it).
    x : array of shape (d,)
        A site's flattened payload; must be finite.
    cfg : SecAggConfig

    Returns
    -------
    Encoding
        ``q`` (uint64 grid indices) and ``n_clipped`` (for the site's own records).
    """
    _check_fields(cfg)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"x: expected a 1-D vector, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x: expected finite values (NaN or inf found)")
    levels = 2**cfg.bits - 1
    n_clipped = int(np.count_nonzero(np.abs(x) > cfg.clip))
    u = np.clip(
        (np.clip(x, -cfg.clip, cfg.clip) + cfg.clip) / grid_step(cfg), 0.0, levels
    )
    lo = np.floor(u)
    q = lo + (_uniform53(key, x.shape[0]) < u - lo)
    return Encoding(np.minimum(q, levels).astype(np.uint64), n_clipped)


def decode(
    sum_q: UInt[np.ndarray, " d"], n_included: int, cfg: SecAggConfig
) -> Float[np.ndarray, " d"]:
    """Sum of ``n_included`` sites' grid indices -> sum of their values.

    ``sum_k x_k ≈ Δ sum_q - n_included clip``; exact in the grid, within
    ``n_included * Δ`` of the clipped inputs.
    """
    sum_q = np.asarray(sum_q, np.uint64).astype(np.float64)
    return grid_step(cfg) * sum_q - n_included * cfg.clip


def plain_sum(
    qs: Iterable[UInt[np.ndarray, " d"]], cfg: SecAggConfig
) -> UInt[np.ndarray, " d"]:
    """Sum of quantised vectors mod ``2**ring_bits`` in the clear (a test reference)."""
    total = None
    for q in qs:
        q = np.asarray(q, np.uint64)
        total = q.copy() if total is None else total + q
    if total is None:
        raise ValueError("qs: expected at least one vector")
    return _reduce(total, cfg.ring_bits)


# --------------------------------------------------------------- primitives


def _reduce(v: np.ndarray, ring_bits: int) -> np.ndarray:
    # numpy uint64 arrays wrap mod 2**64; 2**32 divides that, so masking reduces.
    return v if ring_bits == 64 else v & np.uint64(2**32 - 1)


def _wire_dtype(ring_bits: int) -> np.dtype:
    return np.dtype(np.uint32 if ring_bits == 32 else np.uint64)


def _prg(seed: bytes, d: int, ring_bits: int) -> np.ndarray:
    """ChaCha20 key stream of ``seed`` as ``d`` little-endian words, as uint64."""
    nbytes = d * ring_bits // 8
    enc = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    word = "<u4" if ring_bits == 32 else "<u8"
    return np.frombuffer(enc.update(bytes(nbytes)), dtype=word).astype(np.uint64)


def _id_bytes(site_id: str) -> bytes:
    b = site_id.encode()
    return len(b).to_bytes(2, "big") + b


def _info(purpose: bytes, round_id: int, *ids: str) -> bytes:
    return (
        _DOMAIN
        + purpose
        + b"/"
        + round_id.to_bytes(8, "big")
        + b"".join(_id_bytes(i) for i in ids)
    )


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        secret
    )


def _ecdh(sk: bytes, pk: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(sk).exchange(
        X25519PublicKey.from_public_bytes(pk)
    )


def _pair_seed(sk: bytes, peer_pk: bytes, round_id: int, a: str, b: str) -> bytes:
    """``s_ab = HKDF(ECDH)``, the same from both ends (ids sorted)."""
    return _hkdf(_ecdh(sk, peer_pk), _info(b"mask", round_id, *sorted((a, b))))


def _share_key(
    sk: bytes, peer_pk: bytes, round_id: int, sender: str, receiver: str
) -> bytes:
    # Directional: i -> j and j -> i get different keys from the same ECDH secret.
    return _hkdf(_ecdh(sk, peer_pk), _info(b"share", round_id, sender, receiver))


def _seal(key: bytes, aad: bytes, plaintext: bytes) -> bytes:
    nonce = os.urandom(_AEAD_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, aad: bytes, box: bytes) -> bytes:
    """Decrypt and authenticate; raises ``cryptography.exceptions.InvalidTag``."""
    n = _AEAD_NONCE_BYTES
    return ChaCha20Poly1305(key).decrypt(box[:n], box[n:], aad)


def _shamir_split(secret: bytes, xs: Iterable[int], t: int) -> dict[int, bytes]:
    """``t``-of-n shares of a 32-byte secret at the points ``xs`` (all nonzero)."""
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(_PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % _PRIME
        out[x] = x.to_bytes(_SHARE_X_BYTES, "big") + y.to_bytes(_SHARE_Y_BYTES, "big")
    return out


def _lagrange_at(points: Sequence[tuple[int, int]], z: int) -> int:
    acc = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (z - xm) % _PRIME
                den = den * (xj - xm) % _PRIME
        acc = (acc + yj * num * pow(den, -1, _PRIME)) % _PRIME
    return acc


def _shamir_combine(shares: Sequence[bytes], t: int, what: str) -> bytes:
    """The secret from ``>= t`` shares; extra shares must lie on the same polynomial."""
    points = []
    for s in shares:
        if len(s) != _SHARE_BYTES:
            raise SecAggError(f"{what}: a share has {len(s)} bytes, not {_SHARE_BYTES}")
        points.append(
            (
                int.from_bytes(s[:_SHARE_X_BYTES], "big"),
                int.from_bytes(s[_SHARE_X_BYTES:], "big"),
            )
        )
    if len({x for x, _ in points}) != len(points) or len(points) < t:
        raise SecAggError(f"{what}: expected >= {t} shares at distinct points")
    base = points[:t]
    for x, y in points[t:]:
        if _lagrange_at(base, x) != y:
            raise SecAggError(f"{what}: shares are inconsistent")
    secret = _lagrange_at(base, 0)
    if secret >= 2 ** (8 * _SECRET_BYTES):
        raise SecAggError(f"{what}: reconstructed value is not a 32-byte secret")
    return secret.to_bytes(_SECRET_BYTES, "big")


def _share_points(ids: Iterable[str]) -> dict[str, int]:
    """Shamir evaluation point of each site: its 1-based rank in sorted id order."""
    return {s: k + 1 for k, s in enumerate(sorted(ids))}


def _require(n: int, t: int, stage: int) -> None:
    if n < t:
        raise SecAggAbort(stage, n, t)


def _check_round_id(round_id: int) -> None:
    if not (isinstance(round_id, int) and 0 <= round_id < 2**64):
        raise ValueError(f"round_id: expected an int in 0..2**64-1, got {round_id!r}")


def _check_site_id(site_id: Any, what: str) -> None:
    if not (isinstance(site_id, str) and site_id and len(site_id.encode()) < 2**16):
        raise ValueError(
            f"{what}: expected a non-empty str site id, got {type(site_id).__name__}"
        )


def _expect_stage(state: SiteState | ServerState, stage: int) -> None:
    if state.stage != stage:
        raise SecAggError(
            f"expected stage {state.stage} next, not stage {stage} "
            f"({STAGES[stage]}); each stage runs once per round"
        )


def _id_tuple(ids: Any, what: str) -> tuple[str, ...]:
    """A request's site list: a sorted tuple of distinct str ids, else refused."""
    if not (
        isinstance(ids, tuple | list)
        and all(isinstance(s, str) for s in ids)
        and list(ids) == sorted(set(ids))
    ):
        raise SecAggError(f"{what}: expected a sorted tuple of distinct site ids")
    return tuple(ids)


# ------------------------------------------------------------------ identities


def generate_identity() -> tuple[bytes, bytes]:
    """A site's long-term Ed25519 identity key pair, raw: ``(private, public)``.

    The private key stays at the site; the public key goes into every other site's
    ``trusted`` roster by a channel the coordinator does not control.
    """
    sk = Ed25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def _check_trusted(trusted: Mapping[str, bytes]) -> dict[str, bytes]:
    if not isinstance(trusted, Mapping) or not 1 <= len(trusted) < 2**16:
        raise ValueError(
            "trusted: expected a mapping site id -> Ed25519 public key "
            "with 1..65535 entries"
        )
    out = {}
    for s in trusted:
        _check_site_id(s, "trusted")
    for s in sorted(trusted):
        pk = trusted[s]
        try:
            Ed25519PublicKey.from_public_bytes(pk)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"trusted: the identity key of {s!r} must be a raw "
                "32-byte Ed25519 public key"
            ) from err
        out[s] = bytes(pk)
    if len(set(out.values())) != len(out):
        raise ValueError("trusted: expected a distinct identity key per site")
    return out


def _verify(public: bytes, signature: Any, message: bytes) -> bool:
    if not (isinstance(signature, bytes) and len(signature) == _SIGNATURE_BYTES):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _advert_message(
    round_id: int, site_id: str, mask_pk: bytes, enc_pk: bytes
) -> bytes:
    """What a key advertisement signs: domain, round, site id and both keys."""
    return _info(b"advertise", round_id, site_id) + mask_pk + enc_pk


def _consistency_message(round_id: int, u3: Sequence[str]) -> bytes:
    """What a consistency signature signs: domain, round and sorted U3."""
    return _info(b"consistency", round_id, *sorted(u3))


def _share_header(round_id: int, sender: str, receiver: str) -> bytes:
    return _info(b"share-plain", round_id, sender, receiver)


def _verify_roster(
    state: SiteState, roster: Mapping[str, AdvertiseKeys]
) -> dict[str, AdvertiseKeys]:
    """The roster with every entry checked against ``state.trusted``; else refused."""
    me, r = state.site_id, state.round_id
    if not (isinstance(roster, Mapping) and all(isinstance(s, str) for s in roster)):
        raise SecAggError("roster: expected a mapping site id -> AdvertiseKeys")
    out = {}
    for s in sorted(roster):
        if s not in state.trusted:
            raise SecAggError(f"roster: {s!r} is not in the trusted identity roster")
        try:
            a = AdvertiseKeys(*roster[s])
        except TypeError as err:
            raise SecAggError(f"roster: the entry of {s!r} is malformed") from err
        if not (
            all(isinstance(v, bytes) for v in a)
            and len(a.mask_pk) == len(a.enc_pk) == _PUBLIC_KEY_BYTES
        ):
            raise SecAggError(
                f"roster: the entry of {s!r} must hold two 32-byte "
                "public keys and a signature"
            )
        if not _verify(
            state.trusted[s], a.signature, _advert_message(r, s, a.mask_pk, a.enc_pk)
        ):
            raise SecAggError(
                f"roster: the keys of {s!r} carry no valid signature "
                f"by its trusted identity key for round {r}"
            )
        out[s] = a
    own = (
        X25519PrivateKey.from_private_bytes(state.mask_sk)
        .public_key()
        .public_bytes_raw(),
        X25519PrivateKey.from_private_bytes(state.enc_sk)
        .public_key()
        .public_bytes_raw(),
    )
    if me not in out or (out[me].mask_pk, out[me].enc_pk) != own:
        raise SecAggError(f"roster: expected this site's ({me!r}) own keys in it")
    pks = [pk for a in out.values() for pk in (a.mask_pk, a.enc_pk)]
    if len(set(pks)) != len(pks):
        raise SecAggError("roster: expected all public keys to be distinct")
    _require(len(out), state.cfg.threshold, 1)
    return out


def _parse_share(
    plain: bytes, round_id: int, sender: str, receiver: str, point: int
) -> tuple[bytes, bytes]:
    """(mask-key share, b share) from a decrypted box, checked; else refused."""
    header = _share_header(round_id, sender, receiver)
    ok = len(plain) == len(header) + 2 * _SHARE_BYTES and plain.startswith(header)
    pair = (
        plain[len(header) : len(header) + _SHARE_BYTES],
        plain[len(header) + _SHARE_BYTES :],
    )
    for share in pair if ok else ():
        ok &= (
            int.from_bytes(share[:_SHARE_X_BYTES], "big") == point
            and int.from_bytes(share[_SHARE_X_BYTES:], "big") < _PRIME
        )
    if not ok:
        raise SecAggError(
            f"share from {sender!r} to {receiver!r}: expected (sender, "
            f"receiver, round {round_id}) and two shares at this "
            "site's evaluation point"
        )
    return pair


def _count_valid_signatures(
    state: SiteState, u3: tuple[str, ...], signatures: Mapping[str, bytes]
) -> int:
    """Signers in U3 (and trusted) whose signature over (round, U3) verifies."""
    message = _consistency_message(state.round_id, u3)
    return sum(
        1
        for s in set(u3) & set(signatures)
        if s in state.trusted and _verify(state.trusted[s], signatures[s], message)
    )


# --------------------------------------------------------------- site stages


def site_advertise_keys(
    site_id: str,
    cfg: SecAggConfig,
    identity_sk: bytes,
    trusted: Mapping[str, bytes],
    *,
    round_id: int = 0,
) -> tuple[AdvertiseKeys, SiteState]:
    """Stage 0: generate this round's two X25519 key pairs; send them, signed.

    Keys come from the OS CSPRNG and are fresh every round. ``identity_sk`` is this
    site's raw Ed25519 private key and must match ``trusted[site_id]``; ``trusted``
    (site id -> Ed25519 public key, K entries) is the federation's identity roster,
    obtained out of band. Refuses ``cfg.threshold <= K / 2`` (``ValueError``).
    """
    _check_fields(cfg)
    _check_round_id(round_id)
    _check_site_id(site_id, "site_id")
    trusted = _check_trusted(trusted)
    if site_id not in trusted:
        raise ValueError(f"trusted: expected an entry for this site ({site_id!r})")
    try:
        sk = Ed25519PrivateKey.from_private_bytes(identity_sk)
    except (TypeError, ValueError) as err:
        raise ValueError(
            "identity_sk: expected a raw 32-byte Ed25519 private key"
        ) from err
    if sk.public_key().public_bytes_raw() != trusted[site_id]:
        raise ValueError(f"identity_sk: does not match trusted[{site_id!r}]")
    _check_threshold(cfg, len(trusted))
    mask_sk, enc_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    mask_pk = mask_sk.public_key().public_bytes_raw()
    enc_pk = enc_sk.public_key().public_bytes_raw()
    signature = sk.sign(_advert_message(round_id, site_id, mask_pk, enc_pk))
    state = SiteState(
        site_id,
        cfg,
        round_id,
        1,
        bytes(identity_sk),
        trusted,
        mask_sk.private_bytes_raw(),
        enc_sk.private_bytes_raw(),
        b"",
        {},
        {},
        (),
        (),
    )
    return AdvertiseKeys(mask_pk, enc_pk, signature), state


def site_share_keys(
    state: SiteState, roster: Mapping[str, AdvertiseKeys]
) -> tuple[ShareKeys, SiteState]:
    """Stage 1: verify the roster (U1); draw ``b_i``; share it and the masking key.

    Every entry must be signed by the identity key ``state.trusted`` holds for it,
    for this round; this site's own keys must be there; at least ``threshold``
    entries. Each peer's pair of shares, prefixed by (sender, receiver, round), is
    encrypted to that peer (X25519 + HKDF + ChaCha20-Poly1305); the site keeps its
    own pair.
    """
    _expect_stage(state, 1)
    cfg, me, r = state.cfg, state.site_id, state.round_id
    roster = _verify_roster(state, roster)
    points = _share_points(state.trusted)
    self_seed = secrets.token_bytes(_SECRET_BYTES)
    xs = [points[s] for s in roster]
    key_shares = _shamir_split(state.mask_sk, xs, cfg.threshold)
    seed_shares = _shamir_split(self_seed, xs, cfg.threshold)
    boxes = {}
    for peer in roster:
        if peer == me:
            continue
        x = points[peer]
        k = _share_key(state.enc_sk, roster[peer].enc_pk, r, me, peer)
        boxes[peer] = _seal(
            k,
            _info(b"share", r, me, peer),
            _share_header(r, me, peer) + key_shares[x] + seed_shares[x],
        )
    held = {me: (key_shares[points[me]], seed_shares[points[me]])}
    return ShareKeys(boxes), state._replace(
        stage=2, self_seed=self_seed, roster=roster, shares=held
    )


def site_masked_input(
    state: SiteState, inbox: Mapping[str, bytes], q: Integer[np.ndarray, " d"]
) -> tuple[MaskedInput, SiteState]:
    """Stage 2: ``y = q + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij)``.

    Parameters
    ----------
    inbox : mapping
        ``sender -> ciphertext`` addressed to this site, from every other site that
        shared keys (U2). Each is decrypted, authenticated and checked to carry
        (sender, this site, round) and shares at this site's evaluation point.
    q : integer array of shape (d,)
        Values in ``Z_{2**ring_bits}``; normally ``encode(...).q``.
    """
    _expect_stage(state, 2)
    cfg, me, r = state.cfg, state.site_id, state.round_id
    q = np.asarray(q)
    if q.ndim != 1 or q.dtype.kind not in "ui":
        raise ValueError(f"q: expected a 1-D integer vector, got {q.dtype} {q.shape}")
    if q.size and (q.min() < 0 or q.max() > 2**cfg.ring_bits - 1):
        raise ValueError(f"q: values must lie in 0..2**{cfg.ring_bits}-1")
    q = q.astype(np.uint64)
    if not isinstance(inbox, Mapping):
        raise SecAggError("inbox: expected a mapping sender -> ciphertext")
    point = _share_points(state.trusted)[me]
    held = dict(state.shares)
    for sender, box in inbox.items():
        if not isinstance(sender, str) or sender == me or sender not in state.roster:
            raise SecAggError(f"inbox: unexpected sender {sender!r}")
        k = _share_key(state.enc_sk, state.roster[sender].enc_pk, r, sender, me)
        try:
            if not (isinstance(box, bytes) and len(box) > _AEAD_NONCE_BYTES + 16):
                raise InvalidTag
            plain = _open(k, _info(b"share", r, sender, me), box)
        except InvalidTag as err:
            raise SecAggError(
                f"site {me!r}: the share ciphertext from {sender!r} "
                "failed authentication"
            ) from err
        held[sender] = _parse_share(plain, r, sender, me, point)
    peers = tuple(sorted(held))
    _require(len(peers), cfg.threshold, 2)
    d = q.shape[0]
    y = q + _prg(state.self_seed, d, cfg.ring_bits)
    for peer in peers:
        if peer == me:
            continue
        mask = _prg(
            _pair_seed(state.mask_sk, state.roster[peer].mask_pk, r, me, peer),
            d,
            cfg.ring_bits,
        )
        y = y + mask if peer > me else y - mask
    y = _reduce(y, cfg.ring_bits).astype(_wire_dtype(cfg.ring_bits))
    return MaskedInput(y), state._replace(stage=3, shares=held, peers=peers)


def site_consistency_check(
    state: SiteState, request: ConsistencyRequest
) -> tuple[ConsistencySignature, SiteState]:
    """Stage 3: sign (round, sorted U3) with the identity key, once per round.

    Refuses (``SecAggError``) a U3 with fewer than ``threshold`` sites, without this
    site, or naming a site that did not share keys with it (U3 must lie in U2).
    """
    _expect_stage(state, 3)
    u3 = _id_tuple(getattr(request, "survivors", None), "consistency request")
    _require(len(u3), state.cfg.threshold, 3)
    if state.site_id not in u3:
        raise SecAggError(
            f"consistency request: expected this site "
            f"({state.site_id!r}) among the survivors"
        )
    if not set(u3) <= set(state.peers):
        raise SecAggError(
            "consistency request: survivors must have shared keys "
            "with this site (U3 within U2)"
        )
    sk = Ed25519PrivateKey.from_private_bytes(state.identity_sk)
    signature = sk.sign(_consistency_message(state.round_id, u3))
    return ConsistencySignature(signature), state._replace(stage=4, u3=u3)


def site_unmask(
    state: SiteState, request: UnmaskRequest
) -> tuple[UnmaskShares, SiteState]:
    """Stage 4: reveal ``b`` shares of U3, masking-key shares of ``U2 \\ U3``.

    Before revealing anything it checks that ``survivors`` is the U3 it signed,
    that ``dropped`` is exactly its ``U2 \\ U3`` and that ``signatures`` holds at
    least ``threshold`` valid signatures over (round, U3) by members of U3 (ignoring
    any other entry). Answers once per round, so a peer's two secrets are never
    both revealed by an honest site.
    """
    _expect_stage(state, 4)
    survivors = _id_tuple(
        getattr(request, "survivors", None), "unmask request: survivors"
    )
    dropped = _id_tuple(getattr(request, "dropped", None), "unmask request: dropped")
    signatures = getattr(request, "signatures", None)
    if not isinstance(signatures, Mapping):
        raise SecAggError(
            "unmask request: signatures: expected a mapping signer -> signature"
        )
    if survivors != state.u3:
        raise SecAggError(
            "unmask request: survivors differ from the U3 this site "
            "signed in the consistency check"
        )
    if dropped != tuple(s for s in state.peers if s not in state.u3):
        raise SecAggError(
            "unmask request: dropped must be exactly the sites that "
            "shared keys but sent no masked input (U2 minus U3)"
        )
    n_valid = _count_valid_signatures(state, survivors, signatures)
    if n_valid < state.cfg.threshold:
        raise SecAggError(
            f"unmask request: {n_valid} valid consistency "
            "signature(s) by members of U3 over this U3, expected at "
            f"least threshold={state.cfg.threshold}"
        )
    msg = UnmaskShares(
        {v: state.shares[v][1] for v in survivors},
        {v: state.shares[v][0] for v in dropped},
    )
    return msg, state._replace(stage=5)


# ------------------------------------------------------------- server stages


def server_collect_keys(
    cfg: SecAggConfig,
    adverts: Mapping[str, AdvertiseKeys],
    *,
    round_id: int = 0,
    n_sites: int | None = None,
) -> tuple[dict[str, AdvertiseKeys], ServerState]:
    """Stage 0: the roster U1 (broadcast it to every site in it).

    ``n_sites`` is K, the number of sites in the federation (default: the number of
    advertisements); :func:`check_config` checks ``cfg`` against it.
    """
    _check_fields(cfg)
    _check_round_id(round_id)
    k = len(adverts) if n_sites is None else n_sites
    check_config(cfg, k)
    roster = {}
    for s in sorted(adverts):
        _check_site_id(s, "adverts")
        try:
            a = AdvertiseKeys(*adverts[s])
        except TypeError as err:
            raise SecAggError(f"adverts: the entry of {s!r} is malformed") from err
        if not (
            all(isinstance(v, bytes) for v in a)
            and len(a.mask_pk) == len(a.enc_pk) == _PUBLIC_KEY_BYTES
            and len(a.signature) == _SIGNATURE_BYTES
        ):
            raise SecAggError(
                f"adverts: the entry of {s!r} must hold two 32-byte "
                "public keys and a 64-byte signature"
            )
        roster[s] = a
    if len(roster) > k:
        raise SecAggError(f"adverts: {len(roster)} advertisements for n_sites={k}")
    _require(len(roster), cfg.threshold, 0)
    return roster, ServerState(cfg, round_id, 1, k, roster, (), (), (), None)


def server_route_shares(
    state: ServerState, messages: Mapping[str, ShareKeys]
) -> tuple[dict[str, dict[str, bytes]], ServerState]:
    """Stage 1: U2 = senders; returns each U2 site's inbox ``{sender: ciphertext}``."""
    _expect_stage(state, 1)
    u2 = tuple(sorted(messages))
    for s in u2:
        if s not in state.roster:
            raise SecAggError(f"share_keys from {s!r}, which is not in the roster")
        if set(messages[s].ciphertexts) != set(state.roster) - {s}:
            raise SecAggError(
                f"share_keys from {s!r}: expected one ciphertext per "
                "other site of the roster"
            )
    _require(len(u2), state.cfg.threshold, 1)
    inboxes = {j: {i: messages[i].ciphertexts[j] for i in u2 if i != j} for j in u2}
    return inboxes, state._replace(stage=2, u2=u2)


def server_collect_masked(
    state: ServerState, messages: Mapping[str, MaskedInput]
) -> tuple[ConsistencyRequest, ServerState]:
    """Stage 2: U3 = senders; sums their ``y``; asks U3 to sign U3."""
    _expect_stage(state, 2)
    m = state.cfg.ring_bits
    u3 = tuple(sorted(messages))
    if not set(u3) <= set(state.u2):
        raise SecAggError(
            f"masked input from {sorted(set(u3) - set(state.u2))}, "
            "which did not share keys"
        )
    _require(len(u3), state.cfg.threshold, 2)
    ys = [np.asarray(messages[s].y) for s in u3]
    shape = ys[0].shape
    if any(y.dtype != _wire_dtype(m) or y.ndim != 1 or y.shape != shape for y in ys):
        raise SecAggError(
            f"masked inputs: expected 1-D {_wire_dtype(m)} vectors of one length"
        )
    total = plain_sum(ys, state.cfg)
    return ConsistencyRequest(u3), state._replace(stage=3, u3=u3, masked_sum=total)


def server_collect_consistency(
    state: ServerState, messages: Mapping[str, ConsistencySignature]
) -> tuple[UnmaskRequest, ServerState]:
    """Stage 3: U4 = signers; the unmasking request forwards their signatures."""
    _expect_stage(state, 3)
    u4 = tuple(sorted(messages))
    if not set(u4) <= set(state.u3):
        raise SecAggError(
            f"consistency signatures from "
            f"{sorted(set(u4) - set(state.u3))}, which are not in U3"
        )
    for s in u4:
        sig = getattr(messages[s], "signature", None)
        if not (isinstance(sig, bytes) and len(sig) == _SIGNATURE_BYTES):
            raise SecAggError(f"consistency signature from {s!r}: expected 64 bytes")
    _require(len(u4), state.cfg.threshold, 3)
    request = UnmaskRequest(
        state.u3,
        tuple(s for s in state.u2 if s not in state.u3),
        {s: messages[s].signature for s in u4},
    )
    return request, state._replace(stage=4, u4=u4)


def server_unmask(
    state: ServerState, messages: Mapping[str, UnmaskShares]
) -> AggregateResult:
    """Stage 4: rebuild ``b_i`` (U3) and dropped sites' masking keys; decode the sum."""
    _expect_stage(state, 4)
    cfg, r = state.cfg, state.round_id
    u5 = tuple(sorted(messages))
    if not set(u5) <= set(state.u4):
        raise SecAggError(
            f"unmask shares from {sorted(set(u5) - set(state.u4))}, "
            "which did not sign the consistency check"
        )
    _require(len(u5), cfg.threshold, 4)
    assert state.masked_sum is not None  # set by stage 3, checked by _expect_stage
    total = state.masked_sum.copy()
    d = total.shape[0]
    dropped_sites = [s for s in state.u2 if s not in state.u3]
    try:
        for v in state.u3:
            seed = _shamir_combine(
                [messages[u].self_mask_shares[v] for u in u5],
                cfg.threshold,
                f"b of {v!r}",
            )
            total = total - _prg(seed, d, cfg.ring_bits)
        for v in dropped_sites:
            sk = _shamir_combine(
                [messages[u].mask_key_shares[v] for u in u5],
                cfg.threshold,
                f"masking key of {v!r}",
            )
            pk = X25519PrivateKey.from_private_bytes(sk).public_key()
            if pk.public_bytes_raw() != state.roster[v].mask_pk:
                raise SecAggError(
                    f"masking key of {v!r}: does not match its public key"
                )
            for u in state.u3:
                mask = _prg(
                    _pair_seed(sk, state.roster[u].mask_pk, r, u, v), d, cfg.ring_bits
                )
                # y_u carries +mask when v sorts after u, -mask before: undo it.
                total = total - mask if v > u else total + mask
    except (KeyError, AttributeError) as err:
        raise SecAggError(f"unmask shares: missing the share of {err}") from err
    sum_q = _reduce(total, cfg.ring_bits)
    dropped = tuple(
        sorted(
            [(s, 1) for s in state.roster if s not in state.u2]
            + [(s, 2) for s in dropped_sites]
            + [(s, 3) for s in state.u3 if s not in state.u4]
            + [(s, 4) for s in state.u4 if s not in u5]
        )
    )
    return AggregateResult(decode(sum_q, len(state.u3), cfg), sum_q, state.u3, dropped)


# ------------------------------------------------------------------- driver


def _nbytes(msg: Any) -> int:
    """Payload bytes of a message (keys, signatures, ciphertexts, shares, vector)."""
    if isinstance(msg, AdvertiseKeys):
        return len(msg.mask_pk) + len(msg.enc_pk) + len(msg.signature)
    if isinstance(msg, ShareKeys):
        return sum(len(b) for b in msg.ciphertexts.values())
    if isinstance(msg, MaskedInput):
        return int(msg.y.nbytes)
    if isinstance(msg, ConsistencySignature):
        return len(msg.signature)
    return sum(len(b) for b in msg.self_mask_shares.values()) + sum(
        len(b) for b in msg.mask_key_shares.values()
    )


def secure_sum(
    key: Key,
    vectors: Mapping[str, Float[np.ndarray, " d"]],
    cfg: SecAggConfig,
    *,
    identities: Mapping[str, tuple[bytes, bytes]] | None = None,
    drop_before_sharing: Sequence[str] = (),
    drop_before_masking: Sequence[str] = (),
    drop_after_masking: Sequence[str] = (),
    drop_after_consistency: Sequence[str] = (),
    round_id: int = 0,
) -> SecAggResult:
    """Run one SecAgg round in process over ``vectors`` (site id -> flat vector).

    Sites are taken in sorted id order; site ``k``'s encoding key is
    ``jax.random.split(key, K)[k]``, so the same ``key`` and inputs give the same
    ``total`` although the masks (OS randomness) differ every run.

    Parameters
    ----------
    key : PRNG key
        Stochastic rounding only.
    vectors : mapping str -> array of shape (d,)
    cfg : SecAggConfig
        Checked with :func:`check_config` for K = the number of identities.
    identities : mapping str -> (private, public), optional
        Each site's Ed25519 identity (:func:`generate_identity`); the public keys
        form every site's trusted roster, and may name sites absent from
        ``vectors`` (they count in K). Default: throw-away identities for the sites
        of ``vectors``.
    drop_before_sharing : sequence of str
        Sites that advertise keys, then vanish (no shares, no masks; excluded).
    drop_before_masking : sequence of str
        Sites that share keys but whose masked input never arrives (excluded; their
        pairwise masks are removed using their reconstructed masking keys).
    drop_after_masking : sequence of str
        Sites whose masked input arrives but which do not sign the consistency
        check (included, as in Bonawitz: their ``b_i`` is rebuilt from shares).
    drop_after_consistency : sequence of str
        Sites that sign the consistency check but do not answer the unmasking
        request (included).
    round_id : int
        Bound into every signature; use a fresh one per round.

    Returns
    -------
    SecAggResult

    Raises
    ------
    SecAggAbort
        Fewer than ``cfg.threshold`` sites left at some stage.
    """
    ids = sorted(vectors)
    if identities is None:
        identities = {s: generate_identity() for s in ids}
    if not set(ids) <= set(identities):
        raise ValueError("identities: expected an identity for every site of vectors")
    trusted = {s: identities[s][1] for s in identities}
    check_config(cfg, len(trusted))
    xs = {s: np.asarray(vectors[s], dtype=np.float64) for s in ids}
    if len({x.shape for x in xs.values()}) != 1 or xs[ids[0]].ndim != 1:
        raise ValueError("vectors: expected 1-D arrays of one length")
    drops = [
        set(drop_before_sharing),
        set(drop_before_masking),
        set(drop_after_masking),
        set(drop_after_consistency),
    ]
    named = [s for ds in drops for s in ds]
    if not set(named) <= set(ids) or len(named) != len(set(named)):
        raise ValueError("drop_*: expected distinct site ids among vectors' keys")
    site_keys = dict(zip(ids, jax.random.split(key, len(ids)), strict=True))
    transcript: list[tuple[int, str, Any]] = []
    sent = dict.fromkeys(ids, 0)

    def deliver(stage: int, msgs: dict[str, Any]) -> dict[str, Any]:
        for s, msg in msgs.items():
            transcript.append((stage, s, msg))
            sent[s] += _nbytes(msg)
        return msgs

    states, adverts = {}, {}
    for s in ids:
        adverts[s], states[s] = site_advertise_keys(
            s, cfg, identities[s][0], trusted, round_id=round_id
        )
    roster, server = server_collect_keys(
        cfg, deliver(0, adverts), round_id=round_id, n_sites=len(trusted)
    )

    shares = {}
    for s in ids:
        if s not in drops[0]:
            shares[s], states[s] = site_share_keys(states[s], roster)
    inboxes, server = server_route_shares(server, deliver(1, shares))

    masked, n_clipped = {}, {}
    for s in inboxes:
        if s not in drops[1]:
            enc = encode(site_keys[s], xs[s], cfg)
            n_clipped[s] = enc.n_clipped
            masked[s], states[s] = site_masked_input(states[s], inboxes[s], enc.q)
    check, server = server_collect_masked(server, deliver(2, masked))

    signed = {}
    for s in check.survivors:
        if s not in drops[2]:
            signed[s], states[s] = site_consistency_check(states[s], check)
    request, server = server_collect_consistency(server, deliver(3, signed))

    reveals = {}
    for s in request.signatures:
        if s not in drops[3]:
            reveals[s], states[s] = site_unmask(states[s], request)
    out = server_unmask(server, deliver(4, reveals))
    return SecAggResult(
        out.total,
        out.included,
        out.dropped,
        transcript,
        len(out.included) * grid_step(cfg),
        sent,
        n_clipped,
    )
