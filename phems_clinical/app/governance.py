"""``phems governance``: keys and signed requests for site governance.

Subcommands::

    phems governance keygen --out KEY          a data user's Ed25519 key pair
    phems governance sign-request --key KEY --requester ID --experiment NAME
        --algorithm ALG --rounds N [--valid-hours 24] [--out FILE]
    phems governance site-key PATH             a site's audit/ledger MAC key

``keygen`` writes the private key (hex, mode 0600) and prints the public key to
list as ``public_key`` in each site's policy. ``sign-request`` prints (or writes)
the signed request a run carries (``phems federate --request FILE``, the Flower run
config's ``request``). ``site-key`` creates a site's HMAC key (from ``secrets``,
mode 0600); keep it outside the folder of the site's audit log. Bad input prints
one message naming the option and exits with status 2; nothing is overwritten
(``sign-request --out`` replaces an existing file only with ``--overwrite``, and
atomically). Wiring, in
:func:`phems_clinical.app.cli.build_parser`: ``add_governance_parser(sub)``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from phems_clinical.app.cli import count_arg
from phems_clinical.federation.governance import (
    create_site_key,
    generate_user_key,
    sign_request,
)
from phems_clinical.keyfiles import create_secret_file
from phems_clinical.outputs import write_atomic

__all__ = ["add_governance_parser", "load_user_key"]

#: Longest validity of a signed request, hours (a leap year; ours).
MAX_VALID_HOURS = 8784.0


def _error(args: argparse.Namespace, message: str) -> int:
    print(
        f"phems governance {args.governance_command}: error: {message}", file=sys.stderr
    )
    return 2


def load_user_key(path: str | os.PathLike) -> bytes:
    """A data user's Ed25519 private key (raw 32 bytes) from a ``keygen`` file."""
    try:
        key = bytes.fromhex(Path(path).read_text(encoding="ascii").strip())
    except ValueError:  # not hex, or not ASCII text
        key = b""
    if len(key) != 32:
        raise ValueError(
            "--key: expected 64 hex digits (a file made by 'phems governance keygen')"
        )
    return key


def _keygen(args: argparse.Namespace) -> int:
    private, public = generate_user_key()
    try:
        create_secret_file(Path(args.out), (private.hex() + "\n").encode("ascii"))
    except FileExistsError:
        return _error(args, f"--out: {args.out} exists (a key is never overwritten)")
    print(f"private key written to {args.out} (mode 600: keep it secret)")
    print(f"public_key: {public.hex()}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    try:
        key = load_user_key(args.key)
    except FileNotFoundError:
        return _error(args, f"--key: no such file {args.key}")
    except ValueError as err:
        return _error(args, str(err))
    if args.out and Path(args.out).is_dir():
        return _error(args, f"--out: {args.out} is a folder; expected a file name")
    if args.out and Path(args.out).exists() and not args.overwrite:
        return _error(
            args,
            f"--out: {args.out} exists; choose a new file or pass "
            f"--overwrite to replace it",
        )
    token = sign_request(
        key,
        requester=args.requester,
        experiment=args.experiment,
        algorithm=args.algorithm,
        rounds=args.rounds,
        valid_for=dt.timedelta(hours=args.valid_hours),
    )
    if args.out:
        write_atomic(args.out, (token + "\n").encode("ascii"))
        print(f"signed request written to {args.out}")
    else:
        print(token)
    return 0


def _site_key(args: argparse.Namespace) -> int:
    try:
        create_site_key(args.path)
    except FileExistsError:
        return _error(args, f"{args.path} exists (a key is never overwritten)")
    print(
        f"site key written to {args.path} (mode 600); keep it outside the folder "
        "of the audit log"
    )
    return 0


def _hours(text: str) -> float:
    """argparse type of ``--valid-hours``: a number in (0, MAX_VALID_HOURS]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of hours, got {text!r}"
        ) from None
    if not 0 < value <= MAX_VALID_HOURS:  # also refuses NaN
        raise argparse.ArgumentTypeError(
            f"expected hours in (0, {MAX_VALID_HOURS:g}], got {text}"
        )
    return value


def add_governance_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``governance keygen``, ``sign-request`` and ``site-key``.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="phems")
    >>> _ = add_governance_parser(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["governance", "keygen", "--out", "me.key"])
    >>> args.governance_command, args.func.__name__
    ('keygen', '_keygen')
    """
    g = subparsers.add_parser(
        "governance", help="data users' keys and signed requests; sites' audit MAC keys"
    )
    sub = g.add_subparsers(dest="governance_command", required=True)
    k = sub.add_parser("keygen", help="make a data user's Ed25519 key pair")
    k.add_argument("--out", required=True, help="private key file to create")
    k.set_defaults(func=_keygen)
    s = sub.add_parser("sign-request", help="sign a run request for the sites")
    s.add_argument("--key", required=True, help="private key file (keygen)")
    s.add_argument("--requester", required=True, help="data user id (site policy)")
    s.add_argument("--experiment", required=True, help="experiment name")
    s.add_argument("--algorithm", required=True, help="algorithm name")
    s.add_argument(
        "--rounds", required=True, type=count_arg(1), help="most rounds allowed"
    )
    s.add_argument(
        "--valid-hours",
        type=_hours,
        default=24.0,
        help="hours until the request expires (default 24, at most "
        f"{MAX_VALID_HOURS:g})",
    )
    s.add_argument("--out", default=None, help="file to write (default: print)")
    s.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file"
    )
    s.set_defaults(func=_sign)
    m = sub.add_parser("site-key", help="create a site's audit/ledger MAC key")
    m.add_argument("path", help="key file to create (outside the audit log's folder)")
    m.set_defaults(func=_site_key)
    return g
