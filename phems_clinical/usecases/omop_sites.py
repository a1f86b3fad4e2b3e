"""Each site's OMOP database, as the use cases' loaders read it, and a new site
database as the simulators write it.

Sites are a folder of ``<site>.duckdb`` files, one DuckDB file, a PostgreSQL URL
(credentials from libpq: ``PGPASSWORD``, ``~/.pgpass``) or ``env:NAME`` (a URL held
in environment variable NAME); a URL with a password is refused (every user of
the machine could read it in the process list). Databases are read without
changing them (:func:`phems_clinical.data.omop.connect` read-only) and a site
database is written whole under a temporary name, never over an existing one.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from phems_clinical.data.omop import (
    LoadReport,
    connect,
    create_cdm,
    omop_to_pk,
    read_tables,
    write_tables,
)

__all__ = [
    "PK_TABLES",
    "is_database",
    "load_site",
    "model_factor",
    "pk_events_from_omop",
    "report_json",
    "site_databases",
    "write_site",
]

PK_TABLES = (
    "person",
    "care_site",
    "visit_occurrence",
    "drug_exposure",
    "measurement",
    "observation",
)


_PG = ("postgresql://", "postgres://", "env:")


def is_database(target: str | Path) -> bool:
    text = str(target)
    return text.startswith(_PG) or text.endswith(".duckdb")


def _refuse_password(url: str) -> None:
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
    except ValueError:
        raise ValueError(
            "the PostgreSQL URL is not valid (postgresql://user@host:port/database)"
        ) from None
    if parts.password is not None or "password" in {k.lower() for k in query}:
        raise ValueError(
            "the PostgreSQL URL holds a password, which other users can "
            "read in the process list; put it in PGPASSWORD or "
            "~/.pgpass, or give env:NAME with the URL in environment "
            "variable NAME"
        )


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
            raise FileNotFoundError(
                errno.ENOENT, "no <site>.duckdb files in this folder", str(path)
            )
        return found
    if not path.exists():
        raise FileNotFoundError(
            errno.ENOENT,
            "no such OMOP database (expected a "
            ".duckdb file, a folder of them or a postgresql:// "
            "URL)",
            str(path),
        )
    return {path.stem: str(path)}


def write_site(path: Path, tables: Mapping[str, pd.DataFrame]) -> dict[str, int]:
    """Write one site's OMOP tables as a new DuckDB file ``path``; returns rows per
    table. An existing file is never replaced (``FileExistsError``): the database
    is written beside it under a temporary name and renamed when complete."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(
            errno.EEXIST,
            "an OMOP database is already there; it is not replaced",
            str(path),
        )
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
                raise FileExistsError(
                    errno.EEXIST,
                    "an OMOP database is already there; it is not replaced",
                    str(path),
                ) from None
            os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return {t: len(df) for t, df in tables.items()}


def load_site(
    target: str, tables: tuple[str, ...] | None = None
) -> tuple[dict[str, pd.DataFrame], LoadReport]:
    """Read and validate one site's OMOP tables (a read-only DuckDB connection or
    PostgreSQL session)."""
    with connect(target, read_only=True) as store:
        return read_tables(store, tables)


def report_json(report: LoadReport) -> dict[str, Any]:
    """A load report for result.json: rows read/kept per table, exclusions by
    table and reason."""
    return {
        "rows": report.n_input,
        "kept": report.n_kept,
        "excluded": [
            {"table": r["table"], "reason": r["reason"], "n": int(r["n"])}
            for _, r in report.counts.iterrows()
        ],
    }


def pk_events_from_omop(
    target: str | Path, *, factor: str = "FVIII"
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
            reports[site]["excluded"].append(
                {
                    "table": "measurement",
                    "reason": "no_dose_to_time",
                    "n": int(len(untimed)),
                }
            )
    return pd.concat(frames, ignore_index=True), reports


def model_factor(model) -> str:
    """'FIX' for factor IX models (library metadata), else 'FVIII'."""
    return "FIX" if model.metadata.get("factor") == "FIX" else "FVIII"
