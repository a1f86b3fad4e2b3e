"""Bad requests to the dosing web API ``POST /api/dose``:
oversized bodies, other content types, untrusted hosts, long or odd text, the
request-field cases of ``phems dose`` over HTTP.

URLs are absolute (``http://localhost/...``): the app answers only hosts it
trusts, not the test client's default ``testserver``. ``names`` is the field (or
header) the reply must name.
"""

from __future__ import annotations

import json

from harness import Case

URL = "http://localhost/api/dose"
JSON_TYPE = {"Content-Type": "application/json"}
EXAMPLE = {
    "product": "kovaltry",
    "weight_kg": 25,
    "age_y": 8,
    "height_cm": 128,
    "infusions": [{"time_h": 0, "dose_IU": 1000, "duration_h": 0.17}],
    "levels": [
        {"time_h": 4, "value": 40.2, "unit": "IU/dL"},
        {"time_h": 24, "value": 10.1, "unit": "IU/dL"},
        {"time_h": 48, "value": 1.5, "unit": "IU/dL"},
    ],
}


def _post(content: str | bytes | dict, headers: dict | None = None, url: str = URL):
    if isinstance(content, dict):
        content = json.dumps(content)
    return lambda tmp: {
        "method": "POST",
        "url": url,
        "content": content,
        "headers": JSON_TYPE if headers is None else headers,
    }


def _with(**changes) -> dict:
    return json.loads(json.dumps(EXAMPLE)) | changes


def _text(old: str, new: str) -> str:
    text = json.dumps(EXAMPLE)
    assert old in text
    return text.replace(old, new, 1)


def _level(i: int, **changes) -> dict:
    req = _with()
    req["levels"][i] |= changes
    return req


def _case(name: str, names: str, http) -> Case:
    return Case("web /api/dose", name, names, http=http)


CASES = [
    # limits of the server
    _case("100 MB body", r"body is larger", _post(b" " * 100_000_000)),
    _case(
        "cross-origin text/plain POST",
        r"Content-Type.*application/json",
        _post(EXAMPLE, {"Content-Type": "text/plain"}),
    ),
    _case(
        "form-encoded POST",
        r"Content-Type",
        _post("a=1", {"Content-Type": "application/x-www-form-urlencoded"}),
    ),
    _case("no Content-Type", r"Content-Type", _post(EXAMPLE, {})),
    _case(
        "Host: evil.example",
        r"(?i)host",
        _post(EXAMPLE, {**JSON_TYPE, "Host": "evil.example"}),
    ),
    _case("200 KB patient_id", r"patient_id", _post(_with(patient_id="x" * 200_000))),
    _case("60 KB patient_id", r"patient_id", _post(_with(patient_id="x" * 60_000))),
    _case("method mcmc", r"method", _post(EXAMPLE, url=URL + "?method=mcmc")),
    _case(
        "model file on the server",
        r"model",
        _post(
            {k: v for k, v in EXAMPLE.items() if k != "product"}
            | {"model": "/etc/passwd"}
        ),
    ),
    # JSON itself
    _case("not JSON", r"not valid JSON", _post("{weight_kg: 25")),
    _case("not UTF-8", r"UTF-8", _post(b"\xff\xfe\xfa{")),
    _case(
        "duplicate key weight_kg",
        r"weight_kg",
        _post(_text('"weight_kg": 25', '"weight_kg": 25, "weight_kg": 2500')),
    ),
    _case(
        "NaN token", r"weight_kg", _post(_text('"weight_kg": 25', '"weight_kg": NaN'))
    ),
    _case(
        "5000-digit integer",
        r"weight_kg",
        _post(_text('"weight_kg": 25', '"weight_kg": ' + "9" * 5000)),
    ),
    _case("nested 50000 deep", r"nested too deeply", _post("[" * 50_000)),
    _case(
        "lone surrogate in patient_id",
        r"patient_id",
        _post(_text('"product"', '"patient_id": "\\ud800", "product"')),
    ),
    _case("a JSON list", r"JSON object", _post("[]")),
    _case("unknown field", r"colour", _post(_with(colour="blue"))),
    _case(
        "101 levels",
        r"levels",
        _post(
            _with(
                levels=[{"time_h": 1 + i, "value": 1, "unit": "%"} for i in range(101)]
            )
        ),
    ),
    # request fields
    _case(
        "1e7 IU for a 25 kg child",
        r"infusions\[0\]\.dose_IU",
        _post(_with(infusions=[{"time_h": 0, "dose_IU": 1e7}])),
    ),
    _case(
        "three levels of 0 not marked BLQ",
        r"levels\[0\]\.value",
        _post(_with(levels=[{**lv, "value": 0} for lv in EXAMPLE["levels"]])),
    ),
    _case("a level at 1e300 h", r"levels\[2\]\.time_h", _post(_level(2, time_h=1e300))),
    _case("weight as text", r"weight_kg", _post(_with(weight_kg="25 kg"))),
    _case("options.seed 2^64", r"options\.seed", _post(_with(options={"seed": 2**64}))),
    _case("unknown product", r"product", _post(_with(product="advat"))),
    _case(
        "IU/mL value entered as IU/dL",
        r"levels\[0\]\.unit",
        _post(_level(0, value=0.402)),
    ),
    _case(
        "level far outside the prior predictive range",
        r"levels\[1\]\.value",
        _post(_level(1, value=300)),
    ),
]
