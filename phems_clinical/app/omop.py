"""``phems omop simulate|check``: hospitals as OMOP CDM 5.4 databases.

Each simulated hospital is written to its own DuckDB file ``OUT/<site>.duckdb`` (the
embedded default of the data layer, :mod:`phems_clinical.data.omop`); the
simulator's ground truth, which no real database has, goes beside it as
``OUT/<site>.truth.csv`` for validation only. ``check`` reads a site's database
with the loaders' validation and prints what would be excluded and why.

The use-case commands read the same files: ``phems sepsis``/``phems cardiac`` take
the folder, and ``phems fit``/``phems federate --data`` accept a ``.duckdb`` file, a
``postgresql://`` URL (credentials from libpq: ``PGPASSWORD``, ``~/.pgpass``), or
``env:NAME`` (a URL held in environment variable NAME) or a folder of ``.duckdb``
files for the haemophilia cohorts. A URL with a password on the command line is
refused: every user of the machine could read it in the process list.

Databases are read without changing them (DuckDB read-only with external access
off, PostgreSQL read-only sessions); ``simulate`` writes a new folder as a whole
(``--overwrite`` to replace one) and never deletes an existing database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from phems_clinical import outputs, usecases
from phems_clinical.data.omop import LoadReport
from phems_clinical.data.split import holdout_split, split_ids
from phems_clinical.usecases.omop_sites import (
    PK_TABLES,
    is_database,
    load_site,
    model_factor,
    pk_events_from_omop,
    report_json,
    site_databases,
    write_site,
)

USE_CASES = usecases.names()


def simulate_omop(
    use_case: str,
    out: str | Path,
    *,
    seed: int = 0,
    n: int | None = None,
    product: str = "advate",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Simulate the use case's default hospitals and write each to
    ``out/<site>.duckdb``; returns rows per table per site.

    ``n`` is the number of stays (picu), episodes (cardiac) or patients
    (haemophilia) per site; default: each simulator's own site sizes. A non-empty
    ``out`` is refused before anything is simulated unless ``overwrite``; the
    folder is written under a temporary name and renamed into place at the end
    (:func:`phems_clinical.outputs.staged_dir`), so a failure leaves the old one.
    """
    if use_case not in USE_CASES:
        raise ValueError(
            f"--use-case: {use_case!r} is not one of {', '.join(USE_CASES)}"
        )
    if n is not None and n < 3:
        raise ValueError(f"--n: {n} per site is too few (at least 3)")
    outputs.check_out(out, overwrite=overwrite)
    summary = {}
    with outputs.staged_dir(out, overwrite=overwrite) as tmp:
        for site, (tables, truth) in (
            usecases.get(use_case)
            .simulate_default(jax.random.key(seed), n, product)
            .items()
        ):
            summary[site] = write_site(tmp / f"{site}.duckdb", tables)
            if truth is not None:
                truth.to_csv(tmp / f"{site}.truth.csv", index=False)
    return summary


def check_omop(target: str | Path) -> dict[str, LoadReport]:
    """Each site's load report (nothing is changed in the databases)."""
    return {site: load_site(db)[1] for site, db in site_databases(target).items()}


def round_printer(tag: str, n_sites: int, every: int = 10):
    """An ``on_round`` callback printing progress every ``every`` rounds."""

    def on_round(rec, server):
        del server
        if (rec.round + 1) % every == 0 or rec.round == 0:
            print(
                f"[phems {tag}] round {rec.round + 1}: sites "
                f"{len(rec.participants)}/{n_sites}"
                + (f", dropped {list(rec.dropped)}" if rec.dropped else "")
                + f", {rec.seconds:.2f} s",
                flush=True,
            )

    return on_round


def is_omop(data: str | Path) -> bool:
    """Whether ``--data`` names OMOP databases rather than a CSV."""
    return is_database(data) or Path(str(data)).is_dir()


# ------------------------------------------------------------------ command line


def _simulate_cmd(args) -> int:
    import json

    summary = simulate_omop(
        args.use_case,
        args.out,
        seed=args.seed,
        n=args.n,
        product=args.product,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2))
    print(
        f"wrote {len(summary)} OMOP database(s) to {args.out}/<site>.duckdb "
        "(+ <site>.truth.csv: the simulator's ground truth, for validation only)"
    )
    return 0


def _check_cmd(args) -> int:
    if args.out:
        outputs.check_out(args.out, overwrite=args.overwrite)
    from phems_clinical.data.omop import USE_CASE_TABLES

    reports = check_omop(args.db)
    for site, report in reports.items():
        print(f"[{site}] {report.summary()}")
        absent = [
            t for t in USE_CASE_TABLES if t not in report.n_input and t != "concept"
        ]
        if absent:
            print(
                f"  absent tables: {', '.join(absent)} (the use cases' loaders "
                "read them: each is refused by name where it is needed)"
            )
    if args.out:
        with outputs.staged_dir(args.out, overwrite=args.overwrite) as tmp:
            for site, report in reports.items():
                report.to_frame().to_csv(tmp / f"{site}.exclusions.csv", index=False)
        print(f"wrote {args.out}/<site>.exclusions.csv (one row per excluded record)")
    return 0


def add_omop_parser(subparsers):
    """Register ``omop simulate`` and ``omop check`` on the ``phems`` subparsers.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="phems")
    >>> _ = add_omop_parser(parser.add_subparsers(dest="command"))
    >>> a = parser.parse_args(["omop", "simulate", "--use-case", "picu", "--out", "d"])
    >>> a.use_case, a.n, a.func.__name__
    ('picu', None, '_simulate_cmd')
    """
    o = subparsers.add_parser(
        "omop", help="hospitals as OMOP CDM 5.4 databases: simulate, check"
    )
    sub = o.add_subparsers(dest="omop_command", required=True)
    s = sub.add_parser("simulate", help="simulate hospitals into <site>.duckdb files")
    s.add_argument(
        "--use-case",
        required=True,
        choices=USE_CASES,
        help="which hospitals: PICU stays, cardiac surgical episodes or "
        "haemophilia patients",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument(
        "--n",
        type=int,
        default=None,
        help="stays / episodes / patients per site (default: the "
        "simulator's site sizes)",
    )
    s.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    s.add_argument(
        "--product",
        default="advate",
        help="haemophilia: library product (e.g. advate, alprolix)",
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out folder as a whole",
    )
    s.set_defaults(func=_simulate_cmd)
    c = sub.add_parser(
        "check",
        help="validate a site's OMOP database and report "
        "what the loaders exclude, and why",
    )
    c.add_argument(
        "db",
        help="<site>.duckdb, a folder of them, a postgresql:// URL "
        "without password (PGPASSWORD, ~/.pgpass) or env:NAME "
        "(the URL in environment variable NAME)",
    )
    c.add_argument(
        "--out", default=None, help="folder for <site>.exclusions.csv (optional)"
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out folder as a whole",
    )
    c.set_defaults(func=_check_cmd)
    return o


__all__ = [
    "PK_TABLES",
    "USE_CASES",
    "add_omop_parser",
    "check_omop",
    "is_omop",
    "load_site",
    "holdout_split",
    "model_factor",
    "round_printer",
    "split_ids",
    "pk_events_from_omop",
    "report_json",
    "simulate_omop",
    "site_databases",
]
