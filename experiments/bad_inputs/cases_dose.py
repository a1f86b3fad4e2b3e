"""Bad dosing requests for ``phems dose``: implausible
doses, levels, times and seeds, levels of 0 not marked BLQ, unit mix-ups, levels
the population model cannot produce, duplicate keys, non-finite numbers, long or
odd text, a model from a failed fit.

Each case writes ``patient.json`` and runs ``phems dose patient.json --out o``;
``names`` is the request field the message must name. Options and paths of the
command itself are in ``cases_cli.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import Case

EXAMPLE = {
    "product": "kovaltry",
    "weight_kg": 25.0,
    "age_y": 8.0,
    "height_cm": 128,
    "infusions": [{"time_h": 0.0, "dose_IU": 1000, "duration_h": 0.17}],
    "levels": [
        {"time_h": 4.0, "value": 40.2, "unit": "IU/dL"},
        {"time_h": 24.0, "value": 10.1, "unit": "IU/dL"},
        {"time_h": 48.0, "value": 1.5, "unit": "IU/dL"},
    ],
}


def _run(request: dict | str):
    """``argv`` for a case: write the request, dose it into ``o``."""

    def argv(tmp: Path) -> list[str]:
        text = request if isinstance(request, str) else json.dumps(request)
        (tmp / "patient.json").write_text(text, encoding="utf-8")
        return ["dose", str(tmp / "patient.json"), "--out", str(tmp / "o")]

    return argv


def _with(**changes) -> dict:
    return json.loads(json.dumps(EXAMPLE)) | changes


def _level(i: int, **changes) -> dict:
    req = _with()
    req["levels"][i] |= changes
    for k in [k for k, v in changes.items() if v is None]:
        del req["levels"][i][k]
    return req


def _text(old: str, new: str) -> str:
    text = json.dumps(EXAMPLE)
    assert old in text
    return text.replace(old, new, 1)


def _failed_fit(tmp: Path) -> list[str]:
    import dataclasses

    from phems_clinical.pk.library import load_product
    from phems_clinical.pk.spec import save_model

    model = load_product("kovaltry")
    meta = {**model.metadata, "fitted": {"method": "focei", "converged": False}}
    path = save_model(dataclasses.replace(model, metadata=meta), tmp / "model.yaml")
    req = {k: v for k, v in EXAMPLE.items() if k != "product"} | {"model": str(path)}
    return _run(req)(tmp)


ZEROS = _with(levels=[{**lv, "value": 0} for lv in EXAMPLE["levels"]])
D = "phems dose"

CASES = [
    # implausible numbers (plausibility.json)
    Case(
        D,
        "1e7 IU for a 25 kg child",
        r"infusions\[0\]\.dose_IU",
        _run(_with(infusions=[{"time_h": 0, "dose_IU": 1e7}])),
    ),
    Case(
        D,
        "800 IU/kg (20000 IU for 25 kg)",
        r"infusions\[0\]\.dose_IU.*IU/kg",
        _run(_with(infusions=[{"time_h": 0, "dose_IU": 20000}])),
    ),
    Case(
        D,
        "300 IU/kg: unusual",
        r"infusions\[0\]\.dose_IU.*300 IU/kg",
        _run(
            _with(
                infusions=[{"time_h": 0, "dose_IU": 7500}],
                levels=[
                    {"time_h": 4, "value": 300, "unit": "IU/dL"},
                    {"time_h": 24, "value": 60, "unit": "IU/dL"},
                ],
            )
        ),
        expect="warning",
    ),
    Case(
        D, "three levels of 0 not marked BLQ", r"levels\[0\]\.value.*blq", _run(ZEROS)
    ),
    Case(
        D, "a level at 1e300 h", r"levels\[2\]\.time_h", _run(_level(2, time_h=1e300))
    ),
    Case(
        D,
        "date-times 200 years apart",
        r"levels\[0\]\.datetime",
        _run(
            _with(
                infusions=[{"datetime": "1824-03-01T08:00", "dose_IU": 1000}],
                levels=[{"datetime": "2024-03-01T12:00", "value": 40, "unit": "%"}],
            )
        ),
    ),
    Case(D, "negative time", r"levels\[1\]\.time_h", _run(_level(1, time_h=-4))),
    Case(
        D,
        "infusion duration 1e6 h",
        r"infusions\[0\]\.duration_h",
        _run(_with(infusions=[{"time_h": 0, "dose_IU": 1000, "duration_h": 1e6}])),
    ),
    Case(D, "weight 0 kg", r"weight_kg", _run(_with(weight_kg=0))),
    Case(D, "weight 2500 kg", r"weight_kg", _run(_with(weight_kg=2500))),
    Case(D, "age 200 y", r"age_y", _run(_with(age_y=200))),
    Case(
        D, "options.seed 2^64", r"options\.seed", _run(_with(options={"seed": 2**64}))
    ),
    # levels and units
    Case(
        D,
        "IU/mL value entered as IU/dL",
        r"levels\[0\]\.unit",
        _run(_level(0, value=0.402)),
    ),
    Case(
        D,
        "40.2 IU/mL (4020 IU/dL)",
        r"levels\[0\]\.value",
        _run(_level(0, unit="IU/mL")),
    ),
    Case(
        D,
        "level far outside the prior predictive range in both units",
        r"levels\[1\]\.value",
        _run(_level(1, value=300)),
    ),
    Case(
        D,
        "level just outside the prior predictive range",
        r"levels\[0\]\.value",
        _run(_level(0, value=120)),
        expect="warning",
    ),
    Case(D, "empty level value", r"levels\[1\]\.value", _run(_level(1, value=""))),
    Case(
        D,
        "level value null, not BLQ",
        r"levels\[1\]\.value",
        _run(_level(1, value=None)),
    ),
    Case(
        D,
        "BLQ without its LLOQ",
        r"levels\[2\]\.lloq",
        _run(_level(2, value=None, blq=True)),
    ),
    Case(D, "LLOQ of 0", r"levels\[2\]\.lloq", _run(_level(2, blq=True, lloq=0))),
    Case(
        D,
        "BLQ level above its LLOQ",
        r"levels\[2\]\.value",
        _run(_level(2, blq=True, lloq=1)),
    ),
    Case(
        D,
        "level before the first infusion",
        r"levels\[0\]\.time_h",
        _run(_level(0, time_h=0)),
    ),
    # JSON itself
    Case(
        D,
        "duplicate key weight_kg",
        r"weight_kg.*duplicate|duplicate.*weight_kg",
        _run(_text('"weight_kg": 25.0', '"weight_kg": 25.0, "weight_kg": 2.5')),
    ),
    Case(
        D,
        "NaN token",
        r"weight_kg",
        _run(_text('"weight_kg": 25.0', '"weight_kg": NaN')),
    ),
    Case(
        D,
        "Infinity dose",
        r"infusions\[0\]\.dose_IU",
        _run(_text('"dose_IU": 1000', '"dose_IU": Infinity')),
    ),
    Case(
        D,
        "5000-digit integer",
        r"weight_kg",
        _run(_text('"weight_kg": 25.0', '"weight_kg": ' + "9" * 5000)),
    ),
    Case(D, "200 KB patient_id", r"patient_id", _run(_with(patient_id="x" * 200_000))),
    Case(
        D,
        "control characters in patient_id",
        r"patient_id",
        _run(_with(patient_id="P\x1b[2J17")),
    ),
    Case(
        D,
        "lone surrogate in patient_id",
        r"patient_id",
        _run(_text('"product"', '"patient_id": "\\ud800", "product"')),
    ),
    Case(D, "nested 100000 deep", r"nested too deeply|\(input\)", _run("[" * 100_000)),
    Case(D, "a JSON list, not an object", r"JSON object", _run("[1, 2]")),
    # the model
    Case(D, "model from a failed fit", r"model.*did not converge", _failed_fit),
    Case(D, "unknown product", r"product", _run(_with(product="kovalty"))),
    Case(
        D,
        "unverified model without acknowledgement",
        r"acknowledge_unverified",
        _run(_with(product="advate")),
    ),
    Case(
        D,
        "acknowledgement not a boolean",
        r"acknowledge_unverified",
        _run(_with(product="advate", acknowledge_unverified="yes")),
    ),
    # clinic input: weight in lb, day-first dates, assay, designer options
    Case(D, "weight in kg and in lb", r"weight_lb", _run(_with(weight_lb=55))),
    Case(
        D,
        "weight_lb of 600",
        r"weight_lb",
        _run({k: v for k, v in _with(weight_lb=600).items() if k != "weight_kg"}),
    ),
    Case(
        D,
        "31/02/2026 date",
        r"levels\[0\]\.datetime",
        _run(
            _with(
                infusions=[{"datetime": "01/02/2026 08:00", "dose_IU": 1000}],
                levels=[{"datetime": "31/02/2026 08:00", "value": 5, "unit": "%"}],
            )
        ),
    ),
    Case(
        D,
        "month-first date",
        r"infusions\[0\]\.datetime",
        _run(
            _with(
                infusions=[{"datetime": "2026/03/01 08:00", "dose_IU": 1000}], levels=[]
            )
        ),
    ),
    Case(
        D,
        "unknown assay of a level",
        r"levels\[0\]\.assay",
        _run(_level(0, assay="aPTT")),
    ),
    Case(
        D,
        "evaluate without a dose",
        r"options\.evaluate\[0\]\.dose_IU",
        _run(_with(options={"evaluate": [{"schedule": "Mon/Wed/Fri"}]})),
    ),
    Case(
        D,
        "evaluate 50000 IU for 25 kg",
        r"options\.evaluate\[0\]\.dose_IU",
        _run(
            _with(options={"evaluate": [{"schedule": "Mon/Wed/Fri", "dose_IU": 50000}]})
        ),
    ),
    Case(
        D,
        "cap of 0 IU/kg",
        r"options\.max_dose_IU_kg",
        _run(_with(options={"max_dose_IU_kg": 0})),
    ),
]
