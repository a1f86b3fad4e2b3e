"""Utility metrics of a data source (train on the source, test on held-out real).

References used as oracles:
* identity: a source equal to the real training data gives TSTR == TRTR exactly
  and a PK parameter bias of exactly 0;
* known truth of the simulators: halving every PK level doubles CL and V1
  (linear PK: C = Dose/V f(CL/V, t)), so the relative bias is +1.0; levels
  with a small residual error are forecast within a few % (2 levels
  fix the two random effects, CL and V1); with the residual error of the Advate
  model (15 % proportional), the median |PE| of a good forecast is of the order of
  0.674 x 15 % = 10 % (median of a half-normal);
* negative controls: permuted sepsis onsets give AUROC ~0.5; a cardiac source
  without covariate information gives C-index and AUROC exactly 0.5 (all risks
  tied); a wrong PK prior forecasts worse than the true one.
"""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.data.cardiac import simulate_cardiac
from phems_clinical.data.cardiac.pathways import episodes
from phems_clinical.data.picu import hourly_table, simulate_picu
from phems_clinical.evaluation import cardiac_eval as ce
from phems_clinical.evaluation import utility as ut
from phems_clinical.models.scores import sepsis_onset
from phems_clinical.pk.library import load_product
from phems_clinical.pk.model import initial_params
from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort

# --- sepsis --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def picu():
    kw = {"n_stays": 150, "prevalence": 0.3, "max_los_h": 72}
    train = simulate_picu(jax.random.key(1), site="A", **kw)
    test = simulate_picu(jax.random.key(2), site="B", id_offset=10**6, **kw)
    return (hourly_table(train.tables, site="A"), hourly_table(test.tables, site="B"))


def test_sepsis_tstr_equals_trtr_for_a_copy_of_the_real_data(picu):
    train, test = picu
    trtr = ut.sepsis_utility(jax.random.key(0), train, test, n_boot=100)
    # A "derived" source that is the real data with its rows reordered.
    copy = train.sample(frac=1.0, random_state=3).reset_index(drop=True)
    tstr = ut.sepsis_utility(jax.random.key(0), copy, test, n_boot=100)
    assert tstr == trtr
    # Signal on the simulator's Phoenix onsets (held-out AUROC 0.70 here).
    assert trtr["auroc"] > 0.62 and trtr["auprc"] > 2 * trtr["prevalence"]
    assert trtr["auroc_ci_low"] < trtr["auroc"] < trtr["auroc_ci_high"]
    assert 0 < trtr["brier"] < trtr["prevalence"]
    assert trtr["calibration_slope"] > 0 and trtr["n_stays"] == 150
    assert all(isinstance(v, float) for v in trtr.values())
    assert set(ut.captions(trtr)) == set(trtr)  # every metric captioned


def test_sepsis_permuted_onsets_give_chance_auroc(picu):
    """Negative control: onset hours shuffled across source stays."""
    train, test = picu
    onset = sepsis_onset(train)
    rng = np.random.default_rng(0)
    perm = pd.Series(rng.permutation(onset.to_numpy()), index=onset.index)
    ref = ut.sepsis_utility(jax.random.key(0), train, test, n_boot=0)
    neg = ut.sepsis_utility(
        jax.random.key(0), train, test, source_onset=perm, n_boot=100
    )
    assert neg["auroc_ci_low"] < 0.5 < neg["auroc_ci_high"]
    assert abs(neg["auroc"] - 0.5) < 0.08
    assert ref["auroc"] - neg["auroc"] > 0.12
    assert np.isnan(ref["auroc_ci_low"])  # n_boot=0: no CI


def test_sepsis_tcn_trains_and_beats_chance(picu):
    train, test = picu
    res = ut.sepsis_utility(
        jax.random.key(1),
        train,
        test,
        model="tcn",
        model_kw={"channels": 8, "n_blocks": 3},
        n_boot=0,
    )
    assert res["auroc"] > 0.6 and np.isfinite(res["calibration_slope"])


def test_sepsis_bad_input(picu):
    train, test = picu
    with pytest.raises(ut.UtilityInputError, match="model"):
        ut.sepsis_utility(jax.random.key(0), train, test, model="gru")
    with pytest.raises(ut.UtilityInputError, match="stay_id"):
        ut.sepsis_utility(jax.random.key(0), train.drop(columns="stay_id"), test)
    with pytest.raises(ut.UtilityInputError, match="level"):
        ut.sepsis_utility(jax.random.key(0), train, test, level=95)


# --- cardiac -------------------------------------------------------------------------

COVARIATE_COLUMNS = [
    "age_days",
    "age_group",
    "sex",
    "weight_kg",
    "weight_z",
    "stat",
    "ventilation",
]


@pytest.fixture(scope="module")
def cardiac():
    train = episodes(
        simulate_cardiac(jax.random.key(3), n_episodes=600, site="a").tables
    )[0]
    test = episodes(
        simulate_cardiac(jax.random.key(4), n_episodes=400, site="b").tables
    )[0]
    return train, test


def test_cardiac_tstr_equals_trtr_and_matches_pooled_fit(cardiac):
    train, test = cardiac
    trtr = ut.cardiac_utility(train, test, key=jax.random.key(0), n_boot=100)
    tstr = ut.cardiac_utility(train.copy(), test, key=jax.random.key(0), n_boot=100)
    assert tstr == trtr
    ref = ce.evaluate(ce.pooled_fit({"x": train}).params, test)
    assert trtr["c_death"] == pytest.approx(ref["c_death"], abs=1e-12)
    assert trtr["brier_death_30d"] == pytest.approx(ref["brier_death_30d"], abs=1e-12)
    assert trtr["c_death"] > 0.6 and trtr["auc_cicu_gt7"] > 0.65
    assert trtr["c_death_ci_low"] < trtr["c_death"] < trtr["c_death_ci_high"]
    assert trtr["converged"] == 1.0
    assert set(ut.captions(trtr)) == set(trtr)


def test_cardiac_negative_controls(cardiac):
    train, test = cardiac
    trtr = ut.cardiac_utility(train, test, n_boot=0)
    # No covariate information (everyone a non-ventilated STAT-1 child of average
    # weight): every test patient gets the same risk -> C and AUROC exactly 0.5.
    flat = train.assign(age_group="child", stat=1, ventilation=0, weight_z=0.0)
    res = ut.cardiac_utility(flat, test)
    assert res["c_death"] == 0.5 and res["auc_cicu_gt7"] == 0.5
    assert res["brier_death_30d"] >= trtr["brier_death_30d"] - 1e-3
    # Covariates shuffled across episodes: discrimination lost.
    first = train.groupby("episode_id", sort=False)[COVARIATE_COLUMNS].first()
    perm = first.iloc[np.random.default_rng(1).permutation(len(first))]
    shuffled = train.drop(columns=COVARIATE_COLUMNS).join(
        perm.set_axis(first.index), on="episode_id"
    )[train.columns]
    neg = ut.cardiac_utility(shuffled, test)
    assert neg["c_death"] < 0.6 and abs(neg["auc_cicu_gt7"] - 0.5) < 0.1
    assert trtr["c_death"] - neg["c_death"] > 0.1


def test_cardiac_bad_input(cardiac):
    train, test = cardiac
    with pytest.raises(ut.UtilityInputError, match="next_state"):
        ut.cardiac_utility(train.drop(columns="next_state"), test)
    with pytest.raises(ut.UtilityInputError, match="test_sojourns"):
        ut.cardiac_utility(train, test.iloc[:0])


# --- PK ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def advate():
    return load_product("advate")


@pytest.fixture(scope="module")
def pk_real(advate):
    """30 rich-sampled Advate patients and their FOCEI fit (with SEs)."""
    events, _ = simulate_cohort(
        jax.random.key(5), advate, HospitalSpec("H", 30, design="rich")
    )
    return events, ut.fit_population(events, advate)


@pytest.fixture(scope="module")
def pk_holdout(advate):
    """40 sparse-sampled patients (levels at ~4, 24, 48 h after a washout dose)."""
    events, _ = simulate_cohort(
        jax.random.key(11), advate, HospitalSpec("H", 40, design="sparse")
    )
    return events


@pytest.mark.slow
def test_pk_bias_identity_is_exactly_zero(advate, pk_real):
    events, real_fit = pk_real
    assert real_fit.converged
    res = ut.pk_parameter_bias(events.copy(), None, advate, real_fit=real_fit)
    bias = {k: v for k, v in res.items() if k.startswith("rel_bias[")}
    assert len(bias) == len(advate.theta_names) + len(advate.iiv_parameters) + 2
    assert all(v == 0.0 for v in bias.values()), bias
    assert res["pass_cl_v"] == 1.0 and res["max_abs_bias_cl_v"] == 0.0
    assert res["omega_in_real_ci[CL]"] == 1.0 and res["omega_in_real_ci[V1]"] == 1.0
    # IIV reported as CV %: 100 sqrt(exp(w2) - 1).
    w2 = float(np.asarray(real_fit.params.omega)[0, 0])
    assert res["real[CV_IIV(CL)]"] == pytest.approx(
        100 * np.sqrt(np.exp(w2) - 1), rel=1e-12
    )
    caps = ut.captions(res)
    assert set(caps) == set(res) and "CV_IIV(CL)" in caps["rel_bias[CV_IIV(CL)]"]


@pytest.mark.slow
def test_pk_bias_from_a_failed_fit_is_no_value(advate, pk_real):
    """A failed fit (non-finite objective) yields no estimates: every bias and
    pass flag is NaN, never a number computed from start values."""
    events, real_fit = pk_real
    failed = real_fit._replace(ofv=float("nan"), converged=False)
    res = ut.pk_parameter_bias(events.copy(), None, advate, real_fit=failed)
    assert np.isnan(res["real[THETA(CL)]"]) and np.isnan(res["rel_bias[THETA(CL)]"])
    assert np.isnan(res["pass[THETA(CL)]"]) and np.isnan(res["pass_cl_v"])
    assert np.isnan(res["max_abs_bias_cl_v"]) and res["real_converged"] == 0.0
    assert np.isfinite(res["source[THETA(CL)]"])


@pytest.mark.slow
def test_pk_bias_halved_levels_double_cl_and_v(advate, pk_real):
    """Mutation: every level halved -> CL, V1 and V2 double (exactly but for the
    additive error and the LLOQ), covariate exponents and IIV unchanged; the 20 %
    criterion fails."""
    events, real_fit = pk_real
    half = events.assign(DV=events["DV"] * 0.5)
    res = ut.pk_parameter_bias(half, None, advate, real_fit=real_fit)
    for p in ("CL", "V1", "V2"):
        assert res[f"rel_bias[THETA({p})]"] == pytest.approx(1.0, abs=0.03)
    for p in ("CL_WT_pow", "V1_WT_pow"):
        assert abs(res[f"rel_bias[THETA({p})]"]) < 0.03
    assert abs(res["rel_bias[CV_IIV(CL)]"]) < 0.05
    assert res["pass_cl_v"] == 0.0 and res["pass[THETA(CL)]"] == 0.0
    assert res["max_abs_bias_cl_v"] == pytest.approx(1.0, abs=0.03)


def test_pk_forecast_error_scales_with_the_residual_error(advate):
    """Levels with a small residual error (0.1 IU/dL + 2 %) from the prior's own
    model: two levels fix the two random effects (CL, V1), so the third is
    forecast within a few % (0.674 x 2.4 % = 1.6 % from the noise of the
    forecast level alone)."""
    p = initial_params(advate)
    p = p._replace(sigma=jax.numpy.array([0.1, 0.02]))
    events, _ = simulate_cohort(
        jax.random.key(12),
        advate,
        HospitalSpec("H", 20, design="sparse", lloq_IU_dL=0.1),
        params=p,
    )
    res = ut.pk_forecast_accuracy(p, events, advate, n_prior_obs=2)
    # Patients whose last level is BLQ have nothing to forecast.
    assert res["n_levels"] == res["n_patients"] >= 18
    assert 1.0 < res["mdape"] < 5.0 and res["within20"] >= 0.9
    assert res["map_converged"] == 1.0
    pop = ut.pk_forecast_accuracy(p, events, advate, n_prior_obs=0)
    assert pop["n_patients"] == 20 and pop["mdape"] > 3 * res["mdape"]  # IIV 30 %


def test_pk_forecast_true_prior_vs_wrong_prior(advate, pk_holdout):
    true = initial_params(advate)
    # Wrong prior: CL x 2, V1 x 0.6, IIV shrunk 20-fold (a confident, wrong model).
    theta = true.theta.at[0].multiply(2.0).at[1].multiply(0.6)
    wrong = true._replace(theta=theta, omega=true.omega * 0.05)
    res = ut.pk_forecast_accuracy(
        wrong, pk_holdout, advate, real=true, key=jax.random.key(0), n_boot=200
    )
    # True prior: error of the order of the residual error (0.674 x 15 % = 10 %).
    assert 5.0 < res["real_prior_mdape"] < 25.0
    assert abs(res["real_prior_mpe"]) < 10.0 and res["real_prior_within20"] > 0.5
    assert (
        res["real_prior_mdape_ci_low"]
        < res["real_prior_mdape"]
        < res["real_prior_mdape_ci_high"]
    )
    assert res["delta_mdape"] > 20.0 and res["mpe"] < -20.0  # under-predicts
    assert set(ut.captions(res)) == set(res)
    assert res["delta_mdape"] == pytest.approx(
        res["mdape"] - res["real_prior_mdape"], abs=1e-12
    )
    # Two levels inform the forecast: better than the population prediction.
    pop = ut.pk_forecast_accuracy(true, pk_holdout, advate, n_prior_obs=0)
    assert res["real_prior_mdape"] < pop["mdape"]


@pytest.mark.slow
def test_pk_forecast_prior_fitted_on_source_events(advate, pk_real, pk_holdout):
    events, real_fit = pk_real
    res = ut.pk_forecast_accuracy(events, pk_holdout, advate, real=real_fit)
    assert res["delta_mdape"] == 0.0 and res["delta_within20"] == 0.0
    assert 5.0 < res["mdape"] < 30.0


def test_pk_bad_input(advate, pk_holdout):
    p = initial_params(advate)
    with pytest.raises(ut.UtilityInputError, match="n_prior_obs"):
        ut.pk_forecast_accuracy(p, pk_holdout, advate, n_prior_obs=-1)
    with pytest.raises(ut.UtilityInputError, match="n_prior_obs=3"):
        ut.pk_forecast_accuracy(p, pk_holdout, advate, n_prior_obs=3)
    with pytest.raises(ut.UtilityInputError, match="source"):
        ut.pk_forecast_accuracy("advate", pk_holdout, advate)
    with pytest.raises(ut.UtilityInputError, match="pass_params"):
        ut.pk_parameter_bias(pk_holdout, pk_holdout, advate, pass_params=("KA",))
    with pytest.raises(ut.UtilityInputError, match="real_events"):
        ut.pk_parameter_bias(pk_holdout, None, advate)
