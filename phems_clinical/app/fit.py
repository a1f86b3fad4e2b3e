"""``phems fit``: fit a population PK model to a NONMEM-style data set; write results.

Outputs in ``--out DIR``:

* ``estimates.json``: named theta, omega and sigma with standard errors (FOCEI) or
  posterior summaries (NUTS, SVI), the objective value, shrinkage, per-subject ETAs,
  excluded records and run diagnostics;
* ``estimates.nc``: the same as an xarray Dataset (plus posterior draws for NUTS/SVI);
* ``gof.png`` (DV vs PRED/IPRED, CWRES vs time/PRED) and ``vpc.png``;
* ``model.yaml``: the fitted population model in the input specification format
  (:func:`phems_clinical.pk.spec.to_spec`), loadable with
  :func:`phems_clinical.pk.spec.load_model` (e.g. as the prior of the dosing tool).
  It holds the estimated theta, omega, IOV variances, residual SDs and baseline
  (FOCEI: the optimum; NUTS/SVI: the posterior means), the original metadata
  (citation, vial sizes, validated range, ...) and a ``fitted`` block recording
  method, data path, subjects, observations, OFV (FOCEI, else null), seed, date
  and ``converged: true``.

A fit that fails writes nothing: a non-finite objective or gradient (at the start
values or at the end), an optimiser that stopped short of a minimum, or NUTS/SVI
draws that are not finite or (NUTS) not mixed (split R-hat, divergences; see
:data:`phems_clinical.pk.bayes.RHAT_MAX`) raise :class:`FitFailedError`, whose
message names the implausible data values it found (``phems fit`` exits 2). The
outputs are written into a temporary folder beside ``--out`` and renamed into
place at the end (:func:`phems_clinical.outputs.staged_dir`); a non-empty
``--out`` is refused before any work unless ``overwrite``, and then replaced as a
whole, so no file of an earlier run survives beside the new ones.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd
import xarray as xr

from phems_clinical.app.omop import is_omop, model_factor, pk_events_from_omop
from phems_clinical.data.nonmem import PKData, read_nonmem, to_cohort
from phems_clinical.data.plausibility import check
from phems_clinical.evaluation.plots import gof_figure, vpc_figure
from phems_clinical.outputs import check_out, staged_dir, strict_json
from phems_clinical.pk.diagnostics import compute_diagnostics, simulate_replicates
from phems_clinical.pk.focei import fit_focei, focei_objective
from phems_clinical.pk.library import load_product
from phems_clinical.pk.model import PopParams, residual_from_sigma
from phems_clinical.pk.spec import (
    ModelSpecError,
    PopModel,
    load_model,
    save_model,
    with_values,
)

METHODS = ("focei", "nuts", "svi")

#: Data columns and the plausibility limit (``data_schemas/plausibility.json``)
#: each is checked against when a fit fails, and the records they apply to.
_DIAGNOSED = (
    ("DV", "factor_level", "obs"),
    ("LLOQ", "lloq_IU_dL", "obs"),
    ("AMT", "dose_IU", "dose"),
    ("DUR", "infusion_duration_h", "dose"),
    ("TIME", "time_h", "all"),
    ("WT", "weight_kg", "all"),
    ("AGE", "age_y", "all"),
)


class FitFailedError(ValueError):
    """The fit failed (non-finite objective, no convergence); nothing was written."""


def resolve_model(name_or_path: str) -> PopModel:
    """A model YAML path, or a product-library identifier such as ``advate``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_model(path)
    try:
        return load_product(name_or_path)
    except ModelSpecError:
        raise ModelSpecError(
            f"--model: {name_or_path!r} is neither a YAML file nor a library product"
        ) from None


def _split(name: str) -> tuple[str, str]:
    kind, rest = name.split("(", 1)
    return kind.lower(), rest.rstrip(")")


def run_fit(
    data_path: str | Path,
    model_ref: str,
    method: str,
    out: str | Path,
    *,
    seed: int = 0,
    options: dict | None = None,
    n_vpc: int = 200,
    overwrite: bool = False,
) -> dict:
    """Fit ``model_ref`` to ``data_path`` and write all outputs to ``out``.

    Writes ``estimates.json``, ``estimates.nc``, ``gof.png``, ``vpc.png`` and the
    fitted model ``model.yaml`` (see the module docstring); returns the
    ``estimates.json`` content. Raises :class:`FitFailedError` (writing nothing)
    when the fit fails, and :class:`~phems_clinical.outputs.OutputExistsError`
    before any work when ``out`` holds files and ``overwrite`` is false.
    """
    if method not in METHODS:
        raise ValueError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    out = check_out(out, overwrite=overwrite)
    options = dict(options or {})
    model = resolve_model(model_ref)
    source, omop_load = data_path, None
    if is_omop(data_path):  # a site's OMOP database(s): infusions and levels
        source, omop_load = pk_events_from_omop(data_path, factor=model_factor(model))
    data = read_nonmem(
        source,
        required_covariates=model.covariate_names,
        dv_unit=options.pop("dv_unit", "IU/dL"),
    )
    if model.blq == "drop":
        data = _drop_blq(data)
    cohort, ids = to_cohort(data, model.covariate_names)
    key = jax.random.key(seed)
    k_fit, k_vpc = jax.random.split(key)

    if method == "focei":
        res = fit_focei(model, cohort, **options)
        if not res.converged:
            raise FitFailedError(
                _failure(method, res.message, data, ids, res.nonfinite_subjects)
            )
        params, b_hat = res.params, _b_from(res)
        names = list(res.natural_names)
        table = pd.DataFrame(
            {"estimate": res.estimates, "se": res.se, "se_sandwich": res.se_sandwich},
            index=names,
        )
        table["rse_percent"] = 100 * table["se"] / table["estimate"].abs()
        run_info = {
            "converged": res.converged,
            "iterations": res.n_iterations,
            "message": res.message,
            "seconds": res.seconds,
        }
        objective = {
            "ofv": res.ofv,
            "definition": "NONMEM FOCEI objective: -2 log "
            "likelihood without the n_obs*log(2*pi) constant",
        }
        shrinkage = res.shrinkage_sd
        draws = None
    else:
        from phems_clinical.pk import bayes

        fit_fn = bayes.fit_nuts if method == "nuts" else bayes.fit_svi
        if options.get("priors") == "library":
            options["priors"] = bayes.library_priors(model)
        try:
            res = fit_fn(k_fit, model, cohort, **options)
        except bayes.NonFiniteStartError as err:
            raise FitFailedError(_failure(method, str(err), data, ids, ())) from None
        if not res.converged:
            raise FitFailedError(_failure(method, res.message, data, ids, ()))
        params = res.params
        names = list(res.summary.index)
        table = res.summary.copy()
        table.insert(0, "estimate", table["mean"])
        b_hat = _map_modes(model, cohort, params)
        run_info = {
            "converged": res.converged,
            "seconds": res.seconds,
            "divergences": int(res.n_divergent),
        }
        if "r_hat" in table and np.isfinite(table["r_hat"].to_numpy()).any():
            run_info["max_r_hat"] = float(np.nanmax(table["r_hat"].to_numpy()))
            run_info["min_ess_bulk"] = float(np.nanmin(table["ess_bulk"].to_numpy()))
        if res.elbo is not None:
            run_info["final_loss"] = float(np.asarray(res.elbo)[-1])
        objective = None
        eta_np = np.asarray(res.etas)
        shrinkage = (
            100 * (1 - eta_np.std(axis=0) / np.sqrt(np.diag(np.asarray(params.omega))))
            if eta_np.size
            else np.zeros(0)
        )
        draws = res.samples

    diag = compute_diagnostics(model, cohort, params, b_hat)
    mask = np.asarray(cohort.obs_mask) & ~np.asarray(cohort.obs_blq)
    dv = np.asarray(cohort.obs_dv)[mask]
    t = np.asarray(cohort.obs_time)[mask]
    sims = simulate_replicates(k_vpc, model, cohort, params, n_vpc)

    eta_cols = [f"ETA_{p}" for p in model.iiv_parameters]
    n_eta = model.n_eta
    etas = pd.DataFrame(np.asarray(b_hat)[:, :n_eta], columns=eta_cols)
    etas.insert(0, "ID", ids)

    result: dict[str, Any] = {
        "method": method,
        "model": model.name,
        "data": str(data_path),
        "seed": seed,
        "n_subjects": len(ids),
        "n_observations": int(np.asarray(cohort.obs_mask).sum()),
        "n_blq": int((np.asarray(cohort.obs_blq) & np.asarray(cohort.obs_mask)).sum()),
        "exclusions": [e._asdict() for e in data.exclusions],
        "data_warnings": [w._asdict() for w in data.warnings],
        "omop_load": omop_load,
        "objective": objective,
        "theta": {},
        "omega": {},
        "omega_iov": {},
        "sigma": {},
        "baseline": {},
        "shrinkage_sd_percent": {
            p: float(s) for p, s in zip(model.iiv_parameters, shrinkage, strict=False)
        },
        "etas": json.loads(etas.to_json(orient="records")),
        "run": run_info,
        "units": {
            "time": "h",
            "amount": "IU",
            "volume": "dL",
            "clearance": "dL/h",
            "level": "IU/dL",
            "omega": "variance of log-parameter",
            "sigma": "variance (additive: (IU/dL)^2; proportional: fraction^2)",
        },
    }
    group_of = {
        "theta": "theta",
        "omega": "omega",
        "omega_iov": "omega_iov",
        "sigma": "sigma",
        "baseline": "baseline",
    }
    for name, row in table.iterrows():
        if "(" in name:
            kind, label = _split(name)
        else:
            kind, label = "baseline", name
        entry = {
            k: float(v)
            for k, v in row.items()
            if isinstance(v, (int, float, np.floating))
        }
        result[group_of.get(kind, kind)][label] = entry
    result = strict_json(result)

    ds = xr.Dataset(
        {col: ("parameter", table[col].to_numpy(dtype=float)) for col in table.columns},
        coords={"parameter": names},
    )
    ds["eta"] = (("subject", "eta_parameter"), np.asarray(b_hat)[:, :n_eta])
    ds = ds.assign_coords(
        subject=[str(i) for i in ids], eta_parameter=list(model.iiv_parameters)
    )
    if draws is not None:
        ds["draws"] = (
            ("draw", "parameter"),
            np.stack([np.asarray(draws[n]) for n in names], axis=1),
        )
    _describe(ds, model, names)
    ds.attrs.update(
        {
            "method": method,
            "model": model.name,
            "seed": seed,
            "ofv": objective["ofv"] if objective else np.nan,
        }
    )

    fitted = {
        "method": method,
        "data": str(data_path),
        "n_subjects": result["n_subjects"],
        "n_observations": result["n_observations"],
        "ofv": strict_json(float(objective["ofv"])) if objective else None,
        "seed": seed,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "converged": True,
    }
    with staged_dir(out, overwrite=overwrite) as tmp:
        gof_figure(
            dv,
            diag.pred[mask],
            diag.ipred[mask],
            diag.cwres[mask],
            t,
            tmp / "gof.png",
            title=f"{model.name}: {method.upper()}",
        )
        vpc_figure(
            _time_after_dose(cohort)[mask],
            dv,
            sims[:, mask],
            tmp / "vpc.png",
            title=f"{model.name}: VPC ({n_vpc} replicates, {method.upper()})",
        )
        (tmp / "estimates.json").write_text(
            json.dumps(result, indent=2, default=str, allow_nan=False)
        )
        ds.to_netcdf(tmp / "estimates.nc", engine="h5netcdf")
        save_model(
            fitted_model(model, params, fitted),
            tmp / "model.yaml",
            header=f"Fitted by `phems fit --method {method}` to {data_path}.",
        )
    return result


def _failure(
    method: str, why: str, data: PKData, ids: list, subjects: tuple[int, ...]
) -> str:
    """The message of a failed fit: what failed, for whom, and which data values
    are implausible (``data_schemas/plausibility.json``)."""
    who = [str(ids[i]) for i in subjects]
    found = _implausible(data, set(who) if who else None)
    # implausible data are named first; else non-finite start values point at
    # the model, and a fit that stopped short at both
    sampler = "R-hat" in why or "divergent" in why  # NUTS ran but did not mix
    option = (
        "--data"
        if found
        else "--model"
        if "start values" in why
        else "--warmup/--samples/--chains"
        if sampler
        else "--data/--model"
    )
    msg = f"{option}: the {method.upper()} fit failed: {why.rstrip('.')}"
    if who:
        msg += (
            f" (subject ID {', '.join(who[:5])}"
            + (f" and {len(who) - 5} more" if len(who) > 5 else "")
            + ")"
        )
    if found:
        msg += "; implausible values: " + "; ".join(found)
    else:
        msg += (
            "; the data are within the plausibility limits: check the model's "
            "initial estimates (--model), the data's units (--dv-unit) and the "
            "fit options"
        )
    if data.warnings:  # unusual values the reader accepted may be the cause
        shown = [
            f"{'row ' + str(w.row) if w.row else 'data set'}"
            f"{', column ' + w.column if w.column else ''}: {w.message}"
            for w in data.warnings[:3]
        ]
        more = len(data.warnings) - len(shown)
        msg += (
            f"; {len(data.warnings)} data warning(s): "
            + "; ".join(shown)
            + (f"; and {more} more" if more > 0 else "")
        )
    return msg + ". Nothing was written"


def _implausible(
    data: PKData, subjects: set[str] | None, per_column: int = 1
) -> list[str]:
    """``row R (ID i), column C: <finding>`` for the first implausible value of
    each column in :data:`_DIAGNOSED` (restricted to ``subjects`` when given)."""
    ev = data.events
    if subjects is not None:
        ev = ev[ev["ID"].astype(str).isin(subjects)]
    is_obs = (ev["EVID"] == 0) & (ev.get("BLQ", 0) != 1)
    kinds = {
        "obs": is_obs,
        "dose": ev["EVID"] == 1,
        "all": pd.Series(True, index=ev.index),
    }
    converted = "DVUNIT" not in ev or ev["DVUNIT"].notna().all()
    found = []
    for col, lim, kind in _DIAGNOSED:
        if col not in ev or (col in ("DV", "LLOQ") and not converted):
            continue
        rows = (
            ev.loc[kinds[kind], ["ROW", "ID", col]]
            if "ROW" in ev
            else ev.loc[kinds[kind], ["ID", col]].assign(ROW=-1)
        )
        n = 0
        for r in rows.itertuples(index=False):
            value = getattr(r, col)
            if col in ("LLOQ", "WT", "AGE") and pd.isna(value):
                continue  # optional here; the reader decides whether it may be missing
            f = check(lim, value)
            if f is not None and f.level == "error":
                found.append(f"row {r.ROW} (ID {r.ID}), column {col}: {f.message}")
                n += 1
                if n >= per_column:
                    break
    return found


def fitted_model(
    model: PopModel, params: PopParams, fitted: dict[str, Any]
) -> PopModel:
    """``model`` with the estimated ``params`` and a ``fitted`` metadata entry.

    ``params.theta`` is the full vector (fixed thetas included) in
    ``model.theta_names`` order; ``params.sigma`` holds residual SDs. Covariances
    outside the model's IIV blocks are set to exactly zero so that the declared
    ``structure`` still validates. The original metadata is kept; an earlier
    ``fitted`` entry is replaced.
    """
    theta = np.asarray(params.theta, dtype=np.float64)
    omega = np.asarray(params.omega, dtype=np.float64).reshape(model.n_eta, model.n_eta)
    index = {p: k for k, p in enumerate(model.iiv_parameters)}
    mask = np.zeros_like(omega, dtype=bool)
    for block in model.omega_blocks:
        ks = [index[p] for p in block]
        mask[np.ix_(ks, ks)] = True
    new = with_values(
        model,
        thetas=dict(zip(model.theta_names, theta.tolist(), strict=True)),
        omega=np.where(mask, omega, 0.0),
        omega_iov=np.asarray(params.omega_iov, dtype=np.float64),
        residual=residual_from_sigma(
            np.asarray(params.sigma), model.residual.fixed, model.residual.form
        ),
        baseline=float(params.baseline),
    )
    meta = {k: v for k, v in model.metadata.items() if k != "fitted"}
    meta["fitted"] = dict(fitted)
    return replace(new, metadata=meta)


def _time_after_dose(cohort) -> np.ndarray:
    """Hours since the start of the latest earlier (non-padding) dose, per sample."""
    dt = np.asarray(cohort.obs_time)[:, :, None] - np.asarray(cohort.dose_time)[:, None]
    valid = (dt >= 0) & (np.asarray(cohort.dose_amt)[:, None, :] > 0)
    return np.where(valid, dt, np.inf).min(axis=-1)


def _b_from(res) -> np.ndarray:
    n_sub = res.etas.shape[0]
    return np.concatenate([res.etas, res.kappas.reshape(n_sub, -1)], axis=1)


def _map_modes(model: PopModel, cohort, params: PopParams) -> np.ndarray:
    """Conditional modes of the random effects given population values."""
    return np.asarray(focei_objective(model, cohort, params)[2])


def _drop_blq(data: PKData) -> PKData:
    """For models declared ``blq: drop``: BLQ samples become reported exclusions."""
    from phems_clinical.data.nonmem import Exclusion

    ev = data.events
    blq = (ev["EVID"] == 0) & (ev["BLQ"] == 1)
    rows = ev.loc[blq]
    excl = [
        Exclusion(
            int(r.get("ROW", -1)) if "ROW" in ev else -1,
            str(r["ID"]),
            "BLQ sample dropped (model declares blq: drop)",
        )
        for _, r in rows.iterrows()
    ]
    return data._replace(
        events=ev.loc[~blq].reset_index(drop=True),
        exclusions=list(data.exclusions) + excl,
    )


__all__ = ["METHODS", "FitFailedError", "fitted_model", "resolve_model", "run_fit"]


def _describe(ds, model, names) -> None:
    """``long_name`` and ``units`` on every variable of ``estimates.nc``: the
    table's columns are in each parameter's unit (coordinate ``parameter_unit``,
    the model's unit of a typical value, ``""`` where not stated) except
    ``rse_percent`` (%), ``r_hat`` and effective sample sizes (1); the random
    effects ``eta`` are on the log scale (1)."""
    from phems_clinical.pk.spec import parameter_units

    units = parameter_units(model, names)
    ds.coords["parameter_unit"] = ("parameter", [units.get(n, "") for n in names])
    for name in ds.data_vars:
        if name == "rse_percent":
            unit = "%"
        elif name == "eta" or name == "r_hat" or name.startswith("ess"):
            unit = "1"
        else:
            unit = "see parameter_unit"
        ds[name].attrs.update(long_name=name.replace("_", " "), units=unit)
