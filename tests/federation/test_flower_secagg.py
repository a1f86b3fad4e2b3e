"""Secure aggregation on the Flower deployment (flower.secagg_transport).

* every SecAgg stage message crosses Flower's wire format unchanged, and a
  malformed one is refused;
* the ServerApp loop over an in-memory Grid whose nodes are the real ClientApp
  (its ``query``, ``train`` and ``train.secagg`` handlers): the SecAgg sum equals
  the plain sum to the encoding error, with dropouts and retries; what the server
  receives holds no site's payload (while without SecAgg a curious server reads
  every payload in clear); secrets are 0600 on the node and gone after the round;
  a site that requires SecAgg refuses to send its payload in clear;
* slow: SuperLink + 3 SuperNodes on loopback, federated FOCEI and FedAdam with
  SecAgg, against the in-process engine with SecAgg.
"""

import itertools
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flwr = pytest.importorskip(
    "flwr", reason="the Flower adapter needs flwr>=1.41,<1.42, which is not installed")

from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import (  # noqa: E402
    get_all_nested_objects,
)
from flwr.supercore.inflatable.inflatable_utils import (  # noqa: E402
    inflate_object_from_contents,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from phems_clinical.federation import secagg  # noqa: E402
from phems_clinical.federation.core import Algorithm, flatten_payload  # noqa: E402
from phems_clinical.federation.engine import FederationAborted  # noqa: E402
from phems_clinical.federation.flower import client_app  # noqa: E402
from phems_clinical.federation.flower import config as fconfig  # noqa: E402
from phems_clinical.federation.flower import secagg_transport as st  # noqa: E402
from phems_clinical.federation.flower.launch import simulate_sites  # noqa: E402
from phems_clinical.federation.flower.records import record_to_arrays  # noqa: E402
from phems_clinical.federation.flower.server_app import run_server  # noqa: E402
from phems_clinical.federation.messages import MessageRejected  # noqa: E402

D = 2


def _wire_bytes(record) -> dict:
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}


def _over_the_wire(record):
    """Deflate a record into Flower's object store form and inflate it again."""
    return inflate_object_from_contents(record.object_id, _wire_bytes(record))


# -- the codec ---------------------------------------------------------------------


def test_codec_round_trip_and_refusals():
    obj = {"roster": {"b": secagg.SecAggConfig(1.5, 12, 2), "a": None},
           "y": np.arange(5, dtype=np.uint64) * np.uint64(2**61),
           "ids": ("site0001", "site0000"), "box": b"\x00\xff" * 40,
           "big": 2**64 - 1, "neg": -3, "flag": True, "empty": {}, "none": ()}
    back = st.from_record(_over_the_wire(st.to_record(obj, st.header("x", 0, 1, 2))))
    np.testing.assert_array_equal(back.pop("y"), obj["y"])
    assert back == {k: v for k, v in obj.items() if k != "y"}
    assert type(back["roster"]["b"]) is secagg.SecAggConfig
    flat = st.flatten(obj)
    with pytest.raises(MessageRejected, match="unexpected fields"):
        st.unflatten({**flat, "m.extra": 1})
    with pytest.raises(MessageRejected, match="missing field"):
        st.unflatten({k: v for k, v in flat.items() if k != "m.2.0"})
    with pytest.raises(MessageRejected, match="expected bytes"):
        st.unflatten({**flat, "m.3": "not bytes"})
    with pytest.raises(MessageRejected, match="unknown type"):
        st.unflatten({**flat, "m.0.0@": "nt:Popen"})  # only secagg's NamedTuples
    with pytest.raises(TypeError, match="cannot serialise"):
        st.flatten({"f": object()})


def test_private_files_are_owner_only(tmp_path):
    path = st.save_private(tmp_path / "s" / "secagg-1.json",
                           {"k": b"\x01" * 32, "x": np.array([1.5, -2.0])})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = st.load_private(path)
    assert back["k"] == b"\x01" * 32 and back["x"].tolist() == [1.5, -2.0]
    key = tmp_path / "id.key"
    public = st.ensure_identity(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(public) == 32
    assert st.ensure_identity(key) == public  # kept, not replaced
    key.chmod(0o644)
    with pytest.raises(PermissionError, match="secagg-identity"):
        st.read_identity(key)


# -- the ServerApp loop over an in-memory Grid of real ClientApps -------------------


def _toy(settings, n_occ) -> Algorithm:
    """A weighted average on the site's cohort (mean concentration and mean dose),
    whose site state changes the payload; named fedavg for the message schema."""
    del settings, n_occ

    def init_server(key):
        del key
        return {"w": jnp.zeros(D), "round": jnp.zeros((), jnp.int32)}

    def local_update(message, site, state, key):
        data = site.cohort
        n = jnp.sum(data.obs_mask).astype(jnp.float64)
        dv = jnp.sum(jnp.where(data.obs_mask, data.obs_dv, 0.0)) / n
        dose = jnp.sum(data.dose_amt) / jnp.maximum(jnp.sum(data.dose_amt > 0), 1)
        target = jnp.stack([dv, dose / 100.0])
        delta = n * (target - message["w"]) + state + 1e-3 * jax.random.normal(
            key, (D,))
        return {"delta": delta, "weight": n}, state + 1.0, {}

    def aggregate(server, total, key):
        del key
        return {"w": server["w"] + total["delta"] / total["weight"],
                "round": server["round"] + 1}

    return Algorithm("fedavg", init_server, lambda data: jnp.zeros(D),
                     lambda s: {"w": s["w"]}, local_update, aggregate,
                     lambda s: s["round"] >= 100, lambda s: {"w": s["w"]},
                     {"delta": (D,), "weight": ()}, max_rounds=100)


class _Grid:
    """The part of ``flwr.serverapp.Grid`` the ServerApp uses, in memory: each node
    is the real ClientApp (``client_app.app``) with its own node config; every
    message and reply crosses Flower's wire format. ``transcript`` keeps the bytes
    of every reply the server received; ``drop`` silences (stage, round, site)."""

    def __init__(self, node_configs, run_config, drop=(), tamper=None):
        self.nodes = {100 + k: cfg for k, cfg in enumerate(node_configs)}
        self.run_config = run_config
        self.drop, self.tamper = set(drop), tamper
        self.outbox, self.transcript, self.replies = {}, [], []
        self.ids = itertools.count()
        self.seen_files: list[tuple[str, int]] = []

    def get_node_ids(self):
        return list(self.nodes)

    def _stage(self, msg):
        if msg.metadata.message_type == st.MESSAGE_TYPE:
            head = msg.content["config"]
            return str(head["stage"]), int(head["round"])
        if msg.metadata.message_type == MessageType.TRAIN:
            return "train", int(msg.content["config"]["round"])
        return "query", -1

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"msg-{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = mid  # as HttpGrid.push_messages
            node = msg.metadata.dst_node_id
            stage, r = self._stage(msg)
            if self.tamper is not None:  # a dishonest server's edit
                msg.content = self.tamper(stage, msg.content)
            msg.content = _over_the_wire(msg.content)
            ctx = Context(run_id=1, node_id=node, node_config=self.nodes[node],
                          state=RecordDict(), run_config=self.run_config)
            reply = client_app.app(msg, ctx)
            folder = Path(self.nodes[node]["state-dir"]) / "job"
            self.seen_files += [(p.name, stat.S_IMODE(p.stat().st_mode))
                                for p in folder.glob("secagg-*.json")]
            if (stage, r, node - 100) in self.drop:
                ids.append(mid)
                continue
            if not reply.has_error():
                self.transcript.append(b"".join(_wire_bytes(reply.content).values()))
                self.replies.append((stage, r, node - 100, reply.content))
                reply = Message(_over_the_wire(reply.content), reply_to=msg)
            self.outbox[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(m) for m in message_ids if m in self.outbox]


@pytest.fixture(scope="module")
def site_dirs(tmp_path_factory):
    """Three simulated hospitals, each with its SecAgg identity and the trusted
    roster (as the loopback launcher writes them)."""
    from phems_clinical.federation.flower.launch import secagg_identities

    dirs = simulate_sites(jax.random.key(11), tmp_path_factory.mktemp("data"), 24)
    secagg_identities(dirs)
    return dirs


@pytest.fixture
def toy_sites(monkeypatch, site_dirs):
    monkeypatch.setitem(fconfig.ALGORITHMS, "toy", _toy)
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    return site_dirs


def _run(dirs, tmp, *, secure, drop=(), required=True, fail=None, tamper=None,
         **kw):
    settings = fconfig.RunSettings(algorithm="toy", num_sites=3, rounds=2, seed=3,
                                   round_timeout=0.3, job="job", secagg=secure,
                                   **kw)
    nodes = [{"site-dir": str(d), "site-index": k, "num-sites": 3,
              "state-dir": str(tmp / f"state_{k}"), "secagg-required": required,
              **({"fail-rounds": fail[k]} if fail and k in fail else {})}
             for k, d in enumerate(dirs)]
    grid = _Grid(nodes, fconfig.to_run_config(settings), drop, tamper)
    return run_server(grid, settings), grid


def _train_payloads(grid, r=0) -> dict[int, np.ndarray]:
    """What a curious server reads from a plain run: each site's payload of round
    ``r``, flattened as SecAgg would."""
    return {k: flatten_payload(record_to_arrays(c["payload"]),
                               {"delta": (D,), "weight": ()})
            for stage, rr, k, c in grid.replies
            if stage == "train" and rr == r and "payload" in c}


def test_secagg_round_equals_plain_sum_and_hides_payloads(toy_sites, tmp_path):
    plain, pgrid = _run(toy_sites, tmp_path / "plain", secure=False, required=False)
    secure, sgrid = _run(toy_sites, tmp_path / "secure", secure=True)
    cfg = st.secagg_config(fconfig.RunSettings(num_sites=3))
    bound = 3 * secagg.grid_step(cfg)
    assert secure["secure_aggregation"]["max_error_bound"] == pytest.approx(bound)
    # equal to the plain run up to the encoding error (2 rounds, w ~ 1e2)
    np.testing.assert_allclose(secure["result"]["w"], plain["result"]["w"],
                               rtol=0, atol=1e-6)
    assert secure["result"]["w"] != plain["result"]["w"]  # but it was encoded
    assert [h["participants"] for h in secure["history"]] == [[0, 1, 2]] * 2

    # The attack: a curious server scans everything it received for each site's
    # round-0 payload (float64 words, and its SecAgg grid indices). The runs share
    # seed and start, so the round-0 payloads are the same in both.
    x = _train_payloads(pgrid)
    assert sorted(x) == [0, 1, 2] and not _train_payloads(sgrid)
    plain_seen, secure_seen = b"".join(pgrid.transcript), b"".join(sgrid.transcript)
    for k, v in x.items():
        words = [v[i:i + 1].tobytes() for i in range(v.size)]
        q = secagg.encode(st.encoding_key(3, 3, k, 0), v, cfg).q
        assert all(w in plain_seen for w in words)  # old behaviour: in clear
        assert not any(w in secure_seen for w in words), f"site {k}'s payload"
        assert not any(q[i:i + 1].tobytes() in secure_seen for i in range(q.size))
    stages = {stage for stage, *_ in sgrid.replies}
    assert stages == {"query", "train", *secagg.STAGES[1:]}
    # secrets lived on the nodes as 0600 files and are gone after the last stage
    assert sgrid.seen_files and {m for _, m in sgrid.seen_files} == {0o600}
    for k in range(3):
        assert not list((tmp_path / "secure" / f"state_{k}").rglob("secagg-*.json"))


def test_dropouts_follow_bonawitz(toy_sites, tmp_path):
    """Site 1 misses the unmasking of round 0 (its input is still in the sum: the
    others reveal its self-mask seed); site 2's masked input of round 1 is lost
    (it is left out, its pairwise masks removed): as a plain run in which site 2
    fails in round 1."""
    secure, _ = _run(toy_sites, tmp_path / "secure", secure=True, min_sites=2,
                     drop={("unmasking", 0, 1), ("masked_input", 1, 2)})
    plain, _ = _run(toy_sites, tmp_path / "plain", secure=False, required=False,
                    fail={2: "1"}, min_sites=2)
    assert [h["participants"] for h in secure["history"]] == [[0, 1, 2], [0, 1]]
    assert [h["participants"] for h in plain["history"]] == [[0, 1, 2], [0, 1]]
    assert secure["history"][0]["dropped"] == []
    [(k, why)] = secure["history"][1]["dropped"]
    assert k == 2 and why.startswith("masked_input: timeout")
    np.testing.assert_allclose(secure["result"]["w"], plain["result"]["w"],
                               rtol=0, atol=1e-6)


def test_too_few_survivors_abort_the_round(toy_sites, tmp_path):
    with pytest.raises(FederationAborted, match="round 0") as info:
        _run(toy_sites, tmp_path, secure=True, retries=1, min_sites=2,
             drop={("masked_input", 0, 1), ("masked_input", 0, 2)})
    assert "secure aggregation failed" in str(info.value)
    assert "fewer than threshold=2" in str(info.value)


def test_site_requiring_secagg_refuses_a_plain_round(toy_sites, tmp_path):
    """A coordinator that turns SecAgg off in the run config gets no payload from
    a site whose own node config requires it: fail closed, before computing."""
    with pytest.raises(FederationAborted, match="protocol_error") as info:
        _run(toy_sites, tmp_path, secure=False, required=True, retries=0)
    assert "payload" not in str(info.value)
    from flwr.app import ConfigRecord

    from phems_clinical.federation.site_errors import SiteProtocolError

    node = {"site-dir": str(toy_sites[0]), "site-index": 0, "secagg-required": True,
            "state-dir": str(tmp_path / "direct")}
    plain = RecordDict({"config": ConfigRecord({"round": 0, "site-index": 0,
                                                "num-sites": 3})})
    with pytest.raises(SiteProtocolError, match="secagg-required"):
        client_app.site_update(plain, node, {"algorithm": "toy"}, 1)


def test_server_cannot_substitute_a_site_key(toy_sites, tmp_path):
    """A dishonest server puts its own key pair in place of site 2's advertised
    masking/encryption keys (it would then decrypt the shares sent to 2). The
    sites check every entry against the identity roster of their node config and
    refuse, so the round cannot complete."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    def swap(stage, content):
        if stage != "share_keys":
            return content
        roster = st.from_record(content)
        fake = [X25519PrivateKey.generate().public_key().public_bytes_raw()
                for _ in range(2)]
        roster["site0002"] = roster["site0002"]._replace(mask_pk=fake[0],
                                                         enc_pk=fake[1])
        head = content["config"]
        return st.to_record(roster, st.header("share_keys", int(head["site-index"]),
                                              int(head["round"]),
                                              int(head[st.ROUND_ID_KEY])))

    with pytest.raises(FederationAborted, match="round 0") as info:
        _run(toy_sites, tmp_path, secure=True, retries=0, tamper=swap)
    assert str(info.value).count("share_keys: failed") == 3
    # the refusing sites dropped their secrets of the round at once
    assert not list(tmp_path.rglob("secagg-*.json"))


# -- SuperLink + SuperNodes as processes --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fed_focei", "fedadam"])
def test_loopback_secagg_equals_in_process_secagg(name, tmp_path):
    """Three SuperNodes on loopback, two rounds with SecAgg, against the
    in-process engine with SecAgg (``secure.secagg_aggregator``) on the same site
    files and seed: equal up to the encoding error."""
    from phems_clinical.federation import engine
    from phems_clinical.federation.flower.launch import run_loopback
    from phems_clinical.federation.pk_sites import n_occasions_all, pad_sites
    from phems_clinical.federation.registry import build_algorithm
    from phems_clinical.federation.secure import secagg_aggregator
    from phems_clinical.pk.library import load_product

    dirs = simulate_sites(jax.random.key(11), tmp_path / "data", 24)
    model = load_product("advate")
    cohorts = [fconfig.read_site_cohort(
        fconfig.site_config({"site-dir": str(d), "site-index": k}), model)
        for k, d in enumerate(dirs)]
    n_occ = n_occasions_all(cohorts)
    algorithm = build_algorithm(name, model, n_sites=3, n_occ=n_occ, options={})
    settings = fconfig.RunSettings(seed=5, rounds=2, num_sites=3, n_occ=n_occ,
                                   algorithm=name, secagg=True)
    cfg = st.secagg_config(settings)
    log: list = []
    ref = engine.run_federated(jax.random.key(5), algorithm, pad_sites(cohorts),
                               max_rounds=2, vectorise=False,
                               aggregator=secagg_aggregator(cfg, log, n_sites=3))
    result = run_loopback(dirs, tmp_path / "out", settings=settings, timeout=900)

    assert result["status"] == "completed" and result["rounds"] == 2
    assert [h["participants"] for h in result["history"]] == [[0, 1, 2]] * 2
    assert result["secure_aggregation"]["threshold"] == cfg.threshold
    server, _, _ = engine.load_checkpoint(tmp_path / "out" / "checkpoint",
                                          algorithm.init_server(jax.random.key(5)),
                                          [])
    gaps = []
    for got, want in zip(jax.tree.leaves(server), jax.tree.leaves(ref.server),
                         strict=True):
        got, want = np.asarray(got, float), np.asarray(want, float)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        gaps.append(float(np.max(np.abs(got - want), initial=0.0)))
    # each node kept its identity key private and left no SecAgg secrets behind
    for d in dirs:
        key = d / fconfig.IDENTITY_FILE
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert not list(d.rglob("secagg-*.json"))
    seconds = [h["seconds"] for h in result["history"]]
    print(f"\n{name} loopback SecAgg: rounds {', '.join(f'{s:.1f}' for s in seconds)}"
          f" s; max |Flower - in-process| {max(gaps):.1e} (bound per summed "
          f"coordinate {log[0].max_error_bound:.1e})")
