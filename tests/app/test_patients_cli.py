"""``phems dose --db`` and ``phems patients``: a patient assessed twice, a year
apart, saved, listed, reopened and exported; bad input exits 2 naming the
option or field. Reference: the files ``phems dose`` itself wrote."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest

from phems_clinical.app import cli, dose

# A clinic's request: weight in lb, day-first date-times.
REQUEST = {
    "patient_id": "HB-001",
    "product": "kovaltry",
    "weight_lb": 55,
    "age_y": 8,
    "infusions": [
        {"datetime": "01/03/2024 08:00", "dose_IU": 1000, "duration_h": 0.17}
    ],
    "levels": [
        {"datetime": "01/03/2024 12:00", "value": 40.2, "unit": "IU/dL"},
        {"datetime": "02/03/2024 08:00", "value": 10.1, "unit": "IU/dL"},
        {"datetime": "03/03/2024 08:00", "value": 2.5, "unit": "IU/dL"},
    ],
}
NEXT_YEAR = json.loads(
    json.dumps(REQUEST)
    .replace("/2024", "/2025")
    .replace('"weight_lb": 55', '"weight_lb": 62')
)


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    """Two assessments of HB-001 saved by ``phems dose --db``; the second run
    records what ``previous`` the dosing run was given."""
    root = tmp_path_factory.mktemp("clinic")
    db = root / "clinic.db"
    for i, req in enumerate((REQUEST, NEXT_YEAR), 1):
        (root / f"r{i}.json").write_text(json.dumps(req))
    code, _, err = _main(["dose", root / "r1.json", "--out", root / "out1", "--db", db])
    assert code == 0, err
    assert "saved assessment 1 of patient HB-001" in err

    real, seen = dose.run_dose, []

    def spy(source, *, method="map", seed=None, previous=None):
        seen.append(previous)
        return real(source, method=method, seed=seed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dose, "run_dose", spy)
        code, _, err = _main(
            ["dose", root / "r2.json", "--out", root / "out2", "--db", db]
        )
    assert code == 0, err
    return {
        "root": root,
        "db": db,
        "seen": seen,
        "results": [
            json.loads((root / f"out{i}" / "result.json").read_text()) for i in (1, 2)
        ],
    }


def test_dose_saves_and_passes_the_previous_assessment(clinic):
    first = clinic["results"][0]
    [previous] = clinic["seen"]
    assert previous is not None
    assert previous["assessed_at"] == "2024-03-03T08:00"  # the last level's date
    assert {k: v for k, v in previous.items() if k != "assessed_at"} == first


def test_list_and_history_over_time(clinic):
    code, out, _ = _main(["patients", "list", "--db", clinic["db"]])
    assert code == 0
    assert out.splitlines()[2].split() == [
        "HB-001",
        "2",
        "2024-03-03",
        "08:00",
        "2025-03-03",
        "08:00",
    ]
    code, out, _ = _main(["patients", "history", "HB-001", "--db", clinic["db"]])
    assert code == 0
    lines = out.splitlines()
    assert "Effective half-life" in lines[0] and len(lines) == 4
    for line, result in zip(lines[2:], clinic["results"], strict=True):
        display = {
            d["label"]: d["value"]
            for d in (result.get("display") or {}).get("summary", [])
        }
        eff = (
            display.get("Effective half-life")
            or f"{result['effective_half_life_h']['median']:.3g} h"
        )
        assert eff in line
    assert lines[2].startswith("1   2024-03-03 08:00")
    assert lines[3].startswith("2   2025-03-03 08:00")


def test_show_rewrites_the_outputs_from_the_stored_result(clinic):
    out = clinic["root"] / "reopened"
    code, stdout, err = _main(
        ["patients", "show", "1", "--db", clinic["db"], "--out", out]
    )
    assert code == 0, err
    assert "assessment 1 of patient HB-001 (2024-03-03 08:00)" in stdout
    shown = json.loads((out / "result.json").read_text())
    stored = clinic["results"][0]
    # the numbers as stored; the text rebuilt from them (no previous: the first)
    assert {k: v for k, v in shown.items() if k != "display"} == {
        k: v for k, v in stored.items() if k != "display"
    }
    assert shown["display"]["summary"] == stored["display"]["summary"]
    assert (out / "curve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "<html" in (out / "report.html").read_text().lower()
    code, _, err = _main(["patients", "show", "2", "--db", clinic["db"], "--out", out])
    assert code == 2 and "--out" in err  # an earlier folder is kept


def test_export_round_trip(clinic):
    root = clinic["root"]
    code, _, err = _main(
        ["patients", "export", "HB-001", "--db", clinic["db"], "--out", root / "h.json"]
    )
    assert code == 0, err
    doc = json.loads((root / "h.json").read_text())
    assert [a["request"] for a in doc["assessments"]] == [REQUEST, NEXT_YEAR]
    assert [a["result"] for a in doc["assessments"]] == clinic["results"]
    code, _, err = _main(
        [
            "patients",
            "export",
            "HB-001",
            "--db",
            clinic["db"],
            "--format",
            "csv",
            "--out",
            root / "h.csv",
        ]
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO((root / "h.csv").read_text())))
    assert [float(r["effective_half_life_h"]) for r in rows] == [
        r["effective_half_life_h"]["median"] for r in clinic["results"]
    ]
    assert float(rows[0]["weight_kg"]) == pytest.approx(55 * 0.45359237)
    code, _, err = _main(
        ["patients", "export", "HB-001", "--db", clinic["db"], "--out", root / "h.json"]
    )
    assert code == 2 and "--out" in err and "exists" in err


def test_bad_input_exits_2_naming_the_option(clinic, tmp_path):
    db = clinic["db"]
    code, _, err = _main(["patients", "list", "--db", tmp_path / "none.db"])
    assert code == 2 and "--db:" in err and "does not exist" in err
    assert not (tmp_path / "none.db").exists()
    text = tmp_path / "notes.db"
    text.write_text("a text file, not a history database " * 10)
    code, _, err = _main(["patients", "list", "--db", text])
    assert code == 2 and "--db:" in err and "not a patient history" in err
    code, _, err = _main(["patients", "history", "NOBODY", "--db", db])
    assert code == 2 and "patient_id:" in err
    code, _, err = _main(
        ["patients", "show", "99", "--db", db, "--out", tmp_path / "o"]
    )
    assert code == 2 and "assessment_id:" in err
    with pytest.raises(SystemExit) as done:
        _main(["patients", "show", "first", "--db", db, "--out", tmp_path / "o"])
    assert done.value.code == 2


def test_dose_db_needs_a_patient_id_and_writes_nothing(tmp_path):
    req = tmp_path / "r.json"
    req.write_text(json.dumps({k: v for k, v in REQUEST.items() if k != "patient_id"}))
    code, _, err = _main(
        ["dose", req, "--out", tmp_path / "out", "--db", tmp_path / "c.db"]
    )
    assert code == 2 and "patient_id:" in err and "--db" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.db").exists()


def test_previous_is_passed_only_to_a_run_that_takes_it():
    class Prev:
        result = {"a": 1}

        class summary:  # noqa: N801 - stands in for AssessmentSummary
            assessed_at = "2024-01-01T00:00"

    def takes(source, *, previous=None):
        return previous

    def old(source):
        return None

    assert cli.previous_kw(takes, Prev) == {
        "previous": {"a": 1, "assessed_at": "2024-01-01T00:00"}
    }
    assert cli.previous_kw(old, Prev) == {}
    assert cli.previous_kw(takes, None) == {}
