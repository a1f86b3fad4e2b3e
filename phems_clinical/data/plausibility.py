"""Plausibility limits shared by every reader of clinical values.

One table, ``data_schemas/plausibility.json``, holds the limits (with their
published basis) that the NONMEM-style data set, the OMOP loaders and the dosing
request all apply, so a dose, level, time, age or weight means the same thing
whichever way it arrives. A value outside ``error`` is refused by name; a value
outside ``warn`` is accepted with a warning by name. A missing value is never a
number: :func:`check` refuses NaN and infinities outright.

Examples
--------
>>> check("weight_kg", 25.0) is None
True
>>> check("dose_per_kg", 400.0).level
'warning'
>>> check("factor_level", 1e7).message.split(" (")[0]
'1e+07 IU/dL is outside the plausible range for measured FVIII/FIX activity'

>>> check("seed", 10**30).level
'error'
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
from typing import Any, NamedTuple

from phems_clinical.resources import schemas_dir

__all__ = ["LIMITS_FILE", "Finding", "Limit", "check", "limit", "limits"]

LIMITS_FILE = "plausibility.json"


class Limit(NamedTuple):
    """One plausibility limit: ``error`` and ``warn`` ranges (``None`` = open)."""

    name: str
    unit: str
    error: tuple[float | None, float | None]
    warn: tuple[float | None, float | None]
    description: str
    source: str


class Finding(NamedTuple):
    """A value outside a limit: ``level`` is ``'error'`` or ``'warning'``."""

    level: str
    message: str


def _bound(x: Any) -> float | None:
    if x == "current":
        return float(_dt.date.today().year)
    return None if x is None else x


@functools.cache
def limits() -> dict[str, Limit]:
    """Every limit of ``data_schemas/plausibility.json``, by name."""
    with open(schemas_dir() / LIMITS_FILE, encoding="utf-8") as fh:
        raw = json.load(fh)["limits"]
    return {
        name: Limit(
            name,
            d["unit"],
            (_bound(d["error"]["min"]), _bound(d["error"]["max"])),
            (_bound(d["warn"]["min"]), _bound(d["warn"]["max"])),
            d["description"],
            d["source"],
        )
        for name, d in raw.items()
    }


def limit(name: str) -> Limit:
    """The limit called ``name`` (``KeyError`` naming the known ones otherwise)."""
    try:
        return limits()[name]
    except KeyError:
        raise KeyError(
            f"no plausibility limit {name!r}; known: {', '.join(sorted(limits()))}"
        ) from None


def _num(x: float) -> str:
    return f"{x:.6g}"


def _range(lo: float | None, hi: float | None, unit: str) -> str:
    u = f" {unit}" if unit else ""
    if lo is None:
        return f"at most {_num(hi)}{u}"
    if hi is None:
        return f"at least {_num(lo)}{u}"
    return f"{_num(lo)} to {_num(hi)}{u}"


def check(name: str, value: float) -> Finding | None:
    """Check ``value`` (in the limit's unit) against limit ``name``.

    Returns ``None`` when plausible, else a :class:`Finding` whose message names
    the value, the unit and the range (callers prefix the row, field or option).
    NaN and infinities are errors: a missing value never becomes a number.
    """
    lim = limit(name)
    u = f" {lim.unit}" if lim.unit else ""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return Finding(
            "error", f"expected a number ({lim.description}), got {value!r:.40}"
        )
    if not math.isfinite(x):
        return Finding(
            "error", f"expected a finite number ({lim.description}), got {value!r:.40}"
        )
    for level, (lo, hi) in (("error", lim.error), ("warning", lim.warn)):
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            what = "outside the plausible range" if level == "error" else "unusual"
            return Finding(
                level,
                f"{_num(x)}{u} is {what} for {lim.description} "
                f"({_range(lo, hi, lim.unit)})",
            )
    return None
