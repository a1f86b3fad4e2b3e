"""Site governance: policy file, enforcement, privacy ledger, audit chain and CLI."""

import argparse
import datetime as dt
import json
import math

import numpy as np
import pytest

from phems_clinical.app.audit import add_audit_parser
from phems_clinical.app.governance import add_governance_parser
from phems_clinical.federation.governance import (
    GENESIS_HASH,
    AuditLogError,
    IntegrityError,
    PolicyError,
    PolicyViolation,
    Request,
    append_entry,
    check_payload,
    check_request,
    create_site_key,
    entry_mac,
    generate_user_key,
    load_policy,
    load_policy_schema,
    load_site_key,
    load_spend,
    log_head,
    parse_request,
    record_spend,
    sign_request,
    summarise_payload,
    verify_log,
    verify_request,
)
from phems_clinical.resources import schemas_dir

EXAMPLE = schemas_dir() / "examples" / "site_policy.example.yaml"
T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def policy():
    return load_policy(EXAMPLE)


def _request(**changes):
    base = Request(
        requester="phems-pk-consortium",
        experiment="haemophilia_fviii",
        algorithm="fed_focei",
        n_patients=35,
        fields=("ofv", "grad"),
        epsilon=1.0,
        rounds=50,
        delta=1.0e-6,
    )
    return base._replace(**changes)


def _policy_dict():
    import yaml

    return yaml.safe_load(EXAMPLE.read_text())


def _errors(source):
    with pytest.raises(PolicyError) as info:
        load_policy(source)
    return {e.field: e.message for e in info.value.errors}


# ------------------------------------------------------------------ policy file


def test_example_policy_loads(policy):
    assert policy.site == "H1" and policy.min_cohort_size == 20
    assert policy.max_rounds == 200 and "grad" in policy.allowed_fields
    users = {u.id: u for u in policy.data_users}
    assert users["phems-pk-consortium"].experiments == ("haemophilia_*",)
    assert users["phems-pk-consortium"].delta_budget == 1.0e-5
    assert users["uni-registry"].require_dp is False
    assert users["uni-registry"].delta_budget is None
    assert len(users["uni-registry"].public_key) == 64
    assert load_policy(_policy_dict()) == policy
    assert load_policy_schema()["$schema"].endswith("2020-12/schema")


@pytest.mark.parametrize(
    "path,value,phrases",
    [
        (("min_cohort_size",), -1, ["whole number >= 1", "got -1"]),
        (("min_cohort_size",), 2.5, ["whole number", "got 2.5"]),
        (("data_users", 0, "epsilon_budget"), 0, ["number > 0", "epsilon", "got 0"]),
        (("data_users", 0, "epsilon_budget"), math.inf, ["finite", "inf"]),
        (("data_users", 0, "delta_budget"), "1e-5", ["number", "write 1.0e-5"]),
        (("data_users", 1, "experiments"), [], ["at least 1", "experiment"]),
        (("allowed_fields",), "ofv", ["a list", "'ofv'"]),
        (("site",), "H 1", ["site identifier", "'H 1'"]),
        (("data_users", 0, "public_key"), "not-a-key", ["Ed25519 public key"]),
    ],
)
def test_schema_errors_name_the_field(path, value, phrases):
    obj = _policy_dict()
    target = obj
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    errors = _errors(obj)
    field = ".".join(str(p) for p in path).replace(".0", "[0]").replace(".1", "[1]")
    assert field in errors, errors
    for phrase in phrases:
        assert phrase in errors[field]


def test_schema_errors_missing_unknown_and_duplicates(tmp_path):
    obj = _policy_dict()
    del obj["min_cohort_size"]
    obj["allowed_feilds"] = obj.pop("allowed_fields")
    del obj["data_users"][0]["public_key"]
    errors = _errors(obj)
    assert "required field missing" in errors["min_cohort_size"]
    assert "required field missing" in errors["data_users[0].public_key"]
    assert "did you mean 'allowed_fields'" in errors["allowed_feilds"]
    obj = _policy_dict()
    obj["data_users"][1]["id"] = obj["data_users"][0]["id"]
    assert "duplicate data user" in _errors(obj)["data_users[1].id"]
    path = tmp_path / "p.yaml"
    path.write_text(EXAMPLE.read_text() + "min_cohort_size: 1\n")
    assert "appears twice" in _errors(path)[""]
    path.write_text("site: [H1\n")
    assert "not valid YAML" in _errors(path)[""]


# ------------------------------------------------------------------ enforcement


def test_allowed_request_passes(policy):
    check_request(policy, _request(), {})
    check_request(
        policy,
        _request(fields=tuple(policy.allowed_fields)),
        {"phems-pk-consortium": 6.9},
        spent_delta={},
    )
    # no DP is fine where the data user does not require it, and spends nothing
    check_request(
        policy,
        _request(
            requester="uni-registry",
            epsilon=None,
            experiment="sepsis_phoenix_validation",
        ),
        {"uni-registry": 2.0},
    )


@pytest.mark.parametrize(
    "changes,spent,field,phrases",
    [
        ({"requester": "acme-pharma"}, {}, "data_users", ["'acme-pharma'", "H1"]),
        (
            {"experiment": "sepsis_v2"},
            {},
            "data_users[0].experiments",
            ["'sepsis_v2'", "haemophilia_*"],
        ),
        ({"n_patients": 12}, {}, "min_cohort_size", ["12 patients", "minimum of 20"]),
        ({"fields": ("ofv", "eta")}, {}, "allowed_fields", ["'eta'", "fed_focei"]),
        ({"rounds": 500}, {}, "max_rounds", ["500 rounds", "at most 200"]),
        ({"epsilon": None}, {}, "data_users[0].require_dp", ["has no DP"]),
        ({"epsilon": math.inf}, {}, "data_users[0].require_dp", ["epsilon = inf"]),
        (
            {"epsilon": 1.5},
            {"phems-pk-consortium": 7.0},
            "data_users[0].epsilon_budget",
            ["spent epsilon = 7", "budget 8", "total 8.5"],
        ),
        ({"delta": 1.0e-5}, {}, "data_users[0].delta_budget", ["delta"]),
    ],
)
def test_each_violation_names_the_policy_field(policy, changes, spent, field, phrases):
    with pytest.raises(PolicyViolation) as info:
        check_request(
            policy,
            _request(**changes),
            spent,
            spent_delta={"phems-pk-consortium": 1.0e-6},
        )
    err = info.value
    assert err.field == field and str(err).startswith(field + ": ")
    for phrase in phrases:
        assert phrase in err.message
    assert isinstance(err, ValueError)


def test_malformed_request_is_a_plain_value_error(policy):
    for bad in ({"epsilon": -1.0}, {"epsilon": math.nan}, {"rounds": 0}):
        with pytest.raises(ValueError) as info:
            check_request(policy, _request(**bad), {})
        assert not isinstance(info.value, PolicyViolation)


def test_payload_fields_checked_before_sending(policy):
    check_payload(policy, {"ofv": 1.0, "grad": np.zeros(3)})
    with pytest.raises(PolicyViolation, match="'etas'"):
        check_payload(policy, {"ofv": 1.0, "etas": np.zeros((35, 2))})


# ------------------------------------------------------------------ site key


@pytest.fixture
def key(tmp_path):
    return create_site_key(tmp_path / "keys" / "site.key")


def test_site_key_is_secret_random_and_private(tmp_path):
    path = tmp_path / "k" / "site.key"
    key = create_site_key(path)
    assert len(key) == 32 and load_site_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert create_site_key(tmp_path / "k2") != key  # from secrets, not a seed
    with pytest.raises(FileExistsError):
        create_site_key(path)
    path.chmod(0o644)
    with pytest.raises(IntegrityError, match="site_key: .*mode 644"):
        load_site_key(path)


# ------------------------------------------------------------------ signed requests


def _signed(private, **changes):
    fields = {
        "requester": "phems-pk-consortium",
        "experiment": "haemophilia_fviii",
        "algorithm": "fed_focei",
        "rounds": 10,
        "now": T0,
    }
    return sign_request(private, **{**fields, **changes})


def test_signed_request_verifies_against_the_policy_key(policy):
    private, public = generate_user_key()
    pol = policy._replace(
        data_users=(
            policy.data_users[0]._replace(public_key=public.hex()),
            *policy.data_users[1:],
        )
    )
    token = _signed(private)
    req = verify_request(pol, token, now=T0 + dt.timedelta(hours=1))
    assert (req.requester, req.experiment, req.algorithm, req.rounds) == (
        "phems-pk-consortium",
        "haemophilia_fviii",
        "fed_focei",
        10,
    )
    assert len(req.nonce) == 32 and req.nonce != parse_request(_signed(private)).nonce
    # another key, an altered field, expiry, a plain string
    other, _ = generate_user_key()
    bad = {
        "another key": (_signed(other), "request.signature"),
        "expired": (token, "request.expires"),
        "plain string": ("phems-pk-consortium", "request"),
    }
    for name, (tok, field) in bad.items():
        now = T0 + dt.timedelta(days=2) if name == "expired" else T0
        with pytest.raises(PolicyViolation) as info:
            verify_request(pol, tok, now=now)
        assert info.value.field == field, name
    altered = parse_request(token)._replace(rounds=1000)
    import base64

    text = json.dumps({**altered.body(), "signature": altered.signature})
    forged = "phems-request-v1." + base64.urlsafe_b64encode(text.encode()).decode()
    with pytest.raises(PolicyViolation, match="request.signature"):
        verify_request(pol, forged, now=T0)
    # the example policy's first user has a key nobody here holds
    with pytest.raises(PolicyViolation, match="request.signature"):
        verify_request(policy, token, now=T0)


# ------------------------------------------------------------------ ledger


def test_spend_ledger_accumulates_and_enforces_budget(policy, tmp_path, key):
    path = tmp_path / "spend.json"
    assert load_spend(path, key=key).epsilon == {}
    user = "phems-pk-consortium"
    for k in range(3):
        record_spend(
            path,
            user,
            2.5,
            key=key,
            delta=1.0e-6,
            experiment="haemophilia_a",
            now=T0 + dt.timedelta(days=k),
        )
    spend = record_spend(path, "uni-registry", 0.5, key=key, now=T0)
    assert spend == load_spend(path, key=key)
    assert spend.epsilon == {user: 7.5, "uni-registry": 0.5}
    assert spend.delta[user] == pytest.approx(3.0e-6)
    assert spend.runs == {user: 3, "uni-registry": 1}
    check_request(policy, _request(epsilon=0.5), spend.epsilon, spent_delta=spend.delta)
    with pytest.raises(PolicyViolation, match="total 8.5"):
        check_request(policy, _request(epsilon=1.0), spend.epsilon)
    # 0.1 + 0.2 != 0.3 in binary: landing on the budget up to rounding is allowed
    tight = policy._replace(
        data_users=(policy.data_users[0]._replace(epsilon_budget=0.3),)
    )
    check_request(tight, _request(epsilon=0.2), {user: 0.1})
    with pytest.raises(ValueError, match="finite"):
        record_spend(path, user, math.inf, key=key)
    obj = json.loads(path.read_text())
    assert obj["records"][0]["time"].startswith("2025-03-01T12:00:00")
    assert obj["generation"] == 4 and len(obj["mac"]) == 64


def test_ledger_record_per_run_is_updated_not_summed(tmp_path, key):
    path = tmp_path / "spend.json"
    for rounds, eps in ((1, 0.4), (2, 0.6), (3, 0.75)):  # composed, not 0.4 * k
        record_spend(path, "u", eps, key=key, run="n1", rounds=rounds)
    record_spend(path, "u", 0.5, key=key, run="n2", rounds=1)
    assert load_spend(path, key=key).epsilon == {"u": 1.25}
    assert load_spend(path, key=key).runs == {"u": 2}


def test_edited_ledger_fails_its_mac(tmp_path, key):
    path = tmp_path / "spend.json"
    record_spend(path, "u", 3.0, key=key)
    obj = json.loads(path.read_text())
    obj["records"][0]["epsilon"] = 0.1
    path.write_text(json.dumps(obj))
    with pytest.raises(IntegrityError, match="privacy_ledger: .*MAC"):
        load_spend(path, key=key)
    with pytest.raises(IntegrityError):
        load_spend(path, key=b"x" * 32)


# ------------------------------------------------------------------ audit log


def _log(tmp_path, key, n=5):
    path = tmp_path / "log" / "audit.jsonl"
    for k in range(1, n + 1):
        payload = {"ofv": np.float64(100.0 / k), "grad": np.full(4, 0.5 * k)}
        append_entry(
            path,
            key=key,
            requester="phems-pk-consortium",
            experiment="haemophilia_fviii",
            round=k,
            recipient="server",
            summary=summarise_payload(payload),
            now=T0 + dt.timedelta(minutes=k),
        )
    return path


def _rewrite(path, lines):
    path.write_text("".join(lines))


def test_audit_chain_appends_and_verifies(tmp_path, key):
    path = _log(tmp_path, key)
    lines = path.read_text().splitlines()
    entries = [json.loads(x) for x in lines]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev_mac"] == GENESIS_HASH
    assert all(
        b["prev_mac"] == a["mac"] for a, b in zip(entries, entries[1:], strict=False)
    )
    assert all(entry_mac(e, key) == e["mac"] for e in entries)
    assert entries[1]["time"] == "2025-03-01T12:02:00.000+00:00"
    assert set(entries[0]["summary"]) == {"grad", "ofv"}
    res = verify_log(path, key=key)
    assert res.ok and res.n_entries == 5 and res.first_bad_seq is None
    assert res.last_mac == entries[-1]["mac"] and log_head(path) == (5, res.last_mac)
    assert verify_log(path, key=key, anchor=f"3:{entries[2]['mac']}").ok  # grew
    assert verify_log(path, key=key, anchor=entries[2]["mac"]).ok
    assert not verify_log(path, key=b"k" * 32).ok  # another site's key


def test_audit_detects_edit_delete_swap_and_truncation(tmp_path, key):
    path = _log(tmp_path, key)
    original = path.read_text().splitlines(keepends=True)
    last = json.loads(original[-1])["mac"]

    edited = list(original)
    entry = json.loads(edited[2])
    entry["round"] = 30
    edited[2] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    _rewrite(path, edited)
    res = verify_log(path, key=key)
    assert not res.ok and res.first_bad_seq == 3 and "MAC" in res.reason

    _rewrite(path, original[:1] + original[2:])  # delete line 2
    res = verify_log(path, key=key)
    assert not res.ok and res.first_bad_seq == 2

    _rewrite(path, [original[i] for i in (0, 3, 2, 1, 4)])  # swap lines 2 and 4
    res = verify_log(path, key=key)
    assert not res.ok and res.first_bad_seq == 2

    _rewrite(path, original[:3] + original[4:5])  # cut in the middle
    assert verify_log(path, key=key).first_bad_seq == 4

    _rewrite(path, original[:3])  # tail cut: only an anchor can tell
    assert verify_log(path, key=key).ok
    res = verify_log(path, key=key, anchor=f"5:{last}")
    assert not res.ok and res.first_bad_seq == 4 and "anchor" in res.reason


def test_unkeyed_log_is_not_trusted(tmp_path, key):
    """A v1 log (SHA-256 chain, no MAC) no longer verifies."""
    import hashlib

    entry = {
        "seq": 1,
        "time": "t",
        "requester": "x",
        "experiment": "y",
        "round": 1,
        "recipient": "s",
        "summary": {},
        "prev_hash": GENESIS_HASH,
    }
    entry["hash"] = hashlib.sha256(
        json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    path = tmp_path / "v1.jsonl"
    path.write_text(json.dumps(entry) + "\n")
    res = verify_log(path, key=key)
    assert not res.ok and res.first_bad_seq == 1 and "no MAC" in res.reason


def test_append_refuses_a_torn_or_forged_log(tmp_path, key):
    path = _log(tmp_path, key, n=2)
    text = path.read_text()
    path.write_text(text + '{"seq": 3, "ti')
    with pytest.raises(AuditLogError, match="interrupted"):
        append_entry(
            path,
            key=key,
            requester="x",
            experiment="y",
            round=1,
            recipient="s",
            summary={},
            now=T0,
        )
    with pytest.raises(AuditLogError, match="line 3 is not JSON"):
        verify_log(path, key=key)
    path.write_text(text.replace('"round":2', '"round":9'))
    with pytest.raises(AuditLogError, match="MAC"):
        append_entry(
            path,
            key=key,
            requester="x",
            experiment="y",
            round=1,
            recipient="s",
            summary={},
            now=T0,
        )
    with pytest.raises(ValueError, match="timezone"):
        append_entry(
            tmp_path / "new.jsonl",
            key=key,
            requester="x",
            experiment="y",
            round=1,
            recipient="s",
            summary={},
            now=dt.datetime(2025, 1, 1),
        )


def test_summary_never_contains_values():
    value = 0.123456789012345
    grad = np.array([[value, 2.0], [3.0, 4.0]])
    s = summarise_payload(
        {"grad": grad, "ofv": np.float32(value), "n": np.int64(987654321)}
    )
    text = json.dumps(s)
    for needle in ("0.123456789", "987654321", "1234567"):
        assert needle not in text
    assert s["grad"]["shape"] == [2, 2] and s["grad"]["dtype"] == "float64"
    assert s["ofv"]["shape"] == [] and s["ofv"]["dtype"] == "float32"
    # the hash identifies the bytes sent, in a fixed (little-endian) byte order
    assert (
        s["grad"]["sha256"]
        == summarise_payload({"grad": grad.astype(">f8")})["grad"]["sha256"]
    )
    assert (
        s["grad"]["sha256"]
        != summarise_payload({"grad": grad + 1e-15})["grad"]["sha256"]
    )
    with pytest.raises(ValueError, match="not a numeric array"):
        summarise_payload({"x": np.array(["a", None], dtype=object)})


# ------------------------------------------------------------------ CLI


def _cli(*argv):
    parser = argparse.ArgumentParser(prog="phems")
    sub = parser.add_subparsers(dest="command", required=True)
    add_audit_parser(sub)
    add_governance_parser(sub)
    args = parser.parse_args(list(map(str, argv)))
    return args.func(args)


def test_cli_verify_and_show(tmp_path, capsys, key):
    path = _log(tmp_path, key)
    kfile = tmp_path / "keys" / "site.key"
    last = json.loads(path.read_text().splitlines()[-1])["mac"]
    assert _cli("audit", "verify", path, "--key", kfile) == 0
    assert capsys.readouterr().out.strip() == f"OK: 5 entries, head 5:{last}"
    assert (
        _cli("audit", "verify", path, "--key", kfile, "--anchor", f"5:{last.upper()}")
        == 0
    )
    capsys.readouterr()
    assert _cli("audit", "show", path) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "seq",
        "time",
        "event",
        "requester",
        "experiment",
        "round",
        "recipient",
        "fields",
    ]
    assert out[3].split()[0] == "3" and out[3].split()[-1] == "grad,ofv"

    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"round":3', '"round":33')
    _rewrite(path, lines)
    assert _cli("audit", "verify", path, "--key", kfile) == 1
    out = capsys.readouterr().out
    assert "entry 3" in out and "line 3:" in out and "intact up to entry 2" in out


def test_cli_bad_input_exits_2(tmp_path, capsys, key):
    kfile = tmp_path / "keys" / "site.key"
    assert _cli("audit", "verify", tmp_path / "missing.jsonl", "--key", kfile) == 2
    assert "no such audit log" in capsys.readouterr().err
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    assert _cli("audit", "verify", path, "--key", kfile) == 2
    assert _cli("audit", "show", path) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err
    assert (
        _cli("audit", "verify", _log(tmp_path, key), "--key", kfile, "--anchor", "abc")
        == 2
    )
    assert "SEQ:MAC" in capsys.readouterr().err
    assert _cli("audit", "verify", path, "--key", tmp_path / "nokey") == 2
    assert "no such key file" in capsys.readouterr().err


def test_cli_keygen_sign_request_and_site_key(tmp_path, capsys, policy):
    kfile = tmp_path / "user.key"
    assert _cli("governance", "keygen", "--out", kfile) == 0
    public = capsys.readouterr().out.split("public_key: ")[1].strip()
    assert kfile.stat().st_mode & 0o777 == 0o600
    assert _cli("governance", "keygen", "--out", kfile) == 2  # never overwritten
    capsys.readouterr()
    assert (
        _cli(
            "governance",
            "sign-request",
            "--key",
            kfile,
            "--requester",
            "phems-pk-consortium",
            "--experiment",
            "haemophilia_x",
            "--algorithm",
            "fedavg",
            "--rounds",
            5,
        )
        == 0
    )
    token = capsys.readouterr().out.strip()
    pol = policy._replace(
        data_users=(policy.data_users[0]._replace(public_key=public),)
    )
    req = verify_request(pol, token)
    assert (req.experiment, req.algorithm, req.rounds) == ("haemophilia_x", "fedavg", 5)
    assert _cli("governance", "site-key", tmp_path / "s" / "site.key") == 0
    assert len(load_site_key(tmp_path / "s" / "site.key")) == 32
