"""``phems audit``: check or list a site's audit log of outgoing messages.

Subcommands::

    phems audit verify LOG --key KEY [--anchor SEQ:MAC]   check the MAC chain
    phems audit show LOG                     one line per entry (not verified)

``verify`` checks every entry's HMAC-SHA256 under the site key (a log edited and
re-chained without the key, or an unkeyed log, fails) and, with ``--anchor`` (the
head ``SEQ:MAC`` the coordinator received with a site's message), that no entry
was cut from the end. It prints ``OK: N entries, head SEQ:MAC`` and exits 0, or
prints the first bad entry and why and exits 1. Bad input (no such file, a line
that is not JSON, a bad key or anchor) prints one message and exits with status 2,
as the other ``phems`` commands do. Wiring, in :func:`phems_clinical.app.cli.
build_parser`: ``add_audit_parser(sub)``.
"""

from __future__ import annotations

import argparse
import re
import sys

from phems_clinical.federation.governance import load_site_key, read_log, verify_log

__all__ = ["add_audit_parser"]

_ANCHOR = re.compile(r"(\d+:)?[0-9a-fA-F]{64}")


def _error(args: argparse.Namespace, message: str) -> int:
    print(f"phems audit {args.audit_command}: error: {message}", file=sys.stderr)
    return 2


def _read_error(args: argparse.Namespace, err: Exception) -> int:
    if isinstance(err, FileNotFoundError):
        return _error(args, f"no such audit log: {args.log}")
    if isinstance(err, OSError):
        return _error(args, f"cannot read {args.log}: {err.strerror or err}")
    return _error(args, f"{args.log}: {err}")


def _describe(entry: dict) -> str:
    keys = ("seq", "time", "event", "requester", "experiment", "round", "recipient")
    parts = [f"{k} {entry[k]}" for k in keys if k in entry]
    if isinstance(entry.get("summary"), dict):
        parts.append("fields " + ",".join(entry["summary"]))
    return ", ".join(parts) or "(no audit fields)"


def _verify(args: argparse.Namespace) -> int:
    if args.anchor is not None and not _ANCHOR.fullmatch(args.anchor):
        return _error(
            args,
            f"--anchor: expected SEQ:MAC or MAC (64 hex digits), got {args.anchor!r}",
        )
    try:
        key = load_site_key(args.key)
    except FileNotFoundError:
        return _error(args, f"--key: no such key file: {args.key}")
    except (OSError, ValueError) as err:
        return _error(args, f"--key: {err}")
    try:
        res = verify_log(args.log, key=key, anchor=args.anchor)
    except (OSError, ValueError) as err:
        return _read_error(args, err)
    if res.ok:
        print(f"OK: {res.n_entries} entries, head {res.n_entries}:{res.last_mac}")
        return 0
    print(f"FAILED: {args.log}: {res.reason}")
    if res.first_bad_seq <= res.n_entries:
        print(
            f"line {res.first_bad_seq}: "
            f"{_describe(read_log(args.log)[res.first_bad_seq - 1])}"
        )
    if res.first_bad_seq > 1:
        print(f"the chain is intact up to entry {res.first_bad_seq - 1}")
    return 1


def _show(args: argparse.Namespace) -> int:
    try:
        entries = read_log(args.log)
    except (OSError, ValueError) as err:
        return _read_error(args, err)
    heads = (
        "seq",
        "time",
        "event",
        "requester",
        "experiment",
        "round",
        "recipient",
        "fields",
    )
    rows = [heads] + [
        (
            str(e.get("seq", "?")),
            str(e.get("time", "?")),
            str(e.get("event", "?")),
            str(e.get("requester", "?")),
            str(e.get("experiment", "?")),
            str(e.get("round", "?")),
            str(e.get("recipient", "?")),
            ",".join(e["summary"]) if isinstance(e.get("summary"), dict) else "?",
        )
        for e in entries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads) - 1)]
    for r in rows:
        print(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False))
            + "  "
            + r[-1]
        )
    print(
        f"({len(entries)} entries, not verified: run 'phems audit verify "
        f"{args.log} --key KEYFILE')"
    )
    return 0


def add_audit_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``audit verify`` and ``audit show`` on the ``phems`` subparsers.

    Each sets ``func`` to a handler ``(args) -> exit status``.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="phems")
    >>> _ = add_audit_parser(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["audit", "verify", "site.log", "--key", "k",
    ...                           "--anchor", "ab"])
    >>> args.audit_command, args.log, args.key, args.func.__name__
    ('verify', 'site.log', 'k', '_verify')
    """
    a = subparsers.add_parser(
        "audit", help="check or list a site's audit log of outgoing messages"
    )
    sub = a.add_subparsers(dest="audit_command", required=True)
    v = sub.add_parser("verify", help="check the log's MAC chain (exit 1 if broken)")
    v.add_argument("log", help="audit log (JSON lines)")
    v.add_argument(
        "--key",
        required=True,
        metavar="KEYFILE",
        help="the site's MAC key file (kept outside the log's folder)",
    )
    v.add_argument(
        "--anchor",
        default=None,
        metavar="HEAD",
        help="a head SEQ:MAC held outside the site (the coordinator "
        "receives one with every message); detects entries cut "
        "from the end",
    )
    v.set_defaults(func=_verify)
    s = sub.add_parser(
        "show",
        help="one line per entry: seq, time, event, "
        "requester, experiment, round, recipient, "
        "fields",
    )
    s.add_argument("log", help="audit log (JSON lines)")
    s.set_defaults(func=_show)
    return a
