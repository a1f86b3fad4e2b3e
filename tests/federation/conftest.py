"""Shared small federated cohorts (simulated; tiny so the suite stays fast)."""

import jax
import numpy as np
import pytest

from phems_clinical.federation.pk_sites import (
    cohorts_by_site,
    n_occasions_all,
    pad_sites,
    pooled,
)
from phems_clinical.federation.strategies import Examples
from phems_clinical.pk.library import load_product
from phems_clinical.pk.simulate import default_hospitals, simulate_hospitals


@pytest.fixture(scope="session")
def advate_sites():
    """Advate (Björkman 2012) at 3 hospitals with different case-mix, 24 patients
    (the same cohort as `phems simulate --n 24 --seed 7`, so compiled code is
    shared with tests/app/test_federate.py through the persistent cache):
    (model, padded site cohorts, pooled cohort, n_occ)."""
    model = load_product("advate")
    events, _ = simulate_hospitals(jax.random.key(7), model, default_hospitals(24))
    _, cohorts = cohorts_by_site(events, model)
    return model, pad_sites(cohorts), pooled(cohorts), n_occasions_all(cohorts)


@pytest.fixture(scope="session")
def logistic_sites():
    """Non-IID logistic-regression data at 4 sites of unequal size (padded to 40
    rows): (sites, pooled (X, y), loss)."""
    rng = np.random.default_rng(3)
    beta = np.array([0.5, -1.0, 2.0])
    sites, xs, ys = [], [], []
    for k, n in enumerate((12, 25, 40, 7)):
        x = np.c_[np.ones(n), rng.normal(k * 0.5, 1.0, (n, 2))]
        y = (rng.random(n) < 1 / (1 + np.exp(-x @ beta))).astype(float)
        xs.append(x)
        ys.append(y)
        pad = 40 - n
        xp = np.r_[x, np.repeat(x[:1], pad, 0)]
        yp = np.r_[y, np.repeat(y[:1], pad)]
        sites.append(
            Examples(
                (jax.numpy.asarray(xp), jax.numpy.asarray(yp)),
                jax.numpy.asarray(np.arange(40) < n),
            )
        )

    def loss(b, example):
        x, y = example
        z = x @ b
        return jax.numpy.logaddexp(0.0, z) - y * z

    return sites, (np.concatenate(xs), np.concatenate(ys)), loss
