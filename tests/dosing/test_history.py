"""The clinic's patient history (SQLite): transactions, reopening, version
refusal, export round trip, and what a saved assessment summarises."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import stat

import pytest

from phems_clinical.data.dosing_request import RequestError
from phems_clinical.dosing import history as h


def _est(m):
    return {"median": m, "lo90": 0.8 * m, "hi90": 1.25 * m}


def _pair(pid="P-1", t_eff=12.0, weight=25.0, origin=None, level_h=48.0, chosen=None):
    request = {
        "patient_id": pid,
        "product": "advate",
        "weight_kg": weight,
        "age_y": 8,
        "note": "Ünïcode ✓",
    }
    result = {
        "patient_id": pid,
        "product": "advate",
        "product_display": "Advate (octocog alfa) — Björkman 2012",
        "covariates": {
            "WT": {"value": weight, "source": "given"},
            "AGE": {"value": 8.0, "source": "given"},
        },
        "effective_half_life_h": _est(t_eff),
        "half_life_h": _est(t_eff + 1),
        "clearance_mL_h_kg": _est(3.0),
        "time_to_threshold_h": {"1": {"median": "inf", "lo90": "inf", "hi90": "inf"}},
        "time_origin": origin,
        "levels": [{"time_h": 4.0}, {"time_h": level_h}],
        "evaluated_regimens": [chosen] if chosen else [],
    }
    return request, result


@pytest.fixture
def path(tmp_path):
    return tmp_path / "clinic.db"


def _raw_rows(path, table):
    con = sqlite3.connect(path)
    try:
        return con.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        con.close()


def test_new_file_is_private_and_records_its_schema(path):
    h.open_store(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [r[0] for r in _raw_rows(path, "schema_version")] == [h.SCHEMA_VERSION]
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA application_id").fetchone()[0] == h.APPLICATION_ID
    con.close()


def test_saved_assessment_survives_reopening_exactly(path):
    req, res = _pair(
        chosen={
            "schedule": {"label": "Mon/Wed/Fri"},
            "dose_IU": 1000,
            "dose_IU_kg": 40.0,
        }
    )
    with h.open_store(path) as store:
        aid = h.save_assessment(store, req, res, when="2024-03-01T10:00")
    with h.open_store(path) as store:  # a new connection, from the file
        assert h.load_assessment(store, aid) == (req, res)
        [p] = h.list_patients(store)
        assert p == h.PatientSummary("P-1", 1, "2024-03-01T10:00", "2024-03-01T10:00")
        [s] = h.history(store, "P-1")
    assert s.assessment_id == aid and s.product == "advate"
    assert s.product_display.startswith("Advate (octocog alfa)")
    assert s.effective_half_life_h == _est(12.0)
    assert s.terminal_half_life_h == _est(13.0)
    assert (s.weight_kg, s.age_y) == (25.0, 8.0)
    assert s.chosen_regimen["dose_IU"] == 1000


def test_history_is_ordered_by_date_and_previous_is_strictly_earlier(path):
    with h.open_store(path) as store:
        late = h.save_assessment(store, *_pair(t_eff=14.0), when="2025-03-02T09:00")
        early = h.save_assessment(store, *_pair(t_eff=11.0), when="2024-03-01T10:00")
        h.save_assessment(store, *_pair("P-2"), when="2024-06-01T10:00")
        assert [s.assessment_id for s in h.history(store, "P-1")] == [early, late]
        assert [p.patient_id for p in h.list_patients(store)] == ["P-1", "P-2"]
        prev = h.previous_assessment(store, "P-1", before="2025-03-02T09:00")
        assert prev.summary.assessment_id == early
        assert prev.result["effective_half_life_h"]["median"] == 11.0
        assert h.previous_assessment(store, "P-1").summary.assessment_id == late
        assert (
            h.previous_assessment(store, "P-1", exclude_id=late).summary.assessment_id
            == early
        )
        assert h.previous_assessment(store, "P-1", before="2024-03-01T10:00") is None
        assert h.previous_assessment(store, "P-9") is None


def test_default_date_is_the_last_level_when_the_request_has_dates(path):
    with h.open_store(path) as store:
        aid = h.save_assessment(store, *_pair(origin="2024-12-30T08:30", level_h=49.5))
        [s] = h.history(store, "P-1")
    assert s.assessment_id == aid
    assert s.assessed_at == "2025-01-01T10:00"  # 30 Dec 08:30 + 49.5 h


def test_aware_dates_are_stored_in_utc(path):
    with h.open_store(path) as store:
        h.save_assessment(store, *_pair(), when="2024-03-01T10:00+02:00")
        assert h.history(store, "P-1")[0].assessed_at == "2024-03-01T08:00"


@pytest.mark.parametrize("pid", [None, "", "   "])
def test_a_patient_id_is_required_to_save(path, pid):
    req, res = _pair()
    req["patient_id"] = res["patient_id"] = pid
    with h.open_store(path) as store, pytest.raises(RequestError) as err:
        h.save_assessment(store, req, res)
    assert [e.field for e in err.value.errors] == ["patient_id"]
    assert _raw_rows(path, "assessments") == []


def test_bad_when_and_unknown_ids_name_their_field(path):
    with h.open_store(path) as store:
        with pytest.raises(RequestError) as err:
            h.save_assessment(store, *_pair(), when="01/03/2024 10:00")
        assert err.value.errors[0].field == "when"
        with pytest.raises(RequestError) as err:
            h.history(store, "nobody")
        assert err.value.errors[0].field == "patient_id"
        with pytest.raises(RequestError) as err:
            h.load_assessment(store, 99)
        assert err.value.errors[0].field == "assessment_id"
        with pytest.raises(RequestError) as err:
            h.export(store, "P-1", "xml")
        assert err.value.errors[0].field == "format"


def test_a_failed_write_leaves_nothing_half_written(path):
    """A failure after the patient row is inserted (here: SQLite refusing the
    assessment row) rolls the patient row back too."""
    with h.open_store(path) as store:
        store._conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON assessments "
            "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )
        with pytest.raises(sqlite3.IntegrityError, match="disk says no"):
            h.save_assessment(store, *_pair("NEW"), when="2024-01-01T00:00")
        store._conn.execute("DROP TRIGGER refuse")
        assert h.list_patients(store) == []
        h.save_assessment(store, *_pair("NEW"), when="2024-01-01T00:00")
    assert [r[0] for r in _raw_rows(path, "patients")] == ["NEW"]


def test_a_result_that_is_not_json_is_refused_before_writing(path):
    req, res = _pair()
    res["clearance_mL_h_kg"] = {"median": float("nan")}
    with h.open_store(path) as store, pytest.raises(RequestError) as err:
        h.save_assessment(store, req, res)
    assert err.value.errors[0].field == "result"
    assert _raw_rows(path, "patients") == []


def test_another_schema_version_is_refused_by_name(path):
    h.open_store(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE schema_version SET version = 7")
    con.commit()
    con.close()
    with pytest.raises(
        h.StoreError,
        match=r"clinic\.db has patient-history "
        r"schema version 7.*reads version 1",
    ):
        h.open_store(path)


def test_other_files_are_refused_by_name(tmp_path):
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(
        h.StoreError,
        match=r"other\.db is an SQLite database of "
        "another application",
    ):
        h.open_store(other)
    text = tmp_path / "notes.db"
    text.write_text("not a database, but a long enough text to be a header " * 4)
    with pytest.raises(h.StoreError, match=r"notes\.db is not a patient history"):
        h.open_store(text)
    with pytest.raises(h.StoreError, match="is a folder"):
        h.open_store(tmp_path)
    with pytest.raises(FileNotFoundError):
        h.open_store(tmp_path / "no" / "such" / "folder.db")


def test_export_json_round_trip_and_csv(path):
    with h.open_store(path) as store:
        a = h.save_assessment(store, *_pair(t_eff=11.0), when="2024-03-01T10:00")
        b = h.save_assessment(
            store,
            *_pair(
                t_eff=14.0,
                chosen={
                    "schedule": {"label": "every 48 h"},
                    "dose_IU": 750,
                    "dose_IU_kg": 30.0,
                },
            ),
            when="2025-03-02T09:00",
        )
        doc = json.loads(h.export(store, "P-1", "json"))
        assert [x["assessment_id"] for x in doc["assessments"]] == [a, b]
        for x in doc["assessments"]:
            assert (x["request"], x["result"]) == h.load_assessment(
                store, x["assessment_id"]
            )
        rows = list(csv.DictReader(io.StringIO(h.export(store, "P-1", "csv"))))
    assert doc["patient_id"] == "P-1" and doc["schema_version"] == h.SCHEMA_VERSION
    assert tuple(rows[0]) == h.CSV_COLUMNS
    assert [float(r["effective_half_life_h"]) for r in rows] == [11.0, 14.0]
    assert float(rows[1]["effective_half_life_h_hi90"]) == pytest.approx(17.5)
    assert (rows[0]["chosen_schedule"], rows[1]["chosen_schedule"]) == (
        "",
        "every 48 h",
    )
    assert rows[1]["chosen_dose_IU"] == "750"


def test_one_store_serves_several_threads(path):
    from concurrent.futures import ThreadPoolExecutor

    with h.open_store(path) as store:
        with ThreadPoolExecutor(4) as pool:
            ids = list(
                pool.map(
                    lambda i: h.save_assessment(
                        store, *_pair(f"P{i % 3}"), when=f"2024-01-{i + 1:02d}T00:00"
                    ),
                    range(12),
                )
            )
        assert len(set(ids)) == 12
        assert sum(p.n_assessments for p in h.list_patients(store)) == 12


def test_history_table_shows_each_assessments_own_display_text(path):
    req, res = _pair()
    res["display"] = {
        "summary": [
            {"label": "Patient", "value": "P-1"},
            {"label": "Weight", "value": "25 kg"},
            {
                "label": "Effective half-life",
                "value": "12.0 h (90 % interval 9.6–15 h)",
            },
            {"label": "Clearance", "value": "3.0 mL/h/kg (90 % …)"},
        ],
        "evaluated_table": {
            "columns": ["Schedule", "Target", "Dose", "P(trough ≥ target)"],
            "rows": [["Mon/Wed/Fri", "1 IU/dL", "1000 IU", "87 %"]],
        },
    }
    legacy_req, legacy = _pair(t_eff=11.0)
    with h.open_store(path) as store:
        a = h.save_assessment(store, legacy_req, legacy, when="2023-01-01T00:00")
        b = h.save_assessment(store, req, res, when="2024-03-01T10:00")
        table = h.history_table(store, "P-1")
    assert table["assessment_ids"] == [a, b]
    assert table["columns"] == [
        "Date",
        "Product",
        "Weight",
        "Effective half-life",
        "Terminal half-life",
        "Clearance",
        "Chosen regimen",
    ]
    assert table["rows"][1] == [
        "2024-03-01 10:00",
        "Advate (octocog alfa) — Björkman 2012",
        "25 kg",
        "12.0 h (90 % interval 9.6–15 h)",
        "",
        "3.0 mL/h/kg (90 % …)",
        "Mon/Wed/Fri, 1000 IU, 87 %",
    ]
    # a result saved without display: median and 90 % interval, 3 figures
    assert table["rows"][0][3] == "11 h (90 % interval 8.8–13.8 h)"
