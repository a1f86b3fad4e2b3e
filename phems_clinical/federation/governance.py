"""Site governance: each hospital's policy, its privacy ledger and its audit log.

A hospital (the data controller) keeps three files:

* a **site policy** (YAML, contract ``data_schemas/site_policy.schema.json``): the
  data users and experiments it allows, the minimum cohort size, each data user's
  differential-privacy budget and the message fields that may leave. The site calls
  :func:`check_request` *before any local computation*; a request that breaks the
  policy raises :class:`PolicyViolation` naming the policy field, what was
  requested and what is allowed.
* a **privacy ledger** (JSON): the ε and δ each data user has spent at this site,
  one record per run (:func:`record_spend`, :func:`load_spend`). Runs compose by
  simple summation of ε and of δ (basic composition): conservative, never
  smaller than the true (ε, δ) of the sequence of runs.
* an **audit log** (JSON lines): one hash-chained entry per outgoing message with
  its time, requester, recipient and a summary of what left (names, shapes, dtypes
  and SHA-256 of the arrays, never their values) (:func:`append_entry`,
  :func:`summarise_payload`, :func:`verify_log`).

The intended order at a site, for each run: ``check_request`` -> ``record_spend``
(the budget is taken before the run starts, so a run that fails half-way has still
spent it) -> for each round, ``check_payload`` -> ``append_entry`` -> send.

This module does file I/O; it is called by the site runner, never inside a kernel.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import numpy as np
import yaml

from phems_clinical.data.dosing_request import RequestError
from phems_clinical.data.schema_messages import (
    FieldError,
    nonfinite_fields,
    show_value,
    translate,
)
from phems_clinical.resources import schemas_dir

__all__ = [
    "GENESIS_HASH", "AuditLogError", "DataUser", "PolicyError", "PolicyViolation",
    "PrivacySpend", "Request", "SitePolicy", "VerifyResult", "append_entry",
    "check_payload", "check_request", "entry_hash", "load_policy",
    "load_policy_schema", "load_spend", "read_log", "record_spend",
    "summarise_payload", "verify_log",
]

SCHEMA_FILE = "site_policy.schema.json"
GENESIS_HASH = "0" * 64
ENTRY_KEYS = ("seq", "time", "requester", "experiment", "round", "recipient",
              "summary", "prev_hash", "hash")
COMPOSITION = "basic: epsilon and delta summed over runs"
# Budgets are sums of floats (0.1 + 0.2 > 0.3 in binary); a run that lands on the
# budget up to rounding is allowed.
_RTOL = 1e-9


# ------------------------------------------------------------------ policy

class DataUser(NamedTuple):
    """A data user allowed at a site (see ``site_policy.schema.json``).

    ``epsilon_budget`` and ``delta_budget`` (None: no δ cap) are totals over all of
    this user's runs at the site; ``experiments`` are names or glob patterns.
    """

    id: str
    epsilon_budget: float
    experiments: tuple[str, ...]
    require_dp: bool = True
    delta_budget: float | None = None


class SitePolicy(NamedTuple):
    """A hospital's policy for federated runs (``site_policy.schema.json``)."""

    site: str
    data_users: tuple[DataUser, ...]
    min_cohort_size: int
    allowed_fields: tuple[str, ...]
    max_rounds: int | None = None
    description: str = ""


class PolicyError(RequestError):
    """A site policy file failed validation; ``errors`` lists every problem."""


@lru_cache(maxsize=1)
def load_policy_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a site policy file."""
    with open(schemas_dir() / SCHEMA_FILE, encoding="utf-8") as fh:
        return json.load(fh)


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_policy_schema())


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a repeated key (PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                mark = node.value[i][0].start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", mark)
        return super().construct_mapping(node, deep=deep)


def _title(schema: dict, fallback: str) -> str:
    return schema.get("title", fallback)


def _yaml_hint(err: jsonschema.ValidationError) -> str:
    """PyYAML reads ``1e-5`` (no decimal point) as text, not a number."""
    val, types = err.instance, err.schema.get("type", "number")
    if isinstance(val, str) and "number" in (types if isinstance(types, list)
                                             else [types]):
        try:
            float(val)
            return "; YAML reads 1e-5 as text: write 1.0e-5"
        except ValueError:
            pass
    return ""


def _duplicates(obj: dict) -> list[FieldError]:
    errors, seen = [], {}
    for i, user in enumerate(obj["data_users"]):
        if user["id"] in seen:
            errors.append(FieldError(f"data_users[{i}].id", f"duplicate data user "
                                     f"{user['id']!r} (also data_users"
                                     f"[{seen[user['id']]}])"))
        seen.setdefault(user["id"], i)
    fields = obj["allowed_fields"]
    errors += [FieldError(f"allowed_fields[{i}]", f"duplicate field {f!r}")
               for i, f in enumerate(fields) if f in fields[:i]]
    return errors


def load_policy(source: str | os.PathLike | Mapping) -> SitePolicy:
    """Load and validate a site policy (a YAML/JSON file path, or a dict).

    Raises
    ------
    PolicyError
        Listing every problem, each with its field path (``min_cohort_size``,
        ``data_users[1].epsilon_budget``) and what was expected.
    FileNotFoundError
        When the file does not exist.

    Examples
    --------
    >>> obj = {"site": "H1", "min_cohort_size": 20, "allowed_fields": ["ofv"],
    ...        "data_users": [{"id": "uni-a", "epsilon_budget": 4.0,
    ...                        "experiments": ["haemophilia_*"]}]}
    >>> load_policy(obj).data_users[0]
    DataUser(id='uni-a', epsilon_budget=4.0, experiments=('haemophilia_*',), \
require_dp=True, delta_budget=None)
    >>> try:
    ...     load_policy({**obj, "min_cohort_size": -1})
    ... except PolicyError as err:
    ...     print(err)
    min_cohort_size: expected a whole number >= 1 (minimum number of patients at \
this site for any run), got -1
    """
    if isinstance(source, Mapping):
        try:   # a deep copy, with tuples as lists
            obj = json.loads(json.dumps(dict(source)))
        except TypeError as exc:
            raise PolicyError([FieldError("", f"not plain data: {exc}")]) from None
    else:
        text = Path(source).read_text(encoding="utf-8")
        try:
            obj = yaml.load(text, Loader=_StrictLoader)   # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise PolicyError([FieldError("", f"not valid YAML in {source}: "
                                          f"{exc}")]) from None
    if not isinstance(obj, dict):
        raise PolicyError([FieldError("", "expected a mapping of policy fields "
                                      "(site, data_users, ...), got "
                                      + show_value(obj))])
    errors = list(nonfinite_fields(obj))
    flagged = {e.field for e in errors}
    for err in _validator().iter_errors(obj):
        errors += [e for e in translate(err, _title, _yaml_hint)
                   if e.field not in flagged]
    if not errors:
        errors = _duplicates(obj)
    if errors:
        raise PolicyError(list(dict.fromkeys(errors)))
    users = tuple(DataUser(u["id"], float(u["epsilon_budget"]),
                           tuple(u["experiments"]), bool(u.get("require_dp", True)),
                           None if u.get("delta_budget") is None
                           else float(u["delta_budget"]))
                  for u in obj["data_users"])
    return SitePolicy(obj["site"], users, int(obj["min_cohort_size"]),
                      tuple(obj["allowed_fields"]), obj.get("max_rounds"),
                      obj.get("description", ""))


# ------------------------------------------------------------------ enforcement

class Request(NamedTuple):
    """What a federated run would do at this site, known before it starts.

    Attributes
    ----------
    requester, experiment, algorithm : str
        Data user id, experiment name, algorithm name.
    n_patients : int
        The site's cohort size for this run (known locally).
    fields : tuple of str
        Names of the payload fields the algorithm will send (its ``message_spec``).
    epsilon : float or None
        ε this run would spend at this site for this requester (all rounds
        composed); ``math.inf`` when the algorithm has a DP mechanism without noise;
        None when it has no DP at all.
    rounds : int
        Number of federated rounds (messages sent).
    delta : float
        δ this run would spend (0 without DP).
    """

    requester: str
    experiment: str
    algorithm: str
    n_patients: int
    fields: tuple[str, ...]
    epsilon: float | None
    rounds: int
    delta: float = 0.0


class PolicyViolation(ValueError):
    """A request breaks the site policy.

    ``field`` is the policy field broken (a path such as ``min_cohort_size`` or
    ``data_users[0].epsilon_budget``); ``requested`` and ``allowed`` give the two
    sides; ``str(err)`` is ``"{field}: {message}"``.
    """

    def __init__(self, field: str, message: str, *, requested: Any = None,
                 allowed: Any = None):
        self.field, self.message = field, message
        self.requested, self.allowed = requested, allowed
        super().__init__(f"{field}: {message}")


def _num(x: float) -> str:
    return f"{x:.6g}"


def _check_values(request: Request) -> None:
    eps, delta = request.epsilon, request.delta
    if eps is not None and (math.isnan(eps) or eps <= 0):
        raise ValueError(f"request epsilon must be > 0, inf or None, got {eps}")
    if math.isnan(delta) or not 0 <= delta < 1:
        raise ValueError(f"request delta must be in [0, 1), got {delta}")
    if request.n_patients < 0 or request.rounds < 1:
        raise ValueError("request n_patients must be >= 0 and rounds >= 1, got "
                         f"{request.n_patients} and {request.rounds}")


def _over(total: float, budget: float) -> bool:
    return total > budget * (1.0 + _RTOL)


def check_request(policy: SitePolicy, request: Request, spent: Mapping[str, float],
                  *, spent_delta: Mapping[str, float] | None = None) -> None:
    """Refuse a request that breaks the site policy; return None when it is allowed.

    Checked in this order, the first broken rule raising: the requester is a data
    user; the experiment matches one of its names or glob patterns; the cohort has
    at least ``min_cohort_size`` patients; every field is in ``allowed_fields``;
    ``rounds`` is within ``max_rounds``; DP is used when the data user requires it;
    ``spent[requester] + epsilon`` is within ``epsilon_budget`` (and likewise δ
    when ``delta_budget`` is set).

    Parameters
    ----------
    policy : SitePolicy
    request : Request
    spent : mapping
        ε already spent at this site per data user (``load_spend(path).epsilon``);
        a missing requester has spent 0.
    spent_delta : mapping, optional
        δ already spent per data user (``load_spend(path).delta``).

    Raises
    ------
    PolicyViolation
        Naming the policy field broken, what was requested and what is allowed.
    ValueError
        When the request itself is malformed (ε <= 0 or NaN, rounds < 1, ...).

    Notes
    -----
    Composition across runs is basic (ε and δ summed): a sound upper bound for any
    sequence of (ε, δ)-DP runs on the same patients. A run without DP (``epsilon``
    None or inf) is allowed only when ``require_dp`` is false, and then spends
    nothing: the site relies on ``min_cohort_size`` and ``allowed_fields`` alone.

    Examples
    --------
    >>> policy = load_policy({"site": "H1", "min_cohort_size": 20,
    ...     "allowed_fields": ["ofv", "grad"],
    ...     "data_users": [{"id": "uni-a", "epsilon_budget": 4.0,
    ...                     "experiments": ["haemophilia_*"]}]})
    >>> req = Request("uni-a", "haemophilia_fviii", "focei", n_patients=35,
    ...               fields=("ofv", "grad"), epsilon=1.5, rounds=50)
    >>> check_request(policy, req, {"uni-a": 2.0})
    >>> try:
    ...     check_request(policy, req, {"uni-a": 3.0})
    ... except PolicyViolation as err:
    ...     print(err.field)
    data_users[0].epsilon_budget
    """
    _check_values(request)
    ids = [u.id for u in policy.data_users]
    if request.requester not in ids:
        raise PolicyViolation(
            "data_users", f"{request.requester!r} is not a data user of site "
            f"{policy.site!r} (allowed: {', '.join(ids)})",
            requested=request.requester, allowed=tuple(ids))
    i = ids.index(request.requester)
    user, where = policy.data_users[i], f"data_users[{i}]"
    if not any(fnmatch.fnmatchcase(request.experiment, p) for p in user.experiments):
        raise PolicyViolation(
            f"{where}.experiments", f"experiment {request.experiment!r} is not "
            f"allowed for data user {user.id!r} (allowed: "
            f"{', '.join(user.experiments)})",
            requested=request.experiment, allowed=user.experiments)
    if request.n_patients < policy.min_cohort_size:
        raise PolicyViolation(
            "min_cohort_size", f"the cohort for {request.experiment!r} has "
            f"{request.n_patients} patients, fewer than the site minimum of "
            f"{policy.min_cohort_size}",
            requested=request.n_patients, allowed=policy.min_cohort_size)
    extra = [f for f in request.fields if f not in policy.allowed_fields]
    if extra:
        raise PolicyViolation(
            "allowed_fields", f"algorithm {request.algorithm!r} would send "
            f"{', '.join(map(repr, extra))}, which may not leave site "
            f"{policy.site!r} (allowed: {', '.join(policy.allowed_fields)})",
            requested=tuple(extra), allowed=policy.allowed_fields)
    if policy.max_rounds is not None and request.rounds > policy.max_rounds:
        raise PolicyViolation(
            "max_rounds", f"{request.rounds} rounds requested, site "
            f"{policy.site!r} allows at most {policy.max_rounds}",
            requested=request.rounds, allowed=policy.max_rounds)
    eps = request.epsilon
    if eps is None or math.isinf(eps):
        if user.require_dp:
            how = "has no DP" if eps is None else "adds no DP noise (epsilon = inf)"
            raise PolicyViolation(
                f"{where}.require_dp", f"data user {user.id!r} must use differential "
                f"privacy at site {policy.site!r}, but algorithm "
                f"{request.algorithm!r} {how}", requested=eps, allowed="finite")
        return
    used = float(spent.get(user.id, 0.0))
    if _over(used + eps, user.epsilon_budget):
        raise PolicyViolation(
            f"{where}.epsilon_budget", f"data user {user.id!r} has spent epsilon = "
            f"{_num(used)} of its budget {_num(user.epsilon_budget)} at site "
            f"{policy.site!r}; this run would add {_num(eps)} (total "
            f"{_num(used + eps)})", requested=used + eps, allowed=user.epsilon_budget)
    used = float((spent_delta or {}).get(user.id, 0.0))
    if user.delta_budget is not None and _over(used + request.delta,
                                               user.delta_budget):
        raise PolicyViolation(
            f"{where}.delta_budget", f"data user {user.id!r} has spent delta = "
            f"{_num(used)} of its budget {_num(user.delta_budget)} at site "
            f"{policy.site!r}; this run would add {_num(request.delta)}",
            requested=used + request.delta, allowed=user.delta_budget)


def check_payload(policy: SitePolicy, payload: Mapping[str, Any]) -> None:
    """Refuse an outgoing payload with a field not in ``allowed_fields``.

    The last check before a message leaves (the request declared its fields; this
    checks what is actually sent). Raises :class:`PolicyViolation`.
    """
    extra = [f for f in payload if f not in policy.allowed_fields]
    if extra:
        raise PolicyViolation(
            "allowed_fields", "the outgoing message holds "
            f"{', '.join(map(repr, extra))}, which may not leave site "
            f"{policy.site!r}",
            requested=tuple(extra), allowed=policy.allowed_fields)


# ------------------------------------------------------------------ ledger

class PrivacySpend(NamedTuple):
    """Privacy spent at a site per data user: ε and δ summed over runs, run count."""

    epsilon: dict[str, float]
    delta: dict[str, float]
    runs: dict[str, int]


def _utc(now: dt.datetime | None) -> str:
    now = dt.datetime.now(dt.UTC) if now is None else now
    if now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now.isoformat()}")
    return now.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def _read_ledger(path: Path) -> dict:
    if not path.exists():
        return {"composition": COMPOSITION, "records": []}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        records = obj["records"]
        for r in records:
            float(r["epsilon"]), float(r["delta"]), str(r["requester"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"privacy ledger {path} is not a valid ledger ({exc!r})") \
            from None
    return obj


def load_spend(path: str | os.PathLike) -> PrivacySpend:
    """Total ε, δ and runs per data user in a site's ledger (empty if no file yet).

    ε and δ are summed over the recorded runs (basic composition; see
    :func:`check_request`).
    """
    records = _read_ledger(Path(path))["records"]
    users = dict.fromkeys(r["requester"] for r in records)
    return PrivacySpend(
        {u: math.fsum(r["epsilon"] for r in records if r["requester"] == u)
         for u in users},
        {u: math.fsum(r["delta"] for r in records if r["requester"] == u)
         for u in users},
        {u: sum(r["requester"] == u for r in records) for u in users})


def record_spend(path: str | os.PathLike, requester: str, epsilon: float, *,
                 delta: float = 0.0, experiment: str | None = None,
                 now: dt.datetime | None = None) -> PrivacySpend:
    """Add one run's (ε, δ) for ``requester`` to the ledger; return the new totals.

    The file is rewritten atomically (temporary file, fsync, rename), so a crash
    leaves either the old or the new ledger. One writer per ledger is assumed.
    """
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    path = Path(path)
    ledger = _read_ledger(path)
    ledger["records"].append({"time": _utc(now), "requester": requester,
                              "experiment": experiment, "epsilon": float(epsilon),
                              "delta": float(delta)})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(ledger, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return load_spend(path)


# ------------------------------------------------------------------ audit log

class AuditLogError(ValueError):
    """An audit log cannot be read (not JSON lines, an interrupted write, ...)."""


class VerifyResult(NamedTuple):
    """Outcome of :func:`verify_log`.

    ``first_bad_seq`` is the position (1-based line number, = the seq the entry
    there should carry) of the first entry that breaks the chain, None when ok;
    ``last_hash`` is the hash of the last entry (``GENESIS_HASH`` if none).
    """

    ok: bool
    n_entries: int
    first_bad_seq: int | None
    reason: str
    last_hash: str


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``entry`` without its ``hash`` key.

    Canonical: keys sorted, separators ``(",", ":")``, ASCII, no NaN/inf.
    """
    return hashlib.sha256(_canonical({k: v for k, v in entry.items()
                                      if k != "hash"})).hexdigest()


def summarise_payload(payload: Mapping[str, Any]) -> dict[str, dict]:
    """Shape, dtype and SHA-256 of each array in an outgoing payload, by field name.

    The hash is of the array's bytes in C order, little-endian, so the recipient can
    check that what arrived is what the site logged; the values themselves are never
    in the summary.

    Examples
    --------
    >>> s = summarise_payload({"ofv": np.float64(1.5), "grad": np.zeros((2, 3))})
    >>> s["grad"]["shape"], s["grad"]["dtype"], len(s["grad"]["sha256"])
    ([2, 3], 'float64', 64)
    """
    out = {}
    for name in sorted(payload):
        arr = np.asarray(payload[name])
        if arr.dtype.hasobject:
            raise ValueError(f"payload field {name!r} is not a numeric array "
                             f"(dtype {arr.dtype})")
        data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<")))
        out[name] = {"shape": list(arr.shape), "dtype": arr.dtype.name,
                     "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
    return out


def _last_line(path: Path) -> bytes | None:
    """The last line of a file (read from the end), None for an empty file."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return None
        fh.seek(end - 1)
        if fh.read(1) != b"\n":
            raise AuditLogError(f"{path}: the last line has no end of line (an "
                                "interrupted write?); verify and repair the log first")
        pos, buf = end - 1, b""
        while pos > 0 and b"\n" not in buf:
            step = min(4096, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
        return buf.rsplit(b"\n", 1)[-1] if b"\n" in buf else buf


def append_entry(path: str | os.PathLike, *, requester: str, experiment: str,
                 round: int, recipient: str, summary: Mapping[str, Any],
                 now: dt.datetime | None = None) -> dict:
    """Append one outgoing message to the audit log and return the entry.

    The entry is ``{seq, time, requester, experiment, round, recipient, summary,
    prev_hash, hash}``: ``seq`` counts from 1, ``time`` is UTC ISO 8601 (``now``,
    default the current time), ``prev_hash`` is the previous entry's hash
    (``GENESIS_HASH`` for the first) and ``hash`` is :func:`entry_hash`. The line is
    written with one ``write`` in append mode, then flushed and fsynced.

    Appending does not re-verify the whole log, only that its last line is a
    complete entry; run :func:`verify_log` for that. One writer per log is assumed.
    """
    path = Path(path)
    seq, prev = 1, GENESIS_HASH
    if path.exists() and (line := _last_line(path)) is not None:
        try:
            last = json.loads(line)
            seq, prev = int(last["seq"]) + 1, str(last["hash"])
        except (ValueError, KeyError, TypeError):
            raise AuditLogError(f"{path}: the last line is not an audit entry; "
                                "verify the log first") from None
    entry = {"seq": seq, "time": _utc(now), "requester": requester,
             "experiment": experiment, "round": int(round), "recipient": recipient,
             "summary": dict(summary), "prev_hash": prev}
    entry["hash"] = entry_hash(entry)
    line = _canonical(entry) + b"\n"
    with open(path, "ab") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    return entry


def read_log(path: str | os.PathLike) -> list[dict]:
    """The entries of an audit log, unverified.

    Raises :class:`AuditLogError` naming the line when a line is not a JSON object,
    and ``FileNotFoundError`` when there is no file.
    """
    entries = []
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, start=1):
            try:
                entry = json.loads(line)   # bytes: UTF-8 expected
            except ValueError as exc:
                raise AuditLogError(f"{path}: line {n} is not JSON ({exc})") from None
            if not isinstance(entry, dict):
                raise AuditLogError(f"{path}: line {n} is not a JSON object")
            entries.append(entry)
    return entries


def _bad_entry(entry: dict, n: int, prev: str) -> str | None:
    missing = [k for k in ENTRY_KEYS if k not in entry]
    if missing:
        return f"missing {', '.join(missing)}"
    extra = sorted(set(entry) - set(ENTRY_KEYS))
    if extra:
        return f"unexpected field(s) {', '.join(extra)} (an insertion)"
    if entry["seq"] != n:
        return (f"seq is {entry['seq']!r} where {n} was expected (an entry was "
                "deleted, inserted or moved)")
    if entry["prev_hash"] != prev:
        return ("prev_hash does not match the previous entry's hash (an entry "
                "before it was removed, replaced or moved)")
    try:
        ok = entry_hash(entry) == entry["hash"]
    except ValueError:
        ok = False
    if not ok:
        return "hash does not match the entry's content (it was edited)"
    return None


def verify_log(path: str | os.PathLike, *, anchor: str | None = None) -> VerifyResult:
    """Check an audit log's hash chain.

    Each entry must carry ``seq`` = its line number, ``prev_hash`` = the previous
    entry's ``hash`` and a ``hash`` that matches its content. This detects an
    edited, deleted, inserted or reordered entry, and a truncation in the middle.

    .. warning::
        A hash chain alone cannot detect that entries were cut from the *end*, nor
        a rewrite of the whole chain from the edited entry onwards (there is no
        secret). Keep an ``anchor``: a hash published outside the site (e.g. sent
        to the coordinator or a second custodian). When given, the anchor must be
        the hash of some entry of the log (the log may have grown since), else the
        result is not ok and ``first_bad_seq`` is the first missing position.

    Raises
    ------
    AuditLogError
        When a line is not a JSON object (the log cannot be read).
    FileNotFoundError
        When there is no file.
    """
    entries = read_log(path)
    prev, hashes = GENESIS_HASH, set()
    for n, entry in enumerate(entries, start=1):
        reason = _bad_entry(entry, n, prev)
        if reason is not None:
            return VerifyResult(False, len(entries), n, f"entry {n}: {reason}", prev)
        prev = entry["hash"]
        hashes.add(prev)
    if anchor is not None and anchor.lower() not in hashes:
        return VerifyResult(False, len(entries), len(entries) + 1,
                            f"the anchor {anchor} is not the hash of any entry: "
                            "entries were cut from the end (or the anchor belongs "
                            "to another log)", prev)
    return VerifyResult(True, len(entries), None, "", prev)
