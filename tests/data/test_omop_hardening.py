"""OMOP data access fails closed: hardened DuckDB (no external access,
no extension auto-install/load, views refused), clean errors for bad files and
refused connections, read-only PostgreSQL sessions, and missing or implausible
values excluded and reported as the OHDSI Data Quality Dashboard would."""

from __future__ import annotations

import os
import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest

from phems_clinical.app.omop import site_databases
from phems_clinical.data import omop
from phems_clinical.data.omop import concepts as C

#: Two haemophilia A patients: one infusion, three levels (one BLQ) each.
EVENTS = pd.DataFrame(
    {
        "ID": [1, 1, 1, 1, 2, 2, 2, 2],
        "TIME": [0, 1, 24, 48, 0, 2, 24, 72],
        "EVID": [1, 0, 0, 0, 1, 0, 0, 0],
        "MDV": [1, 0, 0, 0, 1, 0, 0, 0],
        "AMT": [1500, 0, 0, 0, 1000, 0, 0, 0],
        "DUR": [0.25, 0, 0, 0, 0.1, 0, 0, 0],
        "DV": [np.nan, 60.0, 20.0, 1.0, np.nan, 45.0, 15.0, 1.0],
        "BLQ": [0, 0, 0, 1, 0, 0, 0, 1],
        "LLOQ": [np.nan, 1, 1, 1, np.nan, 1, 1, 1],
        "AGE": [30.0] * 4 + [8.0] * 4,
        "SEX": [0] * 8,
        "WT": [70.0] * 4 + [25.0] * 4,
    }
)
PK_TABLES = [
    "person",
    "care_site",
    "visit_occurrence",
    "drug_exposure",
    "measurement",
    "observation",
]


@pytest.fixture(scope="module")
def pk_db(tmp_path_factory):
    """A valid PK site database (written once; tests work on copies)."""
    path = tmp_path_factory.mktemp("omop") / "site.duckdb"
    with omop.connect(path) as s:
        omop.create_cdm(s)
        omop.write_tables(s, omop.pk_to_omop(EVENTS, product="Advate", site="a"))
    return path


@pytest.fixture
def db(pk_db, tmp_path):
    path = tmp_path / "site.duckdb"
    shutil.copy(pk_db, path)
    return path


def _sql(path, *statements):
    with duckdb.connect(str(path)) as con:
        for sql in statements:
            con.execute(sql)


def _load(path, names=PK_TABLES):
    with omop.connect(path, read_only=True) as s:
        return omop.read_tables(s, names)


# ----------------------------------------------------------------- hardening


def test_view_over_a_local_file_is_refused_and_reads_nothing(db, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("measurement_id,value\n1,SECRET-VALUE\n")
    _sql(
        db,
        "DROP TABLE measurement",
        f"CREATE VIEW measurement AS SELECT * FROM read_csv('{secret}')",
    )
    with pytest.raises(omop.OmopSchemaError, match="measurement.*view") as info:
        _load(db)
    assert "SECRET" not in str(info.value)
    with omop.connect(db, read_only=True) as s:
        assert (
            s.conn.execute(
                "SELECT current_setting('enable_external_access')"
            ).fetchone()[0]
            is False
        )
        with pytest.raises(omop.OmopDatabaseError, match="disabled by configuration"):
            s.fetchall(f"SELECT * FROM read_csv('{secret}')")
        with pytest.raises(omop.OmopDatabaseError, match="locked"):
            s.execute("SET enable_external_access = true")


def test_extension_autoload_and_autoinstall_are_off(db):
    with omop.connect(db, read_only=True) as s:
        for name in ("autoinstall_known_extensions", "autoload_known_extensions"):
            assert s.fetchall(f"SELECT current_setting('{name}')")[0][0] is False


@pytest.mark.parametrize(
    "damage", ["empty", "garbage", "truncated", "missing", "folder"]
)
def test_bad_database_files_give_errors_naming_the_file(db, damage):
    data = db.read_bytes()
    if damage == "empty":
        db.write_bytes(b"")
    elif damage == "garbage":
        db.write_bytes(b"not a database " * 300)
    elif damage == "truncated":
        db.write_bytes(data[: len(data) // 3])
    elif damage == "missing":
        db.unlink()
    else:
        db.unlink()
        db.mkdir()
    with pytest.raises((omop.OmopDatabaseError, OSError)) as info:
        _load(db)
    err = info.value
    named = str(err) if isinstance(err, ValueError) else str(err.filename)
    assert str(db) in named, err


def test_refused_postgres_connection_names_host_and_port_not_password():
    with pytest.raises(omop.OmopConnectionError) as info:
        omop.connect(
            "postgresql://site:hunter2@127.0.0.1:1/omop?connect_timeout=3",
            read_only=True,
        )
    msg = str(info.value)
    assert "127.0.0.1:1" in msg and "omop" in msg and "hunter2" not in msg
    assert isinstance(info.value, OSError)


def test_password_on_the_command_line_is_refused_env_url_is_not(monkeypatch):
    with pytest.raises(ValueError, match="PGPASSWORD"):
        site_databases("postgresql://site:hunter2@db/omop")
    with pytest.raises(ValueError, match="PGPASSWORD"):
        site_databases("postgresql://site@db/omop?password=hunter2")
    assert site_databases("postgresql://site@db/omop") == {
        "site": "postgresql://site@db/omop"
    }
    assert site_databases("env:PHEMS_OMOP_URL") == {"site": "env:PHEMS_OMOP_URL"}
    monkeypatch.setenv("PHEMS_OMOP_URL", "postgresql://site:pw@127.0.0.1:1/omop")
    assert omop.resolve_target("env:PHEMS_OMOP_URL").endswith("@127.0.0.1:1/omop")
    monkeypatch.delenv("PHEMS_OMOP_URL")
    with pytest.raises(ValueError, match="PHEMS_OMOP_URL.*not set"):
        omop.connect("env:PHEMS_OMOP_URL")


def test_postgres_read_only_session():
    url = os.environ.get("PHEMS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set PHEMS_TEST_POSTGRES_URL to run this")
    pytest.importorskip("psycopg2")
    with omop.connect(url, read_only=True) as s:
        assert s.fetchall("SHOW default_transaction_read_only") == [("on",)]
        with pytest.raises(omop.OmopDatabaseError, match="read-only"):
            s.execute("CREATE TABLE phems_should_not_exist (x integer)")


# ---------------------------------------------------- missing and implausible

LEVEL = C.MEASUREMENT["fviii_activity"]


def test_missing_and_implausible_values_are_excluded_and_reported(db):
    first_level = (
        f"(SELECT min(measurement_id) FROM measurement WHERE "
        f"measurement_concept_id = {LEVEL} AND person_id = 1)"
    )
    _sql(
        db,
        f"UPDATE measurement SET value_as_number = NULL WHERE measurement_id = "
        f"{first_level}",
        "UPDATE person SET year_of_birth = 2999 WHERE person_id = 2",
        "UPDATE drug_exposure SET quantity = 9999999 WHERE person_id = 1",
    )
    tables, report = _load(db)
    got = {(r.table, r.field, r.reason) for r in report.exclusions.itertuples()}
    assert ("measurement", "value_as_number", "missing_value") in got
    assert ("person", "year_of_birth", "implausible_value") in got
    assert ("drug_exposure", "quantity", "implausible_value") in got
    # every input row is kept or excluded, table by table
    for t, n in report.n_input.items():
        assert n == report.n_kept[t] + int((report.exclusions["table"] == t).sum())
    text = report.summary()
    assert "missing_value: 1 (DQD measureValueCompleteness; value_as_number 1)" in text
    assert "NULL value_as_number: 1 of" in text
    assert "DQD plausibleValueLow/High" in text
    assert "9999999" not in text and "2999" not in text  # counts, not values


def test_dose_per_kg_and_infusion_duration_limits(db):
    # 1500 IU for 70 kg is fine; 40000 IU (571 IU/kg) is not, nor a 40-day infusion
    _sql(
        db,
        "UPDATE drug_exposure SET quantity = 40000 WHERE person_id = 1",
        "UPDATE drug_exposure SET drug_exposure_end_datetime = "
        "drug_exposure_start_datetime + INTERVAL 40 DAY WHERE person_id = 2",
    )
    _, report = _load(db)
    got = {
        (r.person_id, r.field): r.reason
        for r in report.exclusions.itertuples()
        if r.table == "drug_exposure"
    }
    assert got == {
        (1, "quantity"): "implausible_value",
        (2, "drug_exposure_end_datetime"): "implausible_value",
    }


def test_omop_to_pk_refuses_a_null_level_in_unvalidated_tables(db):
    first_level = (
        f"(SELECT min(measurement_id) FROM measurement WHERE "
        f"measurement_concept_id = {LEVEL})"
    )
    _sql(
        db,
        f"UPDATE measurement SET value_as_number = NULL WHERE measurement_id = "
        f"{first_level}",
    )
    with omop.connect(db, read_only=True) as s:
        tables, _ = omop.read_tables(s, PK_TABLES, validate=False)
    with pytest.raises(
        ValueError,
        match=r"measurement: value_as_number is NULL on 1 "
        r"row\(s\) \(measurement_id \[",
    ):
        omop.omop_to_pk(tables)


def test_pk_to_omop_refuses_a_missing_level():
    ev = EVENTS.copy()
    ev.loc[2, "DV"] = np.nan
    with pytest.raises(ValueError, match=r"column DV missing .* rows \[2\]"):
        omop.pk_to_omop(ev, product="Advate", site="a")
