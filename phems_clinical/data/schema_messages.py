"""Plain-language messages for JSON Schema violations, one per field.

Shared by every validated input (dosing requests, site policies): a message names
the field by its path (``levels[1].value``), says what was expected (type, range,
allowed values; the schema's ``title`` explains the field) and what was given.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jsonschema

KINDS = {
    "number": "a number",
    "integer": "a whole number",
    "string": "text",
    "boolean": "true or false",
    "array": "a list",
    "object": "an object",
}
BOUNDS = {
    "minimum": ">=",
    "exclusiveMinimum": ">",
    "maximum": "<=",
    "exclusiveMaximum": "<",
}


class FieldError(NamedTuple):
    """One problem with an input: the field (a path such as ``levels[1].value``)
    and what was expected."""

    field: str
    message: str


def field_path(parts) -> str:
    """``["levels", 1, "value"]`` -> ``"levels[1].value"``."""
    out = ""
    for i, p in enumerate(parts):
        # by position, not by text so far: an empty first key still gets its "."
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
    return out


def show_number(x: float) -> str:
    """A number as people write it (``%g`` for floats)."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def show_value(v: Any) -> str:
    """A given value in a message: numbers and text as given, containers named."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, int | float):
        return show_number(v)
    if isinstance(v, str):
        return repr(v) if len(v) <= 40 else f"{v[:40]!r}... ({len(v)} characters)"
    if isinstance(v, list):
        return "a list" if v else "an empty list"
    return "an object"


def unknown_field(key: str, known: list[str]) -> str:
    """Message for an unexpected key, with the closest allowed one."""
    lower = {k.lower(): k for k in known}
    match = difflib.get_close_matches(key.lower(), list(lower), n=1)
    if match:
        return f"unknown field {key!r} (did you mean {lower[match[0]]!r}?)"
    return f"unknown field {key!r} (allowed: {', '.join(known)})"


def nonfinite_fields(obj: Any, where: tuple = ()) -> Iterator[FieldError]:
    """NaN and infinities anywhere in ``obj``: JSON Schema bounds cannot catch NaN
    (every comparison with it is false), and YAML's ``.inf`` passes ``> 0``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        yield FieldError(field_path(where), f"expected a finite number, got {obj}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from nonfinite_fields(v, (*where, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from nonfinite_fields(v, (*where, i))


def translate(
    err: jsonschema.ValidationError,
    title_of: Callable[[dict, str], str],
    hint: Callable[[jsonschema.ValidationError], str] = lambda e: "",
) -> list[FieldError]:
    """Plain-language errors for one schema violation.

    ``title_of(schema, fallback)`` names a field (its schema ``title``, resolving a
    ``$ref`` where the schema uses them); ``hint(err)`` may add advice for a
    type/range error (e.g. YAML's reading of ``1e-5`` as text).
    """
    where, s, kw, val = list(err.absolute_path), err.schema, err.validator, err.instance
    props = s.get("properties", {})
    if kw == "required":
        return [
            FieldError(
                field_path([*where, n]),
                "required field missing: " + title_of(props[n], n),
            )
            for n in err.validator_value
            if n not in val
        ]
    if kw == "additionalProperties":
        return [
            FieldError(field_path([*where, str(k)]), unknown_field(str(k), list(props)))
            for k in val
            if k not in props
        ]
    if kw == "oneOf" and not isinstance(val, dict):
        return [
            FieldError(field_path(where), f"expected an object, got {show_value(val)}")
        ]
    if kw == "oneOf":  # used only for "exactly one of these fields"
        names = [alt["required"][0] for alt in err.validator_value]
        if any(n in val for n in names):
            return [
                FieldError(
                    field_path(where), f"give either {' or '.join(names)}, not both"
                )
            ]
        which = " or ".join(f"{n} ({title_of(props[n], n)})" for n in names)
        return [
            FieldError(
                field_path([*where, names[0]]), f"required field missing: {which}"
            )
        ]
    title = title_of(s, str(where[-1]) if where else "input")
    extra = ""
    if kw == "type" or kw in BOUNDS:
        # one message for both, so that a wrong type also shows the allowed range
        types = s.get("type", "number")
        types = types if isinstance(types, list) else [types]
        kind = " or ".join(KINDS[t] for t in types)
        bounds = " and ".join(
            f"{op} {show_number(s[k])}" for k, op in BOUNDS.items() if k in s
        )
        msg = f"expected {kind} {bounds}".rstrip() + f" ({title})"
        extra = hint(err)
    elif kw == "enum":
        msg = f"expected one of {', '.join(map(str, s['enum']))} ({title})"
    elif kw == "minItems":
        msg = f"expected at least {s['minItems']} entry ({title})"
    elif kw == "minLength":
        msg = f"expected non-empty text ({title})"
    elif kw == "maxLength":
        msg = f"expected at most {s['maxLength']} characters ({title})"
        return [FieldError(field_path(where), f"{msg}, got {len(val)}")]
    elif kw == "maxItems":
        msg = f"expected at most {s['maxItems']} entries ({title})"
        return [FieldError(field_path(where), f"{msg}, got {len(val)}")]
    elif kw == "pattern":
        msg = f"expected {title}"
    else:  # pragma: no cover - the schemas use no other keywords
        msg = f"invalid value ({title}): {err.message}"
    return [FieldError(field_path(where), f"{msg}, got {show_value(val)}{extra}")]


__all__ = [
    "BOUNDS",
    "KINDS",
    "FieldError",
    "field_path",
    "nonfinite_fields",
    "show_number",
    "show_value",
    "translate",
    "unknown_field",
]
