"""Red team: whoever can write a site's files (an insider, or malware on the node)
against its audit log and privacy ledger.

Before commit 8e5a754 the audit log was an unkeyed SHA-256 chain with an
optional manual anchor, and the ε ledger plain JSON: an edited and re-chained log
verified with exit 0, and deleting the ledger reset every data user's budget.
:func:`_old_verify` reproduces that verification here, so each attack is shown to
work against it before it is shown to fail now.
"""

import hashlib
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from phems_clinical.app.cli import main
from phems_clinical.federation import dp as dpm
from phems_clinical.federation import gate as gt
from phems_clinical.federation import governance as gov
from phems_clinical.federation.dp import DPConfig

USER = "pk-consortium"
DP = DPConfig(clip=1.0, noise_multiplier=1.0, delta=1e-3)
N = 40


class _Alg(NamedTuple):
    """What the gate reads of an algorithm."""

    name: str = "fedavg"
    message_spec: dict = {"delta": (2,), "weight": ()}
    dp: DPConfig | None = DP
    dp_steps_per_round: int = 1


def _old_hash(entry):
    """The old link: SHA-256 of the canonical entry without its link field."""
    return hashlib.sha256(
        json.dumps(
            {k: v for k, v in entry.items() if k != "mac"},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    ).hexdigest()


def _old_verify(path) -> bool:
    """The unkeyed chain check of 8e5a754 (seq, previous link, link = SHA-256 of
    the content), applied to this log's link fields."""
    prev = gov.GENESIS_HASH
    for n, e in enumerate(gov.read_log(path), start=1):
        if e["seq"] != n or e["prev_mac"] != prev or e["mac"] != _old_hash(e):
            return False
        prev = e["mac"]
    return True


def _rechain_without_key(path, edit, *, whole=True):
    """The attacker edits entries and re-chains the log, recomputing every link
    it can: without the site key, the keyless hash (all the old format needed);
    ``whole=False`` rewrites only from the first edited entry on."""
    entries = gov.read_log(path)
    prev, touched = gov.GENESIS_HASH, False
    for e in entries:
        before = json.dumps(e, sort_keys=True)
        edit(e)
        touched = touched or json.dumps(e, sort_keys=True) != before
        if touched or whole:
            e["prev_mac"] = prev
            e["mac"] = _old_hash(e)
        prev = e["mac"]
    path.write_text(
        "".join(
            json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries
        )
    )


@pytest.fixture
def site(tmp_path):
    private, public = gov.generate_user_key()
    policy = gov.load_policy(
        {
            "site": "H0",
            "min_cohort_size": 5,
            "allowed_fields": ["delta", "weight"],
            "max_rounds": 20,
            "data_users": [
                {
                    "id": USER,
                    "epsilon_budget": 3.0 * dpm.epsilon(DP, N, 2),
                    "experiments": ["haemophilia_*"],
                    "public_key": public.hex(),
                }
            ],
        }
    )

    def gate(run_id=""):
        request = gov.sign_request(
            private,
            requester=USER,
            experiment="haemophilia_fviii",
            algorithm="fedavg",
            rounds=10,
        )
        return gt.SiteGate(
            policy,
            tmp_path / "site" / "audit.jsonl",
            tmp_path / "site" / "ledger.json",
            request,
            tmp_path / "keys" / "site.key",
            tmp_path / "site" / "admissions",
            run_id,
        )

    return gate


def _run(gate, rounds):
    """A run at the site: admitted, ``rounds`` payloads released; returns the
    heads the coordinator received with each message."""
    gt.admit(gate, _Alg(), N, rounds)
    heads = []
    for r in range(rounds):
        entry = gt.release(
            gate,
            {"delta": np.full(2, r + 0.5), "weight": 40.0},
            r,
            algorithm=_Alg(),
            n_patients=N,
        )
        heads.append(f"{entry['seq']}:{entry['mac']}")
    gt.settle(gate)
    return heads


def test_edited_and_rechained_log_fails_with_the_key(site, tmp_path, capsys):
    """The attacker lowers a charge's ε and re-chains. The old check accepted
    the result; the MAC check under the site key names the first edited entry
    and ``phems audit verify --key`` exits 1."""
    gate = site()
    _run(gate, 2)
    log, key_file = gate.audit_log, gate.site_key

    def edit(e):
        if e["charge"]:
            e["charge"]["epsilon"] = 0.01

    original = Path(log).read_text()
    _rechain_without_key(log, edit)
    assert _old_verify(log)  # the attack worked before
    key = gov.load_site_key(key_file)
    res = gov.verify_log(log, key=key)
    assert not res.ok and res.first_bad_seq == 1 and "MAC" in res.reason
    Path(log).write_text(original)
    _rechain_without_key(log, edit, whole=False)  # entry 1 left as it was
    res = gov.verify_log(log, key=key)
    assert not res.ok and res.first_bad_seq == 2 and "MAC" in res.reason
    assert main(["audit", "verify", str(log), "--key", str(key_file)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "line 2:" in out
    # and the site itself refuses to run on the tampered records
    with pytest.raises(gov.IntegrityError) as info:
        gt.admit(site(), _Alg(), N, 2)
    assert info.value.field == "audit_log"


def test_key_is_kept_outside_the_log_folder(site, tmp_path):
    gate = site()._replace(site_key=tmp_path / "site" / "keys" / "k")
    with pytest.raises(gov.IntegrityError, match="outside the folder"):
        gt.admit(gate, _Alg(), N, 2)


def test_deleted_ledger_is_detected(site):
    """Deleting the ledger. Before: ``load_spend`` of a missing file is {}, so the
    data user's whole budget was available again (here a third run of 2 rounds
    fits a budget of 3 runs only because the first two were forgotten). Now the
    log's charges name the ledger generation and the site refuses to run."""
    gate = site()
    _run(gate, 2)
    _run(site(), 2)
    gate.ledger.unlink()
    spent_old = {}  # what the old site read from the missing file
    gov.check_request(
        gate.policy,
        gov.Request(
            USER,
            "haemophilia_fviii",
            "fedavg",
            N,
            ("delta",),
            3 * dpm.epsilon(DP, N, 2),
            6,
        ),
        spent_old,
    )  # the attack worked before
    with pytest.raises(gov.IntegrityError) as info:
        gt.admit(site(), _Alg(), N, 2)
    assert info.value.field == "privacy_ledger" and "missing" in str(info.value)


def test_rolled_back_ledger_is_detected(site, tmp_path):
    """Restoring an older copy of the ledger (a valid MAC, but stale): refused,
    as the log's last charge names a later generation."""
    gate = site()
    _run(gate, 1)
    shutil.copy(gate.ledger, tmp_path / "old.json")
    spent = gov.load_spend(gate.ledger, key=gov.load_site_key(gate.site_key))
    _run(site(), 2)
    shutil.copy(tmp_path / "old.json", gate.ledger)
    # the old copy still carries a valid MAC: only the log can tell
    assert gov.load_spend(gate.ledger, key=gov.load_site_key(gate.site_key)) == spent
    with pytest.raises(gov.IntegrityError) as info:
        gt.admit(site(), _Alg(), N, 2)
    assert info.value.field == "privacy_ledger" and "rolled" in str(info.value)


def test_coordinator_anchor_detects_truncation(site, capsys):
    """Cutting the last entries keeps the MAC chain intact (a prefix of a valid
    chain is valid), so the site's log alone cannot tell; the head the
    coordinator received with the last message can."""
    gate = site()
    heads = _run(gate, 3)
    lines = Path(gate.audit_log).read_text().splitlines(keepends=True)
    Path(gate.audit_log).write_text("".join(lines[:2]))  # admit + round 0 kept
    key = gov.load_site_key(gate.site_key)
    assert gov.verify_log(gate.audit_log, key=key).ok
    res = gov.verify_log(gate.audit_log, key=key, anchor=heads[-1])
    assert not res.ok and res.first_bad_seq == 3
    assert (
        main(
            [
                "audit",
                "verify",
                str(gate.audit_log),
                "--key",
                str(gate.site_key),
                "--anchor",
                heads[0],
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "audit",
                "verify",
                str(gate.audit_log),
                "--key",
                str(gate.site_key),
                "--anchor",
                heads[-1],
            ]
        )
        == 1
    )
    assert "anchor" in capsys.readouterr().out
