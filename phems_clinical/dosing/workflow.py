"""The dosing workflow: one patient's request in, one assessment out.

:func:`assess` is the one entry point of the clinician's dosing tool (the command
line, the web app and the patient history call it through
:func:`phems_clinical.app.dose.run_dose`). Steps:

1. parse and check the request
   (:func:`~phems_clinical.data.dosing_request.parse_request`);
2. resolve the population model: a library product by id or brand
   (:func:`~phems_clinical.pk.library.resolve_product`), or a fitted ``model.yaml``
   whose fit converged; a model with sections not verified against the primary
   paper (variability, residual error, parameters) is refused unless the request
   acknowledges them (``acknowledge_unverified``), and the acknowledgement is
   recorded in the result;
3. put the measured levels on the model's assay scale
   (:mod:`phems_clinical.dosing.assay`);
4. the covariates the model needs (given, derived or assumed, always reported)
   and the population's validated range;
5. check the levels against the model's prior predictive range: a level that fits
   only in the other unit is refused as a unit mix-up, one far outside the range
   in both units is refused, one just outside it is warned about;
6. estimate: MAP with Laplace draws, or NUTS (:mod:`phems_clinical.pk.forecast`);
   a MAP search that stops with a gradient above :data:`MAP_GRADIENT_TOL` is
   warned about;
7. summaries and regimens per posterior draw (:mod:`phems_clinical.pk.dosing`,
   the regimen designer);
8. ``result["display"]``: every text the three views show
   (:mod:`phems_clinical.dosing.wording`), the figure and the HTML report.

Every problem with the input raises :class:`RequestError` naming the field; so
does a calculation that would give a non-finite number.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from phems_clinical.data import plausibility
from phems_clinical.data.dosing_request import (
    LB_KG,
    DosingRequest,
    FieldError,
    RequestError,
    parse_request,
)
from phems_clinical.dosing import wording
from phems_clinical.dosing.assay import conversion

__all__ = [
    "METHODS",
    "MAP_GRADIENT_TOL",
    "Assessment",
    "assess",
    "default_schedules",
    "redraw",
    "requires_acknowledgement",
    "for_figure",
]

METHODS = ("map", "nuts")
SCHEMA_VERSION = 2
#: A MAP search is taken as converged when the largest absolute gradient of the
#: negative log posterior is below this.
MAP_GRADIENT_TOL = 1e-5
#: Plotting horizon after the last infusion, h: standard / extended half-life.
HORIZON_H = {"standard": 96.0, "extended": 168.0}
_PRIOR_PREDICTIVE_DRAWS = 2000
_IMPLAUSIBLE = (0.0005, 0.9995)  # prior predictive quantiles for the level check
# A level more than this factor outside the 99.9% prior predictive range (in both
# units) is refused, not warned about: the dose, time or value is wrong (ours).
_REFUSE_FACTOR = 3.0
_TITLE_ID_CHARS = 24  # patient id shown in the figure's title (ellipsis beyond)
# Unverified entries that do not change a prediction: no acknowledgement needed.
_INFORMATIONAL = (
    "vial_sizes_IU",
    "vial_notes",
    "reference_values",
    "external_validation",
)

_REQUEST_FIELD = {
    "VWF": "vwf_IU_dL",
    "HCT": "hematocrit_pct",
    "HT": "height_cm",
    "BGO": "blood_group",
    "ASSAY": "assay",
    "SEX": "sex",
}


class Assessment(NamedTuple):
    """``result`` is what ``result.json`` holds (with ``result["display"]``, the
    text of all three views); the PNG and HTML are ready to save."""

    result: dict
    curve_png: bytes
    report_html: str


# ------------------------------------------------------------------ the model


def _for_forecasting(model):
    """BLQ levels always enter by M3 here: a model fitted with ``blq: drop`` says how
    the population was estimated, but dropping a patient's BLQ level would discard
    what it says about them (the level is below the LLOQ)."""
    return replace(model, blq="m3")


@lru_cache(maxsize=32)
def _product(name: str):
    from phems_clinical.pk.library import load_product

    # one model object per product, so compiled code is reused between patients
    return _for_forecasting(load_product(name))


@lru_cache(maxsize=32)
def _model_file(path: str, mtime_ns: int):
    from phems_clinical.pk.spec import load_model

    return _for_forecasting(load_model(path))


def _resolve_product(text: str) -> str:
    from phems_clinical.pk import library

    resolve = getattr(library, "resolve_product", None)
    if resolve is not None:
        try:
            return resolve(text)
        except ValueError as err:
            text = str(err)  # the library's message may name the field itself
            raise RequestError(
                [FieldError("product", text.removeprefix("product: "))]
            ) from None
    name, known = text.strip().lower(), library.list_products()
    if name not in known:
        raise RequestError(
            [
                FieldError(
                    "product",
                    (f"unknown product {text!r}; known products: {', '.join(known)}"),
                )
            ]
        )
    return name


def _product_info(pid: str) -> Any:
    """The library's display metadata (``pk.library.product_info``), or None
    where the library has none for this entry."""
    from phems_clinical.pk import library

    info = getattr(library, "product_info", None)
    if info is None:
        return None
    try:
        return info(pid)
    except (ValueError, KeyError, OSError):
        return None


def _resolve_model(req: DosingRequest) -> tuple[Any, dict]:
    from phems_clinical.pk.spec import ModelSpecError

    if req.product is not None:
        pid = _resolve_product(req.product)
        return _product(pid), {"source": "library", "path": None, "id": pid}
    path = Path(req.model_path)
    if not path.is_file():
        raise RequestError(
            [
                FieldError(
                    "model",
                    f"model file {str(path)!r} not found "
                    "(give the path of a model.yaml)",
                )
            ]
        )
    try:
        model = _model_file(str(path.resolve()), path.stat().st_mtime_ns)
    except (ModelSpecError, OSError, ValueError) as err:
        raise RequestError(
            [
                FieldError(
                    "model", f"cannot use {str(path)!r} as a population model: {err}"
                )
            ]
        ) from None
    fitted = model.metadata.get("fitted")
    if fitted is not None and not (
        isinstance(fitted, dict) and fitted.get("converged") is True
    ):
        said = (
            f"fitted.converged is {fitted.get('converged')!r}"
            if isinstance(fitted, dict) and "converged" in fitted
            else "its fitted block does not record convergence"
        )
        raise RequestError(
            [
                FieldError(
                    "model",
                    (
                        f"{str(path)!r} comes from a fit that did not converge ({said}); "
                        "a failed fit is no prior for dosing: refit, or use a library "
                        "product"
                    ),
                )
            ]
        )
    return model, {"source": "file", "path": str(path), "id": None}


def _display_name(model, info, source: dict) -> str:
    if info is not None and getattr(info, "display", None):
        return str(info.display)
    meta = model.metadata
    if meta.get("brand") and meta.get("model_label"):
        inn = f" ({meta['inn']})" if meta.get("inn") else ""
        return f"{meta['brand']}{inn} \u2014 {meta['model_label']}"
    if source["source"] == "file":
        return f"model file {Path(source['path']).name} ({model.name})"
    return str(meta.get("product") or model.name)


def requires_acknowledgement(unverified) -> list[str]:
    """The unverified sections that change predictions (variability, residual
    error, parameters, covariates): all but vial sizes and reference values.

    >>> requires_acknowledgement(["iiv", "iov", "residual", "vial_sizes_IU"])
    ['iiv', 'iov', 'residual']
    """
    return [str(s) for s in unverified or () if not str(s).startswith(_INFORMATIONAL)]


def _acknowledgement(
    model, req: DosingRequest, name: str
) -> tuple[list[str], list[FieldError]]:
    """Refuse a model with unverified sections unless acknowledged; else the
    sections acknowledged and the warning that says so."""
    sections = requires_acknowledgement(model.metadata.get("unverified"))
    if not sections:
        return [], []
    sources = model.metadata.get("sources") or {}

    def where(s: str) -> str:
        src = sources.get(s.split(".")[0]) if isinstance(sources, dict) else None
        if isinstance(src, dict) and (src.get("where") or src.get("grade")):
            grade = f"grade {src['grade']}: " if src.get("grade") else ""
            return f"{s} ({grade}{src.get('where') or 'source not recorded'})"
        return f"{s} (source not recorded)"

    listed = "; ".join(where(s) for s in sections)
    if not req.acknowledge_unverified:
        raise RequestError(
            [
                FieldError(
                    "acknowledge_unverified",
                    (
                        f"{name} has model sections not verified against the primary paper: "
                        f"{listed}. Every interval and trough probability depends on them. To "
                        'use it anyway, acknowledge this (request: "acknowledge_unverified": '
                        "true; command line: --accept-unverified; page: the acknowledgement "
                        "box), or choose a verified product"
                    ),
                )
            ]
        )
    return sections, [
        FieldError(
            "acknowledge_unverified",
            (
                f"used with unverified model sections acknowledged: {listed}; intervals "
                "and trough probabilities rest on values not checked against the primary "
                "paper"
            ),
        )
    ]


# ------------------------------------------------------------------ the patient


def _assay(
    model, info, req: DosingRequest
) -> tuple[DosingRequest, dict, list[float], list[FieldError]]:
    """Levels on the model's assay scale, the assay record and the warnings."""
    meta = model.metadata
    model_assay = getattr(info, "assay", None) if info is not None else None
    model_assay = model_assay or meta.get("assay")
    table = (
        getattr(info, "assay_conversion", None) if info is not None else None
    ) or meta.get("assay_conversion")
    covariate = "ASSAY" in model.covariate_names
    warnings: dict[str, FieldError] = {}
    levels, factors = [], []
    head = conversion(model_assay, table, req.assay, covariate=covariate)
    if head.warning and (
        req.assay is not None
        or not req.levels
        or any(lv.assay is None for lv in req.levels)
    ):
        warnings[head.warning] = FieldError("assay", head.warning)
    for lv in req.levels:
        c = (
            head
            if lv.assay is None
            else conversion(model_assay, table, lv.assay, covariate=covariate)
        )
        if lv.assay is not None and c.warning and c.warning not in warnings:
            warnings[c.warning] = FieldError(f"levels[{lv.index}].assay", c.warning)
        factors.append(c.factor)
        levels.append(
            lv._replace(
                value_IU_dL=lv.value_IU_dL * c.factor,
                lloq_IU_dL=lv.lloq_IU_dL * c.factor,
            )
        )
    record = {
        "measured": req.assay,
        "model": head.model,
        "factor": head.factor,
        "source": head.source,
    }
    if any(lv.assay is not None for lv in req.levels):
        record["levels"] = [
            {"index": lv.index, "measured": lv.assay or req.assay, "factor": f}
            for lv, f in zip(req.levels, factors, strict=True)
        ]
    return (
        req._replace(levels=tuple(levels)),
        record,
        factors,
        list(warnings.values()),
    )


def _covariates(model, req: DosingRequest) -> tuple[dict[str, dict], list[FieldError]]:
    """The model's covariates with their source: given, derived or assumed."""
    from phems_clinical.data.demographics import (
        fat_free_mass,
        growth_medians,
        lean_body_weight,
    )

    given = dict(req.covariates)
    out: dict[str, dict] = {}
    warnings: list[FieldError] = []
    sex = "female" if given.get("SEX") == 1 else "male"
    for name in ("WT", "AGE"):
        out[name] = {"value": given[name], "source": "given"}
    for name in model.covariate_names:
        if name in out:
            continue
        if name in given:
            out[name] = {"value": given[name], "source": "given"}
        elif name in ("LBW", "FFM"):
            if "HT" in given:
                ht, src = given["HT"], "derived"
            else:
                ht = float(growth_medians(np.array([req.age_y]), sex)[0][0])
                src = "assumed"
                warnings.append(
                    FieldError(
                        "height_cm",
                        (
                            f"height not given: the median height for age ({ht:.0f} cm) "
                            f"was assumed to compute {name}; give height_cm for accuracy"
                        ),
                    )
                )
            value = (
                lean_body_weight(req.weight_kg, ht, sex)
                if name == "LBW"
                else fat_free_mass(req.weight_kg, ht, sex, req.age_y)
            )
            out[name] = {"value": round(float(value), 2), "source": src}
        else:
            ref = float(model.reference_covariates.get(name, 0.0))
            out[name] = {"value": ref, "source": "assumed"}
            warnings.append(
                FieldError(
                    _REQUEST_FIELD.get(name, "covariates"),
                    (
                        f"{name} not given: the model's reference value {ref:g} was assumed"
                    ),
                )
            )
    return out, warnings


def _range_warnings(model, req: DosingRequest) -> list[FieldError]:
    from phems_clinical.pk.dosing import validated_range

    rng = validated_range(model)
    out = []
    wfield = "weight_kg" if req.weight_unit == "kg" else "weight_lb"
    for name, field, value, unit in (
        ("AGE", "age_y", req.age_y, "y"),
        ("WT", wfield, req.weight_kg, "kg"),
    ):
        lo, hi = rng[name]
        if lo is None and hi is None:
            out.append(
                FieldError(
                    field,
                    (
                        f"the model records no validated {name} range: the prediction may be "
                        "an extrapolation"
                    ),
                )
            )
        elif (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f"{lo:g}-{hi:g}" if hi is not None else f">= {lo:g}"
            out.append(
                FieldError(
                    field,
                    (
                        f"{value:.4g} {unit} is outside the range the model was built on "
                        f"({span} {unit}): results are an extrapolation, interpret with "
                        "care"
                    ),
                )
            )
    return out


def _bucket(n: int, floor: int) -> int:
    """Pad sizes to powers of two so compiled code is shared between patients."""
    return max(floor, 1 << max(0, n - 1).bit_length())


def _subject(model, req: DosingRequest, cov: np.ndarray):
    """One patient's Cohort row; with IOV each infusion is its own occasion."""
    import jax

    from phems_clinical.data.cohort import stack_subjects

    t_inf = np.array([i.time_h for i in req.infusions])
    iov = model.n_kappa > 0
    dose_occ = np.arange(len(t_inf)) if iov else np.zeros(len(t_inf), int)
    t_obs = np.array([lv.time_h for lv in req.levels])
    # a level belongs to the occasion of the latest infusion started before it
    obs_occ = (
        np.searchsorted(t_inf, t_obs, side="left") - 1
        if iov
        else np.zeros(len(t_obs), int)
    )
    row = dict(
        dose_time=t_inf,
        dose_amt=[i.dose_IU for i in req.infusions],
        dose_dur=[i.duration_h for i in req.infusions],
        dose_occ=dose_occ,
        obs_time=t_obs,
        obs_dv=[
            0.0 if math.isnan(lv.value_IU_dL) else lv.value_IU_dL for lv in req.levels
        ],
        obs_blq=[lv.blq for lv in req.levels],
        obs_lloq=[
            0.0 if math.isnan(lv.lloq_IU_dL) else lv.lloq_IU_dL for lv in req.levels
        ],
        obs_occ=obs_occ,
        covariates=cov,
    )
    cohort = stack_subjects(
        [row], n_dose=_bucket(len(t_inf), 2), n_obs=_bucket(len(t_obs), 4)
    )
    n_occ = len(t_inf) if iov else 1
    return jax.tree.map(lambda x: x[0], cohort), n_occ


def _level_check(
    key, model, params, subject, req, n_occ: int
) -> tuple[list[FieldError], list[FieldError]]:
    """Levels against the population model's prior predictive range.

    Returns (errors, warnings). For each quantified level, the range is the
    central 99.9% of ``_PRIOR_PREDICTIVE_DRAWS`` simulated measurements at its time
    (inter-individual, inter-occasion and residual variability). Outside the range
    in its unit but inside it in the other unit (x 100 or / 100): an error on the
    unit. Outside it in both units: an error on the value when more than
    ``_REFUSE_FACTOR`` times beyond the range, else a warning.
    """
    from phems_clinical.pk.dosing import prior_predictive

    if all(lv.blq for lv in req.levels):
        return [], []
    sims = prior_predictive(
        key, model, params, subject, n_occ=n_occ, n=_PRIOR_PREDICTIVE_DRAWS
    )
    lo, hi = np.quantile(sims, _IMPLAUSIBLE, axis=0)
    errors, warnings = [], []
    for j, lv in enumerate(req.levels):
        if lv.blq:
            continue
        unit = lv.unit
        given = lv.value_IU_dL / (100.0 if unit == "IU/mL" else 1.0)
        # the value read in the other unit, in IU/dL
        factor = 0.01 if unit == "IU/mL" else 100.0
        other = "IU/dL" if unit == "IU/mL" else "IU/mL"
        v, alt = lv.value_IU_dL, lv.value_IU_dL * factor
        lo_j, hi_j = max(lo[j], 0.0), hi[j]
        expects = (
            f"the population model expects {lo_j:.3g}-{hi_j:.3g} IU/dL at "
            f"{lv.time_h:g} h after these infusions, 99.9% prior predictive "
            "range"
        )
        if lo_j <= v <= hi_j:
            continue
        if lo_j <= alt <= hi_j:
            errors.append(
                FieldError(
                    f"levels[{lv.index}].unit",
                    (
                        f"{given:g} {unit} at {lv.time_h:g} h is implausible for this dose "
                        f"({expects}); it fits if the unit is {other}. Check the unit"
                    ),
                )
            )
        elif v > _REFUSE_FACTOR * hi_j or v < lo_j / _REFUSE_FACTOR:
            errors.append(
                FieldError(
                    f"levels[{lv.index}].value",
                    (
                        f"{given:g} {unit} is far outside what this dose can give, in "
                        f"{unit} and in {other} ({expects}); check the value, its unit and "
                        "time, and the doses and times of the infusions (a patient with an "
                        "inhibitor is outside what this tool models)"
                    ),
                )
            )
        else:
            warnings.append(
                FieldError(
                    f"levels[{lv.index}].value",
                    (
                        f"{given:g} {unit} is outside the range the population model "
                        f"expects, in {unit} and in {other} ({expects}); check the value, "
                        "its time and the doses; the result leans on this level"
                    ),
                )
            )
    return errors, warnings


# ------------------------------------------------------------------ numbers


def _est(x) -> dict:
    x = np.asarray(x, float)
    # an infinite draw (a level never reached) would make interpolation inf - inf
    method = "linear" if np.all(np.isfinite(x)) else "inverted_cdf"
    q = np.quantile(x, [0.5, 0.05, 0.95], method=method) if x.size else [math.nan] * 3
    return {"median": _num(q[0]), "lo90": _num(q[1]), "hi90": _num(q[2])}


def _num(x: float) -> float | str | None:
    """JSON-safe number: inf as the string "inf" (a level never reached), nan null."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _nonfinite(obj: Any, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(result)"
    items = (
        obj.items()
        if isinstance(obj, dict)
        else enumerate(obj)
        if isinstance(obj, list)
        else ()
    )
    for k, v in items:
        if found := _nonfinite(
            v,
            f"{where}[{k}]"
            if isinstance(k, int)
            else f"{where}.{k}"
            if where
            else str(k),
        ):
            return found
    return None


def _check_finite(result: dict) -> None:
    """Refuse a result holding NaN or an infinity (other than the documented
    ``"inf"`` strings of a level never reached): it would be no result at all."""
    where = _nonfinite(result)
    if where is not None:
        raise RequestError(
            [
                FieldError(
                    "",
                    (
                        f"the calculation gave a non-finite number for {where} with this input; "
                        "no result is given. Check the doses, times and levels"
                    ),
                )
            ]
        )


# ------------------------------------------------------------------ regimens


def default_schedules(model) -> tuple[str, ...]:
    """Schedules the designer tabulates when the request names none: every 24,
    48 and 72 h and Mon/Wed/Fri; extended half-life products and FIX add Mon/Thu
    and every 7 days."""
    base = ("every 24 h", "every 48 h", "Mon/Wed/Fri", "every 72 h")
    return base + (("Mon/Thu", "every 7 days") if model.extended_half_life else ())


def _schedules(model, req: DosingRequest) -> list[tuple[str, str]]:
    """(text, request field) of each schedule to design."""
    opts = req.options
    out = [
        (f"every {h:g} h", f"options.intervals_h[{i}]")
        for i, h in enumerate(opts.intervals_h or ())
    ]
    out += [(s, f"options.schedules[{i}]") for i, s in enumerate(opts.schedules or ())]
    if not out:
        out = [(s, "options.schedules") for s in default_schedules(model)]
    return out


def _designer(
    key, model, params, subject, draws, n_occ, req, vials
) -> tuple[list[dict], list[dict]]:
    """Designed and evaluated regimens by :mod:`phems_clinical.dosing.regimens`."""
    from phems_clinical.dosing import regimens

    opts = req.options
    errors, parsed = [], []
    for text, field in _schedules(model, req):
        try:
            parsed.append(regimens.parse_schedule(text))
        except ValueError as err:
            errors.append(FieldError(field, str(err)))
    chosen = []
    for e in opts.evaluate:
        try:
            chosen.append((e, regimens.parse_schedule(e.schedule)))
        except ValueError as err:
            errors.append(FieldError(f"options.evaluate[{e.index}].schedule", str(err)))
    if errors:
        raise RequestError(errors)
    common = dict(
        n_occ=n_occ,
        weight_kg=req.weight_kg,
        vial_sizes=vials,
        peak_flag_IU_dL=opts.peak_flag_IU_dL,
        thresholds_IU_dL=tuple(opts.thresholds_IU_dL),
    )
    # one key for both tables: the same future-occasion IOV draws, so a regimen
    # shows the same numbers whether designed or evaluated
    try:
        return _run_designer(
            regimens, key, model, params, subject, draws, req, parsed, chosen, common
        )
    except ValueError as err:
        # the designer's messages start with the field they concern
        raise RequestError([FieldError("options", str(err))]) from None


def _run_designer(
    regimens, key, model, params, subject, draws, req, parsed, chosen, common
) -> tuple[list[dict], list[dict]]:
    opts = req.options
    designed = regimens.design_regimens(
        key,
        model,
        params,
        subject,
        draws,
        schedules=tuple(parsed),
        targets_IU_dL=tuple(opts.targets_IU_dL),
        probability=opts.trough_probability,
        max_dose_IU_kg=opts.max_dose_IU_kg,
        **common,
    )
    evaluated = []
    target = min(opts.targets_IU_dL)
    for e, sched in chosen:
        dose = e.dose_IU if e.dose_IU is not None else e.dose_IU_kg * req.weight_kg
        evaluated.append(
            regimens.evaluate_regimen(
                key,
                model,
                params,
                subject,
                draws,
                schedule=sched,
                dose_IU=dose,
                target_IU_dL=target,
                probability=opts.trough_probability,
                max_dose_IU_kg=opts.max_dose_IU_kg,
                **common,
            )
        )
    return list(designed), evaluated


# ------------------------------------------------------------------ assess


def assess(
    request: DosingRequest | dict | str | bytes,
    *,
    method: str = "map",
    seed: int | None = None,
    previous: dict | None = None,
) -> Assessment:
    """Forecast one patient's levels and design prophylaxis regimens.

    Parameters
    ----------
    request : DosingRequest, dict, JSON text or bytes
        A dosing request (``data_schemas/dosing_request.schema.json``), or one
        already checked by :func:`~phems_clinical.data.dosing_request.parse_request`.
    method : {"map", "nuts"}
        ``map``: posterior mode with Laplace draws (fast); ``nuts``: the full
        individual posterior by NUTS.
    seed : int, optional
        Overrides ``options.seed`` (the key of every random draw).
    previous : dict, optional
        An earlier assessment's result of the same patient (e.g. from the clinic's
        history): shown beside this one (``display["comparison"]``, the report).

    Raises
    ------
    RequestError
        For every problem with the input, each naming its field.

    Examples
    --------
    >>> a = assess({"product": "kovaltry", "weight_kg": 25.0, "age_y": 8.0,
    ...     "height_cm": 128.0,
    ...     "infusions": [{"time_h": 0.0, "dose_IU": 1000, "duration_h": 0.17}],
    ...     "levels": [{"time_h": 4.0, "value": 40.2, "unit": "IU/dL"},
    ...                {"time_h": 24.0, "value": 10.1, "unit": "IU/dL"},
    ...                {"time_h": 48.0, "value": 1.5, "unit": "IU/dL"}]})
    >>> 5 < a.result["half_life_h"]["median"] < 20
    True
    >>> a.result["display"]["title"]
    'Kovaltry (octocog alfa) — Garmann 2017'
    """
    import jax
    import jax.numpy as jnp

    from phems_clinical.evaluation.report import curve_figure, render_report
    from phems_clinical.pk.dosing import recommend
    from phems_clinical.pk.forecast import fit_map, fit_nuts_individual, laplace_draws
    from phems_clinical.pk.model import initial_params

    if not jax.config.jax_enable_x64:
        # the MAP convergence threshold and the regimen bisection assume float64;
        # a caller of the Python API may not have enabled it (the CLI and the web
        # app do, through runtime.configure_jax)
        jax.config.update("jax_enable_x64", True)
    if method not in METHODS:
        raise RequestError(
            [FieldError("method", f"{method!r} is not one of {', '.join(METHODS)}")]
        )
    req = request if isinstance(request, DosingRequest) else parse_request(request)
    if seed is not None and (bad := plausibility.check("seed", seed)):
        raise RequestError([FieldError("seed", bad.message)])
    model, source = _resolve_model(req)
    info = _product_info(source["id"]) if source["id"] else None
    name = _display_name(model, info, source)
    acknowledged, warnings = _acknowledgement(model, req, name)
    req, assay, _factors, assay_warnings = _assay(model, info, req)
    opts = req.options
    seed = opts.seed if seed is None else int(seed)
    cov_info, cov_warnings = _covariates(model, req)
    warnings += (
        cov_warnings + assay_warnings + list(req.warnings) + _range_warnings(model, req)
    )
    cov = np.array([cov_info[c]["value"] for c in model.covariate_names], float)
    params = initial_params(model)
    if req.baseline_IU_dL is not None:
        params = params._replace(baseline=jnp.asarray(req.baseline_IU_dL, float))
    subject, n_occ = _subject(model, req, cov)
    k_check, k_post, k_future = jax.random.split(jax.random.key(seed), 3)
    level_errors, level_warnings = _level_check(
        k_check, model, params, subject, req, n_occ
    )
    if level_errors:
        raise RequestError(level_errors)
    warnings += level_warnings

    if method == "map":
        mode = fit_map(model, params, subject, n_occ=n_occ)
        if not (
            math.isfinite(float(mode.objective))
            and math.isfinite(float(mode.grad_norm))
        ):
            raise RequestError(
                [
                    FieldError(
                        "levels",
                        (
                            "the individual fit to these levels failed (non-finite objective "
                            "or gradient); check the levels, their times and the doses"
                        ),
                    )
                ]
            )
        draws = laplace_draws(k_post, mode, opts.n_draws)
        diagnostics = {
            "objective": float(mode.objective),
            "gradient_max_abs": float(mode.grad_norm),
            "converged": bool(float(mode.grad_norm) < MAP_GRADIENT_TOL),
        }
        if not diagnostics["converged"]:
            warnings.append(
                FieldError(
                    "method",
                    (
                        f"the posterior mode (MAP) search stopped with a gradient of "
                        f"{float(mode.grad_norm):.2g} (converged below {MAP_GRADIENT_TOL:g}):"
                        " the estimates may be off; rerun with method nuts"
                    ),
                )
            )
        uncertainty = (
            f"posterior mode (MAP) with a Laplace approximation, {opts.n_draws} draws"
        )
        if any(lv.blq for lv in req.levels):
            # experiments/dosing_validation: with a BLQ level the posterior is
            # skewed and Laplace intervals of time to 1 IU/dL covered 75-80%
            # (NUTS 89%)
            warnings.append(
                FieldError(
                    "method",
                    (
                        "a level below the LLOQ makes the posterior skewed: the MAP-Laplace "
                        "intervals may be too narrow; rerun with method nuts for exact "
                        "intervals"
                    ),
                )
            )
    else:
        post = fit_nuts_individual(k_post, model, params, subject, n_occ=n_occ)
        draws, mode = post.b, post.map
        diagnostics = {
            "divergences": post.n_divergent,
            "max_r_hat": _num(np.nanmax(post.r_hat, initial=np.nan)),
            "min_ess": _num(np.min(post.ess, initial=np.inf)),
            "n_draws": int(draws.shape[0]),
        }
        uncertainty = f"full posterior by NUTS, {int(draws.shape[0])} draws (4 chains)"
        if post.n_divergent:
            warnings.append(
                FieldError(
                    "method", f"NUTS reported {post.n_divergent} divergent transitions"
                )
            )
    if req.levels:
        diagnostics["eta"] = {
            p: float(mode.b[k]) for k, p in enumerate(model.iiv_parameters)
        }

    last_inf = req.infusions[-1]
    horizon = HORIZON_H["extended" if model.extended_half_life else "standard"]
    t_end = max(
        last_inf.time_h + last_inf.duration_h + horizon,
        max((lv.time_h for lv in req.levels), default=0.0) + 12.0,
    )
    t_start = max(0.0, last_inf.time_h - 14 * 24.0)
    grid = np.unique(
        np.concatenate(
            [
                np.linspace(t_start, t_end, 400),
                [i.time_h for i in req.infusions if i.time_h >= t_start],
                [i.time_h + i.duration_h for i in req.infusions if i.time_h >= t_start],
            ]
        )
    )
    vials = tuple(
        getattr(info, "vial_sizes_IU", None)
        or model.metadata.get("vial_sizes_IU", (250, 500, 1000))
    )
    k_rec, k_design = jax.random.split(k_future)
    # regimens come from the designer below (options.intervals_h are among its
    # schedules): recommend's fixed interval grid is not computed
    rec = recommend(
        k_rec,
        model,
        params,
        subject,
        draws,
        n_occ=n_occ,
        weight_kg=req.weight_kg,
        thresholds=opts.thresholds_IU_dL,
        targets=opts.targets_IU_dL,
        intervals=(),
        probability=opts.trough_probability,
        vial_sizes=vials,
        standard_dose_IU_kg=opts.standard_dose_IU_kg,
        curve_time=jnp.asarray(grid),
    )
    designed, evaluated = _designer(
        k_design, model, params, subject, draws, n_occ, req, vials
    )

    result = _result(
        req,
        model,
        source,
        name,
        method,
        seed,
        uncertainty,
        cov_info,
        rec,
        diagnostics,
        warnings,
        params,
        acknowledged,
        assay,
        designed,
        evaluated,
        info,
    )
    _check_finite(result)
    result["display"] = wording.display(result, previous)
    png = curve_figure(for_figure(result))
    return Assessment(result, png, render_report(result, png))


def _short(text: str | None, n: int) -> str | None:
    return text if text is None or len(text) <= n else text[: n - 1] + "\u2026"


def for_figure(result: dict) -> dict:
    """The result as the figure shows it: a long patient id shortened to fit the
    title, and ``$`` escaped in free text (matplotlib reads ``$...$`` as maths and
    fails on what it cannot typeset)."""

    def text(s):
        return None if s is None else s.replace("$", r"\$")

    model = dict(result["model"], name=text(result["model"].get("name")))
    shown = result.get("product_display") or result.get("product")
    return {
        **result,
        "model": model,
        "product": text(shown),
        "patient_id": text(_short(result.get("patient_id"), _TITLE_ID_CHARS)),
    }


def redraw(result: dict, previous: dict | None = None) -> Assessment:
    """A stored result's figure and report, its ``display`` rebuilt (with
    ``previous``, an earlier result of the same patient, beside it); the
    numbers are the stored ones, nothing is recomputed."""
    from phems_clinical.evaluation.report import curve_figure, render_report

    result = {k: v for k, v in result.items() if k != "display"}
    result["display"] = wording.display(result, previous)
    png = curve_figure(for_figure(result))
    return Assessment(result, png, render_report(result, png))


def _clock(origin: str | None, h: float) -> str | None:
    if not origin:
        return None
    t = datetime.fromisoformat(origin) + timedelta(hours=h)
    return t.strftime("%d/%m/%Y %H:%M")


def _result(
    req,
    model,
    source,
    name,
    method,
    seed,
    uncertainty,
    cov_info,
    rec,
    diagnostics,
    warnings,
    params,
    acknowledged,
    assay,
    designed,
    evaluated,
    info,
) -> dict:
    from phems_clinical.pk.dosing import validated_range
    from phems_clinical.provenance import versions

    p = rec.parameters
    meta = model.metadata
    rng = validated_range(model)
    thr = {f"{t:g}": _est(v) for t, v in rec.time_to_threshold.items()}
    thr_std = {f"{t:g}": _est(v) for t, v in rec.time_to_threshold_standard.items()}
    levels = [
        {
            "time_h": lv.time_h,
            "datetime": _clock(req.time_origin, lv.time_h),
            "value_IU_dL": _num(lv.value_IU_dL),
            "blq": lv.blq,
            "lloq_IU_dL": _num(lv.lloq_IU_dL),
            "predicted": _est(rec.level_pred[:, j]),
        }
        for j, lv in enumerate(req.levels)
    ]
    q = dict(zip(("p05", "p25", "p50", "p75", "p95"), rec.curve, strict=True))
    weight = (
        {"value": req.weight_kg, "unit": "kg"}
        if req.weight_unit == "kg"
        else {"value": round(req.weight_kg / LB_KG, 6), "unit": "lb"}
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "assessed": datetime.now().astimezone().isoformat(timespec="seconds"),
        "patient_id": req.patient_id,
        "product": source["id"],
        "product_display": name,
        "acknowledged_unverified": acknowledged,
        "model": {
            "name": model.name,
            "citation": meta.get("citation"),
            "source": source["source"],
            "path": source["path"],
            "factor": meta.get("factor"),
            "half_life_class": meta.get("half_life_class"),
            "unverified": list(meta.get("unverified", []) or []),
            "validated_range": {k: list(v) for k, v in rng.items()},
            "baseline_IU_dL": float(params.baseline),
            "choose_when": getattr(info, "choose_when", None)
            or meta.get("choose_when"),
        },
        "assay": assay,
        "weight": weight,
        "method": method,
        "uncertainty": uncertainty,
        "seed": seed,
        "covariates": cov_info,
        "half_life_h": _est(p["terminal_half_life"]),
        "effective_half_life_h": _est(p["effective_half_life"]),
        "clearance_dL_h": _est(p["clearance"]),
        "clearance_mL_h_kg": _est(100.0 * p["clearance"] / req.weight_kg),
        "v1_dL": _est(p["v1"]),
        "vss_dL": _est(p["vss"]),
        "incremental_recovery": _est(p["incremental_recovery"]),
        "time_to_threshold_h": thr,
        "standard_dose_IU": rec.standard_dose_IU,
        "standard_dose_IU_kg": req.options.standard_dose_IU_kg,
        "time_to_threshold_after_standard_dose_h": thr_std,
        "trough_probability": req.options.trough_probability,
        "targets_IU_dL": list(req.options.targets_IU_dL),
        "max_dose_IU_kg": req.options.max_dose_IU_kg,
        "peak_flag_IU_dL": req.options.peak_flag_IU_dL,
        "regimens": designed,
        "evaluated_regimens": evaluated,
        "current_regimen": (
            None
            if rec.current_regimen is None
            else {
                "interval_h": rec.current_regimen[0],
                "dose_IU": rec.current_regimen[1],
            }
        ),
        "current_regimen_trough_prob": (
            None
            if rec.current_trough_prob is None
            else {f"{t:g}": v for t, v in rec.current_trough_prob.items()}
        ),
        "levels": levels,
        "infusions": [
            {"time_h": i.time_h, "dose_IU": i.dose_IU, "duration_h": i.duration_h}
            for i in req.infusions
        ],
        "time_origin": req.time_origin,
        "curve": {
            "time_h": rec.curve_time.tolist(),
            **{k: v.tolist() for k, v in q.items()},
        },
        "thresholds_IU_dL": list(req.options.thresholds_IU_dL),
        "diagnostics": diagnostics,
        "warnings": [{"field": w.field, "message": w.message} for w in warnings],
        "versions": versions(("phems_clinical", "jax", "numpyro")),
    }
