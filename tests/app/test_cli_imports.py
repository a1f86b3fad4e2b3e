"""The command line starts without the heavy libraries: parsing imports no JAX,
NumPyro, pandas, matplotlib, SciPy or Flower; each subcommand imports what it
needs (checked in a fresh interpreter, where ``sys.modules`` starts empty)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phems_clinical.app.cli import _LAZY_PARSERS, build_parser

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("jax", "numpyro", "pandas", "matplotlib", "scipy", "flwr")

_PROBE = """
import json, sys
from phems_clinical.app.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy})))
"""


def _loaded(*argv: str) -> list[str]:
    """Heavy modules in ``sys.modules`` after ``phems ARGV`` in a new process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=set(HEAVY)), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ("--help",),
        ("dose", "--help"),
        ("serve", "--help"),
        ("patients", "--help"),
        ("fit", "--help"),
        ("sepsis", "--help"),
    ],
)
def test_help_imports_no_heavy_library(argv):
    loaded = _loaded(*argv)
    if argv[0] == "sepsis":  # its module is imported to build its options
        assert any(m.startswith("jax") for m in loaded)  # the probe can see them
    else:
        assert loaded == []


def test_parse_error_imports_no_heavy_library():
    assert _loaded("dose") == []  # missing arguments: usage error from argparse


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {c.dest: c.help for c in sub._choices_actions}


def test_stub_help_texts_are_the_modules():
    """The help-only stubs say exactly what the modules' parsers say, in the
    same order."""
    full = _subcommands(build_parser())
    lazy = _subcommands(build_parser(["dose", "x.json", "--out", "o"]))
    assert list(full) == list(lazy)
    assert full == lazy
    stubs = {name for _, _, helps in _LAZY_PARSERS for name in helps}
    assert stubs <= set(full)


@pytest.mark.parametrize(
    "argv, dest",
    [
        (["audit", "show", "log.jsonl"], "log"),
        (["governance", "keygen", "--out", "k"], "out"),
        (["omop", "check", "site.duckdb"], "db"),
        (["sepsis", "--omop", "d", "--out", "o"], "omop"),
        (["cardiac", "--omop", "d", "--out", "o"], "omop"),
        (["anonymise", "--use-case", "picu", "--omop", "d", "--out", "o"], "use_case"),
    ],
)
def test_lazy_commands_parse_with_their_real_options(argv, dest):
    args = build_parser(argv).parse_args(argv)
    assert hasattr(args, dest) and callable(args.func)


def test_stub_is_not_used_for_the_command_run():
    """A command's own options are known when it is the one run (a stub would
    refuse them)."""
    argv = ["cardiac", "--omop", "d", "--out", "o", "--rounds", "3"]
    assert build_parser(argv).parse_args(argv).rounds == 3
