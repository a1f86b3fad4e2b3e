"""Randomness that protects privacy, drawn from the OS CSPRNG held at the site.

A privacy mechanism whose noise is a function of public inputs (a run seed the
outputs record, a configuration) is not differentially private at any epsilon:
whoever knows the seed regenerates the noise and subtracts it. Every draw that
protects privacy (DP measurement noise, private selection, date-shift keys)
therefore comes from ``secrets`` (the operating system's CSPRNG), is never derived
from a seed or a configuration and is never written to an output. Non-private
post-processing (e.g. sampling records from a fitted DP model) may still use the
run's JAX key, so it stays reproducible.

numpy draws (normal, choice) come from a ``numpy.random.Generator`` over
Philox-4x64-10 (Salmon, Moraes, Dror & Shaw, SC 2011) with a 128-bit key from
``secrets.randbits``; numpy's default PCG64 is avoided because its state can be
recovered from its output (Bouillaguet, Martinez & Sauvage, IACR ToSC 2020(2)).
"""

from __future__ import annotations

import secrets

import numpy as np

SECRET_BITS = 128
"""Bits of a site secret (the Philox key)."""


def new_secret() -> int:
    """A fresh 128-bit secret from the OS CSPRNG; keep it (at the site, never in
    an output) only to replay a mechanism exactly."""
    return secrets.randbits(SECRET_BITS)


def secret_generator(secret: int | None = None) -> np.random.Generator:
    """A numpy Generator keyed by ``secret`` (default: a fresh :func:`new_secret`
    that nobody keeps, so the draws cannot be replayed by anyone).

    Raises ``ValueError`` naming ``secret`` when it is not an integer in
    ``[0, 2**128)``.
    """
    if secret is None:
        secret = new_secret()
    if (
        isinstance(secret, bool)
        or not isinstance(secret, int | np.integer)
        or not 0 <= int(secret) < 2**SECRET_BITS
    ):
        raise ValueError(
            f"secret: expected an integer in [0, 2**{SECRET_BITS}) "
            f"(from new_secret), got {type(secret).__name__}"
        )
    return np.random.Generator(np.random.Philox(key=int(secret)))


__all__ = ["SECRET_BITS", "new_secret", "secret_generator"]
