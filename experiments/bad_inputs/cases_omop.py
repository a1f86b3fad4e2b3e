"""Bad OMOP databases for ``phems omop check`` and bad outputs for ``phems omop
simulate``.

Each check case starts from one small haemophilia site (two patients written by
``pk_to_omop`` into a DuckDB file), damages one thing and checks it. Missing or
implausible values must be reported as excluded records naming the reason and
field (Data Quality Dashboard style); a file that is not a usable database, a
view, a refused connection or a password on the command line must be refused
naming the file, table, host or option.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from harness import Case

_BASE: list[bytes] = []
LEVEL = 3019250  # FVIII activity (concepts.MEASUREMENT["fviii_activity"])


def _base() -> bytes:
    """The bytes of a valid two-patient site database (built once)."""
    if not _BASE:
        import tempfile

        from phems_clinical.data import omop

        events = pd.DataFrame(
            {
                "ID": [1, 1, 1, 2, 2, 2],
                "TIME": [0, 1, 24, 0, 2, 24],
                "EVID": [1, 0, 0, 1, 0, 0],
                "MDV": [1, 0, 0, 1, 0, 0],
                "AMT": [1500, 0, 0, 1000, 0, 0],
                "DUR": [0.25, 0, 0, 0.1, 0, 0],
                "DV": [np.nan, 60.0, 20.0, np.nan, 45.0, 15.0],
                "BLQ": 0,
                "LLOQ": 1.0,
                "AGE": [30.0] * 3 + [8.0] * 3,
                "SEX": 0,
                "WT": [70.0] * 3 + [25.0] * 3,
            }
        )
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "site.duckdb"
            with omop.connect(path) as s:
                omop.create_cdm(s)
                omop.write_tables(
                    s, omop.pk_to_omop(events, product="Advate", site="a")
                )
            _BASE.append(path.read_bytes())
    return _BASE[0]


def _site(
    *sql: str, raw: Callable[[bytes], bytes] | None = None, extra: tuple[str, ...] = ()
) -> Callable[[Path], list[str]]:
    """A copy of the base site changed by ``sql`` statements (or ``raw`` bytes)."""

    def make(tmp: Path) -> list[str]:
        path = tmp / "site.duckdb"
        data = _base()
        path.write_bytes(raw(data) if raw else data)
        if sql:
            import duckdb

            (tmp / "local.csv").write_text("measurement_id,value\n1,private\n")
            with duckdb.connect(str(path)) as con:
                for s in sql:
                    con.execute(s.replace("{tmp}", str(tmp)))
        return ["omop", "check", "site.duckdb", *extra]

    return make


def _check(name: str, names: str, *sql: str, expect: str = "exclusion", **kw) -> Case:
    return Case("phems omop check", name, names, argv=_site(*sql, **kw), expect=expect)


_LEVEL1 = (
    f"(SELECT min(measurement_id) FROM measurement WHERE "
    f"measurement_concept_id = {LEVEL})"
)


def _args(*argv: str) -> Callable[[Path], list[str]]:
    return lambda tmp: list(argv)


def _full_out(*argv: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / "out").mkdir()
        (tmp / "out" / "a.duckdb").write_bytes(b"earlier results")
        return list(argv)

    return make


CASES = [
    _check(
        "NULL level (value_as_number)",
        r"missing_value.*value_as_number",
        f"UPDATE measurement SET value_as_number = NULL WHERE measurement_id = "
        f"{_LEVEL1}",
    ),
    _check(
        "NULL level time (measurement_datetime)",
        r"missing_value.*measurement_datetime",
        f"UPDATE measurement SET measurement_datetime = NULL WHERE "
        f"measurement_id = {_LEVEL1}",
    ),
    _check(
        "level 5000 IU/dL",
        r"implausible_value.*value_as_number",
        f"UPDATE measurement SET value_as_number = 5000 WHERE measurement_id = "
        f"{_LEVEL1}",
    ),
    _check(
        "birth year 2999",
        r"implausible_value.*year_of_birth",
        "UPDATE person SET year_of_birth = 2999 WHERE person_id = 2",
    ),
    _check(
        "birth year 1800",
        r"implausible_value.*year_of_birth",
        "UPDATE person SET year_of_birth = 1800 WHERE person_id = 2",
    ),
    _check(
        "dose 9,999,999 IU",
        r"implausible_value.*quantity",
        "UPDATE drug_exposure SET quantity = 9999999 WHERE person_id = 1",
    ),
    _check(
        "dose 20000 IU for 25 kg (800 IU/kg)",
        r"implausible_value.*quantity",
        "UPDATE drug_exposure SET quantity = 20000 WHERE person_id = 2",
    ),
    _check(
        "NULL dose (quantity)",
        r"missing_value.*quantity",
        "UPDATE drug_exposure SET quantity = NULL WHERE person_id = 1",
    ),
    _check(
        "NULL infusion end",
        r"missing_value.*drug_exposure_end_datetime",
        "UPDATE drug_exposure SET drug_exposure_end_datetime = NULL WHERE "
        "person_id = 1",
    ),
    _check(
        "40-day infusion",
        r"implausible_value.*drug_exposure_end_datetime",
        "UPDATE drug_exposure SET drug_exposure_end_datetime = "
        "drug_exposure_start_datetime + INTERVAL 40 DAY WHERE person_id = 1",
    ),
    _check(
        "NULL weight",
        r"missing_value.*value_as_number",
        "UPDATE measurement SET value_as_number = NULL WHERE "
        "measurement_concept_id = 3025315 AND person_id = 1",
    ),
    _check(
        "weight 900 kg",
        r"implausible_value.*value_as_number",
        "UPDATE measurement SET value_as_number = 900 WHERE "
        "measurement_concept_id = 3025315 AND person_id = 1",
    ),
    _check(
        "level dated year 2999",
        r"measurement.*measurement_datetime",
        f"UPDATE measurement SET measurement_datetime = TIMESTAMP '2999-01-01' "
        f"WHERE measurement_id = {_LEVEL1}",
        expect="error",
    ),
    _check(
        "measurement is a view over a local CSV",
        r"measurement.*view",
        "DROP TABLE measurement",
        "CREATE VIEW measurement AS SELECT * FROM read_csv('{tmp}/local.csv')",
        expect="error",
    ),
    _check(
        "measurement table missing",
        r"absent tables: .*measurement",
        "DROP TABLE measurement",
        expect="warning",
    ),
    _check(
        "value_as_number column missing",
        r"value_as_number",
        "ALTER TABLE measurement DROP COLUMN value_as_number",
        expect="error",
    ),
    _check("empty file", r"site\.duckdb", raw=lambda b: b"", expect="error"),
    _check(
        "truncated file",
        r"site\.duckdb",
        raw=lambda b: b[: len(b) // 2],
        expect="error",
    ),
    _check(
        "not a database (text)",
        r"site\.duckdb",
        raw=lambda b: b"ID,TIME\n",
        expect="error",
    ),
    Case(
        "phems omop check",
        "missing file",
        r"nowhere\.duckdb",
        argv=_args("omop", "check", "nowhere.duckdb"),
    ),
    Case(
        "phems omop check",
        "folder without databases",
        r"empty|no <site>",
        argv=lambda tmp: ((tmp / "empty").mkdir(), ["omop", "check", "empty"])[1],
    ),
    Case(
        "phems omop check",
        "PostgreSQL password on the command line",
        r"password|PGPASSWORD",
        argv=_args("omop", "check", "postgresql://site:hunter2@127.0.0.1:1/omop"),
    ),
    Case(
        "phems omop check",
        "PostgreSQL connection refused",
        r"127\.0\.0\.1:1",
        argv=_args(
            "omop", "check", "postgresql://site@127.0.0.1:1/omop?connect_timeout=3"
        ),
    ),
    Case(
        "phems omop check",
        "env: URL variable not set",
        r"PHEMS_NO_SUCH_URL",
        argv=_args("omop", "check", "env:PHEMS_NO_SUCH_URL"),
    ),
    Case(
        "phems omop check",
        "--out already holds results",
        r"--out",
        argv=lambda tmp: (
            _full_out("omop", "check", "site.duckdb", "--out", "out")(tmp)
            if _site()(tmp)
            else []
        ),
    ),
    Case(
        "phems omop simulate",
        "--out already holds a database",
        r"--out",
        argv=_full_out(
            "omop", "simulate", "--use-case", "haemophilia", "--n", "3", "--out", "out"
        ),
    ),
    Case(
        "phems omop simulate",
        "--out is a file",
        r"--out",
        argv=lambda tmp: (
            (tmp / "f").write_text("x"),
            ["omop", "simulate", "--use-case", "picu", "--out", "f"],
        )[1],
    ),
    Case(
        "phems omop simulate",
        "--n 1",
        r"--n",
        argv=_args("omop", "simulate", "--use-case", "picu", "--n", "1", "--out", "o"),
    ),
    Case(
        "phems omop simulate",
        "unknown --use-case",
        r"--use-case",
        argv=_args("omop", "simulate", "--use-case", "icu", "--out", "o"),
    ),
]
