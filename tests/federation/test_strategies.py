"""FedAvg / FedProx / FedAdam / FedYogi against centralised references, the DP
invariant (no noise + no clipping = non-private, exactly), DP budget refusal and
site governance in a run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from phems_clinical.federation import governance as gov
from phems_clinical.federation.core import site_secret_keys
from phems_clinical.federation.dp import DPConfig, PrivacyBudgetExceeded, SiteDPConfig
from phems_clinical.federation.engine import run_federated
from phems_clinical.federation.gate import SiteGate
from phems_clinical.federation.strategies import (
    Examples,
    fedadam,
    fedavg,
    fedprox,
    fedyogi,
    objective_from_loss,
)


def _pooled_grad(loss, b, x, y):
    g = jax.vmap(jax.grad(loss), in_axes=(None, 0))(b, (jnp.asarray(x), jnp.asarray(y)))
    return np.asarray(g).mean(axis=0)


def test_fedavg_one_local_step_is_centralised_gradient_descent(logistic_sites):
    """Weighted FedAvg with one SGD step per round = full-batch GD on the pooled
    mean loss (McMahan et al. 2017: FedSGD)."""
    sites, (x, y), loss = logistic_sites
    run = run_federated(
        jax.random.key(0),
        fedavg(
            objective_from_loss(loss), jnp.zeros(3), learning_rate=0.4, max_rounds=6
        ),
        sites,
    )
    b = np.zeros(3)
    for _ in range(6):
        b = b - 0.4 * _pooled_grad(loss, b, x, y)
    np.testing.assert_allclose(np.asarray(run.server.x), b, rtol=1e-12)


def test_one_site_is_centralised_training(logistic_sites):
    """One site under federation = its own E local SGD steps per round."""
    sites, _, loss = logistic_sites
    site = sites[1]
    run = run_federated(
        jax.random.key(0),
        fedavg(
            objective_from_loss(loss),
            jnp.zeros(3),
            learning_rate=0.3,
            local_steps=4,
            max_rounds=3,
        ),
        [site],
    )
    n = int(site.mask.sum())
    x, y = (np.asarray(a)[:n] for a in site.data)
    b = np.zeros(3)
    for _ in range(12):
        b = b - 0.3 * _pooled_grad(loss, b, x, y)
    np.testing.assert_allclose(np.asarray(run.server.x), b, rtol=1e-12)


@pytest.mark.parametrize("make", ["fedavg", "fedadam"])
def test_no_noise_infinite_clip_equals_non_private(make, logistic_sites):
    """optax's test_no_privacy invariant: DP with z = 0 and C = inf reproduces the
    non-private run bit for bit (patient-level and hospital-level DP)."""
    sites, _, loss = logistic_sites
    obj = objective_from_loss(loss)
    kw = {"learning_rate": 0.5, "local_steps": 2, "max_rounds": 5}
    if make == "fedadam":
        kw["server_learning_rate"] = 0.2
    build = {"fedavg": fedavg, "fedadam": fedadam}[make]
    plain = run_federated(jax.random.key(1), build(obj, jnp.zeros(3), **kw), sites)
    private = run_federated(
        jax.random.key(1),
        build(
            obj, jnp.zeros(3), dp=DPConfig(clip=math.inf, noise_multiplier=0.0), **kw
        ),
        sites,
    )
    np.testing.assert_array_equal(
        np.asarray(private.server.x), np.asarray(plain.server.x)
    )
    assert private.privacy[0]["epsilon"] == "inf"
    assert private.privacy[0]["unit"] == "patient"
    # hospital-level DP with no noise/clip = the unweighted mean of site updates
    site_level = run_federated(
        jax.random.key(1),
        build(obj, jnp.zeros(3), site_dp=SiteDPConfig(math.inf, 0.0), n_sites=4, **kw),
        sites,
    )
    assert np.all(np.isfinite(np.asarray(site_level.server.x)))


def test_dp_noise_changes_result_and_reports_epsilon(logistic_sites):
    sites, _, loss = logistic_sites
    cfg = DPConfig(clip=1.0, noise_multiplier=1.5, delta=1e-3)
    alg = fedavg(
        objective_from_loss(loss),
        jnp.zeros(3),
        learning_rate=0.5,
        local_steps=2,
        max_rounds=5,
        dp=cfg,
    )
    a = run_federated(jax.random.key(1), alg, sites)
    b = run_federated(jax.random.key(1), alg, sites)
    # DP noise comes from each site's OS CSPRNG, not the seed: same seed, new noise
    assert not np.array_equal(np.asarray(a.server.x), np.asarray(b.server.x))
    kept = site_secret_keys(len(sites))  # the sites' kept secrets replay the run
    c = run_federated(jax.random.key(1), alg, sites, site_secrets=kept)
    d = run_federated(jax.random.key(2), alg, sites, site_secrets=kept)
    np.testing.assert_array_equal(np.asarray(c.server.x), np.asarray(d.server.x))
    assert [p["steps"] for p in a.privacy] == [10] * 4
    eps = [p["epsilon"] for p in a.privacy]
    assert all(0 < e < math.inf for e in eps) and len(set(eps)) == 1
    assert a.privacy[0]["delta"] == 1e-3 and a.privacy[0]["unit"] == "patient"


def test_run_refuses_to_exceed_epsilon_budget(logistic_sites):
    sites, _, loss = logistic_sites
    seen = []
    cfg = DPConfig(clip=1.0, noise_multiplier=1.0, delta=1e-3, epsilon_budget=5.0)
    alg = fedavg(
        objective_from_loss(loss),
        jnp.zeros(3),
        learning_rate=0.5,
        local_steps=5,
        max_rounds=20,
        dp=cfg,
    )
    with pytest.raises(
        PrivacyBudgetExceeded,
        match=r"site 0: 100 noisy steps .*"
        r"budget 5 .*one patient",
    ):
        run_federated(
            jax.random.key(0), alg, sites, on_message=lambda *a: seen.append(a)
        )
    assert seen == []  # refused before any computation


def test_fedprox_mu_zero_is_fedavg_and_large_mu_stays_put(logistic_sites):
    sites, _, loss = logistic_sites
    obj = objective_from_loss(loss)
    kw = {"learning_rate": 0.3, "local_steps": 5, "max_rounds": 3}
    avg = run_federated(jax.random.key(0), fedavg(obj, jnp.zeros(3), **kw), sites)
    prox0 = run_federated(
        jax.random.key(0), fedprox(obj, jnp.zeros(3), mu=0.0, **kw), sites
    )
    np.testing.assert_array_equal(np.asarray(avg.server.x), np.asarray(prox0.server.x))
    stiff = run_federated(
        jax.random.key(0), fedprox(obj, jnp.zeros(3), mu=3.0, **kw), sites
    )
    assert np.linalg.norm(np.asarray(stiff.server.x)) < 0.5 * np.linalg.norm(
        np.asarray(avg.server.x)
    )


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_server_applies_optax_to_the_pseudo_gradient(name, logistic_sites):
    """One local SGD step per round: the server's update is optax.adam/yogi on the
    pooled mean gradient times the local learning rate (Reddi et al. 2021)."""
    sites, (x, y), loss = logistic_sites
    build, opt = {"fedadam": (fedadam, optax.adam), "fedyogi": (fedyogi, optax.yogi)}[
        name
    ]
    run = run_federated(
        jax.random.key(0),
        build(
            objective_from_loss(loss),
            jnp.zeros(3),
            learning_rate=0.5,
            server_learning_rate=0.1,
            max_rounds=4,
        ),
        sites,
    )
    server = opt(0.1, b1=0.9, b2=0.99, eps=1e-3)
    b = jnp.zeros(3)
    state = server.init(b)
    for _ in range(4):
        pseudo = 0.5 * _pooled_grad(loss, b, x, y)
        upd, state = server.update(jnp.asarray(pseudo), state, b)
        b = optax.apply_updates(b, upd)
    np.testing.assert_allclose(np.asarray(run.server.x), np.asarray(b), rtol=1e-11)


_USER_KEY = gov.generate_user_key()


def _policy(min_cohort=5, budget=50.0):
    return gov.load_policy(
        {
            "site": "H",
            "min_cohort_size": min_cohort,
            "allowed_fields": ["delta", "weight"],
            "max_rounds": 50,
            "data_users": [
                {
                    "id": "consortium",
                    "epsilon_budget": budget,
                    "require_dp": True,
                    "experiments": ["logit_*"],
                    "public_key": _USER_KEY[1].hex(),
                }
            ],
        }
    )


def test_site_policy_refuses_before_computing_and_logs_every_message(
    tmp_path, logistic_sites
):
    sites, _, loss = logistic_sites
    cfg = DPConfig(clip=1.0, noise_multiplier=2.0, delta=1e-3)
    alg = fedavg(
        objective_from_loss(loss), jnp.zeros(3), learning_rate=0.5, max_rounds=3, dp=cfg
    )

    def gates(policy, logs="logs"):  # a fresh signed request per run
        request = gov.sign_request(
            _USER_KEY[0],
            requester="consortium",
            experiment="logit_demo",
            algorithm=alg.name,
            rounds=3,
        )
        return [
            SiteGate(
                policy,
                tmp_path / logs / f"s{k}.log",
                tmp_path / logs / f"s{k}.json",
                request,
                tmp_path / "keys" / f"s{k}.key",
                tmp_path / logs / f"s{k}.admissions",
            )
            for k in range(4)
        ]

    seen = []
    # site 3 has 7 patients: a minimum cohort of 10 refuses the whole run
    with pytest.raises(gov.PolicyViolation, match="min_cohort_size"):
        run_federated(
            jax.random.key(0),
            alg,
            sites,
            gates=gates(_policy(10), "refused"),
            on_message=lambda *a: seen.append(a),
        )
    assert seen == []  # the other sites admitted it, but nothing was sent
    assert all(
        e["event"] == "admit"
        for p in (tmp_path / "refused").glob("*.log")
        for e in gov.read_log(p)
    )

    run = run_federated(jax.random.key(0), alg, sites, gates=gates(_policy()))
    for k in range(4):
        key = gov.load_site_key(tmp_path / "keys" / f"s{k}.key")
        res = gov.verify_log(tmp_path / "logs" / f"s{k}.log", key=key)
        # admit, three messages (each carrying its ε charge), close
        assert res.ok and res.n_entries == 5
        entries = gov.read_log(tmp_path / "logs" / f"s{k}.log")
        assert [e["event"] for e in entries] == [
            "admit",
            "message",
            "message",
            "message",
            "close",
        ]
        assert set(entries[1]["summary"]) == {"delta", "weight"}
        assert run.history[-1].audit_heads[k] == (k, 4, entries[3]["mac"])
        spent = gov.load_spend(tmp_path / "logs" / f"s{k}.json", key=key)
        assert spent.epsilon["consortium"] == pytest.approx(run.privacy[k]["epsilon"])
    # a second run would exceed the per-user budget at the smallest site
    eps = run.privacy[3]["epsilon"]
    with pytest.raises(gov.PolicyViolation, match="epsilon_budget"):
        run_federated(
            jax.random.key(0), alg, sites, gates=gates(_policy(budget=1.5 * eps))
        )


def test_examples_type():
    e = Examples(jnp.zeros((2, 1)), jnp.ones(2, bool))
    assert e.mask.shape == (2,)
