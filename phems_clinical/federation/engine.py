"""The in-process federated engine: K simulated hospitals in one process, CPU or GPU.

When every site's data have the same shapes (see
:func:`phems_clinical.federation.pk_sites.pad_sites`) the sites are stacked and a
round -- broadcast, every site's ``local_update`` under ``jax.vmap``, the masked sum
and the server's ``aggregate`` -- is one compiled call, so 100 hospitals cost one
dispatch per round. With secure aggregation the round is split in two compiled
calls around the host-side masking protocol.

Guarantees
----------
* **Deterministic**: site ``k``'s key in round ``r`` is
  ``fold_in(site_key_k, r)``, the server's ``fold_in(key', r)``; nothing depends on
  wall-clock or iteration order, so the same seed gives the same result, and a run
  resumed from a checkpoint gives the identical result. Exception by design: with
  patient-level DP the site keys are the sites' own secrets from the OS CSPRNG
  (``site_secrets``), so only a caller holding them reproduces the run; with
  hospital-level DP the server's key is its own CSPRNG secret
  (``core.server_run_key``).
* **Population-level messages only**: every payload is checked against
  ``data_schemas/federation_message.schema.json`` and the algorithm's declared
  shapes before it is summed (:func:`phems_clinical.federation.messages.check_payload`);
  ``on_message`` sees exactly what would leave each site.
* **Faults**: a site that fails (an exception in looped mode, or an injected
  failure/timeout) is dropped from the round and the drop is recorded, provided at
  least ``min_sites`` sites remain; otherwise the round is retried ``retries``
  times and then the run aborts with :class:`FederationAborted` (the checkpoint of
  the last completed round is kept).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical._typing import Key
from phems_clinical.federation import dp as dpm
from phems_clinical.federation.core import (
    Algorithm,
    Payload,
    run_site_keys,
    server_round_key,
    server_run_key,
    site_round_key,
    site_size,
    stack_sites,
    sum_payloads,
    unstack_sites,
)
from phems_clinical.federation.gate import SiteGate, admit, head, release, settle
from phems_clinical.federation.messages import check_payload
from phems_clinical.federation.site_errors import record_site_error
from phems_clinical.outputs import write_atomic
from phems_clinical.progress import ProgressFn, begin, end, silent, step


class FederationAborted(RuntimeError):
    """A round could not gather ``min_sites`` sites after its retries."""


class RoundRecord(NamedTuple):
    """What happened in one round (kept in the results); ``audit_heads`` holds,
    for each participating site with a gate, ``(site, seq, mac)`` of its audit log
    after the round: the coordinator's anchors (``phems audit verify --anchor``)."""

    round: int
    participants: tuple[int, ...]
    dropped: tuple[tuple[int, str], ...]
    attempts: int
    seconds: float
    audit_heads: tuple[tuple[int, int, str], ...] = ()


class FederatedRun(NamedTuple):
    """Final server and site states, per-round history, the algorithm's result and,
    with patient-level DP, each site's privacy statement (ε, δ, unit)."""

    server: Any
    sites: list
    history: list[RoundRecord]
    result: dict
    rounds: int
    converged: bool
    privacy: list[dict] | None = None


Aggregator = Callable[[Key, dict[int, Payload], Algorithm], Payload]
"""``(key, {site index: payload} of the participating sites, algorithm) -> summed
payload``; the default adds them in the clear (see
:func:`phems_clinical.federation.secure.secagg_aggregator` for the masked sum)."""

FaultFn = Callable[[int, int, int], str | None]
"""``(round, site, attempt) -> None`` or a reason (``"failed"``, ``"timeout"``)."""


def _plain_sum(key, payloads, algorithm):
    del key
    return {k: sum(p[k] for p in payloads.values()) for k in algorithm.message_spec}


CHECKPOINT_FILE = "state.eqx"
"""The one checkpoint file in a checkpoint folder (see :func:`save_checkpoint`)."""

_MAGIC = b"PHEMS-CHECKPOINT 1\n"
_LEGACY = ("history.json",)  # the two-file format of earlier versions


class CheckpointError(ValueError):
    """A checkpoint folder holds something that cannot be resumed safely."""


def checkpoint_path(directory: str | Path) -> Path:
    """The checkpoint file of ``directory`` (it may not exist)."""
    return Path(directory) / CHECKPOINT_FILE


def save_checkpoint(
    directory: Path, server, sites: list, history: list[RoundRecord]
) -> None:
    """Write the state after ``len(history)`` rounds as one file, atomically.

    The file (:data:`CHECKPOINT_FILE`) holds a magic line, a JSON manifest (the
    round count, the history and the SHA-256 and length of the state), the
    manifest's own SHA-256, and the state's leaves
    (``equinox.tree_serialise_leaves``). It is replaced by
    :func:`phems_clinical.outputs.write_atomic` (temporary file, fsync, rename,
    fsync of the folder): a kill at any moment leaves the previous checkpoint or
    the new one, never a mixture.
    """
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, (server, sites))
    state = buf.getvalue()
    manifest = json.dumps(
        {
            "round": len(history),
            "history": [_record_json(r) for r in history],
            "state_sha256": hashlib.sha256(state).hexdigest(),
            "state_bytes": len(state),
        },
        allow_nan=False,
    ).encode()
    digest = hashlib.sha256(manifest).hexdigest().encode()
    write_atomic(
        checkpoint_path(directory), _MAGIC + manifest + b"\n" + digest + b"\n" + state
    )


def load_checkpoint(
    directory: Path, like_server, like_sites: list
) -> tuple[Any, list, list[RoundRecord]] | None:
    """The saved state, or ``None`` when ``directory`` has no checkpoint.

    Raises :class:`CheckpointError` naming ``directory`` when the file is not a
    checkpoint of this format, a hash or length does not match, the round count
    disagrees with the history, or the state does not fit this run's shapes:
    never a silent resume from a damaged or foreign checkpoint.
    """
    directory = Path(directory)
    path = checkpoint_path(directory)
    if not path.exists():
        legacy = [n for n in _LEGACY if (directory / n).exists()]
        if legacy:
            raise CheckpointError(
                f"checkpoint {directory}: holds {', '.join(legacy)} of the older "
                "two-file format, which cannot be verified; start in an empty "
                "checkpoint folder"
            )
        return None

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {directory}: {why}; it cannot be resumed "
            "safely (start in an empty checkpoint folder, or "
            "restore the checkpoint)"
        )

    raw = path.read_bytes()
    if not raw.startswith(_MAGIC):
        raise bad(f"{CHECKPOINT_FILE} is not a checkpoint of this format")
    parts = raw[len(_MAGIC) :].split(b"\n", 2)
    if len(parts) != 3:
        raise bad(f"{CHECKPOINT_FILE} is truncated")
    manifest, digest, state = parts
    if hashlib.sha256(manifest).hexdigest().encode() != digest:
        raise bad("the manifest does not match its SHA-256")
    try:
        meta = json.loads(manifest)
        history = [_record(r) for r in meta["history"]]
        n_round, want_sha, want_len = (
            meta["round"],
            meta["state_sha256"],
            meta["state_bytes"],
        )
    except (ValueError, KeyError, TypeError) as err:
        raise bad(f"the manifest is malformed ({err})") from None
    if len(state) != want_len or hashlib.sha256(state).hexdigest() != want_sha:
        raise bad("the saved state does not match the SHA-256 in its manifest")
    if n_round != len(history) or [r.round for r in history] != list(range(n_round)):
        raise bad(
            f"the manifest says {n_round} rounds but its history has "
            f"{[r.round for r in history]}"
        )
    foreign = bad(
        "the saved state does not fit this run (another algorithm, "
        "model or number of sites?)"
    )
    buf = io.BytesIO(state)
    try:
        server, sites = eqx.tree_deserialise_leaves(buf, (like_server, like_sites))
    except Exception:  # noqa: BLE001 - any mismatch is a foreign state
        raise foreign from None
    if buf.tell() != len(state):  # fewer leaves here than were saved
        raise foreign
    return server, list(sites), history


def _record_json(r: RoundRecord) -> dict:
    d = r._asdict()
    return {
        **d,
        "participants": [int(k) for k in r.participants],
        "dropped": [[int(k), str(why)] for k, why in r.dropped],
        "audit_heads": [[int(k), int(q), str(m)] for k, q, m in r.audit_heads],
    }


def _record(d: dict) -> RoundRecord:
    return RoundRecord(
        int(d["round"]),
        tuple(int(k) for k in d["participants"]),
        tuple((int(k), str(why)) for k, why in d["dropped"]),
        int(d["attempts"]),
        float(d["seconds"]),
        tuple((int(k), int(q), str(m)) for k, q, m in d.get("audit_heads", ())),
    )


def _same_shapes(trees: Sequence) -> bool:
    shapes = [
        jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), t) for t in trees
    ]
    return all(s == shapes[0] for s in shapes[1:])


class _Compiled(NamedTuple):
    local: Callable
    local_vmapped: Callable
    aggregate: Callable
    whole_round: Callable
    done: Callable


_COMPILED: dict[int, tuple[Algorithm, _Compiled]] = {}


def _compile(algorithm: Algorithm) -> _Compiled:
    """The jitted round functions of ``algorithm``, built once per algorithm object
    (so repeated runs and resumed runs reuse the compiled code)."""
    hit = _COMPILED.get(id(algorithm))
    if hit is not None and hit[0] is algorithm:
        return hit[1]
    compiled = _build(algorithm)
    _COMPILED[id(algorithm)] = (algorithm, compiled)
    return compiled


def _build(algorithm: Algorithm) -> _Compiled:
    def local_vmapped(message, data, states, keys, participate):
        payloads, new, metrics = jax.vmap(
            algorithm.local_update, in_axes=(None, 0, 0, 0)
        )(message, data, states, keys)
        keep = jax.tree.map(
            lambda n, o: jnp.where(
                participate.reshape((-1,) + (1,) * (n.ndim - 1)), n, o
            ),
            new,
            states,
        )
        return payloads, keep, metrics

    def whole_round(server, data, states, keys, participate, server_key):
        message = algorithm.broadcast(server)
        payloads, states, metrics = local_vmapped(
            message, data, states, keys, participate
        )
        total = sum_payloads(payloads, participate)
        return algorithm.aggregate(server, total, server_key), states, payloads

    return _Compiled(
        jax.jit(algorithm.local_update),
        jax.jit(local_vmapped),
        jax.jit(algorithm.aggregate),
        jax.jit(whole_round),
        jax.jit(algorithm.done),
    )


def run_federated(
    key: Key,
    algorithm: Algorithm,
    sites: Sequence[Any],
    *,
    max_rounds: int | None = None,
    aggregator: Aggregator | None = None,
    min_sites: int | None = None,
    retries: int = 2,
    fault: FaultFn | None = None,
    checkpoint_dir: str | Path | None = None,
    on_round: Callable[[RoundRecord, Any], None] | None = None,
    on_message: Callable[[int, int, Payload], None] | None = None,
    vectorise: bool = True,
    stop_after: int | None = None,
    gates: Sequence[SiteGate | None] | None = None,
    site_secrets: Key | None = None,
    progress: ProgressFn = silent,
) -> FederatedRun:
    """Run ``algorithm`` over ``sites`` (one data pytree per hospital) in process.

    Parameters
    ----------
    key : PRNG key
        The run seed; the server's key derives from it, and so do the simulated
        sites' keys of a run without patient-level DP (same seed, same run).
    max_rounds : int, optional
        Defaults to ``algorithm.max_rounds``; the run also stops when
        ``algorithm.done`` is true.
    aggregator : callable, optional
        How payloads are summed; ``None`` sums them in the clear inside the
        compiled round. Pass :func:`phems_clinical.federation.secure.secagg_aggregator`
        for secure aggregation.
    min_sites : int, optional
        Fewest sites a round may complete with (default: all of them).
    fault : callable, optional
        Fault injection ``(round, site, attempt) -> reason | None``.
    checkpoint_dir : path, optional
        Save the state after every round there (one file, written atomically; see
        :func:`save_checkpoint`), and resume from it when it holds a checkpoint; a
        damaged or foreign checkpoint raises :class:`CheckpointError`.
    on_round, on_message : callables, optional
        Progress (each completed round and the server state) and message
        inspection (round, site, payload) hooks.
    vectorise : bool
        vmap across sites when their data have equal shapes.
    stop_after : int, optional
        Stop (as if killed) after this many rounds, leaving the checkpoint; for
        tests of resumption.
    gates : sequence of SiteGate or None, optional
        Each site's policy, audit log and privacy ledger
        (:mod:`phems_clinical.federation.gate`): checked before anything is
        computed, every payload logged, the privacy spent recorded at the end.
    site_secrets : (n_sites,) typed keys, optional
        The secret keys the sites kept (:func:`core.site_secret_keys`), to replay a
        DP run exactly. With ``algorithm.dp`` and none given, each site draws a
        fresh key from the OS CSPRNG that nobody keeps: DP noise is never
        derived from the seed, and two DP runs with one seed differ by design.
    progress : callable, optional
        Listener of :mod:`phems_clinical.progress` events: task ``rounds`` starts
        (total None: the run stops at convergence, ``info["at_most"]`` rounds at
        most), one step per completed round (``sites`` answered, ``seconds``,
        and ``ofv``, the server's objective, when the algorithm sends one) and
        an end (``converged``). It only observes: results are the same with or
        without it.

    Raises
    ------
    PrivacyBudgetExceeded
        Before the first round, when the planned rounds would take a site past the
        algorithm's ``dp.epsilon_budget``.
    PolicyViolation
        Before the first round, when a site's policy refuses the run.
    """
    n_sites = len(sites)
    min_sites = n_sites if min_sites is None else int(min_sites)
    if not 1 <= min_sites <= n_sites:
        raise ValueError(
            f"min_sites: expected 1..{n_sites} (the number of sites), got {min_sites}"
        )
    max_rounds = algorithm.max_rounds if max_rounds is None else int(max_rounds)
    compiled = _compile(algorithm)
    site_keys = run_site_keys(
        key, n_sites, private=algorithm.dp is not None, site_secrets=site_secrets
    )
    server = _strong(algorithm.init_server(key))
    server_key = server_run_key(key, algorithm)
    states = [_strong(algorithm.init_site(s)) for s in sites]
    history: list[RoundRecord] = []
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        loaded = load_checkpoint(ckpt, server, states)
        if loaded is not None:
            server, states, history = loaded
            server, states = _strong(server), _strong(states)
    stacked = vectorise and n_sites > 1 and _same_shapes(sites) and _same_shapes(states)
    data_stacked = stack_sites(list(sites)) if stacked else None
    gates = list(gates) if gates is not None else [None] * n_sites
    sizes = (
        [site_size(s) for s in sites]
        if (algorithm.dp is not None or any(gates))
        else None
    )
    start = len(history)
    _admit_all(algorithm, sizes, gates, max_rounds, start)

    r = len(history)
    converged = bool(compiled.done(server)) if r else False
    begin(progress, "rounds", None, at_most=max_rounds, resumed_at=r)
    while r < max_rounds and not converged:
        if stop_after is not None and r >= stop_after:
            break
        t0 = time.perf_counter()
        for attempt in range(retries + 1):
            dropped = (
                [(k, fault(r, k, attempt)) for k in range(n_sites)] if fault else []
            )
            dropped = [(k, why) for k, why in dropped if why]
            out = _try_round(
                r,
                compiled,
                algorithm,
                server,
                sites,
                states,
                data_stacked,
                site_keys,
                server_key,
                dropped,
                aggregator,
                min_sites,
                on_message,
                gates,
            )
            if out is not None:
                break
        else:
            if ckpt is not None:
                save_checkpoint(ckpt, server, states, history)
            raise FederationAborted(
                f"round {r}: fewer than min_sites={min_sites} of {n_sites} sites "
                f"answered in {retries + 1} attempts; the run stopped after round "
                f"{r - 1} (its checkpoint is kept)"
            )
        server, states, dropped = out
        participants = tuple(
            k for k in range(n_sites) if k not in {d for d, _ in dropped}
        )
        heads = tuple(
            (k, *head(g)) for k in participants if (g := gates[k]) is not None
        )
        record = RoundRecord(
            r,
            participants,
            tuple(dropped),
            attempt + 1,
            time.perf_counter() - t0,
            heads,
        )
        history.append(record)
        r += 1
        if ckpt is not None:
            save_checkpoint(ckpt, server, states, history)
        if on_round is not None:
            on_round(record, server)
        converged = bool(compiled.done(server))
        if progress is not silent:
            step(
                progress,
                "rounds",
                r,
                None,
                **_round_info(algorithm, server, record, n_sites, max_rounds),
            )
    end(progress, "rounds", r, None, converged=converged)
    for g in gates:
        if g is not None:
            settle(g)
    privacy = None
    if algorithm.dp is not None:
        assert sizes is not None  # counted above whenever dp is set
        privacy = [
            {
                "site": k,
                "n_patients": n,
                **dpm.privacy_report(algorithm.dp, n, r * algorithm.dp_steps_per_round),
            }
            for k, n in enumerate(sizes)
        ]
    return FederatedRun(
        server, states, history, algorithm.result(server), r, converged, privacy
    )


def _strong(tree):
    """``tree`` with its weak-typed leaves (``jnp.asarray(jnp.inf)``, Python
    scalars) made strong, of the same dtype. ``aggregate`` and ``local_update``
    return strong arrays, so without this the first round's compiled call would
    not fit the second's and the whole round, the longest compile of a fit, would
    be compiled twice (JAX type promotion: weak types)."""
    return jax.tree.map(
        lambda x: (
            jnp.asarray(x, jnp.result_type(x)) if getattr(x, "weak_type", False) else x
        ),
        tree,
    )


def _round_info(algorithm, server, record, n_sites, max_rounds) -> dict:
    """What a progress listener sees of a round: sites that answered, its
    duration, the largest number of rounds and, for an algorithm whose sites send
    an objective (``ofv`` in its message), the server's current objective (a
    population-level value the server holds anyway)."""
    info = {
        "at_most": max_rounds,
        "sites": f"{len(record.participants)}/{n_sites}",
        "seconds": record.seconds,
    }
    if record.dropped:
        info["dropped"] = [k for k, _ in record.dropped]
    if "ofv" in algorithm.message_spec:
        ofv = algorithm.result(server).get("ofv")
        if ofv is not None and np.ndim(ofv) == 0:
            info["ofv"] = float(ofv)
    return info


def _admit_all(algorithm, sizes, gates, max_rounds, start) -> None:
    """Every site's checks before anything is computed: its DP budget for the
    planned rounds, then its gate (signed request, policy, admission record; ε is
    charged per executed round by ``release``, the admission closed by
    ``settle``)."""
    planned = max_rounds - start
    if algorithm.dp is not None:
        for k, n in enumerate(sizes):
            dpm.check_budget(
                algorithm.dp, n, max_rounds * algorithm.dp_steps_per_round, site=k
            )
    for k, g in enumerate(gates):
        if g is not None:
            admit(g, algorithm, sizes[k], planned)


def _try_round(
    r,
    compiled,
    algorithm,
    server,
    sites,
    states,
    data_stacked,
    site_keys,
    key,
    dropped,
    aggregator,
    min_sites,
    on_message,
    gates,
):
    """One attempt at round ``r``; ``None`` when too few sites answered."""
    n_sites = len(sites)
    dropped = list(dropped)
    keys = jax.vmap(site_round_key, in_axes=(0, None))(site_keys, r)
    skey = server_round_key(key, r)
    if len(dropped) > n_sites - min_sites:
        return None
    failed = {k for k, _ in dropped}
    if data_stacked is not None:
        participate = jnp.asarray([k not in failed for k in range(n_sites)])
        st = stack_sites(states)
        if aggregator is None and on_message is None and not any(gates):
            server, st, payloads = compiled.whole_round(
                server, data_stacked, st, keys, participate, skey
            )
            _check_all(algorithm, payloads, participate)
            return server, unstack_sites(st, n_sites), dropped
        message = algorithm.broadcast(server)
        payloads, st, _ = compiled.local_vmapped(
            message, data_stacked, st, keys, participate
        )
        per_site = unstack_sites(payloads, n_sites)
        new_states = unstack_sites(st, n_sites)
    else:
        message = algorithm.broadcast(server)
        per_site, new_states = [], []
        for k in range(n_sites):
            if k in failed:
                per_site.append(None)
                new_states.append(states[k])
                continue
            try:
                p, s, _ = compiled.local(message, sites[k], states[k], keys[k])
                jax.block_until_ready(p)
            except Exception as err:  # a site's failure drops it from the round
                dropped.append(
                    (
                        k,
                        "failed: "
                        + record_site_error(  # text: site log
                            err, None, stage="train", context={"site": k, "round": r}
                        ).reason,
                    )
                )
                failed.add(k)
                per_site.append(None)
                new_states.append(states[k])
                continue
            per_site.append(p)
            new_states.append(s)
        if len(dropped) > n_sites - min_sites:
            return None
    alive = [k for k in range(n_sites) if k not in failed]
    for k in alive:
        check_payload(algorithm, per_site[k], r)
        if gates[k] is not None:
            release(
                gates[k],
                per_site[k],
                r,
                algorithm=algorithm,
                n_patients=site_size(sites[k]),
            )
        if on_message is not None:
            on_message(r, k, per_site[k])
    payloads = {k: per_site[k] for k in alive}
    total = (
        _plain_sum(skey, payloads, algorithm)
        if aggregator is None
        else aggregator(jax.random.fold_in(skey, 1), payloads, algorithm)
    )
    server = compiled.aggregate(server, total, skey)
    return server, new_states, dropped


def _check_all(algorithm, payloads, participate):
    for k in np.flatnonzero(np.asarray(participate)):
        check_payload(algorithm, {n: v[k] for n, v in payloads.items()})


__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointError",
    "FaultFn",
    "FederatedRun",
    "FederationAborted",
    "RoundRecord",
    "checkpoint_path",
    "load_checkpoint",
    "run_federated",
    "save_checkpoint",
]
