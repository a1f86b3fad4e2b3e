"""How numbers are written for people: one formatter for every report and view.

Used by the dosing text (:mod:`phems_clinical.dosing.wording`, the words of the
command line, the report and the page) and by the figure of
:mod:`phems_clinical.evaluation.report`, so that a value reads the same in all of
them. Pure Python, no dependencies.

>>> number(11.7349), number(0.021349), number(1234.5), number(None)
('11.7', '0.0213', '1,230', '–')
>>> number(48.0), label(48.0), label(2.5), number(float("inf")), number("inf")
('48.0', '48', '2.5', '∞', '∞')
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DASH", "dose", "label", "number", "value"]

DASH = "\u2013"  # en dash: a missing value, and ranges


def value(x: Any) -> float | None:
    """A float from a number or the JSON strings ``"inf"``/``"-inf"``; None for
    None, NaN, booleans and anything else."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def number(x: Any, *, sig: int = 3, inf: str = "\u221e") -> str:
    """A number to ``sig`` significant figures, without exponent, thousands
    separated by commas; trailing zeros kept (they state the precision). Missing
    values read as an en dash, +infinity as ``inf``."""
    v = value(x)
    if v is None:
        return DASH
    if math.isinf(v):
        return inf if v > 0 else "-" + inf
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    v = round(v, sig - 1 - mag)
    mag = math.floor(math.log10(abs(v))) if v else 0  # 9.996 rounds up to 10.0
    return f"{v:,.{max(0, sig - 1 - mag)}f}"


def label(x: Any) -> str:
    """An input value such as a target, threshold or axis tick: up to 3
    significant figures without trailing zeros (``1``, ``2.5``, ``48``)."""
    text = number(x)
    return text.rstrip("0").rstrip(".") if "." in text else text


def dose(x: Any, unit: str = "IU") -> str:
    """A dose: whole IU with thousands separators (vial sums are exact).

    >>> dose(1250.0), dose(None)
    ('1,250 IU', '–')
    """
    v = value(x)
    return DASH if v is None or math.isinf(v) else f"{v:,.0f} {unit}"
