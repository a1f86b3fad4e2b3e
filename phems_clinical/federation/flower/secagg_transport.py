"""Secure aggregation over Flower: the SecAgg stages as Flower messages.

With ``secagg = true`` in the run config, a Flower round runs the protocol of
Bonawitz et al. [1]_ (:mod:`phems_clinical.federation.secagg`) instead of sending
payloads in clear:

* the ``train`` message makes each site compute its payload
  (``algorithm.local_update``), flatten it in ``message_spec`` order
  (:func:`~phems_clinical.federation.core.flatten_payload`), keep the vector and its
  SecAgg site state in its node-local state folder (:func:`save_private`, mode
  0600) and reply with its stage-0 key advertisement only;
* each later stage of :data:`secagg.STAGES <phems_clinical.federation.secagg.STAGES>`
  is one message exchange of type :data:`MESSAGE_TYPE` (``train.secagg``, the
  ClientApp's ``@app.train("secagg")`` handler): the server sends what the
  previous server step produced (the roster, each site's inbox of encrypted
  shares, the consistency or unmasking request) and collects the sites' replies
  (:func:`server_stages`, a loop over the stage names, so a protocol with more
  stages drops in);
* the server sees key advertisements, ciphertexts, masked vectors, signatures and
  shares, and decodes only the sum, which it unflattens and passes to
  ``algorithm.aggregate``. The site deletes its SecAgg secrets after its last
  stage (and any left by an aborted attempt when the next round begins).

Where a site keeps its secrets between stages: Flower's stock ClientApp runs every
message in a new process, so they go to an owner-only file in the site's state
folder (:func:`save_private`, deleted as above). A long-lived ClientApp host
(:mod:`~phems_clinical.federation.flower.host`) calls :func:`hold_secrets_in_memory`
and keeps them in its own memory instead: nothing is written, and a host that
stops mid-round loses them (the site then drops out of that round, as the
protocol allows).

Dropouts follow the protocol: a site that fails, times out or sends a malformed
message at a stage is left out of that stage; with fewer than ``threshold`` sites
left the attempt fails (:class:`~phems_clinical.federation.secagg.SecAggAbort`)
and the server's retry/abort logic applies.

Identities: each site holds an Ed25519 identity key (``secagg-identity`` in its
node config, by default :data:`~phems_clinical.federation.flower.config.
IDENTITY_FILE` in its folder; made with ``secagg.generate_identity``, mode 0600)
and a trusted roster of all K sites' identity public keys (``secagg-trusted``,
JSON ``{site id: hex}``), so a coordinator cannot substitute them: every key
advertisement is checked against that roster (:func:`site_advertise`).

Messages cross the wire as a ``ConfigRecord`` of scalars and bytes plus an
``ArrayRecord`` for numpy arrays (:func:`to_record`/:func:`from_record`), with a
type tag per field; only the NamedTuple classes of :mod:`~phems_clinical.federation.
secagg` are rebuilt, and an unknown tag, class or field is refused.

Why not Flower's own SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` with
``flwr.client.mod.secaggplus_mod``): in Flower 1.41 it exists only in the legacy
API (``LegacyContext`` and legacy strategies), not for the Message API that these
apps use. It is a protocol against an honest-but-curious server (no signed key
advertisements, no consistency round), so it would not meet this suite's threat
model. Its masks come from a seed XOR-folded to 32 bits and expanded by NumPy's
MT19937, which is not a cryptographic generator. And it aggregates a weighted
model vector, whereas our algorithms sum arbitrary declared payloads (FOCEI
objectives and gradients, EP natural parameters). This transport runs the
project's own protocol (:mod:`~phems_clinical.federation.secagg`, ChaCha20 masks,
Ed25519 signatures) over plain Flower messages instead.

References
----------
.. [1] Bonawitz K, Ivanov V, Kreuter B, et al. Practical secure aggregation for
   privacy-preserving machine learning. ACM CCS 2017, 1175-1191. IACR ePrint
   2017/281.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from phems_clinical.federation import secagg
from phems_clinical.federation.flower.config import RunSettings, SiteConfig
from phems_clinical.federation.messages import MessageRejected
from phems_clinical.federation.secure import default_secagg_config
from phems_clinical.federation.site_errors import SiteProtocolError
from phems_clinical.keyfiles import create_secret_file, owner_only_problem

MESSAGE_TYPE = "train.secagg"
"""Flower message type of the stages after the first (``@app.train("secagg")``)."""

ROUND_ID_KEY = "secagg-round-id"
"""Key of the SecAgg round id in a ``train`` message's config: its presence makes
the site reply with a key advertisement instead of its payload."""

_CLASSES = {
    name: obj
    for name, obj in vars(secagg).items()
    if isinstance(obj, type)
    and issubclass(obj, tuple)
    and hasattr(obj, "_fields")
    and obj.__module__ == secagg.__name__
}
"""The NamedTuples a message may hold (those of the secagg module only)."""

_INT64 = 2**63


def site_id(k: int) -> str:
    """The SecAgg (and identity roster) id of site index ``k``."""
    return f"site{int(k):04d}"


def secagg_config(settings: RunSettings) -> secagg.SecAggConfig:
    """The run's :class:`~phems_clinical.federation.secagg.SecAggConfig`:
    :func:`~phems_clinical.federation.secure.default_secagg_config` (clip 1e6, 48
    bits, threshold K - 1 or ``min-sites``) with the run config's non-zero
    ``secagg-clip``, ``secagg-bits``, ``secagg-threshold``; checked for K sites."""
    cfg = default_secagg_config(settings.num_sites, settings.min_sites or None)
    cfg = cfg._replace(
        clip=float(settings.secagg_clip or cfg.clip),
        bits=int(settings.secagg_bits or cfg.bits),
        threshold=int(settings.secagg_threshold or cfg.threshold),
    )
    secagg.check_config(cfg, settings.num_sites)
    return cfg


# ------------------------------------------------------------------ the codec


def flatten(obj: Any, path: str = "m") -> dict[str, Any]:
    """``obj`` as ``{path: scalar | bytes | numpy array}`` with a type tag at
    ``path + "@"`` for every node (NamedTuples of the secagg module, dicts with str
    keys, tuples, None, bool, int, float, str, bytes, numpy arrays)."""
    out: dict[str, Any] = {}
    _put(obj, path, out)
    return out


def _put(obj: Any, path: str, out: dict[str, Any]) -> None:
    tag = path + "@"
    cls = _CLASSES.get(type(obj).__name__)
    if isinstance(obj, tuple) and cls is type(obj):
        out[tag] = "nt:" + type(obj).__name__
        for name in cls._fields:
            _put(getattr(obj, name), f"{path}.{name}", out)
    elif isinstance(obj, Mapping):
        out[tag], out[path + "#"] = "dict", len(obj)
        for i, (key, value) in enumerate(obj.items()):
            if not isinstance(key, str):
                raise TypeError(
                    f"{path}: dict keys must be str, got {type(key).__name__}"
                )
            out[f"{path}.{i}^"] = key
            _put(value, f"{path}.{i}", out)
    elif isinstance(obj, tuple | list):
        out[tag], out[path + "#"] = "tuple", len(obj)
        for i, value in enumerate(obj):
            _put(value, f"{path}.{i}", out)
    elif isinstance(obj, np.ndarray | np.generic):
        out[tag], out[path] = "array", np.array(obj, order="C")
    elif obj is None:
        out[tag] = "none"
    elif isinstance(obj, bool):
        out[tag], out[path] = "bool", obj
    elif isinstance(obj, int):
        big = not -_INT64 <= obj < _INT64
        out[tag], out[path] = ("bigint", str(obj)) if big else ("int", obj)
    elif isinstance(obj, float | str | bytes):
        out[tag], out[path] = type(obj).__name__, obj
    else:
        raise TypeError(f"{path}: cannot serialise a {type(obj).__name__}")


_SCALAR = {
    "bool": bool,
    "int": int,
    "float": float,
    "str": str,
    "bytes": bytes,
    "bigint": str,
}


def unflatten(flat: Mapping[str, Any], path: str = "m") -> Any:
    """Inverse of :func:`flatten`.

    Raises
    ------
    MessageRejected
        On a missing, unexpected or mistyped field or an unknown class.
    """
    used: set[str] = set()
    obj = _get(flat, path, used)
    extra = sorted(set(flat) - used)
    if extra:
        raise MessageRejected(f"secagg message: unexpected fields {extra[:5]}")
    return obj


def _take(flat: Mapping[str, Any], key: str, used: set[str], kind: type) -> Any:
    if key not in flat:
        raise MessageRejected(f"secagg message: missing field {key!r}")
    value = flat[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MessageRejected(
            f"secagg message: field {key!r} is a "
            f"{type(value).__name__}, expected {kind.__name__}"
        )
    used.add(key)
    return value


def _get(flat: Mapping[str, Any], path: str, used: set[str]) -> Any:
    tag = _take(flat, path + "@", used, str)
    if tag.startswith("nt:"):
        cls = _CLASSES.get(tag[3:])
        if cls is None:
            raise MessageRejected(
                f"secagg message: unknown type {tag[3:]!r} at {path!r}"
            )
        return cls(*[_get(flat, f"{path}.{f}", used) for f in cls._fields])
    if tag in ("dict", "tuple"):
        n = _take(flat, path + "#", used, int)
        if not 0 <= n <= 1 << 20:
            raise MessageRejected(f"secagg message: {path!r} has {n} items")
        if tag == "tuple":
            return tuple(_get(flat, f"{path}.{i}", used) for i in range(n))
        out = {}
        for i in range(n):
            key = _take(flat, f"{path}.{i}^", used, str)
            if key in out:
                raise MessageRejected(f"secagg message: {path!r} repeats {key!r}")
            out[key] = _get(flat, f"{path}.{i}", used)
        return out
    if tag == "array":
        return _take(flat, path, used, np.ndarray)
    if tag == "none":
        return None
    if tag not in _SCALAR:
        raise MessageRejected(f"secagg message: unknown tag {tag!r} at {path!r}")
    value = _take(flat, path, used, _SCALAR[tag])
    return int(value) if tag == "bigint" else value


def to_record(obj: Any, header: Mapping[str, Any]):
    """A Flower ``RecordDict``: ``config`` (``header``: stage, round, site, round
    id), ``secagg`` (a ``ConfigRecord`` of the scalars and bytes of ``obj``) and,
    when ``obj`` holds arrays, ``secagg-arrays`` (an ``ArrayRecord``)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    flat = flatten(obj)
    arrays = {k: Array(v) for k, v in flat.items() if isinstance(v, np.ndarray)}
    content = RecordDict(
        {
            "config": ConfigRecord(dict(header)),
            "secagg": ConfigRecord({k: v for k, v in flat.items() if k not in arrays}),
        }
    )
    if arrays:
        content["secagg-arrays"] = ArrayRecord(arrays)
    return content


def from_record(content) -> Any:
    """The message object of a :func:`to_record` ``RecordDict`` (its header is
    ``content["config"]``)."""
    try:
        flat = dict(content["secagg"])
        if "secagg-arrays" in content:
            record = content["secagg-arrays"]
            flat.update({k: record[k].numpy() for k in record})
    except (KeyError, TypeError, ValueError) as err:
        raise MessageRejected(f"secagg message: malformed record ({err})") from None
    return unflatten(flat)


def check_header(content, stage: str, k: int, r: int, round_id: int) -> None:
    """Refuse (``MessageRejected``) a record not for ``stage`` of site ``k``,
    round ``r``, SecAgg round ``round_id``."""
    try:
        head = content["config"]
        got = (
            str(head["stage"]),
            int(head["site-index"]),
            int(head["round"]),
            int(head[ROUND_ID_KEY]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise MessageRejected(f"secagg message: header field {err} missing") from None
    if got != (stage, k, r, round_id):
        raise MessageRejected(
            f"secagg message for (stage, site, round, round id) "
            f"{got}, expected {(stage, k, r, round_id)}"
        )


def header(stage: str, k: int, r: int, round_id: int) -> dict[str, Any]:
    """The ``config`` of a stage message."""
    return {
        "stage": stage,
        "site-index": int(k),
        "round": int(r),
        ROUND_ID_KEY: int(round_id),
    }


# -------------------------------------------------------- node-local secrets


def save_private(path: Path, obj: Any) -> Path:
    """Write ``obj`` (see :func:`flatten`) as JSON readable by the owner only
    (0600, created so; atomic rename)."""
    flat = {}
    for key, v in flatten(obj).items():
        if isinstance(v, np.ndarray):
            flat[key] = ["a", v.dtype.str, list(v.shape), v.tobytes().hex()]
        elif isinstance(v, bytes):
            flat[key] = ["b", v.hex()]
        else:
            flat[key] = ["v", v]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        json.dump(flat, fh)
    tmp.replace(path)
    return path


def load_private(path: Path) -> Any:
    """Read a :func:`save_private` file."""
    flat: dict[str, Any] = {}
    for key, (kind, *v) in json.loads(Path(path).read_text()).items():
        if kind == "a":
            flat[key] = (
                np.frombuffer(bytes.fromhex(v[2]), dtype=np.dtype(v[0]))
                .reshape(v[1])
                .copy()
            )
        elif kind == "b":
            flat[key] = bytes.fromhex(v[0])
        else:
            flat[key] = v[0]
    return unflatten(flat)


def _state_file(folder: Path, round_id: int) -> Path:
    return Path(folder) / f"secagg-{int(round_id):012d}.json"


_IN_MEMORY: dict[tuple[str, int], Any] = {}
"""Secrets held in this process (``hold_secrets_in_memory``): (folder, round id)
-> the site's SecAgg state, its vector, round and site index."""

_MEMORY: list[bool] = [False]
_MEMORY_LOCK = threading.Lock()


def hold_secrets_in_memory(on: bool = True) -> None:
    """Keep this process's SecAgg secrets in memory (``on``) or in owner-only
    files of the site's state folder (the default; Flower's process-per-message
    ClientApp needs the files). Switching drops any secrets held in memory."""
    with _MEMORY_LOCK:
        _MEMORY[0] = bool(on)
        _IN_MEMORY.clear()


def secrets_in_memory() -> bool:
    """Whether :func:`hold_secrets_in_memory` is on in this process."""
    return _MEMORY[0]


def _keep(folder: Path, round_id: int, obj: Any) -> None:
    """Hold a round's secrets (memory or an owner-only file)."""
    if _MEMORY[0]:
        with _MEMORY_LOCK:
            _IN_MEMORY[str(Path(folder)), int(round_id)] = obj
    else:
        save_private(_state_file(folder, round_id), obj)


def _kept(folder: Path, round_id: int) -> Any | None:
    """A round's secrets, or None when this site holds none."""
    if _MEMORY[0]:
        with _MEMORY_LOCK:
            return _IN_MEMORY.get((str(Path(folder)), int(round_id)))
    path = _state_file(folder, round_id)
    return load_private(path) if path.is_file() else None


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold the SecAgg lock of ``folder``: Flower may run two messages for one node
    at once, and two copies of a stage must not both read the same state (e.g.
    sign two different survivor sets, or answer two unmasking requests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".secagg.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def clear_secrets(folder: Path) -> int:
    """Delete every SecAgg secret of ``folder`` (a finished or abandoned round's),
    held in memory or in files; returns how many."""
    folder = Path(folder)
    with _MEMORY_LOCK:
        mine = [k for k in _IN_MEMORY if k[0] == str(folder)]
        for k in mine:
            del _IN_MEMORY[k]
    n = len(mine)
    if not folder.is_dir():
        return n
    for path in folder.glob("secagg-*.json"):
        path.unlink(missing_ok=True)
        n += 1
    return n


def ensure_identity(path: Path) -> bytes:
    """The Ed25519 identity public key of the site whose private key is at
    ``path``; the key pair is made (``secagg.generate_identity``, mode 0600) if
    the file does not exist."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.exists():
        private, public = secagg.generate_identity()
        create_secret_file(path, private)
        return public
    return (
        Ed25519PrivateKey.from_private_bytes(read_identity(path))
        .public_key()
        .public_bytes_raw()
    )


def read_identity(path: Path) -> bytes:
    """The raw Ed25519 private key at ``path``; refused when others may read it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            "node config secagg-identity: no identity key file "
            "(make one with secagg.generate_identity, mode 0600)"
        )
    if owner_only_problem(path):
        raise PermissionError(
            "node config secagg-identity: the key file is "
            "readable by others; expected mode 0600"
        )
    raw = path.read_bytes()
    if len(raw) != 32:
        raise ValueError(
            "node config secagg-identity: expected a 32-byte raw Ed25519 private key"
        )
    return raw


def write_trusted(path: Path, roster: Mapping[str, bytes]) -> Path:
    """Write a trusted identity roster ``{site id: Ed25519 public key}`` (hex)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({s: bytes(pk).hex() for s, pk in sorted(roster.items())}, indent=1)
        + "\n"
    )
    return path


def read_trusted(path: Path) -> dict[str, bytes]:
    """A site's trusted identity roster (see :func:`write_trusted`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            "node config secagg-trusted: no trusted identity roster file"
        )
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError(
            "node config secagg-trusted: expected a JSON object "
            "{site id: hex Ed25519 public key}"
        )
    return {k: bytes.fromhex(v) for k, v in data.items()}


# ---------------------------------------------------------------- site side


def site_advertise(
    folder: Path,
    site: SiteConfig,
    settings: RunSettings,
    k: int,
    r: int,
    round_id: int,
    vector: np.ndarray,
):
    """Stage 0 at site ``k``: keep ``vector`` (the flattened payload) and the new
    SecAgg state in ``folder`` (0600); returns the reply content (the key
    advertisement only)."""
    with _exclusive(folder):
        return _advertise(folder, site, settings, k, r, round_id, vector)


def _advertise(folder, site, settings, k, r, round_id, vector):
    clear_secrets(folder)  # secrets of an earlier, unfinished attempt
    cfg = secagg_config(settings)
    me = site_id(k)
    trusted = read_trusted(site.secagg_trusted)
    if me not in trusted:
        raise ValueError(
            f"node config secagg-trusted: this site ({me}) is not in "
            "its own trusted roster"
        )
    # signed with the site's identity; the threshold is checked against the K of
    # the site's own roster, not the coordinator's num-sites
    advert, state = secagg.site_advertise_keys(
        me, cfg, read_identity(site.secagg_identity), trusted, round_id=round_id
    )
    _keep(
        folder,
        round_id,
        {
            "state": state,
            "x": np.asarray(vector, np.float64),
            "round": int(r),
            "site-index": int(k),
        },
    )
    return to_record(advert, header(secagg.STAGES[0], k, r, round_id))


def encoding_key(seed: int, n_sites: int, k: int, r: int):
    """The stochastic-rounding key of site ``k`` in round ``r``: its round key
    (:func:`~phems_clinical.federation.core.site_round_key`) folded with a
    constant, so it never equals the key of its local update. Reproducible by
    design; the masks come from the OS CSPRNG."""
    import jax

    from phems_clinical.federation.core import simulated_site_keys, site_round_key

    base = site_round_key(simulated_site_keys(jax.random.key(seed), n_sites)[k], r)
    return jax.random.fold_in(base, 0x5EC)


def site_stage(content, folder: Path, site: SiteConfig, settings: RunSettings):
    """A later stage at this site: the reply content to a :data:`MESSAGE_TYPE`
    message (the state file is deleted after the site's last stage, or at once
    when the site refuses the stage: ``SiteProtocolError``, which leaves the site
    as the category ``protocol_error`` only)."""
    try:
        head = content["config"]
        stage, k = str(head["stage"]), int(head["site-index"])
        r, round_id = int(head["round"]), int(head[ROUND_ID_KEY])
    except (KeyError, TypeError, ValueError) as err:
        raise MessageRejected(f"secagg message: header field {err} missing") from None
    if k != site.site_index:
        raise SiteProtocolError(
            f"secagg message for site {k} delivered to site {site.site_index}"
        )
    if stage not in secagg.STAGES[1:]:
        raise MessageRejected(
            f"secagg message: stage {stage!r} is not one of {list(secagg.STAGES[1:])}"
        )
    with _exclusive(folder):  # load, run the stage, save: one message at a time
        return _stage(content, folder, settings, stage, k, r, round_id)


def _stage(content, folder, settings, stage, k, r, round_id):
    kept = _kept(folder, round_id)
    if kept is None:
        raise SiteProtocolError(
            f"stage {stage}: this site holds no SecAgg state for "
            "the round (it did not advertise keys for it, or "
            "the round already ended)"
        )
    if (kept["round"], kept["site-index"]) != (r, k):
        raise MessageRejected(
            "secagg message: round or site differs from the "
            "round this site advertised keys for"
        )
    state = kept["state"]
    try:
        incoming = from_record(content)
        if stage == "masked_input":
            enc = secagg.encode(
                encoding_key(settings.seed, settings.num_sites, k, r),
                secagg.saturate(kept["x"], state.cfg),
                state.cfg,
            )
            reply, state = secagg.site_masked_input(state, incoming, enc.q)
        else:
            reply, state = getattr(secagg, _SITE_STEP[stage])(state, incoming)
    except secagg.SecAggError as err:  # the protocol refuses the server's message
        clear_secrets(folder)  # a refused stage ends the round for this site
        raise SiteProtocolError(f"secagg {stage}: {err}") from err
    except BaseException:
        clear_secrets(folder)
        raise
    if stage == secagg.STAGES[-1]:
        clear_secrets(folder)
    else:
        _keep(folder, round_id, {**kept, "state": state})
    return to_record(reply, header(stage, k, r, round_id))


_SITE_STEP = {
    "share_keys": "site_share_keys",
    "masked_input": "site_masked_input",
    "consistency_check": "site_consistency_check",
    "unmasking": "site_unmask",
}

# -------------------------------------------------------------- server side

_SERVER_STEP = {
    "share_keys": "server_route_shares",
    "masked_input": "server_collect_masked",
    "consistency_check": "server_collect_consistency",
    "unmasking": "server_unmask",
}
"""The server function that takes the sites' replies of each stage."""

_REPLY = {
    "advertise_keys": "AdvertiseKeys",
    "share_keys": "ShareKeys",
    "masked_input": "MaskedInput",
    "consistency_check": "ConsistencySignature",
    "unmasking": "UnmaskShares",
}
"""The message class a site answers each stage with."""

Send = Callable[[str, Mapping[int, Any]], tuple[dict[int, Any], list[tuple[int, str]]]]
"""``send(stage, {site index: content}) -> (replies by site index, [(site, why
not)])``: one message exchange of a stage (the ServerApp's over its Grid)."""


def read_reply(content, stage: str, k: int, r: int, round_id: int) -> Any:
    """Site ``k``'s reply to ``stage``, checked (``MessageRejected``)."""
    check_header(content, stage, k, r, round_id)
    msg = from_record(content)
    if type(msg).__name__ != _REPLY[stage]:
        raise MessageRejected(
            f"secagg {stage} reply: a {type(msg).__name__}, expected {_REPLY[stage]}"
        )
    return msg


def server_stages(
    cfg: secagg.SecAggConfig,
    adverts: Mapping[int, Any],
    send: Send,
    *,
    r: int,
    round_id: int,
    n_sites: int,
    left_out: list[tuple[int, str]] | None = None,
) -> secagg.AggregateResult:
    """Run the stages after the key advertisements (``adverts``, by site index)
    over ``send``; returns the server's result. Sites left out at a stage (by
    index, with the stage and why) are appended to ``left_out``.

    Raises
    ------
    SecAggAbort
        Fewer than ``cfg.threshold`` sites left at some stage.
    SecAggError
        A message the protocol refuses (e.g. a forged signature).
    """
    index = {site_id(k): k for k in range(n_sites)}
    out, state = secagg.server_collect_keys(
        cfg,
        {site_id(k): a for k, a in adverts.items()},
        round_id=round_id,
        n_sites=n_sites,
    )
    left_out = [] if left_out is None else left_out
    for stage in secagg.STAGES[1:]:
        if isinstance(out, Mapping):
            to = list(out)
        else:
            to = list(out.survivors)
        contents = {
            index[s]: to_record(
                out[s] if stage == "masked_input" else out,
                header(stage, index[s], r, round_id),
            )
            for s in to
        }
        replies, failed = send(stage, contents)
        left_out += [(k, f"{stage}: {why}") for k, why in failed]
        msgs = {}
        for k, content in sorted(replies.items()):
            try:
                msgs[site_id(k)] = read_reply(content, stage, k, r, round_id)
            except MessageRejected as err:
                left_out.append((k, f"{stage}: rejected: {err}"))
        step = getattr(secagg, _SERVER_STEP[stage])
        if stage == secagg.STAGES[-1]:
            return step(state, msgs)
        out, state = step(state, msgs)
    raise AssertionError("unreachable: the last stage returns")


__all__ = [
    "MESSAGE_TYPE",
    "ROUND_ID_KEY",
    "check_header",
    "clear_secrets",
    "encoding_key",
    "ensure_identity",
    "flatten",
    "from_record",
    "header",
    "hold_secrets_in_memory",
    "load_private",
    "read_identity",
    "read_reply",
    "read_trusted",
    "save_private",
    "secagg_config",
    "secrets_in_memory",
    "server_stages",
    "site_advertise",
    "site_id",
    "site_stage",
    "to_record",
    "unflatten",
    "write_trusted",
]
