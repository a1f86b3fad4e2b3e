"""Clinically reported PK quantities of one patient: clearance, volumes, half-lives,
recovery, exposure and the time until the level falls to a threshold.

All functions are pure, single-patient and work under ``jax.jit``, ``jax.vmap`` and
``jax.grad`` (``n_cmt`` static). Parameters are ordered as in
:data:`phems_clinical.pk.analytic.PARAM_NAMES`; dose histories and per-dose
parameters are as in :func:`phems_clinical.pk.analytic.concentration`.

Units: time h, amounts IU, volumes dL, clearances dL/h, levels IU/dL.

References
----------
.. [1] Iorio A, Blanchette V, Blatny J, et al. Estimating and interpreting
   secondary PK parameters of factor concentrates: ISTH SSC guidance. Res Pract
   Thromb Haemost 2018;2:535-548 (reported outputs: level-time curve, time to a
   level, half-life, AUC).
.. [2] Boxenbaum H, Battle M. Effective half-life in clinical pharmacology. J Clin
   Pharmacol 1995;35:763-766.

Examples
--------
>>> import jax.numpy as jnp
>>> p = jnp.array([1.65, 37.5, 0.0746, 6.92])  # rFVIIIFc, Nestorov 2015
>>> round(float(effective_half_life(p, 2)), 1), round(float(terminal_half_life(p, 2)))
(18.7, 68)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from phems_clinical._typing import Array, Float
from phems_clinical.pk.analytic import (
    as_float,
    check_params,
    exprel1,
    exprel2,
    macro_constants,
    macro_response,
    macro_response_slope,
    per_dose_macro,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "time_to_level",
    "auc",
    "auc_inf",
    "clearance",
    "effective_half_life",
    "incremental_recovery",
    "summarise",
    "terminal_half_life",
    "time_to_threshold",
    "vss",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = (1.0, 2.0, 5.0)
"""Trough levels (IU/dL) reported by default: the 1, 2 and 5 % of normal that
separate severe, moderate and mild haemophilia."""

_MAX_DOUBLINGS = 64
_MAX_ITER = 100
_XTOL = 1e-10  # h, absolute part of the root-finding tolerance


def clearance(params: Float[ArrayLike, " n_par"], n_cmt: int) -> Float[Array, ""]:
    """Total (elimination) clearance ``CL``, dL/h."""
    return check_params(params, n_cmt)[0]


def vss(params: Float[ArrayLike, " n_par"], n_cmt: int) -> Float[Array, ""]:
    """Volume of distribution at steady state ``V1 + V2 + V3``, dL.

    For a mammillary model with elimination from the central compartment,
    ``Vss = CL * MRT`` (Gibaldi & Perrier 1982, ch. 7).
    """
    return jnp.sum(check_params(params, n_cmt)[1::2])


def terminal_half_life(
    params: Float[ArrayLike, " n_par"], n_cmt: int
) -> Float[Array, ""]:
    """Terminal half-life ``ln 2 / lambda_min``, h.

    .. warning::
       With a small, slow peripheral compartment the terminal phase carries little of
       the exposure: for rFVIIIFc (Nestorov 2015) it gives ~68 h while the clinically
       observed half-life is ~19 h. Report :func:`effective_half_life` and
       :func:`time_to_threshold` alongside it.
    """
    lam, _ = macro_constants(params, n_cmt)
    return math.log(2.0) / lam[0]


def effective_half_life(
    params: Float[ArrayLike, " n_par"], n_cmt: int
) -> Float[Array, ""]:
    """Effective half-life ``ln 2 * MRT = ln 2 * Vss / CL``, h.

    The half-life of the one-compartment model with the same mean residence time
    after a bolus; equal to the terminal half-life for one compartment.

    References
    ----------
    Boxenbaum & Battle, J Clin Pharmacol 1995;35:763-766.
    """
    return math.log(2.0) * vss(params, n_cmt) / clearance(params, n_cmt)


def incremental_recovery(
    params: Float[ArrayLike, " n_par"], n_cmt: int, weight_kg: Float[ArrayLike, ""]
) -> Float[Array, ""]:
    """Incremental recovery ``weight / V1``, (IU/dL) per (IU/kg).

    The immediate rise of the level per IU/kg of an IV bolus, as reported on
    factor-concentrate labels (e.g. ~2 for FVIII, ~0.7-1 for FIX).
    """
    return as_float(weight_kg) / check_params(params, n_cmt)[1]


def auc_inf(
    amt: Float[ArrayLike, ""], params: Float[ArrayLike, " n_par"], n_cmt: int
) -> Float[Array, ""]:
    """Area above baseline from the dose to infinity, ``amt / CL``, IU·h/dL."""
    return as_float(amt) / clearance(params, n_cmt)


def _unit_integral(s0: Array, s1: Array, dur: Array, lam: Array) -> Array:
    """Integral over [s0, s1] (times since the dose) of the response to 1 IU given
    with unit coefficient, per rate constant ``lam`` (n_cmt,)."""

    def infused(s):
        # integral from 0 to min(s, dur): s**2/dur * exprel2(lam s) during the
        # infusion, dur * exprel2(lam dur) after it (written so that dur == 0 is safe)
        after = s >= dur
        during = (s > 0.0) & ~after
        w = jnp.where(
            after, dur, jnp.where(during, s * s / jnp.where(during, dur, 1.0), 0.0)
        )
        return w * exprel2(lam * jnp.clip(s, 0.0, dur))

    u0 = jnp.maximum(s0 - dur, 0.0)
    u1 = jnp.maximum(s1 - dur, 0.0)
    # post-infusion part as exp(-lam u0) * int_0^(u1-u0): no difference of two
    # nearly equal cumulative integrals late in the decay
    post = (
        exprel1(lam * dur) * jnp.exp(-lam * u0) * (u1 - u0) * exprel1(lam * (u1 - u0))
    )
    return infused(s1) - infused(s0) + post


def auc(
    t0: Float[ArrayLike, ""],
    t1: Float[ArrayLike, ""],
    dose_time: Float[ArrayLike, " n_dose"],
    dose_amt: Float[ArrayLike, " n_dose"],
    dose_dur: Float[ArrayLike, " n_dose"],
    params: Float[ArrayLike, " n_par"] | Float[ArrayLike, "n_dose n_par"],
    n_cmt: int,
    baseline: Float[ArrayLike, ""] = 0.0,
) -> Float[Array, ""]:
    """Exact integral of :func:`~phems_clinical.pk.analytic.concentration` over
    ``[t0, t1]``, IU·h/dL.

    Parameters
    ----------
    t0, t1 : scalar
        Interval, h (absolute, same clock as ``dose_time``); ``t1 < t0`` gives the
        negated integral.
    dose_time, dose_amt, dose_dur, params, n_cmt, baseline
        As for :func:`~phems_clinical.pk.analytic.concentration`.

    Returns
    -------
    scalar
        ``baseline * (t1 - t0)`` plus the exposure from every dose. Over
        ``[first dose, inf)`` the dose part equals ``sum(dose_amt) / CL``.
    """
    t0, t1 = as_float(t0), as_float(t1)
    dose_time = as_float(dose_time)
    dose_amt = as_float(dose_amt)
    dose_dur = as_float(dose_dur)
    lam, a = per_dose_macro(as_float(params), n_cmt, dose_time.shape[0])
    per_dose = jax.vmap(_unit_integral)(
        t0 - dose_time[:, None], t1 - dose_time[:, None], dose_dur[:, None], lam
    )
    return as_float(baseline) * (t1 - t0) + jnp.sum(dose_amt[:, None] * a * per_dose)


def time_to_threshold(
    threshold: Float[ArrayLike, ""],
    t_start: Float[ArrayLike, ""],
    dose_time: Float[ArrayLike, " n_dose"],
    dose_amt: Float[ArrayLike, " n_dose"],
    dose_dur: Float[ArrayLike, " n_dose"],
    params: Float[ArrayLike, " n_par"] | Float[ArrayLike, "n_dose n_par"],
    n_cmt: int,
    baseline: Float[ArrayLike, ""] = 0.0,
) -> Float[Array, ""]:
    """First time ``t >= t_start`` at which the level has fallen to ``threshold``.

    By root finding, not on a grid: after the end of the last infusion the level above
    baseline is a positive sum of decaying exponentials, decreasing and log-convex.
    The root is bracketed by doubling ``t - t_start`` from 1 h, then located by Newton
    steps on ``log(C - baseline)`` (monotone from the left for a log-convex function)
    safeguarded by bisection, to ``1e-10 h + 4 eps |t|``. The gradient follows from
    the implicit function theorem (a final Newton step carries it), so ``jax.grad``
    works although the loops are not differentiated.

    Parameters
    ----------
    threshold : scalar
        Level, IU/dL.
    t_start : scalar
        Start of the search, h (absolute). Typically the end of the last infusion;
        earlier starts are only valid where the level is decreasing from ``t_start``
        on (otherwise a later crossing may be returned).
    dose_time, dose_amt, dose_dur, params, n_cmt, baseline
        As for :func:`~phems_clinical.pk.analytic.concentration`.

    Returns
    -------
    scalar
        Absolute time, h (same clock as ``dose_time``): ``t_start`` when the level at
        ``t_start`` is already ``<= threshold``, ``+inf`` when ``baseline >=
        threshold`` (the level never falls to it).
    """
    dose_time = as_float(dose_time)
    lam, a = per_dose_macro(as_float(params), n_cmt, dose_time.shape[0])
    # macro-constants once, outside the loops; (time, amt, dur, lambda, A) per dose
    dose = (dose_time, as_float(dose_amt), as_float(dose_dur), lam, a)

    def above_baseline(t, d):
        time, amt, dur, lam, a = d
        return jnp.sum(jax.vmap(macro_response)(t - time, amt, dur, lam, a))

    def value_and_slope(t, d):
        time, amt, dur, lam, a = d
        return (
            jnp.sum(jax.vmap(macro_response)(t - time, amt, dur, lam, a)),
            jnp.sum(jax.vmap(macro_response_slope)(t - time, amt, dur, lam, a)),
        )

    return time_to_level(
        above_baseline,
        dose,
        threshold,
        t_start,
        baseline,
        value_and_slope=value_and_slope,
    )


def time_to_level(
    above_baseline,
    args,
    threshold: Float[ArrayLike, ""],
    t_start: Float[ArrayLike, ""],
    baseline: Float[ArrayLike, ""] = 0.0,
    *,
    value_and_slope=None,
) -> Float[Array, ""]:
    """First time ``t >= t_start`` at which a decreasing level falls to ``threshold``.

    The root finder of :func:`time_to_threshold` for any level:
    ``above_baseline(t, args)`` is the level above ``baseline`` (IU/dL) at the
    absolute time ``t`` (h), a positive function decreasing from ``t_start`` on
    (e.g. :func:`phems_clinical.pk.occasions.occasion_concentration` after the last
    infusion, whose parameters change by occasion). ``args`` is the pytree the
    gradient flows through (the loops run on ``stop_gradient(args)``; one final
    Newton step carries the implicit-function gradient). ``value_and_slope(t,
    args)`` gives the level and its time derivative; by default it is
    ``jax.jvp`` of ``above_baseline``. Returns ``t_start`` when the level is already
    at or below ``threshold``, ``+inf`` when ``baseline >= threshold``.
    """
    threshold, t_start = as_float(threshold), as_float(t_start)
    baseline = as_float(baseline)
    if value_and_slope is None:

        def value_and_slope(t, d):
            return jax.jvp(lambda x: above_baseline(x, d), (t,), (jnp.ones_like(t),))

    dose = args

    target = threshold - baseline
    never = target <= 0.0
    already = ~never & (above_baseline(t_start, dose) <= target)
    search = ~(never | already)

    # the search runs on constants; only the final Newton step below is differentiated
    d0 = jax.tree.map(jax.lax.stop_gradient, dose)
    tgt0 = jax.lax.stop_gradient(target)
    ts0 = jax.lax.stop_gradient(t_start)

    def excess(t):
        return above_baseline(t, d0) - tgt0

    def bracket_cond(c):
        _, hi, f_hi, k = c
        return search & (f_hi > 0.0) & (k < _MAX_DOUBLINGS)

    def bracket_body(c):
        _, hi, _, k = c
        new_hi = ts0 + 2.0 ** (k + 1).astype(ts0.dtype)
        return hi, new_hi, excess(new_hi), k + 1

    lo, hi, f_hi, _ = jax.lax.while_loop(
        bracket_cond, bracket_body, (ts0, ts0 + 1.0, excess(ts0 + 1.0), jnp.array(0))
    )
    bracketed = f_hi <= 0.0
    log_tgt = jnp.log(jnp.where(search, tgt0, 1.0))

    def newton_cond(c):
        lo, hi, _, step, k = c
        tol = _XTOL + 4.0 * jnp.finfo(lo.dtype).eps * jnp.abs(lo)
        return search & (k < _MAX_ITER) & (step > tol) & (hi - lo > tol)

    def newton_body(c):
        lo, hi, x, _, k = c
        s, ds = value_and_slope(x, d0)
        lo = jnp.where(s > tgt0, x, lo)
        hi = jnp.where(s > tgt0, hi, x)
        ok = (s > 0.0) & (ds < 0.0)
        s_safe = jnp.where(ok, s, 1.0)
        x_new = x - s_safe * (jnp.log(s_safe) - log_tgt) / jnp.where(ok, ds, -1.0)
        x_new = jnp.where(ok & (x_new >= lo) & (x_new <= hi), x_new, 0.5 * (lo + hi))
        return lo, hi, x_new, jnp.abs(x_new - x), k + 1

    _, _, root, _, _ = jax.lax.while_loop(
        newton_cond, newton_body, (lo, hi, lo, jnp.array(jnp.inf), jnp.array(0))
    )

    # implicit-function gradient: d t*/d theta = -(dC/d theta) / (dC/dt) at the root
    root = jnp.where(search & bracketed, root, ts0)
    s, ds = value_and_slope(root, dose)
    ds_safe = jnp.where(search & (ds < 0.0), ds, -1.0)
    root = root - (s - target) / ds_safe
    found = jnp.where(bracketed, root, jnp.inf)
    return jnp.where(never, jnp.inf, jnp.where(already, t_start, found))


def _end_of_dosing(dose_time: Array, dose_amt: Array, dose_dur: Array) -> Array:
    """End of the last real (non-padding) dose, h; 0 without any dose."""
    ends = jnp.where(dose_amt > 0.0, dose_time + dose_dur, -jnp.inf)
    end = jnp.max(ends, initial=-jnp.inf)
    return jnp.where(jnp.isfinite(end), end, 0.0)


def summarise(
    params: Float[ArrayLike, " n_par"],
    n_cmt: int,
    *,
    weight_kg: Float[ArrayLike, ""],
    dose_time: Float[ArrayLike, " n_dose"],
    dose_amt: Float[ArrayLike, " n_dose"],
    dose_dur: Float[ArrayLike, " n_dose"],
    baseline: Float[ArrayLike, ""] = 0.0,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
) -> dict[str, Float[Array, ""]]:
    """The secondary PK parameters of one patient after a dose history.

    Parameters
    ----------
    params : (2 * n_cmt,) array
        One patient's parameters (no per-dose rows: the summary describes a patient).
    n_cmt : {1, 2, 3}
        Number of compartments (static).
    weight_kg : scalar
        Body weight, kg (for the incremental recovery).
    dose_time, dose_amt, dose_dur, baseline
        As for :func:`~phems_clinical.pk.analytic.concentration`.
    thresholds : tuple of float
        Levels (IU/dL) for the times to threshold (static).

    Returns
    -------
    dict of scalars
        ``clearance`` (dL/h), ``vss`` (dL), ``terminal_half_life`` and
        ``effective_half_life`` (h), ``incremental_recovery`` ((IU/dL)/(IU/kg)),
        ``auc_inf`` (IU·h/dL, all doses to infinity: ``sum(dose_amt) / CL``),
        ``end_of_dosing`` (h, absolute end of the last non-padding dose) and, per
        threshold ``x``, ``time_to_{x:g}`` (e.g. ``time_to_1``): hours after
        ``end_of_dosing`` until the level falls to ``x`` (0 if already below,
        ``inf`` if never).
    """
    params = check_params(params, n_cmt)
    if params.ndim != 1:
        raise ValueError(f"summarise takes one patient's params, got {params.shape}")
    dose_time, dose_amt, dose_dur = (
        as_float(x) for x in (dose_time, dose_amt, dose_dur)
    )
    end = _end_of_dosing(dose_time, dose_amt, dose_dur)
    out = {
        "clearance": clearance(params, n_cmt),
        "vss": vss(params, n_cmt),
        "terminal_half_life": terminal_half_life(params, n_cmt),
        "effective_half_life": effective_half_life(params, n_cmt),
        "incremental_recovery": incremental_recovery(params, n_cmt, weight_kg),
        "auc_inf": auc_inf(jnp.sum(dose_amt), params, n_cmt),
        "end_of_dosing": end,
    }
    # one vmapped root finder rather than one copy per threshold: compiles once
    times = jax.vmap(
        lambda thr: time_to_threshold(
            thr, end, dose_time, dose_amt, dose_dur, params, n_cmt, baseline
        )
    )(jnp.asarray(thresholds, dtype=float))
    for i, thr in enumerate(thresholds):
        out[f"time_to_{thr:g}"] = times[i] - end
    return out
