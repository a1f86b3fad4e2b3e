"""Simulated paediatric cardiac-surgery episodes written as OMOP CDM 5.4 tables.

One episode per patient: referral (outpatient visit, fetal or postnatal) ->
pre-operative admission -> index operation (operating-room ``visit_detail`` with a
procedure coded by STAT mortality category 1-5) -> CICU (ventilation, vasoactives)
-> ward -> discharge home; afterwards readmission (with or without an unplanned
reintervention), return to CICU from the ward (40% of them after an unplanned
reintervention) and death, up to ``followup_days`` (default 365) after surgery or the
data-extract date, whichever comes first.

**The process.** After surgery the patient moves between the states CICU, WARD,
HOME, READMIT and DEAD as a Markov jump process in *time since surgery* ``t``
(days; ``t = 0`` is the end of the index operation = CICU admission). Transition
``k`` has the hazard ``h_k(t | x) = h0_k(t) exp(eta_k(x))``, where ``h0_k`` is log-
linear between knots (a smooth curve, *not* piecewise constant, so the
piecewise-constant model of :mod:`phems_clinical.models.multistate` is an
approximation) and ``eta_k`` is linear in the covariates (age group, weight-for-age
z, STAT category, pre-operative ventilation). Times are sampled exactly by
inverting each transition's cumulative hazard (competing latent times).

**Calibration (cite next to each number).**

* Operative mortality (in hospital or <= 30 days) by STAT category 1..5 under the
  reference case-mix: 0.4 / 1.6 / 2.6 / 6.8 / 15.6 % (STS CHSD FY2016 report;
  categories: O'Brien et al., JTCVS 2009;138:1139).
* Mean post-operative LOS (surgery to discharge, patients discharged alive):
  6.3 days in the lowest and 34.0 days in the highest category (aggregate means of
  STAT *Morbidity* categories 1 and 5, Jacobs et al., JTCVS 2013;145(4):1046,
  procedure means 2.9-42.6 days); categories 2-4 are log-linear interpolations
  (9.6 / 14.6 / 22.3 days), an assumption, not published figures.
* CICU LOS covariate effects are the PC4 incidence-rate ratios (Ann Thorac Surg
  2020;110:1396, Table 2): neonate 1.8, infant 1.4, pre-operative ventilation 1.2,
  underweight 1.1; ward (acute care) LOS: neonate 1.3, infant 1.1. They enter as
  log hazard ratios of leaving the unit (``-log IRR``).
* Age mix: median age at operation 0.4 years, IQR 0.1-3.4 (STS CHSD 2007-09,
  DiBardino et al., Ann Thorac Surg 2012;94:2054), i.e. about 20% neonates, 40%
  infants and 40% children in the reference case-mix.
* Mortality covariate effects (neonate, infant, ventilation, weight), readmission
  and late-death hazards are assumptions chosen to be plausible (stated here),
  not published estimates.

The per-category constants ``_GAMMA`` (log death-hazard multiplier) and ``_DELTA``
(log LOS multiplier) were fitted by fixed-point iteration on simulated
episodes (reference case-mix, 3 x 100,000, averaged);
``tests/data/test_cardiac_sim.py`` checks the targets.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
import pandas as pd

from phems_clinical.data.omop import concepts as C
from phems_clinical.data.omop.events import event_table
from phems_clinical.rng import numpy_generator

# --------------------------------------------------------------------------- concepts
#: Concept ids used by the cardiac simulator (the subset of data.omop.concepts).
CONCEPTS: dict[str, int] = {
    "male": C.GENDER["male"],
    "female": C.GENDER["female"],
    "inpatient_visit": C.VISIT["inpatient"],
    "outpatient_visit": C.VISIT["outpatient"],
    "icu": C.VISIT_DETAIL["icu"],
    "ward": C.VISIT_DETAIL["ward"],
    "operating_room": C.VISIT_DETAIL["or"],
    "ehr": C.TYPE_EHR,
    "weight": C.MEASUREMENT["weight"],
    "imv": C.PROCEDURE["imv"],
    **{
        d: C.DRUG[d]
        for d in (
            "epinephrine",
            "norepinephrine",
            "dopamine",
            "dobutamine",
            "milrinone",
            "vasopressin",
        )
    },
    **{f"stat{i}": C.PROCEDURE[f"stat{i}"] for i in range(1, 6)},
    "chd": C.CONDITION["congenital_heart_disease"],
}
STAT_CONCEPTS: dict[int, int] = {c: CONCEPTS[f"stat{c}"] for c in range(1, 6)}
VASOACTIVE_CONCEPTS = (
    CONCEPTS["epinephrine"],
    CONCEPTS["norepinephrine"],
    CONCEPTS["dopamine"],
    CONCEPTS["dobutamine"],
    CONCEPTS["milrinone"],
    CONCEPTS["vasopressin"],
)

# ----------------------------------------------------------------------------- states
STATES = ("CICU", "WARD", "HOME", "READMIT", "DEAD")
CICU, WARD, HOME, READMIT, DEAD = range(5)
#: Transitions (from, to) in a fixed order; the model uses the same order.
TRANSITIONS = (
    (CICU, WARD),
    (CICU, DEAD),
    (WARD, CICU),
    (WARD, HOME),
    (WARD, DEAD),
    (HOME, READMIT),
    (HOME, DEAD),
    (READMIT, HOME),
    (READMIT, DEAD),
)
_TO = np.array([b for _, b in TRANSITIONS])
AGE_GROUPS = ("neonate", "infant", "child")

#: Targets: operative mortality by STAT category (STS CHSD FY2016; O'Brien 2009).
TARGET_MORTALITY = (0.004, 0.016, 0.026, 0.068, 0.156)
#: Targets: mean post-op LOS, days (Jacobs JTCVS 2013: 6.3 and 34.0 for categories
#: 1 and 5; 2-4 log-linearly interpolated - an assumption).
TARGET_LOS = tuple(
    float(v) for v in np.round(6.3 * (34.0 / 6.3) ** (np.arange(5) / 4), 1)
)

# Baseline hazards (per day) at knots of time since surgery, for a child, STAT 1,
# no pre-operative ventilation, weight-for-age z = 0; log-linear between knots.
_KNOTS = np.array([0.0, 0.5, 1.0, 2.0, 4.0, 7.0, 14.0, 30.0, 90.0, 400.0])
_H0 = np.array(
    [
        [0.05, 0.6, 1.0, 0.9, 0.5, 0.30, 0.18, 0.12, 0.10, 0.10],  # CICU->WARD
        [4e-3, 4e-3, 3e-3, 2e-3, 1.5e-3, 1.2e-3, 1e-3, 1e-3, 1e-3, 1e-3],  # CICU->DEAD
        [0.02, 0.02, 0.02, 0.02, 0.015, 0.012, 0.01, 0.008, 0.005, 0.005],  # WARD->CICU
        [0.01, 0.05, 0.15, 0.30, 0.35, 0.30, 0.20, 0.12, 0.08, 0.05],  # WARD->HOME
        [5e-4] * 10,  # WARD->DEAD
        [0.01, 0.01, 0.01, 0.008, 0.006, 0.005, 0.004, 0.002, 5e-4, 3e-4],  # HOME->READ
        [1e-4] * 10,  # HOME->DEAD
        [0.2] * 10,  # READ->HOME
        [2e-3] * 10,  # READ->DEAD
    ]
)
# Log hazard ratios: columns neonate, infant, weight_z, ventilation.
_BETA = np.array(
    [
        [-np.log(1.8), -np.log(1.4), 0.10, -np.log(1.2)],  # CICU->WARD (PC4 IRRs)
        [0.5, 0.2, -0.2, 0.7],  # CICU->DEAD (assumption)
        [0.3, 0.1, 0.0, 0.0],  # WARD->CICU
        [-np.log(1.3), -np.log(1.1), 0.05, 0.0],  # WARD->HOME (PC4 IRRs)
        [0.5, 0.2, -0.2, 0.7],  # WARD->DEAD
        [0.3, 0.15, 0.0, 0.0],  # HOME->READMIT
        [0.25, 0.1, -0.1, 0.35],  # HOME->DEAD
        [0.0, 0.0, 0.0, 0.0],  # READMIT->HOME
        [0.25, 0.1, -0.1, 0.35],  # READMIT->DEAD
    ]
)
# Per STAT category: log death-hazard multiplier (gamma) and log LOS multiplier
# (delta), calibrated (see module docstring).
_GAMMA = np.array([-1.47, -0.115, 0.005, 0.51, 0.83])
_DELTA = np.array([0.012, 0.237, 0.45, 0.603, 0.822])
# How each transition loads on gamma / delta / the STAT score (c - 1).
_LOAD_GAMMA = np.array([0, 1, 0, 0, 1, 0, 0.5, 0, 0.5])
_LOAD_DELTA = np.array([-1, 0, 0, -1, 0, 0, 0, 0, 0])
_LOAD_STAT = np.array([0, 0, 0.15, 0, 0, 0.1, 0, 0, 0])


class CaseMix(NamedTuple):
    """A hospital's case-mix and effects.

    ``age_probs``: P(neonate, infant, child); ``stat_given_age`` (3, 5): P(STAT
    category | age group); ``vent_probs``: P(pre-operative ventilation | age
    group); ``fetal_probs``: P(fetal diagnosis | age group); ``death_log_hr`` and
    ``los_log_ratio``: the site's log hazard ratio of death and log LOS ratio
    (0 = reference hospital).
    """

    age_probs: tuple = (0.2, 0.4, 0.4)
    stat_given_age: tuple = (
        (0.05, 0.15, 0.10, 0.45, 0.25),
        (0.25, 0.40, 0.12, 0.20, 0.03),
        (0.50, 0.32, 0.10, 0.07, 0.01),
    )
    vent_probs: tuple = (0.25, 0.08, 0.03)
    fetal_probs: tuple = (0.6, 0.3, 0.1)
    weight_sd: float = 0.15
    death_log_hr: float = 0.0
    los_log_ratio: float = 0.0


REFERENCE_CASE_MIX = CaseMix()
#: Three example hospitals: reference, a neonatal/high-complexity referral centre and
#: a low-complexity centre with somewhat worse outcomes.
SITE_CASE_MIX: dict[str, CaseMix] = {
    "hospital_a": REFERENCE_CASE_MIX,
    "hospital_b": CaseMix(
        age_probs=(0.35, 0.4, 0.25), vent_probs=(0.35, 0.1, 0.04), los_log_ratio=0.1
    ),
    "hospital_c": CaseMix(
        age_probs=(0.08, 0.35, 0.57),
        stat_given_age=(
            (0.1, 0.3, 0.2, 0.3, 0.1),
            (0.35, 0.4, 0.12, 0.12, 0.01),
            (0.6, 0.3, 0.07, 0.03, 0.0),
        ),
        death_log_hr=0.3,
        los_log_ratio=-0.1,
    ),
}


class CardiacCohort(NamedTuple):
    """OMOP tables of one site and the simulator's ground truth.

    ``tables``: lower-case CDM 5.4 names -> DataFrames. ``truth``: one row per
    post-operative sojourn (person_id, episode_id, state, entry, exit (days since
    the end of the index operation), next_state ('CENSORED' if cut), covariates),
    for tests only.
    """

    tables: dict[str, pd.DataFrame]
    truth: pd.DataFrame


def expected_weight_kg(age_days):
    """Median weight for age (kg): 3.3 kg at birth, then the APLS formulae
    (Advanced Paediatric Life Support, 5th ed. 2011): ``0.5 * months + 4``
    (1-12 months), ``2 * years + 8`` (1-5 years), ``3 * years + 7`` (6-12 years),
    continued to 17 years (capped at 65 kg)."""
    age_days = np.asarray(age_days, dtype=float)
    months = age_days / 30.4375
    years = age_days / 365.25
    w = np.where(months < 1, 3.3 + 0.7 * months, 0.5 * months + 4.0)
    w = np.where(years >= 1, 2 * years + 8, w)
    w = np.where(years >= 6, np.minimum(3 * years + 7, 65.0), w)
    return w


# Fine grid for the cumulative baseline hazards (trapezoid on log-linear hazards).
_GRID = np.concatenate([np.arange(0, 30, 0.01), np.arange(30, 400.001, 0.1)])


def _cum_baseline() -> np.ndarray:
    logh = np.stack([np.interp(_GRID, _KNOTS, np.log(h)) for h in _H0])
    h = np.exp(logh)
    inc = 0.5 * (h[:, 1:] + h[:, :-1]) * np.diff(_GRID)
    return np.concatenate([np.zeros((len(_H0), 1)), np.cumsum(inc, axis=1)], axis=1)


_CUMH0 = _cum_baseline()


def true_log_hazard_ratio(stat, age_group, weight_z, vent, case_mix=REFERENCE_CASE_MIX):
    """Simulator's ``eta_k(x)`` (n, 9) for all transitions (ground truth)."""
    stat = np.asarray(stat)
    age_group = np.asarray(age_group)
    c = stat - 1
    X = np.stack(
        [
            age_group == 0,
            age_group == 1,
            np.asarray(weight_z, float),
            np.asarray(vent, float),
        ],
        axis=1,
    ).astype(float)
    eta = X @ _BETA.T
    eta += _GAMMA[c][:, None] * _LOAD_GAMMA[None, :]
    eta += _DELTA[c][:, None] * _LOAD_DELTA[None, :]
    eta += c[:, None] * _LOAD_STAT[None, :]
    eta += case_mix.death_log_hr * _LOAD_GAMMA[None, :]
    eta += case_mix.los_log_ratio * _LOAD_DELTA[None, :]
    return eta


def _simulate_paths(rng, eta, censor):
    """Markov jump paths from CICU at t = 0. Returns a list of (time, from, to)
    arrays (patient index, time, from, to) in chronological order per patient."""
    n = eta.shape[0]
    state = np.full(n, CICU)
    t = np.zeros(n)
    active = np.ones(n, bool)
    rows_i, rows_t, rows_f, rows_to = [], [], [], []
    out_of = {
        s: [k for k, (a, _) in enumerate(TRANSITIONS) if a == s] for s in range(4)
    }
    while active.any():
        new_t = np.full(n, np.inf)
        new_s = np.full(n, -1)
        for s, ks in out_of.items():
            idx = np.flatnonzero(active & (state == s))
            if idx.size == 0:
                continue
            best_t = np.full(idx.size, np.inf)
            best_k = np.full(idx.size, -1)
            for k in ks:
                e = rng.exponential(size=idx.size)
                h_now = np.interp(t[idx], _GRID, _CUMH0[k])
                target = h_now + e * np.exp(-eta[idx, k])
                tk = np.interp(target, _CUMH0[k], _GRID, right=np.inf)
                tk = np.where(target > _CUMH0[k, -1], np.inf, tk)
                better = tk < best_t
                best_t = np.where(better, tk, best_t)
                best_k = np.where(better, k, best_k)
            new_t[idx] = best_t
            new_s[idx] = np.where(best_k >= 0, _TO[best_k], -1)
        jump = active & (new_t <= censor)
        ji = np.flatnonzero(jump)
        rows_i.append(ji)
        rows_t.append(new_t[ji])
        rows_f.append(state[ji])
        rows_to.append(new_s[ji])
        t[ji] = new_t[ji]
        state[ji] = new_s[ji]
        active = jump & (state != DEAD)
    i = np.concatenate(rows_i)
    order = np.lexsort((np.concatenate(rows_t), i))
    return (
        i[order],
        np.concatenate(rows_t)[order],
        np.concatenate(rows_f)[order],
        np.concatenate(rows_to)[order],
    )


def _dt(base: np.datetime64, days) -> np.ndarray:
    """``base + days`` at microsecond resolution (datetime64[ns])."""
    us = np.round(np.asarray(days, float) * 86_400e6).astype(np.int64)
    return (np.asarray(base, "datetime64[us]") + us.astype("timedelta64[us]")).astype(
        "datetime64[ns]"
    )


def simulate_cardiac(
    key,
    *,
    n_episodes: int,
    site: str = "hospital_a",
    case_mix: CaseMix = REFERENCE_CASE_MIX,
    start: str = "2021-01-01",
    accrual_days: float = 3 * 365.0,
    followup_days: float = 365.0,
    extract_date: str | None = None,
    id_offset: int = 0,
) -> CardiacCohort:
    """Simulate ``n_episodes`` surgical episodes of one hospital as OMOP tables.

    Parameters
    ----------
    key : JAX PRNG key
        Same key and arguments -> identical output.
    site : str
        Stored in ``care_site``-free form as the prefix of ``person_source_value``.
    case_mix : CaseMix
        The hospital's patient mix and site effects.
    start, accrual_days : str, float
        Index operations are uniform over ``[start, start + accrual_days)``.
    followup_days : float
        Follow-up after surgery (days); also cut at ``extract_date`` (default
        ``start + accrual_days + followup_days``: everyone is followed fully). With
        an earlier extract date recent patients are censored administratively.
    id_offset : int
        Added to every id so that several sites can share a database.

    Returns
    -------
    CardiacCohort
        ``tables``: person, observation_period, visit_occurrence, visit_detail,
        procedure_occurrence, drug_exposure, measurement, condition_occurrence,
        death.
    """
    rng = numpy_generator(key)
    n = int(n_episodes)
    cm = case_mix
    # ---- covariates
    age_group = rng.choice(3, size=n, p=np.asarray(cm.age_probs))
    u = rng.random(n)
    age_days = np.where(
        age_group == 0,
        1 + 29 * u,
        np.where(age_group == 1, 31 + 334 * u, 365.25 * (1 + 16 * u**2)),
    )
    stat_p = np.asarray(cm.stat_given_age)[age_group]
    stat = 1 + (rng.random(n)[:, None] > np.cumsum(stat_p, axis=1)).sum(axis=1)
    stat = np.minimum(stat, 5)
    weight_z = rng.normal(size=n)
    weight = expected_weight_kg(age_days) * np.exp(cm.weight_sd * weight_z)
    weight = np.round(weight, 2)
    vent = (rng.random(n) < np.asarray(cm.vent_probs)[age_group]).astype(int)
    fetal = rng.random(n) < np.asarray(cm.fetal_probs)[age_group]
    male = rng.random(n) < 0.544  # 54.4% boys (DiBardino 2012)
    # ---- timing
    t_start = np.datetime64(start, "us")
    surg_day = rng.random(n) * accrual_days
    or_hours = rng.uniform(2.0, 3.0, n) + 0.6 * (stat - 1)
    t0 = surg_day + or_hours / 24  # days since `start`
    preop = np.where(age_group == 0, rng.gamma(2.0, 1.5, n), rng.uniform(0.3, 1.2, n))
    preop = np.minimum(preop, np.maximum(age_days - 0.5, 0.1))
    extract = (
        accrual_days + followup_days
        if extract_date is None
        else (np.datetime64(extract_date, "us") - t_start) / np.timedelta64(1, "D")
    )
    censor = np.minimum(followup_days, extract - t0)
    if np.any(censor <= 0):
        raise ValueError(
            f"extract_date: {extract_date} is before some operations "
            f"(start {start} + accrual_days {accrual_days})"
        )
    # whole-day extract => the observation period ends on the last full day
    # ---- paths
    weight_z = cm.weight_sd * weight_z / 0.15  # z of log(weight / median), SD 0.15
    eta = true_log_hazard_ratio(stat, age_group, weight_z, vent, cm)
    pi, pt, pf, pto = _simulate_paths(rng, eta, censor)
    return _to_omop(
        rng,
        site=site,
        t_start=t_start,
        id_offset=id_offset,
        age_days=age_days,
        age_group=age_group,
        stat=stat,
        weight=weight,
        weight_z=weight_z,
        vent=vent,
        fetal=fetal,
        male=male,
        surg_day=surg_day,
        t0=t0,
        preop=preop,
        censor=censor,
        paths=(pi, pt, pf, pto),
        followup_days=followup_days,
    )


def _to_omop(
    rng,
    *,
    site,
    t_start,
    id_offset,
    age_days,
    age_group,
    stat,
    weight,
    weight_z,
    vent,
    fetal,
    male,
    surg_day,
    t0,
    preop,
    censor,
    paths,
    followup_days,
):
    n = len(age_days)
    pi, pt, pf, pto = paths
    by_patient = np.split(np.arange(len(pi)), np.searchsorted(pi, np.arange(1, n)))
    person_id = id_offset + 1 + np.arange(n, dtype=np.int64)
    birth = _dt(t_start, surg_day - age_days)
    vo, vd, proc, drug, truth = [], [], [], [], []
    deaths = []
    ids = {
        "vo": id_offset * 10,
        "vd": id_offset * 10,
        "proc": id_offset * 10,
        "drug": id_offset * 10,
    }

    def nid(kind):
        ids[kind] += 1
        return ids[kind]

    for i in range(n):
        pid = int(person_id[i])
        base = t0[i]
        # referral
        if fetal[i] and age_group[i] == 0:
            ref_day, ref_src = surg_day[i] - age_days[i], "referral:fetal"
        else:
            lead = rng.uniform(1, 60)
            ref_day = max(surg_day[i] - age_days[i], surg_day[i] - preop[i] - lead)
            ref_src = "referral:fetal" if fetal[i] else "referral:postnatal"
        ref_id = nid("vo")
        vo.append(
            (ref_id, pid, CONCEPTS["outpatient_visit"], ref_day, ref_day, ref_src, None)
        )
        # index admission
        adm = surg_day[i] - preop[i]
        idx_id = nid("vo")
        details = []  # (id, concept, start, end, source)
        pre_concept = CONCEPTS["icu"] if vent[i] else CONCEPTS["ward"]
        details.append(
            [
                nid("vd"),
                pre_concept,
                adm,
                surg_day[i],
                "PREOP_ICU" if vent[i] else "PREOP_WARD",
            ]
        )
        or_id = nid("vd")
        details.append([or_id, CONCEPTS["operating_room"], surg_day[i], base, "OR"])
        proc.append(
            (
                nid("proc"),
                pid,
                STAT_CONCEPTS[int(stat[i])],
                surg_day[i],
                base,
                idx_id,
                or_id,
                f"STAT{int(stat[i])}:index",
            )
        )
        if vent[i]:
            proc.append(
                (
                    nid("proc"),
                    pid,
                    CONCEPTS["imv"],
                    adm,
                    surg_day[i],
                    idx_id,
                    details[0][0],
                    "IMV:preop",
                )
            )
        cur_visit, cur_details, cur_start = idx_id, details, adm
        visits = []  # closed (id, start, end, preceding_id, details)
        state, entry = CICU, 0.0
        cicu_id = nid("vd")
        cur_details.append([cicu_id, CONCEPTS["icu"], base, None, "CICU"])
        first_cicu = True
        died_at = None
        jumps = by_patient[i]
        for j in list(jumps) + [None]:
            if j is None:
                tj, to = censor[i], -1
            else:
                tj, to = pt[j], pto[j]
            truth.append(
                (
                    pid,
                    idx_id,
                    STATES[state],
                    entry,
                    tj,
                    STATES[to] if to >= 0 else "CENSORED",
                )
            )
            abs_t = base + tj
            if state in (CICU, WARD, READMIT):
                cur_details[-1][3] = abs_t
            if state == CICU and first_cicu:
                first_cicu = False
                dur = abs_t - cur_details[-1][2]
                p_vent = 0.4 + 0.1 * stat[i] if not vent[i] else 1.0
                if rng.random() < p_vent:
                    proc.append(
                        (
                            nid("proc"),
                            pid,
                            CONCEPTS["imv"],
                            base,
                            base + dur * rng.uniform(0.2, 0.8),
                            cur_visit,
                            cur_details[-1][0],
                            "IMV:postop",
                        )
                    )
                for drug_c, p in (
                    (CONCEPTS["milrinone"], 0.5 + 0.08 * stat[i]),
                    (CONCEPTS["epinephrine"], 0.1 + 0.08 * stat[i]),
                    (CONCEPTS["dopamine"], 0.05),
                ):
                    if rng.random() < p:
                        drug.append(
                            (
                                nid("drug"),
                                pid,
                                drug_c,
                                base,
                                base + dur * rng.uniform(0.3, 0.9),
                                cur_visit,
                                cur_details[-1][0],
                            )
                        )
            if to == -1:
                if state in (CICU, WARD, READMIT):
                    visits.append((cur_visit, cur_start, abs_t, cur_details))
                break
            if to == DEAD:
                died_at = abs_t
                if state != HOME:
                    visits.append((cur_visit, cur_start, abs_t, cur_details))
                break
            nxt_dur = (
                pt[j + 1] if (j + 1 < len(pt) and pi[j + 1] == i) else censor[i]
            ) - tj
            if to == HOME:
                visits.append((cur_visit, cur_start, abs_t, cur_details))
                cur_details = None
            elif to == READMIT:
                cur_visit, cur_start, cur_details = nid("vo"), abs_t, []
                start = abs_t
                if rng.random() < 0.25:  # unplanned reintervention
                    d_or = min(rng.uniform(2, 4) / 24, 0.5 * nxt_dur)
                    rid = nid("vd")
                    cur_details.append(
                        [
                            rid,
                            CONCEPTS["operating_room"],
                            start,
                            start + d_or,
                            "OR:reintervention",
                        ]
                    )
                    proc.append(
                        (
                            nid("proc"),
                            pid,
                            STAT_CONCEPTS[int(stat[i])],
                            start,
                            start + d_or,
                            cur_visit,
                            rid,
                            f"STAT{int(stat[i])}:reintervention",
                        )
                    )
                    start += d_or
                cur_details.append(
                    [nid("vd"), CONCEPTS["ward"], start, None, "READMIT_WARD"]
                )
            elif to in (CICU, WARD):
                start = abs_t
                if to == CICU and rng.random() < 0.4:  # unplanned reintervention
                    d_or = min(rng.uniform(2, 4) / 24, 0.5 * nxt_dur)
                    rid = nid("vd")
                    cur_details.append(
                        [
                            rid,
                            CONCEPTS["operating_room"],
                            start,
                            start + d_or,
                            "OR:reintervention",
                        ]
                    )
                    proc.append(
                        (
                            nid("proc"),
                            pid,
                            STAT_CONCEPTS[int(stat[i])],
                            start,
                            start + d_or,
                            cur_visit,
                            rid,
                            f"STAT{int(stat[i])}:reintervention",
                        )
                    )
                    start += d_or
                cur_details.append(
                    [
                        nid("vd"),
                        CONCEPTS["icu" if to == CICU else "ward"],
                        start,
                        None,
                        STATES[to],
                    ]
                )
            state, entry = to, tj
        prev_visit = None
        for vid, vs, ve, dets in visits:
            vo.append(
                (
                    vid,
                    pid,
                    CONCEPTS["inpatient_visit"],
                    vs,
                    ve,
                    "index" if vid == idx_id else "readmission",
                    prev_visit,
                )
            )
            prev_detail = None
            for did, dc, ds, de, dsrc in dets:
                vd.append((did, pid, dc, ds, de, dsrc, prev_detail, vid))
                prev_detail = did
            prev_visit = vid
        if died_at is not None:
            deaths.append((pid, died_at))
    return CardiacCohort(
        _frames(
            t_start,
            site,
            person_id,
            male,
            birth,
            vo,
            vd,
            proc,
            drug,
            deaths,
            weight,
            surg_day,
            preop,
            t0,
            censor,
            id_offset,
        ),
        _truth_frame(
            truth, site, person_id, age_days, age_group, stat, weight, weight_z, vent
        ),
    )


def _frames(
    t_start,
    site,
    person_id,
    male,
    birth,
    vo,
    vd,
    proc,
    drug,
    deaths,
    weight,
    surg_day,
    preop,
    t0,
    censor,
    id_offset,
):
    ehr = CONCEPTS["ehr"]
    n = len(person_id)
    bd = pd.DatetimeIndex(birth)
    person = pd.DataFrame(
        {
            "person_id": person_id,
            "gender_concept_id": np.where(
                male, CONCEPTS["male"], CONCEPTS["female"]
            ).astype(np.int64),
            "year_of_birth": bd.year.astype(np.int64),
            "month_of_birth": bd.month.astype(np.int64),
            "day_of_birth": bd.day.astype(np.int64),
            "birth_datetime": birth,
            "race_concept_id": np.zeros(n, np.int64),
            "ethnicity_concept_id": np.zeros(n, np.int64),
            "person_source_value": [f"{site}:{p}" for p in person_id],
        }
    )
    end_day = t0 + censor
    if deaths:
        didx = np.searchsorted(person_id, np.array([d[0] for d in deaths]))
        end_day[didx] = np.minimum(end_day[didx], [d[1] for d in deaths])
    obs_end = _dt(t_start, end_day)
    obs_end_date = pd.DatetimeIndex(obs_end).normalize()
    # a cut that falls exactly on midnight (extract date) ends on the previous day
    obs_end_date = obs_end_date.where(
        obs_end_date != pd.DatetimeIndex(obs_end), obs_end_date - pd.Timedelta(days=1)
    )
    observation_period = pd.DataFrame(
        {
            "observation_period_id": person_id,
            "person_id": person_id,
            "observation_period_start_date": bd.normalize(),
            "observation_period_end_date": obs_end_date,
            "period_type_concept_id": np.full(n, ehr, np.int64),
        }
    )
    v = pd.DataFrame(
        vo,
        columns=[
            "visit_occurrence_id",
            "person_id",
            "visit_concept_id",
            "s",
            "e",
            "visit_source_value",
            "preceding_visit_occurrence_id",
        ],
    )
    vs, ve = _dt(t_start, v.s.to_numpy(float)), _dt(t_start, v.e.to_numpy(float))
    visit_occurrence = event_table(
        "visit_occurrence",
        ids=v.visit_occurrence_id,
        person_id=v.person_id,
        concept_id=v.visit_concept_id,
        start=vs,
        end=ve,
        visit_source_value=v.visit_source_value,
        preceding_visit_occurrence_id=v.preceding_visit_occurrence_id.astype("Int64"),
    ).sort_values("visit_occurrence_id", ignore_index=True)
    d = pd.DataFrame(
        vd,
        columns=["visit_detail_id", "person_id", "c", "s", "e", "src", "prev", "vid"],
    )
    ds, de = _dt(t_start, d.s.to_numpy(float)), _dt(t_start, d.e.to_numpy(float))
    visit_detail = event_table(
        "visit_detail",
        ids=d.visit_detail_id,
        person_id=d.person_id,
        concept_id=d.c,
        start=ds,
        end=de,
        visit_occurrence_id=d.vid,
        visit_detail_source_value=d.src,
        preceding_visit_detail_id=d.prev.astype("Int64"),
        parent_visit_detail_id=pd.array([pd.NA] * len(d), dtype="Int64"),
    ).sort_values("visit_detail_id", ignore_index=True)
    p = pd.DataFrame(
        proc,
        columns=[
            "procedure_occurrence_id",
            "person_id",
            "c",
            "s",
            "e",
            "vid",
            "did",
            "src",
        ],
    )
    ps, pe = _dt(t_start, p.s.to_numpy(float)), _dt(t_start, p.e.to_numpy(float))
    procedure_occurrence = event_table(
        "procedure_occurrence",
        ids=p.procedure_occurrence_id,
        person_id=p.person_id,
        concept_id=p.c,
        start=ps,
        end=pe,
        visit_occurrence_id=p.vid,
        visit_detail_id=p.did,
        procedure_source_value=p.src,
    )
    g = pd.DataFrame(
        drug, columns=["drug_exposure_id", "person_id", "c", "s", "e", "vid", "did"]
    )
    gs, ge = _dt(t_start, g.s.to_numpy(float)), _dt(t_start, g.e.to_numpy(float))
    drug_exposure = event_table(
        "drug_exposure",
        ids=g.drug_exposure_id,
        person_id=g.person_id,
        concept_id=g.c,
        start=gs,
        end=ge,
        visit_occurrence_id=g.vid,
        visit_detail_id=g.did,
        drug_source_value="vasoactive infusion",
    )
    wt = _dt(t_start, surg_day - preop)
    measurement = pd.DataFrame(
        {
            "measurement_id": person_id,
            "person_id": person_id,
            "measurement_concept_id": np.full(n, CONCEPTS["weight"], np.int64),
            "measurement_date": pd.DatetimeIndex(wt).normalize(),
            "measurement_datetime": wt,
            "measurement_type_concept_id": np.full(n, ehr, np.int64),
            "value_as_number": weight,
            "unit_source_value": "kg",
            "measurement_source_value": "weight",
        }
    )
    condition_occurrence = pd.DataFrame(
        {
            "condition_occurrence_id": person_id,
            "person_id": person_id,
            "condition_concept_id": np.full(n, CONCEPTS["chd"], np.int64),
            "condition_start_date": pd.DatetimeIndex(birth).normalize(),
            "condition_start_datetime": birth,
            "condition_type_concept_id": np.full(n, ehr, np.int64),
            "condition_source_value": "congenital heart disease",
        }
    )
    dd = pd.DataFrame(deaths, columns=["person_id", "t"])
    dt = _dt(t_start, dd.t.to_numpy(float))
    death = pd.DataFrame(
        {
            "person_id": dd.person_id.astype(np.int64),
            "death_date": pd.DatetimeIndex(dt).normalize(),
            "death_datetime": dt,
            "death_type_concept_id": np.full(len(dd), ehr, np.int64),
        }
    )
    del id_offset
    return {
        "person": person,
        "observation_period": observation_period,
        "visit_occurrence": visit_occurrence,
        "visit_detail": visit_detail,
        "procedure_occurrence": procedure_occurrence,
        "drug_exposure": drug_exposure,
        "measurement": measurement,
        "condition_occurrence": condition_occurrence,
        "death": death,
    }


def _truth_frame(
    truth, site, person_id, age_days, age_group, stat, weight, weight_z, vent
):
    t = pd.DataFrame(
        truth,
        columns=["person_id", "episode_id", "state", "entry", "exit", "next_state"],
    )
    cov = pd.DataFrame(
        {
            "person_id": person_id,
            "age_days": age_days,
            "age_group": np.asarray(AGE_GROUPS)[age_group],
            "stat": stat.astype(np.int64),
            "weight_kg": weight,
            "weight_z_true": weight_z,
            "ventilation": vent.astype(np.int64),
        }
    )
    t = t.merge(cov, on="person_id", how="left")
    t.insert(0, "site", site)
    return t


def simulate_sites(
    key,
    *,
    n_episodes: int | dict[str, int],
    sites: dict[str, CaseMix] | None = None,
    **kw,
) -> dict[str, CardiacCohort]:
    """Several hospitals with different case-mix (default :data:`SITE_CASE_MIX`);
    ids are offset by 10,000,000 per site so they never collide."""
    sites = SITE_CASE_MIX if sites is None else sites
    out = {}
    for s, (name, cm) in enumerate(sites.items()):
        n = n_episodes[name] if isinstance(n_episodes, dict) else n_episodes
        out[name] = simulate_cardiac(
            jax.random.fold_in(key, s),
            n_episodes=n,
            site=name,
            case_mix=cm,
            id_offset=(s + 1) * 10_000_000,
            **kw,
        )
    return out


__all__ = [
    "AGE_GROUPS",
    "CONCEPTS",
    "CaseMix",
    "CardiacCohort",
    "REFERENCE_CASE_MIX",
    "SITE_CASE_MIX",
    "STATES",
    "STAT_CONCEPTS",
    "TARGET_LOS",
    "TARGET_MORTALITY",
    "TRANSITIONS",
    "VASOACTIVE_CONCEPTS",
    "expected_weight_kg",
    "simulate_cardiac",
    "simulate_sites",
    "true_log_hazard_ratio",
]
