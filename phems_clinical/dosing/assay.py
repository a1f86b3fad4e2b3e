"""Measured factor levels on the model's assay scale (one-stage or chromogenic).

A population model is built on levels measured with one assay; for some products
the one-stage clotting assay and the chromogenic substrate assay differ
systematically, and the label gives a conversion (e.g. Afstyla: one-stage results
x 2, AFSTYLA US Prescribing Information, CSL Behring 2016; Altuviiio: chromogenic
results / 2.5, ALTUVIIIO EU SmPC, Sobi 2024). The model's product entry records
its ``assay`` and its ``assay_conversion`` (measured assay -> ``{factor, source}``;
the factor multiplies a level measured with that assay to put it on the model's
scale). :func:`conversion` applies the published factor, or says by name what
is wrong: assays differ with no published conversion, or the measured assay is
not given for a product whose label has one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["ASSAYS", "AssayConversion", "canonical", "conversion"]

ASSAYS = ("one-stage", "chromogenic")
_ALIASES = {
    "one-stage": "one-stage",
    "one stage": "one-stage",
    "osa": "one-stage",
    "one-stage (osa)": "one-stage",
    "chromogenic": "chromogenic",
    "csa": "chromogenic",
    "chromogenic (csa)": "chromogenic",
}
_NAMES = {
    "one-stage": "one-stage clotting assay",
    "chromogenic": "chromogenic substrate assay",
}


class AssayConversion(NamedTuple):
    """How levels measured with ``measured`` enter a model built on ``model``.

    ``factor`` multiplies the measured level (1.0 when nothing is converted);
    ``source`` is the label or paper of a published factor, or what the factor
    rests on ("same assay", "not given", ...); ``warning`` is a sentence for the
    clinician (None when there is nothing to say).
    """

    measured: str | None
    model: str | None
    factor: float
    source: str
    warning: str | None


def canonical(text: str | None) -> str | None:
    """``"one-stage"``, ``"chromogenic"`` or None (unknown, or both named).

    >>> canonical("OSA"), canonical("chromogenic (CSA)"), canonical(None)
    ('one-stage', 'chromogenic', None)
    >>> canonical("chromogenic (CSA) reference; one-stage (OSA) data also included")
    """
    if text is None:
        return None
    key = str(text).strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    found = {a for a in ASSAYS if a in key or a.replace("-", " ") in key}
    return found.pop() if len(found) == 1 else None


def _factors(table: Mapping | None) -> dict[str, tuple[float, str]]:
    out = {}
    for name, entry in (table or {}).items():
        assay = canonical(name)
        if assay is None or not isinstance(entry, Mapping):
            continue
        factor = entry.get("factor")
        if isinstance(factor, int | float) and math.isfinite(factor) and factor > 0:
            out[assay] = (float(factor), str(entry.get("source") or "label"))
    return out


def conversion(
    model_assay: str | None,
    table: Mapping | None,
    measured: str | None,
    *,
    covariate: bool = False,
) -> AssayConversion:
    """The factor that puts a level measured with ``measured`` on the model's scale.

    Parameters
    ----------
    model_assay : str or None
        The assay of the model's data (``"one-stage"``, ``"chromogenic"``, the
        library's ``"one-stage (OSA)"`` forms, or None when not recorded).
    table : mapping or None
        The model's ``assay_conversion``: measured assay -> ``{"factor": float,
        "source": str}``.
    measured : str or None
        The assay the levels were measured with; None when not given.
    covariate : bool
        The model has an ``ASSAY`` covariate: it models the assay itself, so
        nothing is converted.

    Examples
    --------
    >>> afstyla = {"one-stage": {"factor": 2.0, "source": "AFSTYLA US PI"}}
    >>> conversion("chromogenic", afstyla, "one-stage")[2:4]
    (2.0, 'AFSTYLA US PI')
    >>> conversion("chromogenic", {}, "one-stage").warning[:40]
    'levels measured with the one-stage clott'
    """
    model = canonical(model_assay)
    factors = _factors(table)
    if covariate:
        return AssayConversion(measured, model, 1.0, "model covariate ASSAY", None)
    if measured is None:
        others = sorted(a for a in factors if a != model)
        if not others:
            return AssayConversion(None, model, 1.0, "not given", None)
        a = others[0]
        f, src = factors[a]
        return AssayConversion(
            None,
            model,
            1.0,
            "not given",
            (
                f"the assay of the levels was not given; for this product, levels "
                f"measured with the {_NAMES[a]} are multiplied by {f:g} ({src}) to put "
                f'them on the model\'s scale. Give assay ("one-stage" or '
                f'"chromogenic"); the levels were used as measured'
            ),
        )
    if measured in factors and measured != model:
        f, src = factors[measured]
        return AssayConversion(measured, model, f, src, None)
    if model is None:
        return AssayConversion(
            measured,
            None,
            1.0,
            "model assay not recorded",
            (
                f"levels measured with the {_NAMES[measured]}; the model does not record "
                "the assay of its data, so a difference between assays cannot be "
                "checked or converted; the levels were used as measured"
            ),
        )
    if measured == model:
        return AssayConversion(measured, model, 1.0, "same assay", None)
    return AssayConversion(
        measured,
        model,
        1.0,
        "no published conversion",
        (
            f"levels measured with the {_NAMES[measured]}, but the model was built on "
            f"levels from the {_NAMES[model]} and no published conversion between them "
            "is recorded for this product; the levels were used unconverted, and the "
            "estimates may be biased by the difference between the assays"
        ),
    )
