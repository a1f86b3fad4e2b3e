"""Sepsis models: labels, look-back-only features, the logistic and TCN models,
FedAvg = pooled gradient descent, and an end-to-end cross-site run."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy import optimize

from phems_clinical.evaluation import sepsis_eval as se
from phems_clinical.federation.engine import run_federated
from phems_clinical.federation.strategies import Examples, fedavg, objective_from_loss
from phems_clinical.models import sepsis as sm
from phems_clinical.models import sepsis_features as sf

LABS = {
    "lactate",
    "pao2",
    "paco2",
    "platelets",
    "inr",
    "d_dimer",
    "fibrinogen",
    "glucose",
    "anc",
    "alc",
    "wbc",
    "creatinine",
    "bilirubin",
    "alt",
}


def toy_hourly(
    seed, n_stays, *, site="A", p_septic=0.3, min_h=12, max_h=40, first_id=0, signal=1.0
):
    """A fabricated hourly table with the contract's columns: stays of septic
    patients deteriorate over the 12 h before onset (HR, lactate, FiO2 up; MAP,
    SpO2 down); vitals measured 90% and labs 25% of hours."""
    rng = np.random.default_rng(seed)
    L = rng.integers(min_h, max_h + 1, n_stays)
    ids = np.arange(first_id, first_id + n_stays)
    stay, hour = np.repeat(ids, L), np.concatenate([np.arange(k) for k in L])
    onset = np.where(
        rng.random(n_stays) < p_septic, np.floor(rng.uniform(2, L)), np.nan
    )
    o = np.repeat(onset, L)
    ramp = np.where(
        np.isfinite(o), np.clip(12 - (np.nan_to_num(o) - hour), 0, 12) / 12, 0.0
    )
    n = stay.size
    df = pd.DataFrame(
        {
            "site": site,
            "person_id": stay + 10_000,
            "stay_id": stay,
            "hour": hour,
            "age_months": np.repeat(rng.uniform(0, 200, n_stays), L),
            "sex": np.repeat(np.where(rng.random(n_stays) < 0.5, "F", "M"), L),
        }
    )
    z = {c: rng.normal(0, 1, n) for c in sf.MEASURED}
    vals = {c: 50 + 5 * z[c] for c in sf.MEASURED}
    vals["hr"] = 120 + 10 * z["hr"] + signal * 30 * ramp
    vals["map"] = 60 + 6 * z["map"] - signal * 15 * ramp
    vals["lactate"] = np.exp(0.3 * z["lactate"]) + signal * 3 * ramp
    vals["spo2"] = np.clip(97 + 1.5 * z["spo2"] - signal * 5 * ramp, 50, 100)
    vals["fio2"] = np.clip(0.3 + 0.05 * z["fio2"] + signal * 0.2 * ramp, 0.21, 1)
    for c in sf.MEASURED:
        v = vals[c].astype(float)
        v[rng.random(n) > (0.25 if c in LABS else 0.9)] = np.nan
        df[c] = v
    for c in sf.INTERVENTIONS:
        df[c] = 0
    df["antimicrobial"] = (np.isfinite(o) & (hour >= o - 1)).astype(int)
    df["culture"] = (np.isfinite(o) & (hour == o - 1)).astype(int)
    df["vasoactives"] = (ramp > 0.8) * rng.integers(0, 3, n)
    df["died"] = 0
    return df, pd.Series(onset, index=ids)


# --- labels ------------------------------------------------------------------------


def test_make_labels_hand_worked():
    df = pd.DataFrame(
        {
            "stay_id": np.repeat([1, 2, 3], [11, 4, 3]),
            "hour": np.r_[np.arange(11), np.arange(4), np.arange(3)],
        }
    )
    lab = sf.make_labels(df, pd.Series({1: 8.0, 2: np.nan, 3: 0.0}), horizon_h=6)
    s1 = lab[df.stay_id == 1]
    # Onset 8, H 6: y = 1 iff 8 in (t, t+6] iff t in 2..7; hours >= 8 dropped.
    np.testing.assert_array_equal(s1.y, [0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(s1.include, np.arange(11) < 8)
    np.testing.assert_array_equal(s1.sepsis_label, np.arange(11) >= 2)
    assert lab[df.stay_id == 2].include.all() and not lab[df.stay_id == 2].y.any()
    assert not lab[df.stay_id == 3].include.any()  # septic on admission
    # Stay 4 missing from onset = no onset; a 2-hour horizon moves the boundary.
    lab2 = sf.make_labels(df, pd.Series({1: 8.0}), horizon_h=2)
    np.testing.assert_array_equal(
        lab2[df.stay_id == 1].y, [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    )
    assert lab2[df.stay_id == 2].include.all()


# --- features ----------------------------------------------------------------------


@pytest.mark.parametrize("model", [sf.LOGISTIC, sf.TCN])
def test_features_never_look_ahead(model):
    df, onset = toy_hourly(1, 12)
    base = sf.build_site(df, onset, model=model).x
    rng = np.random.default_rng(2)
    cols = list(sf.MEASURED) + list(sf.INTERVENTIONS)
    for cut in (0, 5, 13):
        later = df.astype({c: float for c in sf.INTERVENTIONS})
        future = later["hour"].to_numpy() > cut
        later.loc[future, cols] = rng.normal(80, 40, (future.sum(), len(cols)))
        x = sf.build_site(later, onset, model=model).x
        np.testing.assert_array_equal(x[:, : cut + 1], base[:, : cut + 1])
        assert not np.array_equal(x[:, cut + 1 :], base[:, cut + 1 :], equal_nan=True)


def test_window_features_match_pandas_rolling():
    df, onset = toy_hourly(3, 6, min_h=30, max_h=30)  # contiguous hours
    site = sf.build_site(df, onset, model=sf.LOGISTIC, lookback_h=5)
    names = list(site.names)
    df = df.assign(lactate=np.log(df["lactate"]))  # lactate is log-scaled
    g = df.groupby("stay_id")
    for var in ("hr", "lactate"):
        ref = {
            "min6h": g[var].rolling(6, min_periods=1).min(),
            "max24h": g[var].rolling(24, min_periods=1).max(),
            "mean6h": g[var].rolling(6, min_periods=1).mean(),
            "mean24h": g[var].rolling(24, min_periods=1).mean(),
            "last": g[var].ffill(limit=4),  # within 5 h
        }
        for stat, r in ref.items():
            got = site.x[:, :, names.index(f"{var}_{stat}")].ravel()
            np.testing.assert_allclose(got, r.to_numpy(), rtol=1e-6, equal_nan=True)
        miss = site.x[:, :, names.index(f"{var}_missing")].ravel()
        np.testing.assert_array_equal(miss, np.isnan(ref["last"].to_numpy()))


def test_bad_input_names_the_column():
    df, onset = toy_hourly(0, 3)
    with pytest.raises(sf.SepsisInputError, match="lactate"):
        sm.site_examples(df.drop(columns="lactate"), onset)
    with pytest.raises(sf.SepsisInputError, match="model"):
        sm.site_examples(df, onset, model="gru")


# --- logistic model ----------------------------------------------------------------


def _logistic_examples(seed, n, T, beta, b):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, T, beta.size))
    p = 1 / (1 + np.exp(-(x @ beta + b)))
    y = (rng.random((n, T)) < p).astype(float)
    w = (rng.random((n, T)) < 0.8).astype(float)
    return Examples({"x": x, "y": y, "w": w}, np.ones(n, bool))


def _np_objective(theta, ex, l2):
    """The penalised objective in numpy: mean over stays of the stay's mean BCE
    over its used hours, plus l2/2 ||w||^2 (theta = (b, w), ravel_pytree's
    sorted-key order)."""
    b, w_ = theta[0], theta[1:]
    z = ex.data["x"] @ w_ + b
    bce = np.logaddexp(0, z) - ex.data["y"] * z
    per = (ex.data["w"] * bce).sum(1) / np.maximum(ex.data["w"].sum(1), 1)
    return per.mean() + 0.5 * l2 * w_ @ w_


def test_logistic_gradient_newton_scipy_and_recovery():
    beta, b = np.array([1.0, -0.5, 0.25]), -1.0
    ex = _logistic_examples(0, 400, 10, beta, b)
    x0, unravel = sm.init_params(jax.random.key(0), 3)
    loss = sm.make_loss(unravel, l2=1e-3)
    data = jax.tree.map(jnp.asarray, ex.data)

    def objective(x):
        return jnp.mean(jax.vmap(loss, in_axes=(None, 0))(x, data))

    theta = jnp.array([0.3, 0.1, -0.2, 0.4])
    assert float(objective(theta)) == pytest.approx(
        _np_objective(np.asarray(theta), ex, 1e-3), rel=1e-12
    )
    # Hour weighting: the mean over stays is the pooled hour-level loss / c.
    loss_h = sm.make_loss(unravel, l2=0.0, hours_norm=7.0)
    z = ex.data["x"] @ np.asarray(theta[1:]) + float(theta[0])
    pooled = np.sum(ex.data["w"] * (np.logaddexp(0, z) - ex.data["y"] * z))
    assert float(jnp.mean(jax.vmap(loss_h, in_axes=(None, 0))(theta, data))) == (
        pytest.approx(pooled / (400 * 7.0), rel=1e-12)
    )
    grad = np.asarray(jax.grad(objective)(theta))
    h = 1e-6
    fd = [
        (objective(theta + h * e) - objective(theta - h * e)) / (2 * h)
        for e in np.eye(4)
    ]
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)

    x = x0  # Newton on the JAX loss
    for _ in range(20):
        x = x - jnp.linalg.solve(jax.hessian(objective)(x), jax.grad(objective)(x))
    ref = optimize.minimize(
        _np_objective,
        np.zeros(4),
        args=(ex, 1e-3),
        method="BFGS",
        options={"gtol": 1e-11},
    ).x
    np.testing.assert_allclose(np.asarray(x), ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(x), np.r_[b, beta], atol=0.15)
    np.testing.assert_allclose(unravel(x)["w"], beta, atol=0.15)
    # Central training (Adam, full batch) reaches the same optimum.
    fit = sm.fit_central(
        jax.random.key(1), loss, x0, ex, epochs=400, batch_size=400, learning_rate=0.05
    )
    np.testing.assert_allclose(np.asarray(fit.x), np.asarray(x), atol=2e-3)
    assert fit.losses[-1] < fit.losses[0]


# --- TCN -------------------------------------------------------------------------


def test_tcn_is_causal_and_matches_lax_conv():
    F, T = 5, 40
    x0, unravel = sm.init_params(jax.random.key(3), F, sm.TCN, channels=6, n_blocks=3)
    params = unravel(x0 + 0.1 * jax.random.normal(jax.random.key(4), x0.shape))
    x = jax.random.normal(jax.random.key(5), (T, F))
    out = sm.apply(params, x)
    for t in (0, 10, 25):
        x2 = x.at[t + 1 :].set(jax.random.normal(jax.random.key(t), (T - t - 1, F)))
        out2 = sm.apply(params, x2)
        np.testing.assert_array_equal(out2[: t + 1], out[: t + 1])
        assert not np.allclose(out2[t + 1 :], out[t + 1 :])
    # The shifted-matmul convolution equals XLA's dilated convolution.
    w = jax.random.normal(jax.random.key(6), (3, 6, 4))
    h = jax.random.normal(jax.random.key(7), (T, 6))
    for d in (1, 4, 16):
        ref = jax.lax.conv_general_dilated(
            h[None],
            w,
            (1,),
            [(2 * d, 0)],
            rhs_dilation=(d,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )[0]
        np.testing.assert_allclose(sm._causal_conv(h, w, d), ref, atol=1e-12)


# --- federation --------------------------------------------------------------------


@pytest.mark.parametrize("model", [sm.LOGISTIC, sm.TCN])
def test_fedavg_one_local_step_is_pooled_gradient_descent(model):
    frames = [
        toy_hourly(10 + i, n, first_id=100 * i, max_h=16) for i, n in enumerate((5, 8))
    ]
    tensors = [sf.build_site(df, on, model=model) for df, on in frames]
    stats = sf.feature_stats(tensors[0]) + sf.feature_stats(tensors[1])
    sites = sm.pad_examples([sm.to_examples(t, stats) for t in tensors])
    assert sites[0].mask.sum() == 5 and sites[0].mask.shape == (8,)
    x0, unravel = sm.init_params(
        jax.random.key(0), stats.count.size, model, channels=4, n_blocks=2
    )
    loss = sm.make_loss(unravel, l2=1e-2)
    data = [
        Examples(jax.tree.map(jnp.asarray, s.data), jnp.asarray(s.mask)) for s in sites
    ]
    run = run_federated(
        jax.random.key(0),
        fedavg(objective_from_loss(loss), x0, learning_rate=0.3, max_rounds=3),
        data,
    )
    pooled = sm.pool_examples(sites)
    pdata = jax.tree.map(jnp.asarray, pooled.data)
    assert pdata["x"].shape[0] == 13

    def objective(x):
        return jnp.mean(jax.vmap(loss, in_axes=(None, 0))(x, pdata))

    x = x0
    for _ in range(3):
        x = x - 0.3 * jax.grad(objective)(x)
    np.testing.assert_allclose(
        np.asarray(run.server.x), np.asarray(x), rtol=1e-10, atol=1e-13
    )


def _simulated_sites():
    """Three hospitals from the PICU simulator (Phoenix onsets), 100 stays each."""
    from phems_clinical.data.picu import hourly_table, simulate_sites
    from phems_clinical.models.scores import sepsis_onset

    cohorts = simulate_sites(
        jax.random.key(0),
        {
            s: {"n_stays": 100, "prevalence": p, "max_los_h": 72}
            for s, p in (("A", 0.3), ("B", 0.45), ("C", 0.3))
        },
    )
    hourly = {s: hourly_table(c.tables, site=s) for s, c in cohorts.items()}
    return hourly, {s: sepsis_onset(h) for s, h in hourly.items()}


@pytest.mark.parametrize("model", [sm.LOGISTIC, sm.TCN])
def test_end_to_end_federated_held_out_hospital(model):
    sites, onsets = _simulated_sites()
    res = se.cross_site_evaluation(
        jax.random.key(0),
        sites,
        onsets,
        held_out=["C"],
        model=model,
        max_hours=72,
        algorithm="fedadam",
        rounds=20,
        local_steps=5 if model == sm.LOGISTIC else 3,
        learning_rate=0.1,
        server_learning_rate=0.05 if model == sm.LOGISTIC else 0.02,
        model_kw={} if model == sm.LOGISTIC else {"channels": 8, "n_blocks": 3},
    )
    held = res["metrics"]["C"]
    assert held["auroc"] > 0.62 and held["auprc"] > 1.5 * held["prevalence"]
    assert held["utility"] > 0.2 and 0 < res["threshold"] < 1
    assert set(res["metrics"]) == {"A", "B", "C"}
    assert all(
        np.isfinite(m["ece"]) and m["n_stays"] == 100 for m in res["metrics"].values()
    )
