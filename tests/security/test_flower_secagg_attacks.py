"""Red team: secure aggregation on the Flower deployment against a curious or
dishonest server (flower.secagg_transport over federation.secagg; Bonawitz et al.,
ACM CCS 2017, IACR ePrint 2017/281).

Each attack runs the real ServerApp loop over an in-memory Grid whose nodes are the
real ClientApp (tests/flower_secagg_grid.py), three simulated hospitals:

* a curious server scans every byte it received for each site's payload: it finds
  all of them in a plain Flower run (the old behaviour) and none, nor their SecAgg
  grid indices, with SecAgg;
* a coordinator that turns SecAgg off in the run config gets no payload from a
  site whose own node config requires SecAgg;
* a server that puts its own key pair in the roster in place of a site's keys is
  refused by every site (signatures checked against the node's identity roster);
* a server that sends a site the same consistency or unmasking request twice (as
  Flower may also run two copies of a message at once) gets one answer: the site's
  state lives on its disk under a lock, and a stage runs once per round.
"""

import pytest

flwr = pytest.importorskip(
    "flwr", reason="the Flower adapter needs flwr>=1.41,<1.42, which is not installed"
)

from flower_secagg_grid import (  # noqa: E402
    make_site_dirs,
    run_grid,
    train_payloads,
    use_toy,
)
from flwr.app import RecordDict  # noqa: E402

from phems_clinical.federation import secagg  # noqa: E402
from phems_clinical.federation.engine import FederationAborted  # noqa: E402
from phems_clinical.federation.flower import client_app  # noqa: E402
from phems_clinical.federation.flower import config as fconfig  # noqa: E402
from phems_clinical.federation.flower import secagg_transport as st  # noqa: E402


@pytest.fixture(scope="module")
def site_dirs(tmp_path_factory):
    return make_site_dirs(tmp_path_factory.mktemp("data"))


@pytest.fixture
def toy_sites(monkeypatch, site_dirs):
    use_toy(monkeypatch)
    return site_dirs


def test_curious_server_reads_payloads_only_without_secagg(toy_sites, tmp_path):
    """The attack: scan everything the server received for each site's round-0
    payload (its float64 words, and its SecAgg grid indices). Both runs share seed
    and start, so the round-0 payloads are the same."""
    _, pgrid = run_grid(toy_sites, tmp_path / "plain", secure=False, required=False)
    _, sgrid = run_grid(toy_sites, tmp_path / "secure", secure=True)
    cfg = st.secagg_config(fconfig.RunSettings(num_sites=3))
    x = train_payloads(pgrid)
    assert sorted(x) == [0, 1, 2] and not train_payloads(sgrid)
    plain_seen, secure_seen = b"".join(pgrid.transcript), b"".join(sgrid.transcript)
    assert len(secure_seen) > len(plain_seen)  # the server did receive messages
    for k, v in x.items():
        words = [v[i : i + 1].tobytes() for i in range(v.size)]
        q = secagg.encode(st.encoding_key(3, 3, k, 0), v, cfg).q
        assert all(w in plain_seen for w in words)  # old behaviour: in clear
        assert not any(w in secure_seen for w in words), f"site {k}'s payload"
        assert not any(q[i : i + 1].tobytes() in secure_seen for i in range(q.size))


def test_site_requiring_secagg_refuses_a_plain_round(toy_sites, tmp_path):
    """A coordinator that turns SecAgg off in the run config gets no payload from
    a site whose own node config requires it: fail closed, before computing."""
    with pytest.raises(FederationAborted, match="protocol_error") as info:
        run_grid(toy_sites, tmp_path, secure=False, required=True, retries=0)
    assert "payload" not in str(info.value)
    from flwr.app import ConfigRecord

    from phems_clinical.federation.site_errors import SiteProtocolError

    node = {
        "site-dir": str(toy_sites[0]),
        "site-index": 0,
        "secagg-required": True,
        "state-dir": str(tmp_path / "direct"),
    }
    plain = RecordDict(
        {"config": ConfigRecord({"round": 0, "site-index": 0, "num-sites": 3})}
    )
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
        fake = [
            X25519PrivateKey.generate().public_key().public_bytes_raw()
            for _ in range(2)
        ]
        roster["site0002"] = roster["site0002"]._replace(
            mask_pk=fake[0], enc_pk=fake[1]
        )
        head = content["config"]
        return st.to_record(
            roster,
            st.header(
                "share_keys",
                int(head["site-index"]),
                int(head["round"]),
                int(head[st.ROUND_ID_KEY]),
            ),
        )

    with pytest.raises(FederationAborted, match="round 0") as info:
        run_grid(toy_sites, tmp_path, secure=True, retries=0, tamper=swap)
    assert str(info.value).count("share_keys: failed: protocol_error") == 3
    # the refusing sites dropped their secrets of the round at once
    assert not list(tmp_path.rglob("secagg-*.json"))


def test_replayed_stage_is_answered_once(toy_sites, tmp_path):
    """Site 0 gets round 0's consistency request twice, site 1 the unmasking
    request twice. A second signature (over a survivor set the server could change)
    or a second set of shares would help a server unmask one site; each site
    answers once, drops its secrets, and the round still completes (site 0's input
    is in the sum; the others reveal its self-mask seed)."""
    report, grid = run_grid(
        toy_sites,
        tmp_path,
        secure=True,
        min_sites=2,
        replay={("consistency_check", 0, 0), ("unmasking", 0, 1)},
    )
    assert set(grid.replayed) == {("consistency_check", 0, 0), ("unmasking", 0, 1)}
    for again in grid.replayed.values():
        assert again.has_error()
        assert again.error.reason.startswith("protocol_error ")
    assert report["history"][0]["participants"] == [0, 1, 2]
    assert report["status"] == "completed"
    assert not list(tmp_path.rglob("secagg-*.json"))
