"""Tests for phems_clinical.federation.dp: invariants, clipping, noise scale, and
accounting against the analytic Gaussian mechanism and the reference numbers."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import optimize, stats

from phems_clinical.federation import dp
from phems_clinical.federation.dp import DPConfig, SiteDPConfig

# Statistical tests use fixed keys; each declares the probability that it would
# fail for a correct implementation with a fresh key.
TEST_FAILURE_RATE = 1e-4


def _grads(key, n=9, d=5, scale=2.0):
    return scale * jax.random.normal(key, (n, d))


def _chi2_bounds(dof):
    a = TEST_FAILURE_RATE / 2
    return stats.chi2.ppf(a, dof), stats.chi2.ppf(1 - a, dof)


# ------------------------------------------------------------------ invariants


def test_no_privacy_recovers_plain_masked_sum_under_jit(key):
    grads = _grads(key) * jnp.array([1e-3, 1.0, 1e3, 1e6, 1.0])  # any norms
    mask = jnp.array([True, False, True, True, False, True, True, True, False])
    cfg = DPConfig(clip=math.inf, noise_multiplier=0.0)

    noisy, info = jax.jit(lambda k, g, m: dp.privatise_sum(k, g, cfg, m))(
        jax.random.fold_in(key, 1), grads, mask
    )
    plain = jax.jit(lambda g, m: jnp.sum(jnp.where(m[:, None], g, 0.0), axis=0))(
        grads, mask
    )
    assert_array_equal(noisy, plain)
    assert not jnp.any(jnp.isnan(noisy))
    assert int(info.n_clipped) == 0 and int(info.batch_size) == 6
    assert float(info.noise_std) == 0.0

    mean, _ = jax.jit(lambda k, g, m: dp.privatise_mean(k, g, cfg, m))(key, grads, mask)
    assert_array_equal(mean, jax.jit(lambda s: s / 6.0)(plain))


def test_no_privacy_optax_chain_recovers_sgd(key):
    grads = _grads(key)
    cfg = DPConfig(clip=math.inf, noise_multiplier=0.0)
    tx = optax.chain(dp.dp_aggregate(cfg, key), optax.sgd(0.1))
    state = tx.init(jnp.zeros(5))
    step, state = jax.jit(tx.update)(grads, state)
    ref = -0.1 * jnp.mean(grads, axis=0)
    assert_allclose(step, ref, rtol=1e-15, atol=0)
    assert int(state[0].count) == 1
    assert not jnp.array_equal(
        jax.random.key_data(state[0].rng_key), jax.random.key_data(key)
    )


def test_clip_inf_rows_unchanged_bit_for_bit(key):
    grads = _grads(key, scale=1e150).at[0].set(0.0)
    with jax.debug_nans(True):  # no 0*inf or 0/0, even in discarded branches
        clipped, n = dp.clip_rows(grads, math.inf)
        noisy, _ = dp.privatise_sum(key, grads, DPConfig(math.inf, 0.0))
    assert_array_equal(clipped, grads)
    assert int(n) == 0
    assert_array_equal(noisy, jnp.sum(grads, axis=0))


# ------------------------------------------------------------------ clipping


def test_clip_rows_norms_and_mask(key):
    clip = 1.5
    grads = _grads(key, n=40, d=7, scale=0.4)  # norms ~ 0.4*sqrt(7) ~ 1.06
    mask = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.7, (40,))
    clipped, n_clipped = jax.jit(dp.clip_rows)(grads, clip, mask)

    norms = np.linalg.norm(np.asarray(grads), axis=1)
    out = np.asarray(clipped)
    m = np.asarray(mask)
    above, below = m & (norms > clip), m & (norms <= clip)
    assert above.sum() >= 3 and below.sum() >= 3  # both branches exercised
    assert_allclose(np.linalg.norm(out[above], axis=1), clip, rtol=1e-12)
    # direction kept
    assert_allclose(
        out[above] * (norms[above] / clip)[:, None],
        np.asarray(grads)[above],
        rtol=1e-12,
    )
    assert_array_equal(out[below], np.asarray(grads)[below])
    assert_array_equal(out[~m], 0.0)
    assert int(n_clipped) == above.sum()


def test_masked_rows_contribute_nothing(key):
    grads = _grads(key)
    mask = jnp.arange(9) < 5
    cfg = DPConfig(clip=1.0, noise_multiplier=0.0)
    full, _ = dp.privatise_sum(key, grads, cfg, mask)
    poisoned = grads.at[5:].set(jnp.nan)  # padding may hold anything
    got, _ = dp.privatise_sum(key, poisoned, cfg, mask)
    assert_array_equal(got, full)
    assert_array_equal(full, dp.clip_rows(grads[:5], 1.0)[0].sum(axis=0))


def test_zero_rows_are_safe():
    clipped, n = dp.clip_rows(jnp.zeros((3, 4)), 1.0)
    assert_array_equal(clipped, 0.0)
    assert int(n) == 0


# ------------------------------------------------------------------ noise


def test_noise_sd_is_z_times_clip(key):
    z, clip, n_keys, d = 1.3, 0.7, 4000, 5
    grads = _grads(key, d=d)
    mask = jnp.arange(9) != 4
    cfg = DPConfig(clip=clip, noise_multiplier=z)
    keys = jax.random.split(jax.random.fold_in(key, 7), n_keys)
    noisy, info = jax.jit(jax.vmap(lambda k: dp.privatise_sum(k, grads, cfg, mask)))(
        keys
    )
    clipped_sum = dp.clip_rows(grads, clip, mask)[0].sum(axis=0)
    resid = np.asarray(noisy - clipped_sum) / (z * clip)  # ~ N(0, 1) iid

    dof = resid.size
    lo, hi = _chi2_bounds(dof)
    assert lo < np.sum(resid**2) < hi
    z_crit = stats.norm.ppf(1 - TEST_FAILURE_RATE / 2)
    assert np.all(np.abs(resid.mean(axis=0)) < z_crit / math.sqrt(n_keys))
    assert_allclose(info.noise_std, z * clip, rtol=1e-15)
    # different keys, different noise; same key, same noise (eager vs jit: FMA)
    assert not np.allclose(resid[0], resid[1])
    again, _ = dp.privatise_sum(keys[0], grads, cfg, mask)
    assert_allclose(again, noisy[0], rtol=1e-14)


def test_poisson_mask_rate(key):
    n, q = 20000, 0.3
    kept = int(dp.poisson_mask(key, n, q).sum())
    sd = math.sqrt(n * q * (1 - q))
    assert abs(kept - n * q) < stats.norm.ppf(1 - TEST_FAILURE_RATE / 2) * sd
    assert bool(jnp.all(dp.poisson_mask(key, 100, 1.0)))


def test_privatise_mean_fixed_denominator_is_unbiased(key):
    # z = 0, no clipping, q = 0.5: E[mean] = masked mean (denominator q*N).
    q, n_keys = 0.5, 4000
    grads = _grads(key, n=12, d=3)
    mask = jnp.arange(12) < 10
    cfg = DPConfig(clip=math.inf, noise_multiplier=0.0, sampling_rate=q)
    keys = jax.random.split(jax.random.fold_in(key, 3), n_keys)
    means, info = jax.jit(jax.vmap(lambda k: dp.privatise_mean(k, grads, cfg, mask)))(
        keys
    )
    g = np.asarray(grads)[:10]
    target = g.mean(axis=0)
    se = np.sqrt((g**2).sum(axis=0) * q * (1 - q)) / (q * 10) / math.sqrt(n_keys)
    z_crit = stats.norm.ppf(1 - TEST_FAILURE_RATE / 6)  # three coordinates
    assert np.all(np.abs(np.asarray(means).mean(axis=0) - target) < z_crit * se)
    assert 0 < float(info.batch_size.mean()) < 10


# ------------------------------------------------------------------ site level


def test_clip_vector(key):
    v = jax.random.normal(key, (6,))
    s = 0.5 * float(jnp.linalg.norm(v))
    assert_allclose(jnp.linalg.norm(dp.clip_vector(v, s)), s, rtol=1e-12)
    assert_array_equal(dp.clip_vector(v, 2 * s), v)
    assert_array_equal(dp.clip_vector(v, math.inf), v)


def test_site_level_noise_scale(key):
    z, s, k_sites, n_keys, d = 0.8, 2.0, 4, 3000, 6
    updates = jax.random.normal(key, (k_sites, d)) * 3.0
    total = jnp.sum(jax.vmap(dp.clip_vector, (0, None))(updates, s), axis=0)
    cfg = SiteDPConfig(clip=s, noise_multiplier=z)
    keys = jax.random.split(jax.random.fold_in(key, 11), n_keys)
    out = jax.jit(
        jax.vmap(lambda k: dp.clip_and_noise_aggregate(k, total, k_sites, cfg))
    )(keys)
    resid = np.asarray(out * k_sites - total) / (z * s)
    lo, hi = _chi2_bounds(resid.size)
    assert lo < np.sum(resid**2) < hi

    exact = dp.clip_and_noise_aggregate(
        key, total, k_sites, cfg._replace(noise_multiplier=0.0)
    )
    assert_array_equal(exact, total / k_sites)


# ------------------------------------------------------------------ accounting


def _delta_analytic_gaussian(eps, sens, sigma):
    """Balle & Wang (ICML 2018), Thm 8: exact δ(ε) of the Gaussian mechanism."""
    a, b = sens / (2 * sigma), eps * sigma / sens
    return stats.norm.cdf(a - b) - math.exp(eps + stats.norm.logcdf(-a - b))


@pytest.mark.parametrize("z", [0.7, 1.0, 2.5])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_one_release_matches_analytic_gaussian(z, delta):
    clip, n = 2.5, 50  # ε does not depend on clip; sigma = z*clip, sensitivity clip
    e_pld = dp.epsilon(DPConfig(clip, z, delta=delta, accountant="pld"), n, 1)
    e_rdp = dp.epsilon(DPConfig(clip, z, delta=delta, accountant="rdp"), n, 1)

    d_pld = _delta_analytic_gaussian(e_pld, clip, z * clip)
    d_rdp = _delta_analytic_gaussian(e_rdp, clip, z * clip)
    assert d_pld <= delta * (1 + 1e-9)  # PLD is pessimistic ...
    assert d_pld == pytest.approx(delta, rel=1e-2)  # ... and tight
    assert d_rdp <= delta  # RDP is conservative
    assert e_rdp >= e_pld

    e_exact = optimize.brentq(
        lambda e: _delta_analytic_gaussian(e, clip, z * clip) - delta,
        1e-9,
        100.0,
        xtol=1e-12,
    )
    assert e_pld == pytest.approx(e_exact, abs=2e-3)


@pytest.mark.parametrize(
    ("z", "steps", "rdp_ref", "pld_ref"),
    [(1.0, 50, 57, 54), (2.0, 50, 22, 21), (5.0, 50, 7.1, 6.6), (1.0, 200, 166, 159)],
)
def test_reference_hospital_level_numbers(z, steps, rdp_ref, pld_ref):
    # Figures computed once with dp-accounting 0.6.0 (RDP / PLD accountants):
    # hospital level, q = 1, δ = 1e-5 (K = 5 sites).
    cfg = SiteDPConfig(clip=1.0, noise_multiplier=z, delta=1e-5)
    assert dp.epsilon(cfg, 5, steps) == pytest.approx(rdp_ref, rel=0.02)
    assert dp.epsilon(cfg._replace(accountant="pld"), 5, steps) == pytest.approx(
        pld_ref, rel=0.02
    )


def test_reference_patient_level_dp_sgd_numbers():
    # dp-accounting 0.6.0 (RDP / PLD) at δ = 1e-5: N = 2000, q = 0.032, z = 1.1,
    # 20 epochs = 625 steps.
    cfg = DPConfig(clip=1.0, noise_multiplier=1.1, delta=1e-5, sampling_rate=0.032)
    steps = round(20 / 0.032)
    assert dp.epsilon(cfg, 2000, steps) == pytest.approx(4.75, rel=0.02)
    assert dp.epsilon(cfg._replace(accountant="pld"), 2000, steps) == pytest.approx(
        4.30, rel=0.02
    )


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_monotonic(accountant):
    cfg = DPConfig(clip=1.0, noise_multiplier=1.0, accountant=accountant)
    by_steps = [dp.epsilon(cfg, 30, t) for t in (0, 1, 5, 20, 80)]
    assert by_steps[0] == 0.0 and np.all(np.diff(by_steps) > 0)
    by_z = [
        dp.epsilon(cfg._replace(noise_multiplier=z), 30, 10)
        for z in (0.6, 1.0, 2.0, 4.0)
    ]
    assert np.all(np.diff(by_z) < 0)
    by_q = [dp.epsilon(cfg._replace(sampling_rate=q), 30, 10) for q in (0.1, 0.5, 1.0)]
    assert np.all(np.diff(by_q) > 0)


def test_zero_noise_is_infinite_epsilon():
    cfg = DPConfig(clip=1.0, noise_multiplier=0.0)
    assert dp.epsilon(cfg, 30, 1) == math.inf
    report = dp.privacy_report(cfg, 30, 3)
    assert report["epsilon"] == "inf"
    json.dumps(report, allow_nan=False)
    assert dp.check_budget(cfg, 30, 3) == math.inf  # no budget, no refusal
    with pytest.raises(dp.PrivacyBudgetExceeded, match="epsilon = inf"):
        dp.check_budget(cfg._replace(epsilon_budget=1e6), 30, 1)


def test_privacy_report_is_json_safe():
    cfg = DPConfig(clip=1.0, noise_multiplier=1.0)
    report = dp.privacy_report(cfg, 30, 50)
    assert set(report) >= {
        "epsilon",
        "delta",
        "unit",
        "accountant",
        "noise_multiplier",
        "clip",
        "steps",
        "sampling_rate",
    }
    assert report["unit"] == "patient" and report["delta"] == 1 / 300
    assert report["epsilon"] == dp.epsilon(cfg, 30, 50)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    inf_clip = dp.privacy_report(DPConfig(math.inf, 0.0), 30, 1)
    assert inf_clip["clip"] == "inf"


def test_calibrate_noise_multiplier():
    for acc, steps, q in [("rdp", 50, 1.0), ("rdp", 300, 0.05), ("pld", 10, 1.0)]:
        z = dp.calibrate_noise_multiplier(3.0, 1e-5, steps, q, accountant=acc)
        cfg = DPConfig(1.0, z, delta=1e-5, accountant=acc, sampling_rate=q)
        assert dp.epsilon(cfg, 1000, steps) <= 3.0
        assert dp.epsilon(cfg._replace(noise_multiplier=z - 1e-3), 1000, steps) > 3.0
    assert dp.calibrate_noise_multiplier(math.inf, 1e-5, 10) == 0.0


# ------------------------------------------------------------------ budget, ledger


def test_check_budget_refuses_and_passes():
    cfg = DPConfig(clip=1.0, noise_multiplier=1.0, epsilon_budget=10.0)
    eps200 = dp.epsilon(cfg, 30, 200)
    with pytest.raises(dp.PrivacyBudgetExceeded) as err:
        dp.check_budget(cfg, 30, 200, site="Necker")
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    for part in (
        f"{eps200:.4g}",
        "budget 10",
        "delta = 0.003333",
        "patient",
        "Necker",
        "200",
    ):
        assert part in msg
    eps = dp.check_budget(cfg._replace(epsilon_budget=200.0), 30, 200)
    assert eps == eps200 < 200
    small = dp.check_budget(cfg._replace(noise_multiplier=20.0), 30, 10)
    assert small < 10


def test_ledger():
    led = dp.init_ledger(["A", "B", "C"])
    led = dp.ledger_after(led, "B", 40)
    led = dp.ledger_after(led, 0, 10)
    led = dp.ledger_after(led, "B", 10)
    assert led.steps == (10, 50, 0) and led.sites == ("A", "B", "C")
    assert dp.init_ledger(2).sites == ("0", "1")
    cfg = DPConfig(clip=1.0, noise_multiplier=1.0)
    eps = dp.ledger_epsilons(led, cfg, [30, 30, 100])
    assert eps == (dp.epsilon(cfg, 30, 10), dp.epsilon(cfg, 30, 50), 0.0)
    with pytest.raises(ValueError, match="site index"):
        dp.ledger_after(led, 3, 1)
    with pytest.raises(ValueError, match="steps"):
        dp.ledger_after(led, 0, -1)


# ------------------------------------------------------------------ validation


def test_delta_must_be_below_one_over_n():
    cfg = DPConfig(clip=1.0, noise_multiplier=1.0, delta=0.05)
    with pytest.raises(ValueError, match=r"DPConfig\.delta must be < 1/N"):
        dp.epsilon(cfg, 30, 10)
    with pytest.raises(ValueError, match="delta"):
        dp.check_budget(cfg._replace(delta=1 / 30), 30, 10)
    assert dp.resolve_delta(cfg._replace(delta=None), 30) == 1 / 300
    assert dp.resolve_delta(cfg, 19) == 0.05


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"clip": 0.0}, r"clip must be > 0"),
        ({"clip": -1.0}, r"clip must be > 0"),
        ({"clip": math.nan}, r"clip must be > 0"),
        ({"clip": math.inf}, r"clip must be finite when noise_multiplier > 0"),
        ({"noise_multiplier": -0.1}, r"noise_multiplier must be finite and >= 0"),
        ({"sampling_rate": 0.0}, r"sampling_rate must be in \(0, 1\]"),
        ({"sampling_rate": 1.5}, r"sampling_rate must be in \(0, 1\]"),
        ({"accountant": "moments"}, r"accountant must be one of"),
        ({"unit": "visit"}, r"unit must be 'patient'"),
        ({"epsilon_budget": 0.0}, r"epsilon_budget must be > 0"),
    ],
)
def test_config_validation(fields, match, key):
    cfg = DPConfig(clip=1.0, noise_multiplier=1.0)._replace(**fields)
    with pytest.raises(ValueError, match=match):
        dp.validate_config(cfg, 30)
    with pytest.raises(ValueError, match=match):
        dp.epsilon(cfg, 30, 1)
    with pytest.raises(ValueError, match=match):
        dp.privatise_sum(key, jnp.ones((3, 2)), cfg)


def test_site_config_validation():
    with pytest.raises(ValueError, match=r"SiteDPConfig\.unit must be 'hospital'"):
        dp.validate_config(SiteDPConfig(1.0, 1.0, unit="patient"))
    with pytest.raises(ValueError, match=r"SiteDPConfig\.delta must be < 1/N"):
        dp.epsilon(SiteDPConfig(1.0, 1.0, delta=0.4), 3, 10)
    with pytest.raises(ValueError, match="clip must be finite"):
        dp.clip_and_noise_aggregate(
            jax.random.key(0), jnp.ones(2), 3, SiteDPConfig(math.inf, 1.0)
        )
