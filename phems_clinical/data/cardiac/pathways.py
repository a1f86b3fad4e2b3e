"""OMOP CDM tables -> validated post-operative state sojourns (one row each).

Episode = the inpatient visit holding a person's first cardiac operation (a
``procedure_occurrence`` with a STAT-category concept); ``episode_id`` is that
``visit_occurrence_id``. Time ``0`` is the end of the index operation (the end of its
operating-room ``visit_detail`` = CICU admission); ``entry``/``exit`` are **days
since surgery**. States: CICU (``visit_detail`` 32037), WARD (8717), HOME (between
inpatient visits), READMIT (any later inpatient visit), DEAD; an operating-room
``visit_detail`` after the index operation is an unplanned reintervention and is
merged into the state that follows it (``reintervention = 1`` on that sojourn).
Follow-up ends ``followup_days`` after surgery or the day after
``observation_period_end_date`` (if that table is given), whichever is first.

Validation: a bad record excludes its whole episode and is reported in
:class:`PathwayReport` (never silently): unknown visit_detail concept, end before
start, missing end, a ``preceding_visit_detail_id`` that does not exist or a chain
that does not link all details of a visit, overlapping stays, a visit_detail pointing
at an unknown visit, stays or visits after death, missing weight. Missing required
columns raise :class:`PathwayError` naming the table and columns. The columns are
documented in ``data_schemas/cardiac_pathway.schema.json``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from phems_clinical.data.cardiac.simulate import AGE_GROUPS, CONCEPTS, STAT_CONCEPTS
from phems_clinical.data.cardiac.simulate import expected_weight_kg as _expected_w

DETAIL_STATE = {
    CONCEPTS["icu"]: "CICU",
    CONCEPTS["ward"]: "WARD",
    CONCEPTS["operating_room"]: "OR",
}
_STAT_OF = {v: k for k, v in STAT_CONCEPTS.items()}
_TOL = pd.Timedelta(seconds=1)
#: Weight-for-age z: log(weight / APLS median) / 0.15 (SD of log weight, assumption).
WEIGHT_LOG_SD = 0.15

REQUIRED = {
    "person": ["person_id"],
    "visit_occurrence": [
        "visit_occurrence_id",
        "person_id",
        "visit_concept_id",
        "visit_start_datetime",
        "visit_end_datetime",
    ],
    "visit_detail": [
        "visit_detail_id",
        "person_id",
        "visit_detail_concept_id",
        "visit_detail_start_datetime",
        "visit_detail_end_datetime",
        "preceding_visit_detail_id",
        "visit_occurrence_id",
    ],
    "procedure_occurrence": [
        "person_id",
        "procedure_concept_id",
        "procedure_datetime",
        "visit_occurrence_id",
    ],
}
COLUMNS = [
    "site",
    "person_id",
    "episode_id",
    "state",
    "entry",
    "exit",
    "next_state",
    "reintervention",
    "surgery_datetime",
    "age_days",
    "age_group",
    "sex",
    "weight_kg",
    "weight_z",
    "stat",
    "ventilation",
]


class PathwayError(ValueError):
    """A table lacks required columns (the message names table and columns)."""


class PathwayReport(NamedTuple):
    """Excluded records: one row per offending record (table, row_key, field,
    reason, person_id); every excluded episode appears at least once."""

    exclusions: pd.DataFrame
    n_persons: int
    n_episodes: int

    def counts(self) -> pd.Series:
        """Offending records per reason."""
        return self.exclusions.groupby("reason").size().rename("records")

    @property
    def excluded_persons(self) -> set[int]:
        return set(self.exclusions.person_id.astype(int))

    def summary(self) -> str:
        lines = [
            f"{self.n_episodes} episodes kept of {self.n_persons} persons; "
            f"{len(self.excluded_persons)} persons excluded"
        ]
        for reason, k in self.counts().items():
            lines.append(f"  {reason}: {k} record(s)")
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        return self.exclusions.copy()


def _require(tables, name):
    if name not in tables:
        raise PathwayError(f"{name}: table missing (required for cardiac pathways)")
    missing = [c for c in REQUIRED[name] if c not in tables[name].columns]
    if missing:
        raise PathwayError(f"{name}: missing required column(s) {missing}")
    return tables[name]


def _ts(s: pd.Series) -> pd.Series:
    return pd.to_datetime(s).astype("datetime64[ns]")


def derived_covariates(age_days, weight_kg):
    """Age group ('neonate' <= 30 d, 'infant' <= 365 d, else 'child') and
    weight-for-age z (log(weight / APLS median) / :data:`WEIGHT_LOG_SD`).

    Scalars give a ``(str, float)`` pair, arrays a pair of arrays; used by
    :func:`episodes` and wherever age or weight is changed afterwards (anonymised
    releases, synthetic pathways), so the rule lives in one place.
    """
    age = np.asarray(age_days, dtype=float)
    w = np.asarray(weight_kg, dtype=float)
    idx = np.where(age <= 30, 0, np.where(age <= 365, 1, 2))
    wz = np.log(w / _expected_w(age)) / WEIGHT_LOG_SD
    if idx.ndim == 0:
        return AGE_GROUPS[int(idx)], float(wz)
    return np.asarray(AGE_GROUPS, dtype=object)[idx], np.asarray(wz, dtype=float)


def episodes(
    tables: dict[str, pd.DataFrame],
    *,
    followup_days: float = 365.0,
    site: str | None = None,
) -> tuple[pd.DataFrame, PathwayReport]:
    """OMOP tables -> (sojourn table sorted by person/entry, report).

    Parameters
    ----------
    tables : dict of DataFrames
        person, visit_occurrence, visit_detail, procedure_occurrence (required);
        measurement (weight), death, observation_period (optional).
    followup_days : float
        Administrative end of follow-up after surgery (days).
    site : str, optional
        Written to the ``site`` column (default: the prefix of
        ``person_source_value`` before ':' or '').
    """
    person = _require(tables, "person")
    visits = _require(tables, "visit_occurrence").copy()
    details = _require(tables, "visit_detail").copy()
    procs = _require(tables, "procedure_occurrence").copy()
    bad: list[tuple] = []

    def flag(table, key, field, reason, pid):
        bad.append((table, key, field, reason, int(pid)))

    visits["vs"] = _ts(visits.visit_start_datetime)
    visits["ve"] = _ts(visits.visit_end_datetime)
    details["ds"] = _ts(details.visit_detail_start_datetime)
    details["de"] = _ts(details.visit_detail_end_datetime)
    procs["ps"] = _ts(procs.procedure_datetime)
    # ---------------------------------------------------------------- row checks
    for r in visits[visits.ve.isna()].itertuples():
        flag(
            "visit_occurrence",
            r.visit_occurrence_id,
            "visit_end_datetime",
            "missing_end",
            r.person_id,
        )
    for r in visits[visits.ve < visits.vs].itertuples():
        flag(
            "visit_occurrence",
            r.visit_occurrence_id,
            "visit_end_datetime",
            "end_before_start",
            r.person_id,
        )
    unknown = ~details.visit_detail_concept_id.isin(list(DETAIL_STATE))
    for r in details[unknown].itertuples():
        flag(
            "visit_detail",
            r.visit_detail_id,
            "visit_detail_concept_id",
            f"unknown_concept ({r.visit_detail_concept_id}; expected one of "
            f"{sorted(DETAIL_STATE)})",
            r.person_id,
        )
    for r in details[details.de.isna()].itertuples():
        flag(
            "visit_detail",
            r.visit_detail_id,
            "visit_detail_end_datetime",
            "missing_end",
            r.person_id,
        )
    for r in details[details.de < details.ds].itertuples():
        flag(
            "visit_detail",
            r.visit_detail_id,
            "visit_detail_end_datetime",
            "end_before_start",
            r.person_id,
        )
    prev = details.preceding_visit_detail_id
    missing_prev = prev.notna() & ~prev.isin(details.visit_detail_id)
    for r in details[missing_prev].itertuples():
        flag(
            "visit_detail",
            r.visit_detail_id,
            "preceding_visit_detail_id",
            f"missing_preceding ({r.preceding_visit_detail_id} not found)",
            r.person_id,
        )
    no_visit = ~details.visit_occurrence_id.isin(visits.visit_occurrence_id)
    for r in details[no_visit].itertuples():
        flag(
            "visit_detail",
            r.visit_detail_id,
            "visit_occurrence_id",
            "unknown_visit",
            r.person_id,
        )
    # ---------------------------------------------------------------- covariates
    birth = _birth(person)
    gender = person.get("gender_concept_id", pd.Series(0, index=person.index))
    sex = dict(
        zip(
            person.person_id.astype(int),
            np.where(gender == CONCEPTS["female"], "F", "M"),
            strict=True,
        )
    )
    src = person.get("person_source_value")
    site_of = (
        {
            int(p): (site if site is not None else str(s).split(":")[0])
            for p, s in zip(person.person_id, src, strict=True)
        }
        if src is not None
        else {}
    )
    stat_rows = procs[procs.procedure_concept_id.isin(list(_STAT_OF))].sort_values(
        ["person_id", "ps"]
    )
    index_op = stat_rows.groupby("person_id").head(1).set_index("person_id")
    weights = _weights(tables.get("measurement"))
    imv = procs[procs.procedure_concept_id == CONCEPTS["imv"]][["person_id", "ps"]]
    deaths = (
        {}
        if tables.get("death") is None or tables["death"].empty
        else dict(
            zip(
                tables["death"].person_id.astype(int),
                _ts(tables["death"].death_datetime),
                strict=True,
            )
        )
    )
    obs_end = {}
    if tables.get("observation_period") is not None:
        op = tables["observation_period"]
        ends = pd.to_datetime(op.observation_period_end_date) + pd.Timedelta(days=1)
        obs_end = ends.groupby(op.person_id.astype(int)).max().to_dict()
    persons = set(person.person_id.astype(int))
    for p in sorted(set(procs.person_id.astype(int)) - persons):
        flag("procedure_occurrence", None, "person_id", "unknown_person", p)
    # ---------------------------------------------------------------- per person
    det_by_visit = _split_details(details)
    ip = visits[visits.visit_concept_id == CONCEPTS["inpatient_visit"]].sort_values(
        ["person_id", "vs"]
    )
    vis_by_person = {
        int(p): (
            g.visit_occurrence_id.to_numpy(np.int64),
            g.vs.to_numpy(),
            g.ve.to_numpy(),
        )
        for p, g in ip.groupby("person_id")
    }
    imv_by_person = {int(p): g.ps.to_numpy() for p, g in imv.groupby("person_id")}
    has_vd = "visit_detail_id" in index_op.columns
    index_ops = {
        int(p): (
            r.ps,
            int(r.visit_occurrence_id),
            (
                int(r.visit_detail_id)
                if has_vd and pd.notna(r.visit_detail_id)
                else None
            ),
            int(r.procedure_concept_id),
        )
        for p, r in zip(index_op.index, index_op.itertuples(), strict=True)
    }
    rows = []
    pre_bad = {b[4] for b in bad}
    n_eps = 0
    for pid in sorted(persons):
        if pid not in index_ops:
            continue  # no cardiac operation: not a cardiac episode
        if pid in pre_bad:
            continue
        op = index_ops[pid]
        out = _person_rows(
            pid,
            op,
            vis_by_person.get(pid),
            det_by_visit,
            deaths.get(pid),
            obs_end.get(pid),
            followup_days,
            flag,
        )
        if out is None:
            continue
        t_surg = op[0]
        w = weights.get(pid)
        if w is None:
            flag("measurement", None, "value_as_number", "missing_weight", pid)
            continue
        age = (t_surg - birth[pid]) / pd.Timedelta(days=1)
        if not age >= 0:
            flag("person", pid, "birth_datetime", "negative_age", pid)
            continue
        vent = int(
            np.any(
                (
                    imv_by_person.get(pid, np.array([], "datetime64[ns]"))
                    < np.datetime64(t_surg)
                )
                & (
                    imv_by_person.get(pid, np.array([], "datetime64[ns]"))
                    >= np.datetime64(out[1])
                )
            )
        )
        group, wz = derived_covariates(float(age), float(w))
        cov = (
            t_surg,
            float(age),
            group,
            sex.get(pid, "M"),
            float(w),
            wz,
            _STAT_OF[op[3]],
            vent,
        )
        for r in out[0]:
            rows.append((site_of.get(pid, site or ""), pid, op[1], *r, *cov))
        n_eps += 1
    df = pd.DataFrame(rows, columns=COLUMNS)
    excl = pd.DataFrame(
        bad, columns=["table", "row_key", "field", "reason", "person_id"]
    )
    kept = ~df.person_id.isin(set(excl.person_id))
    n_eps -= df[~kept].person_id.nunique()
    df = df[kept].reset_index(drop=True)
    df = df.astype(
        {
            "person_id": np.int64,
            "episode_id": np.int64,
            "reintervention": np.int64,
            "stat": np.int64,
            "ventilation": np.int64,
            "entry": float,
            "exit": float,
        }
    )
    return df, PathwayReport(excl, len(persons), n_eps)


def _birth(person) -> dict[int, pd.Timestamp]:
    if "birth_datetime" in person.columns and person.birth_datetime.notna().all():
        b = _ts(person.birth_datetime)
    else:
        b = pd.to_datetime(
            dict(
                year=person.year_of_birth,
                month=person.get("month_of_birth", 7).fillna(7),
                day=person.get("day_of_birth", 1).fillna(1),
            )
        )
    return dict(zip(person.person_id.astype(int), b, strict=True))


def _weights(meas) -> dict[int, float]:
    if meas is None or meas.empty:
        return {}
    m = meas[
        (meas.measurement_concept_id == CONCEPTS["weight"]) & (meas.value_as_number > 0)
    ]
    m = m.sort_values("measurement_datetime")
    return m.groupby("person_id").value_as_number.first().to_dict()


def _split_details(details: pd.DataFrame) -> dict[int, tuple]:
    """visit_occurrence_id -> (ids, preceding ids (-1 = none), concepts, starts,
    ends) as numpy arrays."""
    d = details.sort_values("visit_occurrence_id", kind="stable")
    vid = d.visit_occurrence_id.to_numpy(np.int64)
    cols = (
        d.visit_detail_id.to_numpy(np.int64),
        d.preceding_visit_detail_id.astype("Float64")
        .fillna(-1)
        .to_numpy(np.float64)
        .astype(np.int64),
        d.visit_detail_concept_id.to_numpy(np.int64),
        d.ds.to_numpy(),
        d.de.to_numpy(),
    )
    cuts = np.flatnonzero(np.diff(vid)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(vid)]])
    return {
        int(vid[a]): tuple(c[a:b] for c in cols)
        for a, b in zip(starts, ends, strict=True)
    }


def _chain(g: tuple, vid: int, pid: int, flag) -> list | None:
    """Details of one visit in chain order, or None (flagged) if not a single
    linear chain or overlapping."""
    ids, prev, conc, s, e = g
    heads = ids[prev < 0]
    succ = {}
    for i, p in zip(ids.tolist(), prev.tolist(), strict=True):
        if p >= 0:
            if p in succ:
                flag(
                    "visit_detail",
                    i,
                    "preceding_visit_detail_id",
                    "branching_chain",
                    pid,
                )
                return None
            succ[p] = i
    if len(heads) != 1:
        flag(
            "visit_occurrence",
            vid,
            "visit_detail",
            f"broken_chain ({len(heads)} chain starts)",
            pid,
        )
        return None
    order = [int(heads[0])]
    while order[-1] in succ and len(order) <= len(ids):
        order.append(succ[order[-1]])
    if len(order) != len(ids):
        flag("visit_occurrence", vid, "visit_detail", "broken_chain", pid)
        return None
    pos = {v: k for k, v in enumerate(ids.tolist())}
    ix = np.array([pos[o] for o in order])
    s, e, conc = s[ix], e[ix], conc[ix]
    over = np.flatnonzero(s[1:] < e[:-1] - np.timedelta64(1, "s"))
    if over.size:
        flag(
            "visit_detail",
            order[over[0] + 1],
            "visit_detail_start_datetime",
            "overlap (starts before the preceding stay ends)",
            pid,
        )
        return None
    return list(zip(order, conc.tolist(), s, e, strict=True))


def _person_rows(pid, op, pvis, det_by_visit, death, obs_end, followup, flag):
    """Sojourn rows (state, entry, exit, next, reintervention) and the index visit
    start, or None (episode flagged)."""
    t_op, idx_vid, op_detail, _ = op
    hit = np.array([], int) if pvis is None else np.flatnonzero(pvis[0] == idx_vid)
    if hit.size == 0:
        flag("procedure_occurrence", None, "visit_occurrence_id", "unknown_visit", pid)
        return None
    vids, vs, ve = (a[hit[0] :] for a in pvis)
    if np.any(vs[1:] < ve[:-1] - np.timedelta64(1, "s")):
        flag(
            "visit_occurrence",
            int(vids[1]),
            "visit_start_datetime",
            "overlap (readmission before discharge)",
            pid,
        )
        return None
    if death is not None:
        d64 = np.datetime64(death)
        after = (vs > d64) | (ve > d64 + np.timedelta64(60, "s"))
        if after.any():
            flag(
                "visit_occurrence",
                int(vids[int(np.argmax(after))]),
                "visit_start_datetime",
                "event_after_death",
                pid,
            )
            return None
    chains = []
    for vid in vids.tolist():
        g = det_by_visit.get(vid)
        if g is None:
            chains.append([])
            continue
        ch = _chain(g, vid, pid, flag)
        if ch is None:
            return None
        if death is not None and any(s > np.datetime64(death) for _, _, s, _ in ch):
            flag(
                "visit_detail",
                ch[0][0],
                "visit_detail_start_datetime",
                "event_after_death",
                pid,
            )
            return None
        chains.append(ch)
    # time zero: end of the operating-room detail of the index operation
    idx_chain = chains[0]
    or_pos = None
    if op_detail is not None:
        ids = [c[0] for c in idx_chain]
        if op_detail in ids:
            or_pos = ids.index(op_detail)
    if or_pos is None:
        cand = [
            k
            for k, c in enumerate(idx_chain)
            if DETAIL_STATE[c[1]] == "OR" and c[2] <= np.datetime64(t_op) + _TOL
        ]
        if not cand:
            flag(
                "procedure_occurrence",
                None,
                "visit_detail_id",
                "no_operating_room_stay",
                pid,
            )
            return None
        or_pos = cand[-1]
    t0 = idx_chain[or_pos][3]
    day = np.timedelta64(86_400_000_000_000, "ns")

    def rel(t):
        return float((np.datetime64(t, "ns") - t0) / day)

    cens = followup
    if obs_end is not None:
        cens = min(cens, rel(obs_end))
    seq = []  # (state, start, reintervention)
    for k, ch in enumerate(chains):
        items = ch[or_pos + 1 :] if k == 0 else ch
        if k > 0:
            seq.append(
                (
                    "READMIT",
                    rel(vs[k]),
                    int(any(DETAIL_STATE[c[1]] == "OR" for c in ch)),
                )
            )
        else:
            pend_or = False
            for _, conc, s, _e in items:
                st = DETAIL_STATE[conc]
                if st == "OR":
                    if not pend_or:
                        seq.append(("CICU", rel(s), 1))  # provisional
                        pend_or = True
                    continue
                if pend_or:
                    seq[-1] = (st, seq[-1][1], 1)
                    pend_or = False
                elif seq and seq[-1][0] == st:
                    continue
                else:
                    seq.append((st, rel(s) if seq else 0.0, 0))
            if not seq:
                seq.append(("CICU", 0.0, 0))
        d_rel = rel(death) if death is not None else None
        end = rel(ve[k])
        if d_rel is not None and d_rel <= end + 60 / 86400:
            seq.append(("DEAD", d_rel, 0))
            break
        seq.append(("HOME", end, 0))
    else:
        if death is not None:
            seq.append(("DEAD", rel(death), 0))
    out = []
    nexts = seq[1:] + [("CENSORED", np.inf, 0)]
    for (st, a, ri), (nxt, b, _) in zip(seq, nexts, strict=True):
        if st == "DEAD" or a >= cens:
            break
        if b >= cens:
            out.append((st, a, cens, "CENSORED", ri))
            break
        out.append((st, a, b, nxt, ri))
    return out, vs[0]


__all__ = [
    "COLUMNS",
    "DETAIL_STATE",
    "PathwayError",
    "PathwayReport",
    "REQUIRED",
    "WEIGHT_LOG_SD",
    "episodes",
]
