"""Roles of a use case's table, and one-call anonymisation of a site's analysis table.

A use case's analysis table is longitudinal: many rows per patient (PK events,
PICU stay-hours, cardiac sojourns). Re-identification is about *patients*, so:

1. **Unit of privacy: the patient** (``Roles.patient_id``). The quasi-identifiers
   (QIs) and sensitive attributes form a patient table, one row per patient, taken
   at the patient's first row (PICU age at admission, cardiac age at the first
   operation) and the sensitive value by :attr:`Roles.sensitive_rule`.
2. The patient table is anonymised by :func:`.search.lattice_search` (ARX-style,
   minimal information loss) or :func:`.search.mondrian`, with record suppression
   within ``max_suppression``.
3. The result goes back onto every row of each patient: suppressed patients lose
   all their rows; each QI becomes one value per patient, the median of the
   original values of the released patients sharing its generalised label (so a
   group of >= k patients; ARX "microaggregation" of a generalised attribute,
   Prasser & Kohlmayer 2015), with the label itself in ``<QI>_band``; columns
   derived from QIs (BMI, lean body weight, weight-for-age z, age group) are
   recomputed from the released values; identifiers become random pseudonyms;
   date columns are shifted per patient (:func:`.dates.shift_dates`).
4. A report says what changed (patients and rows removed, level and cells changed
   per QI, columns recomputed, dates shifted) and the privacy of what is released
   (k, l, t, prosecutor / marketer risk on the released patient table, computed by
   :func:`.anonymity.anonymity_report`).

Idempotent: the output carries its configuration in ``attrs`` and ``<QI>_band``
columns (which survive a CSV round trip); anonymising it again checks that it
still satisfies the requested model and returns it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import jax
import numpy as np
import pandas as pd

from phems_clinical.privacy.anonymity import anonymity_report, k_anonymity
from phems_clinical.privacy.dates import shift_dates
from phems_clinical.privacy.hierarchies import (
    SUPPRESSED,
    Hierarchy,
    check_covers,
)
from phems_clinical.privacy.perturb import (
    LongitudinalRoles,
    il1s,
    perturb_longitudinal,
)
from phems_clinical.privacy.search import lattice_search, mondrian

__all__ = [
    "BAND_SUFFIX",
    "MARKER",
    "AnonymiseError",
    "Release",
    "Roles",
    "anonymise",
    "anonymise_longitudinal",
    "check_table",
    "patient_table",
    "roles_for",
]

MARKER = "phems_release"
BAND_SUFFIX = "_band"


class AnonymiseError(ValueError):
    """The requested anonymisation cannot be produced (names the column/option)."""


@dataclass(frozen=True)
class Roles:
    """What each column of one use case's analysis table is, for anonymisation.

    ``quasi_identifiers``: column -> hierarchy factory (always required);
    ``optional_qis``: QIs used when the column is present; ``identifiers``: replaced
    by pseudonyms; ``sensitive``: patient-level sensitive attributes (for l and t);
    ``sensitive_rule``: column -> how the patient value is formed from the rows
    (``"first"`` or ``"max"``); ``date_columns``: shifted per patient;
    ``derived``: columns computed from QIs, recomputed by ``recompute`` after
    generalisation; ``longitudinal``: the measured values and event times that
    :func:`anonymise_longitudinal` perturbs.
    """

    use_case: str
    patient_id: str
    identifiers: tuple[str, ...]
    quasi_identifiers: Mapping[str, Callable[[], Hierarchy]]
    optional_qis: Mapping[str, Callable[[], Hierarchy]] = field(default_factory=dict)
    sensitive: tuple[str, ...] = ()
    sensitive_rule: Mapping[str, str] = field(default_factory=dict)
    date_columns: tuple[str, ...] = ()
    derived: tuple[str, ...] = ()
    recompute: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    longitudinal: LongitudinalRoles | None = None

    def qis(self, df: pd.DataFrame) -> dict[str, Hierarchy]:
        """Hierarchies of the QIs for ``df`` (required ones, then optional present)."""
        out = {c: f() for c, f in self.quasi_identifiers.items()}
        out.update({c: f() for c, f in self.optional_qis.items() if c in df.columns})
        return out


def roles_for(use_case) -> Roles:
    """The :class:`Roles` of a use case: ``use_case`` itself, or the ``roles`` of a
    use-case object (:class:`phems_clinical.usecases.UseCase`); a bare name is
    refused (this library never looks use cases up by name)."""
    if isinstance(use_case, Roles):
        return use_case
    roles = getattr(use_case, "roles", None)
    if isinstance(roles, Roles):
        return roles
    if isinstance(use_case, str):
        raise AnonymiseError(
            f"use case {use_case!r}: pass its Roles "
            f"(phems_clinical.usecases.get({use_case!r}).roles), "
            f"not its name"
        )
    raise AnonymiseError(
        f"roles: expected a Roles or a use case, got {type(use_case).__name__}"
    )


class Release(NamedTuple):
    """Anonymised analysis table, its patient table (labels) and the change report."""

    data: pd.DataFrame
    patients: pd.DataFrame
    report: dict


def _sensitive_value(df: pd.DataFrame, pid: str, col: str, rule: str) -> pd.Series:
    g = df.groupby(pid, sort=False)
    if rule == "first":
        return g[col].first()
    if rule == "max":
        return g[col].max()
    if rule.startswith("state:"):  # patient ever reaches this state (cardiac DEAD)
        state = rule.split(":", 1)[1]
        hit = df["state"].eq(state) | df.get("next_state", df["state"]).eq(state)
        return hit.groupby(df[pid], sort=False).max().astype(int)
    raise AnonymiseError(f"sensitive rule {rule!r} for {col!r} is unknown")


def patient_table(data: pd.DataFrame, roles) -> pd.DataFrame:
    """One row per patient: the QIs at the patient's first row and the sensitive
    attributes (indexed by the patient id, in order of first appearance)."""
    roles = roles_for(roles)
    _check_columns(data, roles)
    qis = list(roles.qis(data))
    pid = roles.patient_id
    out = data.groupby(pid, sort=False)[qis].first()
    for s in roles.sensitive:
        if s in data.columns or roles.sensitive_rule.get(s, "").startswith("state:"):
            out[s] = _sensitive_value(
                data, pid, s, roles.sensitive_rule.get(s, "first")
            )
    return out


def _check_columns(data: pd.DataFrame, roles: Roles) -> None:
    if not isinstance(data, pd.DataFrame):
        raise AnonymiseError(
            f"data: expected a pandas DataFrame, got {type(data).__name__}"
        )
    need = [roles.patient_id, *roles.quasi_identifiers]
    missing = [c for c in need if c not in data.columns]
    if missing:
        raise AnonymiseError(
            f"{roles.use_case}: quasi-identifier/patient column(s) {missing} missing "
            f"from the table (roles: patient id {roles.patient_id!r}, QIs "
            f"{list(roles.quasi_identifiers)}; columns: {list(data.columns)})"
        )
    if len(data) == 0:
        raise AnonymiseError(f"{roles.use_case}: the table is empty")


def check_table(data: pd.DataFrame, roles) -> None:
    """Raise if a required QI or the patient column is missing, or a QI value is
    outside its hierarchy (:class:`HierarchyError` naming the column and rows)."""
    roles = roles_for(roles)
    _check_columns(data, roles)
    for col, h in roles.qis(data).items():
        check_covers(h, data[col])


def _representatives(
    orig: pd.Series,
    labels: pd.Series,
    keep: np.ndarray,
    level: int | None,
    hierarchy: Hierarchy,
) -> pd.Series:
    """Per patient, the released value of one QI.

    A '*' (the top level, or a suppressed cell) gives the median over all released
    patients for a numeric QI with intervals, and missing otherwise. Level 0: the
    original. Otherwise a numeric QI gets the median of the original values of the
    released patients sharing its label (>= k patients), a non-numeric QI its label.
    """
    star = (labels.astype(object) == SUPPRESSED).to_numpy()
    numeric = pd.api.types.is_numeric_dtype(orig) and not pd.api.types.is_bool_dtype(
        orig
    )
    if level == 0 or hierarchy.height == 1:
        rep = orig.astype(float) if numeric else orig.astype(object)
    elif not numeric:
        rep = labels.astype(object)
    else:
        med = orig[keep & ~star].groupby(labels[keep & ~star]).median()
        rep = labels.map(med).astype(float)
    if star.any():
        rep = rep.copy()
        fill = (
            float(orig[keep].median())
            if numeric and hierarchy.height > 1
            else (np.nan if numeric else None)
        )
        rep[star] = fill
    return rep


def _pseudonyms(key, values: pd.Series) -> pd.Series:
    """Random 1..n pseudonym per distinct value (a random permutation)."""
    uniq = pd.unique(values)
    perm = np.asarray(jax.random.permutation(key, len(uniq))) + 1
    return values.map(dict(zip(uniq, perm.tolist(), strict=True))).astype(np.int64)


def _config(roles, qis, k, l, t, sensitive, max_suppression, method, metric):  # noqa: E741
    return {
        "use_case": roles.use_case,
        "quasi_identifiers": qis,
        "k": int(k),
        "l": l,
        "t": t,
        "sensitive": sensitive,
        "max_suppression": float(max_suppression),
        "method": method,
        "metric": metric,
    }


def _already(data: pd.DataFrame, roles: Roles, qis, config) -> Release | None:
    """Return the input unchanged if it is already a release meeting ``config``."""
    bands = [c + BAND_SUFFIX for c in qis]
    mark = data.attrs.get(MARKER)
    if mark is None and not all(b in data.columns for b in bands):
        return None
    if mark is not None and mark.get("config") != config:
        raise AnonymiseError(
            f"the table is already anonymised with {mark.get('config')}; anonymise "
            f"the original data instead of re-anonymising a release"
        )
    if not all(b in data.columns for b in bands):
        raise AnonymiseError(f"the table is marked anonymised but lacks {bands}")
    pt = data.groupby(roles.patient_id, sort=False)[bands].first()
    k_now = k_anonymity(pt, bands)
    if k_now < config["k"]:
        raise AnonymiseError(
            f"the table has release columns {bands} but is only {k_now}-anonymous, "
            f"not k={config['k']}: anonymise the original data instead"
        )
    out = data.copy()
    out.attrs[MARKER] = {"config": config}
    return Release(
        out,
        pt,
        {
            "already_anonymised": True,
            "k": k_now,
            "rows_in": len(data),
            "rows_out": len(data),
            "config": config,
        },
    )


def anonymise(
    key,
    data: pd.DataFrame,
    roles: Roles | str,
    *,
    k: int = 5,
    l: int | None = None,  # noqa: E741 (l-diversity, as in the literature)
    t: float | None = None,
    sensitive: str | None = None,
    max_suppression: float = 0.05,
    method: Literal["lattice", "mondrian"] = "lattice",
    metric: Literal["loss", "discernibility"] = "loss",
    suppression: Literal["records", "cells"] = "records",
    max_shift_days: int = 365,
) -> Release:
    """Anonymise one site's analysis table at patient level (see module docstring).

    Parameters
    ----------
    key : jax PRNG key
        Date shifts and pseudonyms.
    data : DataFrame
        The use case's analysis table (PK events, PICU hourly table, cardiac
        sojourns).
    roles : Roles, or a use case (its ``roles``; :mod:`phems_clinical.usecases`)
    k, l, t : privacy model: k-anonymity, distinct l-diversity and t-closeness (EMD)
        of ``sensitive`` (default: the roles' first sensitive attribute when l or t
        is given).
    max_suppression : share of patients that may be suppressed (ARX default 0 to
        10 %; EMA Policy 0070 accepts suppression with generalisation), or with
        ``suppression="cells"`` the share of QI cells (local suppression: single
        values become '*', released as missing or the overall median).
    method : 'lattice' (optimal full-domain generalisation) or 'mondrian'.

    Raises
    ------
    AnonymiseError, SearchError, HierarchyError
        A QI or patient column is missing, k exceeds the number of patients, no
        anonymisation meets the model within ``max_suppression`` (with the best k
        reachable), or a hierarchy does not cover a value (named with its rows).
    """
    roles = roles_for(roles)
    _check_columns(data, roles)
    hier = roles.qis(data)
    qis = list(hier)
    if (l is not None or t is not None) and sensitive is None:
        if not roles.sensitive:
            raise AnonymiseError(
                f"{roles.use_case}: l/t need a sensitive column "
                f"and the roles declare none; pass sensitive="
            )
        sensitive = roles.sensitive[0]
    if method not in ("lattice", "mondrian"):
        raise AnonymiseError(
            f"method: expected 'lattice' or 'mondrian', got {method!r}"
        )
    if suppression == "cells" and method != "lattice":
        raise AnonymiseError(
            "suppression='cells' needs method='lattice' (Mondrian "
            "partitions without suppressing)"
        )
    config = _config(roles, qis, k, l, t, sensitive, max_suppression, method, metric)
    if suppression != "records":
        config["suppression"] = suppression
    done = _already(data, roles, qis, config)
    if done is not None:
        return done

    pid = roles.patient_id
    patients = patient_table(data, roles)
    if sensitive is not None and sensitive not in patients.columns:
        raise AnonymiseError(f"sensitive column {sensitive!r} missing from the table")
    n_pat = len(patients)
    if isinstance(k, int | np.integer) and not isinstance(k, bool) and k > n_pat:
        raise AnonymiseError(
            f"k={k} is impossible: the table has {n_pat} patients (k must be <= the "
            f"number of patients)"
        )
    flat = patients.reset_index(drop=True)
    if method == "lattice":
        res = lattice_search(
            flat,
            hier,
            k=k,
            l=l,
            sensitive=sensitive,
            t=t,
            max_suppression=max_suppression,
            metric=metric,
            suppression=suppression,
        )
    else:
        ordered = flat.copy()
        for c in qis:
            if not pd.api.types.is_numeric_dtype(
                ordered[c]
            ) or pd.api.types.is_bool_dtype(ordered[c]):
                ordered[c] = pd.Categorical(ordered[c], ordered=True)
        res = mondrian(ordered, qis, k, l=l, sensitive=sensitive)
    keep = ~np.asarray(res.suppressed, bool)
    labels = res.data[qis].astype(object).set_axis(patients.index)
    keep_s = pd.Series(keep, index=patients.index)

    # released values per patient
    rep = {
        c: _representatives(
            patients[c],
            labels[c],
            keep,
            None if res.levels is None else res.levels[c],
            hier[c],
        )
        for c in qis
    }
    out = data[data[pid].map(keep_s).to_numpy(bool)].copy()
    for c in qis:
        out[c] = out[pid].map(rep[c]).to_numpy()
        out[c + BAND_SUFFIX] = out[pid].map(labels[c].astype(str)).to_numpy()
    recomputed: list[str] = []
    if roles.recompute is not None and any(c in out.columns for c in roles.derived):
        before = set(out.columns)
        out = roles.recompute(out)
        recomputed = [c for c in roles.derived if c in before]
    k_ids, k_dates = jax.random.split(key)
    shifted: list[str] = []
    # declared date columns and any other calendar column (e.g. a PK extract's
    # DATETIME): dates are identifiers (HIPAA Safe Harbor), never released as is
    dates = [
        c
        for c in out.columns
        if c in roles.date_columns or pd.api.types.is_datetime64_any_dtype(out[c])
    ]
    if dates:
        out, _ = shift_dates(k_dates, out, pid, dates, max_days=max_shift_days)
        shifted = dates
    id_keys = jax.random.split(k_ids, len(roles.identifiers))
    for kk, c in zip(id_keys, roles.identifiers, strict=True):
        if c in out.columns:
            out[c] = _pseudonyms(kk, out[c])
    out = out.reset_index(drop=True)

    released = labels[keep].copy()
    if sensitive is not None:
        released[sensitive] = patients.loc[keep, sensitive].to_numpy()
    rel_flat = released.reset_index(drop=True)
    heights = {c: hier[c].height for c in qis}
    privacy = anonymity_report(
        rel_flat,
        qis,
        sensitive=sensitive,
        levels=res.levels,
        heights=heights if res.levels is not None else None,
    )
    report = {
        "use_case": roles.use_case,
        "config": config,
        "already_anonymised": False,
        "patients_in": n_pat,
        "patients_out": int(keep.sum()),
        "patients_suppressed": int((~keep).sum()),
        "suppressed_share": float((~keep).mean()),
        "rows_in": len(data),
        "rows_out": len(out),
        "rows_removed": len(data) - len(out),
        "quasi_identifiers": {
            c: {
                "level": None if res.levels is None else int(res.levels[c]),
                "height": hier[c].height,
                "patients_changed": int(
                    res.changes["quasi_identifiers"][c]["cells_changed"]
                ),
                "cells_suppressed": int(
                    ((labels[c].astype(object) == SUPPRESSED).to_numpy() & keep).sum()
                )
                if res.levels is not None and res.levels[c] < hier[c].height
                else 0,
                "released_as": "median of the original values per label"
                if pd.api.types.is_numeric_dtype(patients[c])
                else "label",
            }
            for c in qis
        },
        "recomputed_columns": recomputed,
        "dates_shifted": {"columns": shifted, "max_days": max_shift_days}
        if shifted
        else None,
        "pseudonymised": [c for c in roles.identifiers if c in data.columns],
        "search": {kk: v for kk, v in res.metrics.items() if kk != "partitions"},
        "privacy": privacy,
        "k": int(privacy["k"]),
    }
    out.attrs[MARKER] = {"config": config}
    return Release(out, released, report)


def anonymise_longitudinal(
    key,
    data: pd.DataFrame,
    roles,
    *,
    micro_k: int | None = None,
    noise: float = 0.0,
    time_grid: float | None = None,
    longitudinal: LongitudinalRoles | None = None,
    **options,
) -> Release:
    """:func:`anonymise` (QI generalisation, pseudonyms, date shifts), then the
    perturbation of the measured values and event times that QI generalisation
    leaves as they are (:func:`.perturb.perturb_longitudinal`).

    Parameters
    ----------
    key : jax PRNG key
        The run key. ``anonymise`` gets ``key`` itself (so with every
        longitudinal option off the release is that of ``anonymise(key, ...)``,
        up to its date shifts, which are fresh secret draws); the noise draws
        from ``fold_in(key, 1)``: reproducible anonymisation, not a
        differential-privacy guarantee.
    data, roles : as for :func:`anonymise`.
    micro_k : int or None
        MDAV group size for each course's level (None: off).
    noise : float
        CV of the log-normal noise of multiplicative columns and SD, as a fraction
        of the column SD, of the normal noise of additive columns (0: off).
    time_grid : float or None
        Event times rounded up to this grid, in ``roles.longitudinal.time_unit``.
    longitudinal : LongitudinalRoles, optional
        Overrides ``roles.longitudinal``.
    **options
        ``k``, ``l``, ``t``, ``max_suppression``, ``method``... of
        :func:`anonymise`.

    Returns
    -------
    Release
        ``report["longitudinal"]`` holds the perturbation report and
        ``report["information_loss"]`` the IL1s per column (QIs, values, times)
        against the original rows of the released patients, their mean and the
        suppressed share; ``report["config"]["longitudinal"]`` the options.
    """
    roles = roles_for(roles)
    lon = longitudinal if longitudinal is not None else roles.longitudinal
    settings = {
        "micro_k": None if micro_k is None else int(micro_k),
        "noise": float(noise),
        "time_grid": None if time_grid is None else float(time_grid),
    }
    active = micro_k is not None or noise != 0 or time_grid is not None
    if active and lon is None:
        raise AnonymiseError(
            f"{roles.use_case}: micro_k/noise/time_grid need the "
            f"longitudinal columns, and the roles declare none"
        )
    mark = data.attrs.get(MARKER) if isinstance(data, pd.DataFrame) else None
    if mark is not None and "longitudinal" in mark.get("config", {}):
        cfg = dict(mark["config"])
        if cfg.pop("longitudinal") != settings:
            raise AnonymiseError(
                f"the table is already perturbed with {mark['config']['longitudinal']}"
                f"; anonymise the original data instead of re-anonymising a release"
            )
        return Release(
            data.copy(),
            patient_table(data, roles),
            {
                "already_anonymised": True,
                "rows_in": len(data),
                "rows_out": len(data),
                "config": mark["config"],
            },
        )
    rel = anonymise(key, data, roles, **options)
    if rel.report.get("already_anonymised"):
        if active:
            raise AnonymiseError(
                "the table is already a QI release with no record of its "
                "longitudinal perturbation; perturb the original data instead"
            )
        return rel
    if not active:  # the QI release itself, with its loss on the same columns
        cols = [
            *rel.report["quasi_identifiers"],
            *([] if lon is None else [*lon.values, *lon.times]),
        ]
        return rel._replace(
            report={
                **rel.report,
                "information_loss": _information_loss(data, rel, rel.data, cols, roles),
            }
        )
    pert = perturb_longitudinal(
        jax.random.fold_in(key, 1),
        rel.data,
        lon,
        micro_k=micro_k,
        noise=noise,
        time_grid=time_grid,
    )
    out = pert.data
    cols = [
        *rel.report["quasi_identifiers"],
        *pert.report["values"],
        *pert.report["times"],
    ]
    config = {**rel.report["config"], "longitudinal": settings}
    report = {
        **rel.report,
        "config": config,
        "longitudinal": pert.report,
        "information_loss": _information_loss(data, rel, out, cols, roles),
    }
    out.attrs[MARKER] = {"config": config}
    return Release(out, rel.patients, report)


def _information_loss(
    data: pd.DataFrame, rel: Release, out: pd.DataFrame, columns, roles: Roles
) -> dict:
    """IL1s per numeric column of ``out`` against the original rows of the
    released patients (same order), their mean, and the suppressed share."""
    kept = data[data[roles.patient_id].isin(rel.patients.index)].reset_index(drop=True)
    cols = [
        c
        for c in columns
        if c in out.columns
        and c in kept.columns
        and pd.api.types.is_numeric_dtype(kept[c])
        and not pd.api.types.is_bool_dtype(kept[c])
    ]
    loss = il1s(kept, out, cols)
    return {
        "il1s": loss,
        "il1s_mean": float(np.mean(list(loss.values()))) if loss else 0.0,
        "suppressed_share": rel.report["suppressed_share"],
    }
