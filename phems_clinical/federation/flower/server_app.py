"""The Flower ServerApp: the federated engine's server loop over a Flower ``Grid``.

One run:

1. wait until ``num-sites`` SuperNodes are connected (Flower's ServerApp would
   otherwise wait for ever; ``connect-timeout`` bounds it);
2. a **query round** asks every node for its site index and its data's sizes
   (counts only, per use case: run config ``use-case``,
   :mod:`~phems_clinical.federation.flower.tasks`) -- the server maps node ids to
   site indices and broadcasts the padded shapes every site must use, so that
   every site computes exactly what it computes in the in-process engine;
   then the use case's **summed rounds** before training (e.g. the PICU feature
   standardisation sums): every site's population-level arrays, checked against
   the message schema and added in site order (or under secure aggregation), kept
   with the checkpoint and sent with every later message;
3. per round ``r``: broadcast ``algorithm.broadcast(server)`` (an ``ArrayRecord``)
   with a ``ConfigRecord`` (round, shapes, which stored state to start from), wait
   at most ``round-timeout`` s, drop sites that failed, timed out or sent a payload
   the message schema rejects -- provided ``min-sites`` remain, otherwise retry the
   round ``retries`` times and then abort -- add the payloads **in site-index
   order** and ``aggregate`` with ``core.server_round_key(key, r)``; checkpoint;
   stop when ``algorithm.done`` or after ``rounds`` rounds;
4. the use case's summed rounds on the trained model (e.g. the PICU alarm
   threshold from per-candidate utility totals);
5. write the result JSON (estimates, rounds, drops per round, seconds per round,
   the summed arrays, with DP each site's privacy statement,
   and ``audit_anchors``: each governed site's latest audit-log head, the
   coordinator's anchor for ``phems audit verify --anchor``).

With hospital-level DP (``algorithm.server_dp``) the server's key comes from its
own OS CSPRNG (``core.server_run_key``), so its noise is not replayable from the
seed.

A site that fails says only a category and a reference
(:mod:`~phems_clinical.federation.site_errors`); the server keeps exactly that (any
other error text, e.g. Flower's own, is reduced to its error code), so nothing the
server writes -- result, checkpoint, logs, exceptions -- holds a site's error text.

With ``secagg`` in the run config, step 3 runs secure aggregation (Bonawitz et
al., ACM CCS 2017) instead of collecting payloads: the ``train`` message asks
each site for its signed key advertisement, then one ``train.secagg`` exchange per
protocol stage (:func:`run_secagg_round`); the server sees only masked vectors,
decodes their sum and passes it to ``aggregate``.

The sites' states never come here: they stay in each node's state folder
(:mod:`~phems_clinical.federation.flower.site_state`).
"""

from __future__ import annotations

from phems_clinical.runtime import configure_jax

configure_jax()

import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from phems_clinical.federation.core import (  # noqa: E402
    Algorithm,
    server_round_key,
    server_run_key,
    unflatten_payload,
)
from phems_clinical.federation.dp import (  # noqa: E402
    privacy_report as dp_privacy_report,
)
from phems_clinical.federation.engine import (  # noqa: E402
    FederationAborted,
    RoundRecord,
    load_checkpoint,
    save_checkpoint,
)
from phems_clinical.federation.flower.config import (  # noqa: E402
    RunSettings,
    run_settings,
)
from phems_clinical.federation.flower.records import (  # noqa: E402
    array_record,
    arrays_to_record,
    config_int,
    config_record,
    record_to_arrays,
)
from phems_clinical.federation.flower.secagg_transport import (  # noqa: E402
    MESSAGE_TYPE,
    ROUND_ID_KEY,
    read_reply,
    secagg_config,
    server_stages,
    site_id,
)
from phems_clinical.federation.flower.tasks import (  # noqa: E402
    SECAGG_BITS,
    Stage,
    check_query,
    check_summary,
    pack_sums,
    stage_round,
    use_case,
)
from phems_clinical.federation.messages import (  # noqa: E402
    MessageRejected,
    check_audit_head,
    check_payload,
)
from phems_clinical.federation.secagg import (  # noqa: E402
    SecAggConfig,
    SecAggError,
    grid_step,
)
from phems_clinical.federation.site_errors import parse_reason  # noqa: E402
from phems_clinical.outputs import strict_json, write_atomic  # noqa: E402

POLL_SECONDS = 0.2
"""How often the server asks the SuperLink for replies (Flower's own
``send_and_receive`` sleeps 3 s between pulls)."""


def exchange(
    grid: Grid,
    messages: Mapping[int, Message],
    timeout: float,
    *,
    poll: float = POLL_SECONDS,
) -> tuple[dict[int, Message], dict[int, str]]:
    """Send one message per node and collect the replies for at most ``timeout`` s.

    Returns
    -------
    replies : dict node id -> reply message (possibly an error reply)
    missing : dict node id -> why no reply came (push failed, timeout)
    """
    nodes = list(messages)
    ids = list(grid.push_messages([messages[n] for n in nodes]))
    pending: dict[str, int] = {}
    missing: dict[int, str] = {}
    for node, mid in zip(nodes, ids, strict=True):
        if mid is None:
            missing[node] = "failed: the SuperLink did not accept the message"
        else:
            pending[mid] = node
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            sender = pending.pop(reply.metadata.reply_to_message_id, None)
            if sender is not None:
                replies[sender] = reply
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    for node in pending.values():
        missing[node] = f"timeout: no reply within {timeout:g} s"
    return replies, missing


def _error_text(reply: Message) -> str:
    """``"failed: category reference"`` of a site's error reply; any other reason
    (not a site's guarded reply) is not kept, only Flower's error code."""
    error = parse_reason(reply.error.reason)
    if error is not None:
        return f"failed: {error.reason}"
    return f"failed: error code {int(reply.error.code)} (reason not kept)"


def _rejected_text(err: Exception) -> str:
    """Why a reply was rejected: the server's own check (field names, shapes), or
    only the type of any other error (its text may quote what the site sent)."""
    if isinstance(err, MessageRejected):
        return f"rejected: {err}"
    return f"rejected: malformed reply ({type(err).__name__})"


def wait_for_nodes(grid: Grid, settings: RunSettings) -> list[int]:
    """Node ids once ``num_sites`` SuperNodes are connected (at most
    ``connect_timeout`` s; then whoever is there)."""
    deadline = time.monotonic() + settings.connect_timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= settings.num_sites or time.monotonic() >= deadline:
            return nodes
        time.sleep(POLL_SECONDS)


def query_sites(
    grid: Grid,
    nodes: list[int],
    settings: RunSettings,
    *,
    anchors: dict[int, dict] | None = None,
) -> tuple[dict[int, int], dict[int, dict[str, int]], dict[str, str]]:
    """The query round: ``site index -> node id``, each site's sizes, and why the
    nodes that did not answer are out (``anchors``: see :func:`keep_anchor`)."""
    msgs = {
        n: Message(
            RecordDict({"config": ConfigRecord({"num-sites": settings.num_sites})}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
            ttl=settings.round_timeout + 30.0,
        )
        for n in nodes
    }
    replies, missing = exchange(grid, msgs, settings.round_timeout)
    node_of: dict[int, int] = {}
    shapes: dict[int, dict[str, int]] = {}
    problems = {f"node {n}": why for n, why in missing.items()}
    for node, reply in sorted(replies.items()):
        if reply.has_error():
            problems[f"node {node}"] = _error_text(reply)
            continue
        try:
            records = set(reply.content.keys())
            if "site" not in records or records - {"site", "audit"}:
                raise MessageRejected(
                    "query reply: expected the records 'site' "
                    "and (with a site policy) 'audit'"
                )
            info = check_query(
                dict(reply.content["site"]),
                use_case(settings.use_case),
                settings.num_sites,
            )
            if "audit" in records:
                check_audit_head(dict(reply.content["audit"]))
        except (MessageRejected, KeyError, ValueError, TypeError) as err:
            problems[f"node {node}"] = _rejected_text(err)
            continue
        k = info.pop("site-index")
        if k in node_of:
            raise ValueError(
                f"site index {k} claimed by nodes {node_of[k]} and "
                f"{node}: check the SuperNodes' --node-config"
            )
        else:
            node_of[k] = node
            shapes[k] = info
            keep_anchor(anchors, k, reply.content)
    return node_of, shapes, problems


def _round_messages(
    broadcast: ArrayRecord,
    r: int,
    node_of: Mapping[int, int],
    last_ok: Mapping[int, int],
    common: Mapping[str, Any],
    settings: RunSettings,
    sums: Mapping[str, Any] | None = None,
) -> dict[int, Message]:
    out = {}
    for k, node in node_of.items():
        config = ConfigRecord(
            {**common, "round": r, "site-index": k, "state-from": last_ok[k] + 1}
        )
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            "broadcast": broadcast,
            "config": config,
        }
        if sums:  # the summed rounds' results (population-level)
            records["sums"] = arrays_to_record(pack_sums(sums))
        out[node] = Message(
            RecordDict(records),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            group_id=str(r),
            ttl=settings.round_timeout + 30.0,
        )
    return out


def keep_anchor(anchors: dict[int, dict] | None, k: int, content) -> None:
    """Keep site ``k``'s audit-log head (``audit`` record: seq, MAC) from a reply,
    checked against the message schema: the coordinator's anchor of the site's
    log (``phems audit verify LOG --key K --anchor SEQ:MAC`` detects entries cut
    from its end). A site without a policy sends none."""
    if anchors is not None and "audit" in content:
        anchors[k] = check_audit_head(dict(content["audit"]))


def _accept(
    algorithm: Algorithm, reply: Message, k: int, r: int
) -> dict[str, np.ndarray]:
    """The payload of a site's reply, checked (raises MessageRejected)."""
    site = config_record(reply.content, "site")
    got_k, got_r = config_int(site, "site-index"), config_int(site, "round")
    if got_k != k or got_r != r:
        raise MessageRejected(
            f"reply for site {got_k} round {got_r}, expected site {k} round {r}"
        )
    payload = record_to_arrays(
        array_record(reply.content, "payload"), algorithm.message_spec
    )
    check_payload(algorithm, payload, r)
    return payload


def run_round(
    grid: Grid,
    algorithm: Algorithm,
    server: Any,
    r: int,
    node_of: Mapping[int, int],
    last_ok: Mapping[int, int],
    common: Mapping[str, Any],
    settings: RunSettings,
    *,
    anchors: dict[int, dict] | None = None,
    sums: Mapping[str, Any] | None = None,
) -> tuple[dict[int, dict[str, np.ndarray]], list[tuple[int, str]]]:
    """One attempt at round ``r``: the accepted payloads by site index and the
    dropped sites with reasons (``anchors``: see :func:`keep_anchor`; ``sums``:
    the summed rounds' results every site needs)."""
    payloads, dropped = _train_replies(
        grid,
        algorithm.broadcast(server),
        r,
        node_of,
        last_ok,
        common,
        settings,
        lambda reply, k: _accept(algorithm, reply, k, r),
        anchors,
        sums,
    )
    return payloads, sorted(dropped)


def _train_replies(
    grid: Grid,
    arrays: Mapping[str, Any],
    r: int,
    node_of: Mapping[int, int],
    last_ok: Mapping[int, int],
    common: Mapping[str, Any],
    settings: RunSettings,
    read: Any,
    anchors: dict[int, dict] | None,
    sums: Mapping[str, Any] | None = None,
) -> tuple[dict[int, Any], list[tuple[int, str]]]:
    """Send round ``r``'s ``train`` messages (broadcasting ``arrays``) and read
    each reply with ``read(reply, site)`` (raising ``MessageRejected`` to refuse
    it): the read replies by site index, and the dropped sites with reasons."""
    broadcast = arrays_to_record(arrays)
    msgs = _round_messages(broadcast, r, node_of, last_ok, common, settings, sums)
    replies, missing = exchange(grid, msgs, settings.round_timeout)
    site_of = {node: k for k, node in node_of.items()}
    dropped = [
        (k, "failed: did not answer the query round")
        for k in range(settings.num_sites)
        if k not in node_of
    ]
    dropped += [(site_of[node], why) for node, why in missing.items()]
    got = {}
    for node, reply in replies.items():
        k = site_of[node]
        if reply.has_error():
            dropped.append((k, _error_text(reply)))
            continue
        try:
            got[k] = read(reply, k)
            keep_anchor(anchors, k, reply.content)
        except (MessageRejected, KeyError, ValueError, TypeError) as err:
            got.pop(k, None)
            dropped.append((k, _rejected_text(err)))
    return got, dropped


def run_secagg_round(
    grid: Grid,
    algorithm: Algorithm | None,
    server: Any,
    r: int,
    attempt: int,
    node_of: Mapping[int, int],
    last_ok: Mapping[int, int],
    common: Mapping[str, Any],
    settings: RunSettings,
    cfg: SecAggConfig,
    *,
    anchors: dict[int, dict] | None = None,
    sums: Mapping[str, Any] | None = None,
    arrays: Mapping[str, Any] | None = None,
    unflatten: Any = None,
) -> tuple[dict | None, tuple[int, ...], list[tuple[int, str]]]:
    """One attempt at round ``r`` under secure aggregation (Bonawitz et al., CCS
    2017; :mod:`~phems_clinical.federation.flower.secagg_transport`): the ``train``
    message asks for key advertisements, then one exchange per later stage.

    Returns the decoded sum as a payload (None when the attempt failed), the
    included sites (whose masked input arrived) and the others with reasons.
    ``algorithm`` (and ``server``) may be None when ``arrays`` and ``unflatten``
    are given.
    """
    if arrays is None or unflatten is None:
        if algorithm is None:
            raise ValueError(
                "algorithm: required unless arrays and unflatten are given"
            )
        spec = algorithm.message_spec
        arrays = algorithm.broadcast(server) if arrays is None else arrays
        unflatten = unflatten or (lambda vec: unflatten_payload(vec, spec))
    round_id = r * (settings.retries + 1) + attempt - 1
    adverts, dropped = _train_replies(
        grid,
        arrays,
        r,
        node_of,
        last_ok,
        {**common, ROUND_ID_KEY: round_id},
        settings,
        lambda reply, k: read_reply(reply.content, "advertise_keys", k, r, round_id),
        anchors,
        sums,
    )
    site_of = {node: k for k, node in node_of.items()}

    def send(stage: str, contents: Mapping[int, RecordDict]):
        out = {
            node_of[k]: Message(
                c,
                dst_node_id=node_of[k],
                message_type=MESSAGE_TYPE,
                group_id=str(r),
                ttl=settings.round_timeout + 30.0,
            )
            for k, c in contents.items()
        }
        got, lost = exchange(grid, out, settings.round_timeout)
        failed = [(site_of[node], why) for node, why in lost.items()]
        ok = {}
        for node, reply in got.items():
            if reply.has_error():
                failed.append((site_of[node], _error_text(reply)))
            else:
                ok[site_of[node]] = reply.content
        return ok, failed

    left_out: list[tuple[int, str]] = []
    try:
        result = server_stages(
            cfg,
            adverts,
            send,
            r=r,
            round_id=round_id,
            n_sites=settings.num_sites,
            left_out=left_out,
        )
    except SecAggError as err:  # too few survivors, or a message it refuses
        named = {k for k, _ in dropped + left_out}
        why = f"not aggregated: secure aggregation failed ({err})"
        return (
            None,
            (),
            sorted(dropped + left_out + [(k, why) for k in adverts if k not in named]),
        )
    index = {site_id(k): k for k in range(settings.num_sites)}
    included = tuple(sorted(index[s] for s in result.included))
    total = unflatten(result.total)
    return (
        total,
        included,
        sorted(d for d in dropped + left_out if d[0] not in included),
    )


def run_summary(
    grid: Grid,
    stage: Stage,
    node_of: Mapping[int, int],
    common: Mapping[str, Any],
    settings: RunSettings,
    sums: Mapping[str, Any],
    broadcast: Mapping[str, Any],
    *,
    anchors: dict[int, dict] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One summed round (:class:`~phems_clinical.federation.flower.tasks.Stage`)
    with the run's retries: the sum over the sites (in site order, or decoded by
    secure aggregation with the stage's public bound and
    :data:`~phems_clinical.federation.flower.tasks.SECAGG_BITS` bits) and what
    happened (sites, drops, attempts).

    Every site must answer (a sum over fewer sites is another statistic)."""
    uc = use_case(settings.use_case)
    r = stage_round(uc, stage.name)
    spec = stage.spec(settings, common)
    names = sorted(spec)
    sizes = [int(np.prod(spec[n], dtype=int)) for n in names]
    config = {**common, "stage": stage.name}
    last_ok = dict.fromkeys(range(settings.num_sites), -1)
    attempts = 0
    while True:
        attempts += 1
        if settings.secagg:
            cfg = secagg_config(
                settings._replace(secagg_clip=stage.clip, secagg_bits=SECAGG_BITS)
            )

            def unflatten(vec):
                parts = np.split(np.asarray(vec, np.float64), np.cumsum(sizes)[:-1])
                return {
                    n: p.reshape(spec[n]) for n, p in zip(names, parts, strict=True)
                }

            total, included, dropped = run_secagg_round(
                grid,
                None,
                None,
                r,
                attempts,
                node_of,
                last_ok,
                config,
                settings,
                cfg,
                anchors=anchors,
                sums=sums,
                arrays=broadcast,
                unflatten=unflatten,
            )
        else:

            def read(reply, k):
                site = config_record(reply.content, "site")
                got_k, got_r = config_int(site, "site-index"), config_int(site, "round")
                if got_k != k or got_r != r:
                    raise MessageRejected(
                        f"summary reply for site {got_k} round "
                        f"{got_r}, expected site {k} round {r}"
                    )
                arrays = record_to_arrays(array_record(reply.content, "payload"), spec)
                check_summary(stage.name, arrays, spec)
                return arrays

            got, dropped = _train_replies(
                grid,
                broadcast,
                r,
                node_of,
                last_ok,
                config,
                settings,
                read,
                anchors,
                sums,
            )
            included = tuple(sorted(got))
            total = sum_in_site_order(got) if got else None
        if len(included) == settings.num_sites:
            break
        if attempts > settings.retries:
            raise FederationAborted(
                f"summary {stage.name}: {len(included)} of {settings.num_sites} "
                f"sites answered in {attempts} attempts ({sorted(dropped)}); every "
                f"site's sum is needed"
            )
    assert total is not None  # every site's sum arrived
    out = {n: np.asarray(v, np.float64) for n, v in total.items()}
    return out, {
        "stage": stage.name,
        "round": r,
        "attempts": attempts,
        "dropped": sorted(dropped),
        "secure": bool(settings.secagg),
    }


def _load_sums(path: Path | None) -> dict[str, dict[str, np.ndarray]]:
    if path is None or not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    return {
        s: {f: np.asarray(v, np.float64) for f, v in fields.items()}
        for s, fields in raw.items()
    }


def _sums_json(sums: Mapping[str, Mapping[str, Any]]) -> dict:
    return {
        s: {f: np.asarray(v).tolist() for f, v in fields.items()}
        for s, fields in sums.items()
    }


def sum_in_site_order(payloads: Mapping[int, Mapping[str, np.ndarray]]) -> dict:
    """The sum over sites, added in site-index order as the in-process engine does
    (floating-point addition is not associative)."""
    ordered = [
        {n: jnp.asarray(v) for n, v in payloads[k].items()} for k in sorted(payloads)
    ]
    return {n: sum(p[n] for p in ordered) for n in ordered[0]}


def _jsonable(x: Any) -> Any:
    """JSON values with NaN kept (the result must read back exactly)."""
    return strict_json(x, keep_nonfinite=True)


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as JSON atomically and durably (floats round-trip exactly;
    NaN is written as JSON's common ``NaN`` extension, which Python reads back)."""
    write_atomic(path, json.dumps(_jsonable(obj), indent=1))


def run_server(grid: Grid, settings: RunSettings, *, run_id: int = 0) -> dict:
    """Run the federation over ``grid``; returns (and writes to ``settings.out``)
    the result as a JSON-ready dict.

    Raises
    ------
    FederationAborted
        When a round cannot gather ``min_sites`` sites after its retries (the
        result file then says ``"status": "aborted"`` and the checkpoint of the last
        completed round is kept).
    """
    t_start = time.perf_counter()
    out = Path(settings.out) if settings.out else None
    report: dict[str, Any] = {
        "status": "running",
        "run_id": run_id,
        "settings": settings._asdict(),
        "history": [],
    }
    try:
        report = _run(grid, settings, report, t_start)
    except BaseException as err:
        report["status"] = "aborted" if isinstance(err, FederationAborted) else "error"
        report["error"] = f"{type(err).__name__}: {err}"
        report["total_seconds"] = time.perf_counter() - t_start
        if out is not None:
            write_json(out, report)
        raise
    report = _jsonable(report)
    if out is not None:
        write_json(out, report)
    return report


def _run(grid: Grid, settings: RunSettings, report: dict, t_start: float) -> dict:
    n_sites = settings.num_sites
    min_sites = settings.min_sites or n_sites
    nodes = wait_for_nodes(grid, settings)
    # each governed site's latest audit-log head, kept in the result (updated in
    # place, so also when the run stops with an error)
    anchors: dict[int, dict] = {}
    report["audit_anchors"] = anchors
    node_of, shapes, problems = query_sites(grid, nodes, settings, anchors=anchors)
    report["nodes"] = {str(k): node_of[k] for k in sorted(node_of)}
    report["query_problems"] = problems
    if len(node_of) < min_sites:
        raise FederationAborted(
            f"only {len(node_of)} of {n_sites} sites answered the query round "
            f"(min-sites {min_sites}): {problems or 'no SuperNode connected'}"
        )
    uc = use_case(settings.use_case)
    report["use_case"] = uc.name
    common = uc.common(list(shapes.values()), settings)
    padded = dict(common)
    common["num-sites"] = n_sites
    report["shape"] = dict(common)
    secure = secagg_config(settings) if settings.secagg else None
    if secure is not None:
        report["secure_aggregation"] = {
            **secure._asdict(),
            "max_error_bound": n_sites * grid_step(secure),
            "summaries": {
                s.name: {
                    "clip": s.clip,
                    "bits": SECAGG_BITS,
                    "max_error_bound": n_sites
                    * grid_step(secure._replace(clip=s.clip, bits=SECAGG_BITS)),
                }
                for s in uc.before + uc.after
            },
        }
    ckpt = Path(settings.checkpoint_dir) if settings.checkpoint_dir else None
    sums_file = None if ckpt is None else ckpt / "summaries.json"
    # the sums before training: kept with the checkpoint, so a resumed run trains
    # on exactly the numbers the interrupted one did
    sums = {
        k: v
        for k, v in _load_sums(sums_file).items()
        if k in {s.name for s in uc.before}
    }
    report["summary_rounds"] = []
    for stage in uc.before:
        if stage.name in sums:
            continue
        sums[stage.name], info = run_summary(
            grid, stage, node_of, common, settings, sums, {}, anchors=anchors
        )
        report["summary_rounds"].append(info)
        if sums_file is not None:
            write_json(sums_file, _sums_json(sums))
    algorithm = uc.build(settings, padded, sums)
    report["algorithm"] = algorithm.name
    key = jax.random.key(settings.seed)
    server = algorithm.init_server(key)
    server_key = server_run_key(key, algorithm)  # secret with hospital-level DP
    history: list[RoundRecord] = []
    if ckpt is not None:
        loaded = load_checkpoint(ckpt, server, [])
        if loaded is not None and loaded[2]:
            if not settings.job:
                raise ValueError(
                    f"{ckpt} holds a checkpoint after {len(loaded[2])} rounds, but "
                    "the run config names no job: the sites keep their state per "
                    "job, so resume with the job name of the interrupted run (or "
                    "use an empty checkpoint-dir)"
                )
            server, _, history = loaded
    last_ok = {
        k: max([h.round for h in history if k in h.participants], default=-1)
        for k in range(n_sites)
    }
    aggregate, done = jax.jit(algorithm.aggregate), jax.jit(algorithm.done)
    max_rounds = settings.rounds or algorithm.max_rounds
    report["startup_seconds"] = time.perf_counter() - t_start
    report["first_round_at"] = time.time()  # wall clock, for the launcher
    r = len(history)
    report["resumed_after"] = r  # rounds taken from the checkpoint
    converged = bool(done(server)) if r else False
    while r < max_rounds and not converged:
        t0 = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            if secure is None:
                payloads, dropped = run_round(
                    grid,
                    algorithm,
                    server,
                    r,
                    node_of,
                    last_ok,
                    common,
                    settings,
                    anchors=anchors,
                    sums=sums,
                )
                included = tuple(sorted(payloads))
            else:
                total, included, dropped = run_secagg_round(
                    grid,
                    algorithm,
                    server,
                    r,
                    attempts,
                    node_of,
                    last_ok,
                    common,
                    settings,
                    secure,
                    anchors=anchors,
                    sums=sums,
                )
            if len(included) >= min_sites:
                break
            if attempts > settings.retries:
                if ckpt is not None:
                    save_checkpoint(ckpt, server, [], history)
                report["history"] = [h._asdict() for h in history]
                report["last_dropped"] = dropped
                raise FederationAborted(
                    f"round {r}: fewer than min-sites={min_sites} of {n_sites} "
                    f"sites answered in {attempts} attempts ({dropped}); the run "
                    f"stopped after round {r - 1} (its checkpoint is kept)"
                )
        if secure is None:
            total = sum_in_site_order(payloads)
        server = aggregate(server, total, server_round_key(server_key, r))
        record = RoundRecord(
            r, included, tuple(dropped), attempts, time.perf_counter() - t0
        )
        history.append(record)
        for k in included:
            last_ok[k] = r
        if ckpt is not None:
            save_checkpoint(ckpt, server, [], history)
        r += 1
        converged = bool(done(server))
        report["history"] = [h._asdict() for h in history]
    for stage in uc.after:  # summed rounds on the trained model
        sums[stage.name], info = run_summary(
            grid,
            stage,
            node_of,
            common,
            settings,
            sums,
            algorithm.broadcast(server),
            anchors=anchors,
        )
        report["summary_rounds"].append(info)
    result = {**algorithm.result(server), **uc.conclude(settings, padded, sums)}
    report["summaries"] = _sums_json(sums)
    if algorithm.dp is not None:  # each site's guarantee, as the engine states it
        report["privacy"] = [
            {
                "site": k,
                "n_patients": int(shapes[k][uc.size_field]),
                **dp_privacy_report(
                    algorithm.dp,
                    int(shapes[k][uc.size_field]),
                    r * algorithm.dp_steps_per_round,
                ),
            }
            for k in sorted(shapes)
        ]
    report.update(
        status="completed",
        rounds=r,
        converged=converged,
        total_seconds=time.perf_counter() - t_start,
        result=result,
    )
    if "names" in result and "estimates" in result:
        report["estimates"] = dict(
            zip(result["names"], np.asarray(result["estimates"]).tolist(), strict=True)
        )
    return report


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp's entry point (``flwr run``). Flower's 1 s first backoff
    when pulling a reply still being uploaded is capped in this process
    (:func:`~phems_clinical.federation.flower.host.cap_serverapp_waits`)."""
    from phems_clinical.federation.flower.host import cap_serverapp_waits

    cap_serverapp_waits()
    run_server(grid, run_settings(context.run_config), run_id=context.run_id)


__all__ = [
    "app",
    "exchange",
    "query_sites",
    "run_round",
    "run_secagg_round",
    "run_server",
    "sum_in_site_order",
    "wait_for_nodes",
    "write_json",
]
