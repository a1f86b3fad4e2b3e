"""The dosing request fails closed: plausibility limits shared with the
other readers, a level of 0 not marked BLQ, duplicate keys, non-finite numbers,
over-long or invalid text and deep nesting are all refused by name."""

from __future__ import annotations

import copy
import json
import time

import pytest

from phems_clinical.data import plausibility
from phems_clinical.data.dosing_request import (
    RequestError,
    load_json,
    load_request_schema,
    parse_request,
)

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


def _req(**changes) -> dict:
    return copy.deepcopy(MINIMAL) | changes


def _errors(source) -> dict[str, str]:
    with pytest.raises(RequestError) as info:
        parse_request(source)
    return {e.field: e.message for e in info.value.errors}


def _prop(*path: str) -> dict:
    """The schema of a field: the first name is a ``$defs`` entry or a property."""
    root = load_request_schema()
    head, *rest = path
    node = root["$defs"].get(head) or root["properties"][head]
    for key in rest:
        node = node["properties"][key]
    return node


def _low(s: dict) -> float | None:
    return s.get("minimum", s.get("exclusiveMinimum"))


def _high(s: dict) -> float | None:
    return s.get("maximum", s.get("exclusiveMaximum"))


# ------------------------------------------------- schema and plausibility agree


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (("weight_kg",), "weight_kg"),
        (("age_y",), "age_y"),
        (("height_cm",), "height_cm"),
        (("time_h",), "time_h"),
        (("options", "seed"), "seed"),
    ],
)
def test_schema_bounds_are_the_plausibility_limits(path, name):
    schema = _prop(*path)
    assert (_low(schema), _high(schema)) == plausibility.limit(name).error


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (("infusion", "dose_IU"), "dose_IU"),
        (("infusion", "duration_h"), "infusion_duration_h"),
        (("level", "value"), "factor_level"),
    ],
)
def test_schema_bounds_lie_within_the_plausibility_limits(path, name):
    """Never looser than the shared limits (the tool may be stricter, e.g. it
    plans short infusions only). Level values and LLOQs depend on their unit:
    the parser checks them in IU/dL (tests below)."""
    schema, (lo, hi) = _prop(*path), plausibility.limit(name).error
    assert _low(schema) is not None and _low(schema) >= lo
    assert _high(schema) is None or _high(schema) <= hi


def test_threshold_and_target_bounds_are_factor_levels():
    opts = _prop("options")["properties"]
    hi = plausibility.limit("factor_level").error[1]
    assert opts["thresholds_IU_dL"]["items"]["maximum"] == hi
    assert opts["targets_IU_dL"]["items"]["maximum"] <= hi


# ------------------------------------------------------------ implausible values


def test_ten_million_iu_for_a_child_is_refused_by_name():
    errors = _errors(_req(infusions=[{"time_h": 0, "dose_IU": 1e7}]))
    assert (
        "infusions[0].dose_IU" in errors and "100000" in errors["infusions[0].dose_IU"]
    )


def test_dose_per_kg_is_checked_against_the_weight():
    # 20 000 IU is a plausible adult dose, but 800 IU/kg for 25 kg
    msg = _errors(_req(infusions=[{"time_h": 0, "dose_IU": 20000}]))[
        "infusions[0].dose_IU"
    ]
    assert "800 IU/kg" in msg and "weight_kg" in msg and "500 IU/kg" in msg
    # 300 IU/kg is accepted with a warning naming the infusion
    req = parse_request(_req(infusions=[{"time_h": 0, "dose_IU": 7500}]))
    assert [w.field for w in req.warnings] == ["infusions[0].dose_IU"]
    assert "300 IU/kg" in req.warnings[0].message


def test_times_beyond_a_lifetime_are_refused():
    level = {"time_h": 1e300, "value": 1, "unit": "IU/dL"}
    msg = _errors(_req(levels=[level]))["levels[0].time_h"]
    assert "1051920" in msg
    errors = _errors(
        _req(
            infusions=[{"datetime": "1800-01-01T08:00", "dose_IU": 1000}],
            levels=[{"datetime": "2024-01-01T08:00", "value": 1, "unit": "%"}],
        )
    )
    assert "plausible range" in errors["levels[0].datetime"]


def test_weight_below_the_plausible_minimum():
    assert ">= 0.2" in _errors(_req(weight_kg=0.05))["weight_kg"]


def test_a_level_of_zero_asks_for_blq():
    levels = [{"time_h": t, "value": 0, "unit": "IU/dL"} for t in (4, 24, 48)]
    errors = _errors(_req(levels=levels))
    assert set(errors) == {"levels[0].value", "levels[1].value", "levels[2].value"}
    assert all('"blq": true' in m and "lloq" in m for m in errors.values())
    ok = parse_request(
        _req(
            levels=[{"time_h": 4, "value": 0, "blq": True, "lloq": 1, "unit": "IU/dL"}]
        )
    )
    assert ok.levels[0].blq and ok.levels[0].lloq_IU_dL == 1.0
    # BLQ reported as 0 without the assay's LLOQ: the LLOQ is needed
    assert (
        "needs its lloq"
        in _errors(_req(levels=[{"time_h": 4, "value": 0, "blq": True, "unit": "%"}]))[
            "levels[0].lloq"
        ]
    )


def test_implausible_lloq():
    errors = _errors(
        _req(levels=[{"time_h": 4, "blq": True, "lloq": 0.00001, "unit": "IU/mL"}])
    )
    assert "lower limit of quantification" in errors["levels[0].lloq"]
    assert (
        "expected a number > 0"
        in _errors(_req(levels=[{"time_h": 4, "blq": True, "lloq": 0, "unit": "%"}]))[
            "levels[0].lloq"
        ]
    )


def test_unusually_high_level_and_baseline_are_warnings():
    req = parse_request(
        _req(
            levels=[{"time_h": 4, "value": 3.5, "unit": "IU/mL"}],
            baseline={"value": 350, "unit": "%"},
        )
    )
    assert [w.field for w in req.warnings] == ["levels[0].value", "baseline.value"]
    assert "3.5 IU/mL" in req.warnings[0].message


def test_seed_beyond_64_bits():
    assert "options.seed" in _errors(_req(options={"seed": 2**63}))


# ------------------------------------------------------------------- JSON itself


def test_duplicate_keys_are_refused_by_path():
    text = (
        '{"product": "advate", "weight_kg": 25, "weight_kg": 2.5, "age_y": 8, '
        '"infusions": [{"time_h": 0, "dose_IU": 1000}], "levels": ['
        '{"time_h": 4, "value": 40, "value": 4, "unit": "%"}]}'
    )
    errors = _errors(text)
    assert set(errors) == {"weight_kg", "levels[0].value"}
    assert "duplicate field 'weight_kg'" in errors["weight_kg"]


@pytest.mark.parametrize(
    ("token", "got"),
    [
        ("NaN", "nan"),
        ("Infinity", "inf"),
        ("-Infinity", "-inf"),
        ("1e999", "inf"),
        ("9" * 5000, "inf"),
    ],
)
def test_non_finite_tokens_are_refused_by_field(token, got):
    text = json.dumps(_req(weight_kg=1.0)).replace(
        '"weight_kg": 1.0', f'"weight_kg": {token}'
    )
    assert _errors(text) == {"weight_kg": f"expected a finite number, got {got}"}


def test_deep_nesting_is_refused_without_recursion_error():
    assert set(_errors("[" * 100_000)) == {""}
    deep = _req(options={"targets_IU_dL": [[[[[[1]]]]]]})
    assert _errors(deep) == {
        "options.targets_IU_dL[0][0][0][0]": (
            "nested too deeply: a dosing request is at most 6 levels deep"
        )
    }
    nested = {}
    for _ in range(5000):  # deeper than the interpreter's recursion limit
        nested = {"a": nested}
    assert _errors(_req(options=nested))


def test_long_text_is_refused_quickly_and_not_echoed():
    start = time.perf_counter()
    errors = _errors(_req(patient_id="x" * 200_000))
    assert time.perf_counter() - start < 1.0
    assert "200000 characters" in errors["patient_id"]
    assert len(errors["patient_id"]) < 200
    msg = _errors(_req(patient_id="x" * 65))["patient_id"]
    assert msg == (
        "expected at most 64 characters (patient identifier: text "
        "without control characters, or a whole number), got 65"
    )
    long_key = _errors({**_req(), "k" * 10_000: 1})
    assert all(len(m) < 200 for m in long_key.values())
    assert "10000 characters" in long_key[""]


@pytest.mark.parametrize("pid", ["a\x00b", "line\nbreak", "\x1b[31m"])
def test_control_characters_in_patient_id(pid):
    assert "control characters" in _errors(_req(patient_id=pid))["patient_id"]


def test_lone_surrogates_are_refused():
    text = json.dumps(_req(patient_id="P")).replace('"P"', '"\\ud800"')
    assert "not valid Unicode" in _errors(text)["patient_id"]
    assert "not valid Unicode" in _errors({**_req(), "\ud800": 1})[""]


def test_huge_whole_number_patient_id():
    assert "patient_id" in _errors(_req(patient_id=10**40))


def test_long_lists_are_refused_by_name():
    many = [{"time_h": 1 + i, "value": 1, "unit": "%"} for i in range(101)]
    assert "at most 100 entries" in _errors(_req(levels=many))["levels"]
    assert "at most 1000" in _errors(_req(levels=[1] * 5000))["levels"]


def test_values_that_are_not_json_are_refused():
    errors = _errors(_req(patient_id={1, 2}))
    assert "got a set" in errors["patient_id"]
    assert "field names must be text" in _errors({**_req(), 3: "x"})[""]


def test_at_most_fifty_problems_are_listed():
    levels = [{"time_h": 4, "value": "x", "unit": "%"}] * 80
    with pytest.raises(RequestError) as info:
        parse_request(_req(levels=levels))
    errors = info.value.errors
    assert len(errors) == 51 and "30 more problem(s)" in errors[-1].message


def test_load_json_reports_bad_text_as_request_errors():
    for text in (b"\xff\xfe\x00", "{", "[" * 50_000):
        with pytest.raises(RequestError):
            load_json(text)


def test_bytes_must_be_utf8():
    text = json.dumps(_req(patient_id="Jos\u00e9"), ensure_ascii=False)
    assert parse_request(text.encode("utf-8-sig")).patient_id == "Jos\u00e9"
    for raw in (text.encode("utf-16"), text.encode("latin-1"), b"\xff\xfe\xfa{"):
        assert "not UTF-8" in _errors(raw)[""]
