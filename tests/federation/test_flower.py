"""The Flower deployment (phems_clinical.federation.flower).

* payloads cross Flower's wire format bit for bit, and malformed ones are rejected;
* the ServerApp's loop over a Grid (here an in-memory fake) equals the in-process
  engine, with failed, silent and retried sites, and aborts below ``min-sites``;
* slow: a SuperLink and three SuperNodes as separate processes on loopback (TLS)
  give exactly the in-process engine's server state for the same seed.
"""

import itertools
import json
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flwr = pytest.importorskip(
    "flwr", reason="the Flower adapter needs flwr>=1.41,<1.42, which is not installed"
)

from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import (  # noqa: E402
    get_all_nested_objects,
)
from flwr.supercore.inflatable.inflatable_utils import (  # noqa: E402
    inflate_object_from_contents,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from phems_clinical.federation import engine  # noqa: E402
from phems_clinical.federation import governance as gov  # noqa: E402
from phems_clinical.federation.core import (  # noqa: E402
    Algorithm,
    simulated_site_keys,
    site_round_key,
)
from phems_clinical.federation.flower import config as fconfig  # noqa: E402
from phems_clinical.federation.flower.records import (  # noqa: E402
    arrays_to_record,
    record_to_arrays,
)
from phems_clinical.federation.flower.server_app import run_server  # noqa: E402
from phems_clinical.federation.flower.site_state import (  # noqa: E402
    load_site_state,
    prune_site_states,
    save_site_state,
)
from phems_clinical.federation.messages import MessageRejected  # noqa: E402

APP = Path(fconfig.__file__).parent


def _over_the_wire(record):
    """Deflate a record into Flower's object store form and inflate it again."""
    contents = {
        oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()
    }
    return inflate_object_from_contents(record.object_id, contents)


def test_payload_record_round_trip_is_bit_exact():
    rng = np.random.default_rng(0)
    payload = {
        "ofv": jnp.asarray(1234.5678901234567),
        "grad": jnp.asarray(rng.normal(size=13) * 10.0 ** rng.integers(-300, 300, 13)),
    }
    back = record_to_arrays(
        _over_the_wire(arrays_to_record(payload)), {"ofv": (), "grad": (13,)}
    )
    assert back["ofv"].shape == () and back["grad"].shape == (13,)
    for name, value in payload.items():
        assert back[name].dtype == np.float64
        np.testing.assert_array_equal(back[name], np.asarray(value))
        assert back[name].tobytes() == np.asarray(value).tobytes()


@pytest.mark.parametrize(
    "arrays, why",
    [
        ({"ofv": np.zeros(1), "grad": np.zeros(13)}, "shape"),
        ({"ofv": np.zeros(())}, "fields"),
        (
            {"ofv": np.zeros(()), "grad": np.zeros(13), "eta": np.zeros((8, 2))},
            "fields",
        ),
    ],
)
def test_record_rejects_undeclared_shapes_and_fields(arrays, why):
    with pytest.raises(MessageRejected, match=why):
        record_to_arrays(arrays_to_record(arrays), {"ofv": (), "grad": (13,)})


def test_record_rejects_non_float64():
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord({"ofv": Array(np.zeros((), np.float32))})
    with pytest.raises(MessageRejected, match="float64"):
        record_to_arrays(record)


def test_run_config_defaults_match_the_app(tmp_path):
    app = tomllib.loads((APP / "pyproject.toml").read_text())
    assert (
        fconfig.run_settings(app["tool"]["flwr"]["app"]["config"])
        == fconfig.RunSettings()
    )
    assert app["project"]["dependencies"] == ["flwr>=1.41,<1.42"]
    with pytest.raises(ValueError, match="unknown keys"):
        fconfig.run_settings({"num-rounds": 3})
    site = fconfig.site_config(
        {"site-dir": str(tmp_path), "site-index": 2, "fail-rounds": "1, 4"}
    )
    assert site.state_dir == tmp_path.resolve() / fconfig.STATE_DIR
    assert site.fail_rounds == {1, 4}


def test_site_state_files(tmp_path):
    like = {"b": jnp.zeros((3, 2))}
    assert load_site_state(tmp_path, 0, like) is like
    for r in (1, 2, 3):
        save_site_state(tmp_path, r, {"b": jnp.full((3, 2), float(r))})
    np.testing.assert_array_equal(load_site_state(tmp_path, 2, like)["b"], 2.0)
    prune_site_states(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="did not complete round 0"):
        load_site_state(tmp_path, 1, like)
    np.testing.assert_array_equal(load_site_state(tmp_path, 3, like)["b"], 3.0)


# -- the ServerApp loop over an in-memory Grid --------------------------------------

D = 2


def _toy_algorithm(settings, n_occ) -> Algorithm:
    """A weighted average whose site state changes the payload (so that which
    state a site restarts from after a drop matters) and which uses the site keys."""
    del settings, n_occ

    def init_server(key):
        del key
        return {"w": jnp.zeros(D), "round": jnp.zeros((), jnp.int32)}

    def local_update(message, data, state, key):
        noise = 1e-3 * jax.random.normal(key, (D,))
        delta = data["n"] * (data["target"] - message["w"] + noise) + state
        return {"delta": delta, "weight": data["n"]}, state + 1.0, {}

    def aggregate(server, total, key):
        del key
        return {
            "w": server["w"] + total["delta"] / total["weight"],
            "round": server["round"] + 1,
        }

    return Algorithm(
        "fedavg",
        init_server,
        lambda data: jnp.zeros(()),
        lambda s: {"w": s["w"]},
        local_update,
        aggregate,
        lambda s: s["round"] >= 100,
        lambda s: {"w": s["w"]},
        {"delta": (D,), "weight": ()},
        max_rounds=100,
    )


class _FakeSite:
    """A site answering like the ClientApp (same keys, state chosen by the
    server's ``state-from``), with scripted failures and silences."""

    def __init__(
        self,
        k,
        data,
        algorithm,
        seed,
        n_sites,
        fail=(),
        silent=(),
        fail_once=(),
        query_extra=None,
    ):
        self.k, self.data, self.alg = k, data, algorithm
        self.key = simulated_site_keys(jax.random.key(seed), n_sites)[k]
        self.states = {0: algorithm.init_site(data)}
        self.fail, self.silent, self.fail_once = set(fail), set(silent), set(fail_once)
        self.query_extra = query_extra or {}

    def handle(self, msg):
        if msg.metadata.message_type == MessageType.QUERY:
            return Message(
                RecordDict(
                    {
                        "site": ConfigRecord(
                            {
                                "site-index": self.k,
                                "n-sub": 1,
                                "n-dose": 1,
                                "n-obs": 1,
                                "n-occ": 1,
                                **self.query_extra,
                            }
                        )
                    }
                ),
                reply_to=msg,
            )
        cfg = msg.content["config"]
        r = int(cfg["round"])
        if r in self.silent:
            return None
        if r in self.fail:  # as the guarded ClientApp: category and reference
            return Message(
                Error(2, "internal_error 00000000000" + str(self.k)), reply_to=msg
            )
        if r in self.fail_once:  # free text (e.g. Flower's own): never kept
            self.fail_once.discard(r)
            return Message(
                Error(0, f"site {self.k} broke at row 5 (ID MRN-0049001)"), reply_to=msg
            )
        message = {
            n: jnp.asarray(v)
            for n, v in record_to_arrays(msg.content["broadcast"]).items()
        }
        payload, state, _ = jax.jit(self.alg.local_update)(
            message,
            self.data,
            self.states[int(cfg["state-from"])],
            site_round_key(self.key, r),
        )
        self.states[r + 1] = state
        return Message(
            RecordDict(
                {
                    "payload": arrays_to_record(payload),
                    "site": ConfigRecord({"site-index": self.k, "round": r}),
                }
            ),
            reply_to=msg,
        )


class _FakeGrid:
    """The part of ``flwr.serverapp.Grid`` the ServerApp uses, in memory."""

    def __init__(self, sites):
        self.sites = {100 + s.k: s for s in sites}
        self.outbox = {}
        self.ids = itertools.count()

    def get_node_ids(self):
        return list(self.sites)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"msg-{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = mid  # as HttpGrid.push_messages
            reply = self.sites[msg.metadata.dst_node_id].handle(msg)
            if reply is not None:
                self.outbox[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(m) for m in message_ids if m in self.outbox]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(fconfig.ALGORITHMS, "toy", _toy_algorithm)
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    data = [
        {"n": jnp.asarray(float(n)), "target": jnp.asarray(t, dtype=jnp.float64)}
        for n, t in ((3, [1.0, 2.0]), (5, [-1.0, 0.5]), (2, [4.0, -3.0]))
    ]
    return data, _toy_algorithm(None, 1)


def test_server_loop_equals_engine_with_drops_and_retries(toy, tmp_path):
    data, alg = toy
    settings = fconfig.RunSettings(
        algorithm="toy",
        num_sites=3,
        min_sites=2,
        rounds=5,
        seed=3,
        round_timeout=0.5,
        out=str(tmp_path / "result.json"),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    sites = [
        _FakeSite(0, data[0], alg, 3, 3, silent={3}),
        _FakeSite(1, data[1], alg, 3, 3, fail={1}, fail_once={2}),
        _FakeSite(2, data[2], alg, 3, 3, fail_once={2}),
    ]
    report = run_server(_FakeGrid(sites), settings)

    def fault(r, k, attempt):
        if (r, k) in {(3, 0), (1, 1)} or (r, attempt) == (2, 0) and k in (1, 2):
            return "failed"
        return None

    ref = engine.run_federated(
        jax.random.key(3),
        alg,
        data,
        max_rounds=5,
        min_sites=2,
        fault=fault,
        vectorise=False,
    )
    np.testing.assert_array_equal(
        np.asarray(report["result"]["w"]), np.asarray(ref.server["w"])
    )
    assert [h["participants"] for h in report["history"]] == [
        list(h.participants) for h in ref.history
    ]
    assert [h["attempts"] for h in report["history"]] == [1, 1, 2, 1, 1]
    dropped = {h["round"]: h["dropped"] for h in report["history"]}
    assert dropped[1] == [[1, "failed: internal_error 000000000001"]]
    assert dropped[3][0][0] == 0 and dropped[3][0][1].startswith("timeout")
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "completed" and saved["rounds"] == 5
    server, _, history = engine.load_checkpoint(
        tmp_path / "ckpt", alg.init_server(None), []
    )
    np.testing.assert_array_equal(server["w"], ref.server["w"])
    assert len(history) == 5


def test_server_keeps_only_category_and_reference(toy, tmp_path):
    """Attack: a site's error reply or query reply quoting a patient's ID and
    value. The server keeps only ``category reference`` (else Flower's error code)
    and rejects a query reply with anything but the declared counts."""
    data, alg = toy
    settings = fconfig.RunSettings(
        algorithm="toy",
        num_sites=3,
        min_sites=1,
        rounds=2,
        round_timeout=0.5,
        out=str(tmp_path / "result.json"),
    )
    sites = [
        _FakeSite(0, data[0], alg, 0, 3, fail_once={0}),
        _FakeSite(1, data[1], alg, 0, 3, fail={1}),
        _FakeSite(2, data[2], alg, 0, 3, query_extra={"n-sub": "MRN-0049001"}),
    ]
    report = run_server(_FakeGrid(sites), settings)
    assert report["query_problems"] == {
        "node 102": "rejected: query reply n-sub: expected an integer >= 1"
    }
    assert [h["dropped"] for h in report["history"]] == [
        [
            [0, "failed: error code 0 (reason not kept)"],
            [2, "failed: did not answer the query round"],
        ],
        [
            [1, "failed: internal_error 000000000001"],
            [2, "failed: did not answer the query round"],
        ],
    ]
    assert "MRN" not in (tmp_path / "result.json").read_text()


def test_server_resumes_from_its_checkpoint(toy, tmp_path):
    data, alg = toy
    settings = fconfig.RunSettings(
        algorithm="toy",
        num_sites=3,
        rounds=2,
        seed=1,
        round_timeout=0.5,
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    grid = _FakeGrid(
        [_FakeSite(k, data[k], alg, 1, 3, fail={2} if k == 1 else ()) for k in range(3)]
    )
    run_server(grid, settings._replace(job="fit"))
    with pytest.raises(ValueError, match="no job"):
        run_server(grid, settings._replace(rounds=4))
    report = run_server(grid, settings._replace(rounds=4, job="fit", min_sites=2))

    def fault(r, k, attempt):
        return "failed" if (r, k) == (2, 1) else None

    ref = engine.run_federated(
        jax.random.key(1),
        alg,
        data,
        max_rounds=4,
        min_sites=2,
        fault=fault,
        vectorise=False,
    )
    np.testing.assert_array_equal(report["result"]["w"], ref.server["w"])
    assert [h["round"] for h in report["history"]] == [0, 1, 2, 3]


def test_server_aborts_below_min_sites(toy, tmp_path):
    data, alg = toy
    settings = fconfig.RunSettings(
        algorithm="toy",
        num_sites=3,
        min_sites=2,
        rounds=4,
        retries=1,
        round_timeout=0.5,
        out=str(tmp_path / "result.json"),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    sites = [
        _FakeSite(0, data[0], alg, 0, 3),
        _FakeSite(1, data[1], alg, 0, 3, fail={1}),
        _FakeSite(2, data[2], alg, 0, 3, silent={1}),
    ]
    with pytest.raises(engine.FederationAborted, match="round 1"):
        run_server(_FakeGrid(sites), settings)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "aborted" and len(saved["history"]) == 1
    _, _, history = engine.load_checkpoint(tmp_path / "ckpt", alg.init_server(None), [])
    assert len(history) == 1


# -- SuperLink + SuperNodes as processes --------------------------------------------

_POLICY = """site: site_0
min_cohort_size: {min_cohort}
allowed_fields: [ofv, grad, hess]
data_users:
  - id: pk-consortium
    epsilon_budget: 1.0
    require_dp: false
    experiments: ['haemophilia_*']
    public_key: {public}
"""
_USER_KEY = gov.generate_user_key()  # the data user's Ed25519 key


def _policy(min_cohort):
    return _POLICY.format(min_cohort=min_cohort, public=_USER_KEY[1].hex())


def _request(algorithm="fed_focei", rounds=3):
    return gov.sign_request(
        _USER_KEY[0],
        requester="pk-consortium",
        experiment="haemophilia_fviii",
        algorithm=algorithm,
        rounds=rounds,
    )


def test_site_policy_refuses_in_the_query_round(tmp_path):
    """Before computing anything, a SuperNode whose folder holds a policy checks
    the run's signed request and the run against it (here: 8 patients <
    min_cohort_size 20); a requester string that is not the signed one is
    refused."""
    from phems_clinical.federation.flower.client_app import site_query
    from phems_clinical.federation.flower.launch import simulate_sites

    site = simulate_sites(jax.random.key(11), tmp_path / "data", 24)[0]
    node = {
        "site-dir": str(site),
        "site-index": 0,
        "site-key": str(tmp_path / "keys" / "site_0.key"),
    }
    run = {
        "num-sites": 3,
        "requester": "pk-consortium",
        "experiment": "haemophilia_fviii",
        "request": _request(),
    }
    (site / fconfig.POLICY_FILE).write_text(_policy(20))
    with pytest.raises(gov.PolicyViolation, match="min_cohort_size"):
        site_query(node, run, 1)
    (site / fconfig.POLICY_FILE).write_text(_policy(5))
    reply = site_query(node, run, 1)
    assert reply["site"]["n-sub"] == 8 and reply["audit"]["seq"] == 1
    with pytest.raises(gov.PolicyViolation, match="requester: the run config"):
        site_query(node, {**run, "requester": "someone"}, 1)


@pytest.mark.slow
def test_loopback_deployment_equals_in_process_engine(tmp_path):
    from phems_clinical.federation.flower.compiled import call_cached
    from phems_clinical.federation.flower.launch import run_loopback, simulate_sites
    from phems_clinical.federation.focei import fed_focei
    from phems_clinical.federation.pk_sites import n_occasions_all, pad_sites
    from phems_clinical.pk.library import load_product

    site_dirs = simulate_sites(jax.random.key(11), tmp_path / "data", 24)
    model = load_product("advate")
    cohorts = [
        fconfig.read_site_cohort(
            fconfig.site_config({"site-dir": str(d), "site-index": k}), model
        )
        for k, d in enumerate(site_dirs)
    ]
    n_occ = n_occasions_all(cohorts)
    algorithm = fed_focei(model, n_occ)
    padded = pad_sites(cohorts)
    key = jax.random.key(5)

    def fault(r, k, attempt):  # the same failure as injected into node 2 below
        return "failed" if (r, k) == (1, 2) else None

    ref = engine.run_federated(
        key, algorithm, padded, max_rounds=3, min_sites=2, fault=fault, vectorise=False
    )
    # Warm the nodes' export cache (a speed-up only: each node would export the
    # traced update itself on its first round).
    # Site 0 holds a policy: it checks the run, then logs every message it sends.
    (site_dirs[0] / fconfig.POLICY_FILE).write_text(_policy(5))
    settings = fconfig.RunSettings(
        seed=5,
        rounds=3,
        min_sites=2,
        num_sites=3,
        n_occ=n_occ,
        requester="pk-consortium",
        experiment="haemophilia_fviii",
        request=_request(),
    )
    tag, files = fconfig.algorithm_tag(settings, n_occ)
    info = {}
    call_cached(
        algorithm.local_update,
        (
            algorithm.broadcast(ref.server),
            padded[0],
            algorithm.init_site(padded[0]),
            key,
        ),
        tag=tag,
        extra_files=files,
        info=info,
    )
    print("\npre-warm", info)

    result = run_loopback(
        site_dirs,
        tmp_path / "out",
        settings=settings,
        tls=True,
        fail_rounds={2: [1]},
        timeout=600,
    )

    assert result["status"] == "completed" and result["rounds"] == 3
    server, _, history = engine.load_checkpoint(
        tmp_path / "out" / "checkpoint", algorithm.init_server(key), []
    )
    for got, want in zip(
        jax.tree.leaves(server), jax.tree.leaves(ref.server), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    want = algorithm.result(ref.server)
    np.testing.assert_array_equal(
        list(result["estimates"].values()), np.asarray(want["estimates"])
    )
    # The engine's default (sites vmapped in one compiled round) adds in another
    # order: equal to rounding, amplified by the Newton steps' solves with the
    # summed Hessian (condition number about 1e4-1e5): 1.7e-12 relative on the
    # smallest estimate (CL_AGE_lin, -0.0036) after 3 rounds.
    vmapped = engine.run_federated(
        key, algorithm, padded, max_rounds=3, min_sites=2, fault=fault
    )
    np.testing.assert_allclose(
        list(result["estimates"].values()),
        algorithm.result(vmapped.server)["estimates"],
        rtol=1e-10,
    )
    assert [h["participants"] for h in result["history"]] == [
        [0, 1, 2],
        [0, 1],
        [0, 1, 2],
    ]
    from phems_clinical.federation.site_errors import parse_reason

    why = result["history"][1]["dropped"][0][1]
    assert parse_reason(why.removeprefix("failed: ")).category == "injected_failure"
    assert [h.participants for h in history] == [h.participants for h in ref.history]
    # The sites' states stayed on the nodes; none is left running.
    for d in site_dirs:
        assert list((d / fconfig.STATE_DIR).rglob("entering-*.eqx"))
    assert result["launch"]["left_running"] == []
    key = gov.load_site_key(tmp_path / "out" / "site_keys" / "site_0.key")
    audit = gov.verify_log(site_dirs[0] / "audit.jsonl", key=key)
    assert audit.ok and audit.n_entries == 4  # the admission and 3 messages
    seconds = [h["seconds"] for h in result["history"]]
    print(
        f"\nloopback: {result['launch']['to_first_round_s']:.1f} s from launch to "
        f"round 0, {result['launch']['total_s']:.1f} s in all; rounds "
        f"{', '.join(f'{s:.1f}' for s in seconds)} s"
    )


def test_flower_registry_is_the_federate_registry():
    """The Flower apps build every algorithm ``phems federate`` knows, with the
    same options."""
    from phems_clinical.federation.flower.config import (
        ALGORITHMS,
        REGISTERED,
        RunSettings,
    )
    from phems_clinical.federation.registry import ALGORITHMS as FEDERATE

    assert tuple(REGISTERED) == tuple(FEDERATE) == tuple(ALGORITHMS)
    alg = ALGORITHMS["fedadam"](
        RunSettings(algorithm="fedadam", options='{"local_steps": 3}'), 1
    )
    assert alg.name == "fedadam" and alg.message_spec["weight"] == ()
