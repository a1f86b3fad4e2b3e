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
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from phems_clinical.federation.core import flatten_payload, unflatten_payload
from phems_clinical.federation.secagg import SecAggConfig, check_config, secure_sum


class SecAggRound(NamedTuple):
    """What one securely aggregated round cost and guaranteed."""

    included: tuple[int, ...]
    max_error_bound: float
    bytes_per_site: dict[int, int]
    n_clipped: dict[int, int]
    seconds: float


FOCEI_SECAGG = {"clip": 1e6, "bits": 48}
"""Payload range and quantisation for objectives and gradients: they stay far
inside +-1e6; the per-coordinate error is below K * 7e-9."""


def default_secagg_config(n_sites: int, min_sites: int | None = None
                          ) -> SecAggConfig:
    """:data:`FOCEI_SECAGG` with the Shamir threshold that lets one site drop out
    (or ``min_sites``, when given)."""
    threshold = max(1, n_sites - 1) if min_sites is None else int(min_sites)
    return SecAggConfig(threshold=threshold, **FOCEI_SECAGG)


def secagg_aggregator(cfg: SecAggConfig, log: list | None = None):
    """An engine aggregator that sums payloads with SecAgg under ``cfg``.

    ``log`` (a list), if given, receives one :class:`SecAggRound` per round.
    """
    def aggregate(key, payloads, algorithm):
        t0 = time.perf_counter()
        check_config(cfg, len(payloads))
        ids = {f"site{k:04d}": k for k in payloads}
        # A non-finite entry (e.g. FOCEI's +inf for a failed inner problem) is sent
        # as +-clip: the sum stays out of range, so the server still rejects it.
        vectors = {s: np.nan_to_num(flatten_payload(payloads[k],
                                                    algorithm.message_spec),
                                    nan=cfg.clip, posinf=cfg.clip, neginf=-cfg.clip)
                   for s, k in ids.items()}
        res = secure_sum(key, vectors, cfg)
        if log is not None:
            log.append(SecAggRound(tuple(ids[s] for s in res.included),
                                   res.max_error_bound,
                                   {ids[s]: b for s, b in res.bytes_sent.items()},
                                   {ids[s]: c for s, c in res.n_clipped.items()},
                                   time.perf_counter() - t0))
        return unflatten_payload(res.total, algorithm.message_spec)

    return aggregate


__all__ = ["SecAggConfig", "SecAggRound", "secagg_aggregator"]
