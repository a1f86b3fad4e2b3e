"""A Flower deployment across machines: one command per role and step.

The coordinator holds the consortium CA and runs the SuperLink; each hospital
runs one SuperNode on its own machine over its own site folder. Each step reads
and writes only what its role holds:

* ``coordinator-init`` (coordinator): writes the consortium CA (``ca/ca.crt``,
  ``ca/ca.key``), the SuperLink's certificate for its public address
  (``superlink/server.pem``, ``server.key``) and the ``flwr`` connection
  (``cli/config.toml``).
* ``site-init`` (hospital): reads the distributed ``ca.crt`` and the site folder
  (``cohort.csv``, optional policy); writes the node's key pair and the audit MAC
  key in ``keys/``.
* ``register`` (coordinator): reads a hospital's *public* key, registers it with
  the SuperLink (``flwr supernode register``), assigns the site index
  (``sites.json``).
* ``superlink`` (coordinator): runs ``flower-superlink`` (HTTPS, SuperNode
  authentication, state in ``superlink/state.db``).
* ``supernode`` (hospital): runs ``flower-supernode`` (verifies the SuperLink
  against ``ca.crt``, authenticates with its key).
* ``submit`` (coordinator): submits the run (``flwr run``) and waits for
  ``runs/<name>/result.json``.

The hospital's private key never leaves its ``keys/`` folder; the coordinator
receives only ``keys/supernode.pub``; the CA certificate (public) is copied to
every hospital. Certificates, keys and command lines come from
:mod:`~phems_clinical.federation.flower.launch`, as for the loopback launcher.
``superlink`` and ``supernode`` replace themselves with the Flower process
(``exec``), so a service manager (systemd) supervises Flower directly;
``--dry-run`` prints the command instead. See ``docs/deployment.md``
("Multi-machine deployment").

Command line::

    python -m phems_clinical.federation.flower.deploy <command> --help
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from phems_clinical.federation.flower.config import (
    DATA_FILE,
    POLICY_FILE,
    RunSettings,
    to_run_config,
)
from phems_clinical.federation.flower.launch import (
    APP_DIR,
    TLSFiles,
    child_env,
    issue_server_cert,
    make_ca,
    make_node_key,
    superlink_command,
    supernode_command,
    write_connection,
)

CONNECTION = "phems"
"""Name of the coordinator's SuperLink connection in ``cli/config.toml``."""

SUPERLINK_PORT = 9092
"""Default port of the SuperLink (Fleet, Control and Runtime APIs on one port)."""

SUPERNODE_PORT = 9094
"""Default port of a SuperNode's own Runtime API (on 127.0.0.1 only)."""

NODE_KEY = "supernode"
"""Name of a hospital's SuperNode key pair in its ``keys/`` folder."""

SITE_MAC_KEY = "site_mac.key"
"""Name of a hospital's audit/ledger MAC key in its ``keys/`` folder."""


class DeployError(ValueError):
    """A deployment step cannot run as asked (the message names the option)."""


# ------------------------------------------------------------------ helpers


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DeployError(f"{what}: {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise DeployError(
            f"{what}: {path} cannot be read ({type(err).__name__})"
        ) from None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def split_address(address: str, option: str = "--address") -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) into host and port; refuses anything else."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([A-Za-z0-9.\-]+):(\d+)", address)
    if not m:
        raise DeployError(
            f"{option}: expected HOST:PORT (an IP address or DNS name "
            f"and a port), got {address!r}"
        )
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise DeployError(f"{option}: port must be 1..65535, got {port}")
    return host, port


def _ca_only(ca_cert: Path) -> TLSFiles:
    # supernode_command reads only the CA of a TLSFiles: a hospital has no
    # server certificate.
    return TLSFiles(ca_cert, Path(os.devnull), Path(os.devnull))


def _check_ca(path: Path, option: str) -> None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except FileNotFoundError:
        raise DeployError(f"{option}: {path} does not exist") from None
    except (OSError, ValueError, x509.ExtensionNotFound) as err:
        raise DeployError(
            f"{option}: {path} is not a PEM CA certificate ({type(err).__name__})"
        ) from None
    if not ca:
        raise DeployError(
            f"{option}: {path} is not a CA certificate (basic "
            "constraints CA=false): give the consortium CA's ca.crt"
        )


def public_key_fingerprint(path: Path) -> str:
    """``SHA256:<hex>`` of an OpenSSH public key's blob (compare it out of band
    before registering); refuses a file that is not an EC or Ed25519 key."""
    import base64

    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        data = Path(path).read_bytes()
        key = load_ssh_public_key(data)
    except FileNotFoundError:
        raise DeployError(f"--public-key: {path} does not exist") from None
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DeployError(
            f"--public-key: {path} is not an OpenSSH public key ({type(err).__name__})"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise DeployError(
            f"--public-key: {path}: expected an EC or Ed25519 key (made by site-init)"
        )
    blob = base64.b64decode(data.split()[1])
    return "SHA256:" + hashlib.sha256(blob).hexdigest()


def _exec_or_print(cmd: list[str], env: Mapping[str, str], dry_run: bool) -> int:
    if dry_run:
        home = env.get("FLWR_HOME", "")
        print(f"FLWR_HOME={shlex.quote(home)} " + shlex.join(cmd))
        return 0
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, dict(env))
    return 1  # not reached


# ------------------------------------------------------------------ coordinator


def coordinator_init(
    directory: Path,
    address: str,
    *,
    name: str = "phems consortium",
    days: float = 365.0,
    reissue: bool = False,
) -> dict:
    """The coordinator's folder: the consortium CA, the SuperLink's certificate for
    ``address`` (its host in the SAN) and the ``flwr`` connection.

    ``reissue`` keeps the CA and issues a new server certificate (a new address,
    or the old one expiring); the hospitals' ``ca.crt`` stays valid.
    """
    directory = Path(directory).resolve()
    host, port = split_address(address)
    ca_dir, link_dir = directory / "ca", directory / "superlink"
    ca_cert, ca_key = ca_dir / "ca.crt", ca_dir / "ca.key"
    if reissue:
        if not ca_key.is_file():
            raise DeployError(
                f"--reissue: {ca_key} does not exist (the CA key is "
                "needed to sign a new server certificate)"
            )
    else:
        if ca_cert.exists():
            raise DeployError(
                f"--dir: {directory} already holds a CA; pass "
                "--reissue for a new server certificate, or choose "
                "a new folder"
            )
        if days <= 0:
            raise DeployError(f"--days: expected > 0, got {days:g}")
        ca_cert, ca_key = make_ca(ca_dir, name=f"{name} CA", days=days)
    # 127.0.0.1: the SuperLink's own SuperExec reaches its Runtime API there
    cert, key = issue_server_cert(
        ca_cert, ca_key, link_dir, host, names=("127.0.0.1",), days=days
    )
    files = TLSFiles(ca_cert, cert, key)
    write_connection(directory / "cli", address, files, name=CONNECTION)
    info = {"address": address, "host": host, "port": port}
    _write_json(directory / "deployment.json", info)
    sites = directory / "sites.json"
    if not sites.exists():
        _write_json(sites, {})
    return {
        **info,
        "ca_cert": str(ca_cert),
        "ca_key": str(ca_key),
        "server_cert": str(cert),
    }


def _coordinator(directory: Path) -> tuple[dict, TLSFiles]:
    directory = Path(directory).resolve()
    info = _read_json(
        directory / "deployment.json", "--dir (run coordinator-init first)"
    )
    files = TLSFiles(
        directory / "ca" / "ca.crt",
        directory / "superlink" / "server.pem",
        directory / "superlink" / "server.key",
    )
    return info, files


def coordinator_superlink(
    directory: Path, *, listen: str = "0.0.0.0"
) -> tuple[list[str], dict[str, str]]:
    """``flower-superlink`` for the coordinator: HTTPS with the server
    certificate, SuperNode authentication, no run-time installation, its state
    (registered keys, runs) in ``superlink/state.db`` so that a restart keeps the
    registrations. Returns the command and its environment."""
    info, files = _coordinator(directory)
    for p in files:
        if not p.is_file():
            raise DeployError(f"--dir: {p} is missing (run coordinator-init)")
    link = Path(directory).resolve() / "superlink"
    cmd = superlink_command(listen, int(info["port"]), files, node_auth=True)
    cmd += ["--database", str(link / "state.db")]
    return cmd, {**child_env(), "FLWR_HOME": str(link / "flwr_home")}


def _flwr_env(directory: Path) -> dict[str, str]:
    return {**child_env(), "FLWR_HOME": str(Path(directory).resolve() / "cli")}


def register(
    directory: Path, site: str, public_key: Path, *, timeout: float = 120.0
) -> dict:
    """Register a hospital's SuperNode public key with the running SuperLink and
    give the hospital the next site index; returns its ``sites.json`` entry."""
    directory = Path(directory).resolve()
    _coordinator(directory)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", site):
        raise DeployError(
            f"--site: expected a name of letters, digits, '_', '.', "
            f"'-' (at most 64), got {site!r}"
        )
    fingerprint = public_key_fingerprint(public_key)
    sites_path = directory / "sites.json"
    sites = _read_json(sites_path, "--dir")
    if site in sites:
        raise DeployError(
            f"--site: {site!r} is already registered (index {sites[site]['index']})"
        )
    for other, entry in sites.items():
        if entry["fingerprint"] == fingerprint:
            raise DeployError(
                f"--public-key: this key is already registered for {other!r}"
            )
    done = subprocess.run(
        ["flwr", "supernode", "register", str(public_key), CONNECTION],
        env=_flwr_env(directory),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise DeployError(
            f"flwr supernode register failed (exit {done.returncode}):"
            f" {(done.stdout + done.stderr).strip()[-400:]}"
        )
    entry = {"index": len(sites), "fingerprint": fingerprint}
    sites[site] = entry
    _write_json(sites_path, sites)
    return entry


def run_settings_for(directory: Path, name: str, settings: RunSettings) -> RunSettings:
    """``settings`` with the coordinator's sites (``num-sites``) and the run's
    result and checkpoint under ``runs/<name>/``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", name):
        raise DeployError(
            f"--run: expected a name of letters, digits, '_', '.', '-', got {name!r}"
        )
    directory = Path(directory).resolve()
    sites = _read_json(directory / "sites.json", "--dir")
    if not sites:
        raise DeployError("--dir: no hospital is registered (run register first)")
    run_dir = directory / "runs" / name
    return settings._replace(
        num_sites=len(sites),
        out=str(run_dir / "result.json"),
        checkpoint_dir=str(run_dir / "checkpoint"),
    )


def submit(
    directory: Path,
    name: str,
    settings: RunSettings,
    *,
    resume: bool = False,
    timeout: float = 3600.0,
) -> dict:
    """Submit the run (``flwr run`` of the app in this package) to the SuperLink
    and wait for its result; returns the result JSON.

    The ServerApp runs where the SuperLink runs and writes
    ``runs/<name>/result.json`` and the checkpoint there: run ``submit`` on the
    SuperLink's machine. ``flwr run``'s log stream is kept in
    ``runs/<name>/flwr_run.log``.
    """
    from phems_clinical.federation.engine import checkpoint_path
    from phems_clinical.federation.flower.launch import toml_value

    directory = Path(directory).resolve()
    _coordinator(directory)
    settings = run_settings_for(directory, name, settings)
    run_dir = Path(settings.out).parent
    if checkpoint_path(settings.checkpoint_dir).exists() and not resume:
        raise DeployError(
            f"--run: {run_dir} holds a checkpoint; pass --resume "
            "(with the same --job) or choose a new run name"
        )
    if resume and not settings.job:
        raise DeployError("--resume: needs the --job name of the interrupted run")
    run_dir.mkdir(parents=True, exist_ok=True)
    result = Path(settings.out)
    result.unlink(missing_ok=True)
    config = run_dir / "run_config.toml"
    config.write_text(
        "".join(f"{k} = {toml_value(v)}\n" for k, v in to_run_config(settings).items())
    )
    log = run_dir / "flwr_run.log"
    t0 = time.monotonic()
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [
                "flwr",
                "run",
                str(APP_DIR),
                CONNECTION,
                "--stream",
                "--run-config",
                str(config),
            ],
            env=_flwr_env(directory),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=30)
            raise TimeoutError(
                f"flwr run did not end within {timeout:g} s; see {log}"
            ) from None
    if proc.returncode != 0:
        raise RuntimeError(f"flwr run exited with code {proc.returncode}; see {log}")
    grace = time.monotonic() + 60.0  # the stream can end before the file is written
    while time.monotonic() < grace:
        with_status = _status(result)
        if with_status not in (None, "running"):
            break
        time.sleep(0.5)
    if _status(result) in (None, "running"):
        raise RuntimeError(
            f"no finished result in {result} after the run's log "
            f"stream ended; see {log}"
        )
    out = json.loads(result.read_text())
    out["submit_s"] = time.monotonic() - t0
    return out


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ hospital


def site_init(
    directory: Path, site_dir: Path, ca: Path, *, policy: Path | None = None
) -> dict:
    """A hospital's folder: the consortium CA certificate (copied), the
    SuperNode's key pair and the audit/ledger MAC key in ``keys/`` (mode 0600,
    outside the site folder), ``site.json`` naming the site folder.

    The site folder must hold ``cohort.csv``; ``policy`` (checked against
    ``data_schemas/site_policy.schema.json``) is copied into it as
    ``site_policy.yaml``. Returns the public key's path and fingerprint, to send
    to the coordinator.
    """
    from phems_clinical.federation import governance as gov

    directory = Path(directory).resolve()
    site_dir = Path(site_dir).resolve()
    keys = directory / "keys"
    if not (site_dir / DATA_FILE).is_file():
        raise DeployError(f"--site-dir: {site_dir} holds no {DATA_FILE}")
    if keys == site_dir or site_dir in keys.parents or keys in site_dir.parents:
        raise DeployError(
            f"--dir: the keys folder {keys} must lie outside the site "
            f"folder {site_dir} (a copy of the site folder must not "
            "carry the keys)"
        )
    if (keys / NODE_KEY).exists():
        raise DeployError(
            f"--dir: {directory} already holds a SuperNode key; "
            "choose a new folder (the registered key stays valid)"
        )
    _check_ca(ca, "--ca")
    if policy is not None:
        try:
            gov.load_policy(Path(policy))
        except FileNotFoundError:
            raise DeployError(f"--policy: {policy} does not exist") from None
        target = site_dir / POLICY_FILE
        if target.exists() and target.read_bytes() != Path(policy).read_bytes():
            raise DeployError(
                f"--policy: {target} exists and differs; remove it "
                "first to replace the site's policy"
            )
        shutil.copyfile(policy, target)
    directory.mkdir(parents=True, exist_ok=True)
    keys.mkdir(mode=0o700, exist_ok=True)
    keys.chmod(0o700)
    shutil.copyfile(ca, directory / "ca.crt")
    _, public = make_node_key(keys, NODE_KEY)
    mac = keys / SITE_MAC_KEY
    if not mac.exists():
        gov.create_site_key(mac)
    _write_json(directory / "site.json", {"site_dir": str(site_dir)})
    return {
        "public_key": str(public),
        "fingerprint": public_key_fingerprint(public),
        "site_dir": str(site_dir),
        "policy": (site_dir / POLICY_FILE).is_file(),
    }


def site_supernode(
    directory: Path,
    superlink: str,
    site_index: int,
    num_sites: int,
    *,
    port: int = SUPERNODE_PORT,
    secagg_required: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """``flower-supernode`` for a hospital: it connects out to ``superlink``
    (verified against ``ca.crt``), authenticates with ``keys/supernode`` and
    reads only its site folder; its own Runtime API stays on 127.0.0.1:``port``.
    Returns the command and its environment."""
    directory = Path(directory).resolve()
    split_address(superlink, "--superlink")
    info = _read_json(directory / "site.json", "--dir (run site-init first)")
    if not 0 <= site_index < num_sites:
        raise DeployError(
            f"--site-index: expected 0..{num_sites - 1} (the index "
            f"the coordinator gave at registration), got {site_index}"
        )
    if not 0 < port < 65536:
        raise DeployError(f"--port: expected 1..65535, got {port}")
    key = directory / "keys" / NODE_KEY
    if not key.is_file():
        raise DeployError(f"--dir: {key} is missing (run site-init)")
    config = {
        "site-dir": info["site_dir"],
        "site-index": int(site_index),
        "num-sites": int(num_sites),
        "site-key": str(directory / "keys" / SITE_MAC_KEY),
        **({"secagg-required": True} if secagg_required else {}),
    }
    cmd = supernode_command(
        superlink, "127.0.0.1", port, config, _ca_only(directory / "ca.crt"), key
    )
    return cmd, {**child_env(), "FLWR_HOME": str(directory / "flwr_home")}


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m phems_clinical.federation.flower.deploy",
        description="A Flower deployment across machines: the coordinator's "
        "SuperLink and one SuperNode per hospital.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "coordinator-init",
        help="coordinator: consortium CA, the "
        "SuperLink's certificate and the flwr connection",
    )
    c.add_argument("--dir", type=Path, required=True, help="coordinator folder")
    c.add_argument(
        "--address",
        required=True,
        help="HOST:PORT the hospitals reach "
        "the SuperLink at (HOST goes into the certificate)",
    )
    c.add_argument("--name", default="phems consortium", help="consortium name")
    c.add_argument("--days", type=float, default=365.0, help="validity (days)")
    c.add_argument(
        "--reissue",
        action="store_true",
        help="keep the CA; issue a new server certificate",
    )

    s = sub.add_parser("superlink", help="coordinator: run flower-superlink")
    s.add_argument("--dir", type=Path, required=True, help="coordinator folder")
    s.add_argument(
        "--listen", default="0.0.0.0", help="address to listen on (default 0.0.0.0)"
    )
    s.add_argument("--dry-run", action="store_true", help="print the command")

    r = sub.add_parser(
        "register",
        help="coordinator: register a hospital's "
        "public key (the SuperLink must be running)",
    )
    r.add_argument("--dir", type=Path, required=True, help="coordinator folder")
    r.add_argument("--site", required=True, help="the hospital's name")
    r.add_argument(
        "--public-key", type=Path, required=True, help="the hospital's supernode.pub"
    )

    u = sub.add_parser("submit", help="coordinator: run the federated fit")
    u.add_argument("--dir", type=Path, required=True, help="coordinator folder")
    u.add_argument("--run", required=True, help="run name (runs/<name>/)")
    u.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="most rounds (0: the algorithm's own limit)",
    )
    u.add_argument("--seed", type=int, default=0, help="run seed")
    u.add_argument(
        "--algorithm",
        default="fed_focei",
        help="fed_focei, fedavg, fedprox, fedadam, fedyogi, ep or consensus_mc",
    )
    u.add_argument("--options", default="", help="algorithm options as JSON")
    u.add_argument("--product", default="advate", help="library model")
    u.add_argument(
        "--min-sites",
        type=int,
        default=0,
        help="fewest sites a round may complete with (0: all)",
    )
    u.add_argument("--round-timeout", type=float, default=300.0, help="seconds")
    u.add_argument(
        "--request",
        type=Path,
        default=None,
        metavar="FILE",
        help="the data user's signed request (phems governance "
        "sign-request), checked by sites that hold a policy",
    )
    u.add_argument("--requester", default="", help="data user id (as signed)")
    u.add_argument("--experiment", default="", help="experiment (as signed)")
    u.add_argument("--job", default="", help="job name (needed to resume)")
    u.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's checkpoint (same --job)",
    )
    u.add_argument("--secagg", action="store_true", help="secure aggregation")
    u.add_argument("--timeout", type=float, default=3600.0, help="seconds")

    i = sub.add_parser("site-init", help="hospital: node key, MAC key, CA copy")
    i.add_argument(
        "--dir",
        type=Path,
        required=True,
        help="the hospital's deployment folder (keys live here)",
    )
    i.add_argument(
        "--site-dir",
        type=Path,
        required=True,
        help="the site folder holding cohort.csv",
    )
    i.add_argument(
        "--ca",
        type=Path,
        required=True,
        help="the consortium CA certificate (ca.crt) from the coordinator",
    )
    i.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="the site's policy YAML (copied into the site folder)",
    )

    n = sub.add_parser("supernode", help="hospital: run flower-supernode")
    n.add_argument(
        "--dir", type=Path, required=True, help="the hospital's deployment folder"
    )
    n.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    n.add_argument(
        "--site-index",
        type=int,
        required=True,
        help="index given by the coordinator at registration",
    )
    n.add_argument(
        "--num-sites",
        type=int,
        required=True,
        help="number of hospitals in the consortium",
    )
    n.add_argument(
        "--port",
        type=int,
        default=SUPERNODE_PORT,
        help="the node's own Runtime API port on 127.0.0.1",
    )
    n.add_argument(
        "--secagg-required",
        action="store_true",
        help="refuse to send a payload without secure aggregation",
    )
    n.add_argument("--dry-run", action="store_true", help="print the command")
    return p


def _settings(args: argparse.Namespace) -> RunSettings:
    request = ""
    if args.request is not None:
        try:
            request = args.request.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise DeployError(
                f"--request: cannot read the signed request file ({type(err).__name__})"
            ) from None
    if args.rounds < 0:
        raise DeployError(f"--rounds: expected >= 0, got {args.rounds}")
    if args.options:
        try:
            if not isinstance(json.loads(args.options), dict):
                raise ValueError
        except ValueError:
            raise DeployError("--options: expected a JSON object") from None
    return RunSettings(
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
        requester=args.requester,
        experiment=args.experiment,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    args = _parser().parse_args(argv)
    prog = f"deploy {args.command}"
    try:
        if args.command == "coordinator-init":
            info = coordinator_init(
                args.dir,
                args.address,
                name=args.name,
                days=args.days,
                reissue=args.reissue,
            )
            print(json.dumps(info, indent=1))
            print(
                f"distribute {info['ca_cert']} to every hospital; keep "
                f"{info['ca_key']} offline (needed only for --reissue)"
            )
        elif args.command == "superlink":
            cmd, env = coordinator_superlink(args.dir, listen=args.listen)
            return _exec_or_print(cmd, env, args.dry_run)
        elif args.command == "register":
            entry = register(args.dir, args.site, args.public_key)
            n = len(_read_json(Path(args.dir).resolve() / "sites.json", "--dir"))
            print(json.dumps({"site": args.site, **entry, "num_sites": n}, indent=1))
        elif args.command == "submit":
            from phems_clinical.federation.flower.config import run_settings

            settings = _settings(args)
            run_settings(to_run_config(settings))  # checks the keys and ranges
            result = submit(
                args.dir, args.run, settings, resume=args.resume, timeout=args.timeout
            )
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
                            "submit_s",
                        )
                        if k in result
                    },
                    indent=1,
                )
            )
            if result.get("status") != "completed":
                print(
                    f"{prog}: error: run {result.get('status')}: {result.get('error')}",
                    file=sys.stderr,
                )
                return 1
        elif args.command == "site-init":
            info = site_init(args.dir, args.site_dir, args.ca, policy=args.policy)
            print(json.dumps(info, indent=1))
            print(
                f"send {info['public_key']} to the coordinator (and confirm the "
                f"fingerprint by phone); the private key stays in "
                f"{Path(args.dir).resolve() / 'keys'}"
            )
        elif args.command == "supernode":
            cmd, env = site_supernode(
                args.dir,
                args.superlink,
                args.site_index,
                args.num_sites,
                port=args.port,
                secagg_required=args.secagg_required,
            )
            return _exec_or_print(cmd, env, args.dry_run)
    except (DeployError, RuntimeError, TimeoutError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, DeployError) else 1
    return 0


__all__ = [
    "CONNECTION",
    "DeployError",
    "NODE_KEY",
    "SITE_MAC_KEY",
    "SUPERLINK_PORT",
    "SUPERNODE_PORT",
    "coordinator_init",
    "coordinator_superlink",
    "public_key_fingerprint",
    "register",
    "run_settings_for",
    "site_init",
    "site_supernode",
    "split_address",
    "submit",
]


if __name__ == "__main__":
    sys.exit(main())
