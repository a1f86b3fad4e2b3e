"""JAX key -> numpy Generator, the one derivation every numpy-side sampler uses.

Samplers that need numpy (pandas columns, ``Generator.choice`` over categories,
variable-length loops) take a JAX key like every other stochastic function and turn
it into a :class:`numpy.random.Generator` here, so that a key gives the same
stream wherever it is used: the key's raw ``uint32`` words seed numpy's
:class:`~numpy.random.SeedSequence` (O'Neill 2014, PCG; numpy's ``default_rng``
documentation). Typed keys (``jax.random.key``) and legacy ``uint32`` keys
(``jax.random.PRNGKey``) holding the same words give the same stream.

Privacy randomness (differential-privacy noise, masks) never comes from here: it
comes from the operating system's generator in
:mod:`phems_clinical.privacy.secret_rng`.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["numpy_generator"]


def numpy_generator(key: jax.Array) -> np.random.Generator:
    """A numpy Generator seeded by the words of one JAX key.

    ``key``: a single typed key (shape ``()``) or a legacy raw ``uint32`` key
    (shape ``(2,)`` for threefry). A batch of keys is refused (``ValueError``):
    split it first and pass one key.
    """
    data = np.asarray(jax.random.key_data(key))
    if data.ndim != 1:
        raise ValueError(
            f"key: expected one JAX key, got a batch of key data of shape "
            f"{data.shape}; pass a single key (e.g. jax.random.split(key)[0])"
        )
    return np.random.default_rng(data)
