"""A site's gate in a federated run: the data user authenticated, the policy checked
on every message, the privacy spent charged per executed round, everything logged.

The in-process engine and the Flower client call the same functions:

* :func:`authenticate` first, before the site reads any data: the run's signed
  request (Ed25519, :func:`~phems_clinical.federation.governance.verify_request`)
  must verify against the key the site policy lists for its data user, be
  unexpired and carry a nonce this site has not admitted for another run; the
  site's audit log and ledger must pass their MAC checks (fail closed);
* :func:`admit` in the query round: the policy (cohort size, fields, rounds
  within ``max_rounds`` and within the signed request, the ε of the planned rounds
  within the budget) and then an **admission record** is written to the site's
  admissions folder (sealed with the site key, written atomically): who, which
  experiment and algorithm, the admitted rounds and the rounds executed;
* :func:`begin_round` for every train message, before any data are read: refused
  without an admission (a server that skips the query round), after the run was
  closed, beyond the admitted rounds or ``max_rounds``, or for a round before the
  last executed one;
* :func:`release` for every payload before it leaves: fields checked, the run's ε
  for the rounds executed so far (composed over those rounds by the algorithm's
  accountant; unit: one patient) written to the sealed ledger, the admission
  updated and a MAC'd audit entry naming the ledger generation appended;
* :func:`settle` after the run: the admission is closed.

The signed request is verified again on every message, so its expiry bounds the
whole run; the audit log is verified in full on every message (linear in its
length: rotate logs that grow large, keeping the last head as the next anchor).

Round retries. A server may ask for round ``r`` again (too few sites answered its
first attempt). An identical re-request (same round, same broadcast and
configuration: :func:`request_digest`) is answered with the reply the site already
sent (:func:`cached_reply`), without new computation and without new ε; a
different request for an executed round is refused. In process, where the engine
recomputes, a repeated release is allowed only when the payload is bit-identical
to the one already sent (nothing new leaves) and costs nothing.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from phems_clinical.federation import dp as dpm
from phems_clinical.federation import governance as gov

ADMISSION_DOMAIN = "phems-clinical admission record v1"


class SiteGate(NamedTuple):
    """What a site enforces for one run.

    Attributes
    ----------
    policy : SitePolicy
    audit_log, ledger : Path
        The site's MAC'd audit log and sealed privacy ledger.
    request : str
        The data user's signed request (``phems governance sign-request``).
    site_key : Path
        The site's HMAC key file, outside the folder of the log and the ledger
        (created with ``secrets``, mode 0600, on first use when the site has no
        log yet).
    admissions : Path
        Folder of the site's admission records (one per request nonce).
    run_id : str
        The transport's run identifier (Flower's run id); an admission is bound to
        it, so the same request cannot start a second run. Empty in process.
    claimed_requester, claimed_experiment : str
        What the run config says (optional); must equal the signed request's.
    """

    policy: gov.SitePolicy
    audit_log: Path
    ledger: Path
    request: str
    site_key: Path
    admissions: Path
    run_id: str = ""
    claimed_requester: str = ""
    claimed_experiment: str = ""


class Admission(NamedTuple):
    """A site's record of one admitted run (sealed JSON in its admissions folder).

    ``executed`` maps each executed round (as text) to the digests of the request
    and of the payload sent; ``epsilon``/``delta`` are the run's privacy for those
    rounds (None without DP).
    """

    nonce: str
    run: str
    requester: str
    experiment: str
    algorithm: str
    rounds: int
    n_patients: int
    executed: dict
    epsilon: float | None
    delta: float
    closed: bool


def planned_privacy(
    algorithm, n_patients: int, rounds: int
) -> tuple[float | None, float]:
    """(ε, δ) a run of ``rounds`` rounds spends at a site of ``n_patients``
    (``None, 0`` without patient-level DP; unit: one patient)."""
    if algorithm.dp is None:
        return None, 0.0
    steps = rounds * algorithm.dp_steps_per_round
    return (
        dpm.epsilon(algorithm.dp, n_patients, steps),
        dpm.resolve_delta(algorithm.dp, n_patients),
    )


def request_digest(broadcast: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """SHA-256 of what a train message asks (the broadcast arrays' shapes, dtypes
    and bytes, and its configuration values): equal digests, equal requests."""
    body = {
        "broadcast": gov.summarise_payload(broadcast),
        "config": {
            str(k): (v if isinstance(v, str | int | float | bool) else str(v))
            for k, v in sorted(config.items())
        },
    }
    return hashlib.sha256(gov.canonical_json(body)).hexdigest()


def _payload_digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(
        gov.canonical_json(gov.summarise_payload(payload))
    ).hexdigest()


# ------------------------------------------------------------------ site records


def site_key(gate: SiteGate) -> bytes:
    """The site's MAC key; created (``secrets``, mode 0600) when the site has
    neither a key nor a log nor a ledger yet.

    Raises ``IntegrityError`` (field ``site_key``) when the key lies inside the
    folder of the log or the ledger, or is missing while they exist.
    """
    key = Path(gate.site_key).resolve()
    for folder in {
        Path(gate.audit_log).parent.resolve(),
        Path(gate.ledger).parent.resolve(),
    }:
        if folder == key.parent or folder in key.parents:
            raise gov.IntegrityError(
                "site_key",
                "the site key must be kept outside the folder of the "
                "audit log and the privacy ledger (a copy of that folder must not "
                "carry the key)",
            )
    if key.exists():
        return gov.load_site_key(key)
    if Path(gate.audit_log).exists() or Path(gate.ledger).exists():
        raise gov.IntegrityError(
            "site_key",
            "no site key, but the site has an audit log or a privacy "
            "ledger: they cannot be verified (restore the key)",
        )
    return gov.create_site_key(key)


def check_records(gate: SiteGate, key: bytes) -> gov.VerifyResult:
    """Verify the audit log's MAC chain and that the ledger is at least as recent
    as the log's last charge (a deleted or rolled-back ledger is refused)."""
    if Path(gate.audit_log).exists():
        res = gov.verify_log(gate.audit_log, key=key)
        if not res.ok:
            raise gov.IntegrityError(
                "audit_log", f"verification failed at {res.reason}"
            )
    else:
        res = gov.VerifyResult(True, 0, None, "", gov.GENESIS_HASH, 0)
    generation, _ = gov.ledger_generation(gate.ledger, key=key)
    if generation < res.ledger:
        what = "missing" if generation == 0 else f"at generation {generation}"
        raise gov.IntegrityError(
            "privacy_ledger",
            f"the ledger is {what}, but the audit log records a "
            f"charge that wrote generation {res.ledger}: it was deleted or rolled "
            "back; the site refuses to run until it is restored",
        )
    return res


def _admission_path(gate: SiteGate, nonce: str) -> Path:
    return Path(gate.admissions) / f"{nonce}.json"


def _load_admission(gate: SiteGate, key: bytes, nonce: str) -> Admission | None:
    path = _admission_path(gate, nonce)
    if not path.exists():
        return None
    obj = gov.read_sealed(path, key, ADMISSION_DOMAIN, "admission")
    return Admission(**{k: obj[k] for k in Admission._fields})


def _save_admission(gate: SiteGate, key: bytes, adm: Admission) -> None:
    gov.write_sealed(
        _admission_path(gate, adm.nonce), adm._asdict(), key, ADMISSION_DOMAIN
    )


def head(gate: SiteGate) -> tuple[int, str]:
    """``(seq, mac)`` of the site's audit log: the anchor sent with each reply."""
    return gov.log_head(gate.audit_log)


# ------------------------------------------------------------------ checks


def authenticate(
    gate: SiteGate, *, now: dt.datetime | None = None
) -> gov.SignedRequest:
    """Who asks for what, checked before the site reads any data.

    The signed request verifies against the policy (signature, expiry), matches
    what the run config claims, names an allowed experiment, and its nonce is not
    admitted for another run (a replay); the site's records pass their checks.
    Raises ``PolicyViolation`` naming the field.
    """
    req = gov.verify_request(gate.policy, gate.request, now=now)
    for field, claimed, signed in (
        ("requester", gate.claimed_requester, req.requester),
        ("experiment", gate.claimed_experiment, req.experiment),
    ):
        if claimed and claimed != signed:
            raise gov.PolicyViolation(
                field,
                f"the run config says {claimed!r} but the signed request "
                f"is for {signed!r}",
                requested=claimed,
                allowed=signed,
            )
    i, user = gov.find_data_user(gate.policy, req.requester)
    if not any(fnmatch.fnmatchcase(req.experiment, p) for p in user.experiments):
        raise gov.PolicyViolation(
            f"data_users[{i}].experiments",
            f"experiment {req.experiment!r} is not "
            f"allowed for data user {user.id!r} (allowed: "
            f"{', '.join(user.experiments)})",
            requested=req.experiment,
            allowed=user.experiments,
        )
    key = site_key(gate)
    check_records(gate, key)
    adm = _load_admission(gate, key, req.nonce)
    if adm is not None and (not gate.run_id or adm.run != gate.run_id):
        raise gov.PolicyViolation(
            "request.nonce",
            "this signed request was already admitted for another "
            "run at this site (a replay); the data user must sign a new request",
            requested=req.nonce,
            allowed="an unused nonce",
        )
    return req


def admit(
    gate: SiteGate,
    algorithm,
    n_patients: int,
    rounds: int,
    *,
    now: dt.datetime | None = None,
) -> Admission:
    """Admit a run of at most ``rounds`` rounds or refuse it (``PolicyViolation``).

    After :func:`authenticate`: the algorithm is the one signed, ``rounds`` is
    within the signed rounds, and the policy allows the request with the ε of the
    planned rounds (:func:`~phems_clinical.federation.governance.check_request`).
    Writes the admission record and an ``admit`` audit entry; nothing is charged
    until a round is released. Admitting the same run again (same nonce and run
    id) returns its record.
    """
    req = authenticate(gate, now=now)
    if algorithm.name != req.algorithm:
        raise gov.PolicyViolation(
            "request.algorithm",
            f"the run uses algorithm {algorithm.name!r}, the "
            f"signed request allows {req.algorithm!r}",
            requested=algorithm.name,
            allowed=req.algorithm,
        )
    if int(rounds) > req.rounds:
        raise gov.PolicyViolation(
            "request.rounds",
            f"{int(rounds)} rounds planned, the signed request "
            f"allows at most {req.rounds}",
            requested=int(rounds),
            allowed=req.rounds,
        )
    key = site_key(gate)
    eps, delta = planned_privacy(algorithm, n_patients, rounds)
    spent = gov.load_spend(gate.ledger, key=key)
    gov.check_request(
        gate.policy,
        gov.Request(
            req.requester,
            req.experiment,
            algorithm.name,
            int(n_patients),
            tuple(algorithm.message_spec),
            eps,
            int(rounds),
            delta,
        ),
        spent.epsilon,
        spent_delta=spent.delta,
    )
    adm = _load_admission(gate, key, req.nonce)
    if adm is not None:
        return adm
    adm = Admission(
        req.nonce,
        gate.run_id,
        req.requester,
        req.experiment,
        algorithm.name,
        int(rounds),
        int(n_patients),
        {},
        None,
        0.0,
        False,
    )
    _save_admission(gate, key, adm)
    gov.append_entry(
        gate.audit_log,
        key=key,
        event="admit",
        run=req.nonce,
        requester=req.requester,
        experiment=req.experiment,
        round=None,
        recipient="server",
        summary={"rounds": int(rounds)},
        now=now,
    )
    return adm


def begin_round(
    gate: SiteGate, round_: int, *, now: dt.datetime | None = None
) -> Admission:
    """Check a train message for round ``round_`` before any data are read.

    Refused (``PolicyViolation``) without an admission for this run, after it was
    closed, beyond the admitted rounds or ``max_rounds``, or for a round before
    the last executed one. An executed round is returned as is (see
    :func:`cached_reply`).
    """
    req = gov.verify_request(gate.policy, gate.request, now=now)
    key = site_key(gate)
    check_records(gate, key)
    adm = _load_admission(gate, key, req.nonce)
    if adm is None or adm.run != gate.run_id:
        raise gov.PolicyViolation(
            "admission",
            f"no admission for this run at site {gate.policy.site!r}: "
            "a train message without an admitted query round is refused",
            requested=int(round_),
            allowed="an admitted run",
        )
    if adm.closed:
        raise gov.PolicyViolation(
            "admission",
            "the run was closed at this site; no further rounds",
            requested=int(round_),
        )
    if str(int(round_)) in adm.executed:
        return adm
    done = len(adm.executed)
    limit = min(adm.rounds, gate.policy.max_rounds or adm.rounds)
    if done >= limit:
        field = "rounds" if limit == adm.rounds else "max_rounds"
        raise gov.PolicyViolation(
            field,
            f"{done} rounds executed of the {limit} admitted at site "
            f"{gate.policy.site!r}; round {int(round_)} is refused",
            requested=done + 1,
            allowed=limit,
        )
    last = max((int(r) for r in adm.executed), default=-1)
    if int(round_) < last:
        raise gov.PolicyViolation(
            "round",
            f"round {int(round_)} after round {last}: rounds only go forward",
            requested=int(round_),
            allowed=f"> {last}",
        )
    return adm


def _cache_path(gate: SiteGate, adm: Admission, round_: int) -> Path:
    return Path(gate.admissions) / adm.nonce / f"round-{int(round_):06d}.npz"


def cached_reply(
    gate: SiteGate,
    round_: int,
    digest: str,
    *,
    recipient: str = "server",
    now: dt.datetime | None = None,
) -> dict[str, np.ndarray] | None:
    """The payload already sent for an identical re-request of round ``round_``
    (logged again, no new ε), None for a round not executed yet; a different
    request for an executed round is refused."""
    adm = begin_round(gate, round_, now=now)
    done = adm.executed.get(str(int(round_)))
    if done is None:
        return None
    if done["request"] != digest:
        raise gov.PolicyViolation(
            "round",
            f"round {int(round_)} was already executed for another request "
            "(broadcast or configuration): a repeat must be identical",
            requested="a different request",
            allowed="the identical request",
        )
    with np.load(_cache_path(gate, adm, round_)) as z:
        payload = {n: z[n] for n in z.files}
    if _payload_digest(payload) != done["payload"]:
        raise gov.IntegrityError(
            "admission",
            f"the stored reply of round {int(round_)} does not match its record",
        )
    key = site_key(gate)
    gov.append_entry(
        gate.audit_log,
        key=key,
        event="message",
        run=adm.nonce,
        requester=adm.requester,
        experiment=adm.experiment,
        round=int(round_),
        recipient=recipient,
        summary=gov.summarise_payload(payload),
        now=now,
    )
    return payload


def release(
    gate: SiteGate,
    payload: Mapping[str, Any],
    round_: int,
    *,
    algorithm,
    n_patients: int,
    digest: str | None = None,
    recipient: str = "server",
    now: dt.datetime | None = None,
) -> dict:
    """Check, charge and log an outgoing payload of round ``round_``; returns the
    audit entry (its ``seq`` and ``mac`` are the head to send along).

    A new round: fields checked against the policy, the run's ε and δ for the
    rounds executed including this one checked against the budget and written to
    the ledger (one record per run, updated), the admission updated, then a
    ``message`` entry carrying the charge (with the ledger generation) appended.
    With ``digest`` (the train request's :func:`request_digest`) the payload is
    kept for an identical re-request. A repeat of an executed round must be
    bit-identical and is logged without a charge.
    """
    adm = begin_round(gate, round_, now=now)
    key = site_key(gate)
    gov.check_payload(gate.policy, payload)
    pd = _payload_digest(payload)
    r = str(int(round_))
    summary = gov.summarise_payload(payload)
    if r in adm.executed:
        done = adm.executed[r]
        if done["payload"] != pd or (digest is not None and done["request"] != digest):
            raise gov.PolicyViolation(
                "round",
                f"round {r} was already sent with other content: a "
                "repeat must be identical",
                requested="different content",
                allowed="the identical payload",
            )
        return gov.append_entry(
            gate.audit_log,
            key=key,
            event="message",
            run=adm.nonce,
            requester=adm.requester,
            experiment=adm.experiment,
            round=int(round_),
            recipient=recipient,
            summary=summary,
            now=now,
        )
    k = len(adm.executed) + 1
    eps, delta = planned_privacy(algorithm, n_patients, k)
    charge = None
    if eps is not None and math.isfinite(eps):
        spent = gov.load_spend(gate.ledger, key=key)
        others = spent.epsilon.get(adm.requester, 0.0) - (adm.epsilon or 0.0)
        others_d = spent.delta.get(adm.requester, 0.0) - adm.delta
        gov.check_request(
            gate.policy,
            gov.Request(
                adm.requester,
                adm.experiment,
                algorithm.name,
                int(n_patients),
                tuple(payload),
                eps,
                k,
                delta,
            ),
            {adm.requester: max(others, 0.0)},
            spent_delta={adm.requester: max(others_d, 0.0)},
        )
        gov.record_spend(
            gate.ledger,
            adm.requester,
            eps,
            key=key,
            delta=delta,
            experiment=adm.experiment,
            run=adm.nonce,
            rounds=k,
            now=now,
        )
        generation, mac = gov.ledger_generation(gate.ledger, key=key)
        charge = {
            "run": adm.nonce,
            "epsilon": eps,
            "delta": delta,
            "rounds": k,
            "unit": "one patient",
            "ledger_generation": generation,
            "ledger_mac": mac,
        }
    if digest is not None:
        cache = _cache_path(gate, adm, round_)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        # numpy's stub types **kwds as if a field could be named "allow_pickle"
        arrays = {n: np.asarray(v) for n, v in payload.items()}
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(cache)
    executed = {**adm.executed, r: {"request": digest, "payload": pd}}
    _save_admission(
        gate,
        key,
        adm._replace(
            executed=executed,
            epsilon=None if charge is None else eps,
            delta=0.0 if charge is None else delta,
        ),
    )
    return gov.append_entry(
        gate.audit_log,
        key=key,
        event="message",
        run=adm.nonce,
        requester=adm.requester,
        experiment=adm.experiment,
        round=int(round_),
        recipient=recipient,
        summary=summary,
        charge=charge,
        now=now,
    )


def settle(gate: SiteGate, *, now: dt.datetime | None = None) -> None:
    """Close the run's admission (no further rounds) and log it. The privacy was
    charged round by round in :func:`release`; nothing is charged here."""
    req = gov.parse_request(gate.request)
    key = site_key(gate)
    adm = _load_admission(gate, key, req.nonce)
    if adm is None or adm.closed:
        return
    _save_admission(gate, key, adm._replace(closed=True))
    gov.append_entry(
        gate.audit_log,
        key=key,
        event="close",
        run=adm.nonce,
        requester=adm.requester,
        experiment=adm.experiment,
        round=None,
        recipient="site",
        summary={"rounds_executed": len(adm.executed)},
        now=now,
    )


__all__ = [
    "Admission",
    "SiteGate",
    "admit",
    "authenticate",
    "begin_round",
    "cached_reply",
    "check_records",
    "head",
    "planned_privacy",
    "release",
    "request_digest",
    "settle",
    "site_key",
]
