"""The dosing workflow end to end: acknowledgement of unverified model sections,
weight in lb, clinic date-times, assay conversion, command-line overrides, the
previous assessment, and one result shown alike in the three views (command line,
report, ``display``)."""

import dataclasses
import json
import re
from html.parser import HTMLParser

import pytest

from phems_clinical.app.cli import main
from phems_clinical.data.dosing_request import LB_KG, RequestError
from phems_clinical.dosing.workflow import assess

# Kovaltry (Garmann 2017): fully verified; no acknowledgement needed
REQ = {
    "product": "kovaltry",
    "patient_id": "P-17",
    "weight_kg": 25.0,
    "age_y": 8.0,
    "height_cm": 128.0,
    "infusions": [{"time_h": 0.0, "dose_IU": 1000, "duration_h": 0.17}],
    "levels": [
        {"time_h": 4.0, "value": 40.2, "unit": "IU/dL"},
        {"time_h": 24.0, "value": 10.1, "unit": "IU/dL"},
        {"time_h": 48.0, "value": 1.5, "unit": "IU/dL"},
    ],
    "options": {"n_draws": 1000},
}


@pytest.fixture(scope="module")
def base():
    return assess(REQ)


def test_unverified_model_refused_without_acknowledgement():
    # Advate (Björkman 2012): IIV, IOV and residual error are not from the paper
    req = {**REQ, "product": "advate"}
    with pytest.raises(RequestError) as err:
        assess(req)
    (e,) = err.value.errors
    assert e.field == "acknowledge_unverified"
    for phrase in (
        "iiv (grade",
        "iov (grade",
        "residual (grade",
        "--accept-unverified",
        "not verified against the primary paper",
    ):
        assert phrase in e.message, e.message
    r = assess({**req, "acknowledge_unverified": True}).result
    assert {"iiv", "iov", "residual"} <= set(r["acknowledged_unverified"])
    assert "vial_sizes_IU" not in r["acknowledged_unverified"]
    assert r["warnings"][0]["field"] == "acknowledge_unverified"
    assert r["display"]["warnings"][0].startswith(
        "acknowledge_unverified: used with unverified model sections acknowledged"
    )


def test_pounds_give_the_same_patient_as_kilograms(base):
    lb = assess(
        {
            **{k: v for k, v in REQ.items() if k != "weight_kg"},
            "weight_lb": 25.0 / LB_KG,
        }
    ).result
    assert lb["covariates"]["WT"]["value"] == pytest.approx(25.0, rel=1e-12)
    assert lb["weight"] == {"value": pytest.approx(25.0 / LB_KG), "unit": "lb"}
    for key in ("half_life_h", "clearance_mL_h_kg"):
        assert lb[key]["median"] == pytest.approx(base.result[key]["median"], rel=1e-9)
    assert {"label": "Body weight", "value": "55.1 lb (25.0 kg)"} in lb["display"][
        "summary"
    ]


def test_clinic_date_times_give_the_same_patient_as_hours(base):
    req = {
        **REQ,
        "infusions": [
            {"datetime": "30/12/2025 22:00", "dose_IU": 1000, "duration_h": 0.17}
        ],
        "levels": [
            {"datetime": "31.12.2025 02:00", "value": 40.2, "unit": "%"},
            {"datetime": "31-12-2025 22:00", "value": 10.1, "unit": "%"},
            {"datetime": "01/01/2026 22:00", "value": 1.5, "unit": "%"},
        ],
    }
    r = assess(req).result
    assert [lv["time_h"] for lv in r["levels"]] == [4.0, 24.0, 48.0]
    assert r["levels"][2]["datetime"] == "01/01/2026 22:00"
    assert r["half_life_h"] == base.result["half_life_h"]


def test_published_assay_factor_applied_to_the_levels(tmp_path, base):
    """A synthetic product on the chromogenic scale whose label doubles one-stage
    results (as Afstyla's US PI does): one-stage levels of half the chromogenic
    values give the same patient."""
    from phems_clinical.pk.library import load_product
    from phems_clinical.pk.spec import save_model

    model = load_product("kovaltry")
    meta = dict(
        model.metadata,
        assay="chromogenic",
        assay_conversion={
            "one-stage": {"factor": 2.0, "source": "synthetic label, one-stage x 2"}
        },
    )
    path = save_model(
        dataclasses.replace(model, metadata=meta), tmp_path / "model.yaml"
    )
    req = {k: v for k, v in REQ.items() if k != "product"} | {"model": str(path)}
    halved = {
        **req,
        "assay": "one-stage",
        "levels": [{**lv, "value": lv["value"] / 2} for lv in REQ["levels"]],
    }
    r = assess(halved).result
    assert r["assay"] == {
        "measured": "one-stage",
        "model": "chromogenic",
        "factor": 2.0,
        "source": "synthetic label, one-stage x 2",
    }
    assert [lv["value_IU_dL"] for lv in r["levels"]] == pytest.approx([40.2, 10.1, 1.5])
    assert r["half_life_h"]["median"] == pytest.approx(
        base.result["half_life_h"]["median"], rel=1e-9
    )
    assert any("multiplied by 2.00" in n for n in r["display"]["notes"])
    # not given: used as measured, and the clinician is asked for it
    r = assess(req).result
    (w,) = [w for w in r["warnings"] if w["field"] == "assay"]
    assert "was not given" in w["message"] and "multiplied by 2" in w["message"]
    # a mismatch with no published factor: warned about by name
    meta["assay_conversion"] = {}
    path = save_model(
        dataclasses.replace(model, metadata=meta), tmp_path / "model2.yaml"
    )
    r = assess({**req, "model": str(path), "assay": "one-stage"}).result
    (w,) = [w for w in r["warnings"] if w["field"] == "assay"]
    assert "one-stage clotting assay" in w["message"]
    assert "chromogenic substrate assay" in w["message"]


def test_previous_assessment_beside_the_new_one(base):
    prev = dict(base.result, assessed_at="2025-03-01T10:00:00")
    a = assess(REQ, previous=prev)
    comp = a.result["display"]["comparison"]
    assert comp["columns"][:2] == ["Date", "Product"]
    assert comp["rows"][0][0] == "2025-03-01 10:00"
    assert comp["rows"][0][2] == comp["rows"][1][2]  # same patient, same levels
    assert "Previous assessment" in a.report_html
    assert comp["rows"][0][2] in a.report_html


# ------------------------------------------------------------ three views


class _Cells(HTMLParser):
    """Text of every table row of the elements with an id, by id."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self.items: dict[str, list[str]] = {}
        self._id, self._row, self._cell, self._li = None, None, None, None

    def handle_starttag(self, tag, attrs):
        ident = dict(attrs).get("id")
        if ident:
            self._id = ident
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "li":
            self._li = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.setdefault(self._id, []).append(self._row)
            self._row = None
        elif tag == "li" and self._li is not None:
            self.items.setdefault(self._id, []).append(self._li.strip())
            self._li = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._li is not None:
            self._li += data


def test_three_views_show_the_same_text(tmp_path, capsys):
    req = {
        **REQ,
        "product": "advate",
        "acknowledge_unverified": True,
        "age_y": 0.8,
        "weight_kg": 9.0,
        "infusions": [{"time_h": 0.0, "dose_IU": 500, "duration_h": 0.1}],
        "levels": [
            {"time_h": 4.0, "value": 60.0, "unit": "IU/dL"},
            {"time_h": 24.0, "value": 12.0, "unit": "IU/dL"},
        ],
    }
    path = tmp_path / "req.json"
    path.write_text(json.dumps(req))
    assert main(["dose", str(path), "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    disp = result["display"]
    html = (tmp_path / "o" / "report.html").read_text()
    cells = _Cells()
    cells.feed(html)

    # summary: the same label and value, in the same order
    assert cells.rows["summary"] == [[s["label"], s["value"]] for s in disp["summary"]]
    for s in disp["summary"]:
        assert f"  {s['label']}: {s['value']}" in captured.out.splitlines()
    # regimen table: the same cells
    assert cells.rows["regimens"][0] == disp["regimen_table"]["columns"]
    assert cells.rows["regimens"][1:] == disp["regimen_table"]["rows"]
    for row in disp["regimen_table"]["rows"]:
        probability = row[
            disp["regimen_table"]["columns"].index("P(trough \u2265 target)")
        ]
        assert re.fullmatch(r"(> 99|< 1|\d{1,2}) %|\u2013", probability)
    # warnings (the acknowledgement and the age range among them): all three
    assert any(w.startswith("acknowledge_unverified:") for w in disp["warnings"])
    assert any(w.startswith("age_y:") for w in disp["warnings"])
    assert cells.items["warnings"] == disp["warnings"]
    for w in disp["warnings"]:
        assert f"warning: {w}" in captured.err.splitlines()
    assert cells.items["notes"] == disp["notes"]
    assert disp["title"] in captured.out and disp["title"] in html
    # no internals in the report
    for internal in ("gradient_max_abs", "objective", "diagnostics", "converged"):
        assert internal not in html


def test_cli_options_override_the_request(tmp_path, capsys):
    path = tmp_path / "req.json"
    path.write_text(json.dumps(REQ))
    assert (
        main(
            [
                "dose",
                str(path),
                "--out",
                str(tmp_path / "o"),
                "--target",
                "2",
                "--target",
                "4",
                "--probability",
                "0.8",
                "--max-dose-iu-kg",
                "60",
                "--assay",
                "chromogenic",
            ]
        )
        == 0
    )
    r = json.loads((tmp_path / "o" / "result.json").read_text())
    assert r["targets_IU_dL"] == [2.0, 4.0] and r["trough_probability"] == 0.8
    assert r["max_dose_IU_kg"] == 60.0 and r["assay"]["measured"] == "chromogenic"
    assert {g["target_IU_dL"] for g in r["regimens"]} == {2.0, 4.0}
    assert all(g["cap_IU_kg"] == 60.0 for g in r["regimens"])
    capsys.readouterr()


@pytest.mark.parametrize(
    "args, option",
    [
        (["--evaluate", "Mon/Wed/Fri"], "--evaluate"),
        (["--evaluate", "Mon/Wed/Fri:1000 mg"], "--evaluate"),
        (["--evaluate", "Mon/Wed/Fri:500IU/kg"], "--evaluate"),
        (["--probability", "1.2"], "--probability"),
        (["--probability", "nan"], "--probability"),
        (["--target", "0"], "--target"),
        (["--max-dose-iu-kg", "-5"], "--max-dose-iu-kg"),
        (["--assay", "aPTT"], "--assay"),
    ],
)
def test_bad_cli_option_exits_2_naming_it(tmp_path, capsys, args, option):
    path = tmp_path / "req.json"
    path.write_text(json.dumps(REQ))
    with pytest.raises(SystemExit) as info:
        main(["dose", str(path), "--out", str(tmp_path / "o"), *args])
    assert info.value.code == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_unverified_without_the_flag(tmp_path, capsys):
    path = tmp_path / "req.json"
    path.write_text(json.dumps({**REQ, "product": "advate"}))
    assert main(["dose", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "acknowledge_unverified:" in err and "--accept-unverified" in err
    assert (
        main(["dose", str(path), "--out", str(tmp_path / "o"), "--accept-unverified"])
        == 0
    )
    r = json.loads((tmp_path / "o" / "result.json").read_text())
    assert "residual" in r["acknowledged_unverified"]
