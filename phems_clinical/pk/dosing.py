"""Individual PK summaries and prophylaxis regimens from posterior draws.

Given draws of one patient's random effects (from :mod:`phems_clinical.pk.forecast`),
every reported quantity is computed per draw, so its interval is the posterior
interval of that quantity (not a delta-method approximation):

* the patient's own parameters (random effects of the patient, IOV at its mean 0):
  clearance, V1, Vss, terminal and effective half-life, incremental recovery;
* the level curve and the predicted measured levels over the observed occasions;
* the time until the level falls to each threshold after the last infusion (all
  drug left in the body follows the last infusion's occasion, NONMEM's IOV rule,
  :mod:`phems_clinical.pk.occasions`) and after a standard dose;
* prophylaxis regimens at steady state for a *future* occasion: its IOV effects are
  drawn from the prior, ``kappa ~ N(0, Omega_IOV)``, because the next infusions are
  new occasions. Any periodic schedule: a fixed interval or named weekdays at the
  same clock time (:func:`steady_state_schedule`: each infusion repeated every
  period, superposed in closed form; trough, peak and hours above levels per week).

The dose for a schedule and target trough ``T`` is the smallest dose that vials can
make up with ``P(trough >= T) >= p`` over the draws. The model is linear in the
dose: the trough is ``B + D u`` with ``u`` the trough of a unit dose, so
``P(B + D u >= T) = P(D >= (T - B)/u)`` and the minimal dose is the ``p``-quantile of
``(T - B)/u`` (:func:`minimal_dose`).

Units: h, IU, dL, IU/dL.

References
----------
Iorio A, Blanchette V, Blatny J, et al. Estimating and interpreting secondary PK
parameters of factor concentrates: ISTH SSC guidance. Res Pract Thromb Haemost
2018;2:535-548. McEneny-King A, Chelle P, Foster G, et al. Development and evaluation
of a web-based population PK service for hemophilia (WAPPS-Hemo). Res Pract Thromb
Haemost 2019;3:117-129.
"""

from __future__ import annotations

import functools
import math
from functools import reduce
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phems_clinical._typing import Array, Float, Key
from phems_clinical.data.cohort import Cohort
from phems_clinical.data.demographics import GROWTH_REFERENCE
from phems_clinical.pk._cache import per_model
from phems_clinical.pk.analytic import macro_constants, steady_state
from phems_clinical.pk.derived import (
    effective_half_life,
    terminal_half_life,
    time_to_level,
    time_to_threshold,
    vss,
)
from phems_clinical.pk.model import (
    PopParams,
    individual_parameters,
    iov_covariance,
    predict,
    residual_variance,
)
from phems_clinical.pk.occasions import occasion_concentration
from phems_clinical.pk.simulate import draw_kappa
from phems_clinical.pk.spec import PopModel

__all__ = [
    "DoseRecommendation",
    "Regimen",
    "SteadyState",
    "default_intervals",
    "detect_regimen",
    "future_kappa",
    "future_parameters",
    "minimal_dose",
    "prior_predictive",
    "recommend",
    "round_down_to_vials",
    "round_to_vials",
    "steady_state_schedule",
    "time_above_per_week",
    "trough_probability",
    "validated_range",
    "vial_combination",
]

CURVE_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MAX_DOSE_IU_KG = 100.0
"""Largest prophylactic dose proposed, IU/kg: above the highest doses in FVIII and
FIX prophylaxis labels (e.g. 65 IU/kg for Advate, 100 IU/kg for Alprolix); a target
that needs more is reported as not reachable."""

_BISECT_STEPS = 60


class Regimen(NamedTuple):
    """One prophylaxis option at steady state.

    ``dose_IU`` is ``nan`` when no dose up to :data:`MAX_DOSE_IU_KG` reaches the
    target with the required probability; ``peak_IU_dL`` and
    ``hours_below_target_per_week`` are posterior draws at the recommended dose.
    """

    interval_h: float
    target_IU_dL: float
    dose_IU: float
    trough_prob: float
    peak_IU_dL: np.ndarray
    hours_below_target_per_week: np.ndarray


class DoseRecommendation(NamedTuple):
    """Posterior draws of everything the dosing tool reports for one patient.

    parameters : name -> (n_draws,) clearance, v1, vss, terminal_half_life,
        effective_half_life, incremental_recovery.
    time_to_threshold : threshold -> (n_draws,) h after the end of the last infusion.
    time_to_threshold_standard : threshold -> (n_draws,) h after the end of a standard
        dose of ``standard_dose_IU`` given to a future occasion.
    level_pred : (n_draws, n_obs) predicted levels at the measured times.
    curve_time : (n_t,) h; curve : (len(CURVE_QUANTILES), n_t) level quantiles.
    regimens : one :class:`Regimen` per (interval, target).
    current_regimen : ``(interval_h, dose_IU)`` when the history is a regular regimen.
    current_trough_prob : target -> P(trough >= target) on the current regimen.
    """

    parameters: dict[str, np.ndarray]
    time_to_threshold: dict[float, np.ndarray]
    time_to_threshold_standard: dict[float, np.ndarray]
    standard_dose_IU: float
    level_pred: np.ndarray
    curve_time: np.ndarray
    curve: np.ndarray
    regimens: tuple[Regimen, ...]
    current_regimen: tuple[float, float] | None
    current_trough_prob: dict[float, float] | None


def default_intervals(model: PopModel) -> tuple[float, ...]:
    """Dosing intervals to tabulate, h: 24/48/72 for standard half-life FVIII, up
    to weekly for extended half-life products and FIX."""
    if model.extended_half_life:
        return (24.0, 48.0, 72.0, 96.0, 120.0, 168.0)
    return (24.0, 48.0, 72.0)


def validated_range(model: PopModel) -> dict[str, tuple[float | None, float | None]]:
    """Age (y) and weight (kg) ranges of the population the model was built on.

    Age comes from the model's ``validated_range.AGE`` metadata (the published age
    range). Weight is taken from ``validated_range.WT`` when given; otherwise it is
    derived from the age range as the male median weight-for-age at the lowest age
    times ``exp(-2 SD)`` up to the largest median over the range times ``exp(+2 SD)``
    (CDC 2000 / WHO 2006 growth references, log-SD 0.2), a proxy where papers give
    no weight range.
    """
    meta = model.metadata.get("validated_range", {}) or {}
    age = tuple(meta.get("AGE", (None, None)))
    wt = meta.get("WT")
    if wt is None and age[0] is not None:
        ref = GROWTH_REFERENCE["male"]
        hi_age = age[1] if age[1] is not None else ref[-1, 0]
        inside = (ref[:, 0] >= age[0]) & (ref[:, 0] <= hi_age)
        lo = float(np.interp(age[0], ref[:, 0], ref[:, 2])) * math.exp(-0.4)
        hi = float(ref[inside, 2].max(initial=np.interp(hi_age, ref[:, 0], ref[:, 2])))
        wt = (round(lo, 1), round(hi * math.exp(0.4), 1))
    return {"AGE": age, "WT": tuple(wt) if wt is not None else (None, None)}


def round_to_vials(dose_iu: float, vial_sizes: tuple[float, ...]) -> float:
    """Smallest total at or above ``dose_iu`` that whole vials can make up, IU.

    Vial contents are integers (IU); any combination of the listed sizes is allowed.

    >>> round_to_vials(1130.0, (250, 500, 1000))
    1250.0
    >>> round_to_vials(600.0, (500, 1000))
    1000.0
    """
    if not math.isfinite(dose_iu):
        return math.nan
    sizes = sorted(int(v) for v in vial_sizes)
    if dose_iu <= 0:
        return float(sizes[0])
    step = reduce(math.gcd, sizes)
    n = math.ceil(dose_iu / step) + max(sizes) // step + 1
    reach = np.zeros(n + 1, bool)
    reach[0] = True
    for i in range(1, n + 1):
        reach[i] = any(i * step >= s and reach[i - s // step] for s in sizes)
    start = math.ceil(dose_iu / step - 1e-9)
    total = start + int(np.argmax(reach[start:]))
    return float(total * step)


def detect_regimen(
    dose_time: np.ndarray,
    dose_amt: np.ndarray,
    *,
    min_doses: int = 3,
    rel_tol: float = 0.1,
) -> tuple[float, float] | None:
    """``(interval_h, dose_IU)`` when the last ``min_doses`` or more infusions are
    equal doses at a regular interval (both within ``rel_tol``); else ``None``."""
    t, d = np.asarray(dose_time, float), np.asarray(dose_amt, float)
    keep = d > 0
    t, d = t[keep], d[keep]
    if t.size < min_doses:
        return None
    gaps = np.diff(t)
    tau, dose = float(np.median(gaps)), float(np.median(d))
    if (
        tau <= 0
        or np.any(np.abs(gaps / tau - 1) > rel_tol)
        or np.any(np.abs(d / dose - 1) > rel_tol)
    ):
        return None
    return tau, dose


def prior_predictive(
    key: Key,
    model: PopModel,
    params: PopParams,
    subject: Cohort,
    *,
    n_occ: int,
    n: int = 2000,
) -> np.ndarray:
    """``n`` simulated measurements at the subject's sample times under the prior
    (IIV, IOV and residual error): (n, n_obs), IU/dL. Used to flag levels that the
    population model makes implausible (e.g. a unit mix-up)."""

    def build():
        n_b = model.n_eta + n_occ * model.n_kappa

        def sim(key, params, subject):
            k1, k2 = jax.random.split(key)
            om = jax.scipy.linalg.block_diag(
                params.omega, iov_covariance(params.omega_iov, n_occ)
            )
            b = jax.random.multivariate_normal(
                k1, jnp.zeros(n_b), om, shape=(n,), method="eigh"
            )
            eps = jax.random.normal(k2, (n, subject.obs_time.shape[0]))

            def one(bb, e):
                f = predict(
                    model,
                    subject,
                    params.theta,
                    bb[: model.n_eta],
                    bb[model.n_eta :].reshape(n_occ, model.n_kappa),
                    params.baseline,
                )
                return (
                    f
                    + jnp.sqrt(residual_variance(f, params.sigma, model.residual.form))
                    * e
                )

            return jax.vmap(one)(b, eps)

        return jax.jit(sim)

    return np.asarray(
        per_model(model, ("prior_predictive", n_occ, n), build, persist=True)(
            key, params, subject
        )
    )


def _fns(model: PopModel, n_occ: int, thresholds: tuple[float, ...]):
    """Jitted per-draw computations for ``model`` (cached per model object)."""
    n_eta, n_cmt = model.n_eta, model.n_cmt

    def split(b):
        return b[:n_eta], b[n_eta:].reshape(n_occ, model.n_kappa)

    def patient(
        params: PopParams,
        subject: Cohort,
        b,
        kappa_new,
        weight,
        std_dose,
        std_dur,
        curve_t,
    ):
        eta, kappa = split(b)
        cov = subject.covariates
        own = individual_parameters(
            model, params.theta, eta, jnp.zeros((1, model.n_kappa)), cov
        )[0]
        future = individual_parameters(model, params.theta, eta, kappa_new[None], cov)[
            0
        ]
        per_dose = individual_parameters(model, params.theta, eta, kappa, cov)[
            subject.dose_occ
        ]
        base = params.baseline
        out = {
            "clearance": own[0],
            "v1": own[1],
            "vss": vss(own, n_cmt),
            "terminal_half_life": terminal_half_life(own, n_cmt),
            "effective_half_life": effective_half_life(own, n_cmt),
            "incremental_recovery": weight / own[1],
        }
        dt, da, dd = subject.dose_time, subject.dose_amt, subject.dose_dur
        end = jnp.max(jnp.where(da > 0, dt + dd, -jnp.inf))
        thr = jnp.asarray(thresholds)
        if model.n_kappa and n_occ > 1:
            # NONMEM's IOV semantics: after the last infusion all drug left in the
            # body follows the last occasion's parameters (pk.occasions)
            occ_params = individual_parameters(model, params.theta, eta, kappa, cov)

            def above(t, p):
                return occasion_concentration(
                    t[None], dt, da, dd, subject.dose_occ, p, n_cmt
                )[0]

            ttt = (
                jax.vmap(lambda x: time_to_level(above, occ_params, x, end, base))(thr)
                - end
            )
        else:
            ttt = (
                jax.vmap(
                    lambda x: time_to_threshold(
                        x, end, dt, da, dd, per_dose, n_cmt, base
                    )
                )(thr)
                - end
            )
        one = jnp.zeros(1)
        std = (
            jax.vmap(
                lambda x: time_to_threshold(
                    x,
                    std_dur,
                    one,
                    jnp.full(1, std_dose),
                    jnp.full(1, std_dur),
                    future,
                    n_cmt,
                    base,
                )
            )(thr)
            - std_dur
        )
        # NONMEM's IOV semantics (pk.occasions): all drug follows the current occasion
        level_pred = predict(model, subject, params.theta, eta, kappa, base)
        curve = predict(model, subject, params.theta, eta, kappa, base, times=curve_t)
        return out, ttt, std, level_pred, curve, future

    def build():
        return jax.jit(
            jax.vmap(patient, in_axes=(None, None, 0, 0, None, None, None, None))
        )

    return per_model(model, ("dosing", n_occ, thresholds), build, persist=True)


def _unit_ss(model: PopModel):
    """Jitted unit-dose steady state: troughs (n_tau, n_draws) and the level curve
    inside the interval, vectorised over draws."""
    n_cmt = model.n_cmt

    def trough_peak(p, tau, dur):
        return (
            steady_state(tau, tau, 1.0, dur, p, n_cmt),
            steady_state(dur, tau, 1.0, dur, p, n_cmt),
        )

    def hours_below(p, tau, dur, dose, gap):
        # the level above baseline falls monotonically from the end of the infusion
        # to the next dose: bisection for the time it crosses ``gap`` (target - B)
        def level(t):
            return dose * steady_state(t, tau, 1.0, dur, p, n_cmt)

        def body(_, lohi):
            lo, hi = lohi
            mid = 0.5 * (lo + hi)
            above = level(mid) >= gap
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(0, _BISECT_STEPS, body, (dur, tau))
        t_cross = 0.5 * (lo + hi)
        below = jnp.where(
            level(tau) >= gap, 0.0, jnp.where(level(dur) < gap, tau, tau - t_cross)
        )
        return below * 168.0 / tau

    def build():
        tp = jax.jit(jax.vmap(trough_peak, in_axes=(0, None, None)))
        hb = jax.jit(jax.vmap(hours_below, in_axes=(0, None, None, None, None)))
        return tp, hb

    return per_model(model, ("unit_ss",), build, persist=True)


def recommend(
    key: Key,
    model: PopModel,
    params: PopParams,
    subject: Cohort,
    b_draws: Float[Array, "n_draws n_b"],
    *,
    n_occ: int,
    weight_kg: float,
    thresholds: tuple[float, ...] = (1.0, 2.0, 5.0),
    targets: tuple[float, ...] = (1.0, 3.0, 5.0),
    intervals: tuple[float, ...] | None = None,
    probability: float = 0.9,
    vial_sizes: tuple[float, ...] = (250.0, 500.0, 1000.0),
    standard_dose_IU_kg: float = 50.0,
    curve_time: Float[Array, " n_t"] | None = None,
) -> DoseRecommendation:
    """Everything the dosing tool reports, per posterior draw of ``b``.

    Parameters
    ----------
    key : jax.random key
        For the IOV effects of future occasions (regimens, standard dose).
    model, params
        The population model (prior) and its values; ``params.baseline`` is the
        endogenous level added to every prediction (IU/dL).
    subject : Cohort
        The patient (no leading axis), as given to :func:`~.forecast.fit_map`.
    b_draws : (n_draws, n_b)
        Posterior draws of ``(eta, kappa per occasion)``.
    n_occ, weight_kg
        Number of occasions in ``subject``; body weight (kg).
    thresholds, targets, intervals, probability, vial_sizes, standard_dose_IU_kg
        Levels for the times to threshold (IU/dL); trough targets (IU/dL); dosing
        intervals (h; ``None``: :func:`default_intervals`, ``()``: no interval
        grid, as when :mod:`phems_clinical.dosing.regimens` designs); the required
        ``P(trough >= target)``; vial contents (IU); the standard dose (IU/kg).
    curve_time : (n_t,) h, optional
        Times of the level curve (default: 0 to 96 h after the last infusion).
    """
    b_draws = jnp.asarray(b_draws)
    n = b_draws.shape[0]
    intervals = default_intervals(model) if intervals is None else tuple(intervals)
    kappa_new = future_kappa(key, params.omega_iov, n, model.n_kappa)
    last = subject.dose_time[
        jnp.argmax(jnp.where(subject.dose_amt > 0, subject.dose_time, -jnp.inf))
    ]
    std_dur = float(jnp.max(jnp.where(subject.dose_amt > 0, subject.dose_dur, 0.0)))
    if curve_time is None:
        curve_time = jnp.linspace(0.0, float(last) + 96.0, 300)
    std_dose = standard_dose_IU_kg * weight_kg
    per_draw = _fns(model, n_occ, tuple(float(t) for t in thresholds))
    own, ttt, std, level_pred, curve, future = per_draw(
        params,
        subject,
        b_draws,
        kappa_new,
        weight_kg,
        std_dose,
        std_dur,
        jnp.asarray(curve_time),
    )
    base = float(params.baseline)

    regimens = []
    max_dose = MAX_DOSE_IU_KG * weight_kg
    for tau in intervals:
        trough_peak, hours_below = _unit_ss(model)
        u_trough, u_peak = (np.asarray(x) for x in trough_peak(future, tau, std_dur))
        for target in targets:
            need = (target - base) / u_trough  # dose each draw needs
            dose = round_to_vials(float(np.quantile(need, probability)), vial_sizes)
            if dose > max_dose:
                dose = math.nan
            use = dose if math.isfinite(dose) else 0.0
            prob = float(np.mean(need <= use)) if math.isfinite(dose) else math.nan
            hb = np.asarray(hours_below(future, tau, std_dur, use, target - base))
            peak = base + use * u_peak
            if not math.isfinite(dose):
                peak, hb = np.full(n, np.nan), np.full(n, np.nan)
            regimens.append(Regimen(tau, target, dose, prob, peak, hb))

    current = detect_regimen(
        np.asarray(subject.dose_time), np.asarray(subject.dose_amt)
    )
    current_prob = None
    if current is not None:
        u_trough, _ = _unit_ss(model)[0](future, current[0], std_dur)
        current_prob = {
            t: float(np.mean(base + current[1] * np.asarray(u_trough) >= t))
            for t in targets
        }
    q = np.quantile(np.asarray(curve), CURVE_QUANTILES, axis=0)
    return DoseRecommendation(
        parameters={k: np.asarray(v) for k, v in own.items()},
        time_to_threshold={t: np.asarray(ttt[:, i]) for i, t in enumerate(thresholds)},
        time_to_threshold_standard={
            t: np.asarray(std[:, i]) for i, t in enumerate(thresholds)
        },
        standard_dose_IU=float(std_dose),
        level_pred=np.asarray(level_pred),
        curve_time=np.asarray(curve_time),
        curve=q,
        regimens=tuple(regimens),
        current_regimen=current,
        current_trough_prob=current_prob,
    )


# ---------------------------------------------------------------------------
# Steady state of any periodic schedule (fixed interval or weekdays)
# ---------------------------------------------------------------------------

_RISE_NEWTON_STEPS = 8
_FALL_GRID = 16
_FALL_NEWTON_STEPS = 6


def future_kappa(
    key: Key, omega_iov: Array, n: int, n_kappa: int
) -> Float[Array, "n n_kappa"]:
    """IOV effects of a future occasion, ``kappa ~ N(0, Omega_IOV)``: (n, n_kappa).

    ``omega_iov`` is the covariance matrix (2-D) or, uncorrelated, the variances
    (1-D, taken as their diagonal matrix): the same draws from the same key
    (:func:`~phems_clinical.pk.simulate.draw_kappa`).
    """
    om = jnp.asarray(omega_iov, dtype=float)
    om = jnp.diag(om) if om.ndim == 1 else om.reshape(n_kappa, n_kappa)
    return draw_kappa(key, om, (n,))


def future_parameters(
    key: Key,
    model: PopModel,
    params: PopParams,
    subject: Cohort,
    b_draws: Float[Array, "n_draws n_b"],
) -> Float[Array, "n_draws n_par"]:
    """The patient's PK parameters at a future occasion, one row per posterior draw:
    the draw's ``eta`` with new IOV effects from :func:`future_kappa` (the next
    infusions are new occasions). Order ``PARAM_NAMES[n_cmt]``, dL/h and dL."""
    b_draws = jnp.asarray(b_draws)
    kappa = future_kappa(key, params.omega_iov, b_draws.shape[0], model.n_kappa)

    def build():
        def one(theta, cov, b, k):
            return individual_parameters(model, theta, b[: model.n_eta], k[None], cov)[
                0
            ]

        return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0)))

    fn = per_model(model, ("future_parameters",), build, persist=True)
    return fn(params.theta, subject.covariates, b_draws, kappa)


def _pos_exprel(x):
    """``(1 - exp(-x)) / x`` for ``x >= 0``, 1 at 0 (values only)."""
    xs = jnp.where(x > 0, x, 1.0)
    return jnp.where(x > 0, -jnp.expm1(-xs) / xs, 1.0)


def _segments(p, offsets, period, dur, n_cmt):
    """Per-infusion coefficients of the unit-dose steady state.

    Every infusion ``k`` (start ``offsets[k]`` in ``[0, period)``, ascending, all
    ``dur`` h long) repeats every ``period`` h. With ``C(t) = sum_i A_i exp(-lam_i
    t)`` the unit-bolus response (:func:`~.analytic.macro_constants`), the level
    (above baseline, per IU of each dose) ``s`` h after the start of infusion ``m``
    is ``sum_i P_mi exp(-lam_i s) + A_i (1 - exp(-lam_i s))/(lam_i dur)`` during
    the infusion and ``sum_i E_mi exp(-lam_i (s - dur))`` after it, where

    ``P_mi = A_i exprel(lam_i dur) sum_k exp(-lam_i l_mk) / (1 - exp(-lam_i period))``

    sums every earlier infusion over all past periods (geometric series), ``l_mk``
    being the time from the end of infusion ``k`` to the start of ``m``, and
    ``E_mi = P_mi exp(-lam_i dur) + A_i exprel(lam_i dur)``.

    Returns ``lam, a, P, E, gaps`` with ``gaps[m]`` the time from the start of
    infusion ``m`` to the next one (h).
    """
    lam, a = macro_constants(p, n_cmt)
    e = a * _pos_exprel(lam * dur)
    # time from the end of infusion k to the next start of m, in (0, period]
    lag = period - jnp.mod(offsets[None, :] + dur - offsets[:, None], period)
    geo = jnp.exp(-lam[None, None, :] * lag[:, :, None]).sum(axis=1)
    pre = e * geo / -jnp.expm1(-lam * period)
    end = pre * jnp.exp(-lam * dur) + e
    gaps = jnp.diff(jnp.concatenate([offsets, offsets[:1] + period]))
    return lam, a, pre, end, gaps


def _trough_peak(p, offsets, period, dur, n_cmt):
    """Unit-dose steady-state trough (lowest pre-dose level of the period) and
    peak (highest level at the end of an infusion), IU/dL per IU.

    Between infusions every dose's contribution is a positive sum of decaying
    exponentials (``A_i > 0``), so the minimum of the period is a pre-dose level
    and the maximum is at the end of an infusion (the level rises during one, see
    :func:`_time_above`).
    """
    _, _, pre, end, _ = _segments(p, offsets, period, dur, n_cmt)
    return jnp.min(pre.sum(-1)), jnp.max(end.sum(-1))


def _time_above(p, offsets, period, dur, z, n_cmt):
    """Hours per ``period`` that the unit-dose steady-state level is ``>= z``
    (each of ``z``, IU/dL per IU), summed over the infusions.

    During an infusion each exponential term rises and is concave (its slope
    ``exp(-lam_i s) (A_i/dur - lam_i P_i)`` is positive because infusions do not
    overlap, so ``lam_i P_i < A_i/dur``): Newton from the start of the infusion
    increases monotonically to the crossing. After it the level is
    ``sum_i E_i exp(-lam_i s)``
    and its log is convex and decreasing in ``s``: Newton from the last point of a
    grid (denser early, where the level bends most) still above ``z`` increases
    monotonically to the crossing. Both converge to rounding error in the fixed
    number of steps used here (checked against a dense grid in the tests).
    """
    lam, a, pre, end, gaps = _segments(p, offsets, period, dur, n_cmt)
    fall = gaps - dur  # (n_inf,)
    lo_rise, hi = pre.sum(-1), end.sum(-1)
    lo_fall = (end * jnp.exp(-lam * fall[:, None])).sum(-1)
    dur_safe = jnp.where(dur > 0, dur, 1.0)
    zz = z[None, :]  # (1, n_z)
    shape = (offsets.shape[0], z.shape[0])  # (n_inf, n_z)

    def rise_newton(_, s):
        e = jnp.exp(-lam * s[..., None])
        level = jnp.sum(
            pre[:, None] * e - a * jnp.expm1(-lam * s[..., None]) / (lam * dur_safe), -1
        )
        slope = jnp.sum(e * (a / dur_safe - lam * pre[:, None]), -1)
        return jnp.clip(s - (level - zz) / slope, 0.0, dur)

    s_up = jax.lax.fori_loop(0, _RISE_NEWTON_STEPS, rise_newton, jnp.zeros(shape))
    rise = jnp.where(
        zz <= lo_rise[:, None], dur, jnp.where(zz > hi[:, None], 0.0, dur - s_up)
    )

    log_z = jnp.log(jnp.where(zz > 0, zz, 1.0))
    log_end = jnp.log(end)  # (n_inf, n_cmt)
    grid = jnp.linspace(0.0, 1.0, _FALL_GRID)[None, :] ** 2 * fall[:, None]
    log_grid = jax.nn.logsumexp(log_end[:, None, :] - lam * grid[..., None], -1)
    k = jnp.sum(log_grid[:, None, :] >= log_z[..., None], -1)
    start = jnp.take_along_axis(grid, jnp.clip(k - 1, 0, _FALL_GRID - 1), axis=1)

    def fall_newton(_, s):
        x = log_end[:, None, :] - lam * s[..., None]
        top = x.max(-1)
        e = jnp.exp(x - top[..., None])
        tot = e.sum(-1)
        step = (top + jnp.log(tot) - log_z) * tot / jnp.sum(e * lam, -1)
        return jnp.clip(s + step, 0.0, fall[:, None])

    cross = jax.lax.fori_loop(0, _FALL_NEWTON_STEPS, fall_newton, start)
    down = jnp.where(
        zz > hi[:, None], 0.0, jnp.where(zz <= lo_fall[:, None], fall[:, None], cross)
    )
    return jnp.where(z <= 0, period, (rise + down).sum(0))


@functools.cache
def _schedule_fns(n_cmt: int):
    """Jitted, vectorised over draws: ``(trough, peak)`` and time above levels."""
    from phems_clinical.pk.export_cache import persistent_jit  # kept between runs

    tp = persistent_jit(
        jax.vmap(
            functools.partial(_trough_peak, n_cmt=n_cmt), in_axes=(0, None, None, None)
        ),
        ("schedule_trough_peak", n_cmt),
    )
    above = persistent_jit(
        jax.vmap(
            functools.partial(_time_above, n_cmt=n_cmt),
            in_axes=(0, None, None, None, None),
        ),
        ("schedule_time_above", n_cmt),
    )
    return tp, above


class SteadyState(NamedTuple):
    """Unit-dose steady state of one schedule, per posterior draw.

    A dose of ``D`` IU per infusion gives the level ``baseline + D * u`` (the model
    is linear in the dose), so trough and peak are stored per IU.
    """

    period_h: float
    trough_per_IU: np.ndarray  # (n_draws,) IU/dL per IU
    peak_per_IU: np.ndarray  # (n_draws,) IU/dL per IU
    params: Float[Array, "n_draws n_par"]
    offsets_h: np.ndarray
    dur_h: float
    n_cmt: int


def _check_pattern(offsets: np.ndarray, period: float, dur: float) -> None:
    if not (math.isfinite(period) and period > 0):
        raise ValueError(
            f"the dosing period must be a positive number of hours, got {period!r}"
        )
    if (
        offsets.ndim != 1
        or offsets.size == 0
        or np.any(np.diff(offsets) <= 0)
        or offsets[0] < 0
        or offsets[-1] >= period
    ):
        raise ValueError(
            f"infusion starts must be ascending within [0, {period:g}) "
            f"h, got {offsets.tolist()}"
        )
    gaps = np.diff(np.append(offsets, offsets[0] + period))
    if not (math.isfinite(dur) and 0 <= dur < gaps.min()):
        raise ValueError(
            f"infusion duration: expected 0 to less than the shortest "
            f"gap between infusions ({gaps.min():g} h), got {dur!r} h"
        )


def steady_state_schedule(
    future: Float[Array, "n_draws n_par"],
    n_cmt: int,
    offsets_h,
    period_h: float,
    dur_h: float,
) -> SteadyState:
    """Trough and peak of a unit dose at steady state for each draw's parameters.

    Parameters
    ----------
    future : (n_draws, 2 * n_cmt)
        Parameters of a future occasion (:func:`future_parameters`).
    offsets_h, period_h : infusion starts (h, ascending in ``[0, period)``) of a
        pattern repeated every ``period_h`` h: ``[0], tau`` for a fixed interval,
        ``24 * weekday`` and 168 h for named weekdays at the same clock time.
    dur_h : infusion duration, h (0: bolus), shorter than every gap.
    """
    offsets = np.asarray(offsets_h, float)
    _check_pattern(offsets, float(period_h), float(dur_h))
    tp, _ = _schedule_fns(n_cmt)
    trough, peak = tp(future, jnp.asarray(offsets), float(period_h), float(dur_h))
    return SteadyState(
        float(period_h),
        np.asarray(trough),
        np.asarray(peak),
        future,
        offsets,
        float(dur_h),
        n_cmt,
    )


def time_above_per_week(
    ss: SteadyState, dose_IU, baseline: float, levels_IU_dL
) -> np.ndarray:
    """Hours per week at steady state with the level ``>=`` each of
    ``levels_IU_dL`` on ``dose_IU`` per infusion (a scalar, or one dose per level):
    (n_draws, n_levels)."""
    levels = np.atleast_1d(np.asarray(levels_IU_dL, float))
    dose = np.broadcast_to(np.asarray(dose_IU, float), levels.shape)
    if not np.all(dose > 0):
        raise ValueError(f"dose_IU: expected a positive dose, got {dose_IU!r}")
    z = (levels - baseline) / dose
    n_pad = -(-z.size // 16) * 16  # a multiple of 16: fewer compiled shapes
    z_pad = np.concatenate([z, np.full(n_pad - z.size, z[-1] if z.size else 1.0)])
    _, above = _schedule_fns(ss.n_cmt)
    out = np.asarray(
        above(
            ss.params,
            jnp.asarray(ss.offsets_h),
            ss.period_h,
            ss.dur_h,
            jnp.asarray(z_pad),
        )
    )[:, : z.size]
    return out * (168.0 / ss.period_h)


def minimal_dose(
    ss: SteadyState, target_IU_dL: float, baseline: float, probability: float
) -> float:
    """Smallest dose per infusion (IU, not vial-rounded) with ``P(trough >=
    target) >= probability`` over the draws.

    The trough is ``baseline + D u`` (``u > 0``), so draw ``j`` needs ``D >=
    (target - baseline) / u_j``; the smallest ``D`` that enough draws accept is the
    ``probability``-quantile of those needs with the inverted empirical CDF (the
    smallest value whose ECDF reaches ``probability``): at it the probability is
    ``>= probability``, at any smaller dose it is below.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(
            f"probability: expected a number in (0, 1), got {probability!r}"
        )
    need = (target_IU_dL - baseline) / ss.trough_per_IU
    return float(np.quantile(need, probability, method="inverted_cdf"))


def trough_probability(
    ss: SteadyState, dose_IU: float, baseline: float, target_IU_dL: float
) -> float:
    """``P(trough >= target)`` over the draws on ``dose_IU`` per infusion."""
    return float(np.mean(baseline + dose_IU * ss.trough_per_IU >= target_IU_dL))


def _vial_table(n_units: int, units: list[int]) -> np.ndarray:
    """Fewest vials making up ``i`` units (``i = 0..n_units``); ``inf`` if none."""
    count = np.full(n_units + 1, np.inf)
    count[0] = 0.0
    for i in range(1, n_units + 1):
        best = min((count[i - u] for u in units if u <= i), default=np.inf)
        count[i] = best + 1.0
    return count


def vial_combination(
    dose_IU: float, vial_sizes: tuple[float, ...]
) -> list[tuple[int, int]]:
    """Vials for the smallest total at or above ``dose_IU``
    (:func:`round_to_vials`), with the fewest vials for that total:
    ``[(size_IU, count), ...]`` largest size first.

    >>> vial_combination(1130.0, (250, 500, 1000))
    [(1000, 1), (250, 1)]
    >>> vial_combination(1500.0, (250, 500, 750, 1000))
    [(1000, 1), (500, 1)]
    """
    total = round_to_vials(dose_IU, vial_sizes)
    if not math.isfinite(total):
        raise ValueError(f"dose_IU: expected a finite dose, got {dose_IU!r}")
    sizes = sorted({int(v) for v in vial_sizes})
    step = reduce(math.gcd, sizes)
    units = [s // step for s in sizes]
    n = int(round(total / step))
    count = _vial_table(n, units)
    out: dict[int, int] = {}
    i = n
    while i > 0:
        # the largest size on a fewest-vials path
        u = max(u for u in units if u <= i and count[i - u] == count[i] - 1)
        out[u * step] = out.get(u * step, 0) + 1
        i -= u
    return sorted(out.items(), reverse=True)


def round_down_to_vials(dose_IU: float, vial_sizes: tuple[float, ...]) -> float:
    """Largest total at or below ``dose_IU`` that whole vials make up, IU; ``nan``
    when even the smallest vial is larger."""
    sizes = sorted({int(v) for v in vial_sizes})
    if not math.isfinite(dose_IU) or dose_IU < sizes[0]:
        return math.nan
    step = reduce(math.gcd, sizes)
    n = int(math.floor(dose_IU / step + 1e-9))
    count = _vial_table(n, [s // step for s in sizes])
    reach = np.flatnonzero(np.isfinite(count))
    return float(reach[-1] * step)
