"""Red team: patient-level text in the errors a site sends.

The attack: a site's cohort holds one bad record (patient ``MRN-0049001``, a
negative factor level) in a folder named after the hospital. Its validator's
error names the row, the ID, the value and the file path; before the fix Flower
sent that text to the server as the error reply's reason and the ServerApp wrote it
to ``result.json``. Each test below first shows what the old path leaked (so it can
fail), then that only ``category reference`` leaves the site now, while the site's
own log keeps the full text under that reference.
"""

import inspect
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pandas as pd
import pytest

from phems_clinical.data.nonmem import read_nonmem
from phems_clinical.federation import engine
from phems_clinical.federation import site_errors as se
from phems_clinical.federation.core import Algorithm
from phems_clinical.federation.dp import PrivacyBudgetExceeded
from phems_clinical.federation.flower import launch
from phems_clinical.federation.governance import PolicyViolation
from phems_clinical.federation.messages import MessageRejected

HOSPITAL = "Kinderklinik_Sonnenberg"
BAD_ID = "MRN-0049001"
REASON = re.compile(
    r"(invalid_data|policy_refused|budget_exceeded|protocol_error|"
    r"internal_error|injected_failure) [0-9a-f]{12}"
)


def _bad_site(root: Path, k: int = 1) -> tuple[list[Path], list[str]]:
    """Three simulated hospitals (24 patients); site ``k`` is moved into a folder
    named after its hospital, its patients get MRN-style IDs and its row 5 a
    negative level. Returns the site folders and strings that must not leave it."""
    sites = launch.simulate_sites(jax.random.key(11), root / "data", 24)
    bad = root / "data" / HOSPITAL / "site_1"
    bad.parent.mkdir()
    sites[k] = sites[k].rename(bad)
    table = pd.read_csv(bad / "cohort.csv")
    ids = {i: f"MRN-00{49000 + n}" for n, i in enumerate(table["ID"].unique(), 1)}
    table["ID"] = table["ID"].map(ids)
    levels = table["DV"].dropna()
    secrets_ = [
        HOSPITAL,
        "MRN-00490",
        "negative level",
        "-3 IU/dL",
        *(f"{v:.4f}" for v in levels.iloc[1:4]),
    ]
    table.loc[4, "DV"] = -3.0
    table.to_csv(bad / "cohort.csv", index=False, float_format="%.17g")
    assert table.loc[4, "ID"] == BAD_ID
    return sites, secrets_


def _leaks(text: str, secrets_: list[str]) -> list[str]:
    return [s for s in secrets_ if s in text]


@pytest.fixture
def bad_site(tmp_path):
    """The bad hospital's folder alone, written by hand (no simulation): two
    patients, row 5 (``MRN-0049001``) with a negative level."""
    site = tmp_path / "data" / HOSPITAL / "site_1"
    site.mkdir(parents=True)
    rows = [
        ("MRN-0049000", 0.0, 2500, "", 1, 1),
        ("MRN-0049000", 0.5, 0, 152.1116, 0, 0),
        ("MRN-0049000", 24.0, 0, 13.3213, 0, 0),
        ("MRN-0049001", 0.0, 1500, "", 1, 1),
        ("MRN-0049001", 0.5, 0, -3, 0, 0),
        ("MRN-0049001", 24.0, 0, 9.8123, 0, 0),
    ]
    (site / "cohort.csv").write_text(
        "ID,TIME,AMT,DV,MDV,EVID,AGE,WT\n"
        + "".join(f"{i},{t},{a},{dv},{m},{e},9.5,31.2\n" for i, t, a, dv, m, e in rows)
    )
    secrets_ = [
        HOSPITAL,
        "MRN-00490",
        "negative level",
        "-3 IU/dL",
        "152.1116",
        "13.3213",
        "9.8123",
    ]
    return [None, site, None], secrets_


def test_a_bad_record_leaves_only_category_and_reference(bad_site, tmp_path):
    sites, secrets_ = bad_site
    with pytest.raises(ValueError) as info:
        read_nonmem(sites[1] / "cohort.csv")
    leaked = _leaks(str(info.value), secrets_)
    assert BAD_ID in str(info.value) and len(leaked) >= 3  # what used to be sent
    log = tmp_path / "state" / se.LOG_FILE
    error = se.record_site_error(info.value, log, stage="query", context={"round": 0})
    assert REASON.fullmatch(error.reason) and error.category == "invalid_data"
    assert _leaks(error.reason, secrets_) == []
    entry = se.read_site_log(log, error.reference)
    assert BAD_ID in entry["message"] and str(sites[1]) in entry["message"]
    assert "Traceback" in entry["traceback"] and entry["round"] == 0
    assert log.stat().st_mode & 0o777 == 0o600
    # References come from the CSPRNG: never repeated, never from a seed.
    assert len({se.new_reference() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "err, category",
    [
        (PolicyViolation("min_cohort_size", "8 patients < 20"), "policy_refused"),
        (PrivacyBudgetExceeded("epsilon 3.2 > 1.0"), "budget_exceeded"),
        (MessageRejected("fed_focei payload grad: shape (2,)"), "protocol_error"),
        (se.SiteProtocolError("message for site 2"), "protocol_error"),
        (se.InjectedFailure("round 1"), "injected_failure"),
        (FileNotFoundError("/hospital/cohort.csv"), "invalid_data"),
        (ZeroDivisionError("MRN-0049001"), "internal_error"),
    ],
)
def test_categories(err, category):
    assert se.category_of(err) == category


@pytest.mark.parametrize(
    "text",
    [
        "invalid_data 0123456789ab: row 5 (ID MRN-0049001)",
        "invalid_data 0123456789a",
        "invalid_data 0123456789AB",
        "row 5 (ID MRN-0049001)",
        "Invalid_data 0123456789ab",
        "data_error 0123456789ab",
        None,
        7,
    ],
)
def test_server_accepts_nothing_but_category_and_reference(text):
    assert se.parse_reason(text) is None
    assert se.parse_reason("policy_refused 0123456789ab") == se.SiteError(
        "policy_refused", "0123456789ab"
    )


def test_clientapp_reply_holds_no_patient_text(bad_site, monkeypatch):
    """The ClientApp's ``query`` handler on the bad site: Flower 1.41's own error
    path (``flwr.supernode.runtime.run_clientapp``) would have sent the
    exception's text; the guarded handler sends ``category reference``."""
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from phems_clinical.federation.flower import client_app

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    sites, secrets_ = bad_site
    msg = Message(
        RecordDict({"config": ConfigRecord({"num-sites": 3})}),
        dst_node_id=1,
        message_type=MessageType.QUERY,
    )
    msg.metadata.__dict__["_message_id"] = "query-1"
    node = {"site-dir": str(sites[1]), "site-index": 1, "num-sites": 3}
    context = Context(
        run_id=1,
        node_id=1,
        node_config=node,
        state=RecordDict(),
        run_config={"num-sites": 3},
    )
    with pytest.raises(Exception) as info:  # the handler as it was, unguarded
        client_app.query.__wrapped__(msg, context)
    flower_reason = str(type(info.value)) + ":<'" + str(info.value) + "'>"
    assert len(_leaks(flower_reason, secrets_)) >= 3

    reply = client_app.query(msg, context)
    assert reply.has_error() and REASON.fullmatch(reply.error.reason)
    assert _leaks(reply.error.reason, secrets_) == []
    error = se.parse_reason(reply.error.reason)
    assert error.category == "invalid_data"
    entry = se.read_site_log(client_app.site_error_log(node), error.reference)
    assert BAD_ID in entry["message"] and entry["stage"] == "query"


def _leaky_algorithm() -> Algorithm:
    """A weighted mean whose update fails, quoting a patient, on a site whose data
    carry a ``bad`` entry (as a validator inside ``local_update`` would)."""

    def local_update(message, data, state, key):
        del key
        if "bad" in data:
            raise ValueError(
                f"patient {BAD_ID}: level -3 IU/dL at /data/{HOSPITAL}/cohort.csv"
            )
        return (
            {"delta": data["n"] * (data["x"] - message["w"]), "weight": data["n"]},
            state,
            {},
        )

    return Algorithm(
        "fedavg",
        lambda key: {"w": jnp.zeros(2)},
        lambda data: jnp.zeros(()),
        lambda s: {"w": s["w"]},
        local_update,
        lambda s, total, key: {"w": s["w"] + total["delta"] / total["weight"]},
        lambda s: False,
        lambda s: {"w": s["w"]},
        {"delta": (2,), "weight": ()},
        max_rounds=2,
    )


def test_engine_records_category_and_reference(caplog):
    """The in-process engine: the dropped reason is ``failed: category ref``;
    the simulated site's log (``phems_clinical.site``) has the full text."""
    sites = [
        {"n": jnp.asarray(2.0), "x": jnp.ones(2)},
        {"n": jnp.asarray(3.0), "x": jnp.zeros(2), "bad": jnp.zeros(())},
        {"n": jnp.asarray(1.0), "x": -jnp.ones(2)},
    ]
    with caplog.at_level(logging.ERROR, logger="phems_clinical.site"):
        run = engine.run_federated(
            jax.random.key(0), _leaky_algorithm(), sites, min_sites=2, vectorise=False
        )
    reasons = [why for h in run.history for _, why in h.dropped]
    assert len(reasons) == 2
    for why in reasons:
        error = se.parse_reason(why.removeprefix("failed: "))
        assert why.startswith("failed: ") and error.category == "internal_error"
        assert error.reference in caplog.text
    assert BAD_ID not in repr(run.history) and BAD_ID in caplog.text


def test_launcher_is_secure_by_default(tmp_path):
    """No ``--insecure`` on any command line the launcher builds unless asked."""
    defaults = inspect.signature(launch.run_loopback).parameters
    assert defaults["tls"].default is True and defaults["node_auth"].default is True
    args = launch._parser().parse_args(["--data", "d", "--out", "o"])
    assert args.insecure is False
    certs = launch.make_tls(tmp_path / "certs")
    link = launch.superlink_command("127.0.0.1", 9091, certs, True)
    node = launch.supernode_command(
        "127.0.0.1:9091",
        "127.0.0.1",
        9094,
        {"site-dir": "s", "site-index": 0},
        certs,
        tmp_path / "keys" / "site_0",
    )
    assert "--insecure" not in link + node
    assert "--enable-supernode-auth" in link
    assert link[link.index("--ssl-ca-certfile") + 1] == str(certs.ca_cert)
    assert node[node.index("--root-certificates") + 1] == str(certs.ca_cert)
    assert "--auth-supernode-private-key" in node
    assert "--allow-runtime-dependency-installation" not in link + node
    cfg = launch.write_connection(tmp_path / "home", "127.0.0.1:9091", certs)
    assert "insecure" not in cfg.read_text() and str(certs.ca_cert) in cfg.read_text()
    # Only an explicit request gives plaintext; a half-secure mix is refused.
    assert "--insecure" in launch.superlink_command("127.0.0.1", 9091, None, False)
    with pytest.raises(ValueError, match="node_auth"):
        launch.superlink_command("127.0.0.1", 9091, None, True)
    with pytest.raises(ValueError, match="node_auth"):
        launch.run_loopback([tmp_path], tmp_path / "out", tls=False)
    assert (
        launch.main(
            [
                "--data",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--insecure",
                "--node-auth",
            ]
        )
        == 2
    )


def test_launcher_refuses_an_unreadable_request_before_starting(tmp_path, capsys):
    """A missing signed-request file: exit 2 naming the option, nothing started
    (no output folder) and the path not echoed."""
    missing = tmp_path / "Kinderklinik_request.txt"
    assert (
        launch.main(
            [
                "--data",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--request",
                str(missing),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--request" in err and "Kinderklinik" not in err
    assert not (tmp_path / "o").exists()


def _server_side_text(out: Path) -> str:
    """Everything the server side of a loopback run wrote: result, checkpoint,
    run config, the SuperLink's and the ServerApp's logs and homes (not the
    SuperNodes' logs, homes and keys: those are the hospitals')."""
    texts = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or rel.startswith(("nodes/", "keys/", "logs/supernode")):
            continue
        texts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(texts)


@pytest.mark.slow
def test_loopback_server_stores_no_site_error_text(tmp_path):
    """A real Flower run on loopback (TLS and SuperNode authentication, the
    default): the bad site fails in the query round, another site in training
    round 1 (injected); the run completes with the others, and nothing the server
    wrote holds the bad site's IDs, values or path."""
    from phems_clinical.federation.flower.client_app import site_error_log
    from phems_clinical.federation.flower.config import RunSettings

    sites, secrets_ = _bad_site(tmp_path)
    settings = RunSettings(seed=5, rounds=2, min_sites=1, round_timeout=240.0)
    out = tmp_path / "out"
    result = launch.run_loopback(
        sites, out, settings=settings, fail_rounds={2: [1]}, timeout=900
    )
    assert result["status"] == "completed" and result["rounds"] == 2
    assert result["launch"]["tls"] and result["launch"]["node_auth"]
    assert result["launch"]["left_running"] == []
    why = result["query_problems"]
    assert list(why.values()) and all(
        v.startswith("failed: ") and REASON.fullmatch(v.removeprefix("failed: "))
        for v in why.values()
    )
    error = se.parse_reason(next(iter(why.values())).removeprefix("failed: "))
    assert error.category == "invalid_data"
    entry = se.read_site_log(
        site_error_log({"site-dir": str(sites[1]), "site-index": 1}), error.reference
    )
    assert BAD_ID in entry["message"]
    dropped = [d for h in result["history"] for d in h["dropped"]]
    assert [1, "failed: did not answer the query round"] in dropped
    injected = [
        se.parse_reason(w.removeprefix("failed: ")) for k, w in dropped if k == 2
    ]
    assert [e.category for e in injected] == ["injected_failure"]
    text = _server_side_text(out)
    assert '"query_problems"' in text  # the result file was read
    assert _leaks(text, secrets_) == [], _leaks(text, secrets_)
    assert str(sites[1]) not in text and "DataValidationError" not in text
