"""Run bad-input cases against the commands and the web API; classify each outcome.

Each ``cases_*.py`` beside this file defines ``CASES``, a list of :class:`Case`.
A case writes its input files into a fresh temporary folder and returns either
the ``phems`` arguments (``argv``) or an HTTP request for the dosing web API
(``http``). The outcome is put in one of the columns of the review's table:

``clean error``
    exit status 2 (web: 4xx with a JSON error or a plain message) and the message
    matches ``names`` (the row, field or option at fault);
``reported``
    the command succeeded and reported the problem as a warning or an excluded
    record matching ``names`` (right where ``expect`` is ``warning`` or
    ``exclusion``);
``unhelpful error``
    a refusal whose message does not name the fault, or the wrong exit status;
``traceback``
    an exception escaped (web: a 500);
``silently accepted``
    success with nothing said.

Commands run in process (``phems_clinical.app.cli.main``) unless the case asks for
a subprocess (``phems run``, whose Hydra app exits the interpreter).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
COLUMNS = (
    "clean error",
    "reported",
    "unhelpful error",
    "traceback",
    "silently accepted",
)


class Case(NamedTuple):
    """One bad input.

    command : the table row, e.g. ``"phems fit"`` or ``"web /api/dose"``.
    name : what is wrong, in a few words.
    names : regular expression the message must match (the field at fault).
    argv : ``tmp -> phems arguments`` (CLI cases).
    http : ``tmp -> dict(method=, url=, headers=, content=)`` (web cases).
    expect : ``"error"`` (default), ``"warning"`` or ``"exclusion"``.
    subprocess : run ``python -m phems_clinical`` instead of in process.
    """

    command: str
    name: str
    names: str
    argv: Callable[[Path], list[str]] | None = None
    http: Callable[[Path], dict[str, Any]] | None = None
    expect: str = "error"
    subprocess: bool = False


class Outcome(NamedTuple):
    case: Case
    column: str
    status: int
    message: str


def _run_cli(case: Case, tmp: Path) -> tuple[int, str, bool]:
    argv = case.argv(tmp)
    if case.subprocess:
        p = subprocess.run(
            [sys.executable, "-m", "phems_clinical", *argv],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        text = p.stdout + p.stderr
        return p.returncode, text, "Traceback (most recent call last)" in text
    from phems_clinical.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    crashed = False
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        contextlib.chdir(tmp),
    ):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is the finding
            traceback.print_exc(file=err)
            rc, crashed = 1, True
    return int(rc), out.getvalue() + err.getvalue(), crashed


def _run_http(case: Case, tmp: Path, client) -> tuple[int, str, bool]:
    req = case.http(tmp)
    r = client.request(
        req.get("method", "POST"),
        req["url"],
        headers=req.get("headers"),
        content=req.get("content"),
    )
    return r.status_code, r.text, r.status_code >= 500


def classify(case: Case, status: int, text: str, crashed: bool) -> str:
    named = re.search(case.names, text) is not None
    if crashed:
        return "traceback"
    ok = status == 0 if case.argv else status < 300
    if ok:
        if case.expect in ("warning", "exclusion") and named:
            return "reported"
        return "silently accepted"
    refused = status == 2 if case.argv else 400 <= status < 500
    return "clean error" if refused and named else "unhelpful error"


def load_cases() -> list[Case]:
    sys.path.insert(0, str(HERE))
    cases: list[Case] = []
    for f in sorted(HERE.glob("cases_*.py")):
        cases.extend(importlib.import_module(f.stem).CASES)
    return cases


def run_cases(cases: list[Case]) -> list[Outcome]:
    from fastapi.testclient import TestClient

    from phems_clinical.app.web import create_app

    client = None
    outcomes = []
    for case in cases:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            if case.http is not None:
                client = client or TestClient(
                    create_app(), raise_server_exceptions=False
                )
                status, text, crashed = _run_http(case, tmp, client)
            else:
                status, text, crashed = _run_cli(case, tmp)
        column = classify(case, status, text, crashed)
        outcomes.append(Outcome(case, column, status, text.strip()[-400:]))
        print(f"{column:<18} {case.command:<18} {case.name}", file=sys.stderr)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    """The review-style summary: one row per command, one column per outcome."""
    commands = list(dict.fromkeys(o.case.command for o in outcomes))
    lines = [
        "| command | cases | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for c in commands:
        n = Counter(o.column for o in outcomes if o.case.command == c)
        lines.append(
            f"| `{c}` | {sum(n.values())} | "
            + " | ".join(str(n[k]) for k in COLUMNS)
            + " |"
        )
    return "\n".join(lines)


def details(outcomes: list[Outcome]) -> str:
    lines = [
        "| command | case | outcome | status | message (last line) |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        last = (o.message.splitlines() or [""])[-1].replace("|", "\\|")[:160]
        lines.append(
            f"| `{o.case.command}` | {o.case.name} | {o.column} | {o.status} | {last} |"
        )
    return "\n".join(lines)
