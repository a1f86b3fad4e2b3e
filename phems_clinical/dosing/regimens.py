"""The regimen designer: prophylaxis schedules, the doses they need and what they give.

A schedule is a fixed interval (``"every 48 h"``, ``"every 2 days"``) or named
weekdays at the same clock time (``"Mon/Wed/Fri"``). For each schedule and trough
target, :func:`design_regimens` finds the smallest dose that vials make up with
``P(steady-state trough >= target) >= probability`` over the posterior draws, up to a
cap in IU/kg; :func:`evaluate_regimen` reports the same outcomes for a dose and
schedule the clinician chooses. Every outcome is computed per posterior draw at
steady state for a future occasion (:mod:`phems_clinical.pk.dosing`), so its
interval is a posterior interval.

Each regimen is a JSON-ready dict with raw numbers (text is made by
:mod:`phems_clinical.dosing.wording`); estimates are ``{"median", "lo90", "hi90"}``
(posterior median and 5 %/95 % quantiles)::

    {"schedule": {"label", "every_h", "weekdays"}, "target_IU_dL", "probability",
     "status": "ok" | "above_cap", "dose_IU", "dose_IU_kg", "infusions_per_week",
     "dose_IU_kg_week", "vials": [{"size_IU", "count"}], "vials_exact",
     "trough_IU_dL", "trough_prob", "peak_IU_dL", "peak_flag", "peak_flag_IU_dL",
     "time_above_h_per_week": {"<threshold>": est}, "hours_below_target_per_week",
     "cap_IU_kg"}

``vials`` is the fewest vials making up the smallest total at or above ``dose_IU``;
``vials_exact`` says whether that total is ``dose_IU`` itself. ``status
"above_cap"`` (designer only): no vial total up to the cap meets the target with
the required probability; the dose fields are then those of the largest vial total
within the cap. An evaluated regimen adds ``exceeds_cap`` (its dose is above the
cap). ``peak_flag`` is
:data:`PEAK_FLAG` when the median peak is above ``peak_flag_IU_dL``: FVIII above
150 IU/dL is associated with venous thrombosis (Koster T, Blann AD, Briet E, et al.
Lancet 1995;345:152-155), as is FIX above 129 IU/dL (van Hylckama Vlieg A, van der
Linden IK, Bertina RM, Rosendaal FR. Blood 2000;95:3678-3682).

Units: h, IU, kg, IU/dL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from phems_clinical._typing import Array, Float, Key
from phems_clinical.data.cohort import Cohort
from phems_clinical.pk.dosing import (
    MAX_DOSE_IU_KG,
    SteadyState,
    future_parameters,
    minimal_dose,
    round_down_to_vials,
    round_to_vials,
    steady_state_schedule,
    time_above_per_week,
    trough_probability,
    vial_combination,
)
from phems_clinical.pk.model import PopParams
from phems_clinical.pk.spec import PopModel

__all__ = [
    "ACCEPTED_FORMS",
    "PEAK_FLAG",
    "PEAK_FLAG_IU_DL",
    "Schedule",
    "design_regimens",
    "evaluate_regimen",
    "parse_schedule",
]

PEAK_FLAG = "median_peak_above_flag_level"
"""``peak_flag`` of a regimen whose median steady-state peak exceeds
``peak_flag_IU_dL``."""
PEAK_FLAG_IU_DL = 150.0
"""Default peak flag level, IU/dL: FVIII above 150 IU/dL had a 4.8-fold risk of
deep-vein thrombosis compared with below 100 IU/dL (Koster T, et al. Lancet
1995;345:152-155)."""

ACCEPTED_FORMS = (
    '"every 48 h", "48h", "every 2 days", "daily", "weekly", '
    '"Mon/Wed/Fri" (weekday names or abbreviations separated by / or ,), '
    '"3x/week" (= Mon/Wed/Fri), "2x/week" (= Mon/Thu)'
)
MIN_INTERVAL_H, MAX_INTERVAL_H = 4.0, 28 * 24.0
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_WEEKDAYS = {
    **{d.lower(): i for i, d in enumerate(_DAY_NAMES)},
    "monday": 0,
    "tues": 1,
    "tuesday": 1,
    "weds": 2,
    "wednesday": 2,
    "thur": 3,
    "thurs": 3,
    "thursday": 3,
    "friday": 4,
    "saturday": 5,
    "sunday": 6,
}
_NUM = r"(\d+(?:\.\d+)?)"
_HOURS = re.compile(rf"^(?:every|q)?\s*{_NUM}\s*(?:h|hr|hrs|hour|hours)$")
_DAYS = re.compile(rf"^(?:every\s*)?{_NUM}\s*(?:d|day|days)$")
_PER_WEEK = re.compile(r"^(\d+)\s*(?:x|times)\s*(?:/|a|per|an|each)?\s*(?:week|wk)$")
_NAMED = {
    "daily": 24.0,
    "every day": 24.0,
    "once daily": 24.0,
    "once a day": 24.0,
    "every other day": 48.0,
    "weekly": 168.0,
    "once weekly": 168.0,
    "once a week": 168.0,
    "every week": 168.0,
}
_PER_WEEK_DAYS = {2: (0, 3), 3: (0, 2, 4)}


class Schedule(NamedTuple):
    """A prophylaxis schedule: a fixed interval or named weekdays.

    label : "every 48 h", "Mon/Wed/Fri"
    every_h : the interval (h), or ``None`` for weekdays
    weekdays : 0 = Monday ... 6 = Sunday, ascending; ``()`` for an interval
    """

    label: str
    every_h: float | None
    weekdays: tuple[int, ...]

    @property
    def infusions_per_week(self) -> float:
        """Infusions per week (168 h)."""
        return (
            168.0 / self.every_h
            if self.every_h is not None
            else float(len(self.weekdays))
        )

    @property
    def pattern(self) -> tuple[np.ndarray, float]:
        """``(infusion starts, period)`` in h: ``([0], every_h)`` or ``(24 *
        weekdays, 168)`` (every infusion at the same clock time)."""
        if self.every_h is not None:
            return np.zeros(1), float(self.every_h)
        return 24.0 * np.asarray(self.weekdays, float), 168.0

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "every_h": self.every_h,
            "weekdays": list(self.weekdays),
        }


def _interval(text: str, hours: float, label: str) -> Schedule:
    if not MIN_INTERVAL_H <= hours <= MAX_INTERVAL_H:
        raise ValueError(
            f"schedule {text!r}: the interval must be from "
            f"{MIN_INTERVAL_H:g} h to {MAX_INTERVAL_H / 24:g} days"
        )
    return Schedule(label, hours, ())


def _weekdays(text: str, days: Sequence[int]) -> Schedule:
    return Schedule("/".join(_DAY_NAMES[d] for d in days), None, tuple(days))


def parse_schedule(text: str) -> Schedule:
    """A :class:`Schedule` from how clinics write it (case and spaces ignored).

    Accepted: ``"every 48 h"``, ``"48h"`` (also ``hours``, ``q48h``), ``"every 2
    days"``, ``"daily"``, ``"every other day"``, ``"weekly"``, weekday names or
    abbreviations in English separated by ``/`` or ``,`` (``"Mon/Wed/Fri"``,
    ``"tuesday, friday"``), ``"3x/week"`` (= Mon/Wed/Fri), ``"2x/week"`` (= Mon/Thu),
    ``"1x/week"`` (weekly), ``"7x/week"`` (daily). Intervals from 4 h to 28 days.

    Raises
    ------
    ValueError
        Naming the text and listing the accepted forms.

    >>> parse_schedule("every 2 days")
    Schedule(label='every 2 days', every_h=48.0, weekdays=())
    >>> parse_schedule("mon, wed / FRI").label
    'Mon/Wed/Fri'
    """
    if not isinstance(text, str):
        raise ValueError(
            f"schedule: expected text such as {ACCEPTED_FORMS}; got {text!r}"
        )
    t = " ".join(text.strip().lower().split())
    if t in _NAMED:
        h = _NAMED[t]
        return _interval(text, h, "every 7 days" if h == 168.0 else f"every {h:g} h")
    if m := _HOURS.match(t):
        h = float(m.group(1))
        return _interval(text, h, f"every {h:g} h")
    if m := _DAYS.match(t):
        d = float(m.group(1))
        return _interval(
            text, 24.0 * d, "every 24 h" if d == 1 else f"every {d:g} days"
        )
    if m := _PER_WEEK.match(t.replace(" ", "")):
        n = int(m.group(1))
        if n == 1:
            return _interval(text, 168.0, "every 7 days")
        if n == 7:
            return _interval(text, 24.0, "every 24 h")
        if n in _PER_WEEK_DAYS:
            return _weekdays(text, _PER_WEEK_DAYS[n])
        raise ValueError(
            f"schedule {text!r}: only 1x, 2x, 3x and 7x/week are "
            "understood; name the weekdays for other patterns, e.g. "
            '"Mon/Tue/Thu/Sat"'
        )
    tokens = re.split(r"[/,]", t)
    if len(tokens) == 1:
        tokens = t.split(" ")
    tokens = [x.strip() for x in tokens]
    if tokens and all(x in _WEEKDAYS for x in tokens):
        days = [_WEEKDAYS[x] for x in tokens]
        if len(set(days)) != len(days):
            raise ValueError(f"schedule {text!r}: a weekday is named twice")
        return _weekdays(text, sorted(days))
    raise ValueError(
        f"schedule {text!r} is not understood; accepted forms: {ACCEPTED_FORMS}"
    )


def _est(x: np.ndarray) -> dict:
    q = np.quantile(np.asarray(x, float), [0.5, 0.05, 0.95])
    return {"median": float(q[0]), "lo90": float(q[1]), "hi90": float(q[2])}


def _schedules(schedules) -> list[Schedule]:
    return [s if isinstance(s, Schedule) else parse_schedule(s) for s in schedules]


def _infusion_h(subject: Cohort, infusion_h: float | None) -> float:
    if infusion_h is not None:
        return float(infusion_h)
    dur = np.asarray(subject.dose_dur)[np.asarray(subject.dose_amt) > 0]
    return float(dur.max(initial=0.0))


def _check_positive(name: str, value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return x


def _outcome(
    ss: SteadyState,
    schedule: Schedule,
    *,
    dose_IU: float,
    status: str,
    target: float | None,
    probability: float,
    baseline: float,
    weight_kg: float,
    vial_sizes,
    thresholds,
    cap_IU_kg: float,
    peak_flag_IU_dL: float,
    above: np.ndarray,
) -> dict:
    """One regimen's dict; ``above`` holds the hours per week above each threshold
    and then above the target (when given), (n_draws, n_levels)."""
    vials = vial_combination(dose_IU, vial_sizes)
    peak = baseline + dose_IU * ss.peak_per_IU
    peak_med = float(np.median(peak))
    per_week = schedule.infusions_per_week
    return {
        "schedule": schedule.as_dict(),
        "target_IU_dL": target,
        "probability": probability,
        "status": status,
        "dose_IU": float(dose_IU),
        "dose_IU_kg": dose_IU / weight_kg,
        "infusions_per_week": per_week,
        "dose_IU_kg_week": dose_IU / weight_kg * per_week,
        "vials": [{"size_IU": float(s), "count": c} for s, c in vials],
        "vials_exact": sum(s * c for s, c in vials) == dose_IU,
        "trough_IU_dL": _est(baseline + dose_IU * ss.trough_per_IU),
        "trough_prob": (
            None
            if target is None
            else trough_probability(ss, dose_IU, baseline, target)
        ),
        "peak_IU_dL": _est(peak),
        "peak_flag": PEAK_FLAG if peak_med > peak_flag_IU_dL else None,
        "peak_flag_IU_dL": float(peak_flag_IU_dL),
        "time_above_h_per_week": {
            f"{t:g}": _est(above[:, i]) for i, t in enumerate(thresholds)
        },
        "hours_below_target_per_week": (
            None if target is None else _est(168.0 - above[:, len(thresholds)])
        ),
        "cap_IU_kg": float(cap_IU_kg),
    }


def _check_common(weight_kg, thresholds, probability, vial_sizes, cap, peak_flag):
    _check_positive("weight_kg", weight_kg)
    _check_positive("max_dose_IU_kg", cap)
    _check_positive("peak_flag_IU_dL", peak_flag)
    if not 0.0 < float(probability) < 1.0:
        raise ValueError(
            f"trough_probability: expected a number between 0 and 1 "
            f"(exclusive), got {probability!r}"
        )
    for t in thresholds:
        _check_positive("thresholds_IU_dL", t)
    if not vial_sizes:
        raise ValueError("vial_sizes_IU: expected at least one vial size")
    for v in vial_sizes:
        if _check_positive("vial_sizes_IU", v) != int(v):
            raise ValueError(f"vial_sizes_IU: expected whole IU, got {v!r}")


def design_regimens(
    key: Key,
    model: PopModel,
    params: PopParams,
    subject: Cohort,
    draws: Float[Array, "n_draws n_b"],
    *,
    n_occ: int,
    schedules: Sequence[str | Schedule],
    targets_IU_dL: Sequence[float],
    probability: float,
    weight_kg: float,
    vial_sizes: Sequence[float],
    max_dose_IU_kg: float = MAX_DOSE_IU_KG,
    peak_flag_IU_dL: float = PEAK_FLAG_IU_DL,
    thresholds_IU_dL: Sequence[float] = (1.0, 2.0, 5.0),
    infusion_h: float | None = None,
) -> list[dict]:
    """For each schedule and each trough target, the smallest vial total with
    ``P(steady-state trough >= target) >= probability`` (one dict per pair, in
    schedule-major order; format in the module docstring).

    When no total up to ``max_dose_IU_kg * weight_kg`` meets the target, ``status``
    is ``"above_cap"`` and the dose is the largest vial total within the cap (the
    cap itself when even one vial is larger), with what it gives.

    Parameters
    ----------
    key : jax.random key
        IOV effects of the future occasion (use the same key as for
        :func:`evaluate_regimen`, so that both see the same draws).
    model, params, subject, draws, n_occ
        As for :func:`phems_clinical.pk.dosing.recommend`; ``params.baseline`` is
        the endogenous level (IU/dL) added to every level.
    infusion_h : h, optional
        Infusion duration (default: the longest in the patient's history).
    """
    del n_occ  # the future occasion only needs each draw's eta
    _check_common(
        weight_kg,
        thresholds_IU_dL,
        probability,
        vial_sizes,
        max_dose_IU_kg,
        peak_flag_IU_dL,
    )
    for t in targets_IU_dL:
        _check_positive("targets_IU_dL", t)
    scheds = _schedules(schedules)
    vials = tuple(float(v) for v in vial_sizes)
    thresholds = tuple(float(t) for t in thresholds_IU_dL)
    base = float(params.baseline)
    cap_iu = max_dose_IU_kg * weight_kg
    future = future_parameters(key, model, params, subject, draws)
    dur = _infusion_h(subject, infusion_h)
    out = []
    for sched in scheds:
        ss = steady_state_schedule(future, model.n_cmt, *sched.pattern, dur)
        plans = []
        for target in targets_IU_dL:
            need = minimal_dose(ss, target, base, probability)
            # rounding only what the cap allows: a target out of reach may need
            # an astronomically large dose
            dose = round_to_vials(need, vials) if need <= cap_iu else math.inf
            if dose <= cap_iu * (1 + 1e-12):
                plans.append((float(target), dose, "ok"))
            else:
                at_cap = round_down_to_vials(cap_iu, vials)
                plans.append(
                    (
                        float(target),
                        at_cap if math.isfinite(at_cap) else cap_iu,
                        "above_cap",
                    )
                )
        levels = [[*thresholds, t] for t, _, _ in plans]
        doses = [[d] * len(lv) for (_, d, _), lv in zip(plans, levels, strict=True)]
        above = time_above_per_week(ss, np.ravel(doses), base, np.ravel(levels))
        width = len(thresholds) + 1
        for i, (target, dose, status) in enumerate(plans):
            out.append(
                _outcome(
                    ss,
                    sched,
                    dose_IU=dose,
                    status=status,
                    target=target,
                    probability=float(probability),
                    baseline=base,
                    weight_kg=weight_kg,
                    vial_sizes=vials,
                    thresholds=thresholds,
                    cap_IU_kg=max_dose_IU_kg,
                    peak_flag_IU_dL=peak_flag_IU_dL,
                    above=above[:, i * width : (i + 1) * width],
                )
            )
    return out


def evaluate_regimen(
    key: Key,
    model: PopModel,
    params: PopParams,
    subject: Cohort,
    draws: Float[Array, "n_draws n_b"],
    *,
    n_occ: int,
    schedule: str | Schedule,
    dose_IU: float | None = None,
    weight_kg: float,
    vial_sizes: Sequence[float],
    peak_flag_IU_dL: float = PEAK_FLAG_IU_DL,
    thresholds_IU_dL: Sequence[float] = (1.0, 2.0, 5.0),
    target_IU_dL: float | None = None,
    probability: float = 0.9,
    dose_IU_kg: float | None = None,
    max_dose_IU_kg: float = MAX_DOSE_IU_KG,
    infusion_h: float | None = None,
) -> dict:
    """Steady-state outcomes of a dose and schedule the clinician chooses.

    Give ``dose_IU`` or ``dose_IU_kg`` (exactly one). The dose is used as given;
    when vials cannot make it up exactly, ``vials`` lists the fewest vials for the
    nearest total above it and ``vials_exact`` is false. ``status`` is ``"ok"``;
    the dict adds ``exceeds_cap``, true when the dose is above ``max_dose_IU_kg``
    (kept as chosen, said by the views). Without a target,
    ``target_IU_dL``, ``trough_prob`` and ``hours_below_target_per_week`` are
    ``None``. Other arguments as for :func:`design_regimens`.
    """
    del n_occ
    _check_common(
        weight_kg,
        thresholds_IU_dL,
        probability,
        vial_sizes,
        max_dose_IU_kg,
        peak_flag_IU_dL,
    )
    if (dose_IU is None) == (dose_IU_kg is None):
        raise ValueError(
            "dose_IU: give the dose in IU or in IU/kg (dose_IU_kg), exactly one of them"
        )
    dose = (
        _check_positive("dose_IU", dose_IU)
        if dose_IU is not None
        else _check_positive("dose_IU_kg", dose_IU_kg) * weight_kg
    )
    if target_IU_dL is not None:
        target_IU_dL = _check_positive("target_IU_dL", target_IU_dL)
    sched = schedule if isinstance(schedule, Schedule) else parse_schedule(schedule)
    vials = tuple(float(v) for v in vial_sizes)
    thresholds = tuple(float(t) for t in thresholds_IU_dL)
    base = float(params.baseline)
    future = future_parameters(key, model, params, subject, draws)
    ss = steady_state_schedule(
        future, model.n_cmt, *sched.pattern, _infusion_h(subject, infusion_h)
    )
    levels = [*thresholds] + ([target_IU_dL] if target_IU_dL is not None else [])
    above = time_above_per_week(ss, dose, base, levels)
    out = _outcome(
        ss,
        sched,
        dose_IU=dose,
        status="ok",
        target=target_IU_dL,
        probability=float(probability),
        baseline=base,
        weight_kg=weight_kg,
        vial_sizes=vials,
        thresholds=thresholds,
        cap_IU_kg=max_dose_IU_kg,
        peak_flag_IU_dL=peak_flag_IU_dL,
        above=above,
    )
    out["exceeds_cap"] = dose > max_dose_IU_kg * weight_kg * (1 + 1e-12)
    return out
