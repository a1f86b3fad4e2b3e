"""``phems dose``: one patient's PK curve and prophylaxis regimens from 2-3 levels.

:func:`run_dose` is the one pure entry point used by the command line and the web
app: request JSON in, :class:`DoseOutput` (``result.json`` content, ``curve.png``
and ``report.html``) out. Steps:

1. parse and check the request
   (:func:`~phems_clinical.data.dosing_request.parse_request`);
2. resolve the population model (a library product, or a fitted ``model.yaml``) and
   the covariates it needs (derived or assumed where not given, always reported);
3. check the levels against the model's prior predictive range: a level that
   fits only in the other unit is refused as a unit mix-up, one far outside the
   range in both units is refused, one just outside it is warned about;
4. estimate: MAP with Laplace draws, or NUTS (:mod:`phems_clinical.pk.forecast`);
5. summarise and design regimens per posterior draw (:mod:`phems_clinical.pk.dosing`).

Every problem with the input raises :class:`RequestError` naming the field; so
does a fitted model whose ``fitted`` block does not say ``converged: true``, and
a calculation that would give a non-finite number. Outputs are written through
:func:`phems_clinical.outputs.staged_dir`: all three files or none, and an earlier
patient's folder is never replaced without ``overwrite``.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical.data import plausibility
from phems_clinical.data.cohort import Cohort, stack_subjects
from phems_clinical.data.demographics import (
    fat_free_mass,
    growth_medians,
    lean_body_weight,
)
from phems_clinical.data.dosing_request import (
    DosingRequest,
    FieldError,
    RequestError,
    parse_request,
)
from phems_clinical.evaluation.report import curve_figure, render_report
from phems_clinical.outputs import staged_dir
from phems_clinical.pk.dosing import (
    DoseRecommendation,
    prior_predictive,
    recommend,
    validated_range,
)
from phems_clinical.pk.forecast import fit_map, fit_nuts_individual, laplace_draws
from phems_clinical.pk.library import list_products, load_product
from phems_clinical.pk.model import initial_params
from phems_clinical.pk.spec import ModelSpecError, PopModel, load_model
from phems_clinical.provenance import versions

__all__ = ["METHODS", "DoseOutput", "run_dose", "write_dose_outputs"]

METHODS = ("map", "nuts")
SCHEMA_VERSION = 1
_PRIOR_PREDICTIVE_DRAWS = 2000
_IMPLAUSIBLE = (0.0005, 0.9995)  # prior predictive quantiles for the level check
# A level more than this factor outside the 99.9% prior predictive range (in both
# units) is refused, not warned about: the dose, time or value is wrong (ours).
_REFUSE_FACTOR = 3.0
_TITLE_ID_CHARS = 24  # patient id shown in the figure's title (ellipsis beyond)


class DoseOutput(NamedTuple):
    """``result`` is what ``result.json`` holds; the PNG and HTML are ready to save."""

    result: dict
    curve_png: bytes
    report_html: str


def _for_forecasting(model: PopModel) -> PopModel:
    """BLQ levels always enter by M3 here: a model fitted with ``blq: drop`` says how
    the population was estimated, but dropping a patient's BLQ level would discard
    what it says about them (the level is below the LLOQ)."""
    return replace(model, blq="m3")


@lru_cache(maxsize=1)
def _known_products() -> tuple[str, ...]:
    return tuple(list_products())


@lru_cache(maxsize=32)
def _product(name: str) -> PopModel:
    # one model object per product, so compiled code is reused between patients
    return _for_forecasting(load_product(name))


@lru_cache(maxsize=32)
def _model_file(path: str, mtime_ns: int) -> PopModel:
    return _for_forecasting(load_model(path))


def _resolve_model(req: DosingRequest) -> tuple[PopModel, dict]:
    if req.product is not None:
        name = req.product.strip().lower()
        known = _known_products()
        if name not in known:
            raise RequestError([FieldError(
                "product", f"unknown product {req.product!r}; known products: "
                           f"{', '.join(known)}")])
        return _product(name), {"source": "library", "path": None}
    path = Path(req.model_path)
    if not path.is_file():
        raise RequestError([FieldError("model", f"model file {str(path)!r} not found "
                                                "(give the path of a model.yaml)")])
    try:
        model = _model_file(str(path.resolve()), path.stat().st_mtime_ns)
    except (ModelSpecError, OSError, ValueError) as err:
        raise RequestError([FieldError("model", f"cannot use {str(path)!r} as a "
                                                f"population model: {err}")]) from None
    fitted = model.metadata.get("fitted")
    if fitted is not None and not (isinstance(fitted, dict)
                                   and fitted.get("converged") is True):
        said = (f"fitted.converged is {fitted.get('converged')!r}"
                if isinstance(fitted, dict) and "converged" in fitted
                else "its fitted block does not record convergence")
        raise RequestError([FieldError("model", (
            f"{str(path)!r} comes from a fit that did not converge ({said}); "
            "a failed fit is no prior for dosing: refit, or use a library "
            "product"))])
    return model, {"source": "file", "path": str(path)}


def _covariates(model: PopModel, req: DosingRequest
                ) -> tuple[dict[str, dict], list[FieldError]]:
    """The model's covariates with their source: given, derived or assumed."""
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
                warnings.append(FieldError("height_cm", (
                    f"height not given: the median height for age ({ht:.0f} cm) "
                    f"was assumed to compute {name}; give height_cm for accuracy")))
            value = (lean_body_weight(req.weight_kg, ht, sex) if name == "LBW"
                     else fat_free_mass(req.weight_kg, ht, sex, req.age_y))
            out[name] = {"value": round(float(value), 2), "source": src}
        else:
            ref = float(model.reference_covariates.get(name, 0.0))
            out[name] = {"value": ref, "source": "assumed"}
            warnings.append(FieldError(_REQUEST_FIELD.get(name, "covariates"), (
                f"{name} not given: the model's reference value {ref:g} was assumed")))
    return out, warnings


_REQUEST_FIELD = {"VWF": "vwf_IU_dL", "HCT": "hematocrit_pct", "HT": "height_cm",
                  "BGO": "blood_group", "ASSAY": "assay", "SEX": "sex"}


def _range_warnings(model: PopModel, req: DosingRequest) -> list[FieldError]:
    rng = validated_range(model)
    out = []
    for name, field, value, unit in (("AGE", "age_y", req.age_y, "y"),
                                     ("WT", "weight_kg", req.weight_kg, "kg")):
        lo, hi = rng[name]
        if lo is None and hi is None:
            out.append(FieldError(field, (
                f"the model records no validated {name} range: the prediction may be "
                "an extrapolation")))
        elif (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f"{lo:g}-{hi:g}" if hi is not None else f">= {lo:g}"
            out.append(FieldError(field, (
                f"{value:g} {unit} is outside the range the model was built on "
                f"({span} {unit}): results are an extrapolation, interpret with "
                "care")))
    return out


def _bucket(n: int, floor: int) -> int:
    """Pad sizes to powers of two so compiled code is shared between patients."""
    return max(floor, 1 << max(0, n - 1).bit_length())


def _subject(model: PopModel, req: DosingRequest, cov: np.ndarray
             ) -> tuple[Cohort, int]:
    """One patient's Cohort row; with IOV each infusion is its own occasion."""
    t_inf = np.array([i.time_h for i in req.infusions])
    iov = model.n_kappa > 0
    dose_occ = np.arange(len(t_inf)) if iov else np.zeros(len(t_inf), int)
    t_obs = np.array([lv.time_h for lv in req.levels])
    # a level belongs to the occasion of the latest infusion started before it
    obs_occ = (np.searchsorted(t_inf, t_obs, side="left") - 1 if iov
               else np.zeros(len(t_obs), int))
    row = dict(
        dose_time=t_inf, dose_amt=[i.dose_IU for i in req.infusions],
        dose_dur=[i.duration_h for i in req.infusions], dose_occ=dose_occ,
        obs_time=t_obs,
        obs_dv=[0.0 if math.isnan(lv.value_IU_dL) else lv.value_IU_dL
                for lv in req.levels],
        obs_blq=[lv.blq for lv in req.levels],
        obs_lloq=[0.0 if math.isnan(lv.lloq_IU_dL) else lv.lloq_IU_dL
                  for lv in req.levels],
        obs_occ=obs_occ, covariates=cov)
    cohort = stack_subjects([row], n_dose=_bucket(len(t_inf), 2),
                            n_obs=_bucket(len(t_obs), 4))
    n_occ = len(t_inf) if iov else 1
    return jax.tree.map(lambda x: x[0], cohort), n_occ


def _level_check(key, model, params, subject, req, n_occ: int
                 ) -> tuple[list[FieldError], list[FieldError]]:
    """Levels against the population model's prior predictive range.

    Returns (errors, warnings). For each quantified level, the range is the
    central 99.9% of ``_PRIOR_PREDICTIVE_DRAWS`` simulated measurements at its time
    (inter-individual, inter-occasion and residual variability). Outside the range
    in its unit but inside it in the other unit (x 100 or / 100): an error on the
    unit. Outside it in both units: an error on the value when more than
    ``_REFUSE_FACTOR`` times beyond the range, else a warning.
    """
    if all(lv.blq for lv in req.levels):
        return [], []
    sims = prior_predictive(key, model, params, subject, n_occ=n_occ,
                            n=_PRIOR_PREDICTIVE_DRAWS)
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
        expects = (f"the population model expects {lo_j:.3g}-{hi_j:.3g} IU/dL at "
                   f"{lv.time_h:g} h after these infusions, 99.9% prior predictive "
                   "range")
        if lo_j <= v <= hi_j:
            continue
        if lo_j <= alt <= hi_j:
            errors.append(FieldError(f"levels[{lv.index}].unit", (
                f"{given:g} {unit} at {lv.time_h:g} h is implausible for this dose "
                f"({expects}); it fits if the unit is {other}. Check the unit")))
        elif v > _REFUSE_FACTOR * hi_j or v < lo_j / _REFUSE_FACTOR:
            errors.append(FieldError(f"levels[{lv.index}].value", (
                f"{given:g} {unit} is far outside what this dose can give, in "
                f"{unit} and in {other} ({expects}); check the value, its unit and "
                "time, and the doses and times of the infusions (a patient with an "
                "inhibitor is outside what this tool models)")))
        else:
            warnings.append(FieldError(f"levels[{lv.index}].value", (
                f"{given:g} {unit} is outside the range the population model "
                f"expects, in {unit} and in {other} ({expects}); check the value, "
                "its time and the doses; the result leans on this level")))
    return errors, warnings


def _est(x: np.ndarray) -> dict:
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


def run_dose(request: DosingRequest | dict | str | bytes, *, method: str = "map",
             seed: int | None = None) -> DoseOutput:
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

    Raises
    ------
    RequestError
        For every problem with the input, each naming its field.

    Examples
    --------
    >>> out = run_dose({"product": "advate", "weight_kg": 25.0, "age_y": 8.0,
    ...     "infusions": [{"time_h": 0.0, "dose_IU": 1000, "duration_h": 0.17}],
    ...     "levels": [{"time_h": 4.0, "value": 40.2, "unit": "IU/dL"},
    ...                {"time_h": 24.0, "value": 10.1, "unit": "IU/dL"},
    ...                {"time_h": 48.0, "value": 1.5, "unit": "IU/dL"}]})
    >>> 5 < out.result["half_life_h"]["median"] < 20
    True
    """
    if method not in METHODS:
        raise RequestError([FieldError("method", f"{method!r} is not one of "
                                                 f"{', '.join(METHODS)}")])
    req = request if isinstance(request, DosingRequest) else parse_request(request)
    if seed is not None and (bad := plausibility.check("seed", seed)):
        raise RequestError([FieldError("seed", bad.message)])
    model, source = _resolve_model(req)
    opts = req.options
    seed = opts.seed if seed is None else int(seed)
    cov_info, warnings = _covariates(model, req)
    warnings += list(req.warnings) + _range_warnings(model, req)
    cov = np.array([cov_info[c]["value"] for c in model.covariate_names], float)
    params = initial_params(model)
    if req.baseline_IU_dL is not None:
        params = params._replace(baseline=jnp.asarray(req.baseline_IU_dL, float))
    subject, n_occ = _subject(model, req, cov)
    k_check, k_post, k_future = jax.random.split(jax.random.key(seed), 3)
    level_errors, level_warnings = _level_check(k_check, model, params, subject,
                                                req, n_occ)
    if level_errors:
        raise RequestError(level_errors)
    warnings += level_warnings

    if method == "map":
        mode = fit_map(model, params, subject, n_occ=n_occ)
        if not (math.isfinite(float(mode.objective))
                and math.isfinite(float(mode.grad_norm))):
            raise RequestError([FieldError("levels", (
                "the individual fit to these levels failed (non-finite objective "
                "or gradient); check the levels, their times and the doses"))])
        draws = laplace_draws(k_post, mode, opts.n_draws)
        diagnostics = {"objective": float(mode.objective),
                       "gradient_max_abs": float(mode.grad_norm),
                       "converged": bool(float(mode.grad_norm) < 1e-5)}
        if not diagnostics["converged"]:
            warnings.append(FieldError("method", (
                f"the posterior mode (MAP) search stopped with a gradient of "
                f"{float(mode.grad_norm):.2g} (converged below 1e-5): the estimates "
                "may be off; rerun with method nuts")))
        uncertainty = (f"Laplace approximation of the posterior at its mode "
                       f"(MAP), {opts.n_draws} draws")
        if any(lv.blq for lv in req.levels):
            # experiments/dosing_validation: with a BLQ level the posterior is
            # skewed and Laplace intervals of time to 1 IU/dL covered 75-80%
            # (NUTS 89%)
            warnings.append(FieldError("method", (
                "a level below the LLOQ makes the posterior skewed: the MAP-Laplace "
                "intervals may be too narrow; rerun with method nuts for exact "
                "intervals")))
    else:
        post = fit_nuts_individual(k_post, model, params, subject, n_occ=n_occ)
        draws, mode = post.b, post.map
        diagnostics = {"divergences": post.n_divergent,
                       "max_r_hat": _num(np.nanmax(post.r_hat, initial=np.nan)),
                       "min_ess": _num(np.min(post.ess, initial=np.inf)),
                       "n_draws": int(draws.shape[0])}
        uncertainty = (f"full posterior by NUTS, {int(draws.shape[0])} draws "
                       "(4 chains)")
        if post.n_divergent:
            warnings.append(FieldError("method", f"NUTS reported {post.n_divergent} "
                                                 "divergent transitions"))
    if req.levels:
        diagnostics["eta"] = {p: float(mode.b[k])
                              for k, p in enumerate(model.iiv_parameters)}

    last_inf = req.infusions[-1]
    horizon = 168.0 if model.extended_half_life else 96.0
    t_end = max(last_inf.time_h + last_inf.duration_h + horizon,
                max((lv.time_h for lv in req.levels), default=0.0) + 12.0)
    t_start = max(0.0, last_inf.time_h - 14 * 24.0)
    grid = np.unique(np.concatenate([
        np.linspace(t_start, t_end, 400),
        [i.time_h for i in req.infusions if i.time_h >= t_start],
        [i.time_h + i.duration_h for i in req.infusions if i.time_h >= t_start]]))
    rec = recommend(
        k_future, model, params, subject, draws, n_occ=n_occ,
        weight_kg=req.weight_kg, thresholds=opts.thresholds_IU_dL,
        targets=opts.targets_IU_dL, intervals=opts.intervals_h,
        probability=opts.trough_probability,
        vial_sizes=tuple(model.metadata.get("vial_sizes_IU", (250, 500, 1000))),
        standard_dose_IU_kg=opts.standard_dose_IU_kg, curve_time=jnp.asarray(grid))

    result = _result(req, model, source, method, seed, uncertainty, cov_info, rec,
                     diagnostics, warnings, params)
    _check_finite(result)
    png = curve_figure(_for_display(result))
    return DoseOutput(result, png, render_report(result, png))


def _short(text: str | None, n: int) -> str | None:
    return text if text is None or len(text) <= n else text[:n - 1] + "\u2026"


def _for_display(result: dict) -> dict:
    """The result as the figure shows it: a long patient id shortened to fit the
    title, and ``$`` escaped in free text (matplotlib reads ``$...$`` as maths and
    fails on what it cannot typeset)."""
    def text(s):
        return None if s is None else s.replace("$", r"\$")
    model = dict(result["model"], name=text(result["model"].get("name")))
    return {**result, "model": model, "product": text(result["product"]),
            "patient_id": text(_short(result["patient_id"], _TITLE_ID_CHARS))}


def _nonfinite(obj: Any, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(result)"
    items = (obj.items() if isinstance(obj, dict)
             else enumerate(obj) if isinstance(obj, list) else ())
    for k, v in items:
        if (found := _nonfinite(v, f"{where}[{k}]" if isinstance(k, int) else
                                f"{where}.{k}" if where else str(k))):
            return found
    return None


def _check_finite(result: dict) -> None:
    """Refuse a result holding NaN or an infinity (other than the documented
    ``"inf"`` strings of a level never reached): it would be no result at all."""
    where = _nonfinite(result)
    if where is not None:
        raise RequestError([FieldError("", (
            f"the calculation gave a non-finite number for {where} with this input; "
            "no result is given. Check the doses, times and levels"))])


def _result(req: DosingRequest, model: PopModel, source: dict, method: str,
            seed: int, uncertainty: str, cov_info: dict, rec: DoseRecommendation,
            diagnostics: dict, warnings: list[FieldError], params) -> dict:
    p = rec.parameters
    meta = model.metadata
    rng = validated_range(model)
    thr = {f"{t:g}": _est(v) for t, v in rec.time_to_threshold.items()}
    thr_std = {f"{t:g}": _est(v) for t, v in rec.time_to_threshold_standard.items()}
    regimens = [{
        "interval_h": r.interval_h, "target_IU_dL": r.target_IU_dL,
        "dose_IU": _num(r.dose_IU),
        "dose_IU_kg": _num(r.dose_IU / req.weight_kg),
        "trough_prob": _num(r.trough_prob),
        "peak_IU_dL": _est(r.peak_IU_dL),
        "hours_below_target_per_week": _est(r.hours_below_target_per_week),
    } for r in rec.regimens]
    levels = [{"time_h": lv.time_h, "value_IU_dL": _num(lv.value_IU_dL),
               "blq": lv.blq, "lloq_IU_dL": _num(lv.lloq_IU_dL),
               "predicted": _est(rec.level_pred[:, j])}
              for j, lv in enumerate(req.levels)]
    q = dict(zip(("p05", "p25", "p50", "p75", "p95"), rec.curve, strict=True))
    return {
        "schema_version": SCHEMA_VERSION,
        "patient_id": req.patient_id,
        "product": req.product.strip().lower() if req.product else None,
        "model": {
            "name": model.name, "citation": meta.get("citation"),
            "source": source["source"], "path": source["path"],
            "factor": meta.get("factor"),
            "half_life_class": meta.get("half_life_class"),
            "unverified": list(meta.get("unverified", []) or []),
            "validated_range": {k: list(v) for k, v in rng.items()},
            "baseline_IU_dL": float(params.baseline),
        },
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
        "regimens": regimens,
        "current_regimen": (None if rec.current_regimen is None else
                            {"interval_h": rec.current_regimen[0],
                             "dose_IU": rec.current_regimen[1]}),
        "current_regimen_trough_prob": (
            None if rec.current_trough_prob is None else
            {f"{t:g}": v for t, v in rec.current_trough_prob.items()}),
        "levels": levels,
        "infusions": [{"time_h": i.time_h, "dose_IU": i.dose_IU,
                       "duration_h": i.duration_h} for i in req.infusions],
        "time_origin": req.time_origin,
        "curve": {"time_h": rec.curve_time.tolist(),
                  **{k: v.tolist() for k, v in q.items()}},
        "thresholds_IU_dL": list(req.options.thresholds_IU_dL),
        "diagnostics": diagnostics,
        "warnings": [{"field": w.field, "message": w.message} for w in warnings],
        "versions": versions(("phems_clinical", "jax", "numpyro")),
    }


def write_dose_outputs(output: DoseOutput, out_dir: str | Path, *,
                       overwrite: bool = False) -> list[Path]:
    """Write ``result.json``, ``curve.png`` and ``report.html`` into ``out_dir``.

    All three or none: they are written into a temporary sibling folder that is
    renamed to ``out_dir`` at the end (:func:`phems_clinical.outputs.staged_dir`).
    A non-empty ``out_dir`` (e.g. the previous patient's report) is refused with
    :class:`~phems_clinical.outputs.OutputExistsError` naming ``--out`` unless
    ``overwrite``, and then replaced as a whole.
    """
    names = ("result.json", "curve.png", "report.html")
    text = json.dumps(output.result, indent=2, allow_nan=False)
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / names[0]).write_text(text, encoding="utf-8")
        (tmp / names[1]).write_bytes(output.curve_png)
        (tmp / names[2]).write_text(output.report_html, encoding="utf-8")
    return [Path(out_dir) / n for n in names]
