"""A clinic's patient history: every saved dosing assessment in one SQLite file.

A haemophilia clinic re-assesses the same child over years. This module keeps
each assessment (the dosing request as entered and the result as computed) in a
per-clinic database file, using the standard library's :mod:`sqlite3`: no
server, nothing to install, one file to back up.

.. warning::
   The file holds patient data (identifiers, weights, doses, levels). It is
   created readable by its owner only (mode 0600) and nothing in this module
   sends it anywhere: it stays in the clinic. Keep it on the clinic's protected
   storage and back it up as part of the clinical record.

Functions
---------
:func:`open_store` opens (or creates) the file; :func:`save_assessment`,
:func:`list_patients`, :func:`history`, :func:`load_assessment`,
:func:`previous_assessment` and :func:`export` read and write it. Each write is
one transaction: it is stored whole or not at all. A file of another schema
version, another application's SQLite file, or a file that is no database is
refused with :class:`StoreError` naming the file.

The date of an assessment (``when``) is, unless given, the date-time of its last
measured level when the request gives date-times, else the time of saving (UTC).

Examples
--------
>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "clinic.db")
>>> with open_store(path) as store:
...     aid = save_assessment(store, {"patient_id": "P1"},
...                           {"patient_id": "P1", "product": "advate"},
...                           when="2024-03-01T10:00")
...     [p.patient_id for p in list_patients(store)]
['P1']
>>> oct(os.stat(path).st_mode & 0o777)
'0o600'
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from phems_clinical.data.dosing_request import FieldError, RequestError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "AssessmentSummary",
    "PatientSummary",
    "Previous",
    "Store",
    "StoreError",
    "assessment_summary",
    "assessment_time",
    "export",
    "history",
    "history_table",
    "list_patients",
    "load_assessment",
    "open_store",
    "previous_assessment",
    "save_assessment",
]

#: ``PRAGMA application_id`` of a history file ("PHEM" in ASCII).
APPLICATION_ID = 0x5048454D
#: Version of the tables below; a file of another version is refused.
SCHEMA_VERSION = 1
EXPORT_FORMATS = ("json", "csv")

_SCHEMA = """
CREATE TABLE schema_version (
    version INTEGER NOT NULL,
    created_utc TEXT NOT NULL
);
CREATE TABLE patients (
    patient_id TEXT PRIMARY KEY,
    first_saved_utc TEXT NOT NULL
);
CREATE TABLE assessments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    patient_id TEXT NOT NULL REFERENCES patients(patient_id),
    assessed_at TEXT NOT NULL,
    saved_utc TEXT NOT NULL,
    product TEXT,
    product_display TEXT,
    request_json TEXT NOT NULL,
    result_json TEXT NOT NULL
);
CREATE INDEX assessments_by_patient ON assessments (patient_id, assessed_at, id);
"""


class StoreError(ValueError):
    """A history file that cannot be used; the message names the file."""


class PatientSummary(NamedTuple):
    """One patient in the store."""

    patient_id: str
    n_assessments: int
    first_assessed: str  # ISO 8601 date-time of the earliest assessment
    last_assessed: str  # ... and of the latest


class AssessmentSummary(NamedTuple):
    """One saved assessment, as a row of the patient's history.

    Estimates are the result's ``{"median", "lo90", "hi90"}`` dicts (``None``
    where the result lacks them); ``chosen_regimen`` is the first regimen the
    clinician evaluated (``result["evaluated_regimens"][0]``), else ``None``.
    """

    assessment_id: int
    patient_id: str
    assessed_at: str  # ISO 8601 date-time
    product: str | None  # library id
    product_display: str | None  # e.g. "Advate (octocog alfa) — Björkman 2012"
    weight_kg: float | None
    age_y: float | None
    effective_half_life_h: dict | None
    terminal_half_life_h: dict | None
    clearance_mL_h_kg: dict | None
    chosen_regimen: dict | None


class Store:
    """An open history file (see :func:`open_store`); usable from several
    threads (one operation at a time) and as a context manager."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed whole, or rolled back on any error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _create_private(path: Path) -> None:
    """Create an empty file readable and writable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)


def open_store(path: str | os.PathLike) -> Store:
    """Open the clinic's history file, creating it (mode 0600) if absent.

    Parameters
    ----------
    path
        The database file, e.g. ``clinic.db``. Its folder must exist.

    Raises
    ------
    StoreError
        The file is no SQLite database, belongs to another application, or has
        another schema version (the message names the file and both versions).
    OSError
        The file or its folder cannot be created or read.
    """
    p = Path(path)
    if p.is_dir():
        raise StoreError(f"{p} is a folder; expected a database file")
    new = not p.exists() or p.stat().st_size == 0
    if not p.exists():
        _create_private(p)
    conn = sqlite3.connect(p, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        store = Store(p, conn)
        if new:
            with store._write() as c:
                c.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    c.execute(statement)
                c.execute(
                    "INSERT INTO schema_version VALUES (?, ?)",
                    (SCHEMA_VERSION, _utc_now()),
                )
        else:
            _check_schema(p, conn)
    except sqlite3.DatabaseError as err:
        conn.close()
        raise StoreError(f"{p} is not a patient history database ({err})") from None
    except BaseException:
        conn.close()
        raise
    return store


def _check_schema(path: Path, conn: sqlite3.Connection) -> None:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise StoreError(
            f"{path} is an SQLite database of another application "
            "(not a phems_clinical patient history); choose another "
            "file"
        )
    try:
        rows = conn.execute("SELECT version FROM schema_version").fetchall()
    except sqlite3.OperationalError:
        rows = []
    versions = sorted({r[0] for r in rows})
    if versions != [SCHEMA_VERSION]:
        found = ", ".join(map(str, versions)) or "none recorded"
        raise StoreError(
            f"{path} has patient-history schema version {found}; this "
            f"version of phems_clinical reads version "
            f"{SCHEMA_VERSION} only. Use the phems_clinical version "
            "that wrote it, or a new file"
        )


# ------------------------------------------------------------------ writing


def _patient_id(request: dict, result: dict) -> str:
    pid = request.get("patient_id") if isinstance(request, dict) else None
    if pid is None and isinstance(result, dict):
        pid = result.get("patient_id")
    if not isinstance(pid, str) or not pid.strip():
        raise RequestError(
            [
                FieldError(
                    "patient_id",
                    (
                        "a patient id is required to save the assessment in the patient "
                        "history (the clinic's own identifier, e.g. the hospital number)"
                    ),
                )
            ]
        )
    return pid.strip()


def _iso(when: str | dt.datetime, field: str = "when") -> str:
    if isinstance(when, dt.datetime):
        t = when
    else:
        try:
            t = dt.datetime.fromisoformat(str(when))
        except ValueError:
            raise RequestError(
                [
                    FieldError(
                        field,
                        (
                            f"{str(when)!r:.40} is not an ISO 8601 date-time (expected e.g. "
                            "2024-03-01T08:30)"
                        ),
                    )
                ]
            ) from None
    if t.tzinfo is not None:
        t = t.astimezone(dt.UTC).replace(tzinfo=None)
    return t.replace(microsecond=0).isoformat(timespec="minutes")


def assessment_time(time_origin: str | None, level_times_h) -> str:
    """Date of an assessment: its last level's date-time when the request gives
    date-times (``time_origin`` + the latest ``time_h``), else now (UTC);
    ISO 8601 to the minute."""
    if time_origin:
        try:
            t0 = dt.datetime.fromisoformat(time_origin)
        except (TypeError, ValueError):
            t0 = None
        times = [t for t in level_times_h if isinstance(t, int | float)]
        if t0 is not None:
            return _iso(t0 + dt.timedelta(hours=max(times, default=0.0)))
    return _iso(dt.datetime.now(dt.UTC))


def _default_when(result: dict) -> str:
    levels = result.get("levels") or []
    return assessment_time(
        result.get("time_origin"),
        [lv.get("time_h") for lv in levels if isinstance(lv, dict)],
    )


def _json(obj: Any, field: str) -> str:
    try:
        return json.dumps(
            obj, allow_nan=False, ensure_ascii=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as err:
        raise RequestError(
            [FieldError(field, f"cannot be stored as JSON ({err})")]
        ) from None


def save_assessment(
    store: Store, request: dict, result: dict, *, when: str | dt.datetime | None = None
) -> int:
    """Save one assessment; returns its id.

    Parameters
    ----------
    request, result
        The dosing request as entered (JSON object) and the result computed
        from it (``result.json``).
    when
        Date-time of the assessment (ISO 8601 text or ``datetime``; an aware
        one is stored in UTC). Default: see the module doc.

    Raises
    ------
    RequestError
        On ``patient_id`` when the request (or result) has none; on ``when``
        for a date-time that cannot be read.
    """
    pid = _patient_id(request, result)
    assessed_at = _default_when(result) if when is None else _iso(when)
    req_text, res_text = _json(request, "request"), _json(result, "result")
    now = _utc_now()
    with store._write() as c:
        c.execute("INSERT OR IGNORE INTO patients VALUES (?, ?)", (pid, now))
        cur = c.execute(
            "INSERT INTO assessments (patient_id, assessed_at, saved_utc, product, "
            "product_display, request_json, result_json) VALUES (?,?,?,?,?,?,?)",
            (
                pid,
                assessed_at,
                now,
                result.get("product"),
                result.get("product_display"),
                req_text,
                res_text,
            ),
        )
        return int(cur.lastrowid)


# ------------------------------------------------------------------ reading


def list_patients(store: Store) -> list[PatientSummary]:
    """Every patient with at least one assessment, by patient id."""
    with store._read() as c:
        rows = c.execute(
            "SELECT patient_id, COUNT(*), MIN(assessed_at), MAX(assessed_at) "
            "FROM assessments GROUP BY patient_id ORDER BY patient_id"
        ).fetchall()
    return [PatientSummary(*r) for r in rows]


def _estimate(result: dict, key: str) -> dict | None:
    v = result.get(key)
    return v if isinstance(v, dict) and "median" in v else None


def _summary(row: tuple) -> AssessmentSummary:
    aid, pid, when, product, display, res_text = row
    r = json.loads(res_text)
    cov = r.get("covariates") or {}

    def value(name):
        v = cov.get(name)
        return v.get("value") if isinstance(v, dict) else None

    chosen = r.get("evaluated_regimens") or []
    model = r.get("model") or {}
    return AssessmentSummary(
        assessment_id=aid,
        patient_id=pid,
        assessed_at=when,
        product=product,
        product_display=display or model.get("name") or product,
        weight_kg=value("WT"),
        age_y=value("AGE"),
        effective_half_life_h=_estimate(r, "effective_half_life_h"),
        terminal_half_life_h=_estimate(r, "half_life_h"),
        clearance_mL_h_kg=_estimate(r, "clearance_mL_h_kg"),
        chosen_regimen=chosen[0] if chosen and isinstance(chosen[0], dict) else None,
    )


_SUMMARY_SQL = (
    "SELECT id, patient_id, assessed_at, product, product_display, "
    "result_json FROM assessments "
)


def _known(c: sqlite3.Connection, patient_id: str) -> None:
    if (
        c.execute(
            "SELECT 1 FROM patients WHERE patient_id = ?", (patient_id,)
        ).fetchone()
        is None
    ):
        raise RequestError(
            [
                FieldError(
                    "patient_id",
                    (
                        f"no assessments saved for patient {patient_id!r:.80} in this "
                        "history file"
                    ),
                )
            ]
        )


def history(store: Store, patient_id: str) -> list[AssessmentSummary]:
    """The patient's assessments, earliest first (by date, then by saving).

    Raises :class:`RequestError` on ``patient_id`` for an unknown patient.
    """
    with store._read() as c:
        _known(c, patient_id)
        rows = c.execute(
            _SUMMARY_SQL + "WHERE patient_id = ? ORDER BY assessed_at, id",
            (patient_id,),
        ).fetchall()
    return [_summary(r) for r in rows]


def load_assessment(store: Store, assessment_id: int) -> tuple[dict, dict]:
    """``(request, result)`` of one saved assessment, exactly as saved.

    Raises :class:`RequestError` on ``assessment_id`` when there is none.
    """
    with store._read() as c:
        row = c.execute(
            "SELECT request_json, result_json FROM assessments WHERE id = ?",
            (int(assessment_id),),
        ).fetchone()
    if row is None:
        raise RequestError(
            [
                FieldError(
                    "assessment_id",
                    (f"no assessment {assessment_id} in this history file"),
                )
            ]
        )
    return json.loads(row[0]), json.loads(row[1])


def assessment_summary(store: Store, assessment_id: int) -> AssessmentSummary:
    """The history row of one assessment (:class:`RequestError` if none)."""
    with store._read() as c:
        row = c.execute(_SUMMARY_SQL + "WHERE id = ?", (int(assessment_id),)).fetchone()
    if row is None:
        raise RequestError(
            [
                FieldError(
                    "assessment_id",
                    (f"no assessment {assessment_id} in this history file"),
                )
            ]
        )
    return _summary(row)


class Previous(NamedTuple):
    """An earlier assessment of the same patient."""

    summary: AssessmentSummary
    request: dict
    result: dict


def previous_assessment(
    store: Store,
    patient_id: str,
    *,
    before: str | dt.datetime | None = None,
    exclude_id: int | None = None,
) -> Previous | None:
    """The patient's latest assessment dated strictly before ``before``
    (default: the latest of all), skipping ``exclude_id``; ``None`` when the
    patient has none (a new patient)."""
    sql = _SUMMARY_SQL + "WHERE patient_id = ?"
    args: list[Any] = [patient_id]
    if before is not None:
        sql += " AND assessed_at < ?"
        args.append(_iso(before, "before"))
    if exclude_id is not None:
        sql += " AND id != ?"
        args.append(int(exclude_id))
    with store._read() as c:
        row = c.execute(
            sql + " ORDER BY assessed_at DESC, id DESC LIMIT 1", args
        ).fetchone()
    if row is None:
        return None
    request, result = load_assessment(store, row[0])
    return Previous(_summary(row), request, result)


# ------------------------------------------------------------------ table

#: Summary lines of ``result["display"]`` shown in the history table, in order
#: (those an assessment's display lacks are left empty).
HISTORY_LABELS = ("Effective half-life", "Terminal half-life", "Clearance")


_LEGACY = (
    ("Weight", None, "kg"),
    ("Effective half-life", "effective_half_life_h", "h"),
    ("Terminal half-life", "half_life_h", "h"),
    ("Clearance", "clearance_mL_h_kg", "mL/h/kg"),
)


def _legacy_values(result: dict) -> dict[str, str]:
    """For a result saved without ``display`` (older versions): median and
    90 % interval to 3 significant figures."""
    out = {}
    wt = ((result.get("covariates") or {}).get("WT") or {}).get("value")
    for label, key, unit in _LEGACY:
        if key is None:
            if isinstance(wt, int | float):
                out[label] = f"{wt:.3g} {unit}"
            continue
        e = _estimate(result, key)
        if e and all(
            isinstance(e.get(k), int | float) for k in ("median", "lo90", "hi90")
        ):
            out[label] = (
                f"{e['median']:.3g} {unit} (90 % interval "
                f"{e['lo90']:.3g}–{e['hi90']:.3g} {unit})"
            )
    return out


def _display_values(result: dict) -> dict[str, str]:
    display = result.get("display")
    if not isinstance(display, dict):
        return _legacy_values(result)
    return {
        str(item.get("label")): str(item.get("value"))
        for item in display.get("summary") or []
        if isinstance(item, dict)
    }


def _chosen_text(result: dict) -> str:
    table = (result.get("display") or {}).get("evaluated_table") or {}
    cols, rows = table.get("columns") or [], table.get("rows") or []
    if not rows:
        return ""
    row = dict(zip(cols, rows[0], strict=False))
    return ", ".join(
        str(row[c]) for c in ("Schedule", "Dose", "P(trough ≥ target)") if row.get(c)
    )


def history_table(store: Store, patient_id: str) -> dict:
    """The patient's assessments over time as ``{"columns": [...], "rows":
    [[...], ...]}`` of text, earliest first, plus ``"assessment_ids"``.

    Every number is the text the assessment's own ``result["display"]`` shows
    (:mod:`phems_clinical.dosing.wording`); only a result saved without one
    is formatted here (3 significant figures). The chosen regimen is the first
    regimen the clinician evaluated.
    """
    rows, ids = [], []
    for s in history(store, patient_id):
        _, result = load_assessment(store, s.assessment_id)
        values = _display_values(result)
        weight = next((v for k, v in values.items() if k.startswith("Weight")), "")
        rows.append(
            [
                s.assessed_at.replace("T", " "),
                s.product_display or "",
                weight,
                *(
                    next((v for k, v in values.items() if k.startswith(label)), "")
                    for label in HISTORY_LABELS
                ),
                _chosen_text(result),
            ]
        )
        ids.append(s.assessment_id)
    return {
        "columns": ["Date", "Product", "Weight", *HISTORY_LABELS, "Chosen regimen"],
        "rows": rows,
        "assessment_ids": ids,
    }


# ------------------------------------------------------------------ export

CSV_COLUMNS = (
    "assessment_id",
    "patient_id",
    "assessed_at",
    "product",
    "product_display",
    "weight_kg",
    "age_y",
    "effective_half_life_h",
    "effective_half_life_h_lo90",
    "effective_half_life_h_hi90",
    "terminal_half_life_h",
    "terminal_half_life_h_lo90",
    "terminal_half_life_h_hi90",
    "clearance_mL_h_kg",
    "clearance_mL_h_kg_lo90",
    "clearance_mL_h_kg_hi90",
    "chosen_schedule",
    "chosen_dose_IU",
    "chosen_dose_IU_kg",
)


def _csv_row(s: AssessmentSummary) -> list:
    def est(e):
        return (
            [None, None, None]
            if e is None
            else [e.get("median"), e.get("lo90"), e.get("hi90")]
        )

    ch = s.chosen_regimen or {}
    sched = ch.get("schedule")
    label = sched.get("label") if isinstance(sched, dict) else sched
    return [
        s.assessment_id,
        s.patient_id,
        s.assessed_at,
        s.product,
        s.product_display,
        s.weight_kg,
        s.age_y,
        *est(s.effective_half_life_h),
        *est(s.terminal_half_life_h),
        *est(s.clearance_mL_h_kg),
        label,
        ch.get("dose_IU"),
        ch.get("dose_IU_kg"),
    ]


def export(store: Store, patient_id: str, fmt: str = "json") -> str:
    """One patient's history as text.

    ``json``: ``{"format", "schema_version", "patient_id", "exported_utc",
    "assessments": [{"assessment_id", "assessed_at", "request", "result"}]}``,
    every request and result exactly as saved. ``csv``: one row per assessment
    with :data:`CSV_COLUMNS` (estimates as median and 90 % limits; an empty
    cell is a value the result does not hold).
    """
    if fmt not in EXPORT_FORMATS:
        raise RequestError(
            [FieldError("format", f"expected json or csv, got {fmt!r:.20}")]
        )
    rows = history(store, patient_id)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        w.writerows(_csv_row(s) for s in rows)
        return buf.getvalue()
    items = []
    for s in rows:
        request, result = load_assessment(store, s.assessment_id)
        items.append(
            {
                "assessment_id": s.assessment_id,
                "assessed_at": s.assessed_at,
                "request": request,
                "result": result,
            }
        )
    return json.dumps(
        {
            "format": "phems_clinical patient history",
            "schema_version": SCHEMA_VERSION,
            "patient_id": patient_id,
            "exported_utc": _utc_now(),
            "assessments": items,
        },
        indent=2,
        ensure_ascii=False,
        allow_nan=False,
    )
