"""The Flower ClientApp: one hospital's side of a federated round.

A SuperNode is started with its own ``--node-config`` (``site-dir``,
``site-index``); every message it receives runs here, in a fresh ``flwr-clientapp``
process, or in the node's long-lived host (:mod:`~phems_clinical.federation.
flower.host`), which keeps the algorithm, the cohort and the compiled update
between messages (:func:`~phems_clinical.federation.flower.compiled.memoised`):

* ``query``: read the site's own table (the run config's ``use-case``:
  :mod:`~phems_clinical.federation.flower.tasks`) and report its sizes (counts
  only, as the message schema declares for that use case);
* ``train`` with a ``stage`` (a summed round, :func:`site_summary`): the site's
  population-level arrays for that stage (e.g. PICU standardisation sums),
  checked against the schema's ``$defs/summary_<stage>`` before they leave;
* ``train``: load the site's data padded to the broadcast shapes, load its
  node-local state, run ``algorithm.local_update`` with the site's key
  ``site_round_key(simulated_site_keys(key(seed), K)[site_index], round)`` (with
  patient-level DP: ``core.derive_site_key`` of the site's own secret, kept in its
  state folder, never the seed), check
  the payload against ``federation_message.schema.json``, store the new state on
  the node and reply with the payload only (an ``ArrayRecord`` of float64 arrays);
* with secure aggregation (run config ``secagg``), ``train`` keeps the flattened
  payload on the node and replies with the SecAgg key advertisement only; each
  later protocol stage is a ``train.secagg`` message
  (:mod:`~phems_clinical.federation.flower.secagg_transport`). A site whose node
  config sets ``secagg-required`` refuses a ``train`` message without SecAgg.

The algorithm's per-site metrics stay on the node (appended to ``metrics.jsonl`` in
the state folder). A handler that fails replies with a Flower error whose reason is
only a category and a reference (:mod:`~phems_clinical.federation.site_errors`);
the exception's text and traceback go to ``site_errors.jsonl`` in the state folder.
"""

from __future__ import annotations

import time

_T_IMPORT = time.time()

from phems_clinical.runtime import configure_jax  # noqa: E402

configure_jax()

import json  # noqa: E402
import os  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from phems_clinical.federation.core import (  # noqa: E402
    derive_site_key,
    flatten_payload,
    kept_site_secret,
    payload_to_numpy,
    simulated_site_keys,
    site_round_key,
    tree_digest,
)
from phems_clinical.federation.flower.compiled import (  # noqa: E402
    call_cached,
    memoised,
)
from phems_clinical.federation.flower.config import (  # noqa: E402
    DATA_FILE,
    RunSettings,
    SiteConfig,
    run_settings,
    site_config,
    site_gate,
)
from phems_clinical.federation.flower.records import (  # noqa: E402
    array_record,
    arrays_to_record,
    config_int,
    config_record,
    record_to_arrays,
)
from phems_clinical.federation.flower.secagg_transport import (  # noqa: E402
    ROUND_ID_KEY,
    site_advertise,
    site_stage,
)
from phems_clinical.federation.flower.site_state import (  # noqa: E402
    load_site_state,
    prune_site_states,
    save_site_state,
)
from phems_clinical.federation.flower.tasks import (  # noqa: E402
    SECAGG_BITS,
    check_clip,
    check_query,
    check_summary,
    find_stage,
    stage_round,
    sums_digest,
    unpack_sums,
    use_case,
)
from phems_clinical.federation.flower.tasks import (  # noqa: E402
    query_fields as tasks_query_fields,
)
from phems_clinical.federation.gate import (  # noqa: E402
    admit,
    authenticate,
    cached_reply,
    head,
    release,
    request_digest,
)
from phems_clinical.federation.messages import (  # noqa: E402
    check_payload,
)
from phems_clinical.federation.site_errors import (  # noqa: E402
    LOG_FILE,
    InjectedFailure,
    SiteError,
    SiteProtocolError,
    guarded,
)
from phems_clinical.pk.model import n_occasions  # noqa: E402


def _process_start() -> float:
    """When this process started (Unix time; Linux, else the import time)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _T_IMPORT


def _checked_site(node_config: Mapping[str, Any], num_sites: int) -> SiteConfig:
    site = site_config(node_config)
    if site.num_sites is not None and site.num_sites != num_sites:
        raise SiteProtocolError(
            f"node config num-sites={site.num_sites}, but the run has {num_sites} sites"
        )
    if not 0 <= site.site_index < num_sites:
        raise SiteProtocolError(
            f"node config site-index={site.site_index}: expected 0..{num_sites - 1}"
        )
    return site


def _algorithm(
    settings: RunSettings, common: Mapping[str, int], sums: Mapping[str, Any]
):
    """The use case's algorithm (:mod:`~phems_clinical.federation.flower.tasks`),
    kept by a long-lived host between messages
    (:func:`~phems_clinical.federation.flower.compiled.memoised`)."""
    uc = use_case(settings.use_case)
    return memoised(
        "algorithm",
        (settings, tuple(sorted(common.items())), sums_digest(sums)),
        lambda: uc.build(settings, common, sums),
    )


def _site_cohort(site: SiteConfig, settings: RunSettings):
    """The site's own data as its use case reads them (haemophilia: its cohort,
    :func:`read_site_cohort`), kept by a long-lived host between messages and
    read again when the file changes (its size, mtime or inode)."""
    uc = use_case(settings.use_case)
    name = site.data_file if site.data_file != DATA_FILE else uc.data_file
    try:
        st = (site.site_dir / name).stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:  # read_site says what is wrong
        return uc.read_site(site, settings)
    return memoised(
        "cohort",
        (site, settings.use_case, settings.product, settings.model, stamp),
        lambda: uc.read_site(site, settings),
    )


def _common(config: Mapping[str, Any], settings: RunSettings) -> dict[str, int]:
    """The padded sizes the server broadcast (the use case's query counts)."""
    uc = use_case(settings.use_case)
    return {f: config_int(config, f) for f in tasks_query_fields(uc)}


def _sums(content: RecordDict) -> dict[str, dict[str, np.ndarray]]:
    """The summed rounds' results the server sends with a message (none before
    the first summed round)."""
    return (
        unpack_sums(record_to_arrays(array_record(content, "sums")))
        if "sums" in content
        else {}
    )


def _secure_round(
    config, site: SiteConfig, settings: RunSettings, kind: str, what: str
) -> bool:
    """Whether the message runs secure aggregation (it carries a SecAgg round
    id); refuses a clear one when the node or run config requires SecAgg."""
    secure = ROUND_ID_KEY in config
    if not secure and (site.secagg_required or settings.secagg):
        raise SiteProtocolError(
            f"{kind} message without secagg-round-id: this site sends its {what} "
            "only under secure aggregation (node config secagg-required or run "
            "config secagg is true)"
        )
    return secure


def _with_head(content: RecordDict, gate) -> RecordDict:
    """Add the site's audit-log head (``audit`` record: seq, MAC) to a reply, so
    the coordinator holds an anchor of the site's log."""
    if gate is not None:
        seq, mac = head(gate)
        content["audit"] = ConfigRecord({"seq": seq, "head": mac})
    return content


def site_query(
    node_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    run_id: int | None = None,
) -> RecordDict:
    """The reply to the query round: site index and cohort sizes.

    A site with a policy (``site_policy.yaml`` in its folder) first authenticates
    the run's signed request (before reading any data), then checks the run
    against its policy and admits it for the planned rounds
    (:func:`~phems_clinical.federation.gate.admit`), or refuses
    (``PolicyViolation``); ε is charged per executed round in :func:`site_update`.
    """
    settings = run_settings(run_config)
    site = _checked_site(node_config, settings.num_sites)
    gate = site_gate(site, settings, run_id)
    if gate is not None:  # who asks for what, before any data are read
        authenticate(gate)
    uc = use_case(settings.use_case)
    if gate is not None and uc.before:
        raise SiteProtocolError(
            f"site_policy.yaml: a governed site admits a run before its summed "
            f"rounds, which the {uc.name} use case needs first; run it without a "
            f"site policy or in process"
        )
    cohort = _site_cohort(site, settings)
    if gate is not None:
        algorithm = _algorithm(settings, {"n-occ": max(1, n_occasions(cohort))}, {})
        rounds = settings.rounds or algorithm.max_rounds
        admit(gate, algorithm, cohort.n_subjects, rounds)
    reply = check_query(
        {"site-index": site.site_index, **uc.shape(cohort)}, uc, settings.num_sites
    )
    return _with_head(RecordDict({"site": ConfigRecord({**reply})}), gate)


def state_folder(site: SiteConfig, settings: RunSettings, run_id: int) -> Path:
    """The node-local folder of this job's site state."""
    return site.state_path / (settings.job or f"run-{run_id}")


def site_update(
    content: RecordDict,
    node_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    run_id: int,
) -> RecordDict:
    """One site's round: the reply content for a ``train`` message."""
    t_start = time.time()
    config = config_record(content, "config")
    r, k = config_int(config, "round"), config_int(config, "site-index")
    n_sites = config_int(config, "num-sites")
    settings = run_settings(run_config)
    site = _checked_site(node_config, n_sites)
    if site.site_index != k:
        raise SiteProtocolError(
            f"message for site {k} delivered to site {site.site_index}"
        )
    if r in site.fail_rounds:
        raise InjectedFailure(f"injected failure of site {k} in round {r}")
    if "stage" in config:
        return site_summary(content, site, settings, run_id)
    secure = _secure_round(config, site, settings, "train", "payload")
    common, sums = _common(config, settings), _sums(content)
    algorithm = _algorithm(settings, common, sums)
    folder = state_folder(site, settings, run_id)
    gate = site_gate(site, settings, run_id)

    def reply(payload: Mapping[str, np.ndarray]) -> RecordDict:
        """Under SecAgg the key advertisement only (the flattened payload stays
        in ``folder``), else the payload; with the audit-log head."""
        if secure:
            out = site_advertise(
                folder,
                site,
                settings,
                k,
                r,
                config_int(config, ROUND_ID_KEY),
                flatten_payload(payload, algorithm.message_spec),
            )
        else:
            out = RecordDict(
                {
                    "payload": arrays_to_record(payload),
                    "site": ConfigRecord({"site-index": k, "round": r}),
                }
            )
        return _with_head(out, gate)

    digest = None
    if gate is not None:  # admitted, within its rounds, before any data are read
        digest = request_digest(
            record_to_arrays(array_record(content, "broadcast")),
            {n: v for n, v in config.items() if n != ROUND_ID_KEY},
        )
        cached = cached_reply(gate, r, digest)
        if cached is not None:  # an identical re-request: the same reply, no new ε
            return reply(cached)
    cohort = _site_cohort(site, settings)
    data = use_case(settings.use_case).site_data(cohort, settings, common, sums)
    state_from = config_int(config, "state-from")
    state = load_site_state(folder, state_from, algorithm.init_site(data))
    message = {
        name: jnp.asarray(v)
        for name, v in record_to_arrays(array_record(content, "broadcast")).items()
    }
    t_loaded = time.time()
    if algorithm.dp is None:  # no DP: the seed's keys, as the in-process engine
        key = site_round_key(
            simulated_site_keys(jax.random.key(settings.seed), n_sites)[k], r
        )
    else:  # DP noise from the site's own kept CSPRNG secret, never the seed
        key = derive_site_key(
            kept_site_secret(folder), r, tree_digest(message, data, state, state_from)
        )
    tag, files = use_case(settings.use_case).tag(settings, common)
    tag = f"{tag}|sums={sums_digest(sums)}" if sums else tag
    compiled: dict = {}
    payload, new_state, metrics = call_cached(
        algorithm.local_update,
        (message, data, state, key),
        tag=tag,
        extra_files=files,
        info=compiled,
    )
    check_payload(algorithm, payload, r)
    if gate is not None:  # fields, the ε of the rounds executed, the audit log
        release(
            gate,
            payload_to_numpy(payload),
            r,
            algorithm=algorithm,
            n_patients=use_case(settings.use_case).size(cohort),
            digest=digest,
        )
    t_done = time.time()
    save_site_state(folder, r + 1, new_state)
    prune_site_states(folder, state_from)
    with (folder / "metrics.jsonl").open("a") as fh:
        fh.write(
            json.dumps(
                {
                    "round": r,
                    **{n: np.asarray(v).tolist() for n, v in metrics.items()},
                    "compiled": compiled,
                    "seconds": {
                        "process_to_import": _T_IMPORT - _process_start(),
                        "import": t_start - _T_IMPORT,
                        "load": t_loaded - t_start,
                        "update": t_done - t_loaded,
                    },
                }
            )
            + "\n"
        )
    return reply(payload_to_numpy(payload))


def site_summary(
    content: RecordDict, site: SiteConfig, settings: RunSettings, run_id: int
) -> RecordDict:
    """A summed round at this site (:class:`~phems_clinical.federation.flower.
    tasks.Stage`): its population-level summand, checked against the message
    schema (``$defs/summary_<stage>``) before it leaves; under secure aggregation
    only the key advertisement (the summand stays in the state folder)."""
    config = config_record(content, "config")
    r, k = config_int(config, "round"), config_int(config, "site-index")
    uc = use_case(settings.use_case)
    stage = find_stage(uc, str(config["stage"]))
    if r != stage_round(uc, stage.name):
        raise SiteProtocolError(
            f"summary {stage.name}: round {r}, expected {stage_round(uc, stage.name)}"
        )
    secure = _secure_round(config, site, settings, "summary", "sums")
    common, sums = _common(config, settings), _sums(content)
    broadcast = record_to_arrays(array_record(content, "broadcast"))
    local = _site_cohort(site, settings)
    summand = {
        n: np.asarray(v, np.float64)
        for n, v in stage.site(local, settings, common, sums, broadcast).items()
    }
    spec = stage.spec(settings, common)
    check_summary(stage.name, summand, spec)
    if secure:
        check_clip(stage, summand)
        folder = state_folder(site, settings, run_id)
        return site_advertise(
            folder,
            site,
            settings._replace(secagg_clip=stage.clip, secagg_bits=SECAGG_BITS),
            k,
            r,
            config_int(config, ROUND_ID_KEY),
            np.concatenate([summand[n].ravel() for n in sorted(spec)]),
        )
    return RecordDict(
        {
            "payload": arrays_to_record(summand),
            "site": ConfigRecord({"site-index": k, "round": r}),
        }
    )


def site_secagg(
    content: RecordDict,
    node_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    run_id: int,
) -> RecordDict:
    """A later SecAgg stage at this site: the reply content for a ``train.secagg``
    message (:func:`~phems_clinical.federation.flower.secagg_transport.site_stage`
    on the site's state folder)."""
    settings = run_settings(run_config)
    site = _checked_site(node_config, settings.num_sites)
    return site_stage(content, state_folder(site, settings, run_id), site, settings)


def site_error_log(node_config: Mapping[str, Any]) -> Path:
    """The site's own error log (``site_errors.jsonl`` in its state folder)."""
    return site_config(node_config).state_path / LOG_FILE


def _error_reply(error: SiteError, msg: Message, context: Context) -> Message:
    del context
    return Message(
        Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, error.reason), reply_to=msg
    )


def site_guarded(stage: str):
    """Decorate a ClientApp handler ``(msg, context) -> Message`` (``query``,
    ``train`` or a later protocol stage) so that any exception becomes an error
    reply carrying only ``"category reference"``; the full text and traceback go to
    :func:`site_error_log` (:func:`~phems_clinical.federation.site_errors.guarded`).
    """
    return guarded(
        stage, lambda msg, context: site_error_log(context.node_config), _error_reply
    )


app = ClientApp()


@app.query()
@site_guarded("query")
def query(msg: Message, context: Context) -> Message:
    """Reply with the site's index and cohort sizes."""
    return Message(
        site_query(context.node_config, context.run_config, context.run_id),
        reply_to=msg,
    )


@app.train()
@site_guarded("train")
def train(msg: Message, context: Context) -> Message:
    """Run the site's ``local_update`` for the broadcast round."""
    content = site_update(
        msg.content, context.node_config, context.run_config, context.run_id
    )
    return Message(content, reply_to=msg)


@app.train("secagg")
@site_guarded("secagg")
def secagg_stage(msg: Message, context: Context) -> Message:
    """Answer a secure-aggregation stage after the key advertisement."""
    content = site_secagg(
        msg.content, context.node_config, context.run_config, context.run_id
    )
    return Message(content, reply_to=msg)


__all__ = [
    "app",
    "site_error_log",
    "site_guarded",
    "site_query",
    "site_secagg",
    "site_update",
    "state_folder",
]
