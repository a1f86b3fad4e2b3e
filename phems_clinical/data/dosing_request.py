"""Parse and check a clinician's dosing request for one haemophilia patient.

A request (JSON text or a dict) names a product or a fitted model, the patient's
covariates, the infusions given and the factor levels measured; its contract is
``data_schemas/dosing_request.schema.json``. :func:`parse_request` validates it in
two passes, each reporting *all* problems at once as :class:`FieldError` s (a
dotted path such as ``levels[1].value`` and a plain-language message) inside one
:class:`RequestError`: first against the JSON Schema, then for meaning (levels
after the first infusion, consistent date-times, plausible values and units,
BLQ coding). Before either pass the JSON itself is checked: duplicate keys, NaN
or infinite numbers, lone surrogates, over-long text and deep nesting are
refused by name, so nothing odd reaches the schema's messages or the model.
Plausibility limits (dose per kg, times, levels, LLOQ, seed) are those of
:mod:`phems_clinical.data.plausibility`, shared with the NONMEM and OMOP readers;
values outside a warning range come back in ``DosingRequest.warnings``.

Units: times in h, doses in IU, weights in kg (``weight_lb`` is converted with
1 lb = 0.45359237 kg exactly), ages in years, factor levels in IU/dL (= %; IU/mL
is multiplied by 100). Times are either hours (``time_h``) or date-times
(``datetime``, t = 0 at the earliest infusion), one style per request; a
date-time is ISO 8601 or day-first as European clinics write it
(``DD/MM/YYYY HH:MM``, ``DD.MM.YYYY HH:MM``, ``DD-MM-YYYY HH:MM``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from functools import lru_cache
from typing import NamedTuple

import jsonschema

from phems_clinical.data import plausibility
from phems_clinical.data.schema_messages import (
    FieldError,
    field_path,
    nonfinite_fields,
    show_value,
    translate,
)
from phems_clinical.data.schema_messages import (
    show_number as _num,
)
from phems_clinical.resources import schemas_dir

__all__ = [
    "LB_KG",
    "DosingOptions",
    "DosingRequest",
    "EvaluateRegimen",
    "FieldError",
    "Infusion",
    "Level",
    "RequestError",
    "load_json",
    "load_request_schema",
    "parse_datetime",
    "parse_request",
]

#: kg per pound, exact (international yard and pound agreement, 1959).
LB_KG = 0.45359237

SCHEMA_FILE = "dosing_request.schema.json"

_TO_IU_DL = {"IU/dL": 1.0, "%": 1.0, "IU/mL": 100.0}
# Shape of the JSON before the schema sees it (the deepest valid path is
# options.evaluate[0].schedule, depth 4; the schema's longest text is a model path).
_MAX_DEPTH = 6
_MAX_TEXT = 1024
_MAX_KEY = 64
_MAX_ITEMS = 1000
_MAX_INT_DIGITS = 300  # longer integer literals read as inf (refused by name)
_MAX_ERRORS = 50  # listed per RequestError; the rest are counted
_NUMERIC_COVARIATES = {
    "height_cm": "HT",
    "lean_body_weight_kg": "LBW",
    "fat_free_mass_kg": "FFM",
    "vwf_IU_dL": "VWF",
    "hematocrit_pct": "HCT",
}
_CODED_COVARIATES = {
    "blood_group": ("BGO", {"O": 1, "A": 0, "B": 0, "AB": 0}),
    "assay": ("ASSAY", {"one-stage": 1, "OSA": 1, "chromogenic": 0, "CSA": 0}),
    "sex": ("SEX", {"male": 0, "female": 1}),
}
_ASSAY = {
    "one-stage": "one-stage",
    "OSA": "one-stage",
    "chromogenic": "chromogenic",
    "CSA": "chromogenic",
}
# day-first date-times as European clinics write them: 01/03/2024 08:30
_DAY_FIRST = re.compile(
    r"(\d{1,2})([/.-])(\d{1,2})\2(\d{4})[ T](\d{1,2}):(\d{2})"
    r"(?::(\d{2}))?"
)


class RequestError(ValueError):
    """A request failed validation; ``errors`` lists every problem found."""

    def __init__(self, errors: list[FieldError]):
        errors = list(errors)
        if len(errors) > _MAX_ERRORS:
            more = len(errors) - _MAX_ERRORS
            errors = errors[:_MAX_ERRORS] + [
                FieldError(
                    "", f"and {more} more problem(s) not listed; correct these first"
                )
            ]
        self.errors = errors
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in self.errors))


class Infusion(NamedTuple):
    """An infusion: start (h since the time origin), dose (IU), duration (h).

    ``index`` is its position in ``request["infusions"]``.
    """

    time_h: float
    dose_IU: float
    duration_h: float
    index: int


class Level(NamedTuple):
    """A measured factor level, in IU/dL.

    ``value_IU_dL`` is nan for a BLQ level given without a value; ``lloq_IU_dL`` is
    nan when no LLOQ was given; ``index`` is its position in ``request["levels"]``;
    ``unit`` is the unit the level was given in.
    """

    time_h: float
    value_IU_dL: float
    blq: bool
    lloq_IU_dL: float
    index: int
    unit: str = "IU/dL"
    assay: str | None = None


class EvaluateRegimen(NamedTuple):
    """A regimen the clinician chose: a schedule text and a dose per infusion
    (``dose_IU`` or ``dose_IU_kg``, the other None); ``index`` in
    ``options.evaluate``."""

    schedule: str
    dose_IU: float | None
    dose_IU_kg: float | None
    index: int


class DosingOptions(NamedTuple):
    """Forecast and dose-search settings (``intervals_h`` and ``schedules`` None:
    by product class). ``max_dose_IU_kg`` is the cap on a designed dose;
    ``peak_flag_IU_dL`` the median steady-state peak that is flagged."""

    trough_probability: float = 0.9
    targets_IU_dL: tuple[float, ...] = (1.0, 3.0, 5.0)
    intervals_h: tuple[float, ...] | None = None
    thresholds_IU_dL: tuple[float, ...] = (1.0, 2.0, 5.0)
    standard_dose_IU_kg: float = 50.0
    n_draws: int = 4000
    seed: int = 0
    schedules: tuple[str, ...] | None = None
    max_dose_IU_kg: float = 100.0
    peak_flag_IU_dL: float = 150.0
    evaluate: tuple[EvaluateRegimen, ...] = ()


class DosingRequest(NamedTuple):
    """A checked request; see the contract in ``dosing_request.schema.json``.

    ``covariates`` uses model names (WT kg, AGE y always; HT cm, LBW kg, FFM kg,
    VWF IU/dL, HCT %, BGO 1 = group O, ASSAY 1 = one-stage, SEX 1 = female when
    given). ``infusions`` and ``levels`` are sorted by time; ``time_origin`` is
    the ISO date-time of t = 0 when date-times were used, else None;
    ``warnings`` lists values accepted but unusual (plausibility warning ranges).
    ``weight_unit`` is the unit the weight was given in (``"kg"`` or ``"lb"``;
    ``weight_kg`` is always in kg); ``assay`` the assay of the levels
    (``"one-stage"``, ``"chromogenic"`` or None), each level's own in
    ``Level.assay``; ``acknowledge_unverified`` the request's acknowledgement of
    unverified model sections.
    """

    product: str | None
    model_path: str | None
    patient_id: str | None
    weight_kg: float
    age_y: float
    covariates: dict[str, float]
    infusions: tuple[Infusion, ...]
    levels: tuple[Level, ...]
    baseline_IU_dL: float | None
    time_origin: str | None
    options: DosingOptions
    warnings: tuple[FieldError, ...] = ()
    weight_unit: str = "kg"
    assay: str | None = None
    acknowledge_unverified: bool = False


@lru_cache(maxsize=1)
def load_request_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a request: ``dosing_request.schema.json``."""
    with open(schemas_dir() / SCHEMA_FILE, encoding="utf-8") as fh:
        return json.load(fh)


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_request_schema())


# ------------------------------------------------------------------ messages


def _title(schema: dict, fallback: str) -> str:
    ref = schema.get("$ref", "")
    if ref.startswith("#/$defs/"):
        schema = load_request_schema()["$defs"][ref.removeprefix("#/$defs/")]
    return schema.get("title", fallback)


def _translate(err: jsonschema.ValidationError) -> list[FieldError]:
    """:func:`translate`, plus the length limits (whose jsonschema messages would
    repeat the whole over-long value)."""
    if err.validator == "oneOf" and not isinstance(err.instance, dict):
        return []  # "one of these fields" means nothing here: the type error says it
    if err.validator == "oneOf" and "properties" not in err.schema:
        # a top-level "exactly one of" inside allOf (product/model, weight_kg/lb)
        names = [alt["required"][0] for alt in err.validator_value]
        props = load_request_schema()["properties"]
        if any(n in err.instance for n in names):
            return [
                FieldError(names[-1], f"give either {' or '.join(names)}, not both")
            ]
        which = " or ".join(f"{n} ({props[n]['title']})" for n in names)
        return [FieldError(names[0], f"required field missing: {which}")]
    if err.validator in ("maxLength", "maxItems"):
        what = "characters" if err.validator == "maxLength" else "entries"
        title = _title(
            err.schema, str(err.absolute_path[-1]) if err.absolute_path else "input"
        )
        return [
            FieldError(
                field_path(err.absolute_path),
                f"expected at most {err.validator_value} {what} ({title}), "
                f"got {len(err.instance)}",
            )
        ]
    return translate(err, _title)


def _implausible(x: float, unit: str) -> str | None:
    """Message for a factor level outside ``plausibility`` 's error range, with
    the likely unit mistake; None when plausible."""
    finding = plausibility.check("factor_level", x * _TO_IU_DL[unit])
    if finding is None or finding.level != "error":
        return None
    if unit == "IU/mL":
        return (
            f"{_num(x)} IU/mL = {_num(x * 100.0)} IU/dL is implausible for a "
            f"factor level; was the unit IU/dL? ({finding.message})"
        )
    return (
        f"{_num(x)} {unit} is implausible for a factor level; was the unit "
        f"IU/mL? ({finding.message})"
    )


def _flag(
    name: str,
    value: float,
    field: str,
    errors: list[FieldError],
    warnings: list[FieldError],
    prefix: str = "",
) -> None:
    """Apply plausibility limit ``name``: an error or a warning naming ``field``."""
    finding = plausibility.check(name, value)
    if finding is not None:
        (errors if finding.level == "error" else warnings).append(
            FieldError(field, prefix + finding.message)
        )


# ------------------------------------------------------------------ JSON shape


class _Object(dict):
    """A JSON object as read, remembering keys given more than once."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, object]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(
            dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k))
        )
    return obj


def _int(text: str) -> int | float:
    # Python refuses to read integers of more than 4300 digits (a ValueError that
    # would say nothing about the field); an absurdly long one is inf instead and
    # refused by name as a non-finite number.
    return int(text) if len(text) <= _MAX_INT_DIGITS else math.inf


def load_json(source: str | bytes | bytearray) -> object:
    """Read JSON text as the request parser does.

    Bytes must be UTF-8 (a byte-order mark is allowed). Duplicate keys are kept
    for :func:`parse_request` to refuse by name (JSON itself would keep only the
    last one silently); integer literals of more than 300 digits read as inf
    (refused by name later).

    Raises
    ------
    RequestError
        On text that is not JSON, not UTF-8, or nested too deeply to read.
    """
    try:
        if isinstance(source, bytes | bytearray):
            # JSON exchanged between systems is UTF-8 (RFC 8259, section 8.1);
            # json.loads would guess UTF-16/32 from the first bytes instead.
            source = bytes(source).decode("utf-8-sig")
        return json.loads(source, object_pairs_hook=_object, parse_int=_int)
    except json.JSONDecodeError as exc:
        msg = f"{exc.msg} at line {exc.lineno}, column {exc.colno}"
        raise RequestError([FieldError("", f"not valid JSON: {msg}")]) from None
    except UnicodeDecodeError as exc:
        raise RequestError(
            [
                FieldError(
                    "",
                    "not valid JSON: the text is not "
                    f"UTF-8 ({exc.reason} at byte {exc.start}); "
                    "save it as UTF-8",
                )
            ]
        ) from None
    except RecursionError:
        raise RequestError(
            [
                FieldError(
                    "",
                    "not a dosing request: the JSON is "
                    f"nested too deeply (a request is at most "
                    f"{_MAX_DEPTH} levels deep)",
                )
            ]
        ) from None
    except (ValueError, TypeError) as exc:  # e.g. a str/bytes type mix-up
        raise RequestError([FieldError("", f"not valid JSON: {exc}")]) from None


def _valid_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shape_errors(obj: object) -> list[FieldError]:
    """Problems with the JSON as such, found before the schema looks at it.

    Duplicate keys, keys or text that are too long or not valid Unicode (a lone
    ``\\ud800`` escape), lists longer than any request needs, nesting deeper than
    any request, and values that are not JSON (when a dict is passed directly).
    Walks iteratively: a deeply nested input cannot exhaust the stack.
    """
    errors: list[FieldError] = []
    stack: list[tuple[object, tuple, int]] = [(obj, (), 0)]
    while stack:
        value, where, depth = stack.pop()
        path = field_path(where)
        if isinstance(value, str):
            if len(value) > _MAX_TEXT:
                errors.append(
                    FieldError(
                        path,
                        f"text of {len(value)} characters is "
                        f"too long (at most {_MAX_TEXT})",
                    )
                )
            elif not _valid_text(value):
                errors.append(
                    FieldError(
                        path,
                        "text is not valid Unicode (it holds "
                        "a lone surrogate escape such as \\ud800)",
                    )
                )
            continue
        if value is None or isinstance(value, bool | int | float):
            continue
        if not isinstance(value, dict | list):
            errors.append(
                FieldError(
                    path,
                    "expected a JSON value (object, list, "
                    f"text, number, true/false or null), got a "
                    f"{type(value).__name__}",
                )
            )
            continue
        if depth >= _MAX_DEPTH:
            errors.append(
                FieldError(
                    path,
                    "nested too deeply: a dosing request is "
                    f"at most {_MAX_DEPTH} levels deep",
                )
            )
            continue
        if isinstance(value, list):
            if len(value) > _MAX_ITEMS:
                errors.append(
                    FieldError(
                        path,
                        f"a list of {len(value)} entries is "
                        f"too long (at most {_MAX_ITEMS})",
                    )
                )
                continue
            stack.extend(
                (v, (*where, i), depth + 1) for i, v in reversed(list(enumerate(value)))
            )
            continue
        for key in getattr(value, "duplicates", ()):
            errors.append(
                FieldError(
                    field_path((*where, key)),
                    (
                        f"duplicate field {key!r}: given more than once in the same object "
                        "(JSON would keep only the last silently); give it once"
                    ),
                )
            )
        children = []
        for key, v in value.items():
            if not isinstance(key, str):
                errors.append(
                    FieldError(
                        path,
                        "field names must be text, got "
                        f"{type(key).__name__} {key!r:.40}",
                    )
                )
            elif len(key) > _MAX_KEY:
                errors.append(
                    FieldError(
                        path,
                        f"a field name of {len(key)} "
                        "characters is not a field of a dosing "
                        f"request (names are text of at most "
                        f"{_MAX_KEY} characters)",
                    )
                )
            elif not _valid_text(key):
                errors.append(
                    FieldError(
                        path,
                        "a field name is not valid Unicode "
                        "(it holds a lone surrogate escape such "
                        "as \\ud800)",
                    )
                )
            else:
                children.append((v, (*where, key), depth + 1))
        stack.extend(reversed(children))
    return errors


# ------------------------------------------------------------------ meaning


def _style(entry: dict) -> str:
    return "time_h" if "time_h" in entry else "datetime"


def _times(obj: dict, errors: list[FieldError]) -> tuple[dict, str | None] | None:
    """Hours since the origin of every infusion and level, keyed by (list, index)."""
    entries = [
        (k, i, e) for k in ("infusions", "levels") for i, e in enumerate(obj.get(k, []))
    ]
    first = _style(entries[0][2])
    mixed = [(k, i, e) for k, i, e in entries if _style(e) != first]
    for k, i, e in mixed:
        errors.append(
            FieldError(
                f"{k}[{i}].{_style(e)}",
                "this request mixes time_h "
                f"and datetime (infusions[0] uses {first}); use "
                "one style for all infusions and levels",
            )
        )
    if mixed:
        return None
    if first == "time_h":
        return {(k, i): float(e["time_h"]) for k, i, e in entries}, None
    stamps, ref, n_errors = {}, None, len(errors)
    for k, i, e in entries:
        where = f"{k}[{i}].datetime"
        try:
            t = parse_datetime(e["datetime"])
        except ValueError as exc:
            errors.append(
                FieldError(where, f"not a valid date-time: {e['datetime']!r} ({exc})")
            )
            continue
        aware = t.utcoffset() is not None
        if ref is None:
            ref = (where, aware)
        elif aware != ref[1]:
            has = "has a time zone" if aware else "has no time zone"
            errors.append(
                FieldError(
                    where,
                    f"date-time {e['datetime']!r} {has} but "
                    f"{ref[0]} {'does not' if aware else 'does'}; "
                    "give all date-times with a time zone (e.g. "
                    "+01:00) or all without",
                )
            )
        stamps[k, i] = t
    if len(errors) > n_errors:
        return None
    t0 = min(t for (k, _), t in stamps.items() if k == "infusions")
    hours = {key: (t - t0).total_seconds() / 3600.0 for key, t in stamps.items()}
    for (k, i), h in hours.items():
        finding = plausibility.check("time_h", h)
        if finding is not None and finding.level == "error" and h > 0:
            errors.append(
                FieldError(
                    f"{k}[{i}].datetime",
                    (
                        f"{obj[k][i]['datetime']!r} is {_num(h)} h after the first infusion: "
                        f"{finding.message}"
                    ),
                )
            )
    if len(errors) > n_errors:
        return None
    return hours, t0.isoformat()


def parse_datetime(text: str) -> dt.datetime:
    """A date-time as ISO 8601 or day-first ``DD/MM/YYYY HH:MM`` (also ``.`` or
    ``-`` between the parts, optional ``:SS``; European order, never month-first).

    >>> parse_datetime("01/03/2026 08:30"), parse_datetime("1.3.2026 8:30")
    (datetime.datetime(2026, 3, 1, 8, 30), datetime.datetime(2026, 3, 1, 8, 30))
    >>> parse_datetime("31/02/2026 08:00")
    Traceback (most recent call last):
    ...
    ValueError: day is out of range for month (day-first DD/MM/YYYY: day 31, month 2)

    Raises
    ------
    ValueError
        For text in neither form or an impossible date or time.
    """
    m = _DAY_FIRST.fullmatch(text.strip())
    if m is None:
        return dt.datetime.fromisoformat(text)
    day, _, month, year, hour, minute, sec = m.groups()
    try:
        return dt.datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(sec or 0)
        )
    except ValueError as exc:
        raise ValueError(
            f"{exc} (day-first DD/MM/YYYY: day {int(day)}, month {int(month)})"
        ) from None


def _level(
    i: int, lv: dict, t: float, errors: list[FieldError], warnings: list[FieldError]
) -> Level:
    unit, f = lv["unit"], _TO_IU_DL[lv["unit"]]
    value, lloq, blq = lv.get("value"), lv.get("lloq"), lv.get("blq", False)
    n_errors = len(errors)
    for name in ("value", "lloq"):
        if lv.get(name) is not None and (msg := _implausible(lv[name], unit)):
            errors.append(FieldError(f"levels[{i}].{name}", msg))
    if len(errors) == n_errors:
        if lloq is not None:
            _flag(
                "lloq_IU_dL",
                lloq * f,
                f"levels[{i}].lloq",
                errors,
                warnings,
                f"{_num(lloq)} {unit}: " if unit == "IU/mL" else "",
            )
        if value is not None and not blq:
            _flag(
                "factor_level",
                value * f,
                f"levels[{i}].value",
                errors,
                warnings,
                f"{_num(value)} {unit}: " if unit == "IU/mL" else "",
            )
    if blq and lloq is None and not value:
        errors.append(
            FieldError(
                f"levels[{i}].lloq",
                "a level marked blq needs its "
                f"lloq (lower limit of quantification, in {unit})",
            )
        )
    elif blq and lloq is None:
        lloq = value
    elif blq and value is not None and value > lloq:
        errors.append(
            FieldError(
                f"levels[{i}].value",
                f"marked blq but the value "
                f"{_num(value)} {unit} is above its lloq "
                f"{_num(lloq)} {unit}",
            )
        )
    elif not blq and value is None:
        errors.append(
            FieldError(
                f"levels[{i}].value",
                "required field missing: "
                "measured factor level in the given unit (or mark "
                'the level "blq": true with its lloq)',
            )
        )
    elif not blq and value == 0:
        # A measured 0 is below any assay's limit of quantification; read as a
        # number it pulls the fit towards a very short half-life.
        errors.append(
            FieldError(
                f"levels[{i}].value",
                (
                    f"a level of 0 {unit} is below the assay's limit of quantification: "
                    'mark it "blq": true with the assay\'s "lloq" (or give the measured '
                    "value)"
                ),
            )
        )
    elif not blq and lloq is not None and value < lloq:
        errors.append(
            FieldError(
                f"levels[{i}].value",
                f"value {_num(value)} {unit} "
                f"is below its LLOQ ({_num(lloq)} {unit}): mark it "
                "blq",
            )
        )
    nan = math.nan
    return Level(
        t,
        nan if value is None else value * f,
        bool(blq),
        nan if lloq is None else lloq * f,
        i,
        unit,
        _ASSAY.get(lv.get("assay")),
    )


def _build(obj: dict, errors: list[FieldError]) -> DosingRequest:
    warnings: list[FieldError] = []
    timed = _times(obj, errors)
    times, origin = timed if timed is not None else ({}, None)
    infusions = tuple(
        sorted(
            (
                Infusion(
                    times.get(("infusions", i), math.nan),
                    float(e["dose_IU"]),
                    float(e.get("duration_h", 0.0)),
                    i,
                )
                for i, e in enumerate(obj["infusions"])
            ),
            key=lambda x: (x.time_h, x.index),
        )
    )
    weight = (
        float(obj["weight_kg"])
        if "weight_kg" in obj
        else float(obj["weight_lb"]) * LB_KG
    )
    for inf in sorted(infusions, key=lambda x: x.index):
        _flag(
            "dose_per_kg",
            inf.dose_IU / weight,
            f"infusions[{inf.index}].dose_IU",
            errors,
            warnings,
            f"{_num(inf.dose_IU)} IU for {_num(weight)} kg (weight_kg) is "
            f"{inf.dose_IU / weight:.4g} IU/kg: ",
        )
    first = infusions[0]
    levels = []
    for i, lv in enumerate(obj.get("levels", [])):
        levels.append(
            _level(i, lv, times.get(("levels", i), math.nan), errors, warnings)
        )
        if timed is not None and levels[-1].time_h <= first.time_h:
            key = _style(lv)
            when = (
                (lv[key], obj["infusions"][first.index][key])
                if origin
                else (f"{_num(levels[-1].time_h)} h", f"{_num(first.time_h)} h")
            )
            errors.append(
                FieldError(
                    f"levels[{i}].{key}",
                    (
                        f"level at {when[0]} is not after the first infusion (at {when[1]}): "
                        "a pre-infusion (trough) level is what remains of earlier "
                        "infusions, so enter the earlier infusion(s) (time and dose) that "
                        "this level follows; only a true endogenous level (mild/moderate "
                        'haemophilia) belongs in "baseline"'
                    ),
                )
            )
    base = obj.get("baseline")
    if base is not None and (msg := _implausible(base["value"], base["unit"])):
        errors.append(FieldError("baseline.value", msg))
    elif base is not None:
        _flag(
            "factor_level",
            base["value"] * _TO_IU_DL[base["unit"]],
            "baseline.value",
            errors,
            warnings,
        )
    covariates = {"WT": weight, "AGE": float(obj["age_y"])}
    covariates |= {
        name: float(obj[k]) for k, name in _NUMERIC_COVARIATES.items() if k in obj
    }
    covariates |= {
        name: float(codes[obj[k]])
        for k, (name, codes) in _CODED_COVARIATES.items()
        if k in obj
    }
    opts = {
        k: tuple(map(float, v))
        if isinstance(v, list)
        else int(v)
        if k in ("n_draws", "seed")
        else float(v)
        for k, v in obj.get("options", {}).items()
        if k not in ("schedules", "evaluate")
    }
    given = obj.get("options", {})
    if "schedules" in given:
        opts["schedules"] = tuple(str(x).strip() for x in given["schedules"])
    if "evaluate" in given:
        opts["evaluate"] = tuple(
            EvaluateRegimen(
                str(e["schedule"]).strip(),
                None if e.get("dose_IU") is None else float(e["dose_IU"]),
                None if e.get("dose_IU_kg") is None else float(e["dose_IU_kg"]),
                i,
            )
            for i, e in enumerate(given["evaluate"])
        )
    for e in opts.get("evaluate", ()):
        if e.dose_IU is not None:
            _flag(
                "dose_per_kg",
                e.dose_IU / weight,
                f"options.evaluate[{e.index}].dose_IU",
                errors,
                warnings,
                f"{_num(e.dose_IU)} IU for {_num(weight)} kg is "
                f"{e.dose_IU / weight:.4g} IU/kg: ",
            )
    pid = obj.get("patient_id")
    return DosingRequest(
        product=obj.get("product"),
        model_path=obj.get("model"),
        patient_id=None if pid is None else str(pid),
        weight_kg=weight,
        age_y=float(obj["age_y"]),
        covariates=covariates,
        infusions=infusions,
        levels=tuple(sorted(levels, key=lambda x: (x.time_h, x.index))),
        baseline_IU_dL=(
            None if base is None else base["value"] * _TO_IU_DL[base["unit"]]
        ),
        time_origin=origin,
        options=DosingOptions(**opts),
        warnings=tuple(warnings),
        weight_unit="kg" if "weight_kg" in obj else "lb",
        assay=_ASSAY.get(obj.get("assay")),
        acknowledge_unverified=bool(obj.get("acknowledge_unverified", False)),
    )


def parse_request(source: dict | str | bytes) -> DosingRequest:
    """Validate a dosing request and convert it to hours and IU/dL.

    Parameters
    ----------
    source : dict, str or bytes
        The request as a dict or as JSON text (``data_schemas/
        dosing_request.schema.json``). Doses in IU, weight in kg, age in years,
        times in h (``time_h``) or ISO 8601 date-times (``datetime``), levels in
        IU/dL, % or IU/mL.

    Returns
    -------
    DosingRequest
        Infusions and levels sorted by time (``index`` keeps the original
        position), levels in IU/dL, covariates under their model names.

    Raises
    ------
    RequestError
        With a :class:`FieldError` for *every* problem found: first all JSON
        Schema violations; if there are none, all problems of meaning (levels at
        or before the first infusion, mixed time styles or time zones, implausible
        values or units, a level of 0 not marked BLQ, inconsistent BLQ coding).
        Problems with the JSON itself (duplicate keys, over-long text, deep
        nesting) come first and alone. At most 50 problems are listed.

    Examples
    --------
    >>> req = parse_request({
    ...     "product": "advate", "weight_kg": 25.0, "age_y": 8.0,
    ...     "infusions": [{"time_h": 0.0, "dose_IU": 1000, "duration_h": 0.17}],
    ...     "levels": [{"time_h": 4.0, "value": 40.2, "unit": "IU/dL"},
    ...                {"time_h": 24.0, "value": 10.1, "unit": "IU/dL"},
    ...                {"time_h": 48.0, "value": 1.5, "unit": "IU/dL"}]})
    >>> req.covariates, req.infusions[0].dose_IU
    ({'WT': 25.0, 'AGE': 8.0}, 1000.0)
    >>> [(lv.time_h, lv.value_IU_dL) for lv in req.levels]
    [(4.0, 40.2), (24.0, 10.1), (48.0, 1.5)]
    >>> try:
    ...     parse_request('{"product": "advate", "wieght_kg": 25, "age_y": 8}')
    ... except RequestError as err:
    ...     for e in err.errors:
    ...         print(f"{e.field}: {e.message[:60]}")
    infusions: required field missing: list of infusions
    weight_kg: required field missing: weight_kg (body weight in kg) or wei
    wieght_kg: unknown field 'wieght_kg' (did you mean 'weight_kg'?)
    """
    obj = load_json(source) if isinstance(source, str | bytes | bytearray) else source
    if not isinstance(obj, dict):
        raise RequestError(
            [
                FieldError(
                    "",
                    "expected a JSON object {...} with the "
                    f"request fields, got {show_value(obj)}",
                )
            ]
        )
    errors = _shape_errors(obj)
    if errors:  # the schema's messages would repeat what is wrong here
        raise RequestError(list(dict.fromkeys(errors)))
    errors = list(nonfinite_fields(obj))
    flagged = {e.field for e in errors}
    for err in _validator().iter_errors(obj):
        errors += [e for e in _translate(err) if e.field not in flagged]
    if not errors:
        request = _build(obj, errors)
    if errors:
        raise RequestError(list(dict.fromkeys(errors)))
    return request
