"""Every text and number the dosing tool shows, for all three views.

:func:`display` turns a dosing result (raw numbers, ``result.json``) into
``result["display"]``: a title, a summary (label/value pairs), the regimen tables,
warnings and notes, all as finished text. The command line prints it
(:func:`as_text`), the HTML report renders it and the web page shows it; no view
formats a number itself, so the three say the same thing in the same words.

One formatter per kind of value: :func:`number` (3 significant figures),
:func:`probability` (``"> 99 %"``, ``"< 1 %"``, ``"87 %"``), :func:`estimate`
(median with its 90 % interval and unit), :func:`dose` (whole IU) and
:func:`schedule`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from phems_clinical.evaluation.numbers import DASH, dose, label, number, value

__all__ = [
    "DASH",
    "REGIMEN_COLUMNS",
    "as_text",
    "comparison",
    "display",
    "dose",
    "estimate",
    "number",
    "probability",
    "schedule",
]

NOT_REACHED = "not reached"

# Peak flags: the level above which a factor is associated with venous thrombosis.
_PEAK_RISK = {
    "FVIII": (
        "factor VIII above 150 IU/dL is associated with venous thrombosis "
        "(Koster T, et al. Lancet 1995;345:152-155)"
    ),
    "FIX": (
        "factor IX above 129 IU/dL is associated with venous thrombosis "
        "(van Hylckama Vlieg A, et al. Blood 2000;95:3678-3682)"
    ),
}


def probability(p: Any) -> str:
    """A probability as a whole percentage, never 0 % or 100 % (a finite number of
    posterior draws cannot show certainty).

    >>> probability(0.874), probability(1.0), probability(0.996), probability(0.0)
    ('87 %', '> 99 %', '> 99 %', '< 1 %')
    >>> probability(None)
    '–'
    """
    v = value(p)
    if v is None:
        return DASH
    if v >= 0.995:
        return "> 99 %"
    if v < 0.005:
        return "< 1 %"
    return f"{100 * v:.0f} %"


def estimate(est: Any, unit: str, *, inf: str = NOT_REACHED) -> str:
    """A posterior estimate as ``"17.6 h (90 % interval 15.1–20.3 h)"``.

    An infinite median reads ``inf`` (e.g. a level never reached); an infinite
    interval bound reads ``∞``.

    >>> estimate({"median": 17.63, "lo90": 15.12, "hi90": 20.31}, "h")
    '17.6 h (90 % interval 15.1–20.3 h)'
    >>> estimate({"median": "inf", "lo90": 70.2, "hi90": "inf"}, "h")
    'not reached (90 % interval 70.2 h–∞)'
    """
    if not isinstance(est, Mapping):
        v = value(est)
        return DASH if v is None else f"{number(v)} {unit}".rstrip()
    med, lo, hi = (value(est.get(k)) for k in ("median", "lo90", "hi90"))
    sep = " " if unit else ""
    head = (
        DASH if med is None else inf if math.isinf(med) else f"{number(med)}{sep}{unit}"
    )
    if lo is None and hi is None:
        return head
    lo_t = number(lo)
    hi_t = number(hi) + (
        f"{sep}{unit}" if hi is not None and not math.isinf(hi) else ""
    )
    if hi is not None and math.isinf(hi) and lo is not None:
        lo_t += f"{sep}{unit}"
    return f"{head} (90 % interval {lo_t}{DASH}{hi_t})"


def per_kg(x: Any) -> str:
    """IU/kg to 3 significant figures: ``"40.0 IU/kg"``."""
    v = value(x)
    return DASH if v is None or math.isinf(v) else f"{number(v)} IU/kg"


def schedule(s: Any) -> str:
    """A schedule's label (``"Mon/Wed/Fri"``, ``"every 48 h"``) from a designer
    schedule dict, a bare interval in h, or text."""
    if isinstance(s, Mapping):
        if s.get("label"):
            return str(s["label"])
        s = s.get("every_h")
    v = value(s)
    if v is not None:
        return f"every {label(v)} h"
    return DASH if s is None else str(s)


# --------------------------------------------------------------------- tables

REGIMEN_COLUMNS = (
    "Schedule",
    "Target",
    "Dose",
    "IU/kg per infusion",
    "IU/kg per week",
    "Vials",
    "Trough",
    "P(trough \u2265 target)",
    "Peak",
    "Hours above {thr} IU/dL per week",
    "Flags",
)


def _vials(vials: Any) -> str:
    if not vials:
        return DASH
    return (
        " + ".join(
            f"{int(v['count'])} \u00d7 {int(v['size_IU']):,}"
            for v in vials
            if int(v.get("count", 0)) > 0
        )
        or DASH
    )


def _peak_flag(reg: Mapping, factor: str | None, flag_at: float) -> str | None:
    if not reg.get("peak_flag"):
        return None
    med = value((reg.get("peak_IU_dL") or {}).get("median"))
    risk = _PEAK_RISK.get(factor or "", _PEAK_RISK["FVIII"])
    return f"peak {number(med)} IU/dL is above {label(flag_at)} IU/dL: {risk}"


def _regimen_row(
    reg: Mapping,
    thr: str | None,
    factor: str | None,
    flag_at: float,
    probability_required: float,
) -> list[str]:
    flags = []
    if reg.get("status") == "above_cap":
        flags.append(
            f"cap: no dose up to the cap of {label(reg.get('cap_IU_kg'))} IU/kg "
            f"meets this target with P \u2265 {probability(probability_required)}; "
            "the cap's dose is shown"
        )
    if (text := _peak_flag(reg, factor, flag_at)) is not None:
        flags.append(text)
    if reg.get("exceeds_cap"):
        flags.append(f"above the cap of {label(reg.get('cap_IU_kg'))} IU/kg")
    if reg.get("vials_exact") is False:
        flags.append(
            "not a vial total: the vials shown make up the nearest total above it"
        )
    target = value(reg.get("target_IU_dL"))
    above = (reg.get("time_above_h_per_week") or {}).get(thr) if thr else None
    trough = reg.get("trough_IU_dL")
    return [
        schedule(reg.get("schedule")),
        DASH if target is None else f"{label(target)} IU/dL",
        dose(reg.get("dose_IU"))
        + (" (cap)" if reg.get("status") == "above_cap" else ""),
        per_kg(reg.get("dose_IU_kg")),
        per_kg(reg.get("dose_IU_kg_week")),
        _vials(reg.get("vials")),
        estimate(trough, "IU/dL") if trough is not None else DASH,
        probability(reg.get("trough_prob")),
        estimate(reg.get("peak_IU_dL"), "IU/dL"),
        estimate(above, "h") if above is not None else DASH,
        "; ".join(flags),
    ]


def _table(
    regs: Sequence[Mapping],
    thr: str | None,
    factor: str | None,
    flag_at: float,
    prob: float,
) -> dict:
    cols = [c.format(thr=label(thr) if thr else DASH) for c in REGIMEN_COLUMNS]
    return {
        "columns": cols,
        "rows": [_regimen_row(r, thr, factor, flag_at, prob) for r in regs],
    }


# --------------------------------------------------------------------- display


def _summary(result: Mapping, ehl: bool) -> list[dict]:
    half = [
        ("Effective half-life", estimate(result.get("effective_half_life_h"), "h")),
        ("Terminal half-life", estimate(result.get("half_life_h"), "h")),
    ]
    items: list[tuple[str, str]] = half if ehl else half[::-1]
    items += [
        ("Clearance", estimate(result.get("clearance_mL_h_kg"), "mL/h/kg")),
        ("Clearance (total)", estimate(result.get("clearance_dL_h"), "dL/h")),
        ("Volume at steady state", estimate(result.get("vss_dL"), "dL")),
        (
            "Incremental recovery",
            estimate(result.get("incremental_recovery"), "IU/dL per IU/kg"),
        ),
    ]
    for key, after in (
        ("time_to_threshold_h", "after the last infusion"),
        (
            "time_to_threshold_after_standard_dose_h",
            f"after {dose(result.get('standard_dose_IU'))} "
            f"({label(result.get('standard_dose_IU_kg'))} IU/kg)",
        ),
    ):
        times = result.get(key) or {}
        for thr in sorted(times, key=lambda k: value(k) or 0.0):
            items.append(
                (f"Time to {label(thr)} IU/dL {after}", estimate(times[thr], "h"))
            )
    cur = result.get("current_regimen")
    if cur:
        probs = result.get("current_regimen_trough_prob") or {}
        parts = [
            f"P(trough \u2265 {label(k)} IU/dL) {probability(probs[k])}"
            for k in sorted(probs, key=lambda k: value(k) or 0.0)
        ]
        items.append(
            (
                "Current regimen",
                f"{dose(cur.get('dose_IU'))} "
                f"{schedule(cur.get('interval_h'))}"
                + (": " + ", ".join(parts) if parts else ""),
            )
        )
    if result.get("patient_id") is not None:
        items.append(("Patient", str(result["patient_id"])))
    cov = result.get("covariates") or {}
    wt = value((cov.get("WT") or {}).get("value"))
    weight = result.get("weight") or {}
    if weight.get("unit") == "lb":
        items.append(
            ("Body weight", f"{label(weight.get('value'))} lb ({number(wt)} kg)")
        )
    else:
        items.append(("Body weight", f"{label(wt)} kg"))
    items.append(("Age", f"{label((cov.get('AGE') or {}).get('value'))} y"))
    assay = result.get("assay") or {}
    if assay.get("measured") or assay.get("model"):
        items.append(("Assay", _assay_text(assay)))
    items.append(("Method", str(result.get("uncertainty") or DASH)))
    return [{"label": k, "value": v} for k, v in items]


_ASSAY_NAME = {
    "one-stage": "one-stage",
    "chromogenic": "chromogenic",
    None: "not given",
}


def _assay_text(assay: Mapping) -> str:
    measured = _ASSAY_NAME.get(assay.get("measured"), str(assay.get("measured")))
    model = assay.get("model") or "not recorded"
    text = f"levels {measured}, model {model}"
    f = value(assay.get("factor"))
    if f is not None and f != 1.0:
        text += f"; levels multiplied by {number(f)} ({assay.get('source')})"
    return text


def _notes(result: Mapping) -> list[str]:
    prob = probability(result.get("trough_probability"))
    notes = [
        (
            "Designed doses: the smallest dose per infusion, made up of whole vials, "
            f"whose steady-state trough stays at or above the target with probability "
            f"\u2265 {prob}; the cap is {label(result.get('max_dose_IU_kg'))} IU/kg "
            "per infusion."
        ),
        (
            "A 90 % interval is the range within which the quantity lies with 90 % "
            "probability under the population model and this patient's levels; it "
            "does not include the assay error of future samples."
        ),
        (
            "Predictions for patients outside the model's population, or far beyond "
            "the last measured level, are extrapolations."
        ),
        (
            "This is decision support: the treating clinician decides on the regimen, "
            "taking into account bleeding history, activity, joint status and "
            "adherence."
        ),
    ]
    assay = result.get("assay") or {}
    f = value(assay.get("factor"))
    if f is not None and f != 1.0:
        notes.insert(
            0,
            f"Measured levels ({assay.get('measured')} assay) were "
            f"multiplied by {number(f)} to put them on the model's "
            f"{assay.get('model') or ''} scale ({assay.get('source')}).",
        )
    return notes


def _warnings(result: Mapping) -> list[str]:
    out = []
    for w in result.get("warnings") or []:
        field = w.get("field") if isinstance(w, Mapping) else ""
        msg = w.get("message") if isinstance(w, Mapping) else str(w)
        out.append(f"{field}: {msg}" if field else str(msg))
    return out


def _levels_table(result: Mapping) -> dict:
    rows = []
    for lv in result.get("levels") or []:
        if lv.get("blq"):
            measured = f"below LLOQ {number(lv.get('lloq_IU_dL'))} IU/dL"
        else:
            measured = f"{number(lv.get('value_IU_dL'))} IU/dL"
        rows.append(
            [
                f"{label(lv.get('time_h'))} h",
                lv.get("datetime") or DASH,
                measured,
                estimate(lv.get("predicted"), "IU/dL"),
            ]
        )
    return {
        "columns": ["Time", "Date-time", "Measured (model scale)", "Predicted"],
        "rows": rows,
    }


# Display name and unit of the model covariates, with value labels of coded ones.
_COVARIATES: dict[str, tuple[str, str, dict[float, str] | None]] = {
    "WT": ("Body weight", "kg", None),
    "AGE": ("Age", "y", None),
    "HT": ("Height", "cm", None),
    "LBW": ("Lean body weight", "kg", None),
    "FFM": ("Fat-free mass", "kg", None),
    "VWF": ("VWF antigen", "IU/dL", None),
    "BGO": ("Blood group", "", {1.0: "O", 0.0: "non-O"}),
    "ASSAY": ("Factor assay", "", {1.0: "one-stage", 0.0: "chromogenic"}),
    "SEX": ("Sex", "", {0.0: "male", 1.0: "female"}),
    "HCT": ("Haematocrit", "%", None),
}


def _range_text(lo: Any, hi: Any, unit: str) -> str:
    lo, hi = value(lo), value(hi)
    if lo is None and hi is None:
        return "not stated"
    if hi is None:
        return f"\u2265 {label(lo)} {unit}".rstrip()
    if lo is None:
        return f"\u2264 {label(hi)} {unit}".rstrip()
    return f"{label(lo)}{DASH}{label(hi)} {unit}".rstrip()


def _covariates_table(result: Mapping) -> dict:
    ranges = (result.get("model") or {}).get("validated_range") or {}
    rows = []
    for key, cov in (result.get("covariates") or {}).items():
        name, unit, names = _COVARIATES.get(key, (key, "", None))
        v = value(cov.get("value"))
        shown = (
            names.get(v, label(v))
            if names and v is not None
            else f"{label(v)} {unit}".rstrip()
        )
        notes = []
        if cov.get("source") == "assumed":
            notes.append("assumed, not measured")
        lo, hi = (list(ranges.get(key) or (None, None)) + [None, None])[:2]
        lo, hi = value(lo), value(hi)
        if v is not None and (
            (lo is not None and v < lo) or (hi is not None and v > hi)
        ):
            notes.append(f"outside the model range {_range_text(lo, hi, unit)}")
        rows.append(
            [f"{name} ({key})", shown, str(cov.get("source") or DASH), "; ".join(notes)]
        )
    return {"columns": ["Covariate", "Value", "Source", "Note"], "rows": rows}


def _model_table(result: Mapping) -> dict:
    model = result.get("model") or {}
    rng = model.get("validated_range") or {}
    rows = [
        [
            "Product and model",
            str(result.get("product_display") or model.get("name") or DASH),
        ],
        ["Citation", str(model.get("citation") or DASH)],
        [
            "Source",
            "model file " + str(model.get("path") or "")
            if model.get("source") == "file"
            else "product library",
        ],
        [
            "Factor",
            f"{model.get('factor') or DASH}, "
            f"{model.get('half_life_class') or DASH} half-life",
        ],
    ]
    for key in ("AGE", "WT"):
        name, unit, _ = _COVARIATES[key]
        lo, hi = (list(rng.get(key) or (None, None)) + [None, None])[:2]
        rows.append([f"{name} range of the model", _range_text(lo, hi, unit)])
    if model.get("choose_when"):
        rows.append(["When to choose it", str(model["choose_when"])])
    unverified = model.get("unverified") or []
    rows.append(
        [
            "Unverified model sections",
            ", ".join(map(str, unverified)) if unverified else "none",
        ]
    )
    return {"columns": ["Item", "Value"], "rows": rows}


def display(result: Mapping, previous: Mapping | None = None) -> dict:
    """``result["display"]``: everything the three views show, as text.

    Parameters
    ----------
    result : mapping
        A dosing result (raw numbers) without ``display``.
    previous : mapping, optional
        An earlier assessment's result of the same patient: adds ``comparison``.

    Returns
    -------
    dict
        ``title``, ``summary`` (list of ``{"label", "value"}``), ``regimen_table``
        and ``evaluated_table`` (``{"columns", "rows"}``), ``levels_table``,
        ``covariates_table``, ``model_table``,
        ``warnings`` (``"<field>: <message>"``), ``notes`` and, with
        ``previous``, ``comparison``. Extended half-life products lead the
        summary with the effective half-life.
    """
    model = result.get("model") or {}
    ehl = model.get("half_life_class") == "extended"
    thresholds = result.get("thresholds_IU_dL") or []
    thr = label(min(thresholds)) if thresholds else None
    factor = model.get("factor")
    flag_at = value(result.get("peak_flag_IU_dL")) or 150.0
    prob = value(result.get("trough_probability")) or 0.9
    out = {
        "title": str(result.get("product_display") or model.get("name") or "Dosing"),
        "summary": _summary(result, ehl),
        "regimen_table": _table(
            result.get("regimens") or [], thr, factor, flag_at, prob
        ),
        "evaluated_table": _table(
            result.get("evaluated_regimens") or [], thr, factor, flag_at, prob
        ),
        "levels_table": _levels_table(result),
        "covariates_table": _covariates_table(result),
        "model_table": _model_table(result),
        "warnings": _warnings(result),
        "notes": _notes(result),
    }
    if previous is not None:
        out["comparison"] = comparison(result, previous)
    return out


def _chosen_trough(result: Mapping) -> str:
    """The trough of the regimen the clinician chose (the first evaluated one),
    else of the current regimen."""
    for reg in result.get("evaluated_regimens") or []:
        tr = reg.get("trough_IU_dL")
        return f"{schedule(reg.get('schedule'))} {dose(reg.get('dose_IU'))}: " + (
            estimate(tr, "IU/dL") if tr is not None else DASH
        )
    cur = result.get("current_regimen")
    probs = result.get("current_regimen_trough_prob") or {}
    if cur and probs:
        k = min(probs, key=lambda k: value(k) or 0.0)
        return (
            f"{schedule(cur.get('interval_h'))} {dose(cur.get('dose_IU'))}: "
            f"P(trough \u2265 {label(k)} IU/dL) {probability(probs[k])}"
        )
    return DASH


def comparison(result: Mapping, previous: Mapping) -> dict:
    """The previous assessment beside this one: date, product, effective and
    terminal half-life, clearance and the chosen regimen's trough."""

    def row(r: Mapping, when: str) -> list[str]:
        return [
            str(r.get("assessed_at") or r.get("assessed") or DASH)[:16].replace(
                "T", " "
            ),
            str(r.get("product_display") or r.get("product") or DASH),
            estimate(r.get("effective_half_life_h"), "h"),
            estimate(r.get("half_life_h"), "h"),
            estimate(r.get("clearance_mL_h_kg"), "mL/h/kg"),
            _chosen_trough(r),
            when,
        ]

    return {
        "columns": [
            "Date",
            "Product",
            "Effective half-life",
            "Terminal half-life",
            "Clearance",
            "Chosen regimen's trough",
            "Assessment",
        ],
        "rows": [row(previous, "previous"), row(result, "this")],
    }


def as_text(disp: Mapping) -> str:
    """``display`` as plain text for the command line (one item per line)."""
    lines = [str(disp["title"])]
    lines += [f"  {s['label']}: {s['value']}" for s in disp["summary"]]
    for key, head in (
        ("regimen_table", "Designed regimens"),
        ("evaluated_table", "Evaluated regimens"),
        ("comparison", "Previous assessment"),
    ):
        table = disp.get(key)
        if not table or not table["rows"]:
            continue
        lines.append(f"{head}:")
        cols = table["columns"]
        for row in table["rows"]:
            lines.append(
                "  "
                + row[0]
                + ": "
                + "; ".join(
                    f"{c} {v}"
                    for c, v in zip(cols[1:], row[1:], strict=True)
                    if v and v != DASH
                )
            )
    lines += [f"warning: {w}" for w in disp["warnings"]]
    lines += [f"note: {n}" for n in disp["notes"]]
    return "\n".join(lines)
