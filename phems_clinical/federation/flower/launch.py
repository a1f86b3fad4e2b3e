"""Start a Flower SuperLink and K SuperNodes on loopback and run a federated fit.

Each process is separate, as in a deployment: ``flower-superlink`` (one HTTP(S)
port for its Fleet, Control and Runtime APIs), one ``flower-supernode`` per
hospital (its own Runtime API port and ``--node-config`` naming only its own site
directory), and ``flwr run`` submitting the app in this folder. Nothing is
installed or downloaded at run time (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``
and ``--disable-runtime-dependency-installation``; telemetry is off). All processes
are stopped when the run ends, also on an error or an interrupt.

By default each SuperNode runs with ``--isolation process`` and a warm ClientApp
host beside it (:mod:`~phems_clinical.federation.flower.host`: one long-lived
process that runs the node's messages through Flower's task protocol and keeps the
app, algorithm, cohort and compiled update between them), and the SuperNode's
fixed waits are capped; ``--stock-clientapp`` runs Flower's stock SuperNode, which
starts a new ``flwr-clientapp`` process per message.

Secure by default: the SuperLink serves HTTPS with a throw-away CA (SAN IP
127.0.0.1) that the SuperNodes and ``flwr`` verify, and requires SuperNode
authentication (each node's EC P-384 key registered with ``flwr supernode
register``). Only ``--insecure`` (``tls=False, node_auth=False``) runs plaintext
without authentication, for debugging. The Flower app bundle (FAB) is not
signature-checked: Flower 1.41 verifies FABs (``flower-supernode
--trusted-entities``) only when they carry Flower Hub verifications, which a
self-built FAB submitted by ``flwr run`` never has (see ``docs/deployment.md``).

Command line::

    python -m phems_clinical.federation.flower.launch --data DIR --out OUT \\
        --rounds 3 [--simulate 24] [--insecure] [--seed 0] \\
        [--product advate] [--min-sites K] [--round-timeout 300] \\
        [--job NAME [--resume]] [--secagg] [--stock-clientapp]

``DIR`` holds one sub-directory per hospital, each with a NONMEM-style
``cohort.csv`` (sites are numbered in the sorted order of the sub-directories);
``--simulate N`` first writes three simulated hospitals with N patients in all.
``OUT`` receives ``result.json``, the server checkpoint, the logs of every
process and (unless ``--insecure``) a throw-away CA, server certificate and the
nodes' authentication keys.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from phems_clinical.federation.flower.config import (
    DATA_FILE,
    RunSettings,
    to_run_config,
)

APP_DIR = Path(__file__).resolve().parent
"""The Flower app (its ``pyproject.toml``) that ``flwr run`` submits."""

CONNECTION = "phems-loopback"
"""Name of the SuperLink connection written to ``$FLWR_HOME/config.toml``."""


class TLSFiles(NamedTuple):
    """Paths of a throw-away CA certificate and the SuperLink's certificate/key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_ca(
    directory: Path, *, name: str = "phems loopback CA", days: float = 1.0
) -> tuple[Path, Path]:
    """A self-signed CA: ``directory/ca.crt`` and its EC P-384 key ``ca.key``
    (PKCS#8, mode 0600), valid for ``days`` days from 5 minutes ago."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    return _write_pem(ca, key, directory / "ca.crt", directory / "ca.key")


def _write_pem(cert, key, cert_path: Path, key_path: Path) -> tuple[Path, Path]:
    """Write a certificate and its private key (PKCS#8, created with mode 0600
    before any byte of it is written) as PEM."""
    from cryptography.hazmat.primitives import serialization

    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def issue_server_cert(
    ca_cert: Path,
    ca_key: Path,
    directory: Path,
    host: str,
    *,
    names: Sequence[str] = (),
    days: float = 1.0,
) -> tuple[Path, Path]:
    """A server certificate for ``host`` (SAN: ``host`` and ``names``, each an IP
    address or else a DNS name) signed by the CA; writes ``directory/server.pem``
    and its EC P-384 key ``server.key`` (mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(
            f"ca_key: expected an EC or RSA private key (signed with "
            f"SHA-256), got {type(signer).__name__}"
        )
    san: list[x509.GeneralName] = []
    for n in (host, *names):
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            san.append(x509.DNSName(n))
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .sign(signer, hashes.SHA256())
    )
    return _write_pem(cert, key, directory / "server.pem", directory / "server.key")


def make_tls(directory: Path, *, host: str = "127.0.0.1") -> TLSFiles:
    """A throw-away CA and a server certificate for ``host`` (SAN IP and
    ``localhost``), valid for one day; keys are EC P-384. The CA key is deleted
    once the certificate is signed."""
    ca_cert, ca_key = make_ca(directory)
    cert, key = issue_server_cert(
        ca_cert, ca_key, directory, host, names=("localhost",)
    )
    ca_key.unlink()
    return TLSFiles(ca_cert, cert, key)


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format for SuperNode authentication."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that are free on ``host`` now (all held open while
    they are chosen, so that none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(n)
        ]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


def simulate_sites(
    key, data_dir: Path, n_patients: int, *, product: str = "advate"
) -> list[Path]:
    """Simulate three hospitals (:func:`phems_clinical.pk.simulate.default_hospitals`)
    into ``data_dir/site_<k>/cohort.csv``; returns the site directories.

    Floats are written with 17 significant digits, so reading a table back gives
    the simulated values bit for bit.
    """
    from phems_clinical.pk.library import load_product
    from phems_clinical.pk.simulate import default_hospitals, simulate_hospitals

    model = load_product(product)
    events, _ = simulate_hospitals(key, model, default_hospitals(n_patients))
    dirs = []
    for k, site in enumerate(dict.fromkeys(events["SITE"])):
        d = Path(data_dir) / f"site_{k}"
        d.mkdir(parents=True, exist_ok=True)
        rows = events[events["SITE"] == site].drop(columns=["SITE"])
        rows.to_csv(d / DATA_FILE, index=False, float_format="%.17g")
        dirs.append(d)
    return dirs


def find_sites(data_dir: Path, data_file: str = DATA_FILE) -> list[Path]:
    """The site directories of ``data_dir`` (those holding ``data_file``), sorted."""
    dirs = sorted(p for p in Path(data_dir).iterdir() if (p / data_file).is_file())
    if not dirs:
        raise FileNotFoundError(f"{data_dir}: no sub-directory holds a {data_file}")
    return dirs


def _proc_table() -> dict[int, tuple[int, int]]:
    """``pid -> (parent pid, start time)`` of all processes (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


class Processes:
    """The processes a launch started, stopped together (process groups, then any
    detached descendant such as Flower's SuperExec and app processes)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen]] = []
        self._logs: list[Any] = []
        self._seen: dict[int, int] = {}

    def start(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str], log: Path
    ) -> subprocess.Popen:
        """Start ``cmd`` in a new session, its output appended to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = log.open("ab")
        self._logs.append(fh)
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started.append((name, proc))
        return proc

    def _descendants(self) -> dict[int, int]:
        if not Path("/proc").is_dir():
            return {}
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = [p.pid for _, p in self.started]
        found = {}
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found[child] = table[child][1]
                    todo.append(child)
        return found

    def remember_descendants(self) -> None:
        """Note the current descendants (so that detached ones are stopped too)."""
        self._seen.update(self._descendants())

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM every process group, SIGKILL what is left after ``grace`` s,
        then the same for remembered descendants still alive; returns the pids
        still running after that (none, normally)."""
        self.remember_descendants()
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._stop_descendants(deadline=time.monotonic() + grace)
        for fh in self._logs:
            fh.close()
        return [p.pid for _, p in self.started if p.poll() is None] + self._alive()

    def _alive(self) -> list[int]:
        table = _proc_table() if Path("/proc").is_dir() else {}
        return [
            pid
            for pid, start in self._seen.items()
            if pid in table and table[pid][1] == start
        ]

    def _stop_descendants(self, deadline: float) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            while self._alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            deadline = time.monotonic() + 2.0


def _wait_port(
    host: str, port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(
        f"{what} did not listen on {host}:{port} within {timeout:g} s; see {log}"
    )


def toml_value(v: Any) -> str:
    """``v`` as a TOML value (TOML v1.0.0): booleans and numbers bare, anything
    else as a basic string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def _node_config(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the Flower processes: this interpreter's ``bin`` first on
    ``PATH`` (Flower starts ``flower-superexec``/``flwr-clientapp`` by name), no
    run-time installation, no telemetry, float64 and one persistent JAX cache for
    every per-message app process."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env["JAX_ENABLE_X64"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    cache = env.get("PHEMS_CACHE_DIR") or str(
        Path.home() / ".cache" / "phems_clinical" / "jax"
    )
    env["PHEMS_CACHE_DIR"] = cache
    if cache.lower() != "off":
        env["JAX_COMPILATION_CACHE_DIR"] = cache
    return env


def write_connection(
    flwr_home: Path, address: str, tls: TLSFiles | None, *, name: str = CONNECTION
) -> Path:
    """``$FLWR_HOME/config.toml`` with the SuperLink connection ``name``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{name}"',
        "",
        f"[superlink.{name}]",
        f'address = "{address}"',
    ]
    if tls is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(tls.ca_cert))}")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def superlink_command(
    host: str, port: int, certs: TLSFiles | None, node_auth: bool
) -> list[str]:
    """The ``flower-superlink`` command line: HTTPS with ``certs`` (``--insecure``
    only when ``certs`` is None), SuperNode authentication when ``node_auth``, no
    run-time dependency installation."""
    if node_auth and certs is None:
        raise ValueError("node_auth: SuperNode authentication needs TLS certificates")
    security = (
        ["--insecure"]
        if certs is None
        else [
            "--ssl-ca-certfile",
            str(certs.ca_cert),
            "--ssl-certfile",
            str(certs.server_cert),
            "--ssl-keyfile",
            str(certs.server_key),
        ]
    )
    return [
        "flower-superlink",
        *security,
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        *(["--enable-supernode-auth"] if node_auth else []),
    ]


def supernode_command(
    superlink: str,
    host: str,
    port: int,
    node_config: Mapping[str, Any],
    certs: TLSFiles | None,
    auth_key: Path | None,
) -> list[str]:
    """One hospital's ``flower-supernode`` command line: it verifies the
    SuperLink's certificate against the CA of ``certs`` (``--insecure`` only when
    ``certs`` is None) and authenticates with ``auth_key`` when given."""
    if auth_key is not None and certs is None:
        raise ValueError("auth_key: SuperNode authentication needs TLS certificates")
    return [
        "flower-supernode",
        *(
            ["--insecure"]
            if certs is None
            else ["--root-certificates", str(certs.ca_cert)]
        ),
        "--superlink",
        superlink,
        "--host",
        host,
        "--port",
        str(port),
        "--node-config",
        _node_config(node_config),
        *([] if auth_key is None else ["--auth-supernode-private-key", str(auth_key)]),
    ]


HOST_MODULE = "phems_clinical.federation.flower.host"
"""The warm ClientApp host (:mod:`.host`), run as ``python -m HOST_MODULE``."""


def warm_node_commands(
    superlink: str,
    host: str,
    port: int,
    node_config: Mapping[str, Any],
    certs: TLSFiles | None,
    auth_key: Path | None,
    *,
    idle_poll: float = 0.1,
    reply_poll: float = 0.02,
    host_poll: float = 0.02,
) -> tuple[list[str], list[str]]:
    """One hospital's two commands with a warm ClientApp host: Flower's SuperNode
    as in :func:`supernode_command` plus ``--isolation process``, run through
    :func:`~phems_clinical.federation.flower.host.run_supernode` (its idle and
    reply waits capped to ``idle_poll`` and ``reply_poll`` s), and the host on the
    node's Runtime API (plain HTTP on ``host``, as Flower's own executor uses it),
    looking for a new task every ``host_poll`` s."""
    node = supernode_command(superlink, host, port, node_config, certs, auth_key)
    python = [sys.executable, "-m", HOST_MODULE]
    return (
        [
            *python,
            "supernode",
            "--idle-poll",
            repr(float(idle_poll)),
            "--reply-poll",
            repr(float(reply_poll)),
            "--",
            *node[1:],
            "--isolation",
            "process",
        ],
        [
            *python,
            "--runtime-api-address",
            f"{host}:{port}",
            "--insecure",
            "--poll",
            repr(float(host_poll)),
        ],
    )


def secagg_identities(sites: Sequence[Path]) -> dict[str, bytes]:
    """Stand-in for the hospitals' out-of-band exchange of SecAgg identities: each
    site's Ed25519 identity key in its folder (made once, mode 0600, then kept) and,
    in every site folder, the trusted roster of all K public keys; returns it."""
    from phems_clinical.federation.flower import secagg_transport as st
    from phems_clinical.federation.flower.config import IDENTITY_FILE, TRUSTED_FILE

    roster = {
        st.site_id(k): st.ensure_identity(Path(d) / IDENTITY_FILE)
        for k, d in enumerate(sites)
    }
    for d in sites:
        st.write_trusted(Path(d) / TRUSTED_FILE, roster)
    return roster


def run_loopback(
    sites: Sequence[Path],
    out: Path,
    *,
    settings: RunSettings | None = None,
    tls: bool = True,
    node_auth: bool = True,
    fail_rounds: Mapping[int, Sequence[int]] | None = None,
    resume: bool = False,
    timeout: float = 1800.0,
    env: Mapping[str, str] | None = None,
    warm_host: bool = True,
) -> dict:
    """Run ``settings`` over one SuperNode per directory of ``sites``; return the
    result JSON (plus ``"launch"`` timings).

    Parameters
    ----------
    sites : sequence of paths
        Site directories; site ``k`` is ``sites[k]`` (its index in the keys and in
        the server's sum).
    out : path
        Output folder (result, checkpoint, logs, certificates).
    settings : RunSettings, optional
        The run config; ``num_sites`` is set to ``len(sites)``, ``out`` and
        ``checkpoint_dir`` default to ``out/result.json`` and ``out/checkpoint``.
        With ``settings.secagg`` every site gets a SecAgg identity and the trusted
        roster (:func:`secagg_identities`) and its node config requires SecAgg.
    tls : bool
        Serve the SuperLink over HTTPS with a throw-away CA (SAN IP 127.0.0.1);
        the SuperNodes and ``flwr`` verify it. Default True; ``tls=False`` needs
        ``node_auth=False`` too (an explicitly insecure run).
    node_auth : bool
        Require SuperNode authentication (needs ``tls``): each node gets an EC
        P-384 key, registered with ``flwr supernode register``. Default True.
    fail_rounds : mapping site -> rounds, optional
        Fault injection for tests (``fail-rounds`` in that node's config).
    resume : bool
        Continue from the checkpoint in ``settings.checkpoint_dir`` (the sites'
        states are found under ``settings.job``, which must be that run's).
    timeout : float
        Seconds the whole run may take before everything is stopped.
    warm_host : bool
        Default True: each SuperNode runs with ``--isolation process`` and its
        fixed waits capped, and one warm ClientApp host per node
        (:mod:`~phems_clinical.federation.flower.host`, :func:`warm_node_commands`)
        runs its messages in one long-lived process. False: Flower's stock
        ``flower-supernode``, a new ``flwr-clientapp`` process per message.

    Raises
    ------
    RuntimeError
        When the run fails, with the server's error and where the logs are.
    """
    t0, wall0 = time.perf_counter(), time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sites = [Path(s).resolve() for s in sites]
    if node_auth and not tls:
        raise ValueError(
            "node_auth: SuperNode authentication needs TLS; pass "
            "tls=False and node_auth=False (--insecure) for a "
            "plaintext run"
        )
    settings = (settings or RunSettings())._replace(num_sites=len(sites))
    if not settings.out:
        settings = settings._replace(out=str(out / "result.json"))
    if not settings.checkpoint_dir:
        settings = settings._replace(checkpoint_dir=str(out / "checkpoint"))
    from phems_clinical.federation.engine import checkpoint_path

    if not resume and checkpoint_path(settings.checkpoint_dir).exists():
        raise FileExistsError(
            f"{settings.checkpoint_dir} holds a checkpoint: pass resume=True (--resume)"
            " with the job name of that run, or use a new output folder"
        )
    if resume and not settings.job:
        raise ValueError("resuming needs the job name of the interrupted run")
    result_path = Path(settings.out)
    result_path.unlink(missing_ok=True)
    env = child_env(env)
    logs = out / "logs"
    host = "127.0.0.1"
    port, *node_ports = free_ports(1 + len(sites), host)
    address = f"{host}:{port}"
    certs = make_tls(out / "certs") if tls else None
    flwr_home = out / "flwr_home"
    write_connection(flwr_home, address, certs)
    if settings.secagg:
        secagg_identities(sites)
    procs = Processes()
    timings: dict[str, float] = {}
    left: list[int] = []
    try:
        link = procs.start(
            "superlink",
            superlink_command(host, port, certs, node_auth),
            {**env, "FLWR_HOME": str(out / "superlink_home")},
            logs / "superlink.log",
        )
        _wait_port(host, port, link, 120.0, "flower-superlink", logs / "superlink.log")
        timings["superlink_ready_s"] = time.perf_counter() - t0
        for k, site in enumerate(sites):
            node_env = {**env, "FLWR_HOME": str(out / "nodes" / f"site_{k}")}
            private = None
            if node_auth:
                private, public = make_node_key(out / "keys", f"site_{k}")
                subprocess.run(
                    ["flwr", "supernode", "register", str(public), CONNECTION],
                    env={**env, "FLWR_HOME": str(flwr_home)},
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
            config = {
                "site-dir": str(site),
                "site-index": k,
                "num-sites": len(sites),
                **({"secagg-required": True} if settings.secagg else {}),
            }
            # the MAC key of a site's audit log, outside its folder (used when
            # the site holds a policy)
            config["site-key"] = str(out / "site_keys" / f"site_{k}.key")
            fails = (fail_rounds or {}).get(k)
            if fails:
                config["fail-rounds"] = ",".join(str(r) for r in fails)
            if warm_host:
                node_cmd, host_cmd = warm_node_commands(
                    address, host, node_ports[k], config, certs, private
                )
                procs.start(
                    f"supernode-{k}", node_cmd, node_env, logs / f"supernode_{k}.log"
                )
                procs.start(
                    f"host-{k}",
                    host_cmd,
                    node_env,
                    logs / f"supernode_{k}_clientapp.log",
                )
            else:
                procs.start(
                    f"supernode-{k}",
                    supernode_command(
                        address, host, node_ports[k], config, certs, private
                    ),
                    node_env,
                    logs / f"supernode_{k}.log",
                )
        run_config = out / "run_config.toml"
        run_config.write_text(
            "".join(
                f"{k} = {toml_value(v)}\n" for k, v in to_run_config(settings).items()
            )
        )
        flwr = procs.start(
            "flwr-run",
            [
                "flwr",
                "run",
                str(APP_DIR),
                CONNECTION,
                "--stream",
                "--run-config",
                str(run_config),
            ],
            {**env, "FLWR_HOME": str(flwr_home)},
            logs / "flwr_run.log",
        )
        deadline, grace = t0 + timeout, None
        while not _finished(result_path) and time.perf_counter() < deadline:
            procs.remember_descendants()
            if flwr.poll() is not None:
                if flwr.returncode != 0:
                    raise RuntimeError(
                        f"flwr run exited with code {flwr.returncode}"
                        f"; see {logs / 'flwr_run.log'}"
                    )
                # the log stream can end just before the result file is written
                grace = grace or time.perf_counter() + 30.0
                if time.perf_counter() > grace:
                    break
            time.sleep(0.25)
        if not _finished(result_path):
            raise TimeoutError(
                f"no result in {result_path} after "
                f"{time.perf_counter() - t0:.0f} s; logs in {logs}"
            )
    finally:
        left = procs.stop()
    result = json.loads(result_path.read_text())
    timings["total_s"] = time.perf_counter() - t0
    if "first_round_at" in result:
        timings["to_first_round_s"] = result["first_round_at"] - wall0
    result["launch"] = {
        **timings,
        "address": address,
        "tls": tls,
        "node_auth": node_auth,
        "logs": str(logs),
        "clientapp": "warm host" if warm_host else "stock",
        "processes": len(procs.started) + len(procs._seen),
        "left_running": left,
    }
    if result.get("status") != "completed":
        raise RuntimeError(
            f"federated run {result.get('status')}: "
            f"{result.get('error')}; logs in {logs}"
        )
    return result


def _finished(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("status") != "running"
    except (OSError, ValueError):
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m phems_clinical.federation.flower.launch",
        description="Run a federated fit with a Flower SuperLink and one SuperNode "
        "per hospital, as separate processes on loopback.",
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder with one sub-folder per hospital holding cohort.csv",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="most rounds (0: the algorithm's own limit)",
    )
    p.add_argument(
        "--simulate",
        type=int,
        metavar="N",
        help="first simulate three hospitals with N patients into --data",
    )
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument(
        "--algorithm",
        default="fed_focei",
        help="fed_focei, fedavg, fedprox, fedadam, fedyogi, ep or consensus_mc",
    )
    p.add_argument(
        "--options",
        default="",
        help="algorithm options as JSON (as for phems federate)",
    )
    p.add_argument("--product", default="advate", help="library model")
    p.add_argument(
        "--min-sites",
        type=int,
        default=0,
        help="fewest sites a round may complete with (0: all)",
    )
    p.add_argument("--round-timeout", type=float, default=300.0, help="seconds")
    p.add_argument(
        "--request",
        default=None,
        metavar="FILE",
        help="the data user's signed request ('phems governance "
        "sign-request'), checked by sites that hold a policy",
    )
    p.add_argument(
        "--job",
        default="",
        help="job name under which sites keep state (needed to resume a run)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out (same --job)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext HTTP and no SuperNode authentication (debugging "
        "only; default: HTTPS with a throw-away CA and node keys)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="HTTPS with a throw-away CA (the default; kept for old command lines)",
    )
    p.add_argument(
        "--node-auth",
        action="store_true",
        help="SuperNode authentication (the default; kept for old command lines)",
    )
    p.add_argument(
        "--secagg",
        action="store_true",
        help="secure aggregation (Bonawitz et al. 2017): the server "
        "sees only masked payloads and their sum",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds before everything is stopped",
    )
    p.add_argument(
        "--stock-clientapp",
        action="store_true",
        help="Flower's stock SuperNode: a new flwr-clientapp process "
        "per message (default: one warm ClientApp host per "
        "SuperNode, its fixed waits capped)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the result JSON."""
    args = _parser().parse_args(argv)
    if args.insecure and (args.tls or args.node_auth):
        print("error: --insecure contradicts --tls/--node-auth", file=sys.stderr)
        return 2
    request = ""
    if args.request:  # read before anything starts
        try:
            request = Path(args.request).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            print(
                f"error: --request: cannot read the signed request file "
                f"({type(err).__name__})",
                file=sys.stderr,
            )
            return 2
    if args.simulate:
        import jax

        from phems_clinical.runtime import configure_jax

        configure_jax()
        sites = simulate_sites(
            jax.random.key(args.seed), args.data, args.simulate, product=args.product
        )
    else:
        sites = find_sites(args.data)
    settings = RunSettings(
        seed=args.seed,
        algorithm=args.algorithm,
        product=args.product,
        min_sites=args.min_sites,
        rounds=args.rounds,
        round_timeout=args.round_timeout,
        job=args.job,
        options=args.options,
        secagg=args.secagg,
        request=request,
    )
    try:
        result = run_loopback(
            sites,
            args.out,
            settings=settings,
            tls=not args.insecure,
            node_auth=not args.insecure,
            resume=args.resume,
            timeout=args.timeout,
            warm_host=not args.stock_clientapp,
        )
    except (FileExistsError, RuntimeError, TimeoutError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "status",
                    "rounds",
                    "converged",
                    "estimates",
                    "history",
                    "launch",
                )
                if k in result
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
