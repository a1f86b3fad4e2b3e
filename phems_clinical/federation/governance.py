"""Site governance: each hospital's policy, its privacy ledger and its audit log.

A hospital (the data controller) keeps three files:

* a **site policy** (YAML, contract ``data_schemas/site_policy.schema.json``): the
  data users and experiments it allows, the minimum cohort size, each data user's
  differential-privacy budget and the message fields that may leave. The site calls
  :func:`check_request` *before any local computation*; a request that breaks the
  policy raises :class:`PolicyViolation` naming the policy field, what was
  requested and what is allowed.
* a **privacy ledger** (JSON, sealed with HMAC-SHA256 under the site key): the ε
  and δ each data user has spent at this site, one record per run holding the ε of
  the rounds it actually executed (:func:`record_spend`, :func:`load_spend`). Runs
  compose by simple summation of ε and of δ (basic composition): conservative,
  never smaller than the true (ε, δ) of the sequence of runs. Unit of privacy:
  one patient of the site.
* an **audit log** (JSON lines): one entry per admission, outgoing message and
  ε charge, each carrying an HMAC-SHA256 under the site key over its content and
  the previous entry's MAC (:func:`append_entry`, :func:`verify_log`), with a
  summary of what left (names, shapes, dtypes and SHA-256 of the arrays, never
  their values; :func:`summarise_payload`). Every charge names the ledger
  generation it wrote, so a deleted or rolled-back ledger is detected.

The site key (:func:`create_site_key`, 256 bits from ``secrets``, mode 0600) is
kept outside the folder of the log and the ledger. Requests are signed by the data
user with Ed25519 (RFC 8032; :func:`sign_request`, :func:`verify_request`) against
the public key the policy lists for it: a requester is an authenticated key, not a
string in a run config. The per-run enforcement (admission, every round, every
charge) is in :mod:`phems_clinical.federation.gate`.

This module does file I/O; it is called by the site runner, never inside a kernel.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import hashlib
import hmac
import json
import math
import os
import re
import secrets
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import numpy as np
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from phems_clinical.data.dosing_request import RequestError
from phems_clinical.data.schema_messages import (
    FieldError,
    nonfinite_fields,
    show_value,
    translate,
)
from phems_clinical.keyfiles import create_secret_file, owner_only_problem
from phems_clinical.outputs import write_json_atomic
from phems_clinical.resources import schemas_dir

__all__ = [
    "GENESIS_HASH",
    "AuditLogError",
    "DataUser",
    "IntegrityError",
    "PolicyError",
    "PolicyViolation",
    "PrivacySpend",
    "Request",
    "SignedRequest",
    "SitePolicy",
    "VerifyResult",
    "append_entry",
    "check_payload",
    "check_request",
    "create_site_key",
    "entry_mac",
    "find_data_user",
    "generate_user_key",
    "ledger_generation",
    "load_policy",
    "load_policy_schema",
    "load_site_key",
    "load_spend",
    "log_head",
    "parse_request",
    "read_log",
    "read_sealed",
    "record_spend",
    "sign_request",
    "summarise_payload",
    "verify_log",
    "verify_request",
    "write_sealed",
    "canonical_json",
]

SCHEMA_FILE = "site_policy.schema.json"
GENESIS_HASH = "0" * 64
COMPOSITION = "basic: epsilon and delta summed over runs"
# Budgets are sums of floats (0.1 + 0.2 > 0.3 in binary); a run that lands on the
# budget up to rounding is allowed.
_RTOL = 1e-9


# ------------------------------------------------------------------ policy


class DataUser(NamedTuple):
    """A data user allowed at a site (see ``site_policy.schema.json``).

    ``epsilon_budget`` and ``delta_budget`` (None: no δ cap) are totals over all of
    this user's runs at the site; ``experiments`` are names or glob patterns;
    ``public_key`` is the user's Ed25519 public key (64 hex digits) that its
    signed requests must verify against.
    """

    id: str
    epsilon_budget: float
    experiments: tuple[str, ...]
    require_dp: bool = True
    delta_budget: float | None = None
    public_key: str = ""


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
                    None, None, f"key {key!r} appears twice", mark
                )
        return super().construct_mapping(node, deep=deep)


def _title(schema: dict, fallback: str) -> str:
    return schema.get("title", fallback)


def _yaml_hint(err: jsonschema.ValidationError) -> str:
    """PyYAML reads ``1e-5`` (no decimal point) as text, not a number."""
    val, types = err.instance, err.schema.get("type", "number")
    if isinstance(val, str) and "number" in (
        types if isinstance(types, list) else [types]
    ):
        try:
            float(val)
            return "; YAML reads 1e-5 as text: write 1.0e-5"
        except ValueError:
            pass
    return ""


def _duplicates(obj: dict) -> list[FieldError]:
    errors: list[FieldError] = []
    seen: dict[str, int] = {}
    for i, user in enumerate(obj["data_users"]):
        if user["id"] in seen:
            errors.append(
                FieldError(
                    f"data_users[{i}].id",
                    f"duplicate data user "
                    f"{user['id']!r} (also data_users"
                    f"[{seen[user['id']]}])",
                )
            )
        seen.setdefault(user["id"], i)
    fields = obj["allowed_fields"]
    errors += [
        FieldError(f"allowed_fields[{i}]", f"duplicate field {f!r}")
        for i, f in enumerate(fields)
        if f in fields[:i]
    ]
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
    ...                        "experiments": ["haemophilia_*"],
    ...                        "public_key": "ab" * 32}]}
    >>> load_policy(obj).data_users[0][:5]
    ('uni-a', 4.0, ('haemophilia_*',), True, None)
    >>> try:
    ...     load_policy({**obj, "min_cohort_size": -1})
    ... except PolicyError as err:
    ...     print(err)
    min_cohort_size: expected a whole number >= 1 (minimum number of patients at \
this site for any run), got -1
    """
    if isinstance(source, Mapping):
        try:  # a deep copy, with tuples as lists
            obj = json.loads(json.dumps(dict(source)))
        except TypeError as exc:
            raise PolicyError([FieldError("", f"not plain data: {exc}")]) from None
    else:
        text = Path(source).read_text(encoding="utf-8")
        try:
            obj = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise PolicyError(
                [FieldError("", f"not valid YAML in {source}: {exc}")]
            ) from None
    if not isinstance(obj, dict):
        raise PolicyError(
            [
                FieldError(
                    "",
                    "expected a mapping of policy fields "
                    "(site, data_users, ...), got " + show_value(obj),
                )
            ]
        )
    errors = list(nonfinite_fields(obj))
    flagged = {e.field for e in errors}
    for err in _validator().iter_errors(obj):
        errors += [
            e for e in translate(err, _title, _yaml_hint) if e.field not in flagged
        ]
    if not errors:
        errors = _duplicates(obj)
    if errors:
        raise PolicyError(list(dict.fromkeys(errors)))
    users = tuple(
        DataUser(
            u["id"],
            float(u["epsilon_budget"]),
            tuple(u["experiments"]),
            bool(u.get("require_dp", True)),
            None if u.get("delta_budget") is None else float(u["delta_budget"]),
            u["public_key"].lower(),
        )
        for u in obj["data_users"]
    )
    return SitePolicy(
        obj["site"],
        users,
        int(obj["min_cohort_size"]),
        tuple(obj["allowed_fields"]),
        obj.get("max_rounds"),
        obj.get("description", ""),
    )


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

    def __init__(
        self, field: str, message: str, *, requested: Any = None, allowed: Any = None
    ):
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
        raise ValueError(
            "request n_patients must be >= 0 and rounds >= 1, got "
            f"{request.n_patients} and {request.rounds}"
        )


def find_data_user(policy: SitePolicy, requester: str) -> tuple[int, DataUser]:
    """The policy's entry for ``requester`` and its index; ``PolicyViolation``
    (field ``data_users``) when the site does not know it."""
    ids = [u.id for u in policy.data_users]
    if requester not in ids:
        raise PolicyViolation(
            "data_users",
            f"{requester!r} is not a data user of site "
            f"{policy.site!r} (allowed: {', '.join(ids)})",
            requested=requester,
            allowed=tuple(ids),
        )
    i = ids.index(requester)
    return i, policy.data_users[i]


def _over(total: float, budget: float) -> bool:
    return total > budget * (1.0 + _RTOL)


def check_request(
    policy: SitePolicy,
    request: Request,
    spent: Mapping[str, float],
    *,
    spent_delta: Mapping[str, float] | None = None,
) -> None:
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
    ...                     "experiments": ["haemophilia_*"],
    ...                     "public_key": "ab" * 32}]})
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
    i, user = find_data_user(policy, request.requester)
    where = f"data_users[{i}]"
    if not any(fnmatch.fnmatchcase(request.experiment, p) for p in user.experiments):
        raise PolicyViolation(
            f"{where}.experiments",
            f"experiment {request.experiment!r} is not "
            f"allowed for data user {user.id!r} (allowed: "
            f"{', '.join(user.experiments)})",
            requested=request.experiment,
            allowed=user.experiments,
        )
    if request.n_patients < policy.min_cohort_size:
        raise PolicyViolation(
            "min_cohort_size",
            f"the cohort for {request.experiment!r} has "
            f"{request.n_patients} patients, fewer than the site minimum of "
            f"{policy.min_cohort_size}",
            requested=request.n_patients,
            allowed=policy.min_cohort_size,
        )
    extra = [f for f in request.fields if f not in policy.allowed_fields]
    if extra:
        raise PolicyViolation(
            "allowed_fields",
            f"algorithm {request.algorithm!r} would send "
            f"{', '.join(map(repr, extra))}, which may not leave site "
            f"{policy.site!r} (allowed: {', '.join(policy.allowed_fields)})",
            requested=tuple(extra),
            allowed=policy.allowed_fields,
        )
    if policy.max_rounds is not None and request.rounds > policy.max_rounds:
        raise PolicyViolation(
            "max_rounds",
            f"{request.rounds} rounds requested, site "
            f"{policy.site!r} allows at most {policy.max_rounds}",
            requested=request.rounds,
            allowed=policy.max_rounds,
        )
    eps = request.epsilon
    if eps is None or math.isinf(eps):
        if user.require_dp:
            how = "has no DP" if eps is None else "adds no DP noise (epsilon = inf)"
            raise PolicyViolation(
                f"{where}.require_dp",
                f"data user {user.id!r} must use differential "
                f"privacy at site {policy.site!r}, but algorithm "
                f"{request.algorithm!r} {how}",
                requested=eps,
                allowed="finite",
            )
        return
    used = float(spent.get(user.id, 0.0))
    if _over(used + eps, user.epsilon_budget):
        raise PolicyViolation(
            f"{where}.epsilon_budget",
            f"data user {user.id!r} has spent epsilon = "
            f"{_num(used)} of its budget {_num(user.epsilon_budget)} at site "
            f"{policy.site!r}; this run would add {_num(eps)} (total "
            f"{_num(used + eps)})",
            requested=used + eps,
            allowed=user.epsilon_budget,
        )
    used = float((spent_delta or {}).get(user.id, 0.0))
    if user.delta_budget is not None and _over(used + request.delta, user.delta_budget):
        raise PolicyViolation(
            f"{where}.delta_budget",
            f"data user {user.id!r} has spent delta = "
            f"{_num(used)} of its budget {_num(user.delta_budget)} at site "
            f"{policy.site!r}; this run would add {_num(request.delta)}",
            requested=used + request.delta,
            allowed=user.delta_budget,
        )


def check_payload(policy: SitePolicy, payload: Mapping[str, Any]) -> None:
    """Refuse an outgoing payload with a field not in ``allowed_fields``.

    The last check before a message leaves (the request declared its fields; this
    checks what is actually sent). Raises :class:`PolicyViolation`.
    """
    extra = [f for f in payload if f not in policy.allowed_fields]
    if extra:
        raise PolicyViolation(
            "allowed_fields",
            "the outgoing message holds "
            f"{', '.join(map(repr, extra))}, which may not leave site "
            f"{policy.site!r}",
            requested=tuple(extra),
            allowed=policy.allowed_fields,
        )


# ------------------------------------------------------------------ site key

SITE_KEY_BYTES = 32
"""A site's MAC key: 256 bits from the OS CSPRNG (``secrets``), as HMAC-SHA256
wants a key at least as long as its output (RFC 2104, section 3)."""


class IntegrityError(PolicyViolation):
    """The site's own records fail their checks (an audit-log entry or the privacy
    ledger does not carry a valid MAC, the ledger is missing or older than the log
    says, the site key is unusable); the site refuses to run (fails closed).

    ``field`` names the record (``audit_log``, ``privacy_ledger``, ``site_key``).
    """


def create_site_key(path: str | os.PathLike) -> bytes:
    """Create a new site MAC key file (hex text, mode 0600) and return the key.

    The key comes from :func:`secrets.token_bytes`; the file is created exclusively
    (an existing key is never overwritten). Keep it outside the folder of the audit
    log and the ledger it protects.
    """
    key = secrets.token_bytes(SITE_KEY_BYTES)
    create_secret_file(path, (key.hex() + "\n").encode("ascii"))
    return key


def load_site_key(path: str | os.PathLike) -> bytes:
    """Read a site MAC key; refuse (``IntegrityError``, field ``site_key``) a file
    others may read or write (mode must deny group and other) or that is not
    64 hex digits."""
    path = Path(path)
    problem = owner_only_problem(path)
    if problem:
        raise IntegrityError("site_key", f"site key: {problem}")
    text = path.read_text(encoding="ascii").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != SITE_KEY_BYTES:
        raise IntegrityError(
            "site_key",
            f"expected {2 * SITE_KEY_BYTES} hex digits (a key made by create_site_key)",
        )
    return key


def _mac(key: bytes, domain: bytes, obj: Any) -> str:
    return hmac.new(key, domain + canonical_json(obj), hashlib.sha256).hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON, atomically and durably (old or new, never half)."""
    write_json_atomic(path, obj, indent=1, sort_keys=True)


def write_sealed(
    path: str | os.PathLike, obj: Mapping[str, Any], key: bytes, domain: str
) -> dict:
    """Write ``obj`` plus ``mac`` = HMAC-SHA256(key, domain + canonical JSON)
    atomically; returns what was written."""
    body = {k: v for k, v in obj.items() if k != "mac"}
    sealed = {**body, "mac": _mac(key, domain.encode() + b"\n", body)}
    _write_json_atomic(Path(path), sealed)
    return sealed


def read_sealed(path: str | os.PathLike, key: bytes, domain: str, field: str) -> dict:
    """Read a file written by :func:`write_sealed`; ``IntegrityError`` naming
    ``field`` when it is not JSON or its MAC does not match."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        ok = isinstance(obj, dict) and hmac.compare_digest(
            str(obj.get("mac", "")),
            _mac(
                key,
                domain.encode() + b"\n",
                {k: v for k, v in obj.items() if k != "mac"},
            ),
        )
    except ValueError:
        ok = False
    if not ok:
        raise IntegrityError(
            field,
            "the file's MAC does not match its content "
            "(edited, or written without this site's key)",
        )
    return obj


# ------------------------------------------------------------------ signed requests

REQUEST_PREFIX = "phems-request-v1."
REQUEST_DOMAIN = b"phems-clinical signed site request v1\n"
REQUEST_KEYS = ("requester", "experiment", "algorithm", "rounds", "nonce", "expires")
_NONCE = re.compile(r"[0-9a-f]{32}")


class SignedRequest(NamedTuple):
    """A data user's request to a site, signed with its Ed25519 key (RFC 8032).

    ``rounds`` is the most rounds the data user authorises; ``nonce`` (128 bits,
    hex, from ``secrets``) identifies the run and is accepted once per site;
    ``expires`` is UTC ISO 8601; ``signature`` is hex over
    ``REQUEST_DOMAIN + canonical JSON`` of the other fields.
    """

    requester: str
    experiment: str
    algorithm: str
    rounds: int
    nonce: str
    expires: str
    signature: str

    def body(self) -> dict:
        """The signed fields."""
        return {k: getattr(self, k) for k in REQUEST_KEYS}


def generate_user_key() -> tuple[bytes, bytes]:
    """A data user's new Ed25519 key pair ``(private_raw, public_raw)`` (32 bytes
    each; the private key from the OS CSPRNG via ``cryptography``)."""
    sk = Ed25519PrivateKey.generate()
    return (
        sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


def sign_request(
    private_key: bytes,
    *,
    requester: str,
    experiment: str,
    algorithm: str,
    rounds: int,
    valid_for: dt.timedelta = dt.timedelta(hours=24),
    nonce: str | None = None,
    now: dt.datetime | None = None,
) -> str:
    """A signed request (text for a run config's ``request``).

    The token is ``REQUEST_PREFIX`` + base64url of the canonical JSON of the
    fields and the signature. ``nonce`` defaults to 128 bits from ``secrets``.
    """
    if int(rounds) < 1:
        raise ValueError(f"rounds: expected a whole number >= 1, got {rounds}")
    now = dt.datetime.now(dt.UTC) if now is None else now
    body = {
        "requester": str(requester),
        "experiment": str(experiment),
        "algorithm": str(algorithm),
        "rounds": int(rounds),
        "nonce": secrets.token_hex(16) if nonce is None else nonce,
        "expires": _utc(now + valid_for),
    }
    sig = Ed25519PrivateKey.from_private_bytes(private_key).sign(
        REQUEST_DOMAIN + canonical_json(body)
    )
    text = canonical_json({**body, "signature": sig.hex()})
    return REQUEST_PREFIX + base64.urlsafe_b64encode(text).decode().rstrip("=")


def parse_request(token: str) -> SignedRequest:
    """Decode a signed request (unverified); ``PolicyViolation`` (field
    ``request``) when it is not one."""
    bad = PolicyViolation(
        "request",
        "expected a signed request (text starting "
        f"{REQUEST_PREFIX!r}, made by 'phems governance "
        "sign-request'); requester and experiment strings alone "
        "are not accepted",
    )
    if not isinstance(token, str) or not token.startswith(REQUEST_PREFIX):
        raise bad
    b64 = token[len(REQUEST_PREFIX) :]
    try:
        obj = json.loads(base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)))
        req = SignedRequest(**{k: obj[k] for k in (*REQUEST_KEYS, "signature")})
    except (ValueError, KeyError, TypeError):
        raise bad from None
    if (
        set(obj) != {*REQUEST_KEYS, "signature"}
        or not all(
            isinstance(getattr(req, k), str) for k in req._fields if k != "rounds"
        )
        or type(req.rounds) is not int
        or not _NONCE.fullmatch(req.nonce)
    ):
        raise bad
    return req


def verify_request(
    policy: SitePolicy, token: str, *, now: dt.datetime | None = None
) -> SignedRequest:
    """Authenticate a signed request against the site policy; return it.

    Checked in this order (``PolicyViolation`` naming the field): it is a signed
    request; its requester is a data user; the policy holds that user's
    ``public_key``; the Ed25519 signature verifies; it has not expired. Replays of
    its nonce are refused by the gate (:mod:`phems_clinical.federation.gate`).
    """
    req = parse_request(token)
    i, user = find_data_user(policy, req.requester)
    if not user.public_key:
        raise PolicyViolation(
            f"data_users[{i}].public_key",
            "no public key for "
            f"data user {user.id!r}: its requests cannot be "
            "authenticated",
            requested=req.requester,
            allowed="a listed Ed25519 public key",
        )
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(user.public_key)).verify(
            bytes.fromhex(req.signature), REQUEST_DOMAIN + canonical_json(req.body())
        )
    except (InvalidSignature, ValueError):
        raise PolicyViolation(
            "request.signature",
            f"the request's signature does not verify "
            f"against data_users[{i}].public_key of {user.id!r} (forged, altered, "
            "or signed with another key)",
            requested="invalid",
            allowed="an Ed25519 signature by the data user",
        ) from None
    try:
        expires = dt.datetime.fromisoformat(req.expires)
    except ValueError:
        expires = None
    if expires is None or expires.utcoffset() is None:
        raise PolicyViolation(
            "request.expires", f"expected a UTC ISO 8601 time, got {req.expires!r}"
        )
    now = dt.datetime.now(dt.UTC) if now is None else now
    if now >= expires:
        raise PolicyViolation(
            "request.expires",
            f"the request expired at {req.expires}",
            requested=req.expires,
            allowed=f"later than {_utc(now)}",
        )
    return req


# ------------------------------------------------------------------ ledger

LEDGER_DOMAIN = "phems-clinical privacy ledger v2"


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


def _read_ledger(path: Path, key: bytes) -> dict:
    if not path.exists():
        return {"composition": COMPOSITION, "generation": 0, "records": []}
    obj = read_sealed(path, key, LEDGER_DOMAIN, "privacy_ledger")
    try:
        int(obj["generation"])
        for r in obj["records"]:
            float(r["epsilon"]), float(r["delta"]), str(r["requester"])
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(
            "privacy_ledger", "not a valid ledger (generation and records expected)"
        ) from None
    return obj


def ledger_generation(path: str | os.PathLike, *, key: bytes) -> tuple[int, str]:
    """``(generation, mac)`` of a verified ledger: ``generation`` counts its writes
    (0 and ``GENESIS_HASH`` when there is no file)."""
    path = Path(path)
    obj = _read_ledger(path, key)
    return int(obj["generation"]), str(obj.get("mac", GENESIS_HASH))


def load_spend(path: str | os.PathLike, *, key: bytes) -> PrivacySpend:
    """Total ε, δ and runs per data user in a site's ledger (empty if no file yet),
    after checking its MAC with the site ``key``.

    ε and δ are summed over the recorded runs (basic composition; see
    :func:`check_request`). Unit of privacy: one patient of this site.
    """
    records = _read_ledger(Path(path), key)["records"]
    users = dict.fromkeys(r["requester"] for r in records)
    return PrivacySpend(
        {
            u: math.fsum(r["epsilon"] for r in records if r["requester"] == u)
            for u in users
        },
        {
            u: math.fsum(r["delta"] for r in records if r["requester"] == u)
            for u in users
        },
        {u: sum(r["requester"] == u for r in records) for u in users},
    )


def record_spend(
    path: str | os.PathLike,
    requester: str,
    epsilon: float,
    *,
    key: bytes,
    delta: float = 0.0,
    experiment: str | None = None,
    run: str | None = None,
    rounds: int | None = None,
    now: dt.datetime | None = None,
) -> PrivacySpend:
    """Record a run's (ε, δ) for ``requester``; return the new totals.

    With ``run`` (the request nonce) the run's record is replaced when it exists:
    it holds the run's ε and δ for the ``rounds`` executed so far (composed over
    those rounds, not summed per round). The ledger's ``generation`` is increased
    and it is sealed with HMAC-SHA256 under the site ``key``; the file is rewritten
    atomically. One writer per ledger is assumed.
    """
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    path = Path(path)
    ledger = _read_ledger(path, key)
    record = {
        "time": _utc(now),
        "requester": requester,
        "experiment": experiment,
        "epsilon": float(epsilon),
        "delta": float(delta),
        "run": run,
        "rounds": rounds,
    }
    same = [
        i
        for i, r in enumerate(ledger["records"])
        if run is not None and r.get("run") == run
    ]
    if same:
        if ledger["records"][same[0]]["requester"] != requester:
            raise ValueError("run: recorded for another requester")
        ledger["records"][same[0]] = record
    else:
        ledger["records"].append(record)
    ledger["generation"] = int(ledger["generation"]) + 1
    ledger.pop("mac", None)
    write_sealed(path, ledger, key, LEDGER_DOMAIN)
    return load_spend(path, key=key)


# ------------------------------------------------------------------ audit log

LOG_DOMAIN = b"phems-clinical audit log v2\n"
ENTRY_KEYS = (
    "seq",
    "time",
    "event",
    "run",
    "requester",
    "experiment",
    "round",
    "recipient",
    "summary",
    "charge",
    "prev_mac",
    "mac",
)
EVENTS = ("admit", "message", "close")


class AuditLogError(ValueError):
    """An audit log cannot be read (not JSON lines, an interrupted write, ...)."""


class VerifyResult(NamedTuple):
    """Outcome of :func:`verify_log`.

    ``first_bad_seq`` is the position (1-based line number, = the seq the entry
    there should carry) of the first entry that fails, None when ok; ``last_mac``
    is the MAC of the last good entry (``GENESIS_HASH`` if none); ``ledger`` is the
    ledger generation of the last good charge (0 if none).
    """

    ok: bool
    n_entries: int
    first_bad_seq: int | None
    reason: str
    last_mac: str
    ledger: int = 0


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes of ``obj`` for signing and hashing: sorted keys, no
    spaces, ASCII, and non-finite numbers refused (``ValueError``; RFC 8259)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_mac(entry: Mapping[str, Any], key: bytes) -> str:
    """HMAC-SHA256 (hex) under the site ``key`` of ``LOG_DOMAIN`` + the canonical
    JSON of ``entry`` without its ``mac`` key (RFC 2104).

    Canonical: keys sorted, separators ``(",", ":")``, ASCII, no NaN/inf.
    """
    return _mac(key, LOG_DOMAIN, {k: v for k, v in entry.items() if k != "mac"})


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
            raise ValueError(
                f"payload field {name!r} is not a numeric array (dtype {arr.dtype})"
            )
        data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<")))
        out[name] = {
            "shape": list(arr.shape),
            "dtype": arr.dtype.name,
            "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        }
    return out


def _last_line(path: Path) -> bytes | None:
    """The last line of a file (read from the end), None for an empty file."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return None
        fh.seek(end - 1)
        if fh.read(1) != b"\n":
            raise AuditLogError(
                f"{path.name}: the last line has no end of line (an "
                "interrupted write?); verify and repair the log first"
            )
        pos, buf = end - 1, b""
        while pos > 0 and b"\n" not in buf:
            step = min(4096, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
        return buf.rsplit(b"\n", 1)[-1] if b"\n" in buf else buf


def log_head(path: str | os.PathLike, *, key: bytes | None = None) -> tuple[int, str]:
    """``(seq, mac)`` of the last entry (``(0, GENESIS_HASH)`` for no log): the
    anchor a site sends with every message. With ``key`` the last entry's MAC is
    checked (``AuditLogError`` when it fails)."""
    path = Path(path)
    if not path.exists() or (line := _last_line(path)) is None:
        return 0, GENESIS_HASH
    try:
        last = json.loads(line)
        seq, mac = int(last["seq"]), str(last["mac"])
    except (ValueError, KeyError, TypeError):
        raise AuditLogError(
            f"{path.name}: the last line is not a keyed audit entry; "
            "verify the log first"
        ) from None
    if key is not None and not hmac.compare_digest(mac, entry_mac(last, key)):
        raise AuditLogError(
            f"{path.name}: the last entry's MAC does not match "
            "(edited, or written without this site's key)"
        )
    return seq, mac


def append_entry(
    path: str | os.PathLike,
    *,
    key: bytes,
    requester: str,
    experiment: str,
    round: int | None,
    recipient: str,
    summary: Mapping[str, Any],
    event: str = "message",
    run: str | None = None,
    charge: Mapping[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> dict:
    """Append one event to the audit log and return the entry.

    The entry is ``{seq, time, event, run, requester, experiment, round, recipient,
    summary, charge, prev_mac, mac}``: ``seq`` counts from 1, ``time`` is UTC ISO
    8601 (``now``, default the current time), ``event`` one of :data:`EVENTS`,
    ``charge`` the privacy charged with it (run, ε, δ, rounds, ledger generation
    and MAC) or None, ``prev_mac`` the previous entry's ``mac`` (``GENESIS_HASH``
    for the first), ``mac`` :func:`entry_mac` under the site key. The previous
    entry's MAC is checked first; the line is written with one ``write`` in append
    mode, then flushed and fsynced. One writer per log is assumed.
    """
    if event not in EVENTS:
        raise ValueError(f"event: expected one of {EVENTS}, got {event!r}")
    path = Path(path)
    seq, prev = log_head(path, key=key)
    entry = {
        "seq": seq + 1,
        "time": _utc(now),
        "event": event,
        "run": run,
        "requester": requester,
        "experiment": experiment,
        "round": None if round is None else int(round),
        "recipient": recipient,
        "summary": dict(summary),
        "charge": None if charge is None else dict(charge),
        "prev_mac": prev,
    }
    entry["mac"] = entry_mac(entry, key)
    line = canonical_json(entry) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
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
                entry = json.loads(line)  # bytes: UTF-8 expected
            except ValueError as exc:
                raise AuditLogError(f"line {n} is not JSON ({exc})") from None
            if not isinstance(entry, dict):
                raise AuditLogError(f"line {n} is not a JSON object")
            entries.append(entry)
    return entries


def _bad_entry(entry: dict, n: int, prev: str, key: bytes) -> str | None:
    if "mac" not in entry:
        return (
            "no MAC: written without a site key (an unkeyed log, e.g. a "
            "SHA-256 chain, is not trusted: anyone can rewrite it)"
        )
    missing = [k for k in ENTRY_KEYS if k not in entry]
    if missing:
        return f"missing {', '.join(missing)}"
    extra = sorted(set(entry) - set(ENTRY_KEYS))
    if extra:
        return f"unexpected field(s) {', '.join(extra)} (an insertion)"
    try:
        ok = hmac.compare_digest(str(entry["mac"]), entry_mac(entry, key))
    except ValueError:
        ok = False
    if not ok:
        return (
            "MAC does not match the entry's content under the site key (it "
            "was edited or rewritten without the key)"
        )
    if entry["seq"] != n:
        return (
            f"seq is {entry['seq']!r} where {n} was expected (an entry was "
            "deleted, inserted or moved)"
        )
    if entry["prev_mac"] != prev:
        return (
            "prev_mac does not match the previous entry's MAC (an entry "
            "before it was removed, replaced or moved)"
        )
    return None


def _parse_anchor(anchor: str) -> tuple[int | None, str]:
    seq, _, mac = anchor.rpartition(":")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", mac) or (seq and not seq.isdigit()):
        raise ValueError(
            f"anchor: expected SEQ:MAC or MAC (64 hex digits), got {anchor!r}"
        )
    return (int(seq) if seq else None), mac.lower()


def verify_log(
    path: str | os.PathLike, *, key: bytes, anchor: str | None = None
) -> VerifyResult:
    """Check an audit log's MAC chain under the site ``key``.

    Each entry must carry a valid HMAC-SHA256 under the key, ``seq`` = its line
    number and ``prev_mac`` = the previous entry's ``mac``. This detects an
    edited, deleted, inserted or reordered entry, a truncation in the middle, and
    a rewrite of the chain by anyone without the key (an unkeyed entry fails).

    Entries cut from the *end* need an ``anchor`` held outside the site: the head
    ``"SEQ:MAC"`` (or ``"MAC"``) the site sent with a message (the coordinator
    keeps it). The log must hold that entry (it may have grown since); else the
    result is not ok and ``first_bad_seq`` is the first missing position.

    Raises
    ------
    AuditLogError
        When a line is not a JSON object (the log cannot be read).
    FileNotFoundError
        When there is no file.
    ValueError
        When ``anchor`` is not ``SEQ:MAC`` or ``MAC``.
    """
    want = None if anchor is None else _parse_anchor(anchor)
    entries = read_log(path)
    prev, macs, ledger = GENESIS_HASH, {}, 0
    for n, entry in enumerate(entries, start=1):
        reason = _bad_entry(entry, n, prev, key)
        if reason is not None:
            return VerifyResult(
                False, len(entries), n, f"entry {n}: {reason}", prev, ledger
            )
        prev = entry["mac"]
        macs[prev] = n
        if isinstance(entry["charge"], dict):
            ledger = int(entry["charge"].get("ledger_generation", ledger))
    if want is not None:
        seq, mac = want
        at = macs.get(mac)
        if at is None or (seq is not None and at != seq):
            first = len(entries) + 1 if seq is None else min(seq, len(entries) + 1)
            return VerifyResult(
                False,
                len(entries),
                first,
                f"the anchor {anchor} is not an entry of this log: "
                "entries were cut from the end or rewritten (or "
                "the anchor belongs to another log)",
                prev,
                ledger,
            )
    return VerifyResult(True, len(entries), None, "", prev, ledger)
