"""Secure aggregation on the Flower deployment (flower.secagg_transport).

* every SecAgg stage message crosses Flower's wire format unchanged, and a
  malformed one is refused; node-local secrets are owner-only files;
* the ServerApp loop over an in-memory Grid whose nodes are the real ClientApp
  (its ``query``, ``train`` and ``train.secagg`` handlers, tests/flower_secagg_grid.py):
  the SecAgg sum equals the plain sum to the encoding error, with dropouts before
  and after masking; too few survivors abort the round; secrets are 0600 on the
  node and gone after the round;
* slow: SuperLink + 3 SuperNodes on loopback, federated FOCEI and FedAdam with
  SecAgg, against the in-process engine with SecAgg.

The attacks (a curious server reading payloads, a coordinator turning SecAgg off,
a server substituting a site's keys) are in tests/security/
test_flower_secagg_attacks.py.
"""

import stat

import jax
import numpy as np
import pytest

flwr = pytest.importorskip(
    "flwr", reason="the Flower adapter needs flwr>=1.41,<1.42, which is not installed"
)

from flower_secagg_grid import (  # noqa: E402
    make_site_dirs,
    over_the_wire,
    run_grid,
    use_toy,
)

from phems_clinical.federation import secagg  # noqa: E402
from phems_clinical.federation.engine import FederationAborted  # noqa: E402
from phems_clinical.federation.flower import config as fconfig  # noqa: E402
from phems_clinical.federation.flower import secagg_transport as st  # noqa: E402
from phems_clinical.federation.flower.launch import simulate_sites  # noqa: E402
from phems_clinical.federation.messages import MessageRejected  # noqa: E402

# -- the codec ---------------------------------------------------------------------


def test_codec_round_trip_and_refusals():
    obj = {
        "roster": {"b": secagg.SecAggConfig(1.5, 12, 2), "a": None},
        "y": np.arange(5, dtype=np.uint64) * np.uint64(2**61),
        "ids": ("site0001", "site0000"),
        "box": b"\x00\xff" * 40,
        "big": 2**64 - 1,
        "neg": -3,
        "flag": True,
        "empty": {},
        "none": (),
    }
    back = st.from_record(over_the_wire(st.to_record(obj, st.header("x", 0, 1, 2))))
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
    path = st.save_private(
        tmp_path / "s" / "secagg-1.json",
        {"k": b"\x01" * 32, "x": np.array([1.5, -2.0])},
    )
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


@pytest.fixture(scope="module")
def site_dirs(tmp_path_factory):
    return make_site_dirs(tmp_path_factory.mktemp("data"))


@pytest.fixture
def toy_sites(monkeypatch, site_dirs):
    use_toy(monkeypatch)
    return site_dirs


def test_secagg_round_equals_plain_sum(toy_sites, tmp_path):
    plain, _ = run_grid(toy_sites, tmp_path / "plain", secure=False, required=False)
    secure, sgrid = run_grid(toy_sites, tmp_path / "secure", secure=True)
    cfg = st.secagg_config(fconfig.RunSettings(num_sites=3))
    bound = 3 * secagg.grid_step(cfg)
    assert secure["secure_aggregation"]["max_error_bound"] == pytest.approx(bound)
    # equal to the plain run up to the encoding error (2 rounds, w ~ 1e2)
    np.testing.assert_allclose(
        secure["result"]["w"], plain["result"]["w"], rtol=0, atol=1e-6
    )
    assert secure["result"]["w"] != plain["result"]["w"]  # but it was encoded
    assert [h["participants"] for h in secure["history"]] == [[0, 1, 2]] * 2
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
    secure, _ = run_grid(
        toy_sites,
        tmp_path / "secure",
        secure=True,
        min_sites=2,
        drop={("unmasking", 0, 1), ("masked_input", 1, 2)},
    )
    plain, _ = run_grid(
        toy_sites,
        tmp_path / "plain",
        secure=False,
        required=False,
        fail={2: "1"},
        min_sites=2,
    )
    assert [h["participants"] for h in secure["history"]] == [[0, 1, 2], [0, 1]]
    assert [h["participants"] for h in plain["history"]] == [[0, 1, 2], [0, 1]]
    assert secure["history"][0]["dropped"] == []
    [(k, why)] = secure["history"][1]["dropped"]
    assert k == 2 and why.startswith("masked_input: timeout")
    np.testing.assert_allclose(
        secure["result"]["w"], plain["result"]["w"], rtol=0, atol=1e-6
    )


def test_too_few_survivors_abort_the_round(toy_sites, tmp_path):
    with pytest.raises(FederationAborted, match="round 0") as info:
        run_grid(
            toy_sites,
            tmp_path,
            secure=True,
            retries=1,
            min_sites=2,
            drop={("masked_input", 0, 1), ("masked_input", 0, 2)},
        )
    assert "secure aggregation failed" in str(info.value)
    assert "fewer than threshold=2" in str(info.value)


@pytest.mark.parametrize("secure", [False, True])
def test_governed_sites_leave_the_coordinator_anchors(secure, toy_sites, tmp_path):
    """Sites with a policy, a signed request and their MAC keys outside their
    folders: the run completes (with and without SecAgg), every reply carries the
    site's audit-log head, and the heads the server kept in ``audit_anchors``
    verify each site's log -- and detect an entry cut from its end."""
    import json
    import shutil

    from phems_clinical.federation import governance as gov

    private, public = gov.generate_user_key()
    dirs, keys = [], []
    for k, d in enumerate(toy_sites):
        dirs.append(shutil.copytree(d, tmp_path / "data" / d.name))
        (dirs[-1] / fconfig.POLICY_FILE).write_text(
            json.dumps(
                {
                    "site": f"H{k}",
                    "min_cohort_size": 5,
                    "allowed_fields": ["delta", "weight"],
                    "max_rounds": 4,
                    "data_users": [
                        {
                            "id": "pk-consortium",
                            "epsilon_budget": 10.0,
                            "require_dp": False,
                            "experiments": ["haemophilia_*"],
                            "public_key": public.hex(),
                        }
                    ],
                }
            )
        )
        keys.append(tmp_path / "site_keys" / f"site_{k}.key")
    request = gov.sign_request(
        private,
        requester="pk-consortium",
        experiment="haemophilia_fviii",
        algorithm="fedavg",
        rounds=2,
    )
    out, _ = run_grid(
        dirs,
        tmp_path / "run",
        secure=secure,
        required=secure,
        site_keys=keys,
        request=request,
    )
    assert out["status"] == "completed" and out["rounds"] == 2
    anchors = out["audit_anchors"]
    assert sorted(anchors) == ["0", "1", "2"]
    for k, d in enumerate(dirs):
        log, key = d / "audit.jsonl", gov.load_site_key(keys[k])
        seq, head = anchors[str(k)]["seq"], anchors[str(k)]["head"]
        assert (seq, head) == gov.log_head(log, key=key)  # the latest head
        assert gov.verify_log(log, key=key, anchor=f"{seq}:{head}").ok
        lines = log.read_text().splitlines(keepends=True)
        log.write_text("".join(lines[:-1]))  # the site's log loses its last entry
        assert gov.verify_log(log, key=key).ok  # the chain alone cannot tell
        cut = gov.verify_log(log, key=key, anchor=f"{seq}:{head}")
        assert not cut.ok and cut.first_bad_seq == seq


# -- SuperLink + SuperNodes as processes --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fed_focei", "fedadam"])
def test_loopback_secagg_equals_in_process_secagg(name, tmp_path):
    """Three SuperNodes on loopback (TLS, node authentication), one round with
    SecAgg, against the in-process engine with SecAgg
    (``secure.secagg_aggregator``) on the same site files and seed: equal up to
    the encoding error. One round, because each of its five stage exchanges
    starts a ClientApp process per site (about 60 s a round here); state carried
    across SecAgg rounds is tested over the in-memory Grid above."""
    from phems_clinical.federation import engine
    from phems_clinical.federation.flower.launch import run_loopback
    from phems_clinical.federation.pk_sites import n_occasions_all, pad_sites
    from phems_clinical.federation.registry import build_algorithm
    from phems_clinical.federation.secure import secagg_aggregator
    from phems_clinical.pk.library import load_product

    dirs = simulate_sites(jax.random.key(11), tmp_path / "data", 24)
    model = load_product("advate")
    cohorts = [
        fconfig.read_site_cohort(
            fconfig.site_config({"site-dir": str(d), "site-index": k}), model
        )
        for k, d in enumerate(dirs)
    ]
    n_occ = n_occasions_all(cohorts)
    algorithm = build_algorithm(name, model, n_sites=3, n_occ=n_occ, options={})
    settings = fconfig.RunSettings(
        seed=5, rounds=1, num_sites=3, n_occ=n_occ, algorithm=name, secagg=True
    )
    cfg = st.secagg_config(settings)
    log: list = []
    ref = engine.run_federated(
        jax.random.key(5),
        algorithm,
        pad_sites(cohorts),
        max_rounds=1,
        vectorise=False,
        aggregator=secagg_aggregator(cfg, log, n_sites=3),
    )
    result = run_loopback(dirs, tmp_path / "out", settings=settings, timeout=900)

    assert result["status"] == "completed" and result["rounds"] == 1
    assert [h["participants"] for h in result["history"]] == [[0, 1, 2]]
    assert result["secure_aggregation"]["threshold"] == cfg.threshold
    server, _, _ = engine.load_checkpoint(
        tmp_path / "out" / "checkpoint", algorithm.init_server(jax.random.key(5)), []
    )
    gaps = []
    for got, want in zip(
        jax.tree.leaves(server), jax.tree.leaves(ref.server), strict=True
    ):
        got, want = np.asarray(got, float), np.asarray(want, float)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        gaps.append(float(np.max(np.abs(got - want), initial=0.0)))
    # each node kept its identity key private and left no SecAgg secrets behind
    for d in dirs:
        key = d / fconfig.IDENTITY_FILE
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert not list(d.rglob("secagg-*.json"))
    seconds = [h["seconds"] for h in result["history"]]
    print(
        f"\n{name} loopback SecAgg: rounds {', '.join(f'{s:.1f}' for s in seconds)}"
        f" s; max |Flower - in-process| {max(gaps):.1e} (bound per summed "
        f"coordinate {log[0].max_error_bound:.1e})"
    )


def test_runner_applies_secagg_on_flower(monkeypatch, tmp_path):
    """``federation.secagg`` with ``engine: flower`` reaches the Flower run config
    (it used to be recorded as on without being applied)."""
    import pandas as pd

    from phems_clinical import usecases
    from phems_clinical.federation.flower import launch
    from phems_clinical.pk.library import load_product
    from phems_clinical.runner.training import FederationSettings, train_flower

    seen = {}

    def stop(dirs, out, *, settings):
        seen["settings"] = settings
        raise RuntimeError("stopped before any process starts")

    monkeypatch.setattr(launch, "run_loopback", stop)
    frames = [pd.DataFrame({"ID": [k], "TIME": [0.0]}) for k in range(3)]
    for secure in (True, False):
        with pytest.raises(RuntimeError, match="stopped"):
            train_flower(
                usecases.get("haemophilia").task,
                None,
                1,
                frames,
                "fed_focei",
                load_product("advate"),
                FederationSettings("flower", "fed_focei", {}, secure),
                tmp_path / str(secure),
            )
        assert seen["settings"].secagg is secure
