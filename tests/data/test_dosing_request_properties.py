"""Property-based tests of the dosing-request parser.

Whatever the input (random JSON structures, random requests built from the real
field names, valid requests perturbed: a field removed, a value replaced by an odd
one, a key given twice), :func:`parse_request` gives either a request whose numbers
are all finite or a :class:`RequestError` whose every entry names a field of the
input or of the schema (a missing one); never another exception. The example
budget is the "ci" profile of ``tests/conftest.py``.
"""

from __future__ import annotations

import copy
import json
import math

from hypothesis import given
from hypothesis import strategies as st

from phems_clinical.data.dosing_request import (
    DosingRequest,
    RequestError,
    load_request_schema,
    parse_request,
)

VALID = {
    "product": "advate",
    "patient_id": "P-17",
    "weight_kg": 25.0,
    "age_y": 8.0,
    "height_cm": 128.0,
    "blood_group": "O",
    "sex": "male",
    "infusions": [
        {"time_h": 0.0, "dose_IU": 1000, "duration_h": 0.17},
        {"time_h": 48.0, "dose_IU": 1000},
    ],
    "levels": [
        {"time_h": 4.0, "value": 40.2, "unit": "IU/dL"},
        {"time_h": 24.0, "value": 0.101, "unit": "IU/mL"},
        {"time_h": 50.0, "blq": True, "lloq": 1.0, "unit": "%"},
    ],
    "baseline": {"value": 0.5, "unit": "IU/dL"},
    "options": {
        "trough_probability": 0.9,
        "targets_IU_dL": [1, 3],
        "intervals_h": [48, 72],
        "thresholds_IU_dL": [1, 2],
        "standard_dose_IU_kg": 50,
        "n_draws": 1000,
        "seed": 3,
    },
}
FIELDS = sorted(load_request_schema()["properties"])

ODD_NUMBERS = st.sampled_from(
    [
        0,
        -1,
        -0.0,
        1e-300,
        1e300,
        -1e300,
        10**30,
        2**63,
        2**64,
        10**400,
        math.nan,
        math.inf,
        -math.inf,
        1e7,
        0.5,
        24,
        500,
        501,
        1051921,
    ]
)
ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "nan",
        "Infinity",
        "1e7",
        "40.2",
        "IU/dL",
        "advate ",
        "ADVATE",
        "2024-02-30T08:00",
        "2024-03-01T08:00+01:00",
        "9999-12-31T23:59",
        "0001-01-01T00:00",
        "$\\frac{1}{0}$",
        "<script>",
        "\x00",
        "\ud800",
        "x" * 2000,
        "é" * 70,
        "\u202e",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | ODD_NUMBERS
    | ODD_TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=12) | st.sampled_from(FIELDS), inner, max_size=5
        )
    ),
    max_leaves=25,
)


def _finite(*xs: float) -> bool:
    return all(isinstance(x, float | int) and math.isfinite(x) for x in xs)


def _outcome(source, keys) -> DosingRequest | None:
    """Parse ``source``; check the outcome's contract; None when refused."""
    try:
        req = parse_request(source)
    except RequestError as err:
        assert err.errors
        for e in err.errors:
            assert isinstance(e.field, str) and isinstance(e.message, str)
            assert e.message and len(e.message) < 3000
            e.message.encode("utf-8")  # a web reply can carry it
            assert e.field == "" or any(
                e.field == k or e.field.startswith((f"{k}.", f"{k}["))
                for k in {*keys, *FIELDS}
            ), e
        return None
    assert _finite(req.weight_kg, req.age_y, *req.covariates.values())
    assert req.infusions and all(_finite(*i[:3]) for i in req.infusions)
    for lv in req.levels:
        assert _finite(lv.time_h) and lv.unit in ("IU/dL", "IU/mL", "%")
        assert _finite(lv.value_IU_dL) or (lv.blq and math.isnan(lv.value_IU_dL))
        assert _finite(lv.lloq_IU_dL) or math.isnan(lv.lloq_IU_dL)
        assert not (lv.value_IU_dL == 0 and not lv.blq)
    assert req.baseline_IU_dL is None or _finite(req.baseline_IU_dL)
    o = req.options
    assert _finite(
        o.trough_probability,
        o.standard_dose_IU_kg,
        o.n_draws,
        o.seed,
        *o.targets_IU_dL,
        *o.thresholds_IU_dL,
        *(o.intervals_h or ()),
    )
    assert 0 <= o.seed < 2**63
    return req


def _keys(obj) -> set:
    return set(obj) if isinstance(obj, dict) else set()


@given(JSON)
def test_any_json_value(obj):
    _outcome(obj, _keys(obj))
    try:
        text = json.dumps(obj)
    except (UnicodeEncodeError, ValueError):
        return
    _outcome(text, _keys(obj))
    _outcome(text.encode("utf-8", "surrogatepass"), _keys(obj))


@given(st.dictionaries(st.sampled_from(FIELDS), JSON, min_size=1, max_size=8))
def test_requests_made_of_real_field_names(obj):
    _outcome(obj, set(obj))


def _paths(obj, where=()):
    yield where
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*where, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*where, i))


PATHS = [p for p in _paths(VALID) if p]


def _parent(obj, path):
    for key in path[:-1]:
        obj = obj[key]
    return obj


@given(st.data())
def test_perturbed_valid_requests(data):
    req = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3), label="perturbations")):
        path = data.draw(st.sampled_from(PATHS), label="path")
        try:
            parent = _parent(req, path)
            parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # removed by an earlier perturbation
        action = data.draw(
            st.sampled_from(
                ["remove", "replace", "odd number", "odd text", "add field"]
            )
        )
        if action == "remove":
            del parent[path[-1]]
        elif action == "add field" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=12))] = data.draw(SCALARS)
        else:
            parent[path[-1]] = data.draw(
                {"replace": JSON, "odd number": ODD_NUMBERS, "odd text": ODD_TEXT}.get(
                    action, JSON
                ),
                label="value",
            )
    keys = set(req) | set(VALID)
    _outcome(req, keys)
    # the same request as JSON text, with a key given twice
    try:
        text = json.dumps(req)
    except (UnicodeEncodeError, ValueError):
        return
    if req and data.draw(st.booleans(), label="duplicate a key"):
        key = data.draw(st.sampled_from(sorted(req)), label="duplicated")
        text = text[:-1] + f", {json.dumps(key)}: {json.dumps(req[key])}}}"
        try:
            parse_request(text)
        except RequestError as err:
            assert any(
                e.field == key and "duplicate" in e.message for e in err.errors
            ), err.errors
        else:
            raise AssertionError(f"duplicate key {key!r} accepted")
    _outcome(text, keys)


def test_the_unperturbed_request_is_accepted():
    req = _outcome(copy.deepcopy(VALID), set(VALID))
    assert req is not None and req.levels[2].blq
