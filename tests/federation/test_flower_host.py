"""The warm ClientApp host (phems_clinical.federation.flower.host).

* memo: values and loaded programs are kept within one scope (FAB hash, run
  config, node config) and dropped when it changes; a cohort is read again when
  its event table changes; the in-memory program gives the exported program's
  numbers bit for bit;
* the host's error path: a failure outside the ClientApp's guarded handlers
  leaves as ``category reference`` only (the patient value stays in the site log);
* SecAgg secrets held in memory write no file;
* the SuperNode wait caps touch only Flower's two fixed sleeps;
* slow: SuperLink + 3 SuperNodes with warm hosts on loopback equal the in-process
  engine bit for bit.
"""

import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flwr = pytest.importorskip(
    "flwr", reason="the Flower adapter needs flwr>=1.41,<1.42, which is not installed"
)

from phems_clinical.federation.flower import compiled  # noqa: E402
from phems_clinical.federation.flower import config as fconfig  # noqa: E402
from phems_clinical.federation.flower import host as fhost  # noqa: E402
from phems_clinical.federation.flower import secagg_transport as st  # noqa: E402
from phems_clinical.federation.site_errors import parse_reason  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_memo():
    compiled.clear_memo()
    compiled._SCOPE.clear()
    yield
    compiled.clear_memo()
    compiled._SCOPE.clear()


def test_memo_is_kept_within_a_scope_and_dropped_when_it_changes():
    calls = []

    def build():
        calls.append(1)
        return object()

    run, node = {"seed": 0, "rounds": 3}, {"site-dir": "/x", "site-index": 0}
    assert compiled.warm_scope(fhost.scope_of("fab1", run, node))
    a = compiled.memoised("algorithm", ("s", 1), build)
    assert compiled.memoised("algorithm", ("s", 1), build) is a and len(calls) == 1
    # another key within the scope is another value
    assert compiled.memoised("algorithm", ("s", 2), build) is not a
    # the same scope (dict order does not matter) keeps everything
    assert not compiled.warm_scope(
        fhost.scope_of("fab1", dict(reversed(run.items())), node)
    )
    assert compiled.memoised("algorithm", ("s", 1), build) is a
    # a change of FAB, run config or node config drops it
    for scope in (
        fhost.scope_of("fab2", run, node),
        fhost.scope_of("fab2", {**run, "seed": 1}, node),
        fhost.scope_of("fab2", {**run, "seed": 1}, {**node, "site-index": 1}),
    ):
        assert compiled.warm_scope(scope)
        assert compiled.memo_info() == {"values": 0, "programs": 0}
        b = compiled.memoised("algorithm", ("s", 1), build)
        assert b is not a
        a = b


def test_loaded_program_is_kept_in_memory_and_equals_the_export(tmp_path):
    def f(x, y):
        z = x
        for _ in range(5):
            z = jnp.sin(z @ y) + z
        return {"s": z.sum(), "z": z}

    x = jnp.linspace(0.0, 1.0, 36).reshape(6, 6)
    y = jnp.eye(6) * 0.3 + 0.01
    want = jax.jit(f)(x, y)
    seen = []
    for scope in ("a", "a", "b", "b"):
        compiled.warm_scope(scope)
        info = {}
        got = compiled.call_cached(f, (x, y), tag="t", folder=tmp_path, info=info)
        seen.append(info["cache"])
        for name in want:
            assert np.asarray(got[name]).tobytes() == np.asarray(want[name]).tobytes()
    assert seen == ["exported", "memory", "hit", "memory"]


def test_cohort_is_read_again_when_the_event_table_changes(tmp_path):
    from phems_clinical.federation.flower import client_app
    from phems_clinical.federation.flower.launch import simulate_sites

    d = simulate_sites(jax.random.key(3), tmp_path / "data", 9)[0]
    site = fconfig.site_config({"site-dir": str(d), "site-index": 0})
    settings = fconfig.RunSettings()
    a = client_app._site_cohort(site, settings)
    assert client_app._site_cohort(site, settings) is a
    table = d / fconfig.DATA_FILE
    rows = table.read_text().splitlines()
    first = rows[1].split(",")[0]
    table.write_text(
        "\n".join([rows[0]] + [r for r in rows[1:] if r.split(",")[0] != first]) + "\n"
    )
    b = client_app._site_cohort(site, settings)
    assert b is not a and b.n_subjects == a.n_subjects - 1


class _FakeClient:
    def __init__(self):
        self.closed = False

    def SendTaskHeartbeat(self, request):  # noqa: N802 -- Flower's method name
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse

        return SendTaskHeartbeatResponse(success=True)

    def close(self):
        self.closed = True


def test_host_error_leaves_only_category_and_reference(tmp_path, monkeypatch):
    """A ClientApp failure the app's own guards do not catch (here: loading the
    app fails with a patient's value in its text) is answered with a Flower error
    whose reason is ``category reference`` only; the text stays in the site log."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SubStatus
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime import run_clientapp

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    secret = "MRN-0049001 weight 71.3"
    node = {"site-dir": str(tmp_path / "site"), "site-index": 0}
    msg = Message(
        RecordDict({"config": ConfigRecord({"round": 0})}),
        dst_node_id=1,
        message_type="train",
    )
    msg.metadata.__dict__["_message_id"] = "m" * 64
    context = Context(
        run_id=1,
        node_id=1,
        node_config=node,
        state=RecordDict(),
        run_config={"seed": 0},
    )

    class Run:
        fab_id, fab_version = "phems/app", "0.1.0"

    class Fab:
        hash_str, content = "f" * 64, b""

    pushed, outputs = [], []
    monkeypatch.setattr(
        run_clientapp, "pull_task_input", lambda client: (msg, context, Run(), Fab())
    )
    monkeypatch.setattr(
        run_clientapp, "push_message", lambda client, reply, ctx: pushed.append(reply)
    )
    monkeypatch.setattr(
        run_clientapp,
        "push_task_output",
        lambda client, ctx, status, details: outputs.append((status, details)),
    )
    host = fhost.WarmHost("127.0.0.1:1")
    fake = _FakeClient()
    monkeypatch.setattr(host.clients, "make", lambda *a, **k: fake)

    def broken(run, fab):
        raise ValueError(f"patient {secret} broke the app")

    monkeypatch.setattr(host, "client_app", broken)
    assert host.run_task("token") == SubStatus.FAILED
    (reply,) = pushed
    assert reply.has_error() and secret not in reply.error.reason
    error = parse_reason(reply.error.reason)
    assert error is not None and error.category == "internal_error"
    assert outputs == [(SubStatus.FAILED, reply.error.reason)]
    assert fake.closed and host.tasks == 1
    log = tmp_path / "site" / fconfig.STATE_DIR / "site_errors.jsonl"
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["reference"] == error.reference and secret in entry["message"]

    # a ClientApp that answers: its reply goes out, the task completes
    def app(run, fab):
        return lambda message, context: Message(RecordDict(), reply_to=message)

    monkeypatch.setattr(host, "client_app", app)
    pushed.clear()
    assert host.run_task("token") == SubStatus.COMPLETED
    assert not pushed[0].has_error() and outputs[-1] == (SubStatus.COMPLETED, "")


def test_secrets_in_memory_write_no_file(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    try:
        st.hold_secrets_in_memory(True)
        st._keep(folder, 7, {"k": b"\x01" * 32, "x": np.arange(3.0)})
        assert not list(folder.iterdir())
        assert st._kept(folder, 7)["k"] == b"\x01" * 32
        assert st._kept(folder, 8) is None
        assert st.clear_secrets(folder) == 1 and st._kept(folder, 7) is None
    finally:
        st.hold_secrets_in_memory(False)
    st._keep(folder, 7, {"k": b"\x02"})  # the stock path: an owner-only file
    assert [p.name for p in folder.iterdir()] == ["secagg-000000000007.json"]
    assert st._kept(folder, 7) == {"k": b"\x02"}


def test_supernode_wait_caps_touch_only_flowers_sleeps(monkeypatch):
    from flwr.supernode import start_client_internal as sci

    monkeypatch.setattr(sci, "time", sci.time)
    monkeypatch.setattr(sci, "pull_objects", sci.pull_objects)
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    with pytest.raises(ValueError, match="idle"):
        fhost.cap_supernode_waits(idle=5.0)
    fhost.cap_supernode_waits(idle=0.1, reply=0.02, pull_backoff=0.05)
    for s in (3, 0.5, 1.25):
        sci.time.sleep(s)
    assert slept == [0.1, 0.02, 1.25]
    assert sci.time.monotonic is time.monotonic
    assert sci.pull_objects.keywords == {"initial_backoff": 0.05}


def test_host_command_line_refuses_contradictions():
    assert fhost.main(["--runtime-api-address", "127.0.0.1:1"]) == 2
    assert (
        fhost.main(
            ["--runtime-api-address", "127.0.0.1:1", "--insecure", "--poll", "0"]
        )
        == 2
    )
    assert fhost.main(["supernode", "--", "--superlink", "127.0.0.1:1"]) == 2


@pytest.mark.slow
def test_warm_host_loopback_equals_in_process_engine(tmp_path):
    """Three SuperNodes with warm hosts (TLS, node authentication), 2 rounds with
    a failure injected at site 2 in round 1: the server state equals the
    in-process engine's bit for bit, as the stock run does
    (test_flower.test_loopback_deployment_equals_in_process_engine)."""
    from phems_clinical.federation import engine
    from phems_clinical.federation.flower.compiled import call_cached
    from phems_clinical.federation.flower.launch import run_loopback, simulate_sites
    from phems_clinical.federation.focei import fed_focei
    from phems_clinical.federation.pk_sites import n_occasions_all, pad_sites
    from phems_clinical.pk.library import load_product

    dirs = simulate_sites(jax.random.key(11), tmp_path / "data", 24)
    model = load_product("advate")
    cohorts = [
        fconfig.read_site_cohort(
            fconfig.site_config({"site-dir": str(d), "site-index": k}), model
        )
        for k, d in enumerate(dirs)
    ]
    n_occ = n_occasions_all(cohorts)
    algorithm = fed_focei(model, n_occ)
    padded = pad_sites(cohorts)
    key = jax.random.key(5)

    def fault(r, k, attempt):
        return "failed" if (r, k) == (1, 2) else None

    ref = engine.run_federated(
        key, algorithm, padded, max_rounds=2, min_sites=2, fault=fault, vectorise=False
    )
    settings = fconfig.RunSettings(
        seed=5, rounds=2, min_sites=2, num_sites=3, n_occ=n_occ
    )
    tag, files = fconfig.algorithm_tag(settings, n_occ)
    call_cached(
        algorithm.local_update,  # warm the nodes' export cache
        (
            algorithm.broadcast(ref.server),
            padded[0],
            algorithm.init_site(padded[0]),
            key,
        ),
        tag=tag,
        extra_files=files,
    )
    result = run_loopback(
        dirs, tmp_path / "out", settings=settings, fail_rounds={2: [1]}, timeout=900
    )
    assert result["launch"]["clientapp"] == "warm host"
    assert result["status"] == "completed" and result["rounds"] == 2
    assert [h["participants"] for h in result["history"]] == [[0, 1, 2], [0, 1]]
    server, _, _ = engine.load_checkpoint(
        tmp_path / "out" / "checkpoint", algorithm.init_server(key), []
    )
    for got, want in zip(
        jax.tree.leaves(server), jax.tree.leaves(ref.server), strict=True
    ):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    assert result["launch"]["left_running"] == []
    # every message of a site ran in its one host process: the export loaded
    # once, then the update kept in memory (site 2 failed its round 1)
    for d in dirs:
        lines = [
            json.loads(x)
            for x in next((d / fconfig.STATE_DIR).rglob("metrics.jsonl"))
            .read_text()
            .splitlines()
        ]
        caches = [line["compiled"]["cache"] for line in lines]
        assert caches == (["hit", "memory"] if d != dirs[2] else ["hit"])
        log = (
            tmp_path / "out" / "logs" / f"supernode_{dirs.index(d)}_clientapp.log"
        ).read_text()
        assert re.search(r"stopped after \d+ tasks", log)
    seconds = ", ".join(f"{h['seconds']:.2f}" for h in result["history"])
    print(f"\nwarm-host loopback: rounds {seconds} s")


def test_serverapp_wait_cap_only_sets_the_pull_backoff(monkeypatch):
    """The ServerApp's cap wraps Flower's grid ``pull_objects`` with a 0.05 s first
    backoff (once, however often it is applied) and refuses a value out of range."""
    import functools

    from flwr.superlink.grid import http_grid

    from phems_clinical.federation.flower.host import cap_serverapp_waits

    original = http_grid.pull_objects
    monkeypatch.setattr(http_grid, "pull_objects", original)  # restored after
    cap_serverapp_waits()
    cap_serverapp_waits()
    capped = http_grid.pull_objects
    assert isinstance(capped, functools.partial) and capped.func is original
    assert capped.keywords == {"initial_backoff": 0.05}
    with pytest.raises(ValueError, match="pull_backoff"):
        cap_serverapp_waits(10.0)


def test_host_wait_cap_starts_the_task_pull_backoff_early(monkeypatch):
    """The warm host's cap binds a 0.05 s first backoff to the function that
    Flower's ``pull_task_input`` uses to pull a task's message (its default is
    1 s), once however often it is applied."""
    import functools
    import inspect

    from flwr.supernode.runtime import run_clientapp

    from phems_clinical.federation.flower.host import cap_host_waits

    original = run_clientapp.pull_and_inflate_object_from_tree
    assert inspect.signature(original).parameters["initial_backoff"].default == 1
    assert "pull_and_inflate_object_from_tree(" in inspect.getsource(
        run_clientapp.pull_task_input
    )
    monkeypatch.setattr(
        run_clientapp, "pull_and_inflate_object_from_tree", original
    )  # restored after
    cap_host_waits()
    cap_host_waits()
    capped = run_clientapp.pull_and_inflate_object_from_tree
    assert isinstance(capped, functools.partial) and capped.func is original
    assert capped.keywords == {"initial_backoff": 0.05}
    with pytest.raises(ValueError, match="pull_backoff"):
        cap_host_waits(0.0)


def test_first_compile_lock_makes_other_processes_wait(tmp_path):
    """Processes sharing a cache folder compile a program one at a time: while one
    holds the program's lock (here: this test, through its own open file, as
    another process would), ``call_cached`` waits; once released it exports, runs
    and records the wait; a later process (memo cleared) loads the export
    without waiting. Results equal ``jax.jit``."""
    import fcntl
    import threading

    def fn(x, y):
        return {"s": jnp.sum(jnp.sin(x) * y)}

    args = (jnp.arange(5.0), jnp.float64(2.0))
    want = float(jax.jit(fn)(*args)["s"])
    compiled.clear_memo()
    info, out = {}, {}
    probe = {}
    compiled.call_cached(fn, args, tag="probe", folder=tmp_path, info=probe)
    compiled.clear_memo()
    lock = tmp_path / f"{probe['key']}.lock"
    for p in tmp_path.glob("*.pkl"):
        p.unlink()  # the next call must export again, under the lock
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        worker = threading.Thread(
            target=lambda: out.update(
                r=compiled.call_cached(
                    fn, args, tag="probe", folder=tmp_path, info=info
                )
            )
        )
        worker.start()
        time.sleep(0.6)
        assert worker.is_alive() and "r" not in out  # waiting for the lock
        fcntl.flock(fh, fcntl.LOCK_UN)
    worker.join(timeout=60)
    assert float(out["r"]["s"]) == want
    assert info["cache"] == "exported" and info["waited_s"] >= 0.5
    compiled.clear_memo()
    later = {}
    got = compiled.call_cached(fn, args, tag="probe", folder=tmp_path, info=later)
    assert float(got["s"]) == want
    assert later["cache"] == "hit" and "waited_s" not in later
    compiled.clear_memo()
