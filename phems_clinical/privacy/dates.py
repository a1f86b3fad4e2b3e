"""Per-patient random date shifting that preserves intervals.

Every date column of one patient moves by the same whole number of days, drawn
uniformly from ``[-max_days, max_days]`` without 0. Whole days keep the time of
day (night/day patterns of hourly PICU data, dosing clock times of PK data) and
all intervals within a patient exactly; weekdays are not kept. Include the
date of birth among ``date_cols`` and ages stay exact too.

Re-running is safe in two ways. (1) ``existing=`` takes back a shift table
returned earlier (same patient, same shift; also how several tables of one site
share shifts). (2) The shifted frame carries the marker ``df.attrs[MARKER]``
(id column, shifted columns, unit; never the shifts themselves, which are a secret
key and must stay out of released data); columns named there are not shifted
again. The shifts are drawn from the OS CSPRNG, never from ``key``:
a key derived from a run seed that the outputs record would let any data
recipient recompute every shift and undo it (``from_key=True`` keeps the old
key-derived draw, for tests and public demonstration data only). Reference:
Hripcsak G et al. (2016) "Preserving temporal relations in
clinical data while maintaining privacy", JAMIA 23:1040; HIPAA Safe Harbor
(45 CFR 164.514(b)(2)) lists dates as identifiers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from phems_clinical.privacy.secret_rng import secret_generator
from phems_clinical.rng import numpy_generator

MARKER = "phems_dates_shifted"
"""``df.attrs`` key: ``{"id_col": str, "columns": list[str], "unit": "days"}``."""


class DateShiftError(ValueError):
    """Date shifting cannot be applied (names the column or value at fault)."""


def _r(x) -> str:
    """repr of a value, numpy scalars shown as plain Python ones."""
    return repr(x.item() if isinstance(x, np.generic) else x)


def already_shifted(df: pd.DataFrame) -> list[str]:
    """Columns of ``df`` that :func:`shift_dates` has already shifted."""
    mark = df.attrs.get(MARKER)
    return list(mark["columns"]) if mark else []


def _check(df: pd.DataFrame, id_col: str, date_cols: Sequence[str], max_days: int):
    if not isinstance(df, pd.DataFrame):
        raise DateShiftError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if id_col not in df.columns:
        raise DateShiftError(
            f"id column '{id_col}' is missing (columns: {list(df.columns)})"
        )
    if isinstance(date_cols, str):
        raise DateShiftError(
            f"date_cols must be a list of column names, got the string {date_cols!r}"
        )
    for c in date_cols:
        if c not in df.columns:
            raise DateShiftError(f"date column '{c}' is missing")
        if not pd.api.types.is_datetime64_any_dtype(df[c]):
            raise DateShiftError(
                f"date column '{c}' has dtype {df[c].dtype}; "
                f"expected datetime64 (use pd.to_datetime first)"
            )
    if df[id_col].isna().any():
        row = df.index[df[id_col].isna().to_numpy()][0]
        raise DateShiftError(f"id column '{id_col}' is missing at row {_r(row)}")
    if (
        isinstance(max_days, bool)
        or not isinstance(max_days, int | np.integer)
        or max_days < 1
    ):
        raise DateShiftError(f"max_days must be an integer >= 1, got {max_days!r}")


def _check_existing(existing, max_days: int) -> pd.Series:
    s = (
        pd.Series(existing, dtype=object)
        if not isinstance(existing, pd.Series)
        else existing
    )
    if s.index.has_duplicates:
        dup = s.index[s.index.duplicated()][0]
        raise DateShiftError(f"existing shift table lists id {_r(dup)} twice")
    v = pd.to_numeric(s, errors="coerce")
    bad = v.isna() | (v != np.round(v)) | (v == 0)
    if bad.any():
        i = s.index[bad.to_numpy()][0]
        raise DateShiftError(
            f"existing shift for id {_r(i)} is {_r(s[i])}; expected a "
            f"non-zero whole number of days"
        )
    return v.astype(np.int64)


def draw_shifts(key, ids, max_days: int = 365, *, from_key: bool = False) -> pd.Series:
    """Shift in days per id, uniform on [-max_days, max_days] without 0.

    By default each shift is drawn from the OS CSPRNG
    (:func:`~phems_clinical.privacy.secret_rng.secret_generator`): the shift
    table is a secret key that no seed reproduces (keep the returned table and
    pass it as ``existing=`` to shift more tables of the site alike).
    ``from_key=True``: deterministic in ``key`` and the *set* of ids (drawn in
    sorted id order, so row order does not matter) -- never for released data
    whose key or seed is known to anyone else.
    """
    uniq = pd.Index(pd.unique(pd.Series(ids)))
    try:
        uniq = uniq.sort_values()
    except TypeError:  # mixed id types: order by their text
        uniq = uniq[np.argsort(uniq.astype(str).to_numpy(), kind="stable")]
    rng = (
        numpy_generator(key) if from_key else secret_generator()
    )  # secret: nobody keeps it
    u = rng.integers(0, 2 * max_days, size=len(uniq))  # 2 * max_days outcomes
    shift = np.where(u < max_days, u - max_days, u - max_days + 1)
    return pd.Series(shift.astype(np.int64), index=uniq, name="shift_days")


def shift_dates(
    key,
    df: pd.DataFrame,
    id_col: str,
    date_cols: Sequence[str],
    *,
    max_days: int = 365,
    existing: pd.Series | None = None,
    from_key: bool = False,
) -> tuple[pd.DataFrame, pd.Series]:
    """Shift every date column of each patient by one random whole-day offset.

    Returns the shifted copy (marked in ``attrs[MARKER]``) and the shift table
    (days, indexed by id: ``existing`` plus new draws). Ids in ``existing`` keep
    their shift; columns already marked as shifted are left alone. NaT stays NaT.
    New shifts are secret draws (``from_key``: see :func:`draw_shifts`).
    """
    _check(df, id_col, date_cols, max_days)
    prev = df.attrs.get(MARKER)
    if prev and prev.get("id_col") != id_col:
        raise DateShiftError(
            f"frame was shifted per '{prev.get('id_col')}', not per '{id_col}'"
        )
    done = set(already_shifted(df))
    todo = [c for c in date_cols if c not in done]
    table = (
        _check_existing(existing, max_days)
        if existing is not None
        else pd.Series(dtype=np.int64, name="shift_days")
    )
    ids = df[id_col]
    new_ids = pd.Index(pd.unique(ids)).difference(table.index)
    if done and todo and len(new_ids):
        raise DateShiftError(
            f"columns {sorted(done)} are already shifted but ids "
            f"{', '.join(_r(i) for i in new_ids[:5])} have no shift in `existing`; "
            f"shifting {todo} now would break their intervals"
        )
    if todo and len(new_ids):
        fresh = draw_shifts(key, ids, max_days, from_key=from_key)
        table = pd.concat([table, fresh[fresh.index.isin(new_ids)]])
    table = table.astype(np.int64).rename("shift_days")
    out = df.copy()
    if todo:
        days = ids.map(table).to_numpy(np.int64)
        delta = pd.Series(pd.to_timedelta(days, unit="D"), index=df.index)
        for c in todo:
            out[c] = (df[c] + delta).astype(df[c].dtype)
    out.attrs[MARKER] = {
        "id_col": id_col,
        "columns": sorted(done | set(todo)),
        "unit": "days",
    }
    return out, table


def shift_tables(
    key,
    tables,
    *,
    id_col: str = "person_id",
    max_days: int = 365,
    existing: pd.Series | None = None,
    from_key: bool = False,
) -> tuple[dict, pd.Series]:
    """Shift every datetime column of every table of one site, per patient.

    ``tables``: name -> frame (e.g. OMOP CDM tables from
    :func:`phems_clinical.data.omop.read_tables`). Each frame with ``id_col`` has all
    its datetime64 columns moved by its patient's shift (one shift table for the
    whole site, so intervals *across* tables are kept too: dose to level, admission
    to death, birth to surgery). In an OMOP ``person`` table ``year_of_birth``,
    ``month_of_birth`` and ``day_of_birth`` are recomputed from the shifted
    ``birth_datetime``. Frames without ``id_col`` (``care_site``, ``concept``) are
    returned unchanged. Returns the shifted tables and the shift table (days);
    keep the table at the site (it is the secret key of the release).
    """
    ids = pd.concat(
        [t[id_col] for t in tables.values() if id_col in t.columns], ignore_index=True
    )
    table = existing
    if len(ids):
        table = (
            draw_shifts(key, ids, max_days, from_key=from_key)
            if existing is None
            else existing
        )
        missing = pd.Index(pd.unique(ids)).difference(table.index)
        if len(missing):
            table = pd.concat(
                [table, draw_shifts(key, ids, max_days, from_key=from_key)[missing]]
            )
    out = {}
    for name, t in tables.items():
        cols = [c for c in t.columns if pd.api.types.is_datetime64_any_dtype(t[c])]
        if id_col not in t.columns or not cols:
            out[name] = t
            continue
        shifted, _ = shift_dates(
            key, t, id_col, cols, max_days=max_days, existing=table
        )
        if "birth_datetime" in cols:
            b = shifted["birth_datetime"]
            for part, attr in (
                ("year_of_birth", "year"),
                ("month_of_birth", "month"),
                ("day_of_birth", "day"),
            ):
                if part in shifted.columns:
                    shifted[part] = getattr(b.dt, attr).astype(shifted[part].dtype)
        out[name] = shifted
    return out, (
        table if table is not None else pd.Series(dtype=np.int64, name="shift_days")
    )
