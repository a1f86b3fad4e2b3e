"""Test configuration: float64 everywhere (PK parameters are estimated), CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Compiled code is shared between the xdist workers (and later runs) through JAX's
# persistent cache: a pure speed-up, keyed on the program and the JAX version.
os.environ.setdefault(
    "PHEMS_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "jax")
)
jax.config.update("jax_compilation_cache_dir", os.environ["PHEMS_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Property-based tests (Hypothesis) run a fixed, derandomised example budget, so CI
# is reproducible and bounded; PHEMS_HYPOTHESIS_PROFILE=thorough explores more.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("PHEMS_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def key():
    """A fixed typed PRNG key; tests derive further keys with split/fold_in."""
    return jax.random.key(0)


_WARDS = np.array(["PICU", "NICU", "cardio", "onco", "general"])
_DIAG = np.array(
    ["sepsis", "bronchiolitis", "CHD", "ALL", "trauma", "asthma", "pneumonia", "other"]
)


def _toy_table(seed: int, n: int) -> pd.DataFrame:
    """Toy paediatric table: continuous, integer, categorical and missing values."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(0, 216, n)
    sex = rng.choice(["F", "M"], n)
    weight = 3.5 + 0.28 * age + rng.normal(0, 3, n)
    ward_i = rng.integers(0, len(_WARDS), n)
    diag = _DIAG[(ward_i + rng.integers(0, 2, n) * rng.integers(0, 8, n)) % 8]
    crp = rng.lognormal(2.0, 1.0, n)
    crp[rng.random(n) < 0.1] = np.nan
    los = rng.poisson(4 + ward_i, n)
    return pd.DataFrame(
        {
            "age": age,
            "sex": sex,
            "weight": weight,
            "ward": _WARDS[ward_i],
            "diagnosis": diag,
            "crp": crp,
            "los": los,
        }
    )


@pytest.fixture(scope="session")
def toy_table():
    """Factory ``toy_table(seed, n)`` of the privacy tests' toy paediatric table."""
    return _toy_table


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's in-memory compiled executables after each test module.

    Every loaded CPU executable maps memory regions; an xdist worker that runs half
    the suite (thousands of programs: MST alone compiles ~100 per fit) came close
    to the kernel's ``vm.max_map_count`` (65,530) and segfaulted while loading one
    more executable from the persistent cache. Clearing per module keeps a worker
    far below it; later modules reload what they need from the on-disk cache.
    """
    yield
    jax.clear_caches()
