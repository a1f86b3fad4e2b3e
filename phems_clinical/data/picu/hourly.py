"""OMOP CDM 5.4 tables -> the hourly PICU table (one row per ICU stay-hour).

The hourly table is the contract between the PICU simulator, the clinical scores
(:mod:`phems_clinical.models.scores`) and the sepsis models; its columns and units are
documented in ``data_schemas/sepsis_hourly.schema.json``. The layout follows the
PhysioNet/CinC 2019 challenge (Reyna et al., Crit Care Med 2020;48(2):210-217): one
row per ICU hour, hour 0 = the first hour after ICU admission, values *not* carried
forward (NaN = not measured in that hour).

Rules, applied the same way to every source table:

* a stay is an ICU ``visit_detail`` (concept 32037 "Intensive Care"); its rows are
  hours ``0 .. ceil((end - start) / 1 h) - 1``;
* an event belongs to a stay by ``visit_detail_id`` when the source row has one, else
  by ``person_id`` and time (the ICU stay of that person that contains the event);
* a measurement/observation is binned to ``floor((t - start) / 1 h)``; when several
  fall in one hour the **last** one is kept; events outside the stay are ignored;
* an interval record (drug_exposure, ventilation procedure) flags every hour it
  overlaps, ``[start, end)``; a missing end flags the start hour only;
* ``vasoactives`` counts the *distinct* vasoactive drugs running in the hour (Phoenix:
  dobutamine, dopamine, epinephrine, milrinone, norepinephrine, vasopressin;
  Sanchez-Pinto et al., JAMA 2024;331(8):675-686);
* ``died`` = a death recorded between ICU admission and 1 h after ICU discharge.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from phems_clinical.data.omop import concepts as C

__all__ = [
    "ANTIMICROBIALS",
    "CONDITION",
    "DRUG",
    "GENDER",
    "HOURLY_COLUMNS",
    "MEASUREMENT",
    "OBSERVATION",
    "PROCEDURE",
    "TYPE_EHR",
    "VALUE_COLUMNS",
    "VASOACTIVES",
    "VISIT",
    "HourlyTableError",
    "hourly_table",
]

# ----------------------------------------------------------------- concept ids
# One source of truth: phems_clinical.data.omop.concepts (data_schemas/omop/
# concepts.csv); these are the PICU subset under the names this module uses.
_CODES = C.bundled_concepts().set_index("concept_id")["concept_code"]
_PICU_MEASUREMENTS = (
    "hr",
    "resp_rate",
    "sbp",
    "dbp",
    "map",
    "spo2",
    "temp",
    "gcs",
    "fio2",
    "pao2",
    "paco2",
    "lactate",
    "platelets",
    "inr",
    "d_dimer",
    "fibrinogen",
    "glucose",
    "anc",
    "alc",
    "wbc",
    "creatinine",
    "bilirubin",
    "alt",
)
#: name -> (concept_id, LOINC code, unit as written in unit_source_value)
MEASUREMENT: dict[str, tuple[int, str, str]] = {
    k: (C.MEASUREMENT[k], str(_CODES[C.MEASUREMENT[k]]), C.UNITS[k])
    for k in _PICU_MEASUREMENTS
}
#: observation concepts: bilaterally fixed pupils (local id; 1 = both fixed, 0 = not)
OBSERVATION = {"fixed_pupils": C.OBSERVATION["fixed_pupils"]}
#: drug ingredients (RxNorm)
DRUG = {
    k: C.DRUG[k]
    for k in (
        "epinephrine",
        "norepinephrine",
        "dopamine",
        "dobutamine",
        "milrinone",
        "vasopressin",
        "ceftriaxone",
        "vancomycin",
        "meropenem",
        "piperacillin",
    )
}
VASOACTIVES = frozenset(
    DRUG[d]
    for d in (
        "epinephrine",
        "norepinephrine",
        "dopamine",
        "dobutamine",
        "milrinone",
        "vasopressin",
    )
)
ANTIMICROBIALS = frozenset(
    DRUG[d] for d in ("ceftriaxone", "vancomycin", "meropenem", "piperacillin")
)
#: procedures (SNOMED): invasive ventilation, other respiratory support, blood culture
PROCEDURE = {
    "imv": C.PROCEDURE["imv"],
    "other_respiratory_support": C.PROCEDURE["oxygen_therapy"],
    "blood_culture": C.PROCEDURE["blood_culture"],
}
CONDITION = {k: C.CONDITION[k] for k in ("sepsis", "septic_shock")}
VISIT = {
    "inpatient": C.VISIT["inpatient"],
    "er": C.VISIT["er"],
    "icu": C.VISIT_DETAIL["icu"],
}
GENDER = {"M": C.GENDER["male"], "F": C.GENDER["female"]}
TYPE_EHR = C.TYPE_EHR

#: The measured value columns of the hourly table (vitals and labs).
VALUE_COLUMNS = (
    "hr",
    "resp_rate",
    "sbp",
    "dbp",
    "map",
    "spo2",
    "temp",
    "gcs",
    "fixed_pupils",
    "fio2",
    "pao2",
    "paco2",
    "lactate",
    "platelets",
    "inr",
    "d_dimer",
    "fibrinogen",
    "glucose",
    "anc",
    "alc",
    "wbc",
    "creatinine",
    "bilirubin",
    "alt",
)
#: The hourly table's columns, in order (see data_schemas/sepsis_hourly.schema.json).
HOURLY_COLUMNS = (
    ("site", "person_id", "stay_id", "hour", "age_months", "sex")
    + VALUE_COLUMNS
    + (
        "imv",
        "other_respiratory_support",
        "vasoactives",
        "antimicrobial",
        "culture",
        "died",
    )
)

_HOUR_NS = 3_600_000_000_000
_MONTH_NS = int(30.4375 * 24 * _HOUR_NS)  # mean Gregorian month


class HourlyTableError(ValueError):
    """An OMOP table cannot be turned into the hourly table (names table and field)."""


def _ns(col: pd.Series) -> np.ndarray:
    """Datetime column -> int64 ns since the epoch (NaT -> int64 min)."""
    return pd.to_datetime(col).to_numpy(dtype="datetime64[ns]").view(np.int64)


def _f64(col: pd.Series) -> np.ndarray:
    """Numeric column (nullable dtypes included) -> float64 with NaN for missing."""
    return pd.to_numeric(col).astype("float64").to_numpy(np.float64, na_value=np.nan)


def _require(tables: Mapping[str, pd.DataFrame], name: str, cols: tuple[str, ...]):
    if name not in tables:
        raise HourlyTableError(
            f"table '{name}' is missing (needed for the hourly table)"
        )
    df = tables[name]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise HourlyTableError(f"table '{name}' lacks required column(s) {missing}")
    return df


class _Stays:
    """ICU stays sorted by stay_id with their hour offsets into the output rows."""

    def __init__(self, vd: pd.DataFrame):
        vd = vd.sort_values("visit_detail_id", kind="stable")
        self.stay_id = vd["visit_detail_id"].to_numpy(np.int64)
        if len(np.unique(self.stay_id)) != len(self.stay_id):
            raise HourlyTableError("table 'visit_detail': visit_detail_id not unique")
        self.person_id = vd["person_id"].to_numpy(np.int64)
        self.start = _ns(vd["visit_detail_start_datetime"])
        self.end = _ns(vd["visit_detail_end_datetime"])
        nat = np.iinfo(np.int64).min
        bad = (self.start == nat) | (self.end == nat) | (self.end < self.start)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise HourlyTableError(
                f"table 'visit_detail' row visit_detail_id={self.stay_id[i]}: field "
                f"visit_detail_end_datetime must be a datetime >= "
                f"visit_detail_start_datetime ({int(bad.sum())} such rows; load the "
                f"tables with omop.read_tables to exclude them)"
            )
        self.n_hours = np.maximum(1, -(-(self.end - self.start) // _HOUR_NS))
        self.offset = np.concatenate([[0], np.cumsum(self.n_hours)])
        self.n_rows = int(self.offset[-1])

    def locate(self, df: pd.DataFrame, time_col: str) -> tuple[np.ndarray, np.ndarray]:
        """Stay index and ns time of each event row; index -1 = outside any stay."""
        t = _ns(df[time_col])
        idx = np.full(len(df), -1, np.int64)
        if "visit_detail_id" in df.columns:
            vd = _f64(df["visit_detail_id"])
            have = ~np.isnan(vd)
            pos = np.searchsorted(self.stay_id, vd[have].astype(np.int64))
            pos = np.clip(pos, 0, len(self.stay_id) - 1)
            ok = self.stay_id[pos] == vd[have].astype(np.int64)
            idx[np.flatnonzero(have)[ok]] = pos[ok]
        else:
            have = np.zeros(len(df), bool)
        rest = np.flatnonzero(~have)
        if len(rest):  # by person and time: the stay of that person containing t
            pid = df["person_id"].to_numpy(np.int64)[rest]
            order = np.lexsort((self.start, self.person_id))
            keys_p, keys_s = self.person_id[order], self.start[order]
            # last stay of the person starting at or before t
            pos = _searchsorted_pairs(keys_p, keys_s, pid, t[rest])
            ok = pos >= 0
            cand = order[np.where(ok, pos, 0)]
            stop = self.start[cand] + self.n_hours[cand] * _HOUR_NS  # as _events
            ok &= (self.person_id[cand] == pid) & (t[rest] < stop)
            idx[rest[ok]] = cand[ok]
        nat = np.iinfo(np.int64).min
        idx[t == nat] = -1
        return idx, t

    def hour_of(self, idx: np.ndarray, t: np.ndarray) -> np.ndarray:
        return (t - self.start[idx]) // _HOUR_NS


def _searchsorted_pairs(kp, ks, qp, qs):
    """Index of the last key (kp, ks) <= query (qp, qs) lexicographically, -1 if none.

    Keys must be sorted by (kp, ks)."""
    nk = len(kp)
    allp = np.concatenate([kp, qp])
    allt = np.concatenate([ks, qs])
    isq = np.concatenate([np.zeros(nk, np.int8), np.ones(len(qp), np.int8)])
    order = np.lexsort((isq, allt, allp))  # keys before queries at equal times
    mark = np.where(order < nk, order, -1)
    last = np.maximum.accumulate(mark)
    res = np.empty(len(qp), np.int64)
    q = order >= nk
    res[order[q] - nk] = last[q]
    return res


def _events(stays: _Stays, df: pd.DataFrame, time_col: str):
    idx, t = stays.locate(df, time_col)
    keep = idx >= 0
    hour = np.full(len(df), -1, np.int64)
    hour[keep] = stays.hour_of(idx[keep], t[keep])
    keep &= (hour >= 0) & (hour < stays.n_hours[np.maximum(idx, 0)])
    return keep, idx, hour, t


def _point_values(stays, df, time_col, concept_col, concept_to_col, out):
    """Last value in the hour of each (row, column) into ``out`` (n_rows, n_cols)."""
    if df is None or len(df) == 0:
        return
    concept = df[concept_col].to_numpy(np.int64)
    ids = np.array(sorted(concept_to_col), np.int64)
    sel = np.isin(concept, ids)
    df = df.loc[sel]
    if len(df) == 0:
        return
    concept = concept[sel]
    keep, idx, hour, t = _events(stays, df, time_col)
    value = _f64(df["value_as_number"])
    keep &= ~np.isnan(value)
    row = stays.offset[idx[keep]] + hour[keep]
    col = np.array([concept_to_col[c] for c in ids])[
        np.searchsorted(ids, concept[keep])
    ]
    t, value = t[keep], value[keep]
    order = np.lexsort((t, col, row))  # last in the hour = last after sorting on t
    row, col, value = row[order], col[order], value[order]
    last = np.ones(len(row), bool)
    last[:-1] = (row[1:] != row[:-1]) | (col[1:] != col[:-1])
    out[row[last], col[last]] = value[last]


def _interval_hours(stays, df, start_col, end_col, concept_col, concepts):
    """(row, concept) pairs of every stay-hour overlapped by an interval record."""
    concept = df[concept_col].to_numpy(np.int64)
    sel = np.isin(concept, np.array(sorted(concepts), np.int64))
    df = df.loc[sel]
    concept = concept[sel]
    keep, idx, h0, t0 = _events(stays, df, start_col)
    nat = np.iinfo(np.int64).min
    if end_col in df.columns:
        t1 = _ns(df[end_col])
    else:
        t1 = np.full(len(df), nat)
    no_end = t1 == nat
    i = np.maximum(idx, 0)
    h1 = np.where(no_end, h0, -(-(t1 - stays.start[i]) // _HOUR_NS) - 1)
    h1 = np.minimum(np.maximum(h1, h0), stays.n_hours[i] - 1)
    keep &= ~(~no_end & (t1 < t0))  # end before start: ignored
    idx, h0, h1, concept = idx[keep], h0[keep], h1[keep], concept[keep]
    n = h1 - h0 + 1
    rep = np.repeat(np.arange(len(n)), n)
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    row = stays.offset[idx[rep]] + h0[rep] + within
    return row, concept[rep]


def _flag(n_rows, row):
    out = np.zeros(n_rows, np.int64)
    out[row] = 1
    return out


def hourly_table(
    tables: Mapping[str, pd.DataFrame], *, site: str = "site"
) -> pd.DataFrame:
    """One row per ICU stay-hour from OMOP CDM 5.4 tables (``dict`` name -> frame).

    Args:
      tables: ``person``, ``visit_detail`` (required) and any of ``measurement``,
        ``observation``, ``drug_exposure``, ``procedure_occurrence``, ``death``
        (missing tables leave their columns NaN / 0).
      site: value of the ``site`` column (the hospital the tables come from).

    Returns:
      DataFrame with :data:`HOURLY_COLUMNS` sorted by (site, stay_id, hour); units as
      in ``data_schemas/sepsis_hourly.schema.json``; labs are not carried forward.

    Raises:
      HourlyTableError: a required table/column is missing or a stay ends before it
        starts (load through ``omop.read_tables`` to exclude such rows with a report).
    """
    vd = _require(
        tables,
        "visit_detail",
        (
            "visit_detail_id",
            "person_id",
            "visit_detail_concept_id",
            "visit_detail_start_datetime",
            "visit_detail_end_datetime",
        ),
    )
    vd = vd.loc[vd["visit_detail_concept_id"].to_numpy(np.int64) == VISIT["icu"]]
    stays = _Stays(vd)
    n = stays.n_rows
    sidx = np.repeat(np.arange(len(stays.stay_id)), stays.n_hours)
    hour = np.arange(n, dtype=np.int64) - stays.offset[sidx]

    person = _require(tables, "person", ("person_id", "gender_concept_id"))
    person = person.drop_duplicates("person_id").set_index("person_id")
    pp = person.reindex(stays.person_id)
    if "birth_datetime" in pp.columns and pp["birth_datetime"].notna().all():
        birth = _ns(pp["birth_datetime"])
    else:  # year/month/day of birth, mid-month / mid-year when unknown
        cols = [
            c
            for c in ("year_of_birth", "month_of_birth", "day_of_birth")
            if c in pp.columns
        ]
        if "year_of_birth" not in cols:
            raise HourlyTableError(
                "table 'person' lacks birth_datetime and year_of_birth"
            )
        ymd = pd.DataFrame(
            {
                "year": pp["year_of_birth"].to_numpy(),
                "month": (
                    pp["month_of_birth"].fillna(7) if "month_of_birth" in cols else 7
                ),
                "day": pp["day_of_birth"].fillna(1) if "day_of_birth" in cols else 1,
            }
        )
        birth = _ns(pd.to_datetime(ymd, errors="coerce"))
        if "birth_datetime" in pp.columns:
            have = pp["birth_datetime"].notna().to_numpy()
            birth[have] = _ns(pp["birth_datetime"])[have]
    age0 = (stays.start - birth) / _MONTH_NS
    gender = _f64(pp["gender_concept_id"])
    sex = np.where(
        gender == GENDER["M"], "M", np.where(gender == GENDER["F"], "F", None)
    ).astype(object)

    values = np.full((n, len(VALUE_COLUMNS)), np.nan)
    colpos = {c: i for i, c in enumerate(VALUE_COLUMNS)}
    if "measurement" in tables:
        m = _require(
            tables,
            "measurement",
            (
                "person_id",
                "measurement_concept_id",
                "measurement_datetime",
                "value_as_number",
            ),
        )
        _point_values(
            stays,
            m,
            "measurement_datetime",
            "measurement_concept_id",
            {cid: colpos[k] for k, (cid, _, _) in MEASUREMENT.items()},
            values,
        )
    if "observation" in tables:
        o = _require(
            tables,
            "observation",
            (
                "person_id",
                "observation_concept_id",
                "observation_datetime",
                "value_as_number",
            ),
        )
        _point_values(
            stays,
            o,
            "observation_datetime",
            "observation_concept_id",
            {cid: colpos[k] for k, cid in OBSERVATION.items()},
            values,
        )

    vaso = np.zeros(n, np.int64)
    abx = np.zeros(n, np.int64)
    if "drug_exposure" in tables:
        d = _require(
            tables,
            "drug_exposure",
            ("person_id", "drug_concept_id", "drug_exposure_start_datetime"),
        )
        row, concept = _interval_hours(
            stays,
            d,
            "drug_exposure_start_datetime",
            "drug_exposure_end_datetime",
            "drug_concept_id",
            VASOACTIVES,
        )
        key = np.unique(row * 4_000_000_000 + concept)  # distinct (row, drug)
        vaso = np.bincount(key // 4_000_000_000, minlength=n).astype(np.int64)
        row, _ = _interval_hours(
            stays,
            d,
            "drug_exposure_start_datetime",
            "drug_exposure_end_datetime",
            "drug_concept_id",
            ANTIMICROBIALS,
        )
        abx = _flag(n, row)
    imv = np.zeros(n, np.int64)
    ors = np.zeros(n, np.int64)
    culture = np.zeros(n, np.int64)
    if "procedure_occurrence" in tables:
        p = _require(
            tables,
            "procedure_occurrence",
            ("person_id", "procedure_concept_id", "procedure_datetime"),
        )
        for name in ("imv", "other_respiratory_support"):
            row, _ = _interval_hours(
                stays,
                p,
                "procedure_datetime",
                "procedure_end_datetime",
                "procedure_concept_id",
                {PROCEDURE[name]},
            )
            (imv if name == "imv" else ors)[:] = _flag(n, row)
        row, _ = _interval_hours(
            stays,
            p.drop(columns="procedure_end_datetime", errors="ignore"),
            "procedure_datetime",
            "procedure_end_datetime",
            "procedure_concept_id",
            {PROCEDURE["blood_culture"]},
        )
        culture = _flag(n, row)

    died_stay = np.zeros(len(stays.stay_id), np.int64)
    if "death" in tables and len(tables["death"]):
        de = _require(tables, "death", ("person_id", "death_date"))
        tcol = "death_datetime" if "death_datetime" in de.columns else "death_date"
        dt = pd.to_datetime(de[tcol])
        if tcol == "death_datetime":  # fall back on the date where the time is NaT
            dt = dt.fillna(pd.to_datetime(de["death_date"]))
        dd = pd.Series(_ns(dt), index=de["person_id"].to_numpy(np.int64))
        dd = dd[~dd.index.duplicated()]
        td = dd.reindex(stays.person_id).fillna(np.iinfo(np.int64).min)
        td = td.to_numpy(np.int64)
        nat = np.iinfo(np.int64).min
        day = 24 * _HOUR_NS
        date_only = (td != nat) & (td % day == 0)
        lo = np.where(date_only, stays.start - stays.start % day, stays.start)
        died_stay = ((td != nat) & (td >= lo) & (td <= stays.end + _HOUR_NS)).astype(
            np.int64
        )

    out = pd.DataFrame(
        {
            "site": np.full(n, site, dtype=object),
            "person_id": stays.person_id[sidx],
            "stay_id": stays.stay_id[sidx],
            "hour": hour,
            "age_months": age0[sidx] + hour / (_MONTH_NS / _HOUR_NS),
            "sex": sex[sidx],
        }
    )
    vals = pd.DataFrame(values, columns=list(VALUE_COLUMNS))
    out = pd.concat([out, vals], axis=1)
    out["imv"] = imv
    out["other_respiratory_support"] = ors
    out["vasoactives"] = vaso
    out["antimicrobial"] = abx
    out["culture"] = culture
    out["died"] = died_stay[sidx]
    return out
