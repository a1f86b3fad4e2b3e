"""Dosing request as a clinic writes it: weight in lb, day-first date-times, the
assay of the levels, the acknowledgement of unverified model sections and the
regimen-designer options."""

import datetime as dt

import pytest

from phems_clinical.data.dosing_request import (
    LB_KG,
    RequestError,
    parse_datetime,
    parse_request,
)

BASE = {
    "product": "kovaltry",
    "weight_kg": 25.0,
    "age_y": 8.0,
    "infusions": [{"time_h": 0.0, "dose_IU": 1000, "duration_h": 0.17}],
    "levels": [{"time_h": 4.0, "value": 40.2, "unit": "IU/dL"}],
}


def _request(**changes):
    out = dict(BASE)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _errors(obj):
    with pytest.raises(RequestError) as info:
        parse_request(obj)
    return {e.field: e.message for e in info.value.errors}


def test_weight_in_pounds_is_converted_exactly():
    # 1 lb = 0.45359237 kg exactly (international yard and pound agreement, 1959)
    assert LB_KG == 0.45359237
    req = parse_request(_request(weight_kg=None, weight_lb=55.0))
    assert req.weight_kg == 55.0 * 0.45359237 and req.weight_unit == "lb"
    assert req.covariates["WT"] == req.weight_kg
    assert parse_request(BASE).weight_unit == "kg"


def test_weight_in_both_or_neither_unit_is_refused_by_name():
    assert "not both" in _errors(_request(weight_lb=55.0))["weight_lb"]
    msg = _errors(_request(weight_kg=None))["weight_kg"]
    assert "weight_kg (body weight in kg) or weight_lb (body weight in lb)" in msg
    assert "<= 551" in _errors(_request(weight_kg=None, weight_lb=600))["weight_lb"]


@pytest.mark.parametrize(
    "text",
    [
        "02/03/2026 08:30",
        "02.03.2026 08:30",
        "02-03-2026 08:30",
        "2.3.2026 8:30",
        "02/03/2026 08:30:00",
        "2026-03-02T08:30",
    ],
)
def test_clinic_date_formats_are_day_first(text):
    assert parse_datetime(text) == dt.datetime(2026, 3, 2, 8, 30)


def test_clinic_dates_give_hours_since_the_first_infusion():
    req = parse_request(
        _request(
            infusions=[{"datetime": "02/03/2026 08:00", "dose_IU": 1000}],
            levels=[
                {"datetime": "02.03.2026 12:30", "value": 40, "unit": "%"},
                {"datetime": "03-03-2026 08:00", "value": 10, "unit": "%"},
            ],
        )
    )
    assert [lv.time_h for lv in req.levels] == [4.5, 24.0]
    assert req.time_origin == "2026-03-02T08:00:00"


@pytest.mark.parametrize(
    "text, phrase",
    [
        ("31/02/2026 08:00", "day is out of range for month"),
        ("13/13/2026 08:00", "month must be in 1..12"),
        ("01/03/2026 25:00", "hour must be in 0..23"),
    ],
)
def test_impossible_clinic_date_named_by_field(text, phrase):
    errors = _errors(
        _request(
            infusions=[{"datetime": "01/02/2026 08:00", "dose_IU": 1000}],
            levels=[{"datetime": text, "value": 4, "unit": "%"}],
        )
    )
    assert list(errors) == ["levels[0].datetime"]
    assert (
        phrase in errors["levels[0].datetime"]
        and repr(text) in errors["levels[0].datetime"]
    )


@pytest.mark.parametrize(
    "text", ["2026/03/01 08:00", "01/03/26 08:00", "01/03-2026 08:00", "01/03/2026"]
)
def test_other_date_forms_are_refused(text):
    errors = _errors(
        _request(infusions=[{"datetime": text, "dose_IU": 1000}], levels=[])
    )
    assert "day-first 01/03/2024 08:30" in errors["infusions[0].datetime"]


def test_assay_of_the_levels_and_per_level_override():
    req = parse_request(
        _request(
            assay="OSA",
            levels=[
                {"time_h": 4.0, "value": 40.2, "unit": "IU/dL"},
                {
                    "time_h": 24.0,
                    "value": 10.1,
                    "unit": "IU/dL",
                    "assay": "chromogenic",
                },
            ],
        )
    )
    assert req.assay == "one-stage"
    assert [lv.assay for lv in req.levels] == [None, "chromogenic"]
    assert parse_request(BASE).assay is None
    assert (
        "expected one of one-stage, chromogenic"
        in _errors(
            _request(levels=[{"time_h": 4.0, "value": 4, "unit": "%", "assay": "aPTT"}])
        )["levels[0].assay"]
    )


def test_acknowledgement_is_a_boolean():
    assert parse_request(BASE).acknowledge_unverified is False
    assert parse_request(_request(acknowledge_unverified=True)).acknowledge_unverified
    assert (
        "expected true or false"
        in _errors(_request(acknowledge_unverified="yes"))["acknowledge_unverified"]
    )


def test_designer_options():
    req = parse_request(
        _request(
            options={
                "schedules": ["Mon/Wed/Fri", " every 48 h "],
                "max_dose_IU_kg": 80,
                "peak_flag_IU_dL": 120,
                "evaluate": [
                    {"schedule": "Mon/Wed/Fri", "dose_IU": 1000},
                    {"schedule": "every 72 h", "dose_IU_kg": 40},
                ],
            }
        )
    )
    o = req.options
    assert o.schedules == ("Mon/Wed/Fri", "every 48 h")
    assert (o.max_dose_IU_kg, o.peak_flag_IU_dL) == (80.0, 120.0)
    assert [(e.schedule, e.dose_IU, e.dose_IU_kg, e.index) for e in o.evaluate] == [
        ("Mon/Wed/Fri", 1000.0, None, 0),
        ("every 72 h", None, 40.0, 1),
    ]
    d = parse_request(BASE).options
    assert (d.schedules, d.max_dose_IU_kg, d.peak_flag_IU_dL, d.evaluate) == (
        None,
        100.0,
        150.0,
        (),
    )


@pytest.mark.parametrize(
    "options, field, phrase",
    [
        (
            {"evaluate": [{"schedule": "daily"}]},
            "options.evaluate[0].dose_IU",
            "required field missing: dose_IU",
        ),
        (
            {"evaluate": [{"schedule": "daily", "dose_IU": 500, "dose_IU_kg": 20}]},
            "options.evaluate[0]",
            "give either dose_IU or dose_IU_kg, not both",
        ),
        (
            {"evaluate": [{"schedule": "daily", "dose_IU": 50000}]},
            "options.evaluate[0].dose_IU",
            "IU/kg",
        ),
        ({"max_dose_IU_kg": 0}, "options.max_dose_IU_kg", "> 0"),
        ({"schedules": []}, "options.schedules", "at least 1"),
        ({"schedules": [""]}, "options.schedules[0]", "non-empty"),
    ],
)
def test_bad_designer_options_named(options, field, phrase):
    errors = _errors(_request(options=options))
    assert field in errors and phrase in errors[field], errors
