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

import errno
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import pandas as pd

from phems_clinical import outputs
from phems_clinical.data.omop import (
    LoadReport,
    connect,
    create_cdm,
    omop_to_pk,
    pk_to_omop,
    read_tables,
    write_tables,
)
from phems_clinical.data.split import holdout_split, split_ids

USE_CASES = ("picu", "cardiac", "haemophilia")

PK_TABLES = ("person", "care_site", "visit_occurrence", "drug_exposure",
             "measurement", "observation")


_PG = ("postgresql://", "postgres://", "env:")


def _is_database(target: str | Path) -> bool:
    text = str(target)
    return text.startswith(_PG) or text.endswith(".duckdb")


def _refuse_password(url: str) -> None:
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
    except ValueError:
        raise ValueError("the PostgreSQL URL is not valid (postgresql://user@host:"
                         "port/database)") from None
    if parts.password is not None or "password" in {k.lower() for k in query}:
        raise ValueError("the PostgreSQL URL holds a password, which other users can "
                         "read in the process list; put it in PGPASSWORD or "
                         "~/.pgpass, or give env:NAME with the URL in environment "
                         "variable NAME")


def site_databases(target: str | Path) -> dict[str, str]:
    """``{site: target}`` for a folder of ``<site>.duckdb`` files, one DuckDB file,
    a PostgreSQL URL without a password, or ``env:NAME`` (site named by the file
    stem, or ``site``)."""
    text = str(target)
    if text.startswith(_PG):
        if not text.startswith("env:"):
            _refuse_password(text)
        return {"site": text}
    path = Path(text)
    if path.is_dir():
        found = {p.stem: str(p) for p in sorted(path.glob("*.duckdb"))}
        if not found:
            # errno/strerror/filename, so the CLI names the option (--data)
            raise FileNotFoundError(errno.ENOENT, "no <site>.duckdb files in this "
                                    "folder", str(path))
        return found
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such OMOP database (expected a "
                                ".duckdb file, a folder of them or a postgresql:// "
                                "URL)", str(path))
    return {path.stem: str(path)}


def write_site(path: Path, tables: Mapping[str, pd.DataFrame]) -> dict[str, int]:
    """Write one site's OMOP tables as a new DuckDB file ``path``; returns rows per
    table. An existing file is never replaced (``FileExistsError``): the database
    is written beside it under a temporary name and renamed when complete."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(errno.EEXIST, "an OMOP database is already there; "
                              "it is not replaced", str(path))
    tmp = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")
    try:
        with connect(tmp) as store:
            create_cdm(store)
            write_tables(store, tables)
        try:
            os.link(tmp, path)  # fails if path appeared meanwhile: no overwrite
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            if path.exists():
                raise FileExistsError(errno.EEXIST, "an OMOP database is already "
                                      "there; it is not replaced", str(path)) from None
            os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return {t: len(df) for t, df in tables.items()}


Tables = dict[str, pd.DataFrame]


def _simulated_sites(use_case: str, key, n: int | None, product: str
                     ) -> dict[str, tuple[Tables, pd.DataFrame | None]]:
    if use_case == "picu":
        from phems_clinical.data.picu import DEFAULT_SITES, simulate_sites

        sites = {name: {**cfg, **({"n_stays": n} if n else {})}
                 for name, cfg in DEFAULT_SITES.items()}
        return {name: (c.tables, c.truth)
                for name, c in simulate_sites(key, sites).items()}
    if use_case == "cardiac":
        from phems_clinical.data.cardiac import simulate_sites

        return {name: (c.tables, c.truth)
                for name, c in simulate_sites(key, n_episodes=n or 500).items()}
    from phems_clinical.pk.library import load_product
    from phems_clinical.pk.simulate import default_hospitals, simulate_hospitals

    model = load_product(product)
    factor = model_factor(model)
    events, truth = simulate_hospitals(key, model, default_hospitals(3 * (n or 30)))
    out = {}
    for site, rows in events.groupby("SITE", sort=False):
        tables = pk_to_omop(rows.drop(columns="SITE"), product=product, site=site,
                            factor=factor)
        out[site] = (tables, truth[truth["ID"].isin(rows["ID"])] if "ID" in truth
                     else None)
    return out


def simulate_omop(use_case: str, out: str | Path, *, seed: int = 0,
                  n: int | None = None, product: str = "advate",
                  overwrite: bool = False) -> dict[str, Any]:
    """Simulate the use case's default hospitals and write each to
    ``out/<site>.duckdb``; returns rows per table per site.

    ``n`` is the number of stays (picu), episodes (cardiac) or patients
    (haemophilia) per site; default: each simulator's own site sizes. A non-empty
    ``out`` is refused before anything is simulated unless ``overwrite``; the
    folder is written under a temporary name and renamed into place at the end
    (:func:`phems_clinical.outputs.staged_dir`), so a failure leaves the old one.
    """
    if use_case not in USE_CASES:
        raise ValueError(f"--use-case: {use_case!r} is not one of "
                         f"{', '.join(USE_CASES)}")
    if n is not None and n < 3:
        raise ValueError(f"--n: {n} per site is too few (at least 3)")
    outputs.check_out(out, overwrite=overwrite)
    summary = {}
    with outputs.staged_dir(out, overwrite=overwrite) as tmp:
        for site, (tables, truth) in _simulated_sites(
                use_case, jax.random.key(seed), n, product).items():
            summary[site] = write_site(tmp / f"{site}.duckdb", tables)
            if truth is not None:
                truth.to_csv(tmp / f"{site}.truth.csv", index=False)
    return summary


def load_site(target: str, tables: tuple[str, ...] | None = None
              ) -> tuple[dict[str, pd.DataFrame], LoadReport]:
    """Read and validate one site's OMOP tables (a read-only DuckDB connection or
    PostgreSQL session)."""
    with connect(target, read_only=True) as store:
        return read_tables(store, tables)


def check_omop(target: str | Path) -> dict[str, LoadReport]:
    """Each site's load report (nothing is changed in the databases)."""
    return {site: load_site(db)[1] for site, db in site_databases(target).items()}


def report_json(report: LoadReport) -> dict[str, Any]:
    """A load report for result.json: rows read/kept per table, exclusions by
    table and reason."""
    return {"rows": report.n_input, "kept": report.n_kept,
            "excluded": [{"table": r["table"], "reason": r["reason"], "n": int(r["n"])}
                         for _, r in report.counts.iterrows()]}


def pk_events_from_omop(target: str | Path, *, factor: str = "FVIII"
                        ) -> tuple[pd.DataFrame, dict[str, dict]]:
    """NONMEM-style events (with a ``SITE`` column) from each site's OMOP database,
    and each site's load report (for result.json)."""
    frames, reports = [], {}
    for site, db in site_databases(target).items():
        tables, report = load_site(db, PK_TABLES)
        events = omop_to_pk(tables, factor=factor)
        untimed = events.attrs.pop("exclusions", None)
        events["SITE"] = site
        frames.append(events)
        reports[site] = report_json(report)
        if untimed is not None and len(untimed):
            # levels of persons without a (kept) dose: reported, not dropped
            reports[site]["excluded"].append({
                "table": "measurement", "reason": "no_dose_to_time",
                "n": int(len(untimed))})
    return pd.concat(frames, ignore_index=True), reports


def round_printer(tag: str, n_sites: int, every: int = 10):
    """An ``on_round`` callback printing progress every ``every`` rounds."""
    def on_round(rec, server):
        del server
        if (rec.round + 1) % every == 0 or rec.round == 0:
            print(f"[phems {tag}] round {rec.round + 1}: sites "
                  f"{len(rec.participants)}/{n_sites}"
                  + (f", dropped {list(rec.dropped)}" if rec.dropped else "")
                  + f", {rec.seconds:.2f} s", flush=True)
    return on_round


def model_factor(model) -> str:
    """'FIX' for factor IX models (library metadata), else 'FVIII'."""
    return "FIX" if model.metadata.get("factor") == "FIX" else "FVIII"


def is_omop(data: str | Path) -> bool:
    """Whether ``--data`` names OMOP databases rather than a CSV."""
    return _is_database(data) or Path(str(data)).is_dir()


# ------------------------------------------------------------------ command line

def _simulate_cmd(args) -> int:
    import json

    summary = simulate_omop(args.use_case, args.out, seed=args.seed, n=args.n,
                            product=args.product, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    print(f"wrote {len(summary)} OMOP database(s) to {args.out}/<site>.duckdb "
          "(+ <site>.truth.csv: the simulator's ground truth, for validation only)")
    return 0


def _check_cmd(args) -> int:
    if args.out:
        outputs.check_out(args.out, overwrite=args.overwrite)
    from phems_clinical.data.omop import USE_CASE_TABLES

    reports = check_omop(args.db)
    for site, report in reports.items():
        print(f"[{site}] {report.summary()}")
        absent = [t for t in USE_CASE_TABLES
                  if t not in report.n_input and t != "concept"]
        if absent:
            print(f"  absent tables: {', '.join(absent)} (the use cases' loaders "
                  "read them: each is refused by name where it is needed)")
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
    o = subparsers.add_parser("omop", help="hospitals as OMOP CDM 5.4 databases: "
                                           "simulate, check")
    sub = o.add_subparsers(dest="omop_command", required=True)
    s = sub.add_parser("simulate", help="simulate hospitals into <site>.duckdb files")
    s.add_argument("--use-case", required=True, choices=USE_CASES)
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=None,
                   help="stays / episodes / patients per site (default: the "
                        "simulator's site sizes)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--product", default="advate",
                   help="haemophilia: library product (e.g. advate, alprolix)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out folder as a whole")
    s.set_defaults(func=_simulate_cmd)
    c = sub.add_parser("check", help="validate a site's OMOP database and report "
                                     "what the loaders exclude, and why")
    c.add_argument("db", help="<site>.duckdb, a folder of them, a postgresql:// URL "
                              "without password (PGPASSWORD, ~/.pgpass) or env:NAME "
                              "(the URL in environment variable NAME)")
    c.add_argument("--out", default=None,
                   help="folder for <site>.exclusions.csv (optional)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out folder as a whole")
    c.set_defaults(func=_check_cmd)
    return o


__all__ = ["USE_CASES", "add_omop_parser", "check_omop", "is_omop", "load_site",
           "holdout_split", "model_factor", "round_printer", "split_ids",
           "pk_events_from_omop", "report_json", "simulate_omop", "site_databases"]
