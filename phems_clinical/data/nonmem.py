"""Read, check and convert NONMEM-style PK datasets for FVIII/FIX activity.

This module is the only place where pandas meets the PK code: :func:`read_nonmem`
turns a file (or a DataFrame) into a checked, sorted event table, :func:`to_cohort`
turns that table into the padded :class:`~phems_clinical.data.cohort.Cohort` pytree,
and :func:`from_cohort` writes a cohort back as NONMEM-style rows.

Conventions follow the NONMEM user guides (Beal, Sheiner, Boeckmann, Bauer; NONMEM
Users Guide Part V, "Introductory Guide", Icon Development Solutions, 1989-2020):
``EVID`` 0 observation / 1 dose / 2 other; ``MDV`` 1 marks records without an
observation to fit; ``RATE`` -2 means "duration in ``DUR``". Units: time in h,
amounts in IU, levels in IU/dL (= %); IU/mL data are converted (x100).

Nothing is dropped silently. Every data row of the input either

* becomes an event row of :attr:`PKData.events`, or
* is listed in :attr:`PKData.exclusions` with the reason, or
* is the subject of an :class:`Issue`, in which case :class:`DataValidationError`
  is raised listing *all* issues found (not only the first).

Row numbers are 1-based data rows of the file, the header excluded: row 1 is the line
after the header (blank lines are counted, so row ``r`` is line ``r + 1`` of a file
whose header is its first line). Row 0 stands for the dataset as a whole.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import jsonschema
import numpy as np
import pandas as pd

from phems_clinical.data import plausibility
from phems_clinical.data.cohort import Cohort, stack_subjects
from phems_clinical.resources import schemas_dir

__all__ = [
    "DataValidationError",
    "Exclusion",
    "Issue",
    "PKData",
    "PLAUSIBILITY",
    "from_cohort",
    "load_schema",
    "read_nonmem",
    "to_cohort",
]

SCHEMA_FILE = "pk_dataset.schema.json"

#: Tokens read as a missing value ('.' is NONMEM's; the rest are common exports).
_MISSING = frozenset({"", ".", "NA", "N/A", "NAN", "NULL", "NONE"})

#: NONMEM data items and derived columns: never treated as covariates.
_RESERVED = frozenset(
    {
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
        "CMT",
        "OCC",
        "DVUNIT",
        "ADDL",
        "II",
        "SS",
        "C",
        "DATE",
        "DAT1",
        "DAT2",
        "DAT3",
        "L1",
        "L2",
        "PCMT",
        "CALL",
        "CONT",
        "ROW",
        "NOTE",
    }
)
_NUMERIC_ITEMS = (
    "TIME",
    "AMT",
    "RATE",
    "DUR",
    "DV",
    "MDV",
    "EVID",
    "BLQ",
    "LLOQ",
    "CMT",
    "OCC",
    "ADDL",
    "II",
    "SS",
)

#: Covariates described by the schema; always parsed strictly as numbers.
_KNOWN_COVARIATES = {
    "WT": "kg",
    "HT": "cm",
    "AGE": "y",
    "BMI": "kg/m2",
    "LBW": "kg",
    "FFM": "kg",
    "SEX": "0 male / 1 female",
    "BGO": "0/1",
    "VWF": "IU/dL",
    "HCT": "%",
}

_UNITS = {"IU/DL": "IU/dL", "IU/ML": "IU/mL"}

# Unit plausibility thresholds. Factor activity in IU/mL above 5 (= 500 IU/dL) does
# not occur, so a median above 5 means the levels are really IU/dL. Conversely a
# dataset whose every quantified level is below 1.5 IU/dL cannot contain a single
# post-infusion sample (peaks are tens of IU/dL), so those levels are really IU/mL.
_IU_ML_MEDIAN_MAX = 5.0
_IU_DL_MAX_MIN = 1.5

#: Columns checked against :mod:`phems_clinical.data.plausibility` limits (in the
#: column's unit). The JSON Schema carries the same ``error`` bounds for these
#: columns (``tests/data/test_nonmem_properties.py`` checks they agree). DV
#: (``factor_level``), LLOQ (``lloq_IU_dL``) and AMT per kg (``dose_per_kg``) are
#: checked after unit conversion, so the schema cannot hold them.
PLAUSIBILITY = {
    "TIME": "time_h",
    "AMT": "dose_IU",
    "DUR": "infusion_duration_h",
    "AGE": "age_y",
    "WT": "weight_kg",
    "HT": "height_cm",
}

_RATE_DUR_RTOL, _RATE_DUR_ATOL = 0.01, 1.0 / 60.0  # rounding in exported datasets


class Issue(NamedTuple):
    """One problem found in a dataset.

    Attributes
    ----------
    row : int
        1-based data row in the file (header excluded); 0 for the whole dataset.
    id : str or None
        Subject ID of that row, when known.
    column : str or None
        Upper-case column name, when the problem belongs to one column.
    message : str
        What is wrong and what was expected (with units).
    """

    row: int
    id: str | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = f"row {self.row}" if self.row > 0 else "dataset"
        if self.id is not None:
            where += f" (ID {self.id})"
        if self.column:
            where += f", column {self.column}"
        return f"{where}: {self.message}"


class Exclusion(NamedTuple):
    """A data row that was deliberately not used, with the reason.

    Attributes
    ----------
    row : int
        1-based data row in the file (header excluded).
    id : str
        Subject ID of the row ('' when the row had none, e.g. a commented-out line).
    reason : str
        Why the row is not used.
    """

    row: int
    id: str
    reason: str


class DataValidationError(ValueError):
    """A dataset failed validation; ``issues`` lists every problem found.

    ``str(err)`` has one line per issue, e.g. ``row 12 (ID 3), column DV:
    non-numeric value 'abc'; expected a number in IU/dL``.
    """

    def __init__(self, issues: Sequence[Issue], source: str | None = None):
        self.issues = sorted(issues, key=lambda i: (i.row, i.column or "", i.message))
        head = f"{len(self.issues)} problem(s) in PK dataset"
        head += f" {source}" if source else ""
        super().__init__(head + ":\n" + "\n".join(f"  - {i}" for i in self.issues))


class PKData(NamedTuple):
    """A checked PK dataset.

    Attributes
    ----------
    events : pandas.DataFrame
        Usable dose (EVID 1) and observation (EVID 0, MDV 0) rows, sorted by ID then
        TIME (stable, so same-time records keep their file order). Columns: ``ROW``
        (file row), ``ID`` (str), ``TIME`` (h), ``EVID``, ``MDV``, ``AMT`` (IU),
        ``RATE`` (IU/h as given), ``DUR`` (effective infusion duration, h; 0 =
        bolus), ``DV`` (IU/dL after conversion; NaN on doses), ``BLQ`` (0/1),
        ``LLOQ`` (same unit as DV; NaN when unknown), ``OCC`` (>= 1), ``DVUNIT``
        (``'IU/dL'``, or None when ``dv_unit=None``), one column per covariate (row
        values, numbers; ``ASSAY`` coded 1 = OSA, 0 = CSA), any text columns, and
        ``NOTE`` (what the reader derived for that row, '' if nothing).
    exclusions : list of Exclusion
        Rows not used, each with its reason.
    covariates : tuple of str
        Upper-case names of the numeric covariate columns available.
    warnings : tuple of Issue
        Values accepted but outside the ``warn`` range of
        :mod:`phems_clinical.data.plausibility` (e.g. a level above 300 IU/dL),
        each naming the row and column. Callers report them (``phems fit``
        prints them).
    """

    events: pd.DataFrame
    exclusions: list[Exclusion]
    covariates: tuple[str, ...]
    warnings: tuple[Issue, ...] = ()


@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The JSON Schema (draft 2020-12) of one record: ``pk_dataset.schema.json``."""
    with open(schemas_dir() / SCHEMA_FILE, encoding="utf-8") as fh:
        return json.load(fh)


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# --------------------------------------------------------------------------- loading


def _normalise_unit(unit: str | None) -> str | None:
    if unit is None:
        return None
    norm = _UNITS.get(str(unit).strip().upper())
    if norm is None:
        raise ValueError(f"dv_unit must be 'IU/dL', 'IU/mL' or None, not {unit!r}")
    return norm


def _split_lines(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data records and their 1-based data row numbers from a text file.

    The delimiter is sniffed from the header line: comma, tab or semicolon if the
    header has one, otherwise any run of whitespace (NONMEM's own format, as in the
    ``pheno.dta`` example dataset).
    """
    text = path.read_text(encoding="utf-8-sig")
    lines = text.splitlines()
    try:
        h = next(i for i, line in enumerate(lines) if line.strip())
    except StopIteration:
        raise DataValidationError(
            [Issue(0, None, None, "file is empty")], str(path)
        ) from None
    header_line = lines[h]
    delim = next((d for d in (",", "\t", ";") if d in header_line), None)

    def split(line: str) -> list[str]:
        if delim is None:
            return line.split()
        return next(csv.reader([line], delimiter=delim))

    header = split(header_line)
    if header and header[0].strip() in ("#", "@"):
        header = header[1:]  # '# ID TIME ...': the comment mark is not a column
    records, rows = [], []
    for i in range(h + 1, len(lines)):
        if not lines[i].strip():
            continue  # blank lines carry nothing, but keep the numbering
        records.append(split(lines[i]))
        rows.append(i - h)
    return header, records, rows


def _load(source: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, str]:
    """Raw table (object dtype, upper-case columns), its row numbers and a name."""
    if isinstance(source, pd.DataFrame):
        raw = source.copy()
        raw.columns = [str(c) for c in raw.columns]
        name = "<DataFrame>"
        rows = np.arange(1, len(raw) + 1)
        raw = raw.reset_index(drop=True).astype(object)
    else:
        path = Path(source)
        name = str(path)
        header, records, row_list = _split_lines(path)
        issues = [
            Issue(
                r,
                None,
                None,
                f"{len(rec)} fields but the header has {len(header)} columns",
            )
            for rec, r in zip(records, row_list, strict=True)
            if len(rec) > len(header)
        ]
        if issues:
            raise DataValidationError(issues, name)
        # Short records (trailing fields left off) are padded with missing values.
        records = [rec + [""] * (len(header) - len(rec)) for rec in records]
        raw = pd.DataFrame(records, columns=header, dtype=object)
        rows = np.asarray(row_list, dtype=int)

    cols = [c.strip().upper() for c in raw.columns]
    if cols:
        # NONMEM headers are often commented out ('#ID', '@ID') so NM-TRAN skips them.
        cols[0] = cols[0].lstrip("#@").strip()
    dupes = sorted({c for c in cols if cols.count(c) > 1})
    if dupes:
        raise DataValidationError(
            [
                Issue(
                    0,
                    None,
                    c,
                    "column appears more than once (names are case-insensitive)",
                )
                for c in dupes
            ],
            name,
        )
    raw.columns = cols
    return raw, rows, name


def _as_text(values: pd.Series) -> np.ndarray:
    """Stripped strings, '' for missing (None/NaN/NA or a missing token)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values.tolist()):
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            out[i] = ""
        else:
            s = str(v).strip()
            out[i] = "" if s.upper() in _MISSING else s
    return out


def _parse_numeric(values: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numbers from a column: (value or NaN, missing mask, non-numeric mask)."""
    text = _as_text(values)
    missing = text == ""
    num = pd.to_numeric(
        pd.Series(np.where(missing, None, text), dtype=object), errors="coerce"
    ).to_numpy(dtype=float, copy=True)
    bad = ~missing & ~np.isfinite(num)
    num[bad] = np.nan
    return num, missing, bad


def _bad_number(value) -> str:
    """'non-numeric value ...' or, for NaN/inf/overflowing numbers, 'non-finite'."""
    try:
        x = float(str(value).strip())
    except ValueError:
        return f"non-numeric value {value!r:.60}"
    kind = "missing (NaN)" if x != x else "non-finite"
    return f"{kind} value {value!r:.60}"


def _canonical_id(text: str) -> str:
    """'1', '1.0' and ' 1' are the same subject (NONMEM IDs are numbers)."""
    try:
        x = float(text)
    except ValueError:
        return text
    return str(int(x)) if np.isfinite(x) and x == int(x) else text


# --------------------------------------------------------------------------- checks


class _Log:
    """Collects issues.

    A specific check can ``claim`` a (row, column): the generic JSON Schema message
    for that cell is then left out, as is a second schema message for one cell.
    """

    def __init__(self):
        self.issues: list[Issue] = []
        self._claimed: set[tuple[int, str | None]] = set()

    def add(self, row, id_, column, message, *, schema=False, claim=False):
        key = (int(row), column)
        if schema and key in self._claimed:
            return
        if schema or claim:
            self._claimed.add(key)
        self.issues.append(Issue(int(row), id_, column, message))


def _expected(column: str, unit: str | None) -> str:
    dv = f"a number in {unit}" if unit else "a number"
    table = {
        "TIME": "a number in h (>= 0)",
        "AMT": "a number in IU (>= 0)",
        "RATE": "a number in IU/h (>= 0, or -2 for a duration in DUR)",
        "DUR": "a number in h (>= 0)",
        "DV": dv,
        "LLOQ": dv + " (>= 0)",
        "MDV": "0 or 1",
        "EVID": "0, 1 or 2",
        "BLQ": "0 or 1",
        "CMT": "an integer compartment number",
        "OCC": "an integer occasion >= 1",
        "ADDL": "an integer >= 0",
        "II": "a number in h",
        "SS": "0",
    }
    if column in table:
        return table[column]
    if column in _KNOWN_COVARIATES:
        return f"a number in {_KNOWN_COVARIATES[column]}"
    return "a number"


def _schema_issues(instance: dict, row: int, id_: str | None, log: _Log) -> None:
    """Map JSON Schema violations of one record to issues naming the column."""
    props = load_schema()["properties"]
    for err in _validator().iter_errors(instance):
        path = list(err.absolute_path)
        if path:
            col = str(path[0])
            what = props.get(col, {}).get("description", "")
            msg = (
                f"invalid value {err.instance!r} ({err.message}); "
                f"expected {what[:1].lower() + what[1:]}"
                if what
                else err.message
            )
            log.add(row, id_, col, msg, schema=True)
        elif err.validator == "required":
            for col in err.validator_value:
                if col not in instance:
                    log.add(
                        row,
                        id_,
                        col,
                        "required value is missing; expected "
                        + props[col]["description"].lower(),
                        schema=True,
                    )
        elif err.validator == "anyOf":
            log.add(
                row,
                id_,
                "AMT/DV",
                "neither AMT (IU) nor DV (IU/dL) is given; "
                "a record needs at least one of them",
                schema=True,
            )
        else:  # pragma: no cover - the schema has no other record-level keywords
            log.add(row, id_, None, err.message, schema=True)


def _plausible(
    log: _Log,
    warned: list[Issue],
    row: int,
    id_: str | None,
    column: str,
    limit: str,
    value: float,
    shown: str | None = None,
) -> None:
    """Check ``value`` against plausibility ``limit``: an error is an issue (which
    replaces the generic schema message for that cell), a warning goes to
    ``warned``. ``shown`` describes the value as given when it was converted."""
    found = plausibility.check(limit, value)
    if found is None:
        return
    msg = found.message + (f" (from {shown})" if shown else "")
    if found.level == "error":
        log.add(row, id_, column, msg, claim=True)
    else:
        warned.append(Issue(int(row), id_, column, msg))


def _native(x):
    """Python scalars for jsonschema (numpy integers are not JSON integers)."""
    if isinstance(x, np.generic):
        return x.item()
    return x


# --------------------------------------------------------------------------- reader


def read_nonmem(
    source: str | Path | pd.DataFrame,
    *,
    required_covariates: Sequence[str] = (),
    dv_unit: str | None = "IU/dL",
) -> PKData:
    """Read and validate a NONMEM-style FVIII/FIX PK dataset.

    Parameters
    ----------
    source : str, Path or pandas.DataFrame
        A delimited text file (comma, tab, semicolon or whitespace separated, sniffed
        from the header line; a leading ``#``/``@`` on the header is ignored) or a
        DataFrame with one record per row. Column names are case-insensitive.
        ``.``, empty, ``NA`` and ``NaN`` are missing values.
    required_covariates : sequence of str
        Covariates the model needs (case-insensitive). A missing column, or a subject
        without any value, is an issue.
    dv_unit : {'IU/dL', 'IU/mL', None}
        Unit of DV and LLOQ when the file has no ``DVUNIT`` column (the column wins
        when present). IU/mL levels are converted to IU/dL (x100) and units are
        checked for plausibility. ``None`` means "not a factor activity" (e.g. the
        phenobarbital example in mg/L): no conversion and no unit checks.

    Returns
    -------
    PKData
        Sorted event rows, the list of excluded rows with reasons, and the names of
        the available covariates.

    Raises
    ------
    DataValidationError
        With *all* issues found, each naming the row, the column and what was
        expected: non-numeric or negative times/amounts, non-numeric levels,
        decreasing times within a subject, observations before any dose of that
        subject, pre-dose samples listed before a bolus given at the same time,
        exact duplicate records, contradictory units (mixed ``DVUNIT``, levels or
        LLOQs implausible in the declared unit, ``RATE`` disagreeing with ``DUR``),
        unsupported ``EVID`` 3/4, ``ADDL`` or ``SS`` records, missing required
        covariates, a missing ``ID``/``TIME``/``DV`` column, an empty ID, an
        observation to fit (MDV 0) without a DV unless it is BLQ, a level of 0
        without BLQ or LLOQ, values outside the ``error`` range of
        :mod:`phems_clinical.data.plausibility` (DV and LLOQ in IU/dL after
        conversion, AMT in IU and in IU/kg of WT, DUR and AMT/RATE in h, TIME,
        AGE, WT, HT), and any other JSON Schema violation
        (``data_schemas/pk_dataset.schema.json``).
    ValueError
        For an unknown ``dv_unit``.

    Notes
    -----
    Derivations follow NONMEM (Users Guide V): without ``EVID``, a record with
    ``AMT > 0`` is a dose, a record with ``MDV = 1`` is an "other" event (EVID 2)
    and any other record an observation; without ``MDV``, it is 1 for non-observation
    records and for observations with no DV. Infusion duration comes from ``DUR``
    (required with ``RATE = -2``), or ``AMT/RATE`` when ``RATE > 0``; otherwise the
    dose is a bolus. An observation is BLQ if ``BLQ = 1`` or ``DV < LLOQ``; a BLQ
    row with no LLOQ takes its DV as LLOQ when positive. Covariates are time
    constant: ``to_cohort`` uses each subject's first non-missing value.

    Excluded (listed, not errors): commented-out records (first field starting with
    ``#``/``@`` or equal to ``C``, NONMEM ``IGNORE``), EVID 2 records, observation
    records with ``MDV = 1`` (given, or derived when MDV is absent and DV is
    missing), and all rows of subjects with no usable observation (e.g. doses
    only). Every data row is kept, excluded or an error: ``len(events) +
    len(exclusions)`` is the number of non-blank data rows.

    NM-TRAN reads a missing DV ('.') as 0; here an observation to fit (MDV 0)
    without a DV is an error instead, since a missing level is not a level of 0.
    """
    unit_arg = _normalise_unit(dv_unit)
    unit_arg = _normalise_unit(dv_unit)
    raw, rows, name = _load(source)
    _check_required_columns(list(raw.columns), name)
    rec = _Records(
        raw, rows, unit_arg, tuple(str(c).strip().upper() for c in required_covariates)
    )
    # Parsing: comments, IDs, unit, numbers, covariates.
    _mark_comments(rec)
    _subject_ids(rec)
    _file_unit(rec)
    _parse_items(rec)
    _parse_covariates(rec)
    _check_required_covariate_columns(rec)
    # Record types and the NONMEM event rules.
    _event_types(rec)
    _check_event_records(rec)
    _check_missing_levels(rec)
    # Units, BLQ, infusions, plausibility limits, occasions.
    if rec.dvunit_col:
        _check_dvunit_mix(rec)
    if rec.unit is not None:
        _check_levels(rec)
        _check_lloq(rec)
        _convert_to_iu_dl(rec)
    _derive_blq(rec)
    _infusion_durations(rec)
    _check_plausibility(rec)
    _check_amounts(rec)
    _occasions(rec)
    # Record order, what is left out, per-subject covariates, the schema.
    _check_time_order(rec)
    _check_duplicates(rec)
    order = _file_order(rec)
    _check_dose_precedence(rec, order)
    exclusions, keep = _exclusions(rec)
    _check_subject_covariates(rec, order, keep)
    _check_schema(rec)
    if rec.log.issues:
        raise DataValidationError(rec.log.issues, name)

    sel = order[keep[order]]
    events = _events_table(rec, sel)
    _warn_covariate_gaps(rec, sel)
    exclusions.sort(key=lambda e: e.row)
    rec.warned.sort(key=lambda w: (w.row, w.column or ""))
    return PKData(
        events.reset_index(drop=True),
        exclusions,
        tuple(rec.covariates),
        tuple(rec.warned),
    )


# ---------------------------------------------------------------- reader stages
# Each stage reads and fills a _Records (one entry per data row, commented-out rows
# included); checks add issues to rec.log, accepted-but-unusual values go to
# rec.warned and derivations to rec.notes. The stages run in the order of
# read_nonmem; a later stage relies on the fields the earlier ones set.


@dataclass
class _Records:
    """Working state of :func:`read_nonmem`, one array entry per data row."""

    raw: pd.DataFrame  # object dtype, upper-case columns
    rows: np.ndarray  # 1-based data row of each record
    unit_arg: str | None  # normalised ``dv_unit``
    required: tuple[str, ...] = ()  # required covariates, upper case
    log: _Log = field(default_factory=_Log)
    warned: list[Issue] = field(default_factory=list)
    cols: list[str] = field(init=False)
    n: int = field(init=False)
    notes: list[list[str]] = field(init=False)  # what was derived, per record
    # _mark_comments, _subject_ids
    commented: np.ndarray = field(init=False)
    active: np.ndarray = field(init=False)
    ids: np.ndarray = field(init=False)  # canonical ID text, None when missing
    has_id: np.ndarray = field(init=False)
    # _file_unit
    dvunit_col: bool = field(init=False)
    unit_text: np.ndarray = field(init=False)  # DVUNIT as given ('' if none)
    unit_norm: np.ndarray = field(init=False)
    file_units: list[str] = field(init=False)
    unit: str | None = field(init=False)  # unit of DV and LLOQ as given
    unit_source: str = field(init=False)
    # _parse_items, _parse_covariates: numbers, "present and numeric", bad cells
    num: dict[str, np.ndarray] = field(init=False)
    given: dict[str, np.ndarray] = field(init=False)
    bad_cells: set[tuple[int, str]] = field(init=False)
    covariates: list[str] = field(init=False)
    text_cols: list[str] = field(init=False)
    # _event_types (time h, amt IU, dv and lloq in `unit` until converted)
    time: np.ndarray = field(init=False)
    amt: np.ndarray = field(init=False)
    dv: np.ndarray = field(init=False)
    dv_given: np.ndarray = field(init=False)
    blq_col: np.ndarray = field(init=False)
    lloq: np.ndarray = field(init=False)
    evid: np.ndarray = field(init=False)
    evid_given: np.ndarray = field(init=False)
    mdv_in: np.ndarray = field(init=False)
    mdv: np.ndarray = field(init=False)
    dose: np.ndarray = field(init=False)  # usable dose record
    obs_rec: np.ndarray = field(init=False)  # observation record (EVID 0)
    obs: np.ndarray = field(init=False)  # observation to fit (MDV 0)
    # _derive_blq, _infusion_durations, _occasions
    blq: np.ndarray = field(init=False)
    rate: np.ndarray = field(init=False)
    dur: np.ndarray = field(init=False)  # effective infusion duration, h
    occ: np.ndarray = field(init=False)

    def __post_init__(self):
        self.cols = list(self.raw.columns)
        self.n = len(self.raw)
        self.notes = [[] for _ in range(self.n)]

    def issue(self, i, column, message, *, claim=False):
        """An issue on record ``i`` (0-based), naming its row and subject."""
        self.log.add(self.rows[i], self.ids[i], column, message, claim=claim)

    def warn(self, i, column, message):
        """A warning on record ``i`` (0-based), naming its row and subject."""
        self.warned.append(Issue(int(self.rows[i]), self.ids[i], column, message))

    def column(self, col, fill=np.nan):
        """Numbers of ``col`` where given, else ``fill`` (also when absent)."""
        if col not in self.num:
            return np.full(self.n, fill)
        return np.where(self.given[col], self.num[col], fill)

    def given_or_false(self, col):
        return self.given[col] if col in self.given else np.zeros(self.n, bool)


def _check_required_columns(cols: list[str], name: str) -> None:
    """ID, TIME and DV must be columns (NM-TRAN's $INPUT must list DV: without it no
    level could be told from a missing one)."""
    absent = [c for c in ("ID", "TIME", "DV") if c not in cols]
    if absent:
        raise DataValidationError(
            [
                Issue(
                    0,
                    None,
                    c,
                    "required column is missing (columns present: "
                    f"{', '.join(cols) or 'none'})",
                )
                for c in absent
            ],
            name,
        )


def _mark_comments(rec: _Records) -> None:
    """Commented-out records, as NM-TRAN's IGNORE=#, IGNORE=@ and IGNORE=C would do."""
    first = _as_text(rec.raw[rec.cols[0]])
    rec.commented = np.array(
        [f.startswith(("#", "@")) or f == "C" for f in first], dtype=bool
    )
    rec.active = ~rec.commented


def _subject_ids(rec: _Records) -> None:
    """Canonical subject IDs ('1.0' is '1'); a missing ID is an issue."""
    id_text = _as_text(rec.raw["ID"])
    rec.ids = np.array([_canonical_id(t) if t else None for t in id_text], dtype=object)
    for i in np.flatnonzero(rec.active & (rec.ids == None)):  # noqa: E711 - object
        rec.log.add(
            rec.rows[i],
            None,
            "ID",
            "missing subject ID; expected a string or integer identifier",
            claim=True,
        )
    rec.has_id = rec.ids != None  # noqa: E711 - object array


def _file_unit(rec: _Records) -> None:
    """The unit of DV and LLOQ: the first known DVUNIT of an active record, else
    ``dv_unit``."""
    rec.dvunit_col = "DVUNIT" in rec.cols
    rec.unit_text = (
        _as_text(rec.raw["DVUNIT"]) if rec.dvunit_col else np.full(rec.n, "", object)
    )
    rec.unit_norm = np.array(
        [_UNITS.get(u.upper(), u) if u else "" for u in rec.unit_text], dtype=object
    )
    rec.file_units = list(
        dict.fromkeys(
            u
            for u, a in zip(rec.unit_norm, rec.active, strict=True)
            if a and u in _UNITS.values()
        )
    )
    rec.unit = (
        (rec.file_units[0] if rec.file_units else rec.unit_arg)
        if rec.dvunit_col
        else rec.unit_arg
    )
    rec.unit_source = (
        "DVUNIT column" if rec.dvunit_col and rec.file_units else "dv_unit argument"
    )


def _bad_cell(rec: _Records, i: int, col: str) -> None:
    """Record ``i``'s ``col`` is not a finite number."""
    rec.bad_cells.add((i, col))
    rec.issue(
        i,
        col,
        f"{_bad_number(rec.raw[col].iloc[i])}; expected {_expected(col, rec.unit)}",
    )


def _parse_items(rec: _Records) -> None:
    """Numbers of the NONMEM data items present; a non-numeric value is an issue."""
    rec.num, rec.given, rec.bad_cells = {}, {}, set()
    for col in _NUMERIC_ITEMS:
        if col not in rec.cols:
            continue
        vals, missing, bad = _parse_numeric(rec.raw[col])
        rec.num[col], rec.given[col] = vals, ~missing & ~bad
        for i in np.flatnonzero(bad & rec.active):
            _bad_cell(rec, i, col)


def _assay_codes(rec: _Records, col: str) -> np.ndarray:
    """ASSAY coded 1 = one-stage (OSA), 0 = chromogenic (CSA); others are issues."""
    codes = np.full(rec.n, np.nan)
    for i, t in enumerate(_as_text(rec.raw[col])):
        u = t.upper()
        if u in ("OSA", "1", "1.0"):
            codes[i] = 1.0
        elif u in ("CSA", "0", "0.0"):
            codes[i] = 0.0
        elif t and rec.active[i]:
            rec.bad_cells.add((i, col))
            rec.issue(
                i,
                col,
                f"unknown assay {t!r}; expected 'OSA' (one-stage) or "
                "'CSA' (chromogenic), or 1/0",
            )
    return codes


def _parse_covariates(rec: _Records) -> None:
    """Covariates: numeric non-reserved columns.

    A column that is mostly text is a text column (e.g. a comment), unless the
    schema or the caller says it is a covariate, in which case every non-numeric
    value is an issue.
    """
    rec.covariates, rec.text_cols = [], []
    for col in rec.cols:
        if col in _RESERVED:
            continue
        if col == "ASSAY":
            codes = _assay_codes(rec, col)
            rec.num[col], rec.given[col] = codes, np.isfinite(codes)
            rec.covariates.append(col)
            continue
        vals, missing, bad = _parse_numeric(rec.raw[col])
        strict = col in rec.required or col in _KNOWN_COVARIATES
        bad_active = bad & rec.active
        if (
            not strict
            and bad_active.sum() >= (~missing & ~bad & rec.active).sum()
            and bad_active.any()
        ):
            rec.text_cols.append(col)
            continue
        for i in np.flatnonzero(bad_active):
            _bad_cell(rec, i, col)
        rec.num[col], rec.given[col] = vals, ~missing & ~bad
        rec.covariates.append(col)


def _check_required_covariate_columns(rec: _Records) -> None:
    for col in rec.required:
        if col not in rec.cols:
            rec.log.add(
                0,
                None,
                col,
                "required covariate column is missing (columns "
                f"present: {', '.join(rec.cols)})",
            )
        elif col in rec.text_cols or col not in rec.covariates:
            rec.log.add(0, None, col, "required covariate is not a numeric column")


def _event_types(rec: _Records) -> None:
    """EVID and MDV as given, or derived as NONMEM does (Users Guide V).

    Without EVID a record with AMT > 0 is a dose and an MDV 1 record without a dose
    an "other" event (EVID 2); without MDV it is 1 for non-observation records and
    for observations with neither DV nor BLQ.
    """
    n = rec.n
    rec.time = rec.num["TIME"]
    rec.amt = rec.column("AMT", 0.0)
    rec.dv = rec.num["DV"].copy() if "DV" in rec.num else np.full(n, np.nan)
    rec.dv_given = rec.given_or_false("DV")
    rec.blq_col = (
        (rec.column("BLQ", 0.0) == 1) if "BLQ" in rec.num else np.zeros(n, bool)
    )
    rec.lloq = rec.column("LLOQ")
    evid = np.where(rec.amt > 0, 1.0, 0.0)
    rec.evid_given = rec.given_or_false("EVID")
    rec.mdv_in = rec.column("MDV")
    evid = np.where((evid == 0) & (rec.mdv_in == 1), 2.0, evid)
    if "EVID" in rec.num:
        has = rec.given["EVID"]
        for i in np.flatnonzero(~has & rec.active):
            if (i, "EVID") not in rec.bad_cells:
                rec.notes[i].append(f"EVID missing; derived {int(evid[i])}")
        evid = np.where(has, rec.num["EVID"], evid)
    rec.evid = evid
    mdv = np.where((evid != 0) | (~rec.dv_given & ~rec.blq_col), 1.0, 0.0)
    rec.mdv = np.where(np.isfinite(rec.mdv_in), rec.mdv_in, mdv)
    # Rows without an ID are reported already; they are neither doses nor levels.
    rec.dose = rec.active & rec.has_id & (rec.evid == 1)
    rec.obs_rec = rec.active & rec.has_id & (rec.evid == 0)
    rec.obs = rec.obs_rec & (rec.mdv == 0)


def _check_event_records(rec: _Records) -> None:
    """EVID 3/4, doses without an amount, observations with one, MDV 0 on a dose,
    ADDL and SS are refused."""
    num, given, amt = rec.num, rec.given, rec.amt
    for i in np.flatnonzero(rec.active):
        e = rec.evid[i]
        if e in (3, 4):
            rec.issue(
                i,
                "EVID",
                f"EVID {int(e)} (system reset"
                f"{' and dose' if e == 4 else ''}) is not supported; split the "
                "record history into occasions (OCC) instead",
                claim=True,
            )
        elif e == 1 and amt[i] <= 0 and (i, "AMT") not in rec.bad_cells:
            rec.issue(
                i,
                "AMT",
                "dose record (EVID 1) without an amount; expected AMT > 0 IU",
                claim=True,
            )
        elif e == 0 and amt[i] > 0:
            rec.issue(
                i,
                "AMT",
                f"observation record (EVID 0) has AMT {amt[i]:g}; "
                "expected 0 IU on an observation record",
            )
        elif e == 1 and rec.mdv_in[i] == 0:
            rec.issue(
                i,
                "MDV",
                "dose record (AMT > 0 or EVID 1) has MDV 0; expected "
                "MDV 1 (split a dose-and-sample record into a dose record and "
                "an observation record)",
            )
        if "ADDL" in num and given["ADDL"][i] and num["ADDL"][i] > 0:
            rec.issue(
                i,
                "ADDL",
                f"ADDL {num['ADDL'][i]:g} additional doses are not "
                "supported; expected 0 (write each dose as its own record)",
            )
        if "SS" in num and given["SS"][i] and num["SS"][i] != 0:
            rec.issue(
                i,
                "SS",
                "steady-state dosing (SS > 0) is not supported; "
                "expected 0 (give the dose history explicitly)",
                claim=True,
            )


def _check_missing_levels(rec: _Records) -> None:
    """A level to fit (MDV 0) needs a value: NaN becomes a number only for BLQ rows
    (M3, with their LLOQ). NM-TRAN would read '.' as 0, a measured level of 0."""
    unit = rec.unit
    for i in np.flatnonzero(rec.obs & ~rec.dv_given & ~rec.blq_col):
        if (i, "DV") not in rec.bad_cells:
            rec.issue(
                i,
                "DV",
                "observation record (EVID 0, MDV 0) without a value; "
                f"expected a level{' in ' + unit if unit else ''}, or MDV 1 to "
                "leave the record out, or BLQ 1 with LLOQ for a level below the "
                "limit",
                claim=True,
            )


def _check_dvunit_mix(rec: _Records) -> None:
    """One DVUNIT for the whole file."""
    first = rec.file_units[0] if rec.file_units else None
    for i in np.flatnonzero(rec.active):
        u = rec.unit_norm[i]
        if u and u in _UNITS.values() and first and u != first:
            rec.issue(
                i,
                "DVUNIT",
                f"DVUNIT {u!r} differs from {first!r} used "
                "earlier in the file; expected one unit for the whole file",
            )


def _level_unit_suspicion(rec: _Records) -> bool:
    """Levels implausible in the declared unit (IU/mL levels with a median above
    5, or IU/dL levels all below 1.5): an issue on the largest level."""
    unit, dv = rec.unit, rec.dv
    pos = rec.obs & rec.dv_given & ~rec.blq_col & (dv > 0)
    if not pos.any():
        return False
    k = np.flatnonzero(pos)[np.argmax(dv[pos])]
    med = float(np.median(dv[pos]))
    if unit == "IU/mL" and med > _IU_ML_MEDIAN_MAX:
        rec.issue(
            k,
            "DV",
            f"levels look like IU/dL, not IU/mL ({rec.unit_source}): "
            f"median {med:g} and largest {dv[k]:g} IU/mL (= {100 * dv[k]:g} "
            f"IU/dL); expected IU/mL levels below {_IU_ML_MEDIAN_MAX:g}",
        )
        return True
    if unit == "IU/dL" and pos.sum() >= 3 and float(dv[k]) < _IU_DL_MAX_MIN:
        rec.issue(
            k,
            "DV",
            f"levels look like IU/mL, not IU/dL ({rec.unit_source}): "
            f"all {int(pos.sum())} quantified levels are below "
            f"{_IU_DL_MAX_MIN:g} IU/dL (largest {dv[k]:g}); expected levels "
            "in IU/dL, or declare DVUNIT IU/mL",
        )
        return True
    return False


def _check_levels(rec: _Records) -> None:
    """Factor activity levels: not negative, plausible in their unit and in IU/dL,
    and a level of 0 only with BLQ or LLOQ."""
    unit, dv = rec.unit, rec.dv
    quant = rec.obs & rec.dv_given & ~rec.blq_col
    for i in np.flatnonzero(rec.obs & rec.dv_given & (dv < 0)):
        rec.issue(
            i,
            "DV",
            f"negative level {dv[i]:g} {unit}; expected a factor "
            f"activity >= 0 {unit} (log-transformed DV is not supported)",
            claim=True,
        )
    if _level_unit_suspicion(rec):
        return
    factor = 100.0 if unit == "IU/mL" else 1.0
    # Plausible range in IU/dL (after conversion); negatives reported above.
    for i in np.flatnonzero(rec.obs & rec.dv_given & (dv >= 0)):
        _plausible(
            rec.log,
            rec.warned,
            rec.rows[i],
            rec.ids[i],
            "DV",
            "factor_level",
            dv[i] * factor,
            f"DV {dv[i]:g} {unit}" if factor != 1.0 else None,
        )
    # A level of exactly 0 is no measurement: the assay reports "< LLOQ".
    for i in np.flatnonzero(quant & (dv == 0) & ~np.isfinite(rec.lloq)):
        rec.issue(
            i,
            "DV",
            f"level 0 {unit} without BLQ or LLOQ; expected BLQ 1 with "
            "the assay's LLOQ for a level below the limit of quantification, "
            "or the measured level",
            claim=True,
        )


def _check_lloq(rec: _Records) -> None:
    """LLOQ in the plausible range of a factor assay (in IU/dL), and not above
    every quantified level (DV and LLOQ in different units)."""
    unit, dv, lloq = rec.unit, rec.dv, rec.lloq
    factor = 100.0 if unit == "IU/mL" else 1.0
    lo, hi = plausibility.limit("lloq_IU_dL").error
    has_lloq = rec.obs_rec & np.isfinite(lloq) & (lloq >= 0)
    for i in np.flatnonzero(has_lloq):
        q = lloq[i] * factor
        if q > hi or q < lo:
            hint = (
                "LLOQ seems to be in IU/dL while DV is in IU/mL"
                if q > hi
                else "an assay's LLOQ is positive"
                if q == 0
                else "LLOQ seems to be in IU/mL while DV is in IU/dL"
            )
            rec.issue(
                i,
                "LLOQ",
                f"LLOQ {lloq[i]:g} {unit} (= {q:g} IU/dL) is "
                "implausible for a factor assay; expected "
                f"{lo:g} to {hi:g} IU/dL in the unit of DV ({hint})",
            )
    both = rec.obs & rec.dv_given & ~rec.blq_col & has_lloq & (lloq > 0)
    if both.sum() >= 3 and np.all(dv[both] < lloq[both]):
        i = int(np.flatnonzero(both)[0])
        rec.issue(
            i,
            "LLOQ",
            f"every one of {int(both.sum())} quantified levels is "
            "below its LLOQ; DV and LLOQ seem to be in different units "
            f"(expected both in {unit})",
        )


def _convert_to_iu_dl(rec: _Records) -> None:
    """IU/mL levels and LLOQs to IU/dL (x100), noted on each observation record."""
    if rec.unit != "IU/mL":
        return
    rec.dv = rec.dv * 100.0
    rec.lloq = rec.lloq * 100.0
    for i in np.flatnonzero(rec.obs_rec):
        rec.notes[i].append("DV/LLOQ converted from IU/mL to IU/dL (x100)")


def _derive_blq(rec: _Records) -> None:
    """BLQ from the column or DV < LLOQ; a BLQ record needs a LLOQ (its DV is taken
    as the LLOQ when it can be one)."""
    dv, lloq, dv_given, blq_col = rec.dv, rec.lloq, rec.dv_given, rec.blq_col
    unit = rec.unit
    derived = rec.obs & ~blq_col & dv_given & np.isfinite(lloq) & (dv < lloq)
    for i in np.flatnonzero(derived):
        was = " (BLQ was 0)" if "BLQ" in rec.num and rec.given["BLQ"][i] else ""
        rec.notes[i].append(f"BLQ derived: DV {dv[i]:g} < LLOQ {lloq[i]:g}{was}")
        if was:  # the file said "quantified": a contradiction worth saying
            rec.warn(
                i,
                "BLQ",
                f"DV {dv[i]:g} is below LLOQ {lloq[i]:g} but BLQ is "
                "0; fitted as BLQ (M3): mark it BLQ 1, or correct DV or LLOQ",
            )
    rec.blq = blq_col | derived
    lo_q, hi_q = plausibility.limit("lloq_IU_dL").error
    for i in np.flatnonzero(rec.obs & blq_col):
        if np.isfinite(lloq[i]) and lloq[i] > 0:
            if dv_given[i] and dv[i] > lloq[i]:
                rec.issue(
                    i,
                    "BLQ",
                    f"BLQ 1 but DV {dv[i]:g} is above LLOQ "
                    f"{lloq[i]:g}; expected DV <= LLOQ (or missing) on a BLQ "
                    "record",
                )
        elif dv_given[i] and dv[i] > 0 and unit and not (lo_q <= dv[i] <= hi_q):
            # DV cannot be the assay's LLOQ (dv is in IU/dL here)
            rec.issue(
                i,
                "LLOQ",
                f"BLQ 1 without a LLOQ, and DV {dv[i]:g} IU/dL is "
                f"no assay's LLOQ ({lo_q:g} to {hi_q:g} IU/dL); expected LLOQ, "
                "or BLQ 0 for a quantified level",
            )
        elif dv_given[i] and dv[i] > 0:
            lloq[i] = dv[i]
            rec.notes[i].append("LLOQ missing on a BLQ record; DV used as LLOQ")
            rec.warn(
                i,
                "LLOQ",
                f"missing on a BLQ record; DV {dv[i]:g} taken as the "
                "LLOQ (the convention of writing the LLOQ in DV): give LLOQ if "
                "that is not what DV holds",
            )
        else:
            rec.issue(
                i,
                "LLOQ",
                "BLQ record without a LLOQ and without a positive "
                f"DV; expected LLOQ{' in ' + unit if unit else ''} > 0",
            )


def _infusion_durations(rec: _Records) -> None:
    """Infusion duration (h) of each dose: DUR with RATE -2, AMT/RATE with RATE > 0
    (checked against DUR when both are given), else DUR, else 0 (bolus)."""
    rec.rate = rec.column("RATE")
    dur_in = rec.column("DUR")
    rec.dur = np.zeros(rec.n)
    for i in np.flatnonzero(rec.dose):
        r, d = rec.rate[i], dur_in[i]
        if r == -2:
            if np.isfinite(d) and d > 0:
                rec.dur[i] = d
            # (the schema reports RATE=-2 without DUR > 0)
        elif np.isfinite(r) and r > 0:
            rec.dur[i] = rec.amt[i] / r
            if (
                np.isfinite(d)
                and d > 0
                and not np.isclose(
                    rec.dur[i], d, rtol=_RATE_DUR_RTOL, atol=_RATE_DUR_ATOL
                )
            ):
                rec.issue(
                    i,
                    "DUR",
                    f"RATE {r:g} IU/h and DUR {d:g} h disagree: "
                    f"AMT/RATE = {rec.dur[i]:.4g} h; expected DUR = AMT/RATE "
                    "(or give only one of them)",
                )
        elif np.isfinite(d) and d > 0:
            rec.dur[i] = d
            rec.notes[i].append(f"infusion over DUR {d:g} h")


def _check_plausibility(rec: _Records) -> None:
    """Row values against the plausibility limits (``PLAUSIBILITY``; AMT in
    :func:`_check_amounts`), and the infusion duration AMT/RATE. The schema holds
    the same bounds; these messages state the range and replace the schema's."""
    for col, lim in PLAUSIBILITY.items():
        if col not in rec.num or col == "AMT":
            continue
        for i in np.flatnonzero(rec.active & rec.given[col]):
            _plausible(
                rec.log, rec.warned, rec.rows[i], rec.ids[i], col, lim, rec.num[col][i]
            )
    rate = rec.rate
    for i in np.flatnonzero(
        rec.dose & ~rec.given_or_false("DUR") & np.isfinite(rate) & (rate > 0)
    ):
        _plausible(
            rec.log,
            rec.warned,
            rec.rows[i],
            rec.ids[i],
            "RATE",
            "infusion_duration_h",
            rec.dur[i],
            f"AMT/RATE = {rec.amt[i]:g} IU / {rate[i]:g} IU/h",
        )


def _check_amounts(rec: _Records) -> None:
    """AMT per kg where the subject's weight is known and plausible (the row's WT,
    else the subject's first plausible WT), else in IU."""
    if "AMT" not in rec.num:
        return
    amt, ids = rec.amt, rec.ids
    wt = rec.num["WT"] if "WT" in rec.num else np.full(rec.n, np.nan)
    w_lo, w_hi = plausibility.limit("weight_kg").error
    ok_wt = np.isfinite(wt) & (wt >= w_lo) & (wt <= w_hi)
    first_wt: dict[str, float] = {}
    for i in np.flatnonzero(rec.active & rec.has_id & ok_wt):
        first_wt.setdefault(ids[i], float(wt[i]))
    for i in np.flatnonzero(rec.active & rec.given["AMT"]):
        w = wt[i] if ok_wt[i] else first_wt.get(ids[i], np.nan)
        if rec.dose[i] and np.isfinite(w):
            before = len(rec.log.issues)
            _plausible(
                rec.log,
                rec.warned,
                rec.rows[i],
                ids[i],
                "AMT",
                "dose_per_kg",
                amt[i] / w,
                f"AMT {amt[i]:g} IU for WT {w:g} kg",
            )
            if len(rec.log.issues) > before:
                continue
        _plausible(
            rec.log,
            rec.warned,
            rec.rows[i],
            ids[i],
            "AMT",
            "dose_IU",
            rec.num["AMT"][i],
        )


def _occasions(rec: _Records) -> None:
    """OCC as given (a dose or level without one is an issue), else 1."""
    if "OCC" not in rec.num:
        rec.occ = np.ones(rec.n)
        return
    occ = rec.num["OCC"].copy()
    for i in np.flatnonzero((rec.dose | rec.obs) & ~rec.given["OCC"]):
        if (i, "OCC") not in rec.bad_cells:
            rec.issue(i, "OCC", "missing occasion; expected an integer occasion >= 1")
    rec.occ = np.where(np.isfinite(occ), occ, 1.0)


def _check_time_order(rec: _Records) -> None:
    """Times must not decrease within a subject (in file order)."""
    time, ids = rec.time, rec.ids
    last_time: dict[str, tuple[float, int]] = {}
    for i in np.flatnonzero(rec.active):
        if ids[i] is None or not np.isfinite(time[i]):
            continue
        prev = last_time.get(ids[i])
        if prev is not None and time[i] < prev[0]:
            rec.issue(
                i,
                "TIME",
                f"TIME {time[i]:g} h is earlier than TIME "
                f"{prev[0]:g} h on row {prev[1]} of the same subject; expected "
                "non-decreasing times within a subject",
            )
        if prev is None or time[i] >= prev[0]:
            last_time[ids[i]] = (float(time[i]), int(rec.rows[i]))


def _check_duplicates(rec: _Records) -> None:
    """No two records with the same ID, TIME, EVID, AMT and DV."""
    seen: dict[tuple, int] = {}
    for i in np.flatnonzero(rec.active):
        key = (
            rec.ids[i],
            _key(rec.time[i]),
            _key(rec.evid[i]),
            _key(rec.amt[i]),
            _key(rec.dv[i] if rec.dv_given[i] else np.nan),
        )
        if key in seen:
            rec.issue(
                i,
                "TIME",
                f"exact duplicate of row {seen[key]} (same ID, TIME, "
                "EVID, AMT and DV); expected each record once",
            )
        else:
            seen[key] = int(rec.rows[i])


def _file_order(rec: _Records) -> np.ndarray:
    """Active records sorted by ID, then TIME, then file row (stable)."""
    order = np.lexsort(
        (
            rec.rows,
            np.where(np.isfinite(rec.time), rec.time, np.inf),
            _id_sort_key(rec.ids),
        )
    )
    return order[rec.active[order]]


def _check_dose_precedence(rec: _Records, order: np.ndarray) -> None:
    """Each level must follow a dose of its subject, and not be listed before a bolus
    given at the same time (a pre-dose sample)."""
    ids, time = rec.ids, rec.time
    doses_seen: dict[str, int] = {}
    bolus_at: dict[tuple[str, float], list[int]] = {}
    for i in np.flatnonzero(rec.dose):
        if rec.dur[i] == 0 and ids[i] is not None:
            bolus_at.setdefault((ids[i], float(time[i])), []).append(int(rec.rows[i]))
    for i in order:
        if ids[i] is None:
            continue
        if rec.dose[i]:
            doses_seen[ids[i]] = doses_seen.get(ids[i], 0) + 1
        elif rec.obs[i] and time[i] >= 0:  # negative times are reported already
            t = time[i]
            if doses_seen.get(ids[i], 0) == 0:
                rec.issue(
                    i,
                    "TIME",
                    f"observation at TIME {t:g} h comes before any "
                    "dose of this subject (a pre-dose or baseline level); "
                    "expected a dose record earlier. NONMEM would predict 0 "
                    "here: remove the row, set MDV 1, or subtract the baseline",
                )
            elif any(r > rec.rows[i] for r in bolus_at.get((ids[i], float(t)), [])):
                rec.issue(
                    i,
                    "TIME",
                    f"observation at TIME {t:g} h is listed before a "
                    "bolus dose at the same TIME (a pre-dose sample), but levels "
                    "are computed after all doses given at or before the "
                    "sampling time; expected the real, earlier sampling time",
                )


def _exclusions(rec: _Records) -> tuple[list[Exclusion], np.ndarray]:
    """Rows left out with the reason, and the mask of records kept."""
    ids, rows = rec.ids, rec.rows
    exclusions: list[Exclusion] = []
    for i in np.flatnonzero(rec.commented):
        exclusions.append(
            Exclusion(
                int(rows[i]),
                ids[i] or "",
                "commented-out "
                "record (first field starts with '#'/'@' or is "
                "'C'; NONMEM IGNORE)",
            )
        )
    for i in np.flatnonzero(rec.active & (rec.evid == 2)):
        why = (
            "EVID 2 (other-type event)"
            if rec.evid_given[i]
            else "MDV 1 record without a dose (NONMEM EVID 2, other-type event)"
        )
        exclusions.append(
            Exclusion(
                int(rows[i]), ids[i] or "", why + ": no dose or observation to use"
            )
        )
    for i in np.flatnonzero(rec.obs_rec & (rec.mdv == 1)):
        why = (
            "observation record with MDV 1"
            if rec.mdv_in[i] == 1
            else "observation record without DV (missing value)"
        )
        exclusions.append(
            Exclusion(int(rows[i]), ids[i] or "", why + ": not used in the fit")
        )
    subj_obs = {ids[i] for i in np.flatnonzero(rec.obs)}
    dropped_subject = rec.dose & np.array([x not in subj_obs for x in ids], dtype=bool)
    for i in np.flatnonzero(dropped_subject):
        exclusions.append(
            Exclusion(
                int(rows[i]),
                ids[i] or "",
                "subject has doses but no usable observation: subject excluded",
            )
        )
    return exclusions, (rec.dose & ~dropped_subject) | rec.obs


def _check_subject_covariates(
    rec: _Records, order: np.ndarray, keep: np.ndarray
) -> None:
    """A required covariate needs a value for each kept subject; a covariate that
    varies within a subject is noted (the first value is used, as in to_cohort)."""
    ids, rows = rec.ids, rec.rows
    subj_rows: dict[str, list[int]] = {}
    for i in order:
        if ids[i] is not None:
            subj_rows.setdefault(ids[i], []).append(int(i))
    kept_subjects = list(dict.fromkeys(ids[i] for i in order if keep[i]))
    for s in kept_subjects:
        # Only the rows that reach the cohort count, as in to_cohort.
        idx = [j for j in subj_rows[s] if keep[j]]
        for col in rec.covariates:
            vals = rec.num[col][idx]
            ok = np.isfinite(vals)
            if not ok.any():
                if col in rec.required:
                    listed = ", ".join(str(rows[j]) for j in idx[:12])
                    listed = ("rows " if len(idx) > 1 else "row ") + listed
                    listed += ", ..." if len(idx) > 12 else ""
                    rec.log.add(
                        rows[idx[0]],
                        s,
                        col,
                        f"required covariate {col} has "
                        f"no value for this subject ({listed}); expected "
                        f"{_expected(col, rec.unit)}",
                    )
                continue
            uniq = np.unique(vals[ok])
            if len(uniq) > 1:
                rec.notes[idx[0]].append(
                    f"{col} varies within subject "
                    f"({uniq.min():g} to {uniq.max():g}); first "
                    "value used"
                )


def _schema_record(rec: _Records, i: int) -> dict:
    """Record ``i`` as a JSON instance of ``pk_dataset.schema.json``."""
    out: dict = {}
    if rec.ids[i] is not None:
        out["ID"] = int(rec.ids[i]) if rec.ids[i].lstrip("-").isdigit() else rec.ids[i]
    for col, vals in rec.num.items():
        if (i, col) in rec.bad_cells:
            continue
        if rec.given[col][i]:
            out[col] = _native(vals[i])
        elif col == "AMT":
            out[col] = 0.0  # NONMEM reads a missing AMT ('.') as 0
    if rec.unit_text[i]:
        out["DVUNIT"] = rec.unit_norm[i]
    return out


def _check_schema(rec: _Records) -> None:
    """Each active record against the JSON Schema (issues the specific checks
    claimed are left out)."""
    for i in np.flatnonzero(rec.active):
        instance = _schema_record(rec, i)
        if "TIME" not in instance and (i, "TIME") not in rec.bad_cells:
            # Say "missing TIME" rather than the schema's generic message.
            rec.issue(
                i, "TIME", "missing time; expected a number in h (>= 0)", claim=True
            )
        _schema_issues(instance, int(rec.rows[i]), rec.ids[i], rec.log)


def _events_table(rec: _Records, sel: np.ndarray) -> pd.DataFrame:
    """The event rows ``sel`` (in order) as :attr:`PKData.events`."""
    obs = rec.obs[sel]
    data = {
        "ROW": rec.rows[sel].astype(int),
        "ID": pd.Series(rec.ids[sel], dtype=object),
        "TIME": rec.time[sel],
        "EVID": rec.evid[sel].astype(int),
        "MDV": rec.mdv[sel].astype(int),
        "AMT": rec.amt[sel],
        "RATE": rec.rate[sel],
        "DUR": rec.dur[sel],
        "DV": np.where(obs, rec.dv[sel], np.nan),
        "BLQ": (rec.blq[sel] & obs).astype(int),
        "LLOQ": np.where(obs, rec.lloq[sel], np.nan),
        "OCC": rec.occ[sel].astype(int),
        "DVUNIT": pd.Series(["IU/dL" if rec.unit else None] * len(sel), dtype=object),
    }
    if "CMT" in rec.num:
        data["CMT"] = rec.num["CMT"][sel]
    events = pd.DataFrame(data)
    for col in rec.covariates:
        events[col] = rec.num[col][sel]
    for col in rec.text_cols:
        events[col] = pd.Series(_as_text(rec.raw[col])[sel], dtype=object)
    events["NOTE"] = pd.Series(["; ".join(rec.notes[i]) for i in sel], dtype=object)
    return events


def _warn_covariate_gaps(rec: _Records, sel: np.ndarray) -> None:
    """A required covariate missing on some of a subject's records: the subject's
    first value is used (covariates are constant in time, to_cohort); say so."""
    for col in rec.required:
        gap = ~rec.given[col][sel] if col in rec.given else np.zeros(0, bool)
        if gap.any():
            where = ", ".join(str(int(r)) for r in rec.rows[sel][gap][:5])
            more = " ..." if gap.sum() > 5 else ""
            rec.warned.append(
                Issue(
                    0,
                    None,
                    col,
                    f"missing on {int(gap.sum())} "
                    f"record(s) (rows {where}{more}); each subject's "
                    "first non-missing value is used (covariates are "
                    "constant in time)",
                )
            )


def _key(x: float):
    """Hashable key treating NaN as equal to NaN (for duplicate detection)."""
    return None if not np.isfinite(x) else float(x)


def _id_sort_key(ids: np.ndarray) -> np.ndarray:
    """Numeric order when every ID is a number (1, 2, 10), else text order."""
    present = [x for x in ids if x is not None]
    try:
        [float(x) for x in present]
    except ValueError:
        return np.array(["" if x is None else x for x in ids], dtype=object)
    return np.array([np.inf if x is None else float(x) for x in ids])


# ------------------------------------------------------------------- conversions


def to_cohort(data: PKData, covariates: Sequence[str]) -> tuple[Cohort, list[str]]:
    """Pad a checked dataset into a :class:`Cohort` pytree.

    Parameters
    ----------
    data : PKData
        Output of :func:`read_nonmem`.
    covariates : sequence of str
        Covariate names (case-insensitive) in the order the model expects them in
        ``Cohort.covariates``. Each subject's value is its first non-missing one
        (covariates are time-constant here). ``ASSAY`` is coded 1 = OSA, 0 = CSA.

    Returns
    -------
    cohort : Cohort
        Batched arrays; times are h since each subject's first record (its first
        dose), levels IU/dL (or the unit read with ``dv_unit=None``), ``dose_occ``
        and ``obs_occ`` are ``OCC - 1``. ``obs_lloq`` is the LLOQ (0 when unknown on
        a quantified sample); ``obs_dv`` of a BLQ sample is its DV, 0 if missing.
    ids : list of str
        Subject IDs, in the order of the cohort's leading axis.

    Raises
    ------
    DataValidationError
        If a covariate column is absent or non-numeric, a subject has no value for
        a covariate, or a BLQ observation has no positive LLOQ.
    """
    ev = data.events
    names = [str(c).strip().upper() for c in covariates]
    issues: list[Issue] = []
    for c in names:
        if c not in ev.columns:
            issues.append(
                Issue(
                    0,
                    None,
                    c,
                    "covariate column is not in the dataset "
                    f"(available: {', '.join(data.covariates) or 'none'})",
                )
            )
        elif c not in data.covariates:
            issues.append(Issue(0, None, c, "covariate column is not numeric"))
    if issues:
        raise DataValidationError(issues)

    subjects, ids = [], []
    for sid, g in ev.groupby("ID", sort=False):
        d = g[g["EVID"] == 1]
        o = g[g["EVID"] == 0]
        t0 = float(g["TIME"].min())
        cov = []
        for c in names:
            v = pd.to_numeric(g[c], errors="coerce").dropna()
            if v.empty:
                issues.append(
                    Issue(
                        int(g["ROW"].iloc[0]),
                        str(sid),
                        c,
                        "covariate has no value for this subject; expected a number",
                    )
                )
                cov.append(np.nan)
            else:
                cov.append(float(v.iloc[0]))
        blq = o["BLQ"].to_numpy(dtype=int) == 1
        lloq = o["LLOQ"].to_numpy(dtype=float)
        for r, b, q in zip(o["ROW"], blq, lloq, strict=True):
            if b and not (np.isfinite(q) and q > 0):
                issues.append(
                    Issue(
                        int(r),
                        str(sid),
                        "LLOQ",
                        "BLQ observation without a positive LLOQ; expected LLOQ > 0",
                    )
                )
        dvs = o["DV"].to_numpy(dtype=float)
        for r, b, v in zip(o["ROW"], blq, dvs, strict=True):
            if not b and not np.isfinite(v):
                issues.append(
                    Issue(
                        int(r),
                        str(sid),
                        "DV",
                        "observation without a "
                        "value that is not BLQ; expected a level, or "
                        "BLQ 1 with its LLOQ",
                    )
                )
        subjects.append(
            {
                "dose_time": d["TIME"].to_numpy(float) - t0,
                "dose_amt": d["AMT"].to_numpy(float),
                "dose_dur": d["DUR"].to_numpy(float),
                "dose_occ": d["OCC"].to_numpy(int) - 1,
                "obs_time": o["TIME"].to_numpy(float) - t0,
                # Only BLQ levels can be missing here (checked above); the M3
                # likelihood ignores their value, and 0 keeps NaN out of the arrays (a
                # NaN times zero weight would still poison gradients).
                "obs_dv": np.where(np.isfinite(dvs), dvs, 0.0),
                "obs_blq": blq,
                "obs_lloq": np.where(np.isfinite(lloq), lloq, 0.0),
                "obs_occ": o["OCC"].to_numpy(int) - 1,
                "covariates": np.asarray(cov, dtype=float),
            }
        )
        ids.append(str(sid))
    if issues:
        raise DataValidationError(issues)
    if not subjects:
        raise DataValidationError(
            [Issue(0, None, None, "no subject with both doses and observations")]
        )
    return stack_subjects(subjects), ids


def from_cohort(
    cohort: Cohort,
    ids: Sequence[str],
    covariate_names: Sequence[str],
    *,
    dv_unit: str | None = "IU/dL",
) -> pd.DataFrame:
    """Write a cohort back as NONMEM-style rows (the inverse of :func:`to_cohort`).

    Parameters
    ----------
    cohort : Cohort
        Batched (or single-subject) cohort.
    ids : sequence of str
        Subject IDs, one per subject.
    covariate_names : sequence of str
        Names of the columns of ``cohort.covariates``.
    dv_unit : {'IU/dL', None}
        Written to the ``DVUNIT`` column; ``None`` (levels not in IU/dL, as read with
        ``read_nonmem(..., dv_unit=None)``) leaves the column out.

    Returns
    -------
    pandas.DataFrame
        Columns ``ID, TIME, EVID, MDV, AMT, RATE, DUR, DV, BLQ, LLOQ, OCC, DVUNIT``
        (unless ``dv_unit=None``) and the covariates, sorted by subject then time,
        doses before observations at the same time (the PK engine counts a dose
        given at the sampling time). Infusions are written as ``RATE = -2`` with
        ``DUR``; padding is dropped. Times are relative to each subject's first
        record, levels IU/dL.
    """
    arrays = {k: np.asarray(v) for k, v in cohort._asdict().items()}
    if arrays["obs_time"].ndim == 1:
        arrays = {k: v[None] for k, v in arrays.items()}
    n_subj = arrays["obs_time"].shape[0]
    if len(ids) != n_subj:
        raise ValueError(f"{len(ids)} ids for a cohort of {n_subj} subjects")
    names = [str(c).upper() for c in covariate_names]
    if len(names) != arrays["covariates"].shape[-1]:
        raise ValueError(
            f"{len(names)} covariate names for "
            f"{arrays['covariates'].shape[-1]} covariate columns"
        )
    out = []
    for s, sid in enumerate(ids):
        cov = dict(zip(names, arrays["covariates"][s].tolist(), strict=True))
        real = arrays["dose_amt"][s] > 0
        dur = arrays["dose_dur"][s][real]
        doses = pd.DataFrame(
            {
                "ID": str(sid),
                "TIME": arrays["dose_time"][s][real],
                "EVID": 1,
                "MDV": 1,
                "AMT": arrays["dose_amt"][s][real],
                "RATE": np.where(dur > 0, -2.0, 0.0),
                "DUR": dur,
                "DV": np.nan,
                "BLQ": 0,
                "LLOQ": np.nan,
                "OCC": arrays["dose_occ"][s][real] + 1,
            }
        )
        m = arrays["obs_mask"][s]
        lloq = arrays["obs_lloq"][s][m]
        obs = pd.DataFrame(
            {
                "ID": str(sid),
                "TIME": arrays["obs_time"][s][m],
                "EVID": 0,
                "MDV": 0,
                "AMT": 0.0,
                "RATE": 0.0,
                "DUR": 0.0,
                "DV": arrays["obs_dv"][s][m],
                "BLQ": arrays["obs_blq"][s][m].astype(int),
                "LLOQ": np.where(lloq > 0, lloq, np.nan),
                "OCC": arrays["obs_occ"][s][m] + 1,
            }
        )
        frame = pd.concat([doses, obs], ignore_index=True)
        # Doses sort before observations at the same time (EVID 1 before 0).
        frame = frame.sort_values(
            ["TIME", "EVID"], ascending=[True, False], kind="mergesort"
        )
        for c in names:
            frame[c] = cov[c]
        out.append(frame)
    df = pd.concat(out, ignore_index=True)
    df["OCC"] = df["OCC"].astype(int)
    unit_cols = []
    if dv_unit is not None:
        df["DVUNIT"] = _normalise_unit(dv_unit)
        unit_cols = ["DVUNIT"]
    return df[
        [
            "ID",
            "TIME",
            "EVID",
            "MDV",
            "AMT",
            "RATE",
            "DUR",
            "DV",
            "BLQ",
            "LLOQ",
            "OCC",
            *unit_cols,
            *names,
        ]
    ]
