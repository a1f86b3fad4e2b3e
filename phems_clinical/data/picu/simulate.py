"""Simulated paediatric ICU stays, hour by hour, written as OMOP CDM 5.4 tables.

Generative story (one PICU admission per child):

1. **Case mix.** Age is drawn by the Phoenix/PELOD-2 age bands (<1, 1-11, 12-23,
   24-59, 60-143, 144-216 months; Sanchez-Pinto et al., JAMA 2024;331(8):675-686;
   Leteurtre et al., Crit Care Med 2013;41:1761) with site-specific weights, and an
   admission type (medical, elective surgery, trauma) with site-specific weights.
2. **Sepsis.** With probability ``prevalence`` (scaled by admission type) the stay has
   a true sepsis onset hour (half within the first 12 h, half later, "hospital
   onset"). After onset a latent deterioration ``g(t) = 1 - exp(-(t - onset)/tau)``
   (tau 2-6 h) drives organ dysfunction in the systems the infection involves
   (respiratory, cardiovascular, coagulation, neurological, renal, hepatic),
   then recovers (survivors) or persists (deaths).
3. **Physiology.** Each system has a latent severity (>= 0): the admission illness
   (decaying), the sepsis term, a terminal decline over the last day of children who
   die, and AR(1) noise (phi 0.9). Observables are smooth functions of the severities
   around age-specific normal values (tables below), with measurement noise.
4. **Care.** Respiratory support (other / invasive ventilation) when oxygenation
   fails, FiO2 titrated to a PaO2 near 85 mmHg; vasoactive drugs added one by one as
   circulatory failure deepens; a blood culture and antimicrobials for suspected
   infection: in septic stays 0-8 h after onset, in some non-septic stays as a
   rule-out (stopped after ~48 h) and as surgical prophylaxis (no culture).
5. **Charting.** Vitals hourly with gaps (HR/RR/SpO2 ~92 %, BP ~80 %, temperature
   every few hours), GCS and pupils every ~4 h, labs drawn every ~4-12 h (more often
   when sicker), blood gases more often on ventilation; nothing carried forward.
6. **Outcome.** Death with a probability by admission type and sepsis/shock (Phoenix:
   in-hospital mortality of sepsis 7.1 % and septic shock 10.8 % in higher-resource
   settings, Sanchez-Pinto et al. 2024 †); a child who dies dies at ICU discharge.

Numbers marked † are recalled from the cited source, not re-checked; they set
plausible simulated distributions, not clinical decisions. Everything is vectorised
numpy driven by one Generator derived from the JAX key (same key, same tables).

Normal ranges by age (medians, interpolated linearly in age):

* HR and RR: Fleming S, Thompson M, Stevens R, et al. Normal ranges of heart rate and
  respiratory rate in children from birth to 18 years of age: a systematic review of
  observational studies. Lancet 2011;377:1011-1018 (50th centiles †).
* BP: National High Blood Pressure Education Program Working Group. The fourth report
  on the diagnosis, evaluation, and treatment of high blood pressure in children and
  adolescents. Pediatrics 2004;114:555-576 (50th centiles, 50th height centile †);
  neonates: Zubrow AB, et al. J Perinatol 1995;15:470-479 †.
* Creatinine: Pottel H, et al. Clin Chim Acta 2008;396:49-55 and Boer DP, et al.
  Pediatr Nephrol 2010;25:2107-2113 (medians †).
* Platelets, WBC and differential, glucose, bilirubin, ALT, INR, D-dimer, fibrinogen:
  the reference ranges given with the Phoenix rubric (platelets 150-450 10^3/uL,
  D-dimer < 0.5 mg/L FEU, fibrinogen 180-410 mg/dL, lactate 0.5-2.2 mmol/L; phoenix
  package README, CU-DBMI-Peds) and usual paediatric laboratory ranges †.
* LOS: median 2-3 days with a long right tail (log-normal, sigma ~0.9), capped at
  ``max_los_h`` (PICANet annual reports: median PICU stay ~2-3 days †).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import pandas as pd
from scipy.signal import lfilter

from phems_clinical._typing import Key
from phems_clinical.data.omop.concepts import ROUTE
from phems_clinical.data.omop.events import event_table
from phems_clinical.data.picu.hourly import (
    CONDITION,
    DRUG,
    GENDER,
    MEASUREMENT,
    OBSERVATION,
    PROCEDURE,
    TYPE_EHR,
    VASOACTIVES,
    VISIT,
)
from phems_clinical.rng import numpy_generator

__all__ = [
    "AGE_BANDS_MONTHS",
    "DEFAULT_CASE_MIX",
    "DEFAULT_SITES",
    "PicuCohort",
    "simulate_picu",
    "simulate_sites",
]

#: Phoenix / PELOD-2 age bands (months): [0,1), [1,12), [12,24), [24,60), [60,144),
#: [144,216].
AGE_BANDS_MONTHS = (0.0, 1.0, 12.0, 24.0, 60.0, 144.0, 216.0)

#: Case mix of a general tertiary PICU: roughly 40 % infants, median age ~2-3 years
#: (PICANet annual reports †); admission types medical / elective surgery / trauma.
DEFAULT_CASE_MIX: dict[str, Any] = {
    "age_band_weights": (0.08, 0.30, 0.12, 0.18, 0.18, 0.14),
    "admission_mix": {"medical": 0.60, "elective_surgery": 0.30, "trauma": 0.10},
    "los_scale": 1.0,  # multiplies the LOS medians
    "mortality_scale": 1.0,  # multiplies the death probabilities
}

#: Three hospitals with different case mix and sepsis prevalence (simulate_sites).
DEFAULT_SITES: dict[str, dict[str, Any]] = {
    "tertiary": {"n_stays": 400, "prevalence": 0.12},
    "surgical": {
        "n_stays": 300,
        "prevalence": 0.05,
        "case_mix": {
            "age_band_weights": (0.12, 0.30, 0.14, 0.16, 0.16, 0.12),
            "admission_mix": {
                "medical": 0.30,
                "elective_surgery": 0.65,
                "trauma": 0.05,
            },
        },
    },
    "district": {
        "n_stays": 200,
        "prevalence": 0.20,
        "case_mix": {
            "age_band_weights": (0.04, 0.20, 0.12, 0.22, 0.24, 0.18),
            "admission_mix": {
                "medical": 0.75,
                "elective_surgery": 0.05,
                "trauma": 0.20,
            },
            "mortality_scale": 1.5,
        },
    },
}

_ADM_TYPES = ("medical", "elective_surgery", "trauma")
_HOUR_NS = 3_600_000_000_000
_MIN_NS = 60_000_000_000
_DAY_NS = 24 * _HOUR_NS
_MONTH_NS = int(30.4375 * _DAY_NS)

# ------------------------------------------------ normal values (see module doc)
_AGE_PTS = np.array([0.0, 1.0, 6.0, 12.0, 24.0, 48.0, 72.0, 120.0, 180.0, 216.0])
_HR = np.array([127, 145, 138, 128, 113, 101, 94, 82, 74, 71.0])  # Fleming 2011 †
_RR = np.array([44, 42, 38, 35, 31, 25, 23, 19, 16, 15.0])  # Fleming 2011 †
_SBP = np.array([68, 80, 88, 90, 92, 95, 98, 102, 110, 114.0])  # NHBPEP 2004 †
_DBP = np.array([40, 45, 48, 50, 52, 55, 58, 61, 64, 66.0])  # NHBPEP 2004 †
_CREAT = np.array([0.50, 0.22, 0.20, 0.24, 0.30, 0.35, 0.40, 0.48, 0.62, 0.75])  # †
_WBC = np.array([14.0, 11.0, 10.5, 10.0, 9.0, 8.5, 8.0, 7.5, 7.0, 7.0])  # †
_LYMPH_FRAC = np.array([0.35, 0.55, 0.60, 0.58, 0.50, 0.42, 0.38, 0.35, 0.32, 0.30])

# Vasoactive drug order (first, second, third agent): infants epinephrine first,
# older children norepinephrine first (Weiss SL et al., Surviving Sepsis Campaign
# paediatric guidelines, Pediatr Crit Care Med 2020;21:e52-e106: epinephrine or
# norepinephrine first line); milrinone first after (cardiac) surgery.
_VASO_ORDER_YOUNG = ("epinephrine", "norepinephrine", "vasopressin")
_VASO_ORDER_OLD = ("norepinephrine", "epinephrine", "vasopressin")
_VASO_ORDER_SURG = ("milrinone", "epinephrine", "norepinephrine")

_SYSTEMS = ("resp", "cardio", "coag", "neuro", "renal", "hepatic")


class PicuCohort(NamedTuple):
    """A simulated hospital: OMOP tables and the ground truth (for tests only).

    ``truth`` columns: stay_id, person_id, site, age_months (at ICU admission),
    sex, admission_type, los_hours, septic (bool), onset_hour (float, NaN if not
    septic; hours since ICU admission), culture_hour (NaN if none), shock (bool,
    vasoactives after onset), died (bool), death_hour (NaN if alive).
    """

    site: str
    tables: dict[str, pd.DataFrame]
    truth: pd.DataFrame


def _interp(age_months, table):
    return np.interp(age_months, _AGE_PTS, table)


def _ar1(rng, stay_offset, n_rows, phi, sd):
    """Stationary AR(1) noise restarted at every stay (exact, vectorised)."""
    e = rng.standard_normal(n_rows) * sd * np.sqrt(1 - phi**2)
    starts = stay_offset[:-1]
    e[starts] = rng.standard_normal(len(starts)) * sd
    x = lfilter([1.0], [1.0, -phi], e)
    # remove the carry-over from the previous stay: x_t -= phi^(k+1) x_{start-1}
    prev = np.zeros(len(starts))
    prev[1:] = x[starts[1:] - 1]
    lengths = np.diff(stay_offset)
    k = np.arange(n_rows) - np.repeat(starts, lengths)
    x -= np.repeat(prev, lengths) * phi ** (k + 1)
    return x


def _runs(flag, first, last):
    """Start and end row indices of runs of True that do not cross stay boundaries."""
    prev = np.zeros_like(flag)
    prev[1:] = flag[:-1]
    nxt = np.zeros_like(flag)
    nxt[:-1] = flag[1:]
    s = np.flatnonzero(flag & (first | ~prev))
    e = np.flatnonzero(flag & (last | ~nxt))
    return s, e


def _merge_case_mix(case_mix):
    cm = dict(DEFAULT_CASE_MIX)
    if case_mix:
        unknown = set(case_mix) - set(DEFAULT_CASE_MIX)
        if unknown:
            raise ValueError(
                f"case_mix: unknown key(s) {sorted(unknown)}; expected "
                f"{sorted(DEFAULT_CASE_MIX)}"
            )
        cm.update(case_mix)
    w = np.asarray(cm["age_band_weights"], float)
    if w.shape != (6,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            "case_mix['age_band_weights']: expected 6 non-negative "
            "weights for the bands <1, 1-11, 12-23, 24-59, 60-143, "
            "144-216 months"
        )
    mix = cm["admission_mix"]
    if set(mix) - set(_ADM_TYPES):
        raise ValueError(f"case_mix['admission_mix']: keys must be among {_ADM_TYPES}")
    a = np.array([float(mix.get(t, 0.0)) for t in _ADM_TYPES])
    if (a < 0).any() or a.sum() <= 0:
        raise ValueError("case_mix['admission_mix']: expected non-negative weights")
    return (
        w / w.sum(),
        a / a.sum(),
        float(cm["los_scale"]),
        float(cm["mortality_scale"]),
    )


def simulate_picu(
    key: Key,
    *,
    n_stays: int,
    site: str = "site",
    case_mix: Mapping[str, Any] | None = None,
    prevalence: float = 0.10,
    start: str = "2023-01-01",
    max_los_h: int = 336,
    id_offset: int = 0,
) -> PicuCohort:
    """Simulate ``n_stays`` PICU stays of one hospital as OMOP CDM 5.4 tables.

    Args:
      key: JAX PRNG key (same key and arguments -> identical tables).
      n_stays: number of ICU stays (one per child).
      site: hospital name (kept in ``truth`` and :class:`PicuCohort`).
      case_mix: overrides of :data:`DEFAULT_CASE_MIX` (age band weights, admission
        type mix, LOS and mortality multipliers).
      prevalence: fraction of stays with a true sepsis onset (0-1); the SPROUT
        point-prevalence study found 8.2 % severe sepsis in PICUs (Weiss SL et al.,
        Am J Respir Crit Care Med 2015;191:1147-1157 †).
      start: first admission date; admissions are spread over the following year.
      max_los_h: cap on the ICU length of stay (hours).
      id_offset: added to person/visit/stay ids (keeps ids unique across sites).

    Returns:
      :class:`PicuCohort` with tables person, visit_occurrence, visit_detail (ICU,
      32037), measurement, observation, drug_exposure, procedure_occurrence,
      condition_occurrence, death, and the ground truth per stay.
    """
    if n_stays < 1:
        raise ValueError(f"n_stays: expected a positive integer, got {n_stays}")
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"prevalence: expected a fraction in [0, 1], got {prevalence}")
    if max_los_h < 24:
        raise ValueError(f"max_los_h: expected >= 24 h, got {max_los_h}")
    wb, wa, los_scale, mort_scale = _merge_case_mix(case_mix)
    rng = numpy_generator(key)
    # The stages draw from one Generator in this order: the same key gives the same
    # tables only if the order is kept.
    st = _draw_stays(
        rng, int(n_stays), wb, wa, prevalence, los_scale, mort_scale, max_los_h
    )
    hg = _hour_grid(st)
    course = _severities(rng, st, hg)
    care = _respiratory_and_vasoactive_support(rng, st, hg, course)
    values = _vitals(rng, st, hg, course, care)
    values.update(_labs_and_gcs(rng, st, hg, course, care))
    masks = _charting(rng, hg, course, care)
    times = _admission_times(rng, st, hg, start)
    ids = np.arange(len(st.los_h), dtype=np.int64) + 1 + int(id_offset)
    measurement = _measurement_table(rng, masks, values, times, hg, ids)
    observation = _observation_table(
        rng, masks["gcs"], values["pupils"], times, hg, ids
    )
    abx = _cultures_and_antimicrobials(rng, st)
    drug_exposure = _drug_exposure_table(rng, st, hg, care, abx, times, ids)
    procedure_occurrence = _procedure_table(rng, hg, care, abx, times, ids)
    person, visit_occurrence, visit_detail, death = _stay_tables(rng, st, times, ids)
    shock = _shock(st, hg, course, care)
    tables = {
        "person": person,
        "visit_occurrence": visit_occurrence,
        "visit_detail": visit_detail,
        "measurement": measurement,
        "observation": observation,
        "drug_exposure": drug_exposure,
        "procedure_occurrence": procedure_occurrence,
        "condition_occurrence": _condition_table(st, abx, shock, times, ids),
        "death": death,
    }
    return PicuCohort(
        site=site, tables=tables, truth=_truth_table(st, abx, shock, site, ids)
    )


# ------------------------------------------------------------ simulator stages


class _Stays(NamedTuple):
    """Stay-level draws (one entry per stay; hours since ICU admission)."""

    age0: np.ndarray  # age at admission, months
    male: np.ndarray
    adm: np.ndarray  # index into _ADM_TYPES
    septic: np.ndarray
    early: np.ndarray  # sepsis onset within the first 12 h (admitted septic)
    onset: np.ndarray  # onset hour, NaN if not septic
    amp: np.ndarray  # sepsis amplitude (inflammation)
    sep_amp: np.ndarray  # (n, 6) sepsis amplitude per organ system
    died: np.ndarray
    los_h: np.ndarray  # ICU length of stay, whole hours (int64)

    @property
    def is_med(self):
        return self.adm == 0

    @property
    def is_surg(self):
        return self.adm == 1

    @property
    def is_trauma(self):
        return self.adm == 2


def _draw_stays(rng, n, wb, wa, prevalence, los_scale, mort_scale, max_los_h) -> _Stays:
    """Case mix (age band, sex, admission type), sepsis and its organ involvement,
    death and length of stay, per stay."""
    band = rng.choice(6, size=n, p=wb)
    lo = np.asarray(AGE_BANDS_MONTHS)[band]
    hi = np.asarray(AGE_BANDS_MONTHS)[band + 1]
    age0 = lo + (hi - lo) * rng.random(n)
    age0 = np.minimum(age0, 215.9)
    male = rng.random(n) < 0.55  # PICU admissions are ~55 % boys †
    adm = rng.choice(3, size=n, p=wa)
    # sepsis risk by admission type (relative), normalised to the site prevalence
    rel = np.array([1.4, 0.3, 0.8])
    p_sep = np.clip(prevalence * rel[adm] / (rel @ wa), 0, 1)
    septic = rng.random(n) < p_sep
    early = rng.random(n) < 0.5
    onset = np.where(
        early,
        rng.uniform(0, 12, n),
        12 + np.minimum(rng.exponential(48, n), max_los_h * 0.6),
    )
    onset = np.where(septic, np.floor(onset), np.nan)

    # involvement of each system by sepsis (respiratory and circulatory commonest)
    p_inv = np.array([0.75, 0.65, 0.45, 0.30, 0.35, 0.20])
    inv = rng.random((n, 6)) < p_inv
    none2 = inv.sum(1) < 2
    inv[none2, 0] = True
    inv[none2, 1] = True
    amp = rng.lognormal(np.log(1.5), 0.35, n)
    sep_amp = inv * amp[:, None] * rng.uniform(0.7, 1.3, (n, 6))

    # death probability (before mortality_scale): admission type, sepsis, shock
    shock_prone = septic & (sep_amp[:, 1] > 1.1)
    p_die = np.array([0.025, 0.006, 0.04])[adm]
    p_die = np.where(septic, np.where(shock_prone, 0.11, 0.06), p_die)
    died = rng.random(n) < np.clip(p_die * mort_scale, 0, 1)

    # length of stay (h): log-normal, medians by type; septic = onset + course
    med_los = np.array([72.0, 36.0, 72.0])[adm] * los_scale
    los = rng.lognormal(np.log(med_los), 0.9)
    post = rng.lognormal(np.log(96.0 * los_scale), 0.7, n)
    los = np.where(septic, onset + np.maximum(post, 12), los)
    los = np.where(died & ~septic, rng.lognormal(np.log(72.0), 0.9, n), los)
    los = np.where(
        died & septic, onset + np.maximum(rng.lognormal(np.log(48.0), 0.9, n), 12), los
    )
    T = np.clip(np.ceil(los), 4, max_los_h).astype(np.int64)
    onset = np.where(septic, np.minimum(onset, T - 12), np.nan)
    return _Stays(age0, male, adm, septic, early, onset, amp, sep_amp, died, T)


class _Hours(NamedTuple):
    """One row per stay-hour, stays one after another."""

    offset: np.ndarray  # first row of each stay, and the total (n + 1)
    s: np.ndarray  # stay index of each row
    h: np.ndarray  # hour since ICU admission (float)
    first: np.ndarray  # first hour of a stay
    last: np.ndarray  # last hour of a stay
    age: np.ndarray  # age in months at that hour

    @property
    def n_rows(self) -> int:
        return int(self.offset[-1])


def _hour_grid(st: _Stays) -> _Hours:
    """The stay-hour rows of all stays (no draws)."""
    T = st.los_h
    offset = np.concatenate([[0], np.cumsum(T)])
    s = np.repeat(np.arange(len(T)), T)
    h = (np.arange(int(offset[-1])) - offset[s]).astype(np.float64)
    age = st.age0[s] + h / (_MONTH_NS / _HOUR_NS)
    return _Hours(offset, s, h, h == 0, h == (T[s] - 1), age)


class _Course(NamedTuple):
    """Latent illness per stay-hour."""

    u: np.ndarray  # hours since sepsis onset (-inf if not septic)
    sev: dict  # organ system -> severity in [0, 3]
    infl: np.ndarray  # inflammation (temperature, WBC, glucose)
    base: np.ndarray  # (n, 6) admission illness amplitude per system


def _severities(rng, st: _Stays, hg: _Hours) -> _Course:
    """Organ system severities: decaying admission illness, the sepsis trajectory
    g(t), a terminal decline over the last day of children who die, AR(1) noise."""
    n, s, h, T = len(st.los_h), hg.s, hg.h, st.los_h
    is_med, is_surg, is_trauma = st.is_med, st.is_surg, st.is_trauma
    # sepsis trajectory g(t) in [0, 1]
    tau_rise = rng.uniform(2, 6, n)
    plateau = rng.uniform(24, 72, n)
    tau_rec = rng.uniform(24, 60, n)
    u = h - np.where(st.septic, st.onset, np.inf)[s]
    with np.errstate(invalid="ignore", over="ignore"):
        g = np.where(u >= 0, 1 - np.exp(-np.maximum(u, 0) / tau_rise[s]), 0.0)
        rec = np.exp(-np.maximum(u - plateau[s], 0) / tau_rec[s])
    g *= np.where(st.died[s], 1.0, rec)
    term = np.where(st.died[s], np.clip((h - (T[s] - 24)) / 24, 0, 1) ** 2, 0.0)

    # admission illness by type (amplitude, decay time h)
    base = np.zeros((n, 6))
    base[:, 0] = rng.gamma(2, 0.18, n) + np.where(is_med, rng.gamma(2, 0.18, n), 0)
    base[:, 0] += np.where(is_surg, 0.5, 0) + np.where(is_trauma, 0.3, 0)
    base[:, 1] = rng.gamma(2, 0.08, n) + np.where(is_surg, rng.gamma(2, 0.2, n), 0)
    base[:, 2] = rng.gamma(2, 0.08, n) + np.where(is_trauma, 0.3, 0)
    base[:, 3] = rng.gamma(2, 0.05, n) + np.where(is_trauma, rng.gamma(2, 0.45, n), 0)
    base[:, 4] = rng.gamma(2, 0.06, n)
    base[:, 5] = rng.gamma(2, 0.05, n)
    # a child admitted with sepsis: the sepsis is the admission illness
    base[st.septic & st.early] *= 0.3
    tau_base = np.where(is_surg, rng.uniform(6, 18, n), rng.uniform(24, 96, n))
    decay = np.exp(-h / tau_base[s])
    sev = {}
    for k, name in enumerate(_SYSTEMS):
        z = (
            base[s, k] * decay
            + st.sep_amp[s, k] * g
            + 2.2 * term
            + _ar1(rng, hg.offset, hg.n_rows, 0.9, 0.06)
        )
        sev[name] = np.clip(z, 0.0, 3.0)  # 3 = maximal dysfunction
    infl = st.amp[s] * g + 0.1 * base[s, 0] * decay
    return _Course(u, sev, infl, base)


class _Support(NamedTuple):
    """Respiratory and circulatory support per stay-hour."""

    imv: np.ndarray  # invasive ventilation
    ors: np.ndarray  # other respiratory support
    n_vaso: np.ndarray  # number of vasoactive drugs (0-3)

    @property
    def support(self):
        return self.imv | self.ors


def _respiratory_and_vasoactive_support(
    rng, st: _Stays, hg: _Hours, course: _Course
) -> _Support:
    """Ventilation when oxygenation fails (and after surgery), vasoactives added one
    by one as circulatory failure deepens."""
    n, s, h, sev = len(st.los_h), hg.s, hg.h, course.sev
    thr_imv = rng.normal(1.0, 0.12, n)
    thr_o2 = rng.normal(0.35, 0.06, n)
    extub = np.where(st.is_surg, rng.gamma(2, 4, n), 0)  # post-op ventilation (h)
    imv = (sev["resp"] > thr_imv[s]) | (h < extub[s]) | (sev["neuro"] > 1.6)
    ors = ~imv & (sev["resp"] > thr_o2[s])
    thr_v = np.sort(rng.normal([0.7, 1.3, 1.9], 0.1, (n, 3)), axis=1)
    cv = sev["cardio"]
    n_vaso = (
        (cv > thr_v[s, 0]).astype(np.int64) + (cv > thr_v[s, 1]) + (cv > thr_v[s, 2])
    )
    n_vaso = np.where(
        st.is_surg[s] & (h < extub[s] * 2),
        np.maximum(n_vaso, (course.base[s, 1] > 0.5).astype(np.int64)),
        n_vaso,
    )
    return _Support(imv, ors, n_vaso)


def _vitals(rng, st: _Stays, hg: _Hours, course: _Course, care: _Support) -> dict:
    """Gas exchange (FiO2 titrated to a PaO2 near 85 mmHg), blood pressure, heart
    and respiratory rate, temperature: true values per stay-hour."""
    n, s, age, R = len(st.los_h), hg.s, hg.age, hg.n_rows
    r, cv, infl = course.sev["resp"], course.sev["cardio"], course.infl
    support = care.support
    pf_true = 470 * np.exp(-1.3 * r)
    fio2 = np.where(
        support, np.clip(np.round(85.0 / pf_true / 0.05) * 0.05, 0.21, 1.0), 0.21
    )
    fio2 = np.where(support & (fio2 < 0.25) & (rng.random(R) < 0.5), 0.25, fio2)
    pao2 = np.maximum(pf_true * fio2 * rng.lognormal(0, 0.08, R), 25.0)
    sat = 100.0 / (1 + 23400.0 / (pao2**3 + 150 * pao2))  # Severinghaus 1979
    spo2 = np.clip(np.round(sat + rng.normal(0, 1.0, R)), 50, 100)
    paco2 = 40 + 12 * r + rng.normal(0, 4, R)
    map_norm = (2 * _interp(age, _DBP) + _interp(age, _SBP)) / 3
    pp_norm = _interp(age, _SBP) - _interp(age, _DBP)
    mapv = (
        map_norm
        * (1 - 0.30 * cv + 0.07 * care.n_vaso)
        * (1 + _ar1(rng, hg.offset, R, 0.7, 0.06))
    )
    mapv = np.maximum(mapv, 12.0)
    pp = pp_norm * np.clip(1 + rng.normal(0, 0.08, R), 0.6, 1.4)
    dbp = np.maximum(mapv - pp / 3, 0.6 * mapv)
    sbp = 3 * mapv - 2 * dbp  # so that (2 DBP + SBP) / 3 = MAP
    hr = (
        _interp(age, _HR)
        * (1 + 0.15 * cv + 0.08 * infl + 0.05 * r)
        * (1 + _ar1(rng, hg.offset, R, 0.8, 0.06))
    )
    hr = np.clip(hr, 40, 240)
    rr = np.where(
        care.imv,
        _interp(age, _RR) * 0.85,
        _interp(age, _RR) * (1 + 0.25 * r + 0.1 * infl),
    ) * (1 + _ar1(rng, hg.offset, R, 0.8, 0.08))
    fever = np.where(rng.random(n) < 0.15, -0.5, 1.4)[s]  # some hypothermic
    temp = 37.0 + fever * np.minimum(infl, 1.5) + _ar1(rng, hg.offset, R, 0.8, 0.3)
    return {
        "hr": hr,
        "resp_rate": rr,
        "spo2": spo2,
        "sbp": sbp,
        "dbp": dbp,
        "map": mapv,
        "temp": temp,
        "fio2": fio2,
        "pao2": pao2,
        "paco2": paco2,
    }


def _labs_and_gcs(rng, st: _Stays, hg: _Hours, course: _Course, care: _Support) -> dict:
    """Lactate, coagulation, GCS and pupils, renal and liver tests, glucose and the
    white cell count: true values per stay-hour."""
    n, s, age, R = len(st.los_h), hg.s, hg.age, hg.n_rows
    sev, infl = course.sev, course.infl
    lactate = 1.1 * np.exp(0.9 * sev["cardio"]) * rng.lognormal(0, 0.15, R)
    plt_norm = rng.lognormal(np.log(280), 0.25, n)
    platelets = plt_norm[s] * np.exp(-0.9 * sev["coag"]) * rng.lognormal(0, 0.05, R)
    inr = 1.0 + 0.35 * sev["coag"] + rng.normal(0, 0.04, R)
    d_dimer = 0.35 * np.exp(1.1 * sev["coag"]) * rng.lognormal(0, 0.2, R)
    fibrinogen = 280 * np.exp(-0.55 * sev["coag"]) * rng.lognormal(0, 0.1, R)
    sedated = rng.random(n) < 0.5
    gcs = (
        15
        - 5.5 * sev["neuro"]
        - np.where(care.imv & sedated[s], rng.uniform(1, 6, R), 0)
        + rng.normal(0, 0.7, R)
    )
    gcs = np.clip(np.round(gcs), 3, 15)
    pupils = (sev["neuro"] > 2.2).astype(np.float64)
    creat = _interp(age, _CREAT) * (1 + 1.0 * sev["renal"]) * rng.lognormal(0, 0.08, R)
    bili = 0.5 * np.exp(1.0 * sev["hepatic"]) * rng.lognormal(0, 0.15, R)
    alt = 25 * np.exp(1.4 * sev["hepatic"]) * rng.lognormal(0, 0.2, R)
    glucose = 95 + 35 * infl + rng.normal(0, 15, R)
    wdir = np.where(rng.random(n) < 0.25, -1.0, 1.0)[s]  # leukopenia vs leukocytosis
    wbc = (
        _interp(age, _WBC)
        * np.exp(0.45 * wdir * np.minimum(infl, 2.0))
        * (rng.lognormal(0, 0.12, R))
    )
    lymph = _interp(age, _LYMPH_FRAC) * np.exp(-0.5 * infl)
    alc = wbc * lymph * rng.lognormal(0, 0.1, R)
    anc = wbc * np.clip(0.92 - lymph, 0.05, 0.95) * rng.lognormal(0, 0.1, R)
    return {
        "lactate": lactate,
        "platelets": platelets,
        "inr": inr,
        "d_dimer": d_dimer,
        "fibrinogen": fibrinogen,
        "gcs": gcs,
        "pupils": pupils,
        "creatinine": creat,
        "bilirubin": bili,
        "alt": alt,
        "glucose": glucose,
        "wbc": wbc,
        "anc": anc,
        "alc": alc,
    }


#: Decimals each measurement is recorded with.
_ROUNDING = {
    "hr": 0,
    "resp_rate": 0,
    "sbp": 0,
    "dbp": 0,
    "map": 0,
    "spo2": 0,
    "temp": 1,
    "gcs": 0,
    "fio2": 2,
    "pao2": 0,
    "paco2": 0,
    "lactate": 1,
    "platelets": 0,
    "wbc": 1,
    "anc": 2,
    "alc": 2,
    "creatinine": 2,
    "glucose": 0,
    "bilirubin": 1,
    "alt": 0,
    "inr": 2,
    "fibrinogen": 0,
    "d_dimer": 2,
}
#: Measurements timed by the lab draw (the others by the vitals round).
_LABS = frozenset(
    {
        "pao2",
        "paco2",
        "lactate",
        "platelets",
        "wbc",
        "anc",
        "alc",
        "creatinine",
        "glucose",
        "bilirubin",
        "alt",
        "inr",
        "fibrinogen",
        "d_dimer",
    }
)


def _charting(rng, hg: _Hours, course: _Course, care: _Support) -> dict:
    """Which stay-hours chart each measurement (name -> mask, in table order):
    vitals hourly with gaps, GCS every ~4 h, labs every ~4-12 h (more often when
    sicker), blood gases more often with an arterial line."""
    sev, first, R = course.sev, hg.first, hg.n_rows
    sick = (
        sev["resp"]
        + sev["cardio"]
        + sev["coag"]
        + sev["renal"]
        + 0.5 * (sev["neuro"] + sev["hepatic"])
    )
    p_lab = np.clip(1 / 12 + 0.08 * sick, 1 / 12, 1 / 3.5)
    draw = first | (rng.random(R) < p_lab)
    art_line = care.imv | (care.n_vaso > 0)
    gas = draw | (art_line & (rng.random(R) < 0.2))
    p_vit = rng.random(R)
    vit = p_vit < 0.92
    bp = vit & (rng.random(R) < np.where(art_line, 0.97, 0.85))
    neuro_obs = (rng.random(R) < 0.25) | first
    cbc = draw & (rng.random(R) < 0.85)
    chem = draw & (rng.random(R) < 0.85)
    lft = chem & (rng.random(R) < 0.5)
    coag = draw & (rng.random(R) < np.where(sick > 1, 0.7, 0.3))
    ddim = coag & (rng.random(R) < 0.5)
    return {
        "hr": vit,
        "resp_rate": vit & (rng.random(R) < 0.97),
        "spo2": vit & (rng.random(R) < 0.98),
        "sbp": bp,
        "dbp": bp,
        "map": bp & (rng.random(R) < 0.9),
        "temp": (rng.random(R) < 0.3) | first,
        "gcs": neuro_obs,
        "fio2": care.support & ((rng.random(R) < 0.9) | gas),
        "pao2": gas & art_line,
        "paco2": gas & art_line,
        "lactate": gas & ((rng.random(R) < 0.6) | art_line),
        "platelets": cbc,
        "wbc": cbc,
        "anc": cbc,
        "alc": cbc,
        "creatinine": chem,
        "glucose": chem | gas,
        "bilirubin": lft,
        "alt": lft,
        "inr": coag,
        "fibrinogen": coag,
        "d_dimer": ddim,
    }


class _Times(NamedTuple):
    """Timestamps (ns since the epoch)."""

    t0: np.ndarray  # ICU admission of each stay (minute resolution)
    t_row: np.ndarray  # start of each stay-hour
    vit_off: np.ndarray  # minute of the vitals round within the hour (ns)
    lab_off: np.ndarray  # minute of the lab draw within the hour (ns)


def _admission_times(rng, st: _Stays, hg: _Hours, start: str) -> _Times:
    """Admissions over one year from ``start``; a vitals and a lab minute per hour."""
    n, R = len(st.los_h), hg.n_rows
    t_start = pd.Timestamp(start).value
    t0 = t_start + rng.integers(0, 365 * 24 * 60, n) * _MIN_NS
    t_row = t0[hg.s] + (hg.h.astype(np.int64) * _HOUR_NS)
    vit_off = rng.integers(0, 60, R) * _MIN_NS
    lab_off = rng.integers(0, 60, R) * _MIN_NS
    return _Times(t0, t_row, vit_off, lab_off)


def _measurement_table(
    rng, masks: dict, values: dict, times: _Times, hg: _Hours, ids: np.ndarray
) -> pd.DataFrame:
    """OMOP measurement rows of the charted values (recorded resolution), with an
    occasional second heart rate in the hour (the last one counts)."""
    t_row, vit_off, s = times.t_row, times.vit_off, hg.s
    rows, cids, vals, stamps, codes = [], [], [], [], []
    for k, name in enumerate(masks):
        idx = np.flatnonzero(masks[name])
        v = values[name]
        cid, _, _ = MEASUREMENT[name]
        off = (times.lab_off if name in _LABS else vit_off)[idx]
        rows.append(idx)
        vals.append(np.round(v[idx], _ROUNDING[name]))
        stamps.append(t_row[idx] + off)
        cids.append(np.full(len(idx), cid, np.int64))
        codes.append(np.full(len(idx), k, np.int16))
        if name == "hr":
            dup = idx[(rng.random(len(idx)) < 0.05) & (vit_off[idx] < 50 * _MIN_NS)]
            dup_t = t_row[dup] + vit_off[dup] + rng.integers(1, 10, len(dup)) * _MIN_NS
            dup_v = np.round(v[dup] * rng.lognormal(0, 0.03, len(dup)))
            rows.append(dup)
            vals.append(dup_v)
            stamps.append(dup_t)
            cids.append(np.full(len(dup), cid, np.int64))
            codes.append(np.full(len(dup), k, np.int16))
    mrow = np.concatenate(rows)
    mt = np.concatenate(stamps)
    mcode = np.concatenate(codes)
    names = list(masks)
    ucodes, ucats = _recode(mcode, names, lambda m: MEASUREMENT[m][2])
    return pd.DataFrame(
        {
            "measurement_id": np.arange(1, len(mrow) + 1, dtype=np.int64),
            "person_id": ids[s[mrow]],
            "measurement_concept_id": np.concatenate(cids),
            "measurement_date": _dates(mt),
            "measurement_datetime": mt.astype("datetime64[ns]"),
            "measurement_type_concept_id": np.full(len(mrow), TYPE_EHR, np.int64),
            "value_as_number": np.concatenate(vals),
            "unit_source_value": pd.Categorical.from_codes(ucodes, ucats),
            "visit_occurrence_id": ids[s[mrow]],
            "visit_detail_id": ids[s[mrow]],
            "measurement_source_value": pd.Categorical.from_codes(
                mcode, [MEASUREMENT[m][1] for m in names]
            ),
        }
    )


def _observation_table(
    rng,
    neuro_obs: np.ndarray,
    pupils: np.ndarray,
    times: _Times,
    hg: _Hours,
    ids: np.ndarray,
) -> pd.DataFrame:
    """OMOP observation rows: both pupils fixed (0/1), at most neuro checks."""
    s, R = hg.s, hg.n_rows
    pidx = np.flatnonzero(neuro_obs & (rng.random(R) < 0.8))
    pt = times.t_row[pidx] + times.vit_off[pidx]
    return pd.DataFrame(
        {
            "observation_id": np.arange(1, len(pidx) + 1, dtype=np.int64),
            "person_id": ids[s[pidx]],
            "observation_concept_id": np.full(
                len(pidx), OBSERVATION["fixed_pupils"], np.int64
            ),
            "observation_date": _dates(pt),
            "observation_datetime": pt.astype("datetime64[ns]"),
            "observation_type_concept_id": np.full(len(pidx), TYPE_EHR, np.int64),
            "value_as_number": pupils[pidx],
            "visit_occurrence_id": ids[s[pidx]],
            "visit_detail_id": ids[s[pidx]],
            "observation_source_value": pd.Categorical.from_codes(
                np.zeros(len(pidx), np.int8), ["pupils_both_fixed"]
            ),
        }
    )


def _vasoactive_episodes(
    st: _Stays, hg: _Hours, care: _Support
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start row, end row and drug concept of each vasoactive infusion: the j-th
    agent runs while more than j are needed (order by age and admission type)."""
    young = st.age0 < 12
    order = np.where(
        st.is_surg[:, None],
        np.array([DRUG[d] for d in _VASO_ORDER_SURG]),
        np.where(
            young[:, None],
            np.array([DRUG[d] for d in _VASO_ORDER_YOUNG]),
            np.array([DRUG[d] for d in _VASO_ORDER_OLD]),
        ),
    )
    ep_rows, ep_end, ep_drug = [], [], []
    for j in range(3):
        rs, re_ = _runs(care.n_vaso > j, hg.first, hg.last)
        ep_rows.append(rs)
        ep_end.append(re_)
        ep_drug.append(order[hg.s[rs], j])
    return np.concatenate(ep_rows), np.concatenate(ep_end), np.concatenate(ep_drug)


class _Antimicrobials(NamedTuple):
    """Blood cultures (per stay) and antimicrobial courses (hours, inclusive)."""

    cult_h: np.ndarray  # culture hour, NaN if none
    stay: np.ndarray  # stay of each course
    h0: np.ndarray
    h1: np.ndarray
    drug: np.ndarray  # drug concept id

    @property
    def has_cult(self):
        return ~np.isnan(self.cult_h)


def _cultures_and_antimicrobials(rng, st: _Stays) -> _Antimicrobials:
    """A culture 0-8 h after sepsis onset or as a rule-out, antimicrobials from the
    culture (7-10 days in sepsis, ~48 h rule-out, vancomycin added in half), and
    surgical prophylaxis without a culture."""
    n, T, septic, adm = len(st.los_h), st.los_h, st.septic, st.adm
    delay = np.minimum(np.floor(rng.gamma(2.0, 1.5, n)), 8)
    cult_sep = st.onset + delay
    p_rule = np.array([0.30, 0.08, 0.20])[adm]
    ruleout = ~septic & (rng.random(n) < p_rule)
    cult_rule = np.where(
        rng.random(n) < 0.6, rng.uniform(0, 12, n), rng.uniform(0, T, n)
    )
    cult_h = np.floor(np.where(septic, cult_sep, np.where(ruleout, cult_rule, np.nan)))
    cult_h = np.minimum(cult_h, T - 1)
    has_cult = ~np.isnan(cult_h)
    abx_start = cult_h + (rng.random(n) < 0.4)
    abx_given = septic | (ruleout & (rng.random(n) < 0.85))
    abx_len = np.where(septic, rng.uniform(7, 10, n) * 24, rng.uniform(36, 48, n))
    abx_start = np.minimum(abx_start, T - 1)
    abx_end = np.minimum(abx_start + abx_len, T) - 1  # last hour
    hosp_onset = septic & ~st.early
    drug1 = np.where(hosp_onset, DRUG["meropenem"], DRUG["ceftriaxone"])
    i_abx = np.flatnonzero(abx_given & has_cult)
    vanco = i_abx[rng.random(len(i_abx)) < 0.5]
    proph = np.flatnonzero(st.is_surg & ~abx_given & (rng.random(n) < 0.5))
    a_stay = np.concatenate([i_abx, vanco, proph])
    a_h0 = np.concatenate(
        [abx_start[i_abx], abx_start[vanco], np.zeros(len(proph))]
    ).astype(np.int64)
    a_h1 = np.concatenate(
        [abx_end[i_abx], abx_end[vanco], np.minimum(23, T[proph] - 1)]
    ).astype(np.int64)
    a_drug = np.concatenate(
        [
            drug1[i_abx],
            np.full(len(vanco), DRUG["vancomycin"]),
            np.full(len(proph), DRUG["ceftriaxone"]),
        ]
    )
    return _Antimicrobials(cult_h, a_stay, a_h0, a_h1, a_drug)


def _drug_exposure_table(
    rng,
    st: _Stays,
    hg: _Hours,
    care: _Support,
    abx: _Antimicrobials,
    times: _Times,
    ids: np.ndarray,
) -> pd.DataFrame:
    """OMOP drug_exposure: vasoactive infusions, then antimicrobial courses (IV)."""
    ep_rows, ep_end, ep_drug = _vasoactive_episodes(st, hg, care)
    d_stay = np.concatenate([hg.s[ep_rows], abx.stay]).astype(np.int64)
    d_h0 = np.concatenate([hg.h[ep_rows].astype(np.int64), abx.h0])
    d_h1 = np.concatenate([hg.h[ep_end].astype(np.int64), abx.h1])
    d_drug = np.concatenate([ep_drug, abx.drug]).astype(np.int64)
    t0 = times.t0
    ds = t0[d_stay] + d_h0 * _HOUR_NS + rng.integers(0, 20, len(d_stay)) * _MIN_NS
    de = t0[d_stay] + (d_h1 + 1) * _HOUR_NS - rng.integers(1, 20, len(d_stay)) * _MIN_NS
    is_vaso = np.isin(d_drug, np.array(sorted(VASOACTIVES)))
    return event_table(
        "drug_exposure",
        ids=np.arange(1, len(d_stay) + 1),
        person_id=ids[d_stay],
        concept_id=d_drug,
        start=ds,
        end=de,
        visit_occurrence_id=ids[d_stay],
        visit_detail_id=ids[d_stay],
        route_concept_id=np.full(len(d_stay), ROUTE["intravenous"], np.int64),
        drug_source_value=np.where(
            is_vaso, "continuous infusion", "intermittent IV"
        ).astype(object),
    )


def _procedure_table(
    rng,
    hg: _Hours,
    care: _Support,
    abx: _Antimicrobials,
    times: _Times,
    ids: np.ndarray,
) -> pd.DataFrame:
    """OMOP procedure_occurrence: ventilation and other respiratory support runs,
    blood cultures (an instant)."""
    s, h = hg.s, hg.h
    p_stay, p_h0, p_h1, p_cid = [], [], [], []
    for flag, cid in (
        (care.imv, PROCEDURE["imv"]),
        (care.ors, PROCEDURE["other_respiratory_support"]),
    ):
        rs, re_ = _runs(flag, hg.first, hg.last)
        p_stay.append(s[rs])
        p_h0.append(h[rs].astype(np.int64))
        p_h1.append(h[re_].astype(np.int64))
        p_cid.append(np.full(len(rs), cid, np.int64))
    i_c = np.flatnonzero(abx.has_cult)
    p_stay.append(i_c)
    p_h0.append(abx.cult_h[i_c].astype(np.int64))
    p_h1.append(abx.cult_h[i_c].astype(np.int64))
    p_cid.append(np.full(len(i_c), PROCEDURE["blood_culture"], np.int64))
    p_stay = np.concatenate(p_stay).astype(np.int64)
    p_h0, p_h1, p_cid = map(np.concatenate, (p_h0, p_h1, p_cid))
    is_cult = p_cid == PROCEDURE["blood_culture"]
    t0 = times.t0
    ps = t0[p_stay] + p_h0 * _HOUR_NS + rng.integers(0, 20, len(p_stay)) * _MIN_NS
    pe = np.where(
        is_cult,
        ps,
        t0[p_stay] + (p_h1 + 1) * _HOUR_NS - rng.integers(1, 20, len(p_stay)) * _MIN_NS,
    )
    return event_table(
        "procedure_occurrence",
        ids=np.arange(1, len(p_stay) + 1),
        person_id=ids[p_stay],
        concept_id=p_cid,
        start=ps,
        end=pe,
        visit_occurrence_id=ids[p_stay],
        visit_detail_id=ids[p_stay],
    )


def _stay_tables(
    rng, st: _Stays, times: _Times, ids: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """OMOP person, visit_occurrence (hospital), visit_detail (ICU) and death; a
    child who dies dies at ICU discharge."""
    n, died, is_surg, t0 = len(st.los_h), st.died, st.is_surg, times.t0
    male = st.male
    icu_end = t0 + st.los_h * _HOUR_NS
    pre = (
        np.where(is_surg, rng.integers(1, 6 * 60, n), rng.integers(1, 48 * 60, n))
        * _MIN_NS
    )
    ward = rng.exponential(72, n)
    hosp_end = np.where(died, icu_end, icu_end + (ward * 60).astype(np.int64) * _MIN_NS)
    birth = t0 - (st.age0 * _MONTH_NS).astype(np.int64)
    birth = birth - birth % _MIN_NS
    bdt = pd.DatetimeIndex(birth.astype("datetime64[ns]"))
    person = pd.DataFrame(
        {
            "person_id": ids,
            "gender_concept_id": np.where(male, GENDER["M"], GENDER["F"]).astype(
                np.int64
            ),
            "year_of_birth": bdt.year.to_numpy(np.int64),
            "month_of_birth": bdt.month.to_numpy(np.int64),
            "day_of_birth": bdt.day.to_numpy(np.int64),
            "birth_datetime": birth.astype("datetime64[ns]"),
            "race_concept_id": np.zeros(n, np.int64),
            "ethnicity_concept_id": np.zeros(n, np.int64),
            "gender_source_value": np.where(male, "M", "F").astype(object),
        }
    )
    hs = np.maximum(t0 - pre, birth)  # a newborn's hospital visit starts at birth
    visit_occurrence = event_table(
        "visit_occurrence",
        ids=ids,
        person_id=ids,
        concept_id=np.full(n, VISIT["inpatient"]),
        start=hs,
        end=hosp_end,
        visit_source_value=np.array(_ADM_TYPES, dtype=object)[st.adm],
        admitted_from_concept_id=np.where(is_surg, 0, VISIT["er"]).astype(np.int64),
    )
    visit_detail = event_table(
        "visit_detail",
        ids=ids,
        person_id=ids,
        concept_id=np.full(n, VISIT["icu"]),
        start=t0,
        end=icu_end,
        visit_occurrence_id=ids,
        visit_detail_source_value=np.full(n, "PICU", dtype=object),
    )
    dead = np.flatnonzero(died)
    death = pd.DataFrame(
        {
            "person_id": ids[dead],
            "death_date": _dates(icu_end[dead]),
            "death_datetime": icu_end[dead].astype("datetime64[ns]"),
            "death_type_concept_id": np.full(len(dead), TYPE_EHR, np.int64),
        }
    )
    return person, visit_occurrence, visit_detail, death


def _shock(st: _Stays, hg: _Hours, course: _Course, care: _Support) -> np.ndarray:
    """Septic shock: a septic stay with any vasoactive at or after onset."""
    after = (course.u >= 0) & (care.n_vaso > 0)
    shock = np.zeros(len(st.los_h), bool)
    shock[np.unique(hg.s[after])] = True
    return shock & st.septic


def _condition_table(
    st: _Stays, abx: _Antimicrobials, shock: np.ndarray, times: _Times, ids: np.ndarray
) -> pd.DataFrame:
    """OMOP condition_occurrence: sepsis or septic shock at the culture hour."""
    cs = np.flatnonzero(st.septic)
    ct = times.t0[cs] + abx.cult_h[cs].astype(np.int64) * _HOUR_NS
    return pd.DataFrame(
        {
            "condition_occurrence_id": np.arange(1, len(cs) + 1, dtype=np.int64),
            "person_id": ids[cs],
            "condition_concept_id": np.where(
                shock[cs], CONDITION["septic_shock"], CONDITION["sepsis"]
            ).astype(np.int64),
            "condition_start_date": _dates(ct),
            "condition_start_datetime": ct.astype("datetime64[ns]"),
            "condition_type_concept_id": np.full(len(cs), TYPE_EHR, np.int64),
            "visit_occurrence_id": ids[cs],
            "visit_detail_id": ids[cs],
        }
    )


def _truth_table(
    st: _Stays, abx: _Antimicrobials, shock: np.ndarray, site: str, ids: np.ndarray
) -> pd.DataFrame:
    """Ground truth per stay (see :class:`PicuCohort`)."""
    n, T = len(st.los_h), st.los_h
    return pd.DataFrame(
        {
            "stay_id": ids,
            "person_id": ids,
            "site": np.full(n, site, dtype=object),
            "age_months": st.age0,
            "sex": np.where(st.male, "M", "F").astype(object),
            "admission_type": np.array(_ADM_TYPES, dtype=object)[st.adm],
            "los_hours": T.astype(np.int64),
            "septic": st.septic,
            "onset_hour": st.onset,
            "culture_hour": np.where(abx.has_cult, abx.cult_h, np.nan),
            "shock": shock,
            "died": st.died,
            "death_hour": np.where(st.died, T.astype(np.float64), np.nan),
        }
    )


def _dates(t_ns: np.ndarray) -> np.ndarray:
    """Midnight of each ns timestamp, as datetime64[ns] (OMOP *_date columns)."""
    t_ns = np.asarray(t_ns, np.int64)
    return (t_ns - t_ns % _DAY_NS).astype("datetime64[ns]")


def _recode(codes, names, fn):
    """Map integer codes over ``names`` to codes over the distinct ``fn(name)``."""
    labels = [fn(m) for m in names]
    cats = sorted(set(labels))
    lut = np.array([cats.index(lab) for lab in labels], np.int16)
    return lut[codes], cats


def simulate_sites(
    key: Key, sites: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, PicuCohort]:
    """Several hospitals with different case mix and sepsis prevalence.

    Args:
      key: JAX PRNG key; site ``i`` (in the order of ``sites``) uses
        ``jax.random.fold_in(key, i)``.
      sites: ``{name: keyword arguments of simulate_picu}`` (``n_stays`` required;
        ``case_mix``, ``prevalence``, ``start``, ``max_los_h`` optional). Defaults to
        :data:`DEFAULT_SITES`.

    Returns:
      ``{name: PicuCohort}``; ids are offset by ``i * 10_000_000`` so that person,
      visit and stay ids are unique across the hospitals.
    """
    sites = DEFAULT_SITES if sites is None else sites
    out = {}
    for i, (name, cfg) in enumerate(sites.items()):
        cfg = dict(cfg)
        if "n_stays" not in cfg:
            raise ValueError(f"sites['{name}']: 'n_stays' is required")
        if cfg.get("n_stays", 0) >= 10_000_000:
            raise ValueError(f"sites['{name}']: n_stays must be < 10,000,000")
        out[name] = simulate_picu(
            jax.random.fold_in(key, i), site=name, id_offset=i * 10_000_000, **cfg
        )
    return out
