"""Patient profiles: one row per patient of a use case's analysis table, the table
the scorecard's fidelity and privacy metrics compare.

Longitudinal data are scored at patient level: an attacker
targets a patient, and a generator must reproduce each patient's summary, not
just the pooled rows. A profile holds the patient's covariates (the attacker's
auxiliary knowledge: the quasi-identifiers of :mod:`phems_clinical.privacy.
release`) and summaries of the patient's course, one of which is the secret an
inference attack tries to learn (the use case's ``attack_columns``,
:class:`phems_clinical.usecases.UseCase`). Each use case names its profile
function; :func:`profile` takes the use case object.

- haemophilia: AGE y, WT kg, HT cm, SEX, BGO, first dose IU/kg, number of levels,
  first measured level (IU/dL) and its time (h), terminal log-slope of the first
  occasion (1/h, NaN with < 2 levels).
- picu: age (months), sex, length of stay (h), died, mean HR, max lactate
  (mmol/L), min SpO2 (%), hours on IMV, hours on vasoactives, any culture.
- cardiac: one row per episode: age (d), sex, weight (kg), STAT, ventilation,
  first CICU stay (d), died, readmitted, day of death (NaN if alive at the end
  of follow-up).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from phems_clinical.evaluation.cardiac_eval import episode_outcomes


def pk_profile(ev: pd.DataFrame) -> pd.DataFrame:
    """Haemophilia: one row per PK subject (see the module docstring)."""
    ev = ev.copy()
    ev["EVID"] = ev["EVID"].astype(int)
    g = ev.groupby("ID", sort=False)
    cov = [c for c in ("AGE", "WT", "HT", "SEX", "BGO") if c in ev.columns]
    out = g[cov].first()
    doses = ev[ev["EVID"] == 1]
    first_dose = doses.groupby("ID", sort=False)["AMT"].first()
    out["dose_iu_kg"] = first_dose.reindex(out.index) / out["WT"]
    obs = ev[(ev["EVID"] == 0) & ev["DV"].notna()]
    if "BLQ" in obs.columns:
        obs = obs[obs["BLQ"].fillna(0).astype(int) == 0]
    go = obs.groupby("ID", sort=False)
    out["n_levels"] = go.size().reindex(out.index).fillna(0).astype(int)
    out["level_first"] = go["DV"].first().reindex(out.index)
    t0 = doses.groupby("ID", sort=False)["TIME"].first()
    out["time_first"] = (go["TIME"].first() - t0).reindex(out.index)
    occ1 = obs[obs["OCC"] == 1] if "OCC" in obs.columns else obs

    def slope(d: pd.DataFrame) -> float:
        if len(d) < 2:
            return float("nan")
        t, y = d["TIME"].to_numpy(float), np.log(d["DV"].to_numpy(float))
        return float(np.polyfit(t, y, 1)[0])

    s = occ1.groupby("ID", sort=False)[["TIME", "DV"]].apply(slope)
    out["log_slope"] = s.reindex(out.index).astype(float)
    return out.reset_index(drop=True)


def picu_profile(h: pd.DataFrame) -> pd.DataFrame:
    """PICU: one row per ICU stay (see the module docstring)."""
    g = h.groupby("stay_id", sort=False)
    out = pd.DataFrame(
        {
            "age_months": g["age_months"].first(),
            "sex": g["sex"].first(),
            "los_hours": g["hour"].max() + 1,
            "died": g["died"].max().astype(int),
            "hr_mean": g["hr"].mean(),
            "lactate_max": g["lactate"].max(),
            "spo2_min": g["spo2"].min(),
            "imv_hours": g["imv"].sum(),
            "vasoactive_hours": (h["vasoactives"] > 0)
            .groupby(h["stay_id"], sort=False)
            .sum(),
            "culture": g["culture"].max().astype(int),
        }
    )
    return out.reset_index(drop=True)


def cardiac_profile(s: pd.DataFrame) -> pd.DataFrame:
    """Cardiac: one row per surgical episode (see the module docstring)."""
    first = s.groupby("episode_id", sort=False).nth(0).set_index("episode_id")
    oc = episode_outcomes(s).set_index("episode_id")
    out = pd.DataFrame(
        {
            "age_days": first["age_days"],
            "sex": first["sex"],
            "weight_kg": first["weight_kg"],
            "stat": first["stat"].astype(int),
            "ventilation": first["ventilation"].astype(int),
            "cicu_days": oc["cicu_days"],
            "died": oc["death"].astype(int),
            "readmitted": (oc["readmit"] == 1).astype(int),
            "death_day": oc["death_time"].where(oc["death"] == 1),
        }
    )
    return out.reset_index(drop=True)


def profile(use_case, data: pd.DataFrame) -> pd.DataFrame:
    """One row per patient (PK subject, PICU stay, cardiac episode) of ``data``, by
    the ``profile`` function of ``use_case`` (a :class:`phems_clinical.usecases.
    UseCase`)."""
    if isinstance(use_case, str):
        raise ValueError(
            f"use case {use_case!r}: pass the use-case object "
            f"(phems_clinical.usecases.get({use_case!r})), not its name"
        )
    return use_case.profile(data)
