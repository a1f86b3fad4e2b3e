"""Piecewise-constant multi-state model: likelihood gradient vs finite differences,
Newton = closed-form occurrence/exposure MLE, MLE recovery of the simulator's
log hazard ratios, Aalen-Johansen agreement (lifelines on the CICU competing exits;
empirical multi-state product integral for state occupation), predictions'
consistency, NumPyro log density, and FedAvg/FedAdam through the federated engine
against the pooled fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lifelines import AalenJohansenFitter

from phems_clinical.data.cardiac import simulate as sim
from phems_clinical.data.cardiac.pathways import episodes
from phems_clinical.evaluation import cardiac_eval as ce
from phems_clinical.evaluation import survival as sv
from phems_clinical.models import multistate as ms

# one homogeneous hospital (children, STAT 3, no ventilation, median weight):
# covariate-free data for the Aalen-Johansen comparisons
HOMOGENEOUS = sim.CaseMix(
    age_probs=(0.0, 0.0, 1.0),
    stat_given_age=((0.0, 0.0, 1.0, 0.0, 0.0),) * 3,
    vent_probs=(0.0, 0.0, 0.0),
    weight_sd=0.0,
)
FINE = tuple(
    float(c)
    for c in np.r_[
        np.arange(0, 14, 0.25), np.arange(14, 60, 2), [60, 90, 120, 180, 270]
    ]
)
COARSE = (0.0, 1.0, 3.0, 7.0, 14.0, 30.0, 90.0)
N_AJ = 2000


@pytest.fixture(scope="module")
def homogeneous():
    return sim.simulate_cardiac(
        jax.random.key(8), n_episodes=N_AJ, case_mix=HOMOGENEOUS
    ).truth


def test_loss_gradient_matches_finite_differences():
    c = sim.simulate_cardiac(jax.random.key(1), n_episodes=40)
    df, _ = episodes(c.tables)
    spec = ms.MultistateSpec(cuts=COARSE)
    ex = ms.site_examples(df, spec)
    loss, x0, _ = ms.make_loss(spec, ridge=0.1, prior_sd_alpha=2.0, n_total=40)
    x = x0 + 0.3 * jax.random.normal(jax.random.key(2), x0.shape) - 1.0
    example = jax.tree.map(lambda a: a[3], ex.data)
    g = jax.jit(jax.grad(loss))(x, example)
    loss = jax.jit(loss)
    h = 1e-6
    idx = np.random.default_rng(0).choice(x.size, 12, replace=False)
    for i in idx:
        e = jnp.zeros_like(x).at[i].set(h)
        fd = (loss(x + e, example) - loss(x - e, example)) / (2 * h)
        assert float(g[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


def test_newton_equals_closed_form_mle_without_covariates(homogeneous):
    spec = ms.MultistateSpec(cuts=COARSE, covariates=())
    ex = ms.site_examples(homogeneous, spec)
    fit = ms.fit(ex, spec)
    closed = np.asarray(ms.covariate_free_mle(ex, spec))
    D, E = ms.sufficient_totals(ex, spec)
    ok = np.asarray(D) > 0
    assert fit.converged and ok.sum() > 40
    np.testing.assert_allclose(np.asarray(fit.params.alpha)[ok], closed[ok], atol=1e-6)
    # cells without events: rate -> 0
    empty = ~ok & (np.asarray(E) > 0)
    assert empty.any()
    assert np.all(np.exp(np.asarray(fit.params.alpha)[empty]) < 1e-3)


def test_mle_recovers_simulated_log_hazard_ratios():
    """beta of CICU->WARD, CICU->DEAD and WARD->HOME within 4 SE of the simulator's
    (24 comparisons; the piecewise-constant baseline is an approximation)."""
    c = sim.simulate_cardiac(jax.random.key(21), n_episodes=3000)
    df = c.truth.rename(columns={"weight_z_true": "weight_z"})
    ex = ms.site_examples(df)
    fit = ms.fit(ex, prior_sd_alpha=10.0, prior_mean_alpha=-3.0)
    g, d = sim._GAMMA, sim._DELTA
    truth = {
        0: np.r_[sim._BETA[0, :3], -(d[1:] - d[0]), sim._BETA[0, 3]],
        1: np.r_[sim._BETA[1, :3], g[1:] - g[0], sim._BETA[1, 3]],
        3: np.r_[sim._BETA[3, :3], -(d[1:] - d[0]), sim._BETA[3, 3]],
    }
    for k, b in truth.items():
        z = (np.asarray(fit.params.beta[k]) - b) / np.asarray(fit.se.beta[k])
        assert np.all(np.abs(z) < 4), (k, z)


def _aj_errors(truth, cuts, grid):
    spec = ms.MultistateSpec(cuts=cuts, covariates=())
    ex = ms.site_examples(truth, spec)
    params = ms.Params(ms.covariate_free_mle(ex, spec), jnp.zeros((9, 0)))
    cif = np.asarray(ms.first_exit_cif(params, np.zeros(0), grid, 0, spec))[0]
    first = truth.groupby("person_id").first()
    ev = first.next_state.map({"WARD": 1, "DEAD": 2}).fillna(0).astype(int).to_numpy()
    z = []
    for cause, col in ((1, sim.WARD), (2, sim.DEAD)):
        aj = AalenJohansenFitter(calculate_variance=False).fit(
            first.exit.to_numpy(), ev, event_of_interest=cause
        )
        ref = aj.cumulative_density_.iloc[:, 0]
        ref = ref.reindex(ref.index.union(grid)).ffill().loc[grid].to_numpy()
        se = np.sqrt(np.maximum(ref * (1 - ref), 1 / N_AJ) / N_AJ)
        z.append(np.abs(cif[:, col] - ref) / se)
    return np.max(z), params, spec


def test_cicu_competing_exits_match_lifelines_aalen_johansen(homogeneous):
    """Cumulative incidence of death vs transfer to the ward from CICU: the model
    (closed-form MLE, 0.25-day intervals in the first 2 weeks) and lifelines'
    Aalen-Johansen on the same data differ only by the piecewise-constant
    approximation; required: < 1 binomial SE at every time. Coarse intervals
    (1-7 days) must fail that (so the comparison can detect a poor fit). State
    occupation vs the multi-state product integral: < 1 SE (READMIT, a handful of
    patients at any time: < 3 SE)."""
    grid = np.array([0.5, 1, 2, 3, 5, 7, 10, 14, 21, 30])
    z_fine, params, spec = _aj_errors(homogeneous, FINE, grid)
    z_coarse, _, _ = _aj_errors(homogeneous, COARSE, grid)
    assert z_fine < 1.0
    assert z_coarse > 3.0
    # state occupation vs the empirical multi-state Aalen-Johansen product integral
    times = np.array([1, 3, 7, 14, 30, 90, 180, 300.0])
    occ = np.asarray(ms.occupation(params, np.zeros(0), times, spec))[0]
    emp = sv.aalen_johansen_multistate(homogeneous, list(sim.STATES), times)
    pbar = np.maximum(np.maximum(emp, occ), 1 / N_AJ)
    z = np.abs(occ - emp) / np.sqrt(pbar * (1 - pbar) / N_AJ)
    main = [sim.CICU, sim.WARD, sim.HOME, sim.DEAD]
    assert np.max(z[:, main]) < 1.0
    # READMIT holds ~5 of 2000 patients at a time: a Poisson count, 3 SE
    assert np.max(z[:, sim.READMIT]) < 3.0
    np.testing.assert_allclose(occ.sum(1), 1.0, atol=1e-10)


def test_predictions_are_consistent():
    c = sim.simulate_cardiac(jax.random.key(4), n_episodes=300)
    df, _ = episodes(c.tables)
    spec = ms.MultistateSpec(cuts=COARSE)
    ex = ms.site_examples(df, spec)
    params = ms.fit(
        ex, spec, ridge=1e-2, prior_sd_alpha=3.0, prior_mean_alpha=-3.0
    ).params
    p = ms.predict(params, ex, spec, horizons=(7.0, 30.0, 360.0))
    occ = np.asarray(p["occupation"])
    np.testing.assert_allclose(occ.sum(-1), 1.0, atol=1e-10)
    mort = np.asarray(p["mortality"])
    assert np.all(np.diff(mort, axis=1) >= -1e-12)
    # first CICU stay > 7 d implies being in CICU at day 7
    gt7 = np.asarray(p["cicu_gt7"])
    assert np.all(gt7 <= occ[:, 0, sim.CICU] + 1e-12)
    # ... and equals the CICU-first-exit survival at day 7
    cif = np.asarray(ms.first_exit_cif(params, ex.data["x"][:5], [7.0], 0, spec))
    np.testing.assert_allclose(gt7[:5], cif[:, 0, sim.CICU], rtol=1e-8)
    # higher STAT category -> higher predicted 1-year mortality on average
    stat = df.groupby("episode_id", sort=False).stat.first().to_numpy()
    assert mort[stat >= 4, 2].mean() > mort[stat <= 2, 2].mean()


def test_numpyro_log_density_is_the_penalised_likelihood():
    from numpyro.infer.util import log_density

    c = sim.simulate_cardiac(jax.random.key(6), n_episodes=50)
    df, _ = episodes(c.tables)
    spec = ms.MultistateSpec(cuts=COARSE, covariates=("neonate", "ventilation"))
    ex = ms.site_examples(df, spec, n_pad=60)
    K, J, P = spec.dims
    a = ms.Params(jnp.full((K, J), -2.0), jnp.zeros((K, P)))
    b = ms.Params(jnp.full((K, J), -3.0), jnp.full((K, P), 0.2))

    def lp(p):
        return log_density(
            ms.numpyro_model,
            (ex, spec),
            {"prior_sd_alpha": 3.0, "prior_sd_beta": 1.0, "prior_mean_alpha": -3.0},
            {"alpha": p.alpha, "beta": p.beta},
        )[0]

    def mine(p):
        return -(
            ms.penalised_nll(p, ex, spec, prior_sd_alpha=3.0, prior_mean_alpha=-3.0)
            + 0.5 * jnp.sum(p.beta**2)
        )

    assert float(lp(a) - lp(b)) == pytest.approx(float(mine(a) - mine(b)), rel=1e-10)


def test_fedavg_and_fedadam_reach_the_pooled_fit():
    """Three hospitals with different case-mix. FedAvg with one local step per round
    is gradient descent on the pooled objective (McMahan et al. 2017): it must reach
    the pooled Newton fit; FedAdam with 3 local steps (client drift) must come
    within a likelihood-ratio distance 2 * gap < 1 (well inside any confidence
    region)."""
    cs = sim.simulate_sites(jax.random.key(1), n_episodes=250)
    sites = {k: episodes(v.tables)[0] for k, v in cs.items()}
    spec = ms.MultistateSpec(cuts=COARSE, covariates=("neonate", "ventilation"))
    ref = ce.pooled_fit(sites, spec)
    pooled = ms.stack_examples([ms.site_examples(v, spec) for v in sites.values()])
    kw = {"ridge": 1e-3, "prior_sd_alpha": 3.0, "prior_mean_alpha": float(np.log(0.05))}
    p_avg, run, _ = ce.train_federated(
        jax.random.key(0),
        sites,
        spec,
        strategy="fedavg",
        learning_rate=0.5,
        local_steps=1,
        rounds=150,
    )
    assert run.rounds == 150
    np.testing.assert_allclose(
        np.asarray(p_avg.beta), np.asarray(ref.params.beta), atol=1e-3
    )
    gap = float(ms.penalised_nll(p_avg, pooled, spec, **kw)) - ref.nll
    assert -1e-6 < gap < 1e-4
    p_adam, _, _ = ce.train_federated(
        jax.random.key(0),
        sites,
        spec,
        strategy="fedadam",
        learning_rate=0.2,
        server_learning_rate=0.05,
        local_steps=3,
        rounds=150,
    )
    gap = float(ms.penalised_nll(p_adam, pooled, spec, **kw)) - ref.nll
    assert -1e-6 < 2 * gap < 1.0
    z = np.abs(np.asarray(p_adam.beta - ref.params.beta)) / np.asarray(ref.se.beta)
    assert np.all(z < 0.5)
