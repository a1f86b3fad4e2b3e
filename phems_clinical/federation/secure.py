"""Secure aggregation for the engine: sites' payloads summed under pairwise masks.

:func:`secagg_aggregator` turns :func:`phems_clinical.federation.secagg.secure_sum`
(Bonawitz et al., CCS 2017) into an engine aggregator: each site flattens its
payload in the order of the algorithm's ``message_spec``, clips and stochastically
quantises it, and masks it; the server unmasks only the sum, which it unflattens
back into a payload. The server never sees one site's payload.

Choose ``clip`` above the largest magnitude any payload entry can take (values
beyond it are clipped, silently from the server's point of view; the sites count
them in ``SecAggRound.n_clipped``): e.g. 1e6 for FOCEI objectives and gradients.
The per-coordinate error of the sum is at most ``n_sites * 2 clip / (2^bits - 1)``
and zero on average.

The protocol is the active-adversary version (signed key advertisements, a
consistency-check round): each simulated site holds a long-term Ed25519 identity,
made when the aggregator is built, and every site trusts the identity roster of all
``n_sites`` sites. The threshold must exceed half of them
(:func:`~phems_clinical.federation.secagg.check_config`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import NamedTuple, TypedDict

from phems_clinical.federation.core import flatten_payload, unflatten_payload
from phems_clinical.federation.secagg import (
    SecAggConfig,
    check_config,
    generate_identity,
    safe_threshold,
    saturate,
    secure_sum,
)


class SecAggRound(NamedTuple):
    """What one securely aggregated round cost and guaranteed."""

    included: tuple[int, ...]
    max_error_bound: float
    bytes_per_site: dict[int, int]
    n_clipped: dict[int, int]
    seconds: float


class Quantisation(TypedDict):
    """The :class:`SecAggConfig` fields other than the threshold."""

    clip: float
    bits: int


FOCEI_SECAGG: Quantisation = {"clip": 1e6, "bits": 48}
"""Payload range and quantisation for objectives, gradients and Hessians: they
stay far inside +-1e6 per site (Advate, 8 patients: Hessian entries up to about
4e4); the per-coordinate error is below K * 7e-9 (7e-7 for K = 100, against
Hessian eigenvalues of 1 and more), and K up to 65535 sites fit the 64-bit ring."""


def default_secagg_config(n_sites: int, min_sites: int | None = None) -> SecAggConfig:
    """:data:`FOCEI_SECAGG` with the Shamir threshold ``n_sites - 1`` (one site may
    drop out), or ``min_sites`` when given, but never at most ``n_sites / 2``.

    Raises ``ValueError`` naming ``min_sites`` when it would lower the threshold to
    ``n_sites / 2`` or below (a server could then unmask a site's input; Bonawitz et
    al., ACM CCS 2017, section 6). With ``n_sites <= 2`` the threshold is
    ``n_sites`` (no dropout tolerated). A ``min_sites`` below ``2 n_sites / 3``
    passes with a :class:`~phems_clinical.federation.secagg.SecAggThresholdWarning`
    from :func:`~phems_clinical.federation.secagg.check_config`.
    """
    if not (isinstance(n_sites, int) and n_sites >= 1):
        raise ValueError(f"n_sites: expected an int >= 1, got {n_sites!r}")
    floor = safe_threshold(n_sites)
    if min_sites is None:
        threshold = max(n_sites - 1, floor)
    elif int(min_sites) < floor:
        raise ValueError(
            f"min_sites: with secure aggregation expected at least {floor} of the "
            f"{n_sites} sites per round (more than half: the Shamir threshold "
            f"follows min_sites), got {min_sites}"
        )
    else:
        threshold = int(min_sites)
    cfg = SecAggConfig(threshold=threshold, **FOCEI_SECAGG)
    check_config(cfg, n_sites)
    return cfg


def secagg_aggregator(
    cfg: SecAggConfig,
    log: list | None = None,
    *,
    n_sites: int | None = None,
    identities: Mapping[int, tuple[bytes, bytes]] | None = None,
):
    """An engine aggregator that sums payloads with SecAgg under ``cfg``.

    ``log`` (a list), if given, receives one :class:`SecAggRound` per round.
    ``identities`` (site index -> Ed25519 key pair,
    :func:`~phems_clinical.federation.secagg.generate_identity`) or ``n_sites``
    (fresh identities for sites ``0 .. n_sites - 1``) fix the federation whose
    identity roster every site trusts (K, against which the threshold is
    checked); one of them is required. Each call is a new round id, bound into
    the round's signatures.
    """
    if identities is None:
        if n_sites is None:
            raise ValueError(
                "n_sites: required (the number of sites whose "
                "identity roster every site trusts), or identities"
            )
        identities = {k: generate_identity() for k in range(n_sites)}
    ids_of = dict(identities)
    check_config(cfg, len(ids_of))
    roster = {f"site{k:04d}": v for k, v in ids_of.items()}
    round_ids = itertools.count()

    def aggregate(key, payloads, algorithm):
        t0 = time.perf_counter()
        unknown = set(payloads) - set(ids_of)
        if unknown:
            raise ValueError(
                f"payloads: sites {sorted(unknown)} have no identity in "
                "the federation's roster"
            )
        ids = {f"site{k:04d}": k for k in payloads}
        vectors = {
            s: saturate(flatten_payload(payloads[k], algorithm.message_spec), cfg)
            for s, k in ids.items()
        }
        res = secure_sum(key, vectors, cfg, identities=roster, round_id=next(round_ids))
        if log is not None:
            log.append(
                SecAggRound(
                    tuple(ids[s] for s in res.included),
                    res.max_error_bound,
                    {ids[s]: b for s, b in res.bytes_sent.items()},
                    {ids[s]: c for s, c in res.n_clipped.items()},
                    time.perf_counter() - t0,
                )
            )
        return unflatten_payload(res.total, algorithm.message_spec)

    return aggregate


__all__ = ["SecAggConfig", "SecAggRound", "default_secagg_config", "secagg_aggregator"]
