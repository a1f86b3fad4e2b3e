"""Red team: a curious or dishonest coordinator against a site's governance.

Each attack is played through the real Flower ClientApp functions (``site_query``,
``site_update``) against a simulated hospital with a site policy. The docstrings
say what the attack obtained before commit 8e5a754 (the policy was
checked once, in the query round, against a ``requester`` string from the run
config, and ε was reserved for the planned rounds).
"""

import datetime as dt
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower adapter needs flwr>=1.41,<1.42")

from flwr.app import ConfigRecord, RecordDict  # noqa: E402

from phems_clinical.federation import dp as dpm  # noqa: E402
from phems_clinical.federation import governance as gov  # noqa: E402
from phems_clinical.federation.core import Algorithm  # noqa: E402
from phems_clinical.federation.dp import DPConfig  # noqa: E402
from phems_clinical.federation.flower import client_app  # noqa: E402
from phems_clinical.federation.flower import config as fconfig  # noqa: E402
from phems_clinical.federation.flower.records import (  # noqa: E402
    arrays_to_record,
    record_to_arrays,
)

D = 2
USER = "pk-consortium"
DP = DPConfig(clip=1.0, noise_multiplier=1.0, delta=1e-3)


def _toy(dp):
    def build(settings, n_occ) -> Algorithm:
        """A weighted mean of each patient's observed level (fedavg's fields)."""
        del settings, n_occ

        def local_update(message, site, state, key):
            data = site.cohort
            n = jnp.sum(data.obs_mask).astype(jnp.float64)
            dv = jnp.sum(jnp.where(data.obs_mask, data.obs_dv, 0.0)) / n
            delta = n * (jnp.stack([dv, dv / 2]) - message["w"]) + state
            return (
                {"delta": delta + 0.0 * jax.random.normal(key, (D,)), "weight": n},
                state + 1.0,
                {},
            )

        return Algorithm(
            "fedavg",
            lambda key: {"w": jnp.zeros(D)},
            lambda data: jnp.zeros(D),
            lambda s: {"w": s["w"]},
            local_update,
            lambda s, t, k: s,
            lambda s: False,
            lambda s: {},
            {"delta": (D,), "weight": ()},
            max_rounds=100,
            dp_steps_per_round=1 if dp else 0,
            dp=DP if dp else None,
        )

    return build


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    from phems_clinical.federation.flower.launch import simulate_sites

    return simulate_sites(jax.random.key(11), tmp_path_factory.mktemp("data"), 24)[0]


@pytest.fixture(scope="module")
def user_key():
    return gov.generate_user_key()


class Site:
    """One hospital: its folder (cohort, policy), its key outside it, and the
    coordinator's view of it (the messages it sends)."""

    def __init__(
        self, root, simulated, public, *, max_rounds=4, budget=50.0, require_dp=False
    ):
        self.dir = root / "hospital"
        shutil.copytree(simulated, self.dir)
        (self.dir / fconfig.POLICY_FILE).write_text(
            json.dumps(
                {
                    "site": "H0",
                    "min_cohort_size": 5,
                    "allowed_fields": ["delta", "weight"],
                    "max_rounds": max_rounds,
                    "data_users": [
                        {
                            "id": USER,
                            "epsilon_budget": budget,
                            "require_dp": require_dp,
                            "experiments": ["haemophilia_*"],
                            "public_key": public.hex(),
                        }
                    ],
                }
            )
        )
        self.key_file = root / "site_keys" / "h0.key"
        self.node = {
            "site-dir": str(self.dir),
            "site-index": 0,
            "num-sites": 1,
            "state-dir": str(root / "state"),
            "site-key": str(self.key_file),
        }

    def run_config(self, request, rounds=2, **extra):
        return {
            "num-sites": 1,
            "algorithm": "toy",
            "rounds": rounds,
            "job": "job",
            "request": request,
            **extra,
        }

    def query(self, run_config, run_id=1):
        return client_app.site_query(self.node, run_config, run_id)

    def train(self, run_config, r, *, run_id=1, w=0.0, shape=None):
        shape = shape or {"n-sub": 8, "n-dose": 6, "n-obs": 6, "n-occ": 1}
        content = RecordDict(
            {
                "broadcast": arrays_to_record({"w": np.full(D, w)}),
                "config": ConfigRecord(
                    {
                        "round": r,
                        "site-index": 0,
                        "num-sites": 1,
                        "state-from": r,
                        **shape,
                    }
                ),
            }
        )
        return client_app.site_update(content, self.node, run_config, run_id)

    def ledger(self):
        key = gov.load_site_key(self.key_file)
        return gov.load_spend(self.dir / "privacy_ledger.json", key=key)


def _sign(private, **changes):
    fields = {
        "requester": USER,
        "experiment": "haemophilia_fviii",
        "algorithm": "fedavg",
        "rounds": 10,
    }
    return gov.sign_request(private, **{**fields, **changes})


@pytest.fixture
def site(tmp_path, simulated, user_key, monkeypatch):
    monkeypatch.setitem(fconfig.ALGORITHMS, "toy", _toy(dp=False))
    return Site(tmp_path, simulated, user_key[1])


def _shape(reply):
    return {k: int(reply["site"][k]) for k in ("n-sub", "n-dose", "n-obs", "n-occ")}


def _no_cohort_read(monkeypatch):
    """Reading the cohort now fails loudly: a refusal must come before it."""

    def read(*args, **kwargs):
        raise AssertionError("the cohort was read before the request was checked")

    # every use case's site data are read through this one function
    monkeypatch.setattr(client_app, "_site_cohort", read)


def test_train_without_admission_is_refused(site, user_key, monkeypatch):
    """Skipped query round. Before: a ServerApp that sent ``train`` straight away
    was served (the policy was only checked in ``site_query``): round 0 returned
    the site's payload and its ledger stayed empty (ε = 0 recorded). Now: refused,
    before the cohort is read."""
    run = site.run_config(_sign(user_key[0]))
    _no_cohort_read(monkeypatch)
    with pytest.raises(gov.PolicyViolation) as info:
        site.train(run, 0)
    assert info.value.field == "admission"
    assert not (site.dir / "admissions").exists() or not list(
        (site.dir / "admissions").glob("*.json")
    )


def test_rounds_beyond_admitted_or_max_rounds_are_refused(site, user_key):
    """Extra rounds. Before: after a query round admitting 2 rounds the site
    served round 2, 3, ... for as long as the server asked (ε recorded for 2).
    Now: the third round is refused; a policy lowered to ``max_rounds`` = 1
    mid-run stops the run at once."""
    run = site.run_config(_sign(user_key[0]), rounds=2)
    shape = _shape(site.query(run))
    for r in (0, 1):
        assert "payload" in site.train(run, r, shape=shape)
    with pytest.raises(gov.PolicyViolation) as info:
        site.train(run, 2, shape=shape)
    assert info.value.field == "rounds" and info.value.allowed == 2

    # a new run of 3 rounds; the site lowers max_rounds to 1 after round 0
    run = site.run_config(_sign(user_key[0]), rounds=3)
    site.query(run, run_id=2)
    site.train(run, 0, run_id=2, shape=shape)
    policy = json.loads((site.dir / fconfig.POLICY_FILE).read_text())
    (site.dir / fconfig.POLICY_FILE).write_text(json.dumps({**policy, "max_rounds": 1}))
    with pytest.raises(gov.PolicyViolation) as info:
        site.train(run, 1, run_id=2, shape=shape)
    assert info.value.field == "max_rounds"
    # the server planned more rounds than the data user signed for
    with pytest.raises(gov.PolicyViolation, match="request.rounds"):
        site.query(site.run_config(_sign(user_key[0], rounds=2), rounds=3), run_id=3)


def test_repeated_round_returns_the_same_reply_or_is_refused(site, user_key):
    """Round retries. An identical re-request of round 0 (the server's retry)
    returns the bytes already sent and charges nothing; a different request for
    round 0 (another broadcast: a second, differently conditioned release of the
    same round) is refused. Before: every request was computed afresh."""
    run = site.run_config(_sign(user_key[0]), rounds=3)
    shape = _shape(site.query(run))
    first = record_to_arrays(site.train(run, 0, shape=shape)["payload"])
    again = site.train(run, 0, shape=shape)
    for name, value in record_to_arrays(again["payload"]).items():
        assert value.tobytes() == first[name].tobytes()
    adm = json.loads(next((site.dir / "admissions").glob("*.json")).read_text())
    assert list(adm["executed"]) == ["0"]
    with pytest.raises(gov.PolicyViolation) as info:
        site.train(run, 0, w=5.0, shape=shape)
    assert info.value.field == "round"
    site.train(run, 1, shape=shape)
    with pytest.raises(gov.PolicyViolation, match="already executed"):
        site.train(run, 0, w=7.0, shape=shape)  # going back is refused too


def test_epsilon_is_charged_per_executed_round(
    tmp_path, simulated, user_key, monkeypatch
):
    """A run planned for 10 rounds and stopped after 2 is charged ε(2 rounds),
    updated round by round. Before: ε(10 rounds) was written at the query round,
    and a server that ran more rounds than planned was never charged for them."""
    monkeypatch.setitem(fconfig.ALGORITHMS, "toy", _toy(dp=True))
    site = Site(tmp_path, simulated, user_key[1], max_rounds=20, require_dp=True)
    run = site.run_config(_sign(user_key[0]), rounds=10)
    shape = _shape(site.query(run))
    n = shape["n-sub"]
    assert site.ledger().epsilon == {}  # admitted, nothing charged yet
    site.train(run, 0, shape=shape)
    assert site.ledger().epsilon[USER] == pytest.approx(dpm.epsilon(DP, n, 1))
    site.train(run, 1, shape=shape)
    eps2, eps10 = dpm.epsilon(DP, n, 2), dpm.epsilon(DP, n, 10)
    assert site.ledger().epsilon[USER] == pytest.approx(eps2)
    assert site.ledger().runs[USER] == 1 and eps2 < 0.5 * eps10
    # every charge is in the MAC'd audit log, with the ledger generation it wrote
    key = gov.load_site_key(site.key_file)
    res = gov.verify_log(site.dir / "audit.jsonl", key=key)
    charges = [
        e["charge"] for e in gov.read_log(site.dir / "audit.jsonl") if e["charge"]
    ]
    assert res.ok and [c["rounds"] for c in charges] == [1, 2] and res.ledger == 2
    print(
        f"\nn = {n}: charged eps(2 rounds) = {eps2:.3f}; the old reservation "
        f"eps(10 rounds) = {eps10:.3f}"
    )


def _expired(private):
    return gov.sign_request(
        private,
        requester=USER,
        experiment="haemophilia_fviii",
        algorithm="fedavg",
        rounds=10,
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
    )


def _altered(private):
    """The coordinator raises the signed rounds from 10 to 1000 in the token."""
    import base64

    req = gov.parse_request(_sign(private))._replace(rounds=1000)
    text = json.dumps({**req.body(), "signature": req.signature})
    return gov.REQUEST_PREFIX + base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "attack, field",
    [
        ("unsigned", "request"),
        ("forged", "request.signature"),
        ("altered", "request.signature"),
        ("expired", "request.expires"),
        ("spoofed requester", "requester"),
        ("spoofed experiment", "experiment"),
    ],
)
def test_bad_requests_are_refused_before_the_cohort_is_read(
    site, user_key, monkeypatch, attack, field
):
    """Before: ``requester`` was a string in the run config, so any coordinator
    could run as any data user (and spend its budget); nothing was signed or
    expired. Now each is refused before the cohort is read (the reader is made to
    fail: the refusal must come first)."""
    private = user_key[0]
    other, _ = gov.generate_user_key()
    runs = {
        "unsigned": site.run_config("", requester=USER, experiment="haemophilia_fviii"),
        "forged": site.run_config(_sign(other)),
        "altered": site.run_config(_altered(private)),
        "expired": site.run_config(_expired(private)),
        "spoofed requester": site.run_config(_sign(private), requester="uni-registry"),
        "spoofed experiment": site.run_config(
            _sign(private), experiment="haemophilia_other"
        ),
    }
    _no_cohort_read(monkeypatch)
    with pytest.raises(gov.PolicyViolation) as info:
        site.query(runs[attack])
    assert info.value.field == field


def test_replayed_request_is_refused_before_the_cohort_is_read(
    site, user_key, monkeypatch
):
    """Replay: a signed request admitted for Flower run 1 is used again for run 2
    (the coordinator restarts the run to get a second release). Before: there was
    no nonce; the second run was admitted. Now refused (``request.nonce``)."""
    run = site.run_config(_sign(user_key[0]))
    site.query(run, run_id=1)
    site.query(run, run_id=1)  # the same run asking again is the same admission
    _no_cohort_read(monkeypatch)
    with pytest.raises(gov.PolicyViolation) as info:
        site.query(run, run_id=2)
    assert info.value.field == "request.nonce"
    with pytest.raises(gov.PolicyViolation, match="admission"):
        site.train(run, 0, run_id=2)
