"""``phems dose``: the issue's example gives every output; each bad input is refused
with a message naming its field and exit status 2; warnings; fitted-model priors."""

import dataclasses
import json
import math

import matplotlib.image
import numpy as np
import pytest

from phems_clinical.app.cli import main
from phems_clinical.app.dose import run_dose
from phems_clinical.data.dosing_request import RequestError

# Kovaltry (Garmann 2017): the library's fully verified default (no acknowledgement)
EXAMPLE = {
    "product": "kovaltry",
    "weight_kg": 25.0,
    "age_y": 8.0,
    "height_cm": 128.0,
    "infusions": [{"time_h": 0.0, "dose_IU": 1000, "duration_h": 0.17}],
    "levels": [
        {"time_h": 4.0, "value": 40.2, "unit": "IU/dL"},
        {"time_h": 24.0, "value": 10.1, "unit": "IU/dL"},
        {"time_h": 48.0, "value": 1.5, "unit": "IU/dL"},
    ],
}
EST = {"median", "lo90", "hi90"}


def _write(tmp_path, obj, name="patient.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dose")
    rc = main(["dose", str(_write(tmp, EXAMPLE)), "--out", str(tmp / "out")])
    assert rc == 0
    return tmp / "out"


def test_example_writes_all_outputs(example_run):
    r = json.loads((example_run / "result.json").read_text())
    for key in (
        "half_life_h",
        "effective_half_life_h",
        "clearance_dL_h",
        "v1_dL",
        "vss_dL",
        "incremental_recovery",
    ):
        assert set(r[key]) == EST
        assert r[key]["lo90"] < r[key]["median"] < r[key]["hi90"]
    assert set(r["time_to_threshold_h"]) == {"1", "2", "5"}
    assert set(r["time_to_threshold_after_standard_dose_h"]) == {"1", "2", "5"}
    assert r["standard_dose_IU"] == pytest.approx(50 * 25.0)
    ttt = r["time_to_threshold_h"]
    assert ttt["5"]["median"] < ttt["2"]["median"] < ttt["1"]["median"]
    # the measured 1.5 IU/dL at 48 h: the level reaches 1 IU/dL some hours later
    assert 48.0 < ttt["1"]["median"] < 72.0
    # standard half-life product: every 24/48/72 h x targets 1/3/5
    grid = {(g["schedule"]["every_h"], g["target_IU_dL"]) for g in r["regimens"]}
    assert {(t, x) for t in (24.0, 48.0, 72.0) for x in (1.0, 3.0, 5.0)} <= grid
    for g in r["regimens"]:
        assert g["cap_IU_kg"] == 100.0
        if g["status"] == "ok":
            assert g["trough_prob"] >= 0.9
            assert g["dose_IU"] % 250 == 0 and g["dose_IU"] >= 250
            assert g["dose_IU_kg"] == pytest.approx(g["dose_IU"] / 25.0)
            assert g["dose_IU_kg_week"] == pytest.approx(
                g["dose_IU_kg"] * g["infusions_per_week"]
            )
        else:  # the cap named as a cap, its dose shown
            assert g["status"] == "above_cap"
            assert g["dose_IU_kg"] <= 100.0 + 1e-9
    assert r["current_regimen"] is None and r["current_regimen_trough_prob"] is None
    assert r["warnings"] == [] and r["acknowledged_unverified"] == []
    assert r["product"] == "kovaltry"
    assert r["display"]["title"] == "Kovaltry (octocog alfa) \u2014 Garmann 2017"
    assert r["method"] == "map" and r["model"]["source"] == "library"
    assert len(r["curve"]["time_h"]) == len(r["curve"]["p50"]) > 100
    png = matplotlib.image.imread(example_run / "curve.png")
    assert png.shape[0] > 300
    html = (example_run / "report.html").read_text()
    assert "data:image/png;base64," in html and "Garmann" in html
    assert "gradient_max_abs" not in html and "objective" not in html
    assert "http://" not in html and "https://" not in html


def test_same_seed_same_result():
    a = run_dose(EXAMPLE, seed=3).result
    b = run_dose(EXAMPLE, seed=3).result
    c = run_dose(EXAMPLE, seed=4).result
    assert a["half_life_h"] == b["half_life_h"] and a["regimens"] == b["regimens"]
    assert a["half_life_h"] != c["half_life_h"]


def test_nuts_agrees_with_map(tmp_path):
    rc = main(
        [
            "dose",
            str(_write(tmp_path, EXAMPLE)),
            "--out",
            str(tmp_path / "n"),
            "--method",
            "nuts",
        ]
    )
    assert rc == 0
    nuts = json.loads((tmp_path / "n" / "result.json").read_text())
    assert nuts["method"] == "nuts" and nuts["diagnostics"]["divergences"] == 0
    assert nuts["diagnostics"]["max_r_hat"] < 1.01
    lap = run_dose(EXAMPLE).result
    for key in ("clearance_dL_h", "half_life_h"):
        assert nuts[key]["median"] == pytest.approx(lap[key]["median"], rel=0.03)
        width = nuts[key]["hi90"] - nuts[key]["lo90"]
        assert width == pytest.approx(lap[key]["hi90"] - lap[key]["lo90"], rel=0.15)


def _errors(capsys, tmp_path, request):
    rc = main(["dose", str(_write(tmp_path, request)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "result.json").exists()
    return err


def test_unknown_product_lists_the_known_ones(capsys, tmp_path):
    err = _errors(capsys, tmp_path, {**EXAMPLE, "product": "kovalty"})
    assert "product: " in err and "'kovalty'" in err and "kovaltry" in err


def test_level_before_infusion(capsys, tmp_path):
    req = {**EXAMPLE, "infusions": [{"time_h": 6.0, "dose_IU": 1000}]}
    err = _errors(capsys, tmp_path, req)
    assert "levels[0].time_h" in err and "first infusion" in err


@pytest.mark.parametrize(
    "value,unit,field",
    [
        (0.402, "IU/dL", "levels[0].unit"),  # IU/mL value entered as IU/dL
        (40.2, "IU/mL", "levels[0].value"),  # 4020 IU/dL: impossible
    ],
)
def test_unit_confusion(capsys, tmp_path, value, unit, field):
    levels = [{"time_h": 4.0, "value": value, "unit": unit}] + EXAMPLE["levels"][1:]
    if unit == "IU/mL":
        levels = [
            {**lv, "value": lv["value"] / 100, "unit": "IU/mL"}
            for lv in EXAMPLE["levels"][1:]
        ]
        levels.insert(0, {"time_h": 4.0, "value": value, "unit": unit})
    err = _errors(capsys, tmp_path, {**EXAMPLE, "levels": levels})
    assert field in err and "IU/" in err and "unit" in err


def test_missing_required_fields(capsys, tmp_path):
    req = {k: v for k, v in EXAMPLE.items() if k not in ("weight_kg", "infusions")}
    err = _errors(capsys, tmp_path, req)
    assert "weight_kg: required field missing" in err
    assert "infusions: required field missing" in err


def test_non_json(capsys, tmp_path):
    err = _errors(capsys, tmp_path, '{"product": "advate", weight_kg: 25}')
    assert "not valid JSON" in err and "line 1" in err


def test_extrapolation_warning(capsys, tmp_path):
    req = {
        **EXAMPLE,
        "age_y": 0.5,
        "weight_kg": 7.0,
        "infusions": [{"time_h": 0.0, "dose_IU": 250, "duration_h": 0.1}],
        "levels": [
            {"time_h": 4.0, "value": 35.0, "unit": "IU/dL"},
            {"time_h": 24.0, "value": 6.0, "unit": "IU/dL"},
        ],
    }
    rc = main(["dose", str(_write(tmp_path, req)), "--out", str(tmp_path / "o")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "age_y" in err and "outside the range the model was built on (1-61 y)" in err
    r = json.loads((tmp_path / "o" / "result.json").read_text())
    assert any(w["field"] == "age_y" for w in r["warnings"])
    assert "outside the range" in (tmp_path / "o" / "report.html").read_text()


def test_blq_datetimes_and_assumed_covariates():
    """Date-times, a BLQ level (M3) and an EHL product with VWF/HCT not given."""
    req = {
        "product": "eloctate",
        "weight_kg": 60.0,
        "age_y": 30.0,
        "infusions": [
            {"datetime": "2026-11-02T08:00", "dose_IU": 3000, "duration_h": 0.1}
        ],
        "levels": [
            {"datetime": "2026-11-02T12:00", "value": 0.6, "unit": "IU/mL"},
            {"datetime": "2026-11-05T08:00", "value": 8.0, "unit": "IU/dL"},
            {"datetime": "2026-11-07T08:00", "blq": True, "lloq": 1.0, "unit": "IU/dL"},
        ],
    }
    r = run_dose(req).result
    assert r["time_origin"].startswith("2026-11-02T08:00")
    assert [lv["time_h"] for lv in r["levels"]] == [4.0, 72.0, 120.0]
    assert r["levels"][0]["value_IU_dL"] == pytest.approx(60.0)
    assert r["levels"][2]["blq"] and r["levels"][2]["lloq_IU_dL"] == 1.0
    # M3: the BLQ level (under 1 IU/dL at 120 h) pulls the prediction there down
    without = run_dose({**req, "levels": req["levels"][:2]}).result
    at_120 = np.interp(120.0, without["curve"]["time_h"], without["curve"]["p50"])
    assert r["levels"][2]["predicted"]["median"] < 0.85 * at_120
    assert r["covariates"]["VWF"]["source"] == "assumed"
    assert {w["field"] for w in r["warnings"]} >= {
        "vwf_IU_dL",
        "hematocrit_pct",
        "method",
    }
    assert max(g["schedule"]["every_h"] or 0 for g in r["regimens"]) == 168.0
    # an extended half-life product leads with the effective half-life
    assert r["display"]["summary"][0]["label"] == "Effective half-life"


def test_regular_history_reports_current_regimen():
    req = {
        "product": "kovaltry",
        "weight_kg": 30.0,
        "age_y": 10.0,
        "height_cm": 138,
        "infusions": [
            {"time_h": t, "dose_IU": 1000, "duration_h": 0.1}
            for t in (0.0, 48.0, 96.0, 144.0)
        ],
        "levels": [
            {"time_h": 148.0, "value": 35.0, "unit": "IU/dL"},
            {"time_h": 190.0, "value": 2.5, "unit": "IU/dL"},
        ],
    }
    r = run_dose(req).result
    assert r["current_regimen"] == {"interval_h": 48.0, "dose_IU": 1000.0}
    probs = r["current_regimen_trough_prob"]
    assert set(probs) == {"1", "3", "5"} and probs["1"] >= probs["3"] >= probs["5"]


def test_fitted_model_file_as_prior(tmp_path):
    """``"model": PATH`` takes a model YAML, such as the one ``phems fit`` writes."""
    from phems_clinical.pk.library import load_product
    from phems_clinical.pk.spec import save_model, with_values

    fitted = with_values(load_product("kovaltry"), thetas={"CL": 2.5})
    path = save_model(fitted, tmp_path / "model.yaml")
    req = {k: v for k, v in EXAMPLE.items() if k != "product"} | {"model": str(path)}
    r = run_dose(req).result
    assert r["model"]["source"] == "file" and r["model"]["path"] == str(path)
    assert r["product"] is None
    assert r["regimens"]  # vial sizes and class come from the file's metadata
    library = run_dose(EXAMPLE).result
    # a higher prior clearance pulls the estimate up
    assert r["clearance_dL_h"]["median"] > library["clearance_dL_h"]["median"]
    with pytest.raises(RequestError) as err:
        run_dose({**req, "model": str(tmp_path / "missing.yaml")})
    assert err.value.errors[0].field == "model"


def test_infinite_time_when_baseline_above_threshold():
    r = run_dose({**EXAMPLE, "baseline": {"value": 3.0, "unit": "IU/dL"}}).result
    assert r["time_to_threshold_h"]["1"]["median"] == "inf"
    assert not math.isinf(r["time_to_threshold_h"]["5"]["median"])


# ------------------------------------------------ fail closed


def _fitted(tmp_path, fitted):
    from phems_clinical.pk.library import load_product
    from phems_clinical.pk.spec import save_model

    model = load_product("kovaltry")
    meta = dict(model.metadata)
    if fitted is not None:
        meta["fitted"] = fitted
    path = save_model(
        dataclasses.replace(model, metadata=meta), tmp_path / "model.yaml"
    )
    return {k: v for k, v in EXAMPLE.items() if k != "product"} | {"model": str(path)}


@pytest.mark.parametrize(
    "fitted",
    [
        {"converged": False, "objective": None},
        {"objective": 12.5},
        {"converged": "yes"},
    ],
)
def test_model_from_a_failed_fit_is_refused(tmp_path, fitted):
    with pytest.raises(RequestError) as err:
        run_dose(_fitted(tmp_path, fitted))
    (e,) = err.value.errors
    assert e.field == "model" and "model.yaml" in e.message
    assert "converge" in e.message  # did not converge / fitted.converged: ...


def test_model_from_a_converged_fit_is_used(tmp_path):
    from phems_clinical.data.dosing_request import parse_request
    from phems_clinical.dosing.workflow import _resolve_model

    req = parse_request(_fitted(tmp_path, {"converged": True, "method": "focei"}))
    model, source = _resolve_model(req)[:2]
    assert source["source"] == "file"
    assert model.metadata["fitted"]["converged"] is True


def _fake_output(tag: str):
    from phems_clinical.app.dose import DoseOutput

    return DoseOutput(
        {"patient_id": tag}, b"\x89PNG" + tag.encode(), f"<html>{tag}</html>"
    )


def test_outputs_never_replace_a_report_silently(tmp_path):
    from phems_clinical.app.dose import write_dose_outputs
    from phems_clinical.outputs import OutputExistsError

    out = tmp_path / "out"
    write_dose_outputs(_fake_output("first"), out)
    (out / "notes.txt").write_text("clinician's notes")
    with pytest.raises(OutputExistsError, match="--out"):
        write_dose_outputs(_fake_output("second"), out)
    assert json.loads((out / "result.json").read_text())["patient_id"] == "first"
    paths = write_dose_outputs(_fake_output("second"), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    assert (out / "report.html").read_text() == "<html>second</html>"


def test_failed_write_leaves_the_old_report(tmp_path):
    from phems_clinical.app.dose import DoseOutput, write_dose_outputs

    out = tmp_path / "out"
    write_dose_outputs(_fake_output("first"), out)
    bad = DoseOutput({"x": math.nan}, b"png", "<html/>")  # NaN is no JSON
    with pytest.raises(ValueError):
        write_dose_outputs(bad, out, overwrite=True)
    assert (out / "report.html").read_text() == "<html>first</html>"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_refuses_the_previous_patients_folder(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.html").write_text("previous patient")
    rc = main(["dose", str(_write(tmp_path, EXAMPLE)), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "--overwrite" in err
    assert (out / "report.html").read_text() == "previous patient"


def test_levels_of_zero_not_marked_blq(capsys, tmp_path):
    req = {**EXAMPLE, "levels": [{**lv, "value": 0} for lv in EXAMPLE["levels"]]}
    err = _errors(capsys, tmp_path, req)
    assert "levels[0].value" in err and "levels[2].value" in err
    assert '"blq": true' in err


def test_level_far_outside_the_prior_predictive_range_is_refused():
    req = {
        **EXAMPLE,
        "levels": [
            EXAMPLE["levels"][0],
            {"time_h": 24.0, "value": 300.0, "unit": "IU/dL"},
        ],
    }
    with pytest.raises(RequestError) as err:
        run_dose(req)
    (e,) = err.value.errors
    assert e.field == "levels[1].value"
    assert "in IU/dL and in IU/mL" in e.message and "expects" in e.message


def test_level_just_outside_the_prior_predictive_range_is_a_warning():
    req = {
        **EXAMPLE,
        "levels": [
            {"time_h": 4.0, "value": 120.0, "unit": "IU/dL"},
            *EXAMPLE["levels"][1:],
        ],
    }
    r = run_dose(req).result
    (w,) = [w for w in r["warnings"] if w["field"] == "levels[0].value"]
    assert "outside the range the population model expects" in w["message"]


def test_seed_override_out_of_range():
    with pytest.raises(RequestError) as err:
        run_dose(EXAMPLE, seed=10**30)
    assert [e.field for e in err.value.errors] == ["seed"]


def test_figure_shortens_the_id_and_typesets_no_maths(example_run):
    from phems_clinical.app.dose import _for_display
    from phems_clinical.evaluation.report import curve_figure

    r = json.loads((example_run / "result.json").read_text())
    r["patient_id"] = "$\\foo$ " + "x" * 57
    with pytest.raises(ValueError):
        curve_figure(r)  # matplotlib reads $...$ as maths
    shown = _for_display(r)
    assert shown["patient_id"].startswith("\\$\\foo\\$ ")
    assert len(shown["patient_id"]) < 30 and shown["patient_id"].endswith("\u2026")
    assert curve_figure(shown).startswith(b"\x89PNG")


def test_non_finite_results_are_refused():
    from phems_clinical.dosing.workflow import _check_finite

    _check_finite({"a": [1.0, "inf"], "b": {"c": None}})
    with pytest.raises(RequestError, match=r"curve\.p50\[1\]"):
        _check_finite({"curve": {"p50": [1.0, math.nan]}})
