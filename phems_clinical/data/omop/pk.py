"""Haemophilia PK cohorts through OMOP: NONMEM-style events <-> CDM tables.

Mapping (OMOP CDM 5.4):

* ``person``: one per ``ID`` (``person_source_value`` = ID as text; ``person_id`` =
  ID when all IDs are positive integers, else 1..n); ``gender_concept_id`` from
  ``SEX`` (1 = female 8532, else male 8507); ``birth_datetime`` = time 0 minus
  ``AGE`` years of 365.25 days (so ``AGE`` is the age at time 0).
* ``care_site``: one row named ``site`` (``SITE``).
* ``visit_occurrence``: one outpatient visit (9202) per ``(ID, OCC)``, from its
  first to its last event; ``OCC`` is recovered as the visit's rank.
* ``drug_exposure``: one per dose; start = time 0 + ``TIME``, end = start +
  ``DUR`` (from ``DUR`` or ``AMT/RATE``; bolus: end = start), ``quantity`` = IU,
  ``dose_unit_source_value`` ``[IU]``, ``drug_concept_id`` the local FVIII/FIX
  product concept (ATC B02BD02/B02BD04), ``drug_source_value`` = product.
* ``measurement``: one per factor level (FVIII 3209-4 / FIX 3187-2 concept of
  :data:`~phems_clinical.data.omop.concepts.MEASUREMENT`), unit ``[IU]/dL``. A
  quantified level has ``operator_concept_id`` "=" and ``value_as_number`` = DV. A
  BLQ level follows the CDM convention for censored results ("<5": value 5 with
  operator "<"; OMOP CDM 5.4 documentation, MEASUREMENT.operator_concept_id):
  ``value_as_number`` = LLOQ, operator "<" (4171756), ``value_source_value``
  ``<LLOQ``. The assay and its LLOQ are a property of the local test, so they are
  kept in ``measurement_source_value`` (``FVIII:C|ASSAY=OSA|LLOQ=1.0``): the CDM
  has no field for a quantification limit (``range_low`` is the normal range).
* Covariates (each subject's first non-missing value; they are time-constant for
  the PK models, as in :func:`phems_clinical.data.nonmem.to_cohort`):
  measurement/observation rows at time 0 per
  :data:`~phems_clinical.data.omop.concepts.PK_COVARIATE` (others: observation
  2000000799 with the name in ``observation_source_value``).

Time 0 of a subject is ``start`` (one timestamp, or one per ID). Precision: times
keep microseconds; in DuckDB numbers keep 3 decimals (``NUMERIC`` = DECIMAL(18,3)).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from phems_clinical.data.omop import ddl
from phems_clinical.data.omop.concepts import (
    DRUG,
    GENDER,
    MEASUREMENT,
    OPERATOR,
    PK_COVARIATE,
    PK_COVARIATE_OTHER,
    TYPE_EHR,
    VISIT,
)

__all__ = ["pk_to_omop", "omop_to_pk"]

_YEAR = pd.Timedelta(days=365.25)
_HOUR_US = 3_600_000_000
_NON_COVARIATES = {
    "ID",
    "TIME",
    "AMT",
    "RATE",
    "DUR",
    "DV",
    "MDV",
    "EVID",
    "BLQ",
    "LLOQ",
    "OCC",
    "SITE",
    "ROW",
    "NOTE",
    "DVUNIT",
    "CMT",
    "AGE",
    "SEX",
    "ASSAY",
}
_FACTORS = {"FVIII": ("fviii", "fviii_activity"), "FIX": ("fix", "fix_activity")}


def _factor(factor: str) -> tuple[int, int, str]:
    key = str(factor).upper()
    if key not in _FACTORS:
        raise ValueError(f"factor: {factor!r} is not one of {tuple(_FACTORS)}")
    drug, meas = _FACTORS[key]
    return DRUG[drug], MEASUREMENT[meas], key


def _hours(h) -> pd.TimedeltaIndex:
    us = np.rint(np.asarray(h, dtype="float64") * _HOUR_US).astype("int64")
    return pd.to_timedelta(us, unit="us")


def _num(x: float) -> str:
    return repr(float(x))


def pk_to_omop(
    events: pd.DataFrame,
    *,
    product: str,
    site: str,
    start: pd.Timestamp | str | Mapping = "2024-01-01",
    factor: str = "FVIII",
    care_site_id: int = 1,
    first_ids: Mapping[str, int] | None = None,
) -> dict[str, pd.DataFrame]:
    """NONMEM-style PK events -> OMOP tables (person, care_site, visit_occurrence,
    drug_exposure, measurement, observation).

    Parameters
    ----------
    events : pandas.DataFrame
        Dose (EVID 1) and observation (EVID 0, MDV 0) rows, as made by
        :func:`phems_clinical.pk.simulate.simulate_cohort` or
        ``read_nonmem(...).events``: ``ID, TIME`` (h), ``AMT`` (IU), ``DUR`` (h) or
        ``RATE`` (IU/h), ``DV`` (IU/dL), ``BLQ``, ``LLOQ`` (IU/dL), optional ``OCC``,
        ``EVID``/``MDV``, ``AGE`` (y, required), ``SEX``, ``ASSAY`` (1 OSA/0 CSA)
        and numeric covariates.
    product : str
        Product name, written to ``drug_source_value``.
    site : str
        Hospital name (``care_site.care_site_name``).
    start : timestamp or mapping ID -> timestamp
        Calendar time of ``TIME`` 0 (naive, UTC by convention).
    factor : {'FVIII', 'FIX'}
    care_site_id : int
    first_ids : dict, optional
        First id per table (``visit_occurrence``, ``drug_exposure``,
        ``measurement``, ``observation``) to append to a database that has rows.

    Raises
    ------
    ValueError
        Naming the column/rows: missing ``ID``/``TIME``/``AGE``, rows that are
        neither doses nor observations, or a dose without duration information.
    """
    drug_id, level_id, fname = _factor(factor)
    ev, is_dose, is_obs = _checked_events(events)
    first = {
        "visit_occurrence": 1,
        "drug_exposure": 1,
        "measurement": 1,
        "observation": 1,
        **(first_ids or {}),
    }
    t0_of = _assign_persons(ev, start)
    person, t0_s = _person_table(ev, t0_of, care_site_id)
    care_site = pd.DataFrame(
        {
            "care_site_id": [care_site_id],
            "care_site_name": [str(site)],
            "care_site_source_value": [str(site)[:50]],
        }
    )
    dose = ev[is_dose].copy()
    dur = _dose_durations(dose)
    visit, vid = _visit_table(ev, is_dose, dur, first["visit_occurrence"], care_site_id)
    drug = pd.DataFrame(
        {
            "drug_exposure_id": np.arange(len(dose), dtype="int64")
            + first["drug_exposure"],
            "person_id": dose["_pid"].to_numpy(),
            "drug_concept_id": drug_id,
            "drug_exposure_start_datetime": dose["_t"].to_numpy(),
            "drug_exposure_end_datetime": (
                dose["_t"] + _hours(dur.to_numpy())
            ).to_numpy(),
            "drug_type_concept_id": TYPE_EHR,
            "quantity": dose["AMT"].astype(float).to_numpy(),
            "visit_occurrence_id": vid[is_dose],
            "drug_source_value": str(product)[:50],
            "dose_unit_source_value": "[IU]",
        }
    )
    levels = _level_table(ev[is_obs], vid[is_obs], level_id, fname)
    measurement, observation = _covariate_tables(ev, t0_s, levels, first)
    out = {
        "person": person,
        "care_site": care_site,
        "visit_occurrence": visit,
        "drug_exposure": drug,
        "measurement": measurement,
    }
    if observation is not None:
        out["observation"] = observation
    return out


def _checked_events(
    events: pd.DataFrame,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Upper-case copy of ``events`` and its dose and observation masks; a missing
    ID/TIME/AGE column, a row that is neither, or a missing time, dose or level
    (unless BLQ) is refused naming the rows."""
    ev = events.rename(columns=str.upper).reset_index(drop=True).copy()
    for col in ("ID", "TIME", "AGE"):
        if col not in ev.columns:
            raise ValueError(f"events: column {col} is required")
    evid = (
        ev["EVID"]
        if "EVID" in ev.columns
        else (ev.get("AMT", 0).fillna(0) > 0).astype(int)
    ).astype(int)
    mdv = ev["MDV"].fillna(0).astype(int) if "MDV" in ev.columns else 1 - evid
    is_dose = (evid == 1).to_numpy()
    is_obs = ((evid == 0) & (mdv == 0)).to_numpy()
    other = np.flatnonzero(~(is_dose | is_obs))
    if len(other):
        raise ValueError(
            f"events: rows {other[:10].tolist()} are neither doses "
            "(EVID 1) nor observations (EVID 0, MDV 0); filter them first"
        )
    # A missing value is never written as a number (nor as a NULL level).
    num = {
        c: (
            pd.to_numeric(ev[c], errors="coerce").astype("float64").to_numpy()
            if c in ev.columns
            else np.full(len(ev), np.nan)
        )
        for c in ("TIME", "AMT", "DV", "BLQ")
    }
    for col, bad, what in (
        ("TIME", ~np.isfinite(num["TIME"]), "a time in h"),
        ("AMT", is_dose & ~(num["AMT"] > 0), "a dose > 0 IU"),
        (
            "DV",
            is_obs & ~np.isfinite(num["DV"]) & (num["BLQ"] != 1),
            "a level in IU/dL, or BLQ 1 with LLOQ",
        ),
    ):
        rows = np.flatnonzero(bad)
        if len(rows):
            raise ValueError(
                f"events: column {col} missing or not a number on rows "
                f"{rows[:10].tolist()} (IDs "
                f"{pd.unique(ev['ID'].iloc[rows[:10]]).tolist()}); "
                f"expected {what}"
            )
    return ev, is_dose, is_obs


def _assign_persons(ev: pd.DataFrame, start) -> dict:
    """Add ``_pid`` (the ID when all IDs are positive integers, else 1..n), ``_t``
    (calendar time) and ``_occ`` to ``ev``; return time 0 per person_id."""
    ids = pd.unique(ev["ID"])
    numeric = pd.to_numeric(pd.Series(ids), errors="coerce")
    if numeric.notna().all() and (numeric > 0).all() and (numeric % 1 == 0).all():
        pid_of = dict(zip(ids, numeric.astype("int64"), strict=True))
    else:
        pid_of = {i: k + 1 for k, i in enumerate(ids)}
    ev["_pid"] = ev["ID"].map(pid_of).astype("int64")
    if isinstance(start, Mapping):
        t0_of = {pid_of[i]: pd.Timestamp(start[i]) for i in ids}
    else:
        t0_of = {pid_of[i]: pd.Timestamp(start) for i in ids}
    t0 = ev["_pid"].map(t0_of).astype("datetime64[ns]")
    ev["_t"] = t0 + _hours(ev["TIME"])
    ev["_occ"] = ev["OCC"].fillna(1).astype(int) if "OCC" in ev.columns else 1
    return t0_of


def _subject_value(ev: pd.DataFrame, col: str) -> pd.Series:
    """Each person's first non-missing ``col`` (NaN if none), by ``_pid``."""
    return ev.groupby("_pid", sort=False)[col].agg(
        lambda s: s.dropna().iloc[0] if s.notna().any() else np.nan
    )


def _person_table(
    ev: pd.DataFrame, t0_of: dict, care_site_id: int
) -> tuple[pd.DataFrame, pd.Series]:
    """OMOP person (birth = time 0 minus AGE years of 365.25 days) and time 0 per
    person; a person without AGE is refused."""
    first_row = ev.groupby("_pid", sort=False).first()
    age = _subject_value(ev, "AGE")
    if age.isna().any():
        bad = age.index[age.isna()].tolist()
        raise ValueError(f"events: AGE missing for person(s) {bad}")
    sex = (
        _subject_value(ev, "SEX")
        if "SEX" in ev.columns
        else pd.Series(0, index=age.index)
    )
    pids = age.index.to_numpy()
    t0_s = pd.Series([t0_of[p] for p in pids], index=pids, dtype="datetime64[ns]")
    birth = t0_s - _hours(age.to_numpy() * 8766.0)  # 365.25 d * 24 h
    person = pd.DataFrame(
        {
            "person_id": pids.astype("int64"),
            "gender_concept_id": np.where(
                sex.to_numpy() == 1, GENDER["female"], GENDER["male"]
            ).astype("int64"),
            "birth_datetime": birth.to_numpy(),
            "race_concept_id": 0,
            "ethnicity_concept_id": 0,
            "care_site_id": care_site_id,
            "person_source_value": [str(first_row.loc[p, "ID"])[:50] for p in pids],
            "gender_source_value": np.where(sex.to_numpy() == 1, "F", "M"),
        }
    )
    person["year_of_birth"] = person["birth_datetime"].dt.year.astype("int64")
    person["month_of_birth"] = person["birth_datetime"].dt.month.astype("int64")
    person["day_of_birth"] = person["birth_datetime"].dt.day.astype("int64")
    return person, t0_s


def _dose_durations(dose: pd.DataFrame) -> pd.Series:
    """Infusion duration (h) of each dose: DUR, else AMT/RATE for RATE > 0, else 0
    (bolus); doses with neither column are refused."""
    if "DUR" in dose.columns and dose["DUR"].notna().all():
        dur = dose["DUR"].astype(float)
    elif "RATE" in dose.columns:
        rate = dose["RATE"].astype(float)
        dur = pd.Series(
            np.where(rate > 0, dose["AMT"] / rate.where(rate > 0), 0.0),
            index=dose.index,
        )
        if "DUR" in dose.columns:
            dur = dose["DUR"].astype(float).fillna(dur)
    else:
        raise ValueError("events: doses need DUR (h) or RATE (IU/h)")
    return dur.fillna(0.0)


def _visit_table(
    ev: pd.DataFrame,
    is_dose: np.ndarray,
    dur: pd.Series,
    first_id: int,
    care_site_id: int,
) -> tuple[pd.DataFrame, np.ndarray]:
    """One outpatient visit per (person, OCC), from its first event to the end of
    its last; and the visit id of each event row."""
    ev["_end"] = ev["_t"]
    ev.loc[is_dose, "_end"] = ev.loc[is_dose, "_t"] + _hours(dur.to_numpy())
    vis = (
        ev.groupby(["_pid", "_occ"], sort=True)
        .agg(start=("_t", "min"), end=("_end", "max"))
        .reset_index()
    )
    vis["visit_occurrence_id"] = np.arange(len(vis), dtype="int64") + first_id
    visit = pd.DataFrame(
        {
            "visit_occurrence_id": vis["visit_occurrence_id"],
            "person_id": vis["_pid"].astype("int64"),
            "visit_concept_id": VISIT["outpatient"],
            "visit_start_datetime": vis["start"],
            "visit_end_datetime": vis["end"],
            "visit_type_concept_id": TYPE_EHR,
            "care_site_id": care_site_id,
            "visit_source_value": "OCC " + vis["_occ"].astype(str),
        }
    )
    vid = ev.merge(
        vis[["_pid", "_occ", "visit_occurrence_id"]], on=["_pid", "_occ"], how="left"
    )["visit_occurrence_id"].to_numpy()
    return visit, vid


def _level_table(
    obs: pd.DataFrame, vid: np.ndarray, level_id: int, fname: str
) -> pd.DataFrame:
    """Factor levels as measurement rows: "=" DV, or "<" LLOQ for BLQ; assay and
    LLOQ in measurement_source_value (``FVIII:C|ASSAY=OSA|LLOQ=1.0``)."""
    blq = (
        obs["BLQ"].fillna(0).astype(int).to_numpy() == 1
        if "BLQ" in obs.columns
        else np.zeros(len(obs), bool)
    )
    lloq = (
        obs["LLOQ"].astype(float).to_numpy()
        if "LLOQ" in obs.columns
        else np.full(len(obs), np.nan)
    )
    dv = obs["DV"].astype(float).to_numpy()
    assay = (
        obs["ASSAY"].to_numpy() if "ASSAY" in obs.columns else np.full(len(obs), np.nan)
    )
    src = []
    for a, lq in zip(assay, lloq, strict=True):
        parts = [f"{fname}:C"]
        if pd.notna(a):
            parts.append("ASSAY=" + ("OSA" if int(a) == 1 else "CSA"))
        if pd.notna(lq):
            parts.append("LLOQ=" + _num(lq))
        src.append("|".join(parts))
    value = np.where(blq, lloq, dv)
    return pd.DataFrame(
        {
            "person_id": obs["_pid"].to_numpy(),
            "measurement_concept_id": level_id,
            "measurement_datetime": obs["_t"].to_numpy(),
            "measurement_type_concept_id": TYPE_EHR,
            "operator_concept_id": np.where(blq, OPERATOR["<"], OPERATOR["="]),
            "value_as_number": value,
            "unit_source_value": "[IU]/dL",
            "visit_occurrence_id": vid,
            "measurement_source_value": src,
            "value_source_value": [
                ("<" + _num(v)) if b else _num(v) if pd.notna(v) else None
                for v, b in zip(value, blq, strict=True)
            ],
        }
    )


def _covariate_tables(
    ev: pd.DataFrame, t0_s: pd.Series, levels: pd.DataFrame, first: Mapping[str, int]
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Measurement (levels, then covariates by PK_COVARIATE) and observation
    (other covariates; None if there are none) tables, covariates at time 0."""
    covs = [
        c
        for c in ev.columns
        if c not in _NON_COVARIATES
        and not c.startswith("_")
        and pd.api.types.is_numeric_dtype(ev[c])
    ]
    meas_cov, obs_cov = [], []
    for c in covs:
        v = _subject_value(ev, c)
        v = v[v.notna()]
        if not len(v):
            continue
        table, cid = PK_COVARIATE.get(c, ("observation", PK_COVARIATE_OTHER))
        rows = pd.DataFrame(
            {
                "person_id": v.index.to_numpy().astype("int64"),
                "_t": t0_s[v.index].to_numpy(),
                "value_as_number": v.to_numpy(dtype=float),
                "concept": cid,
                "name": c,
            }
        )
        (meas_cov if table == "measurement" else obs_cov).append(rows)
    meas_parts = [levels]
    if meas_cov:
        mc = pd.concat(meas_cov, ignore_index=True)
        meas_parts.append(
            pd.DataFrame(
                {
                    "person_id": mc["person_id"],
                    "measurement_concept_id": mc["concept"],
                    "measurement_datetime": mc["_t"],
                    "measurement_type_concept_id": TYPE_EHR,
                    "value_as_number": mc["value_as_number"],
                    "measurement_source_value": mc["name"],
                }
            )
        )
    measurement = pd.concat(meas_parts, ignore_index=True)
    measurement.insert(
        0,
        "measurement_id",
        np.arange(len(measurement), dtype="int64") + first["measurement"],
    )
    if not obs_cov:
        return measurement, None
    oc = pd.concat(obs_cov, ignore_index=True)
    observation = pd.DataFrame(
        {
            "observation_id": np.arange(len(oc), dtype="int64") + first["observation"],
            "person_id": oc["person_id"],
            "observation_concept_id": oc["concept"],
            "observation_datetime": oc["_t"],
            "observation_type_concept_id": TYPE_EHR,
            "value_as_number": oc["value_as_number"],
            "observation_source_value": oc["name"],
        }
    )
    return measurement, observation


def _refuse_missing(
    table: str, df: pd.DataFrame, field: str, missing: np.ndarray, what: str
) -> None:
    """ValueError naming the rows' ids when ``field`` is missing (validated tables
    have excluded them already, reason ``missing_value``)."""
    if not missing.any():
        return
    key = ddl.primary_key(table) or "person_id"
    ids = df[key].to_numpy()[missing][:10].tolist() if key in df.columns else []
    raise ValueError(
        f"{table}: {field} is NULL on {int(missing.sum())} row(s) "
        f"({key} {ids}); expected {what}"
    )


def _parse_source(text) -> tuple[float, float]:
    """(ASSAY 1/0/NaN, LLOQ or NaN) from ``FVIII:C|ASSAY=OSA|LLOQ=1.0``."""
    assay, lloq = np.nan, np.nan
    text = (
        ""
        if text is None or (isinstance(text, float) and np.isnan(text))
        else str(text)
    )
    for part in text.split("|"):
        if part.startswith("ASSAY="):
            codes = {"OSA": 1.0, "CSA": 0.0}
            if part[6:] not in codes:
                raise ValueError(
                    f"measurement.measurement_source_value: assay "
                    f"{part[6:]!r:.20}; expected ASSAY=OSA or ASSAY=CSA"
                )
            assay = codes[part[6:]]
        elif part.startswith("LLOQ="):
            try:
                lloq = float(part[5:])
            except ValueError:
                raise ValueError(
                    f"measurement.measurement_source_value: LLOQ "
                    f"{part[5:]!r:.20} is not a number; expected "
                    "LLOQ=<IU/dL>"
                ) from None
    return assay, lloq


def omop_to_pk(
    tables: Mapping[str, pd.DataFrame],
    *,
    factor: str = "FVIII",
    start: pd.Timestamp | str | Mapping | None = None,
) -> pd.DataFrame:
    """OMOP tables -> NONMEM-style events accepted by
    :func:`phems_clinical.data.read_nonmem`.

    Parameters
    ----------
    tables : dict of DataFrame
        ``person``, ``drug_exposure``, ``measurement`` (and optionally
        ``visit_occurrence``, ``care_site``, ``observation``), e.g. from
        :func:`~phems_clinical.data.omop.read_tables`.
    factor : {'FVIII', 'FIX'}
        Which product/level concepts to read.
    start : timestamp or mapping person_source_value -> timestamp, optional
        Calendar time of ``TIME`` 0; default each person's first dose.

    Returns
    -------
    pandas.DataFrame
        ``ID, SITE, TIME, AMT, DUR, DV, MDV, EVID, BLQ, LLOQ, OCC, AGE, SEX`` plus
        ``ASSAY`` and the covariates found, sorted by ID, TIME, doses first. Levels
        of persons without a dose cannot be timed: they are left out and listed
        in ``attrs["exclusions"]`` (``table, row_key, person_id, field, value,
        reason`` as in :class:`~phems_clinical.data.omop.LoadReport`, reason
        ``no_dose_to_time``).

    Raises
    ------
    ValueError
        Naming the table, field and row ids: a NULL level, level time, dose or
        infusion start/end (validated tables have excluded these already).
    """
    drug_id, level_id, _ = _factor(factor)
    person = tables["person"]
    de = tables["drug_exposure"]
    de = de[de["drug_concept_id"] == drug_id]
    me = tables["measurement"]
    lv = me[me["measurement_concept_id"] == level_id]
    src_of = dict(
        zip(
            person["person_id"],
            person["person_source_value"].where(
                person["person_source_value"].notna(), person["person_id"].astype(str)
            )
            if "person_source_value" in person.columns
            else person["person_id"].astype(str),
            strict=True,
        )
    )
    if start is None:
        t0 = de.groupby("person_id")["drug_exposure_start_datetime"].min()
    elif isinstance(start, Mapping):
        t0 = pd.Series(
            {p: pd.Timestamp(start[s]) for p, s in src_of.items() if s in start}
        )
    else:
        t0 = pd.Series(pd.Timestamp(start), index=person["person_id"].to_numpy())
    t0 = t0.astype("datetime64[ns]")
    keep = set(t0.index)

    def rel_h(pid, t):
        dt = pd.to_datetime(t).to_numpy() - pid.map(t0).to_numpy()
        return dt.astype("timedelta64[us]").astype("int64") / _HOUR_US

    de = de[de["person_id"].isin(keep)]
    untimed = lv[~lv["person_id"].isin(keep)]
    lv = lv[lv["person_id"].isin(keep)]
    _refuse_missing(
        "measurement",
        lv,
        "measurement_datetime",
        pd.to_datetime(lv["measurement_datetime"]).isna().to_numpy(),
        "the time of the sample",
    )
    d_start = pd.to_datetime(de["drug_exposure_start_datetime"])
    d_end = pd.to_datetime(de["drug_exposure_end_datetime"])
    _refuse_missing(
        "drug_exposure",
        de,
        "drug_exposure_end_datetime",
        d_end.isna().to_numpy() | d_start.isna().to_numpy(),
        "the start and end of the infusion (end = start for a bolus)",
    )
    _refuse_missing(
        "drug_exposure",
        de,
        "quantity",
        pd.to_numeric(de["quantity"]).isna().to_numpy()
        if "quantity" in de.columns
        else np.ones(len(de), bool),
        "the dose in IU",
    )
    doses = pd.DataFrame(
        {
            "_pid": de["person_id"].to_numpy(),
            "TIME": rel_h(de["person_id"], d_start),
            "AMT": de["quantity"].astype(float).to_numpy(),
            "DUR": (d_end - d_start)
            .to_numpy()
            .astype("timedelta64[us]")
            .astype("int64")
            / _HOUR_US,
            "DV": np.nan,
            "MDV": 1,
            "EVID": 1,
            "BLQ": 0,
            "LLOQ": np.nan,
            "_visit": de["visit_occurrence_id"].to_numpy()
            if "visit_occurrence_id" in de.columns
            else np.nan,
        }
    )
    parsed = [
        _parse_source(s)
        for s in (
            lv["measurement_source_value"]
            if "measurement_source_value" in lv.columns
            else [None] * len(lv)
        )
    ]
    assay = np.array([p[0] for p in parsed], dtype=float)
    lloq = np.array([p[1] for p in parsed], dtype=float)
    op = (
        lv["operator_concept_id"].astype("float64").to_numpy()
        if "operator_concept_id" in lv.columns
        else np.full(len(lv), np.nan)
    )
    blq = op == OPERATOR["<"]
    val = lv["value_as_number"].astype(float).to_numpy()
    _refuse_missing(
        "measurement",
        lv,
        "value_as_number",
        np.isnan(val),
        "the level in IU/dL (for a level below the limit of "
        "quantification: the LLOQ with operator '<')",
    )
    lloq = np.where(blq & np.isnan(lloq), val, lloq)
    obs = pd.DataFrame(
        {
            "_pid": lv["person_id"].to_numpy(),
            "TIME": rel_h(lv["person_id"], lv["measurement_datetime"]),
            "AMT": 0.0,
            "DUR": 0.0,
            "DV": np.where(blq, np.nan, val),
            "MDV": 0,
            "EVID": 0,
            "BLQ": blq.astype(int),
            "LLOQ": lloq,
            "_visit": lv["visit_occurrence_id"].to_numpy()
            if "visit_occurrence_id" in lv.columns
            else np.nan,
            "_assay": assay,
        }
    )
    ev = pd.concat([doses, obs], ignore_index=True)

    # OCC = rank of the visit within the person (by visit start)
    if "visit_occurrence" in tables and len(tables["visit_occurrence"]):
        vo = tables["visit_occurrence"].sort_values(
            ["person_id", "visit_start_datetime", "visit_occurrence_id"]
        )
        rank = vo.groupby("person_id").cumcount() + 1
        occ_of = dict(zip(vo["visit_occurrence_id"], rank, strict=True))
        ev["OCC"] = pd.Series(ev["_visit"]).map(occ_of).fillna(1).astype(int)
    else:
        ev["OCC"] = 1
    site_name = None
    if "care_site" in tables and len(tables["care_site"]):
        cs = dict(
            zip(
                tables["care_site"]["care_site_id"],
                tables["care_site"]["care_site_name"],
                strict=True,
            )
        )
        if "care_site_id" in person.columns:
            site_name = person.set_index("person_id")["care_site_id"].map(cs)
    ev.insert(0, "SITE", ev["_pid"].map(site_name) if site_name is not None else None)

    # covariates
    p = person.set_index("person_id")
    birth = pd.to_datetime(p["birth_datetime"]).astype("datetime64[ns]")
    age_td = (t0 - birth.reindex(t0.index)).to_numpy().astype("timedelta64[us]")
    age = pd.Series(age_td.astype("int64") / (_YEAR.value / 1000), index=t0.index)
    ev["AGE"] = ev["_pid"].map(age)
    ev["SEX"] = ev["_pid"].map((p["gender_concept_id"] == GENDER["female"]).astype(int))
    names = {cid: name for name, (_, cid) in PK_COVARIATE.items()}
    cov_rows = []
    for table, concept_col, src_col in (
        ("measurement", "measurement_concept_id", "measurement_source_value"),
        ("observation", "observation_concept_id", "observation_source_value"),
    ):
        if table not in tables or not len(tables[table]):
            continue
        t = tables[table]
        cid = t[concept_col].to_numpy()
        is_cov = np.isin(cid, list(names) + [PK_COVARIATE_OTHER])
        t = t[is_cov]
        nm = np.where(
            t[concept_col].to_numpy() == PK_COVARIATE_OTHER,
            t[src_col].astype(object).to_numpy() if src_col in t.columns else None,
            t[concept_col].map(names).to_numpy(),
        )
        cov_rows.append(
            pd.DataFrame(
                {
                    "person_id": t["person_id"].to_numpy(),
                    "name": nm,
                    "value": t["value_as_number"].astype(float).to_numpy(),
                }
            )
        )
    if any(obs["_assay"].notna()):
        a = obs.groupby("_pid")["_assay"].first()
        ev["ASSAY"] = ev["_pid"].map(a)
    if cov_rows:
        cr = pd.concat(cov_rows, ignore_index=True)
        cr = cr[cr["name"].notna()]
        wide = cr.groupby(["person_id", "name"])["value"].first().unstack("name")
        order = [n for n in PK_COVARIATE if n in wide.columns] + sorted(
            n for n in wide.columns if n not in PK_COVARIATE
        )
        for n in order:
            ev[n] = ev["_pid"].map(wide[n])
    ev.insert(0, "ID", ev["_pid"].map(src_of))
    numeric_ids = pd.to_numeric(ev["ID"], errors="coerce")
    if len(ev) and numeric_ids.notna().all() and (numeric_ids % 1 == 0).all():
        ev["ID"] = numeric_ids.astype("int64")
    ev = ev.sort_values(
        ["_pid", "TIME", "EVID"], ascending=[True, True, False], kind="stable"
    )
    ev = ev.drop(columns=[c for c in ev.columns if c.startswith("_")])
    ev = ev.reset_index(drop=True)
    ev.attrs["exclusions"] = pd.DataFrame(
        {
            "table": "measurement",
            "row_key": untimed["measurement_id"].to_numpy()
            if "measurement_id" in untimed.columns
            else pd.NA,
            "person_id": untimed["person_id"].to_numpy(),
            "field": "person_id",
            "value": None,
            "reason": "no_dose_to_time",
        }
    )
    return ev
