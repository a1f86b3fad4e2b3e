"""A warm ClientApp host for one SuperNode (Flower 1.41 ``--isolation process``).

Flower runs every message a SuperNode receives as a *task*. With its default
``--isolation subprocess`` the SuperNode starts ``flower-superexec``, which polls
the node's Runtime API (``AcquireTask``) and starts a new ``flwr-clientapp``
process per task: Python, Flower, this package and JAX are imported, the algorithm
built, the cohort read and the compiled update loaded again for every message --
seconds per message for a site update of milliseconds.

With ``flower-supernode --isolation process`` the SuperNode starts no executor and
waits for one outside it. This module is that executor: one long-lived process per
SuperNode that acquires one task at a time over the same Runtime API and runs it
*in process*, with Flower's own task functions
(``flwr.supernode.runtime.run_clientapp.pull_task_input``, ``push_message``,
``push_task_output``): pull the task's message, context, run and FAB with the
task's token, call the ClientApp the FAB names, push the reply and the context,
finish the task. Between tasks it keeps (:mod:`.compiled`):

* the installed FAB and the loaded ClientApp (per FAB hash);
* the algorithm, the site's cohort (re-read when its event table changes) and the
  loaded compiled site update, for one scope -- the FAB hash, run config and node
  config of the task (:func:`~phems_clinical.federation.flower.compiled.warm_scope`);
  a task of another scope drops them first;
* the site's SecAgg secrets of the round in progress, in memory instead of files
  (:func:`~phems_clinical.federation.flower.secagg_transport.hold_secrets_in_memory`).

The site's state between rounds still goes to its state folder
(:mod:`.site_state`), so a stock ``flwr-clientapp`` can take over a job.

A failure outside the ClientApp's own guarded handlers (loading the app, a
message type it does not handle, the Runtime API) is answered like theirs: a
Flower error whose reason is only a category and a reference
(:mod:`~phems_clinical.federation.site_errors`), with the text in the site's
``site_errors.jsonl`` (or this process's log when the node config cannot be read).
SIGTERM or SIGINT stops the host after the task in progress.

Commands (one pair per hospital; the Runtime API stays on 127.0.0.1)::

    python -m phems_clinical.federation.flower.host supernode \\
        --idle-poll 0.1 --reply-poll 0.02 -- \\
        --isolation process --superlink HOST:PORT --host 127.0.0.1 --port 9094 ...
    python -m phems_clinical.federation.flower.host \\
        --runtime-api-address 127.0.0.1:9094 --insecure

The first runs Flower's own ``flower-supernode`` (any of its options after
``--``; the stock ``flower-supernode --isolation process ...`` works as well) with
its fixed waits capped by :func:`cap_supernode_waits`, a monkeypatch of three
``time.sleep`` calls in ``flwr.supernode.start_client_internal`` that applies only
inside that process (see ``docs/deployment.md`` for the waits Flower does not let
one change).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

LOG = logging.getLogger("phems_clinical.flower.host")

FLOWER_IDLE_SLEEP = 3
"""Seconds Flower 1.41's SuperNode sleeps after a pull from the SuperLink that
brought no message (``start_client_internal``)."""

FLOWER_REPLY_SLEEP = 0.5
"""Seconds Flower 1.41's SuperNode sleeps between looks for the ClientApp's reply
(and for a reply object's content) before sending it to the SuperLink."""


def _freeze(value: Any) -> Any:
    """A hashable copy of a (nested) config mapping."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def scope_of(
    fab_hash: str, run_config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> tuple:
    """The memo scope of a task: its FAB hash, run config and node config."""
    return (str(fab_hash), _freeze(run_config), _freeze(node_config))


def _site_log(node_config: Mapping[str, Any] | None) -> Path | None:
    """The site's error log, or None when the node config cannot say where."""
    if node_config is None:
        return None
    try:
        from phems_clinical.federation.flower.config import site_config
        from phems_clinical.federation.site_errors import LOG_FILE

        return site_config(node_config).state_path / LOG_FILE
    except Exception:  # noqa: BLE001 -- then the host's own log
        return None


def error_reason(
    err: BaseException, node_config: Mapping[str, Any] | None, *, stage: str = "host"
) -> str:
    """``"category reference"`` for ``err``; its text and traceback go to the site's
    log (:func:`~phems_clinical.federation.site_errors.record_site_error`)."""
    from phems_clinical.federation.site_errors import record_site_error

    return record_site_error(err, _site_log(node_config), stage=stage).reason


class _Client:
    """Makes Runtime API clients: one for acquiring tasks, one per task (its
    token). Transport errors are retried (the SuperNode may be starting); an HTTP
    error is not (Flower's own retry policy sends SIGINT to the process on a 401,
    which would end a long-lived host)."""

    def __init__(
        self, address: str, insecure: bool, root_certificates: bytes | None
    ) -> None:
        self.address, self.insecure = address, insecure
        self.root_certificates = root_certificates

    def make(
        self, component: str, token: str | None = None, *, max_time: float | None = 60.0
    ):
        import httpx
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import RetryInvoker, exponential
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [
            RuntimeVersionHttpInterceptor(component_name=component)
        ]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        retry = RetryInvoker(
            lambda: exponential(base_delay=0.05, max_delay=2),
            httpx.TransportError,
            max_tries=None,
            max_time=max_time,
        )
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.insecure,
            root_certificates=self.root_certificates,
            interceptors=interceptors,
            retry_invoker=retry,
        )


class WarmHost:
    """Runs a SuperNode's ClientApp tasks in this process, keeping what they
    build between tasks (see the module docstring).

    Parameters
    ----------
    address : str
        The SuperNode's Runtime API (``host:port``).
    insecure : bool
        Plain HTTP to the Runtime API (Flower's default on loopback); else HTTPS
        verified against ``root_certificates`` (PEM bytes).
    poll : float
        Seconds between ``AcquireTask`` calls while no task is pending.
    """

    def __init__(
        self,
        address: str,
        *,
        insecure: bool = True,
        root_certificates: bytes | None = None,
        poll: float = 0.02,
    ) -> None:
        if not 0.001 <= poll <= 60.0:
            raise ValueError(f"poll: expected 0.001..60 seconds, got {poll!r}")
        self.clients = _Client(address, insecure, root_certificates)
        self.poll = float(poll)
        self.stop = threading.Event()
        self.apps: dict[str, Any] = {}
        self.tasks = 0

    # -- the app of a FAB, installed and loaded once per FAB hash ---------------
    def client_app(self, run, fab):
        """The ClientApp ``fab`` names (installed and loaded on first use)."""
        app = self.apps.get(fab.hash_str)
        if app is None:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(
                default_app_ref="", app_path=None, multi_app=True
            )
            app = self.apps[fab.hash_str] = load(
                run.fab_id, run.fab_version, fab.hash_str
            )
        return app

    # -- one task ---------------------------------------------------------------
    def run_task(self, token: str) -> str:
        """Run the task of ``token`` to its end; returns Flower's sub-status
        (``completed`` or ``failed``)."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        from phems_clinical.federation.flower.compiled import warm_scope

        client = self.clients.make("flwr-clientapp", token)
        lost = threading.Event()
        heartbeat = HeartbeatSender(_heartbeat_fn(client, lost))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "internal_error"
        try:
            message, context, run, fab = pull_task_input(client)
            warm_scope(scope_of(fab.hash_str, context.run_config, context.node_config))
            app = self.client_app(run, fab)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # noqa: BLE001 -- every failure is categorised
            details = error_reason(
                err, None if context is None else context.node_config
            )
            if message is not None:
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, details),
                    reply_to=message,
                )
        finally:
            try:
                if reply is not None and context is not None and not lost.is_set():
                    push_message(client, reply, context)
            except Exception as err:  # noqa: BLE001
                status = SubStatus.FAILED
                details = error_reason(
                    err, None if context is None else context.node_config, stage="push"
                )
            finally:
                push_task_output(client, context, status, details)
                heartbeat.stop()
                client.close()
        self.tasks += 1
        return status

    # -- the loop ---------------------------------------------------------------
    def serve(self, max_tasks: int | None = None) -> int:
        """Acquire and run tasks until :attr:`stop` is set (or ``max_tasks`` have
        run); returns the number of tasks run."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: E402
        from flwr.supercore.constant import TaskType

        from phems_clinical.federation.flower import secagg_transport

        secagg_transport.hold_secrets_in_memory(True)
        client = self.clients.make("SuperExec", max_time=None)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while not self.stop.is_set():
                if max_tasks is not None and self.tasks >= max_tasks:
                    break
                try:
                    res = client.AcquireTask(request)
                except Exception as err:  # noqa: BLE001 -- keep serving
                    LOG.warning("AcquireTask failed (%s); retrying", type(err).__name__)
                    self.stop.wait(1.0)
                    continue
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                    continue  # the next message often follows at once
                self.stop.wait(self.poll)
        finally:
            client.close()
        return self.tasks


def _heartbeat_fn(client, lost: threading.Event) -> Callable[[], bool]:
    """Flower's task heartbeat without its SIGINT on a refused beat (which would
    end this process): a refused beat marks the task as lost instead."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        if lost.is_set():
            return True
        try:
            res = client.SendTaskHeartbeat(request)
        except httpx.HTTPError:
            return False
        if not res.success:
            lost.set()
        return True

    return beat


# -- the SuperNode's fixed waits ---------------------------------------------------


class _CappedSleep:
    """``time`` for ``flwr.supernode.start_client_internal`` only: its idle sleep
    (:data:`FLOWER_IDLE_SLEEP`) becomes ``idle`` s and its reply sleeps
    (:data:`FLOWER_REPLY_SLEEP`) ``reply`` s; anything else is ``time`` itself."""

    def __init__(self, idle: float, reply: float) -> None:
        self.idle, self.reply = idle, reply

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP:
            seconds = self.idle
        elif seconds == FLOWER_REPLY_SLEEP:
            seconds = self.reply
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_supernode_waits(
    idle: float = 0.1, reply: float = 0.02, pull_backoff: float = 0.05
) -> None:
    """Cap the fixed waits of Flower 1.41's SuperNode loop, in this process only.

    ``flwr.supernode.start_client_internal`` sleeps 3 s after every pull from the
    SuperLink that brought no message, and 0.5 s between looks for the ClientApp's
    reply; neither is configurable. Its module-level ``time`` is replaced by a
    proxy whose ``sleep(3)`` sleeps ``idle`` s and ``sleep(0.5)`` ``reply`` s, and
    its ``pull_objects`` (the message's objects from the SuperLink, first retry
    after 1 s, doubling) starts its backoff at ``pull_backoff`` s. Nothing else
    in Flower changes.

    Raises
    ------
    RuntimeError
        When the installed Flower is not 1.41 or its loop no longer has these
        sleeps (the patch would silently do nothing).
    ValueError
        For a wait outside 0.001..3 s.
    """
    for name, value in (
        ("idle", idle),
        ("reply", reply),
        ("pull_backoff", pull_backoff),
    ):
        if not 0.001 <= value <= 3.0:
            raise ValueError(f"{name}: expected 0.001..3 seconds, got {value!r}")
    import flwr
    from flwr.supernode import start_client_internal as sci

    source = inspect.getsource(sci)
    needed = [
        f"time.sleep({FLOWER_IDLE_SLEEP})",
        f"time.sleep({FLOWER_REPLY_SLEEP})",
        "pull_objects(",
    ]
    missing = [n for n in needed if n not in source]
    version = getattr(flwr, "__version__", "")
    if missing or not version.startswith("1.41."):
        raise RuntimeError(
            f"cap_supernode_waits: written for Flower 1.41, found {version!r}"
            + (f" without {missing} in start_client_internal" if missing else "")
            + "; run flower-supernode without the wrapper"
        )
    # stands in for the time module inside that one Flower module
    sci.time = _CappedSleep(float(idle), float(reply))  # type: ignore[assignment]
    sci.pull_objects = functools.partial(
        sci.pull_objects, initial_backoff=float(pull_backoff)
    )


def _start_backoff_at(module: Any, name: str, pull_backoff: float, who: str) -> None:
    """Bind ``initial_backoff=pull_backoff`` to Flower 1.41's ``module.name`` (an
    object-pull function whose first retry otherwise waits 1 s, doubling), in this
    process only; applied once however often it is called. Refused on another
    Flower version, as :func:`cap_supernode_waits`."""
    if not 0.001 <= pull_backoff <= 3.0:
        raise ValueError(
            f"pull_backoff: expected 0.001..3 seconds, got {pull_backoff!r}"
        )
    import flwr

    version = getattr(flwr, "__version__", "")
    if not version.startswith("1.41.") or not hasattr(module, name):
        raise RuntimeError(f"{who}: written for Flower 1.41, found {version!r}")
    if not isinstance(getattr(module, name), functools.partial):
        setattr(
            module,
            name,
            functools.partial(
                getattr(module, name), initial_backoff=float(pull_backoff)
            ),
        )


def cap_serverapp_waits(pull_backoff: float = 0.05) -> None:
    """In this (ServerApp) process only: Flower 1.41's grid pulls a reply's
    objects with ``pull_objects``, whose first retry, when a SuperNode has not yet
    finished uploading them, waits 1 s (doubling); start it at ``pull_backoff``
    s instead."""
    from flwr.superlink.grid import http_grid

    _start_backoff_at(http_grid, "pull_objects", pull_backoff, "cap_serverapp_waits")


def cap_host_waits(pull_backoff: float = 0.05) -> None:
    """In this (warm host) process only: Flower 1.41's ``pull_task_input`` pulls a
    task's message from the SuperNode with ``pull_and_inflate_object_from_tree``,
    whose first retry, when the SuperNode is still fetching the message from the
    SuperLink, waits 1 s (doubling); start it at ``pull_backoff`` s instead. On
    loopback this wait was hit by most tasks and was the largest share of a
    SecAgg stage (about 1 s of its 1.7-2 s)."""
    from flwr.supernode.runtime import run_clientapp

    _start_backoff_at(
        run_clientapp,
        "pull_and_inflate_object_from_tree",
        pull_backoff,
        "cap_host_waits",
    )


def run_supernode(
    argv: Sequence[str], *, idle: float, reply: float, pull_backoff: float
) -> None:
    """Flower's ``flower-supernode`` with ``argv``, its waits capped
    (:func:`cap_supernode_waits`)."""
    cap_supernode_waits(idle, reply, pull_backoff)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


# -- command line ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m phems_clinical.federation.flower.host",
        description="Run a SuperNode's ClientApp tasks in one long-lived process "
        "(the SuperNode started with --isolation process).",
    )
    p.add_argument(
        "--runtime-api-address",
        required=True,
        metavar="HOST:PORT",
        help="the SuperNode's Runtime API (its --host and --port)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP to the Runtime API (Flower's default on 127.0.0.1)",
    )
    p.add_argument(
        "--root-certificates",
        type=Path,
        default=None,
        help="CA certificate of the Runtime API's TLS (the SuperNode's "
        "--ssl-ca-certfile)",
    )
    p.add_argument(
        "--poll",
        type=float,
        default=0.02,
        help="seconds between looks for a new task (default 0.02)",
    )
    p.add_argument(
        "--pull-backoff",
        type=float,
        default=0.05,
        help="first retry of a task's message not yet on the SuperNode (Flower: 1)",
    )
    return p


def _supernode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m phems_clinical.federation.flower.host supernode",
        description="Flower's flower-supernode (its options after --) with its "
        "fixed waits capped.",
    )
    p.add_argument(
        "--idle-poll",
        type=float,
        default=0.1,
        help="seconds between pulls from the SuperLink while idle "
        f"(Flower: {FLOWER_IDLE_SLEEP})",
    )
    p.add_argument(
        "--reply-poll",
        type=float,
        default=0.02,
        help="seconds between looks for the ClientApp's reply "
        f"(Flower: {FLOWER_REPLY_SLEEP})",
    )
    p.add_argument(
        "--pull-backoff",
        type=float,
        default=0.05,
        help="first retry of an unavailable message object (Flower: 1)",
    )
    p.add_argument(
        "flower_args",
        nargs=argparse.REMAINDER,
        help="-- then flower-supernode's own options",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll
    if argv[:1] == ["supernode"]:
        args = _supernode_parser().parse_args(argv[1:])
        rest = (
            args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
        )
        if "--isolation" not in rest:
            print(
                "error: supernode: pass --isolation process (after --) so that "
                "the warm host runs the ClientApp",
                file=sys.stderr,
            )
            return 2
        run_supernode(
            rest,
            idle=args.idle_poll,
            reply=args.reply_poll,
            pull_backoff=args.pull_backoff,
        )
        return 0
    args = _parser().parse_args(argv)
    if args.insecure and args.root_certificates is not None:
        print("error: --insecure contradicts --root-certificates", file=sys.stderr)
        return 2
    if not args.insecure and args.root_certificates is None:
        print(
            "error: pass --insecure (plain HTTP on 127.0.0.1) or "
            "--root-certificates for the Runtime API",
            file=sys.stderr,
        )
        return 2
    certs = (
        None if args.root_certificates is None else args.root_certificates.read_bytes()
    )
    try:
        host = WarmHost(
            args.runtime_api_address,
            insecure=args.insecure,
            root_certificates=certs,
            poll=args.poll,
        )
    except ValueError as err:
        print(f"error: --poll: {err}", file=sys.stderr)
        return 2
    try:
        cap_host_waits(args.pull_backoff)
    except ValueError as err:
        print(f"error: --pull-backoff: {err}", file=sys.stderr)
        return 2

    def stop(signum, frame) -> None:
        del frame
        LOG.info("signal %d: stopping after the task in progress", signum)
        host.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    LOG.info("warm ClientApp host on %s", args.runtime_api_address)
    with contextlib.suppress(KeyboardInterrupt):
        host.serve()
    LOG.info("stopped after %d tasks", host.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
