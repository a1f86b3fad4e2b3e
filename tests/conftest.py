"""Test configuration: float64 everywhere (PK parameters are estimated), CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Compiled code is shared between the xdist workers (and later runs) through JAX's
# persistent cache: a pure speed-up, keyed on the program and the JAX version.
os.environ.setdefault("PHEMS_CACHE_DIR", os.path.join(os.path.dirname(__file__),
                                                      "..", ".cache", "jax"))
jax.config.update("jax_compilation_cache_dir", os.environ["PHEMS_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def key():
    """A fixed typed PRNG key; tests derive further keys with split/fold_in."""
    return jax.random.key(0)
