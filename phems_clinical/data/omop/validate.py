"""Checks on OMOP tables: bad records are EXCLUDED and REPORTED, never dropped silently.

:func:`validate_tables` applies, table by table, the rules below in this order; a row
failing several rules is reported once, under the first (so per-table counts add up:
kept + excluded = input). Reasons:

``null_required_value``
    NULL in a NOT NULL column of the CDM 5.4 DDL.
``duplicate_key``
    Repeated primary key (the first row is kept); for ``death``, a second death of
    the same person.
``unmapped_concept``
    The table's main concept column is 0 ("No matching concept").
``unknown_concept_id``
    A checked concept column (main, gender, ``*_type_concept_id``) holds an id that
    is not in the known concepts (the store's ``concept`` table, else the bundled
    ``data_schemas/omop/concepts.csv``).
``unknown_person`` / ``person_excluded``
    The row's person is absent from ``person``, or was itself excluded.
``event_before_birth``
    Negative age: the event starts before the person's birth.
``end_before_start``
    End datetime before start (visits, visit details, conditions, drugs, procedures).
``event_after_death``
    The event starts later than death + ``death_grace`` (default 24 h, for records
    written after death, e.g. post-mortem labs; the OHDSI Data Quality Dashboard
    check ``plausibleDuringLife`` uses the death date itself: Blacketer et al.,
    JAMIA 2021;28:2251-2257).
``zero_heart_rate_alive``
    Heart rate <= 0 /min more than ``asystole_window`` (1 h) before death, or in a
    patient who did not die.
``missing_value``
    No value where one is needed: a numeric measurement (a concept of
    :data:`BOUNDS` or a PK covariate) or PK covariate observation with NULL
    ``value_as_number``, a factor level with NULL ``measurement_datetime``, a
    factor VIII/IX infusion with NULL ``quantity`` or start or end datetime (a
    missing value never becomes a number).
``implausible_value``
    A measurement outside the bounds of :data:`BOUNDS` (given in the unit of
    :data:`~phems_clinical.data.omop.concepts.UNITS`; rows whose
    ``unit_source_value`` names another unit are not range-checked); a birth year
    outside ``birth_year``; a factor VIII/IX infusion whose ``quantity`` is outside
    ``dose_IU`` (or ``dose_per_kg`` of the person's first plausible weight) or
    whose duration is outside ``infusion_duration_h`` (limits of
    :mod:`phems_clinical.data.plausibility`, shared with the NONMEM reader).

Each reason corresponds to a check of the OHDSI Data Quality Dashboard
(Blacketer et al., JAMIA 2021;28:2251-2257), listed in :data:`DQD_CHECKS`;
:attr:`LoadReport.completeness` counts NULLs per field as its
``measureValueCompleteness`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from phems_clinical.data import plausibility
from phems_clinical.data.omop import ddl
from phems_clinical.data.omop.concepts import (
    DRUG,
    MEASUREMENT,
    PK_COVARIATE,
    PK_COVARIATE_OTHER,
    bundled_concepts,
)

__all__ = [
    "BOUNDS",
    "DQD_CHECKS",
    "Bound",
    "LoadReport",
    "OmopSchemaError",
    "REASONS",
    "derive_columns",
    "validate_tables",
]

REASONS = (
    "null_required_value",
    "duplicate_key",
    "unmapped_concept",
    "unknown_concept_id",
    "unknown_person",
    "person_excluded",
    "event_before_birth",
    "end_before_start",
    "event_after_death",
    "zero_heart_rate_alive",
    "missing_value",
    "implausible_value",
)

#: The OHDSI Data Quality Dashboard check each reason corresponds to (Blacketer
#: et al., JAMIA 2021;28:2251-2257; DQD 2.x check names).
DQD_CHECKS = {
    "null_required_value": "isRequired",
    "duplicate_key": "isPrimaryKey",
    "unmapped_concept": "standardConceptRecordCompleteness",
    "unknown_concept_id": "isStandardValidConcept",
    "unknown_person": "isForeignKey",
    "person_excluded": "isForeignKey",
    "event_before_birth": "plausibleAfterBirth",
    "end_before_start": "plausibleStartBeforeEnd",
    "event_after_death": "plausibleDuringLife",
    "zero_heart_rate_alive": "plausibleValueLow",
    "missing_value": "measureValueCompleteness",
    "implausible_value": "plausibleValueLow/High",
}

#: Factor VIII/IX concentrates (drug_concept_id) whose infusions are checked.
FACTOR_DRUGS = (DRUG["fviii"], DRUG["fix"])
#: Concepts whose rows carry a number (NULL value_as_number: missing_value).
NUMERIC_OBSERVATIONS = (PK_COVARIATE["BGO"][1], PK_COVARIATE_OTHER)


class OmopSchemaError(ValueError):
    """A table is absent or lacks required columns (``table``, ``columns``)."""

    def __init__(self, table: str, columns: Sequence[str], message: str):
        self.table = table
        self.columns = list(columns)
        super().__init__(message)


class Bound(NamedTuple):
    """Physiologically possible range of a measurement (``unit``) with its source."""

    low: float
    high: float
    low_inclusive: bool
    high_inclusive: bool
    unit: str
    reference: str


_MIMIC = (
    "MIMIC-IV mimic-code measurement/vitalsign.sql filters (Johnson et al., "
    "Sci Data 2023;10:1)"
)


def _limit(name: str, unit: str) -> Bound:
    """A bound from a shared plausibility limit (``error`` range, inclusive)."""
    lim = plausibility.limit(name)
    lo, hi = lim.error
    return Bound(
        lo,
        hi,
        True,
        True,
        unit,
        f"data_schemas/plausibility.json {name}: " + lim.source,
    )


#: Bounds per measurement concept id, in the units of ``concepts.UNITS``. They mark
#: values that cannot be real (device/entry errors), not abnormal ones; they are
#: wider than adult cleaning rules because children's rates are higher.
BOUNDS: dict[int, Bound] = {
    MEASUREMENT["hr"]: Bound(
        0,
        350,
        False,
        True,
        "/min",
        "0 = asystole (see zero_heart_rate_alive); > 350 /min "
        "exceeds infant SVT rates; " + _MIMIC + " use 0 < HR < 300 in adults",
    ),
    MEASUREMENT["resp_rate"]: Bound(
        0,
        150,
        True,
        True,
        "/min",
        "apnoea (0) is possible; "
        + _MIMIC
        + " use < 70 in adults, neonates breathe faster",
    ),
    MEASUREMENT["sbp"]: Bound(0, 400, False, False, "mm[Hg]", _MIMIC),
    MEASUREMENT["dbp"]: Bound(0, 300, False, False, "mm[Hg]", _MIMIC),
    MEASUREMENT["map"]: Bound(0, 300, False, False, "mm[Hg]", _MIMIC),
    MEASUREMENT["spo2"]: Bound(
        0, 100, False, True, "%", "a saturation is <= 100 %; " + _MIMIC
    ),
    MEASUREMENT["temp"]: Bound(
        25,
        45,
        True,
        True,
        "Cel",
        "core temperature compatible with life (" + _MIMIC + " use 10-50 Cel)",
    ),
    MEASUREMENT["gcs"]: Bound(
        3,
        15,
        True,
        True,
        "{score}",
        "GCS total is 3-15 (Teasdale & Jennett, Lancet 1974;2:81-84)",
    ),
    MEASUREMENT["fio2"]: Bound(
        0.21, 1.0, True, True, "1", "inspired O2 fraction: room air 0.21 to pure O2 1.0"
    ),
    MEASUREMENT["pao2"]: Bound(
        0,
        800,
        False,
        True,
        "mm[Hg]",
        "alveolar PO2 at FiO2 1.0 at sea level is ~673 mmHg (alveolar gas equation)",
    ),
    MEASUREMENT["paco2"]: Bound(0, 250, False, True, "mm[Hg]", "gross range check"),
    MEASUREMENT["lactate"]: Bound(0, 50, True, True, "mmol/L", "gross range check"),
    MEASUREMENT["platelets"]: Bound(
        0, 5000, True, True, "10*3/uL", "gross range check"
    ),
    MEASUREMENT["inr"]: Bound(0.5, 25, True, True, "{INR}", "gross range check"),
    MEASUREMENT["d_dimer"]: Bound(0, 200, True, True, "mg/L{FEU}", "gross range check"),
    MEASUREMENT["fibrinogen"]: Bound(0, 2000, True, True, "mg/dL", "gross range check"),
    MEASUREMENT["glucose"]: Bound(0, 3000, False, True, "mg/dL", "gross range check"),
    MEASUREMENT["anc"]: Bound(0, 1000, True, True, "10*3/uL", "gross range check"),
    MEASUREMENT["alc"]: Bound(0, 1000, True, True, "10*3/uL", "gross range check"),
    MEASUREMENT["wbc"]: Bound(0, 1000, True, True, "10*3/uL", "gross range check"),
    MEASUREMENT["creatinine"]: Bound(0, 40, False, True, "mg/dL", "gross range check"),
    MEASUREMENT["bilirubin"]: Bound(0, 100, True, True, "mg/dL", "gross range check"),
    MEASUREMENT["alt"]: Bound(0, 50000, True, True, "U/L", "gross range check"),
    MEASUREMENT["weight"]: _limit("weight_kg", "kg"),
    MEASUREMENT["height"]: _limit("height_cm", "cm"),
    MEASUREMENT["fviii_activity"]: _limit("factor_level", "[IU]/dL"),
    MEASUREMENT["fix_activity"]: _limit("factor_level", "[IU]/dL"),
}

#: The table's main concept column ("unmapped_concept" when 0).
MAIN_CONCEPT = {
    "visit_occurrence": "visit_concept_id",
    "visit_detail": "visit_detail_concept_id",
    "condition_occurrence": "condition_concept_id",
    "drug_exposure": "drug_concept_id",
    "measurement": "measurement_concept_id",
    "observation": "observation_concept_id",
    "procedure_occurrence": "procedure_concept_id",
}
EVENT_START = {
    "visit_occurrence": ("visit_start_datetime", "visit_start_date"),
    "visit_detail": ("visit_detail_start_datetime", "visit_detail_start_date"),
    "condition_occurrence": ("condition_start_datetime", "condition_start_date"),
    "drug_exposure": ("drug_exposure_start_datetime", "drug_exposure_start_date"),
    "measurement": ("measurement_datetime", "measurement_date"),
    "observation": ("observation_datetime", "observation_date"),
    "procedure_occurrence": ("procedure_datetime", "procedure_date"),
    "death": ("death_datetime", "death_date"),
}
EVENT_END = {
    "visit_occurrence": ("visit_end_datetime", "visit_end_date"),
    "visit_detail": ("visit_detail_end_datetime", "visit_detail_end_date"),
    "condition_occurrence": ("condition_end_datetime", "condition_end_date"),
    "drug_exposure": ("drug_exposure_end_datetime", "drug_exposure_end_date"),
    "procedure_occurrence": ("procedure_end_datetime", "procedure_end_date"),
}

_EXCL_COLS = ["table", "row_key", "person_id", "field", "value", "reason"]


class LoadReport:
    """What a load kept and excluded.

    Attributes
    ----------
    exclusions : pandas.DataFrame
        One row per excluded record: ``table``, ``row_key`` (the table's primary
        key; for ``death`` the person_id; ``<NA>`` if NULL), ``person_id``,
        ``field`` (column that failed), ``value`` (its value, as text), ``reason``
        (one of :data:`REASONS`).
    n_input, n_kept : dict
        Rows per table before and after exclusion.
    completeness : pandas.DataFrame
        NULLs in the fields the loaders need (NOT NULL in the DDL or
        :data:`~phems_clinical.data.omop.ddl.LOADER_COLUMNS`) of the input rows:
        ``table``, ``field``, ``n_null``, ``n_rows``; only fields with a NULL
        (the Data Quality Dashboard's ``measureValueCompleteness``, as counts).
    """

    def __init__(
        self,
        exclusions: pd.DataFrame,
        n_input: Mapping[str, int],
        n_kept: Mapping[str, int],
        completeness: pd.DataFrame | None = None,
    ):
        self.exclusions = exclusions.reset_index(drop=True)
        self.n_input = dict(n_input)
        self.n_kept = dict(n_kept)
        self.completeness = (
            completeness
            if completeness is not None
            else pd.DataFrame({"table": [], "field": [], "n_null": [], "n_rows": []})
        )

    @classmethod
    def empty(cls, n_input: Mapping[str, int]) -> LoadReport:
        """A report with no exclusion (``n_kept == n_input``)."""
        return cls(
            pd.DataFrame({c: pd.Series(dtype=object) for c in _EXCL_COLS}),
            n_input,
            n_input,
        )

    @property
    def counts(self) -> pd.DataFrame:
        """Excluded rows per (table, reason), column ``n``."""
        if len(self.exclusions) == 0:
            return pd.DataFrame({"table": [], "reason": [], "n": []}).astype(
                {"n": "int64"}
            )
        return (
            self.exclusions.groupby(["table", "reason"])
            .size()
            .rename("n")
            .reset_index()
        )

    def count(self, reason: str, table: str | None = None) -> int:
        """Rows excluded for ``reason`` (in ``table`` if given)."""
        e = self.exclusions
        m = e["reason"] == reason
        if table is not None:
            m &= e["table"] == table
        return int(m.sum())

    @property
    def n_excluded(self) -> dict[str, int]:
        """Excluded rows per table."""
        return {t: self.n_input[t] - self.n_kept[t] for t in self.n_input}

    def to_frame(self) -> pd.DataFrame:
        """The exclusions table (a copy)."""
        return self.exclusions.copy()

    def summary(self) -> str:
        """Human-readable text: per table input/kept/excluded, counts by reason
        (with the Data Quality Dashboard check and the fields) and NULL counts of
        the fields the loaders need. Counts only, never a patient's value."""
        lines = ["OMOP load report"]
        c = self.counts
        e = self.exclusions
        nulls = self.completeness
        for t in self.n_input:
            lines.append(
                f"  {t}: {self.n_input[t]} rows, kept {self.n_kept[t]}, "
                f"excluded {self.n_input[t] - self.n_kept[t]}"
            )
            for _, r in c[c["table"] == t].iterrows():
                sel = e[(e["table"] == t) & (e["reason"] == r["reason"])]
                fields = sel["field"].astype(str).value_counts()
                by = ", ".join(f"{f} {n}" for f, n in fields.items())
                lines.append(
                    f"    {r['reason']}: {r['n']} (DQD "
                    f"{DQD_CHECKS.get(r['reason'], '-')}; {by})"
                )
            for _, r in nulls[nulls["table"] == t].iterrows():
                lines.append(
                    f"    NULL {r['field']}: {int(r['n_null'])} of "
                    f"{int(r['n_rows'])} rows (DQD measureValueCompleteness)"
                )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"LoadReport({sum(self.n_input.values())} rows, "
            f"{len(self.exclusions)} excluded)"
        )


# ------------------------------------------------------------------ helpers


def _times(df: pd.DataFrame, cols: tuple[str, str]) -> tuple[pd.Series, np.ndarray]:
    """Event time (datetime, else date) and a mask of date-only rows."""
    dt_col, d_col = cols
    dt = (
        pd.to_datetime(df[dt_col])
        if dt_col in df.columns
        else pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns]")
    )
    date_only = dt.isna().to_numpy()
    if d_col in df.columns:
        dt = dt.fillna(pd.to_datetime(df[d_col]))
    return dt.astype("datetime64[ns]"), date_only


def _birth(person: pd.DataFrame) -> pd.Series:
    """Birth per person_id: birth_datetime, else year/month/day (missing parts = 1)."""
    y = pd.to_numeric(person["year_of_birth"])
    m = (
        pd.to_numeric(person["month_of_birth"]).fillna(1)
        if "month_of_birth" in person.columns
        else 1
    )
    d = (
        pd.to_numeric(person["day_of_birth"]).fillna(1)
        if "day_of_birth" in person.columns
        else 1
    )
    parts = pd.DataFrame({"year": y, "month": m, "day": d}).astype("float64")
    ymd = pd.to_datetime(parts, errors="coerce")
    if "birth_datetime" in person.columns:
        ymd = pd.to_datetime(person["birth_datetime"]).fillna(ymd)
    return pd.Series(
        ymd.astype("datetime64[ns]").to_numpy(), index=person["person_id"].to_numpy()
    )


class _Rows:
    """Per-table bookkeeping: first failing reason per row."""

    def __init__(self, table: str, df: pd.DataFrame):
        self.table, self.df = table, df
        n = len(df)
        self.reason = np.full(n, None, dtype=object)
        self.field = np.full(n, None, dtype=object)
        self.value = np.full(n, None, dtype=object)

    def flag(self, mask, reason: str, field: str, values=None) -> None:
        mask = np.asarray(mask, dtype=bool) & (self.reason == None)  # noqa: E711
        if not mask.any():
            return
        self.reason[mask] = reason
        self.field[mask] = field
        src = self.df[field] if values is None and field in self.df.columns else values
        if src is not None:
            vals = np.asarray(pd.Series(src, index=self.df.index)[mask].astype(str))
            self.value[mask] = vals

    @property
    def keep(self) -> np.ndarray:
        return self.reason == None  # noqa: E711

    def exclusions(self) -> pd.DataFrame:
        bad = ~self.keep
        pk = ddl.primary_key(self.table) or "person_id"
        na = pd.Series(pd.NA, index=self.df.index)
        key = self.df[pk] if pk in self.df.columns else na
        pid = (
            self.df["person_id"]
            if "person_id" in self.df.columns
            else pd.Series(pd.NA, index=self.df.index)
        )
        return pd.DataFrame(
            {
                "table": self.table,
                "row_key": pd.array(key[bad].to_numpy(), dtype="Int64")
                if pd.api.types.is_numeric_dtype(key)
                else key[bad].to_numpy(),
                "person_id": pd.array(pid[bad].to_numpy(), dtype="Int64")
                if pd.api.types.is_numeric_dtype(pid)
                else pid[bad].to_numpy(),
                "field": self.field[bad],
                "value": self.value[bad],
                "reason": self.reason[bad],
            }
        )


def derive_columns(
    table: str, df: pd.DataFrame, dialect: str = "duckdb"
) -> pd.DataFrame:
    """Fill missing NOT NULL ``*_date`` columns from their ``*_datetime`` twin and
    missing ``year/month/day_of_birth`` from ``birth_datetime`` (CDM redundancy)."""
    add = {}
    for col in ddl.table_columns(table, dialect):
        name = col.name
        if name in df.columns or not col.not_null:
            continue
        twin = name + "time"
        if name.endswith("_date") and twin in df.columns:
            add[name] = pd.to_datetime(df[twin]).dt.normalize()
    if table == "person" and "birth_datetime" in df.columns:
        birth = pd.to_datetime(df["birth_datetime"])
        for name, part in (
            ("year_of_birth", "year"),
            ("month_of_birth", "month"),
            ("day_of_birth", "day"),
        ):
            if name not in df.columns:
                add[name] = getattr(birth.dt, part).astype("Int64")
    return df.assign(**add) if add else df


def _check_columns(table: str, df: pd.DataFrame) -> None:
    need = [c for c in ddl.required_columns(table) if c not in df.columns]
    if need:
        raise OmopSchemaError(
            table,
            need,
            f"table {table}: missing required column(s) "
            f"{need} (NOT NULL in CDM 5.4 or used by the loaders)",
        )


def _common(rows: _Rows, concepts: set[int] | None) -> None:
    table, df = rows.table, rows.df
    for c in ddl.table_columns(table):
        if c.not_null and c.name in df.columns:
            rows.flag(df[c.name].isna(), "null_required_value", c.name)
    pk = ddl.primary_key(table)
    if pk and pk in df.columns:
        rows.flag(df[pk].duplicated(keep="first") & df[pk].notna(), "duplicate_key", pk)
    if table == "death":
        rows.flag(
            df["person_id"].duplicated(keep="first"), "duplicate_key", "person_id"
        )
    main = MAIN_CONCEPT.get(table)
    if main and main in df.columns:
        rows.flag(df[main] == 0, "unmapped_concept", main)
    if concepts is None:
        return
    known = np.fromiter(concepts, dtype="int64")
    checked = [main] if main else []
    checked += [c for c in df.columns if c.endswith("_type_concept_id")]
    if table == "person":
        checked.append("gender_concept_id")
    for col in checked:
        if col not in df.columns:
            continue
        v = pd.to_numeric(df[col])
        ids = v.fillna(0).to_numpy(dtype="int64")
        bad = v.notna() & (v != 0) & ~np.isin(ids, known)
        rows.flag(bad, "unknown_concept_id", col)


def _bounds(
    rows: _Rows,
    bounds: Mapping[int, Bound],
    death_t: pd.Series,
    asystole_window: pd.Timedelta,
) -> None:
    df = rows.df
    if "value_as_number" not in df.columns:
        return
    cid = df["measurement_concept_id"].to_numpy()
    val = pd.to_numeric(df["value_as_number"]).astype("float64").to_numpy()
    numeric = np.isin(
        cid, [*bounds, *(c for t, c in PK_COVARIATE.values() if t == "measurement")]
    )
    rows.flag(numeric & np.isnan(val), "missing_value", "value_as_number")
    levels = np.isin(cid, [MEASUREMENT["fviii_activity"], MEASUREMENT["fix_activity"]])
    rows.flag(
        levels & pd.to_datetime(df["measurement_datetime"]).isna().to_numpy(),
        "missing_value",
        "measurement_datetime",
    )
    if "unit_source_value" in df.columns:
        u = df["unit_source_value"].astype(object)
        no_unit = u.isna().to_numpy()
        unit = u.where(u.notna(), "").astype(str).str.strip().str.lower().to_numpy()
    else:
        no_unit = np.ones(len(df), bool)
        unit = np.full(len(df), "", dtype=object)
    hr = MEASUREMENT["hr"]
    for concept, b in bounds.items():
        sel = (cid == concept) & ~np.isnan(val)
        if not sel.any():
            continue
        accepted = [b.unit.lower(), UNITS_ALIASES.get(b.unit, b.unit).lower()]
        ok_unit = no_unit[sel] | np.isin(unit[sel], accepted)
        idx = np.flatnonzero(sel)[ok_unit]
        v = val[idx]
        if concept == hr:
            zero = v <= 0
            if zero.any():
                t = pd.to_datetime(df["measurement_datetime"].iloc[idx[zero]])
                dth = df["person_id"].iloc[idx[zero]].map(death_t)
                near = (dth.notna() & (t >= dth - asystole_window)).to_numpy()
                m = np.zeros(len(df), bool)
                m[idx[zero][~near]] = True
                rows.flag(m, "zero_heart_rate_alive", "value_as_number")
                # HR 0 just before death is kept: do not range-check those rows
                v_idx = idx[~zero]
                v = val[v_idx]
            else:
                v_idx = idx
        else:
            v_idx = idx
        lo = v < b.low if b.low_inclusive else v <= b.low
        hi = v > b.high if b.high_inclusive else v >= b.high
        m = np.zeros(len(df), bool)
        m[v_idx[lo | hi]] = True
        rows.flag(m, "implausible_value", "value_as_number")


def _numeric_observations(rows: _Rows) -> None:
    """PK covariates kept in ``observation`` need a number."""
    df = rows.df
    if "value_as_number" not in df.columns:
        return
    val = pd.to_numeric(df["value_as_number"]).astype("float64").to_numpy()
    numeric = np.isin(df["observation_concept_id"].to_numpy(), NUMERIC_OBSERVATIONS)
    rows.flag(numeric & np.isnan(val), "missing_value", "value_as_number")


def _outside(name: str, values: np.ndarray) -> np.ndarray:
    """Finite ``values`` outside the ``error`` range of plausibility limit ``name``."""
    lo, hi = plausibility.limit(name).error
    with np.errstate(invalid="ignore"):
        out = np.zeros(len(values), bool)
        if lo is not None:
            out |= values < lo
        if hi is not None:
            out |= values > hi
    return out & np.isfinite(values)


def _birth_years(rows: _Rows) -> None:
    y = pd.to_numeric(rows.df["year_of_birth"]).astype("float64").to_numpy()
    rows.flag(_outside("birth_year", y), "implausible_value", "year_of_birth")


def _weights(tables: Mapping[str, pd.DataFrame]) -> pd.Series:
    """Each person's first plausible body weight (kg) from ``measurement``."""
    me = tables.get("measurement")
    if me is None or not {
        "measurement_concept_id",
        "value_as_number",
        "person_id",
    } <= set(me.columns):
        return pd.Series(dtype="float64")
    w = me[me["measurement_concept_id"] == MEASUREMENT["weight"]]
    v = pd.to_numeric(w["value_as_number"]).astype("float64")
    w = w[v.notna().to_numpy() & ~_outside("weight_kg", v.to_numpy())]
    if "measurement_datetime" in w.columns:
        w = w.sort_values("measurement_datetime", kind="stable")
    return (
        pd.to_numeric(w["value_as_number"])
        .astype("float64")
        .groupby(w["person_id"].to_numpy())
        .first()
    )


def _factor_doses(rows: _Rows, weights: pd.Series) -> None:
    """Factor VIII/IX infusions: a dose and an end are needed, and plausible."""
    df = rows.df
    factor = df["drug_concept_id"].isin(FACTOR_DRUGS).to_numpy()
    if not factor.any():
        return
    q = (
        pd.to_numeric(df["quantity"]).astype("float64").to_numpy()
        if "quantity" in df.columns
        else np.full(len(df), np.nan)
    )
    start, _ = _times(df, EVENT_START["drug_exposure"])
    end = pd.to_datetime(df["drug_exposure_end_datetime"]).astype("datetime64[ns]")
    rows.flag(factor & np.isnan(q), "missing_value", "quantity")
    rows.flag(
        factor & pd.to_datetime(df["drug_exposure_start_datetime"]).isna().to_numpy(),
        "missing_value",
        "drug_exposure_start_datetime",
    )
    rows.flag(
        factor & end.isna().to_numpy(), "missing_value", "drug_exposure_end_datetime"
    )
    w = df["person_id"].map(weights).astype("float64").to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        per_kg = q / w
    rows.flag(
        factor & (_outside("dose_IU", q) | _outside("dose_per_kg", per_kg)),
        "implausible_value",
        "quantity",
    )
    hours = ((end - start) / pd.Timedelta(hours=1)).astype("float64").to_numpy()
    rows.flag(
        factor & _outside("infusion_duration_h", hours),
        "implausible_value",
        "drug_exposure_end_datetime",
        values=end,
    )


def _completeness(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """NULL counts of the fields the loaders need, per table (fields with a NULL)."""
    out = []
    for t, df in tables.items():
        if t in ("concept", "care_site"):
            continue
        for f in ddl.required_columns(t):
            if f in df.columns:
                n = int(df[f].isna().sum())
                if n:
                    out.append({"table": t, "field": f, "n_null": n, "n_rows": len(df)})
    return pd.DataFrame(out, columns=["table", "field", "n_null", "n_rows"])


#: Default grace after death and window of a recorded asystole before death.
DEATH_GRACE = pd.Timedelta(hours=24)
ASYSTOLE_WINDOW = pd.Timedelta(hours=1)

#: Other spellings accepted for the expected unit.
UNITS_ALIASES = {
    "mm[Hg]": "mmHg",
    "Cel": "C",
    "[IU]/dL": "IU/dL",
    "1": "fraction",
    "/min": "bpm",
}


def validate_tables(
    tables: Mapping[str, pd.DataFrame],
    *,
    concepts: Iterable[int] | None = None,
    death_grace: pd.Timedelta = DEATH_GRACE,
    asystole_window: pd.Timedelta = ASYSTOLE_WINDOW,
    bounds: Mapping[int, Bound] | None = None,
) -> tuple[dict[str, pd.DataFrame], LoadReport]:
    """Validate in-memory OMOP tables; return the kept rows and the report.

    Parameters
    ----------
    tables : dict of DataFrame
        Lower-case CDM table names -> rows. ``person`` is required when any table
        with a ``person_id`` is given.
    concepts : iterable of int, optional
        Known concept ids; default: the bundled ``concepts.csv``. Pass ``()`` to
        skip the unknown-concept check.
    death_grace, asystole_window : pandas.Timedelta
        Events up to ``death_grace`` after death are kept; heart rate 0 within
        ``asystole_window`` before death is kept.
    bounds : dict, optional
        Measurement bounds by concept id; default :data:`BOUNDS`.

    Raises
    ------
    OmopSchemaError
        A table misses a required column (named), or ``person`` is missing.
    """
    tables = {
        str(k).lower(): (
            v
            if str(k).lower() in ("concept", "care_site")
            else derive_columns(str(k).lower(), v)
        )
        for k, v in tables.items()
    }
    for t, df in tables.items():
        if t != "concept":
            _check_columns(t, df)
    if "person" not in tables and any(
        t not in ("concept", "care_site") for t in tables
    ):
        raise OmopSchemaError(
            "person",
            [],
            "table person is required to validate "
            "the other tables (births, person ids)",
        )
    if concepts is None:
        known = set(bundled_concepts()["concept_id"].astype(int))
    else:
        known = {int(c) for c in concepts}
    known_or_none = known if known else None
    bounds = BOUNDS if bounds is None else bounds

    out, excl, n_in, n_kept = {}, [], {}, {}
    weights = _weights(tables)

    def finish(t, rows):
        out[t] = rows.df[rows.keep].reset_index(drop=True)
        excl.append(rows.exclusions())
        n_in[t], n_kept[t] = len(rows.df), int(rows.keep.sum())

    birth = pd.Series(dtype="datetime64[ns]")
    kept_persons = all_persons = np.array([], dtype="int64")
    if "person" in tables:
        df = tables["person"].reset_index(drop=True)
        rows = _Rows("person", df)
        _common(rows, known_or_none)
        _birth_years(rows)
        finish("person", rows)
        all_persons = df["person_id"].dropna().to_numpy()
        kept_persons = out["person"]["person_id"].to_numpy()
        birth = _birth(out["person"])

    death_t = pd.Series(dtype="datetime64[ns]")
    order = [t for t in tables if t not in ("person", "concept")]
    order.sort(key=lambda t: t != "death")
    for t in order:
        df = tables[t].reset_index(drop=True)
        rows = _Rows(t, df)
        _common(rows, known_or_none)
        if "person_id" in df.columns:
            pid = df["person_id"]
            rows.flag(~pid.isin(all_persons), "unknown_person", "person_id")
            rows.flag(~pid.isin(kept_persons), "person_excluded", "person_id")
        if t in EVENT_START and "person_id" in df.columns:
            start, date_only = _times(df, EVENT_START[t])
            b = df["person_id"].map(birth)
            b = b.where(~date_only, b.dt.normalize())
            rows.flag(
                (start < b).to_numpy(),
                "event_before_birth",
                EVENT_START[t][0] if not date_only.all() else EVENT_START[t][1],
                values=start,
            )
            if t in EVENT_END:
                end, end_date_only = _times(df, EVENT_END[t])
                coarse = date_only | end_date_only
                s = start.where(~coarse, start.dt.normalize())
                e = end.where(~coarse, end.dt.normalize())
                rows.flag(
                    (e < s).to_numpy(), "end_before_start", EVENT_END[t][0], values=end
                )
            if t != "death" and len(death_t):
                d = df["person_id"].map(death_t)
                rows.flag(
                    (start > d + death_grace).to_numpy(),
                    "event_after_death",
                    EVENT_START[t][0],
                    values=start,
                )
        if t == "measurement":
            _bounds(rows, bounds, death_t, asystole_window)
        elif t == "observation":
            _numeric_observations(rows)
        elif t == "drug_exposure":
            _factor_doses(rows, weights)
        finish(t, rows)
        if t == "death":
            dd = out["death"]
            dt, date_only = _times(dd, EVENT_START["death"])
            # a death known to the day only: the end of that day
            dt = dt.where(~date_only, dt + pd.Timedelta(days=1) - pd.Timedelta(1, "us"))
            death_t = pd.Series(dt.to_numpy(), index=dd["person_id"].to_numpy())
    if "concept" in tables:
        out["concept"] = tables["concept"]
        n_in["concept"] = n_kept["concept"] = len(tables["concept"])
    excl = [e for e in excl if len(e)]
    exclusions = (
        pd.concat(excl, ignore_index=True) if excl else LoadReport.empty({}).exclusions
    )
    return out, LoadReport(exclusions, n_in, n_kept, _completeness(tables))
