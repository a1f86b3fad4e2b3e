"""Tests for the dosing-request parser.

The minimal request is accepted as written; every bad input is reported with the
field path and a plain-language message, all problems at once.
"""

from __future__ import annotations

import copy
import json
import math

import jsonschema
import pytest

from phems_clinical.data import (
    DosingOptions,
    DosingRequest,
    FieldError,
    Infusion,
    Level,
    RequestError,
    parse_request,
)
from phems_clinical.data.dosing_request import load_request_schema
from phems_clinical.resources import schemas_dir

MINIMAL = {
    "product": "advate",
    "weight_kg": 25.0,
    "age_y": 8.0,
    "infusions": [{"time_h": 0.0, "dose_IU": 1000, "duration_h": 0.17}],
    "levels": [
        {"time_h": 4.0, "value": 40.2, "unit": "IU/dL"},
        {"time_h": 24.0, "value": 10.1, "unit": "IU/dL"},
        {"time_h": 48.0, "value": 1.5, "unit": "IU/dL"},
    ],
}


def _request(**changes) -> dict:
    req = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        if value is None:
            req.pop(key)
        else:
            req[key] = value
    return req


def _errors(source) -> list[FieldError]:
    with pytest.raises(RequestError) as info:
        parse_request(source)
    err = info.value
    assert str(err) == "; ".join(f"{e.field}: {e.message}" for e in err.errors)
    return err.errors


def _fails(source, field: str, *phrases: str) -> str:
    """Assert an error on ``field`` whose message contains every phrase."""
    errors = _errors(source)
    messages = [e.message for e in errors if e.field == field]
    assert messages, f"no error on {field!r}: {errors}"
    assert any(all(p in m for p in phrases) for m in messages), messages
    return messages[0]


# ------------------------------------------------------------------ accepted


def test_schema_file_is_valid_draft_2020_12():
    with open(schemas_dir() / "dosing_request.schema.json", encoding="utf-8") as fh:
        schema = json.load(fh)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == load_request_schema()
    assert schema["additionalProperties"] is False
    jsonschema.validate(MINIMAL, schema, cls=jsonschema.Draft202012Validator)


def test_minimal_request_as_written():
    text = """{"product": "advate", "weight_kg": 25.0, "age_y": 8.0,
 "infusions": [{"time_h": 0.0, "dose_IU": 1000, "duration_h": 0.17}],
 "levels": [{"time_h": 4.0, "value": 40.2, "unit": "IU/dL"},
            {"time_h": 24.0, "value": 10.1, "unit": "IU/dL"},
            {"time_h": 48.0, "value": 1.5, "unit": "IU/dL"}]}"""
    for source in (MINIMAL, text, text.encode()):
        req = parse_request(source)
        assert isinstance(req, DosingRequest)
        assert (req.product, req.model_path, req.patient_id) == ("advate", None, None)
        assert (req.weight_kg, req.age_y) == (25.0, 8.0)
        assert req.covariates == {"WT": 25.0, "AGE": 8.0}
        assert req.infusions == (Infusion(0.0, 1000.0, 0.17, 0),)
        assert [lv[:3] + (lv.index, lv.unit) for lv in req.levels] == [
            (4.0, 40.2, False, 0, "IU/dL"),
            (24.0, 10.1, False, 1, "IU/dL"),
            (48.0, 1.5, False, 2, "IU/dL"),
        ]
        assert req.warnings == ()
        assert all(
            isinstance(lv, Level) and math.isnan(lv.lloq_IU_dL) for lv in req.levels
        )
        assert req.baseline_IU_dL is None and req.time_origin is None
        assert req.options == DosingOptions()
        assert req.options.intervals_h is None


def test_bolus_by_default_and_zero_levels_allowed():
    req = parse_request(_request(infusions=[{"time_h": 0, "dose_IU": 500}], levels=[]))
    assert req.infusions == (Infusion(0.0, 500.0, 0.0, 0),)
    assert req.levels == ()
    assert parse_request(_request(levels=None)).levels == ()


def test_every_optional_field():
    req = parse_request(
        _request(
            product=None,
            model="fits/my_model.yaml",
            patient_id=1234,
            height_cm=128.0,
            lean_body_weight_kg=20.5,
            fat_free_mass_kg=21.0,
            vwf_IU_dL=95.0,
            hematocrit_pct=38.0,
            blood_group="O",
            assay="chromogenic",
            sex="female",
            baseline={"value": 0.01, "unit": "IU/mL"},
            options={
                "trough_probability": 0.8,
                "targets_IU_dL": [1, 2],
                "intervals_h": [48, 72],
                "thresholds_IU_dL": [1, 3],
                "standard_dose_IU_kg": 40,
                "n_draws": 1000.0,
                "seed": 7,
            },
        )
    )
    assert (req.product, req.model_path, req.patient_id) == (
        None,
        "fits/my_model.yaml",
        "1234",
    )
    assert req.covariates == {
        "WT": 25.0,
        "AGE": 8.0,
        "HT": 128.0,
        "LBW": 20.5,
        "FFM": 21.0,
        "VWF": 95.0,
        "HCT": 38.0,
        "BGO": 1.0,
        "ASSAY": 0.0,
        "SEX": 1.0,
    }
    assert req.baseline_IU_dL == pytest.approx(1.0)
    assert req.options == DosingOptions(
        0.8, (1.0, 2.0), (48.0, 72.0), (1.0, 3.0), 40.0, 1000, 7
    )
    assert isinstance(req.options.n_draws, int)


@pytest.mark.parametrize(
    ("field", "value", "name", "code"),
    [
        ("blood_group", "A", "BGO", 0),
        ("blood_group", "AB", "BGO", 0),
        ("assay", "one-stage", "ASSAY", 1),
        ("assay", "OSA", "ASSAY", 1),
        ("assay", "CSA", "ASSAY", 0),
        ("sex", "male", "SEX", 0),
    ],
)
def test_coded_covariates(field, value, name, code):
    assert parse_request(_request(**{field: value})).covariates[name] == code


def test_sorted_by_time_keeping_original_index():
    req = parse_request(
        _request(
            infusions=[{"time_h": 24, "dose_IU": 500}, {"time_h": 0, "dose_IU": 1000}],
            levels=[
                {"time_h": 30, "value": 20, "unit": "%"},
                {"time_h": 4, "value": 40, "unit": "%"},
            ],
        )
    )
    assert [(i.time_h, i.index) for i in req.infusions] == [(0.0, 1), (24.0, 0)]
    assert [(lv.time_h, lv.index) for lv in req.levels] == [(4.0, 1), (30.0, 0)]


def test_iu_ml_converted_and_percent_equals_iu_dl():
    req = parse_request(
        _request(
            levels=[
                {"time_h": 4, "value": 0.402, "unit": "IU/mL"},
                {"time_h": 24, "value": 10.1, "unit": "%"},
                {"time_h": 48, "blq": True, "lloq": 0.01, "unit": "IU/mL"},
            ]
        )
    )
    values = [lv.value_IU_dL for lv in req.levels]
    assert values[:2] == pytest.approx([40.2, 10.1])
    assert math.isnan(values[2])
    assert req.levels[2].blq and req.levels[2].lloq_IU_dL == pytest.approx(1.0)


def test_blq_with_value_but_no_lloq_uses_value_as_lloq():
    req = parse_request(
        _request(
            levels=[
                {"time_h": 72, "blq": True, "value": 0.5, "unit": "IU/dL"},
                {"time_h": 96, "blq": True, "value": 0.5, "lloq": 1.0, "unit": "IU/dL"},
                {"time_h": 4, "value": 40, "lloq": 1.0, "unit": "IU/dL"},
            ]
        )
    )
    assert [(lv.value_IU_dL, lv.lloq_IU_dL, lv.blq) for lv in req.levels] == [
        (40.0, 1.0, False),
        (0.5, 0.5, True),
        (0.5, 1.0, True),
    ]


def test_datetimes_give_hours_since_earliest_infusion():
    req = parse_request(
        _request(
            infusions=[
                {"datetime": "2024-03-02T08:00", "dose_IU": 500},
                {"datetime": "2024-03-01T08:00", "dose_IU": 1000, "duration_h": 0.25},
            ],
            levels=[
                {"datetime": "2024-03-01T12:30", "value": 40.2, "unit": "IU/dL"},
                {"datetime": "2024-03-03 08:00", "value": 10.1, "unit": "IU/dL"},
            ],
        )
    )
    assert req.time_origin == "2024-03-01T08:00:00"
    assert [(i.time_h, i.index) for i in req.infusions] == [(0.0, 1), (24.0, 0)]
    assert [lv.time_h for lv in req.levels] == [4.5, 48.0]


def test_timezone_aware_datetimes():
    req = parse_request(
        _request(
            infusions=[{"datetime": "2024-03-31T00:30+01:00", "dose_IU": 1000}],
            levels=[
                {"datetime": "2024-03-31T04:30+02:00", "value": 40, "unit": "%"},
                {"datetime": "2024-03-31T00:30Z", "value": 30, "unit": "%"},
            ],
        )
    )
    assert req.time_origin == "2024-03-31T00:30:00+01:00"
    assert [lv.time_h for lv in req.levels] == [1.0, 3.0]


# ------------------------------------------------------------------ rejected


def test_not_json():
    [err] = _errors('{"product": "advate", "weight_kg": 25,\n "age_y": }')
    assert err.field == ""
    assert "not valid JSON" in err.message and "line 2, column 11" in err.message
    [err] = _errors(b"\xff\xfe\xfd")
    assert err.field == "" and "not valid JSON" in err.message


@pytest.mark.parametrize(
    ("source", "got"),
    [("[1, 2]", "a list"), ('"advate"', "'advate'"), ("null", "null"), (3, "3")],
)
def test_json_value_that_is_not_an_object(source, got):
    [err] = _errors(source)
    assert err.field == ""
    assert err.message == (
        f"expected a JSON object {{...}} with the request fields, got {got}"
    )


def test_unknown_field_suggests_the_right_name():
    msg = _fails(_request(weight_kg=None, wieght_kg=25.0), "wieght_kg")
    assert msg == "unknown field 'wieght_kg' (did you mean 'weight_kg'?)"
    _fails(
        _request(weight_kg=None, wieght_kg=25.0),
        "weight_kg",
        "required field missing: weight_kg (body weight in kg) or weight_lb",
    )
    _fails(
        _request(levels=[{"time_h": 4, "value": 4, "untis": "%", "unit": "%"}]),
        "levels[0].untis",
        "did you mean 'unit'?",
    )
    _fails(_request(options={"Seed": 1}), "options.Seed", "did you mean 'seed'?")
    _fails(_request(colour="blue"), "colour", "unknown field 'colour'", "allowed:")


@pytest.mark.parametrize(
    ("changes", "field", "phrases"),
    [
        (
            {"weight_kg": "abc"},
            "weight_kg",
            ["expected a number", "body weight in kg", "got 'abc'"],
        ),
        (
            {"weight_kg": -3},
            "weight_kg",
            ["expected a number >= 0.2 and <= 250", "kg", "got -3"],
        ),
        ({"weight_kg": 300}, "weight_kg", ["<= 250", "got 300"]),
        ({"weight_kg": True}, "weight_kg", ["expected a number", "got true"]),
        (
            {"weight_kg": None},
            "weight_kg",
            ["required field missing: weight_kg (body weight in kg)"],
        ),
        ({"age_y": None}, "age_y", ["required field missing: age in years"]),
        ({"age_y": -1}, "age_y", [">= 0 and <= 120", "age in years"]),
        ({"age_y": 121}, "age_y", ["<= 120"]),
        ({"height_cm": 10}, "height_cm", [">= 30", "height in cm"]),
        ({"hematocrit_pct": 80}, "hematocrit_pct", ["<= 70", "haematocrit in %"]),
        ({"vwf_IU_dL": "high"}, "vwf_IU_dL", ["expected a number", "IU/dL"]),
        ({"blood_group": "o"}, "blood_group", ["expected one of O, A, B, AB"]),
        (
            {"assay": "clotting"},
            "assay",
            ["expected one of one-stage, chromogenic, OSA, CSA"],
        ),
        ({"sex": "M"}, "sex", ["expected one of male, female", "got 'M'"]),
        ({"patient_id": 1.5}, "patient_id", ["expected text or a whole number"]),
        ({"product": None}, "product", ["required field missing: product", "or model"]),
        ({"model": "fit.yaml"}, "model", ["give either product or model, not both"]),
        (
            {"weight_lb": 55},
            "weight_lb",
            ["give either weight_kg or weight_lb, not both"],
        ),
        ({"product": ""}, "product", ["expected non-empty text"]),
        (
            {"infusions": None},
            "infusions",
            ["required field missing: list of infusions"],
        ),
        ({"infusions": []}, "infusions", ["at least 1 entry", "got an empty list"]),
        (
            {"infusions": [{"time_h": 0}]},
            "infusions[0].dose_IU",
            ["required field missing: dose in IU"],
        ),
        (
            {"infusions": [{"time_h": 0, "dose_IU": 0}]},
            "infusions[0].dose_IU",
            ["expected a number > 0 and <= 100000 (dose in IU)", "got 0"],
        ),
        (
            {"infusions": [{"time_h": 0, "dose_IU": 500, "duration_h": 24}]},
            "infusions[0].duration_h",
            [">= 0 and < 24", "infusion duration in h"],
        ),
        (
            {"infusions": [{"time_h": 0, "dose_IU": 500, "duration_h": -1}]},
            "infusions[0].duration_h",
            [">= 0 and < 24"],
        ),
        (
            {"infusions": [{"time_h": -2, "dose_IU": 500}]},
            "infusions[0].time_h",
            ["expected a number >= 0", "time in h"],
        ),
        (
            {"infusions": [{"dose_IU": 500}]},
            "infusions[0].time_h",
            ["required field missing: time_h", "or datetime"],
        ),
        (
            {
                "infusions": [
                    {"time_h": 0, "datetime": "2024-03-01T08:00", "dose_IU": 9}
                ]
            },
            "infusions[0]",
            ["give either time_h or datetime, not both"],
        ),
        ({"infusions": "1000 IU"}, "infusions", ["expected a list", "got '1000 IU'"]),
        (
            {"levels": [{"time_h": 4, "value": 40, "unit": "mg/L"}]},
            "levels[0].unit",
            ["expected one of IU/dL, IU/mL, %", "got 'mg/L'"],
        ),
        (
            {"levels": [{"time_h": 4, "value": 40}]},
            "levels[0].unit",
            ["required field missing: unit of the factor level"],
        ),
        (
            {"levels": [{"time_h": 4, "value": -1, "unit": "%"}]},
            "levels[0].value",
            ["expected a number >= 0", "got -1"],
        ),
        (
            {"levels": [{"time_h": 4, "value": "40", "unit": "%"}]},
            "levels[0].value",
            ["expected a number", "got '40'"],
        ),
        (
            {"levels": [{"time_h": 4, "value": 4, "unit": "%", "blq": "yes"}]},
            "levels[0].blq",
            ["expected true or false"],
        ),
        (
            {"levels": [{"datetime": "yesterday", "value": 4, "unit": "%"}]},
            "levels[0].datetime",
            ["expected an ISO 8601 date-time", "got 'yesterday'"],
        ),
        (
            {"levels": [{"datetime": "2024-03-01", "value": 4, "unit": "%"}]},
            "levels[0].datetime",
            ["ISO 8601 date-time with a time of day"],
        ),
        ({"baseline": {"value": 1}}, "baseline.unit", ["required field missing"]),
        (
            {"baseline": {"value": 1, "unit": "%", "when": 0}},
            "baseline.when",
            ["unknown field 'when'"],
        ),
        (
            {"options": {"trough_probability": 0.5}},
            "options.trough_probability",
            ["> 0.5 and < 1"],
        ),
        (
            {"options": {"trough_probability": 1}},
            "options.trough_probability",
            ["> 0.5 and < 1"],
        ),
        (
            {"options": {"targets_IU_dL": [1, 0]}},
            "options.targets_IU_dL[1]",
            ["expected a number > 0 and <= 100 (trough target in IU/dL)"],
        ),
        ({"options": {"targets_IU_dL": []}}, "options.targets_IU_dL", ["at least 1"]),
        (
            {"options": {"intervals_h": [24, 400]}},
            "options.intervals_h[1]",
            ["> 0 and <= 336", "dosing interval in h"],
        ),
        (
            {"options": {"thresholds_IU_dL": [-1]}},
            "options.thresholds_IU_dL[0]",
            ["> 0"],
        ),
        (
            {"options": {"standard_dose_IU_kg": 250}},
            "options.standard_dose_IU_kg",
            ["> 0 and <= 200", "IU/kg"],
        ),
        (
            {"options": {"n_draws": 100}},
            "options.n_draws",
            ["expected a whole number >= 500 and <= 20000"],
        ),
        (
            {"options": {"n_draws": 1000.5}},
            "options.n_draws",
            ["expected a whole number >= 500 and <= 20000"],
        ),
        ({"options": {"seed": -1}}, "options.seed", ["expected a whole number >= 0"]),
        ({"options": 3}, "options", ["expected an object (forecast options)"]),
    ],
)
def test_schema_errors_name_field_and_expectation(changes, field, phrases):
    msg = _fails(_request(**changes), field, *phrases)
    for jargon in (
        "is not of type",
        "is not valid under",
        "additionalProperties",
        "is a required property",
        "{'",
    ):
        assert jargon not in msg


def test_one_message_per_field():
    errors = _errors(_request(options={"n_draws": 1000.5}))
    assert len(errors) == 1


def test_non_finite_numbers():
    _fails(
        '{"product": "advate", "weight_kg": NaN, "age_y": 8, "infusions": '
        '[{"time_h": 0, "dose_IU": 1000}]}',
        "weight_kg",
        "expected a finite number, got nan",
    )
    _fails(
        _request(levels=[{"time_h": 4, "value": float("nan"), "unit": "%"}]),
        "levels[0].value",
        "finite",
    )


def test_many_schema_errors_at_once():
    errors = _errors(
        {
            "product": "advate",
            "model": "x.yaml",
            "weight_kg": "25 kg",
            "infusions": [{"time_h": 0, "dose_IU": -5}],
            "levels": [{"time_h": 4, "value": 40, "unit": "IU"}],
            "wieght": 3,
        }
    )
    assert {e.field for e in errors} == {
        "model",
        "weight_kg",
        "age_y",
        "infusions[0].dose_IU",
        "levels[0].unit",
        "wieght",
    }


# ------------------------------------------------------------------ meaning


def test_level_at_or_before_first_infusion():
    req = _request(
        infusions=[{"time_h": 2, "dose_IU": 1000}, {"time_h": 30, "dose_IU": 1000}],
        levels=[
            {"time_h": 4, "value": 40, "unit": "%"},
            {"time_h": 2, "value": 1, "unit": "%"},
            {"time_h": 1, "value": 1, "unit": "%"},
            {"time_h": 28, "value": 8, "unit": "%"},
        ],
    )
    errors = _errors(req)
    assert [e.field for e in errors] == ["levels[1].time_h", "levels[2].time_h"]
    # a pre-infusion trough is left over from earlier infusions: it belongs to
    # them, never in baseline (which would add it to every prediction)
    assert errors[0].message == (
        "level at 2 h is not after the first infusion (at 2 h): a pre-infusion "
        "(trough) level is what remains of earlier infusions, so enter the earlier "
        "infusion(s) (time and dose) that this level follows; only a true "
        'endogenous level (mild/moderate haemophilia) belongs in "baseline"'
    )
    _fails(
        _request(
            infusions=[{"datetime": "2024-03-01T08:00", "dose_IU": 1000}],
            levels=[{"datetime": "2024-03-01T07:00", "value": 1, "unit": "%"}],
        ),
        "levels[0].datetime",
        "level at 2024-03-01T07:00",
        "(at 2024-03-01T08:00)",
        "enter the earlier infusion(s) (time and dose)",
    )


def test_mixed_time_styles():
    req = _request(infusions=[{"datetime": "2024-03-01T08:00", "dose_IU": 1000}])
    msg = _fails(req, "levels[0].time_h", "mixes time_h and datetime")
    assert "one style" in msg
    assert len(_errors(req)) == 3


def test_naive_and_aware_datetimes_do_not_mix():
    errors = _errors(
        _request(
            infusions=[{"datetime": "2024-03-01T08:00+01:00", "dose_IU": 1000}],
            levels=[
                {"datetime": "2024-03-01T12:00+01:00", "value": 40, "unit": "%"},
                {"datetime": "2024-03-02T08:00", "value": 10, "unit": "%"},
            ],
        )
    )
    assert [e.field for e in errors] == ["levels[1].datetime"]
    assert "has no time zone" in errors[0].message
    assert "infusions[0].datetime does" in errors[0].message
    _fails(
        _request(
            infusions=[{"datetime": "2024-03-01T08:00", "dose_IU": 1000}],
            levels=[{"datetime": "2024-03-01T12:00Z", "value": 40, "unit": "%"}],
        ),
        "levels[0].datetime",
        "has a time zone",
        "does not",
    )


def test_impossible_datetime():
    _fails(
        _request(
            infusions=[{"datetime": "2024-02-30T08:00", "dose_IU": 1000}], levels=[]
        ),
        "infusions[0].datetime",
        "not a valid date-time",
        "'2024-02-30T08:00'",
    )


@pytest.mark.parametrize(
    ("level", "field", "phrases"),
    [
        (
            {"value": 40.2, "unit": "IU/mL"},
            "levels[0].value",
            [
                "40.2 IU/mL = 4020 IU/dL is implausible for a factor level; "
                "was the unit IU/dL?"
            ],
        ),
        (
            {"value": 600, "unit": "IU/dL"},
            "levels[0].value",
            ["600 IU/dL is implausible", "was the unit IU/mL?"],
        ),
        ({"value": 501, "unit": "%"}, "levels[0].value", ["501 % is implausible"]),
        (
            {"blq": True, "lloq": 10, "unit": "IU/mL"},
            "levels[0].lloq",
            ["1000 IU/dL is implausible"],
        ),
        (
            {"blq": True, "unit": "IU/dL"},
            "levels[0].lloq",
            ["marked blq needs its lloq", "IU/dL"],
        ),
        (
            {"value": 0.5, "lloq": 1, "unit": "IU/dL"},
            "levels[0].value",
            ["value 0.5 IU/dL is below its LLOQ", "mark it blq"],
        ),
        (
            {"value": 0.5, "lloq": 1, "blq": False, "unit": "IU/dL"},
            "levels[0].value",
            ["below its LLOQ (1 IU/dL): mark it blq"],
        ),
        (
            {"blq": True, "value": 3, "lloq": 2, "unit": "IU/dL"},
            "levels[0].value",
            ["marked blq but the value 3 IU/dL is above its lloq 2 IU/dL"],
        ),
        (
            {"lloq": 1, "unit": "IU/dL"},
            "levels[0].value",
            ["required field missing", '"blq": true'],
        ),
    ],
)
def test_level_value_checks(level, field, phrases):
    _fails(_request(levels=[{"time_h": 4, **level}]), field, *phrases)


def test_implausible_upper_bounds_are_inclusive():
    req = parse_request(
        _request(
            levels=[
                {"time_h": 4, "value": 5, "unit": "IU/mL"},
                {"time_h": 5, "value": 500, "unit": "%"},
            ]
        )
    )
    assert [lv.value_IU_dL for lv in req.levels] == [500.0, 500.0]


def test_implausible_baseline():
    _fails(
        _request(baseline={"value": 6, "unit": "IU/mL"}),
        "baseline.value",
        "6 IU/mL = 600 IU/dL is implausible",
        "was the unit IU/dL?",
    )


def test_many_meaning_errors_at_once():
    errors = _errors(
        _request(
            levels=[
                {"time_h": 0, "value": 40, "unit": "%"},
                {"time_h": 4, "value": 40.2, "unit": "IU/mL"},
                {"time_h": 24, "blq": True, "unit": "%"},
            ],
            baseline={"value": 900, "unit": "%"},
        )
    )
    assert [e.field for e in errors] == [
        "levels[0].time_h",
        "levels[1].value",
        "levels[2].lloq",
        "baseline.value",
    ]
