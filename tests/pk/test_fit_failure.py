"""A fit that fails says so: a non-finite objective or gradient is never converged.

Before this check, a DV or AMT of 1e308 gave a NaN objective that BFGS took for an
optimum (zero gradient), reported as ``converged: true``. The cohorts here are built
directly, past the reader's plausibility limits, so the check holds on its own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from phems_clinical.data.nonmem import read_nonmem, to_cohort
from phems_clinical.pk import bayes
from phems_clinical.pk.focei import fit_focei
from phems_clinical.pk.library import load_product
from phems_clinical.pk.simulate import HospitalSpec, simulate_hospitals


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """advate, 4 richly sampled patients (cohort built by the reader, unchanged)."""
    model = load_product("advate")
    events, _ = simulate_hospitals(
        jax.random.key(0), model, [HospitalSpec("H1", 4, design="rich")]
    )
    path = tmp_path_factory.mktemp("fitfail") / "d.csv"
    events.to_csv(path, index=False)
    data = read_nonmem(path, required_covariates=model.covariate_names)
    cohort, _ = to_cohort(data, model.covariate_names)
    return model, cohort


def _first_obs(cohort, subject):
    return int(np.flatnonzero(np.asarray(cohort.obs_mask[subject]))[0])


@pytest.mark.parametrize("field", ["DV", "AMT"])
def test_non_finite_objective_at_start_is_not_converged(small, field):
    model, cohort = small
    if field == "DV":
        j = _first_obs(cohort, 2)
        bad = cohort._replace(obs_dv=cohort.obs_dv.at[2, j].set(1e308))
    else:
        bad = cohort._replace(dose_amt=cohort.dose_amt.at[2, 0].set(1e308))
    res = fit_focei(model, bad, covariance=False)
    assert not res.converged
    assert res.n_iterations == 0 and res.nonfinite_subjects == (2,)
    assert "not finite at the start values" in res.message
    assert not np.isfinite(res.ofv)


def test_non_finite_at_the_end_is_not_converged(small, monkeypatch):
    """The optimiser is told it succeeded, but the final objective is NaN."""
    import scipy.optimize

    model, cohort = small
    real = scipy.optimize.minimize

    def lands_on_nan(fun, x0, **kw):
        res = real(fun, x0, **{**kw, "options": {"maxiter": 1}})
        res.x = np.full_like(res.x, np.nan)
        res.success = True
        return res

    monkeypatch.setattr(scipy.optimize, "minimize", lands_on_nan)
    res = fit_focei(model, cohort, covariance=False)
    assert not res.converged
    assert "not finite at the final estimates" in res.message


def test_svi_with_non_finite_data_refuses_to_start(small):
    model, cohort = small
    j = _first_obs(cohort, 1)
    bad = cohort._replace(obs_dv=cohort.obs_dv.at[1, j].set(np.inf))
    with pytest.raises(bayes.NonFiniteStartError, match="not finite at the start"):
        bayes.fit_svi(
            jax.random.key(0),
            model,
            bad,
            num_steps=5,
            num_posterior_samples=10,
            warm_start=False,
        )


def _summary(r_hat):
    names = ["THETA(CL)", "THETA(V1)"]
    return pd.DataFrame({"mean": [1.0, 2.0], "r_hat": r_hat}, index=names)


@pytest.mark.parametrize(
    "r_hat, n_div, expect",
    [
        ([1.01, 1.02], 0, ""),
        ([1.01, 1.3], 0, "split R-hat >= 1.1 for THETA(V1)"),
        ([1.01, np.nan], 0, "split R-hat >= 1.1 for THETA(V1)"),
        ([1.01, 1.02], 2, "2 divergent transitions"),
    ],
)
def test_nuts_convergence_thresholds(r_hat, n_div, expect):
    draws = np.ones((1, 4, 2))
    why = bayes._convergence(
        _summary(r_hat), draws, None, None, n_div, bayes.RHAT_MAX, bayes.MAX_DIVERGENT
    )
    assert (expect in why) and (bool(why) == bool(expect))


def test_nuts_non_finite_draws_are_not_converged():
    draws = np.ones((1, 4, 2))
    draws[0, 3, 0] = np.nan
    why = bayes._convergence(
        _summary([1.0, 1.0]),
        draws,
        jnp.zeros((3, 1)),
        None,
        0,
        bayes.RHAT_MAX,
        bayes.MAX_DIVERGENT,
    )
    assert "non-finite draws of THETA(CL)" in why


@pytest.mark.parametrize(
    "fitted, why",
    [
        (None, None),
        ({"method": "focei", "converged": True}, None),
        ({"method": "focei", "converged": False}, "converged: False"),
        ({"method": "focei"}, "converged: missing"),
    ],
)
def test_not_converged_names_a_fit_that_must_not_be_used(fitted, why):
    from phems_clinical.pk.spec import not_converged, parse_model, to_spec

    spec = to_spec(load_product("advate"))
    spec.pop("fitted", None)
    if fitted is not None:
        spec["fitted"] = fitted
    reason = not_converged(parse_model(spec))
    assert reason is None if why is None else why in reason


@pytest.mark.parametrize("fitted", [{"converged": "yes"}, "converged"])
def test_malformed_fitted_block_is_a_spec_error(fitted):
    from phems_clinical.pk.spec import ModelSpecError, parse_model, to_spec

    spec = {**to_spec(load_product("advate")), "fitted": fitted}
    with pytest.raises(ModelSpecError, match="fitted"):
        parse_model(spec)
