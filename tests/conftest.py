"""Test configuration: float64 everywhere (PK parameters are estimated), CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
    """A fixed typed PRNG key; tests derive further keys with split/fold_in."""
    return jax.random.key(0)
