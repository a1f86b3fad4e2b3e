"""Downstream utility of a data source (real, anonymised or synthetic): train on the
source, test on held-out real data.

Every function returns a plain ``{metric name: float}`` dict (flags are 1.0/0.0),
so a scorecard can stack the sources into an xarray Dataset. Called with the real
training data as the source, each gives the "train on real, test on real" (TRTR)
reference; with a synthetic or anonymised source, TSTR / TATR (Rankin et al., JMIR
Med Inform 2020;8:e18910: report the difference with a CI).

* :func:`sepsis_utility`: the PICU sepsis model (:mod:`phems_clinical.models.sepsis`)
  trained centrally on the source's hourly table (Phoenix onsets from the source
  itself), scored on the real held-out table with the metrics of
  :func:`phems_clinical.evaluation.sepsis_eval.evaluate_site` (AUROC, AUPRC,
  Brier, calibration slope, ...), plus a stay-level bootstrap CI of the AUROC.
* :func:`cardiac_utility`: the multi-state model fitted on the source
  (:func:`phems_clinical.evaluation.cardiac_eval.pooled_fit`), evaluated on the
  real held-out episodes (:func:`phems_clinical.evaluation.cardiac_eval.evaluate`).
* :func:`pk_parameter_bias`: FOCEI population fit on the source and on the real
  data; relative bias of every typical value, of the IIV as CV %, and of the
  residual SDs. Acceptance (proposed by us; no published criterion exists):
  ``|bias| < 20 %`` for CL and V1, IIV within the real fit's 95 % Wald CI.
* :func:`pk_forecast_accuracy`: the dosing tool's MAP Bayesian forecast
  (:func:`phems_clinical.pk.forecast.fit_map_batch`, BLQ by M3 as in ``phems
  dose``) with the population fitted on the source as the prior: each held-out
  real patient is conditioned on its first ``n_prior_obs`` levels and the
  remaining quantified levels are predicted (MDAPE, MPE, share within +-20 %;
  Sheiner & Beal, J Pharmacokinet Biopharm 1981;9:503 for bias/precision).

:data:`CAPTIONS` holds a one-line plain-language caption per metric for the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from phems_clinical.data.cohort import Cohort
from phems_clinical.data.nonmem import PKData, read_nonmem, to_cohort
from phems_clinical.evaluation import cardiac_eval as ce
from phems_clinical.evaluation import classification as cm
from phems_clinical.evaluation import sepsis_eval as se
from phems_clinical.evaluation import survival as sv
from phems_clinical.models import multistate as ms
from phems_clinical.models import sepsis as sm
from phems_clinical.models.scores import sepsis_onset
from phems_clinical.pk.focei import FOCEIResult, build_focei, fit_focei
from phems_clinical.pk.forecast import fit_map_batch
from phems_clinical.pk.model import PopParams, n_occasions, predict
from phems_clinical.pk.spec import PopModel
from phems_clinical.rng import numpy_generator

__all__ = [
    "CAPTIONS",
    "UtilityInputError",
    "captions",
    "cardiac_utility",
    "cv_percent",
    "fit_population",
    "pk_forecast_accuracy",
    "pk_parameter_bias",
    "sepsis_utility",
]

#: One-line plain-language captions (HTML scorecard); keys as returned, with
#: ``{p}`` standing for a parameter name.
CAPTIONS: dict[str, str] = {
    # sepsis
    "auroc": "How well the risk score ranks hours that precede sepsis above the "
    "others, on real held-out stays (0.5 = chance, 1 = perfect).",
    "auroc_ci_low": "Lower end of the 95 % bootstrap interval of the AUROC "
    "(stays resampled).",
    "auroc_ci_high": "Upper end of the 95 % bootstrap interval of the AUROC.",
    "auprc": "Precision-recall area: how many alarms are true when most cases "
    "are caught (compare with the prevalence, its chance level).",
    "brier": "Mean squared error of the predicted probabilities (0 is perfect; "
    "lower is better).",
    "calibration_slope": "Whether risks are too extreme (< 1) or too timid (> 1) "
    "on real patients; 1 is ideal.",
    "calibration_intercept": "Whether risks are too high (< 0) or too low (> 0) "
    "on average; 0 is ideal.",
    "ece": "Average gap between predicted and observed risk over 10 risk bins.",
    "utility": "PhysioNet 2019 clinical utility of the alarms (1 = ideal, 0 = no "
    "alarms), threshold chosen on the source.",
    "prevalence": "Share of real held-out hours followed by sepsis onset within "
    "the horizon.",
    # cardiac
    "c_death": "How well predicted 1-year mortality ranks the real held-out "
    "patients (Harrell's C; 0.5 = chance).",
    "brier_death_30d": "Error of the predicted 30-day death risk on real patients "
    "(IPCW Brier; lower is better).",
    "brier_death_360d": "Error of the predicted 1-year death risk on real patients "
    "(IPCW Brier; lower is better).",
    "brier_readmit_360d": "Error of the predicted 1-year readmission risk "
    "(death competing; lower is better).",
    "auc_cicu_gt7": "How well the model picks out real patients whose first "
    "cardiac-ICU stay exceeds 7 days (0.5 = chance).",
    "c_death_ci_low": "Lower end of the 95 % bootstrap interval of the C-index "
    "(episodes resampled).",
    "c_death_ci_high": "Upper end of the 95 % bootstrap interval of the C-index.",
    "auc_cicu_gt7_ci_low": "Lower end of the 95 % bootstrap interval of the "
    "CICU > 7 days AUROC.",
    "auc_cicu_gt7_ci_high": "Upper end of the 95 % bootstrap interval of the "
    "CICU > 7 days AUROC.",
    "death_ece": "Average gap between predicted and observed 1-year death risk "
    "over risk groups.",
    "death_citl": "Predicted minus observed 1-year mortality overall "
    "(calibration-in-the-large).",
    "converged": "1 if the model fit on the source converged.",
    "n": "Number of real held-out patients (episodes) scored.",
    "deaths": "Number of deaths among them.",
    # sepsis bookkeeping
    "n_stays": "Number of real held-out stays scored.",
    "n_hours": "Number of real held-out stay-hours scored (before onset).",
    "threshold": "Alarm threshold chosen on the source (best clinical utility).",
    "source_utility": "Clinical utility of the alarms on the source itself.",
    "n_source_stays": "Number of stays in the source used for training.",
    "source_prevalence": "Share of source stay-hours followed by sepsis onset "
    "within the horizon.",
    "final_loss": "Training loss on the source at the end (cross-entropy).",
    # PK bias
    "source[{p}]": "Population estimate of {p} fitted on this source.",
    "real[{p}]": "Population estimate of {p} fitted on the real data.",
    "rel_bias[{p}]": "Relative difference of the population estimate of {p} "
    "fitted on this source from the one fitted on real data.",
    "pass[{p}]": "1 if the estimate of {p} is within the tolerance (20 %) of the "
    "real-data estimate.",
    "omega_in_real_ci[{p}]": "1 if the between-patient variance of {p} lies "
    "within the 95 % interval of the real-data fit.",
    "max_abs_bias_cl_v": "Largest relative difference of clearance and central "
    "volume from the real-data fit.",
    "source_converged": "1 if the population fit on the source converged.",
    "real_converged": "1 if the population fit on the real data converged.",
    "pass_cl_v": "1 if clearance and central volume are both within 20 % of "
    "the real-data fit (proposed acceptance).",
    # PK forecast
    "mdape": "Median absolute % error of the dosing tool's forecast of a "
    "patient's later factor levels (prior from this source).",
    "mpe": "Median % error (bias) of the forecast: > 0 over-predicts levels.",
    "within20": "Share of forecast levels within 20 % of the measured level.",
    "mdape_ci_low": "Lower end of the 95 % bootstrap interval of the median "
    "absolute % error (patients resampled).",
    "mdape_ci_high": "Upper end of the 95 % bootstrap interval of the median "
    "absolute % error.",
    "map_converged": "Share of patients whose individual (MAP) estimate converged.",
    "n_patients": "Number of real held-out patients with levels to forecast.",
    "n_levels": "Number of forecast levels compared with measurements.",
    "real_prior_mdape": "The same median absolute % error with the prior fitted "
    "on real training data (reference).",
    "real_prior_mpe": "Median % error with the prior from real training data.",
    "real_prior_within20": "Share within 20 % with the prior from real training data.",
    "real_prior_mdape_ci_low": "Lower end of the bootstrap interval of the "
    "real-prior median absolute % error.",
    "real_prior_mdape_ci_high": "Upper end of the bootstrap interval of the "
    "real-prior median absolute % error.",
    "real_prior_map_converged": "Share of converged individual estimates with "
    "the real-data prior.",
    "delta_mpe": "Change in forecast bias from using this source instead of real "
    "data (percentage points).",
    "delta_within20": "Change in the share of forecasts within 20 % from using "
    "this source instead of real data.",
    "delta_mdape": "Extra forecast error caused by using this source instead of "
    "real data for the prior (percentage points).",
}


class UtilityInputError(ValueError):
    """Bad input to a utility metric (names the argument or column and what was
    expected)."""


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise UtilityInputError(f"level: expected a CI level in (0, 1), got {level}")
    if n_boot < 0:
        raise UtilityInputError(f"n_boot: expected >= 0 resamples, got {n_boot}")


# --- sepsis ------------------------------------------------------------------------


def _check_hourly(name: str, df) -> None:
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise UtilityInputError(
            f"{name}: expected a non-empty hourly table "
            "(phems_clinical.data.picu.hourly_table)"
        )
    for c in ("stay_id", "hour"):
        if c not in df.columns:
            raise UtilityInputError(
                f"{name}: column {c!r} is missing (hourly table "
                "of data.picu.hourly.HOURLY_COLUMNS expected)"
            )


def _used_hours(ex: sm.Examples) -> tuple[np.ndarray, np.ndarray]:
    """(stay index, hour mask) of the hours scored by AUROC/calibration
    (present, before onset: ``w > 0``), as in ``sepsis_eval.evaluate_site``."""
    used = (
        np.asarray(ex.data["present"])
        & np.asarray(ex.mask)[:, None]
        & (np.asarray(ex.data["w"]) > 0)
    )
    stay = np.broadcast_to(np.arange(used.shape[0])[:, None], used.shape)
    return stay[used], used


def _stay_bootstrap(
    rng, stay: np.ndarray, y: np.ndarray, p: np.ndarray, n_boot: int, level: float
) -> tuple[float, float]:
    """Percentile CI of the AUROC resampling stays (all hours of a drawn stay)."""
    if n_boot == 0 or stay.size == 0:
        return float("nan"), float("nan")
    order = np.argsort(stay, kind="stable")
    stay, y, p = stay[order], y[order], p[order]
    ids, start, count = np.unique(stay, return_index=True, return_counts=True)
    out = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, ids.size, ids.size)
        c = count[pick]
        first = np.repeat(start[pick] - (np.cumsum(c) - c), c)
        idx = first + np.arange(int(c.sum()))  # all hours of the drawn stays
        out[b] = cm.auroc(y[idx], p[idx])
    return _percentile_ci(out, level)


def sepsis_utility(
    key,
    source_hourly: pd.DataFrame,
    test_hourly: pd.DataFrame,
    *,
    model: str = sm.LOGISTIC,
    horizon: int = 6,
    max_hours: int = 168,
    source_onset: pd.Series | None = None,
    test_onset: pd.Series | None = None,
    epochs: int | None = None,
    batch_size: int = 64,
    learning_rate: float | None = None,
    l2: float = 1e-4,
    model_kw: Mapping | None = None,
    feature_kw: Mapping | None = None,
    n_boot: int = 200,
    level: float = 0.95,
) -> dict[str, float]:
    """Train the sepsis model on ``source_hourly`` and score it on ``test_hourly``.

    One process, pooled training (:func:`phems_clinical.models.sepsis.fit_central`,
    Adam over stays) of the hour-weighted loss that
    :func:`~phems_clinical.evaluation.sepsis_eval.cross_site_evaluation` uses; the
    features are standardised with the SOURCE's sums; the alarm threshold maximises
    the CinC 2019 utility on the source. Labels: onset of Phoenix sepsis within
    ``horizon`` h (:func:`phems_clinical.models.scores.sepsis_onset` on each table,
    unless ``source_onset`` / ``test_onset`` give the onset hour per stay_id).

    Args:
      key: JAX key (initialisation, minibatch order, bootstrap).
      source_hourly, test_hourly: hourly tables (``data.picu.hourly_table``).
      model: ``"logistic"`` or ``"tcn"``.
      epochs, learning_rate: defaults 60 and 0.02 (logistic), 30 and 0.005 (TCN).
      n_boot, level: stay-level bootstrap of the AUROC (0 = no CI).

    Returns:
      ``evaluate_site``'s metrics on the test table (``auroc, auprc, brier,
      calibration_slope, calibration_intercept, ece, utility, prevalence, n_stays,
      n_hours``), ``auroc_ci_low/high``, ``threshold``, ``source_utility``,
      ``n_source_stays``, ``source_prevalence`` and ``final_loss``.
    """
    if model not in (sm.LOGISTIC, sm.TCN):
        raise UtilityInputError(
            f"model: expected {sm.LOGISTIC!r} or {sm.TCN!r}, got {model!r}"
        )
    if int(horizon) < 1:
        raise UtilityInputError(f"horizon: expected >= 1 hour, got {horizon}")
    _check_level(level, n_boot)
    _check_hourly("source_hourly", source_hourly)
    _check_hourly("test_hourly", test_hourly)
    is_tcn = model == sm.TCN
    epochs = (30 if is_tcn else 60) if epochs is None else int(epochs)
    learning_rate = (
        (0.005 if is_tcn else 0.02) if learning_rate is None else float(learning_rate)
    )
    onsets = {
        "source": sepsis_onset(source_hourly) if source_onset is None else source_onset,
        "test": sepsis_onset(test_hourly) if test_onset is None else test_onset,
    }
    sites = se.prepare_sites(
        {"source": source_hourly, "test": test_hourly},
        onsets,
        held_out=["test"],
        model=model,
        horizon_h=int(horizon),
        max_hours=max_hours,
        **(feature_kw or {}),
    )
    src, tst = sites.test["source"], sites.test["test"]
    w_src = np.asarray(src.data["w"])
    used_src = float(w_src.sum())
    if used_src == 0:
        raise UtilityInputError("source_hourly: no stay-hour before onset to train on")
    prev = float(np.sum(np.asarray(src.data["y"]) * w_src) / used_src)
    k_init, k_fit, k_boot = jax.random.split(key, 3)
    x0, unravel = sm.init_params(
        k_init,
        sites.n_features,
        model,
        prior=min(max(prev, 1e-3), 0.5),
        **(model_kw or {}),
    )
    loss = sm.make_loss(
        unravel, l2=l2, hours_norm=used_src / float(np.sum(np.asarray(src.mask)))
    )
    fit = sm.fit_central(
        k_fit,
        loss,
        x0,
        src,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
    )
    pred = sm.make_predict(unravel)
    p_src, p_tst = np.asarray(pred(fit.x, src)), np.asarray(pred(fit.x, tst))
    thr, u_src = se.choose_threshold([p_src], [src])
    out = {k: float(v) for k, v in se.evaluate_site(p_tst, tst, thr).items()}
    stay, used = _used_hours(tst)
    lo, hi = _stay_bootstrap(
        numpy_generator(k_boot),
        stay,
        np.asarray(tst.data["y"])[used],
        p_tst[used],
        n_boot,
        level,
    )
    out.update(
        auroc_ci_low=lo,
        auroc_ci_high=hi,
        threshold=float(thr),
        source_utility=float(u_src),
        n_source_stays=float(np.sum(np.asarray(src.mask))),
        source_prevalence=prev,
        final_loss=float(fit.losses[-1]),
    )
    return out


# --- cardiac -----------------------------------------------------------------------


def cardiac_utility(
    source_sojourns: pd.DataFrame,
    test_sojourns: pd.DataFrame,
    *,
    spec: ms.MultistateSpec = ms.DEFAULT_SPEC,
    horizons: Sequence[float] = (30.0, 360.0),
    key=None,
    n_boot: int = 200,
    level: float = 0.95,
    **fit_kw,
) -> dict[str, float]:
    """Fit the multi-state model on the source's sojourns (penalised ML by Newton,
    :func:`~phems_clinical.evaluation.cardiac_eval.pooled_fit`) and evaluate it on
    the real held-out sojourns (:func:`~phems_clinical.evaluation.cardiac_eval.
    evaluate`): ``c_death`` (Harrell's C of death by the last horizon),
    ``brier_death_<h>d`` (IPCW), ``brier_readmit_<h>d``, ``auc_cicu_gt7``,
    calibration ``death_ece``/``death_citl``, plus ``converged``.

    key : optional JAX key; with it, ``c_death_ci_low/high`` and
        ``auc_cicu_gt7_ci_low/high`` come from ``n_boot`` episode resamples
        (predictions fixed; Harrell 2015, *Regression Modeling Strategies*).
    fit_kw : penalties of ``pooled_fit`` (``ridge``, ``prior_sd_alpha``, ...).
    """
    for name, df in (
        ("source_sojourns", source_sojourns),
        ("test_sojourns", test_sojourns),
    ):
        if not isinstance(df, pd.DataFrame) or df.empty:
            raise UtilityInputError(
                f"{name}: expected a non-empty sojourn table "
                "(data.cardiac.pathways.episodes)"
            )
        missing = [
            c
            for c in ("episode_id", "state", "entry", "exit", "next_state")
            if c not in df.columns
        ]
        if missing:
            raise UtilityInputError(f"{name}: columns {missing} are missing")
    _check_level(level, n_boot)
    fit = ce.pooled_fit({"source": source_sojourns}, spec, **fit_kw)
    out = {
        k: float(v)
        for k, v in ce.evaluate(
            fit.params, test_sojourns, spec, horizons=horizons
        ).items()
    }
    out["converged"] = float(fit.converged)
    if key is not None and n_boot > 0:
        pred = ms.predict(
            fit.params,
            ms.site_examples(test_sojourns, spec),
            spec,
            horizons=tuple(horizons),
        )
        oc = ce.episode_outcomes(test_sojourns)
        mort = np.asarray(pred["mortality"])[:, -1]
        gt7 = np.asarray(pred["cicu_gt7"])
        t, d = oc.death_time.to_numpy(float), oc.death.to_numpy(float)
        y7 = oc.cicu_gt7.to_numpy(float)
        rng = numpy_generator(key)
        c_b, a_b = np.empty(n_boot), np.empty(n_boot)
        for b in range(n_boot):
            i = rng.integers(0, len(oc), len(oc))
            c_b[b] = sv.harrell_c(t[i], mort[i], d[i])
            ok = np.isfinite(y7[i])
            a_b[b] = cm.auroc(y7[i][ok], gt7[i][ok])
        out["c_death_ci_low"], out["c_death_ci_high"] = _percentile_ci(c_b, level)
        out["auc_cicu_gt7_ci_low"], out["auc_cicu_gt7_ci_high"] = _percentile_ci(
            a_b, level
        )
    return out


# --- PK ----------------------------------------------------------------------------


def _cohort(events, model: PopModel, name: str) -> Cohort:
    """NONMEM-style events (DataFrame or PKData) -> Cohort in the model's covariate
    order (validated by :func:`phems_clinical.data.nonmem.read_nonmem`)."""
    if isinstance(events, pd.DataFrame):
        data = read_nonmem(events, required_covariates=model.covariate_names)
    elif isinstance(events, PKData):
        data = events
    else:
        raise UtilityInputError(
            f"{name}: expected a NONMEM-style events DataFrame "
            f"or PKData, got {type(events).__name__}"
        )
    return to_cohort(data, model.covariate_names)[0]


def fit_population(events, model: PopModel, **fit_kw) -> FOCEIResult:
    """FOCEI population fit of ``model`` to NONMEM-style ``events`` (as ``phems
    fit --method focei``; with ``blq: drop`` the likelihood masks BLQ levels)."""
    return fit_focei(model, _cohort(events, model, "events"), **fit_kw)


def cv_percent(omega_var) -> np.ndarray:
    """IIV variance of a log-normal parameter -> CV % ``100 sqrt(exp(w2) - 1)``."""
    return 100.0 * np.sqrt(np.expm1(np.asarray(omega_var, float)))


def _as_params(x, model: PopModel, name: str, fit_kw) -> PopParams:
    if isinstance(x, PopParams):
        return x
    if isinstance(x, FOCEIResult):
        return x.params
    if isinstance(x, pd.DataFrame | PKData):
        return fit_population(x, model, **fit_kw).params
    raise UtilityInputError(
        f"{name}: expected events (DataFrame/PKData), a "
        f"FOCEIResult or PopParams, got {type(x).__name__}"
    )


def _named_values(
    model: PopModel, p: PopParams, *, failed: bool = False
) -> dict[str, float]:
    """Named population estimates (all NaN for a ``failed`` fit)."""
    out = {
        f"THETA({n})": float(v)
        for n, v in zip(model.theta_names, np.asarray(p.theta), strict=True)
    }
    om = np.diag(np.asarray(p.omega)).reshape(-1)
    out.update(
        {
            f"CV_IIV({n})": float(c)
            for n, c in zip(model.iiv_parameters, cv_percent(om), strict=True)
        }
    )
    out.update(
        {
            f"CV_IOV({n})": float(c)
            for n, c in zip(
                model.iov_parameters,
                cv_percent(np.diag(np.asarray(p.omega_iov)).reshape(-1)),
                strict=True,
            )
        }
    )
    sig = np.asarray(p.sigma)
    out["SIGMA(additive)"], out["SIGMA(proportional)"] = float(sig[0]), float(sig[1])
    return dict.fromkeys(out, float("nan")) if failed else out


def pk_parameter_bias(
    source_events,
    real_events,
    model: PopModel,
    *,
    real_fit: FOCEIResult | None = None,
    tolerance: float = 0.20,
    pass_params: Sequence[str] = ("CL", "V1"),
    fit_kw: Mapping | None = None,
) -> dict[str, float]:
    """Relative bias of the population estimates fitted on the source.

    Both fits are FOCEI (:func:`phems_clinical.pk.focei.fit_focei`, model's own
    initial values). Per parameter ``q`` (``THETA(name)``, ``CV_IIV(name)`` = IIV
    as CV %, ``CV_IOV(name)``, ``SIGMA(additive|proportional)``) the dict holds
    ``source[q]``, ``real[q]``, ``rel_bias[q] = (source - real) / real`` and
    ``pass[q]`` (``|rel_bias| < tolerance``). ``omega_in_real_ci[name]`` says
    whether the source's IIV variance lies in the real fit's 95 % Wald interval
    (``omega +- 1.96 SE``; a cheap stand-in for a bootstrap CI;
    NaN when the real fit has no SEs). Summary: ``max_abs_bias_cl_v`` and
    ``pass_cl_v`` over ``pass_params`` typical values (default CL and V1; the
    criterion ``|bias| < 20 %`` is proposed by us, not published), and
    ``source_converged`` / ``real_converged``.

    real_fit : a FOCEI fit of the real data (then ``real_events`` may be None).
    """
    if not 0.0 < tolerance:
        raise UtilityInputError(f"tolerance: expected > 0, got {tolerance}")
    unknown = [p for p in pass_params if p not in model.structural]
    if unknown:
        raise UtilityInputError(
            f"pass_params: {unknown} are not structural "
            f"parameters of {model.name!r} {model.structural}"
        )
    fit_kw = dict(fit_kw or {})
    if real_fit is None:
        if real_events is None:
            raise UtilityInputError(
                "real_events: expected events when real_fit is not given"
            )
        real_fit = fit_population(real_events, model, **fit_kw)
    src_fit = fit_population(source_events, model, **{"covariance": False, **fit_kw})
    # A failed fit (non-finite objective: its estimates are the start values or
    # worse) gives no estimates, so no bias: NaN, never a number.
    s_val = _named_values(model, src_fit.params, failed=not np.isfinite(src_fit.ofv))
    r_val = _named_values(model, real_fit.params, failed=not np.isfinite(real_fit.ofv))
    out: dict[str, float] = {}
    for q in s_val:
        r, s = r_val[q], s_val[q]
        rb = (s - r) / r if r != 0 else float("nan")
        out[f"source[{q}]"], out[f"real[{q}]"] = s, r
        out[f"rel_bias[{q}]"] = rb
        out[f"pass[{q}]"] = (
            float(abs(rb) < tolerance) if np.isfinite(rb) else float("nan")
        )
    se = dict(zip(real_fit.natural_names, np.asarray(real_fit.se, float), strict=True))
    om_s = np.diag(np.asarray(src_fit.params.omega)).reshape(-1)
    om_r = np.diag(np.asarray(real_fit.params.omega)).reshape(-1)
    for k, n in enumerate(model.iiv_parameters):
        s_e = se.get(f"OMEGA({n},{n})", float("nan"))
        out[f"omega_in_real_ci[{n}]"] = (
            float(abs(om_s[k] - om_r[k]) <= 1.96 * s_e)
            if np.isfinite(s_e)
            else float("nan")
        )
    crit = [abs(out[f"rel_bias[THETA({p})]"]) for p in pass_params]
    ok = all(np.isfinite(crit))
    out["max_abs_bias_cl_v"] = float(max(crit)) if ok else float("nan")
    out["pass_cl_v"] = float(all(c < tolerance for c in crit)) if ok else float("nan")
    out["source_converged"] = float(src_fit.converged)
    out["real_converged"] = float(real_fit.converged)
    return out


def _forecast_errors(
    model: PopModel,
    params: PopParams,
    cohort: Cohort,
    cond: np.ndarray,
    target: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """MAP on the conditioning levels, prediction of the target levels.
    Returns (patient index, percentage error) per target level, and the MAP
    gradient norms."""
    n_occ = n_occasions(cohort)
    res = fit_map_batch(
        model, params, cohort._replace(obs_mask=jnp.asarray(cond)), n_occ=n_occ
    )
    unflatten = build_focei(model, n_occ).unflatten

    def one(subject, b):
        eta, kappa = unflatten(b)
        return predict(model, subject, params.theta, eta, kappa, params.baseline)

    f = np.asarray(jax.vmap(one)(cohort, res.b))
    obs = np.asarray(cohort.obs_dv)
    pat = np.broadcast_to(np.arange(obs.shape[0])[:, None], obs.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        pe = 100.0 * (f - obs) / obs
    return pat[target], pe[target], np.asarray(res.grad_norm)


def _error_summary(
    pat: np.ndarray, pe: np.ndarray, rng, n_boot: int, level: float, prefix: str = ""
) -> dict[str, float]:
    out = {
        f"{prefix}mdape": float(np.median(np.abs(pe))),
        f"{prefix}mpe": float(np.median(pe)),
        f"{prefix}within20": float(np.mean(np.abs(pe) <= 20.0)),
    }
    if rng is not None and n_boot > 0:
        ids = np.unique(pat)
        groups = [np.abs(pe[pat == i]) for i in ids]
        b_md = np.empty(n_boot)
        for b in range(n_boot):
            pick = rng.integers(0, ids.size, ids.size)
            b_md[b] = np.median(np.concatenate([groups[i] for i in pick]))
        out[f"{prefix}mdape_ci_low"], out[f"{prefix}mdape_ci_high"] = _percentile_ci(
            b_md, level
        )
    return out


def pk_forecast_accuracy(
    source,
    holdout_events,
    model: PopModel,
    *,
    n_prior_obs: int = 2,
    real=None,
    key=None,
    n_boot: int = 200,
    level: float = 0.95,
    fit_kw: Mapping | None = None,
) -> dict[str, float]:
    """Forecast accuracy of the dosing tool when its prior comes from the source.

    The prior is the population fitted by FOCEI on ``source`` (events), or given
    (``FOCEIResult`` / ``PopParams``). For each held-out real patient the MAP
    estimate (:func:`phems_clinical.pk.forecast.fit_map_batch`, the posterior
    mode ``phems dose`` uses; BLQ levels by M3) is conditioned on its first
    ``n_prior_obs`` levels (time order; 0 = population prediction) and its later
    quantified levels are predicted. Percentage error ``PE = 100 (pred - obs) /
    obs``; patients with no level left to predict are skipped.

    Returns ``mdape`` (median |PE|, %), ``mpe`` (median PE, %; bias), ``within20``
    (share with |PE| <= 20 %), ``n_patients``, ``n_levels``, ``map_converged``
    (share of patients whose MAP gradient is < 1e-4); with ``key`` a
    patient-level bootstrap ``mdape_ci_low/high``; with ``real`` (real training
    events or their fit) the same as ``real_prior_*`` and ``delta_mdape``,
    ``delta_mpe``, ``delta_within20`` (source minus real).
    """
    if int(n_prior_obs) < 0:
        raise UtilityInputError(f"n_prior_obs: expected >= 0 levels, got {n_prior_obs}")
    _check_level(level, n_boot)
    fit_kw = {"covariance": False, **(fit_kw or {})}
    fmodel = model if model.blq == "m3" else replace(model, blq="m3")
    cohort = _cohort(holdout_events, model, "holdout_events")
    mask = np.asarray(cohort.obs_mask)
    order = np.argsort(
        np.where(mask, np.asarray(cohort.obs_time), np.inf), axis=1, kind="stable"
    )
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(mask.shape[1])[None, :], axis=1)
    cond = mask & (rank < int(n_prior_obs))
    target = mask & ~cond & ~np.asarray(cohort.obs_blq)
    enough = (cond.sum(axis=1) == int(n_prior_obs)) & (target.sum(axis=1) > 0)
    target &= enough[:, None]
    if not target.any():
        raise UtilityInputError(
            f"holdout_events: no patient has more than "
            f"n_prior_obs={n_prior_obs} levels to forecast"
        )
    rng = numpy_generator(key) if key is not None else None
    out: dict[str, float] = {}
    priors = [("", source, "source")]
    if real is not None:
        priors.append(("real_prior_", real, "real"))
    for prefix, prior, name in priors:
        params = _as_params(prior, model, name, fit_kw)
        pat, pe, gn = _forecast_errors(fmodel, params, cohort, cond, target)
        out.update(_error_summary(pat, pe, rng, n_boot, level, prefix))
        out[f"{prefix}map_converged"] = float(np.mean(gn[enough] < 1e-4))
    out["n_patients"] = float(enough.sum())
    out["n_levels"] = float(target.sum())
    if real is not None:
        for m in ("mdape", "mpe", "within20"):
            out[f"delta_{m}"] = out[m] - out[f"real_prior_{m}"]
    return out


def _caption(name: str) -> str | None:
    """Caption of a returned metric name (``rel_bias[THETA(CL)]`` -> the
    ``rel_bias[{p}]`` template), or None."""
    if name in CAPTIONS:
        return CAPTIONS[name]
    if "[" in name and name.endswith("]"):
        head, p = name[:-1].split("[", 1)
        tmpl = CAPTIONS.get(head + "[{p}]")
        return tmpl.format(p=p) if tmpl else None
    return None


def captions(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Plain-language captions of the metrics that have one."""
    return {k: c for k in metrics if (c := _caption(k)) is not None}
