"""Anonymisation search: full-domain lattice search and Mondrian.

* :func:`generalise` applies one full-domain generalisation (one level per
  quasi-identifier, QI) to the *original* values with the hierarchies of
  :mod:`.hierarchies`.
* :func:`lattice_search` is global full-domain recoding with record suppression, as
  in ARX / Flash / OLA (El Emam et al., JAMIA 2009;16(5):670-682; Kohlmayer et al.,
  "Flash", J Biomed Inform 2012;45(5):869-879; Prasser & Kohlmayer 2015). Every
  node (level vector) of the generalisation lattice is a candidate; at a node the
  records of the classes that fail the privacy model (|EC| < k, fewer than l
  distinct sensitive values, or an EMD above t) are suppressed if their share is
  <= ``max_suppression``, and the node is kept if the released table then
  satisfies the model, checked by :mod:`.anonymity`. The kept node with the least
  information loss wins; ties go to the lowest sum of levels, then the
  lexicographically smallest level vector. Pruning: without suppression both
  metrics are monotone (never decrease up the lattice), so the successors of a
  kept node cannot beat it and are skipped unevaluated; with suppression every
  node is evaluated (exhaustive, fine for a handful of QIs with small heights).
* :func:`mondrian` is strict multidimensional partitioning (LeFevre, DeWitt &
  Ramakrishnan, ICDE 2006:25) for numeric and ordered-categorical QIs: median
  splits on the widest normalised dimension while both halves keep >= k records
  (and >= l distinct sensitive values). Each class's QIs become '[lo, hi]'
  (numeric) or '{a, b}' (the values present, in category order).

Information loss ``metric``: ``"loss"`` = mean over records and QIs of
level/height (1 - Prec, Sweeney 2002), a suppressed record counting as fully
generalised (1 per QI); ``"discernibility"`` = C_DM (Bayardo & Agrawal 2005),
sum |EC|^2 + n_suppressed * n.

Suppressed records stay in :attr:`AnonymisationResult.data` with every QI set to
'*' and are flagged in the boolean mask ``suppressed`` (pass it to the
:mod:`.anonymity` checks); drop them with ``data[~suppressed]`` before release.

Idempotence: levels always apply to original values. The output carries a marker
in ``DataFrame.attrs`` (:data:`MARKER`) recording the levels and the search
configuration; :func:`generalise` with the same levels, :meth:`AnonymisationResult.
apply`, :func:`lattice_search` and :func:`mondrian` with the same configuration
return such an output unchanged (a copy, with an empty change report) instead of
generalising labels again. Asking for different levels on marked output is an
error (re-generalise the originals instead).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from phems_clinical.privacy.anonymity import (
    discernibility,
    k_anonymity,
    l_diversity,
    t_closeness,
)
from phems_clinical.privacy.hierarchies import SUPPRESSED, Hierarchy

__all__ = [
    "MARKER",
    "AnonymisationResult",
    "SearchError",
    "generalise",
    "lattice_search",
    "mondrian",
]

#: ``DataFrame.attrs`` key marking anonymised output (levels and configuration).
MARKER = "phems_anonymisation"


class SearchError(ValueError):
    """Bad input to a search, or no anonymisation satisfies the privacy model."""


@dataclass
class AnonymisationResult:
    """Anonymised table and what was done.

    ``data``: the table, QIs replaced by labels, suppressed records with '*' QIs;
    ``levels``: level per QI (lattice search; ``None`` for Mondrian);
    ``suppressed``: boolean mask of suppressed records; ``metrics``: k, l, t,
    information loss...; ``changes``: per QI the level and changed-cell count,
    suppressed count and share.
    """

    data: pd.DataFrame
    levels: dict[str, int] | None
    suppressed: np.ndarray
    metrics: dict
    changes: dict
    hierarchies: Mapping[str, Hierarchy] | None = field(default=None, repr=False)

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        """Re-apply this result's levels and suppression to ``df``.

        ``df`` is the original table (same rows) or this result's own output, which
        comes back unchanged.
        """
        if _marker(df) is not None and _marker(df) == _marker(self.data):
            return df.copy()
        if self.levels is None or self.hierarchies is None:
            raise SearchError(
                "apply: a Mondrian result can only be re-applied to "
                "its own output; re-run mondrian() on the original"
            )
        if len(df) != len(self.suppressed):
            raise SearchError(
                f"apply: the table has {len(df)} rows, the result "
                f"{len(self.suppressed)}"
            )
        out = generalise(df, self.hierarchies, self.levels)
        out = _suppress(out, list(self.levels), self.suppressed)
        out.attrs[MARKER] = _marker(self.data)
        return out


# ------------------------------------------------------------------ helpers
def _marker(df: pd.DataFrame):
    return df.attrs.get(MARKER)


def _check_qis(df: pd.DataFrame, qis: Sequence[str]) -> list[str]:
    if not isinstance(df, pd.DataFrame):
        raise SearchError(
            f"table: expected a pandas DataFrame, got {type(df).__name__}"
        )
    qis = list(qis)
    if not qis:
        raise SearchError("quasi-identifiers: at least one is needed, got none")
    missing = [c for c in qis if c not in df.columns]
    if missing:
        raise SearchError(
            f"quasi-identifier column(s) {missing} missing from the "
            f"table (columns: {list(df.columns)})"
        )
    if len(df) == 0:
        raise SearchError("table: it is empty; at least one record is needed")
    return qis


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise SearchError(f"k: expected an integer >= 1, got {k!r}")
    if k > n:
        raise SearchError(
            f"k={k} is impossible for a table of {n} records "
            f"(k must be <= the number of records)"
        )
    return int(k)


def _check_sensitive(df, qis, l, sensitive, t):  # noqa: E741
    if (l is not None or t is not None) and sensitive is None:
        raise SearchError(
            "sensitive: l-diversity and t-closeness need a sensitive column"
        )
    if sensitive is None:
        return None
    if sensitive not in df.columns:
        raise SearchError(f"sensitive column {sensitive!r} missing from the table")
    if sensitive in qis:
        raise SearchError(f"sensitive column {sensitive!r} is also a quasi-identifier")
    if l is not None and (
        isinstance(l, bool) or not isinstance(l, int | np.integer) or l < 1
    ):
        raise SearchError(f"l: expected an integer >= 1, got {l!r}")
    if t is not None and not 0.0 <= t <= 1.0:
        raise SearchError(f"t: expected a number in [0, 1], got {t!r}")
    return sensitive


def _suppress(out: pd.DataFrame, qis: list[str], mask: np.ndarray) -> pd.DataFrame:
    if mask.any():
        for c in qis:
            col = out[c].astype(object)
            col[mask] = SUPPRESSED
            out[c] = col
    return out


def _changed(orig: pd.Series, new: pd.Series) -> int:
    a = orig.astype(object).to_numpy()
    b = new.astype(object).to_numpy()
    same = (a == b) | (pd.isna(a) & pd.isna(b))
    return int((~same).sum())


def _changes(orig, out, qis, levels, mask) -> dict:
    n = len(orig)
    return {
        "quasi_identifiers": {
            c: {
                "level": None if levels is None else int(levels[c]),
                "cells_changed": _changed(orig[c], out[c]),
            }
            for c in qis
        },
        "suppressed_rows": int(mask.sum()),
        "suppressed_share": float(mask.sum() / n),
    }


def _unchanged(df, qis, levels, hierarchies=None) -> AnonymisationResult:
    """Result for already-anonymised input with the same configuration."""
    star = np.logical_and.reduce(
        [(df[c].astype(object) == SUPPRESSED).to_numpy() for c in qis]
    )
    all_top = levels is not None and all(
        levels[c] == hierarchies[c].height for c in qis
    )
    mask = np.zeros(len(df), dtype=bool) if levels is None or all_top else star
    out = df.copy()
    empty = {
        "quasi_identifiers": {
            c: {"level": None if levels is None else int(levels[c]), "cells_changed": 0}
            for c in qis
        },
        "suppressed_rows": 0,
        "suppressed_share": 0.0,
        "already_anonymised": True,
    }
    return AnonymisationResult(
        out,
        None if levels is None else dict(levels),
        mask,
        dict(_marker(df).get("metrics", {})),
        empty,
        hierarchies,
    )


# ------------------------------------------------------------------ generalise
def generalise(
    df: pd.DataFrame, hierarchies: Mapping[str, Hierarchy], levels: Mapping[str, int]
) -> pd.DataFrame:
    """Copy of ``df`` with each QI in ``levels`` replaced by its level's labels.

    Levels apply to the original values. Output of this function (or of a search)
    marked with the same levels comes back unchanged.
    """
    qis = _check_qis(df, list(levels))
    lv = {c: int(levels[c]) for c in qis}
    no_h = [c for c in qis if c not in hierarchies]
    if no_h:
        raise SearchError(f"hierarchies: no hierarchy for quasi-identifier(s) {no_h}")
    mark = _marker(df)
    if mark is not None:
        if mark.get("levels") == lv:
            return df.copy()
        raise SearchError(
            f"table is already anonymised (levels "
            f"{mark.get('levels')}); apply levels {lv} to the "
            f"original values instead"
        )
    out = df.copy()
    for c in qis:
        out[c] = hierarchies[c].generalise(df[c], lv[c])
    out.attrs[MARKER] = {"levels": lv}
    return out


# ------------------------------------------------------------------ lattice
def _fail_classes(codes, n_cls, sizes, k, sens_codes, l, t_emd):  # noqa: E741
    """Boolean per class: fails k, distinct l or t (EMD vs the whole table)."""
    bad = sizes < k
    if sens_codes is not None:
        if l is not None:
            pairs = np.unique(codes * (sens_codes.max() + 1) + sens_codes)
            distinct = np.bincount(pairs // (sens_codes.max() + 1), minlength=n_cls)
            bad |= distinct < l
        if t_emd is not None:
            bad |= t_emd(codes, n_cls)
    return bad


def _emd_per_class(sens: pd.Series, t: float):
    """Function (codes, n_cls) -> per-class EMD > t, same distance as anonymity."""
    is_cat = isinstance(sens.dtype, pd.CategoricalDtype)
    ordered = (is_cat and sens.cat.ordered) or (
        not is_cat
        and pd.api.types.is_numeric_dtype(sens)
        and not pd.api.types.is_bool_dtype(sens)
    )
    if ordered:
        v = pd.factorize(sens, sort=True)[0]
    else:
        v = pd.factorize(sens.to_numpy(), use_na_sentinel=False)[0]
    v = np.asarray(v, dtype=np.int64)
    m = int(v.max()) + 1

    def fails(codes: np.ndarray, n_cls: int) -> np.ndarray:
        if m == 1:
            return np.zeros(n_cls, dtype=bool)
        p = np.bincount(v, minlength=m) / len(v)
        cnt = np.bincount(codes * m + v, minlength=n_cls * m).reshape(n_cls, m)
        r = cnt / cnt.sum(axis=1, keepdims=True) - p
        if ordered:
            emd = np.abs(np.cumsum(r, axis=1)).sum(axis=1) / (m - 1)
        else:
            emd = 0.5 * np.abs(r).sum(axis=1)
        return emd > t + 1e-12

    return fails


def _combine(codes_per_qi: Sequence[np.ndarray]) -> np.ndarray:
    """Class index per record from per-QI integer codes (-1 = suppressed cell)."""
    stacked = np.column_stack([np.asarray(c, np.int64) for c in codes_per_qi])
    return np.unique(stacked, axis=0, return_inverse=True)[1].reshape(-1)


def _suppress_cells(codes_per_qi, k, sens_codes, l, t_emd):  # noqa: E741
    """Greedy local suppression (after sdcMicro's ``localSuppression``, Templ et
    al., J Stat Softw 2015;67(4)): at each step the records of failing classes get
    one more QI cell replaced by '*' (code -1; '*' is a value of its own, so the
    released table is k-anonymous as checked by :mod:`.anonymity`). The QI chosen
    is the one that leaves the fewest failing records (ties: most distinct labels,
    then QI order). Records still failing after every QI are suppressed whole.

    Returns (cells (n, q) bool, records (n,) bool).
    """
    codes = [np.asarray(c, np.int64).copy() for c in codes_per_qi]
    n, q = len(codes[0]), len(codes)
    cells = np.zeros((n, q), dtype=bool)
    distinct = [len(np.unique(c)) for c in codes]

    def failing(cs) -> np.ndarray:
        cls = _combine(cs)
        sizes = np.bincount(cls)
        return _fail_classes(cls, len(sizes), sizes, k, sens_codes, l, t_emd)[cls]

    bad = failing(codes)
    todo = list(range(q))
    while bad.any() and todo:
        trials = []
        for j in todo:
            trial = list(codes)
            trial[j] = np.where(bad, -1, codes[j])
            trials.append((int(failing(trial).sum()), -distinct[j], j, trial))
        left, _, j, codes = min(trials, key=lambda x: x[:3])
        cells[bad, j] = True
        todo.remove(j)
        bad = failing(codes)
    cells[bad, :] = True
    return cells, bad


def lattice_search(
    df: pd.DataFrame,
    hierarchies: Mapping[str, Hierarchy],
    *,
    k: int,
    l: int | None = None,  # noqa: E741
    sensitive: str | None = None,
    t: float | None = None,
    max_suppression: float = 0.0,
    metric: Literal["loss", "discernibility"] = "loss",
    suppression: Literal["records", "cells"] = "records",
) -> AnonymisationResult:
    """Optimal full-domain generalisation with record suppression (ARX-style).

    ``hierarchies``: one :class:`Hierarchy` per QI (the QIs are its keys).
    ``l`` is distinct l-diversity and ``t`` t-closeness of column ``sensitive``.
    ``suppression``: ``"records"`` suppresses every QI of the records in failing
    classes; ``"cells"`` (local suppression, as sdcMicro's ``localSuppression``)
    replaces single QI values of those records by '*', QI by QI (most distinct
    labels first), until every class passes; then ``max_suppression`` is the
    largest share of QI cells suppressed, and a suppressed cell counts as fully
    generalised in the information loss. Raises :class:`SearchError` for a
    missing QI, k > n, or when no node satisfies the model within
    ``max_suppression``.
    """
    qis = _check_qis(df, list(hierarchies))
    n = len(df)
    k = _check_k(k, n)
    sensitive = _check_sensitive(df, qis, l, sensitive, t)
    if metric not in ("loss", "discernibility"):
        raise SearchError(
            f"metric: expected 'loss' or 'discernibility', got {metric!r}"
        )
    if suppression not in ("records", "cells"):
        raise SearchError(
            f"suppression: expected 'records' or 'cells', got {suppression!r}"
        )
    if not 0.0 <= max_suppression <= 1.0:
        raise SearchError(
            f"max_suppression: expected a share in [0, 1], got {max_suppression!r}"
        )
    config = {
        "method": "lattice",
        "k": k,
        "l": l,
        "sensitive": sensitive,
        "t": t,
        "max_suppression": float(max_suppression),
        "metric": metric,
        "quasi_identifiers": qis,
    }
    if suppression == "cells":
        config["suppression"] = "cells"
    mark = _marker(df)
    if mark is not None and mark.get("config") == config:
        return _unchanged(df, qis, mark["levels"], hierarchies)
    if mark is not None:
        raise SearchError(
            f"table is already anonymised ({mark.get('config')}); "
            f"search the original values instead"
        )

    heights = [hierarchies[c].height for c in qis]
    # factorised labels per QI and level (levels apply to the original values)
    lab_codes = [
        [
            pd.factorize(
                hierarchies[c].generalise(df[c], lv).to_numpy(), use_na_sentinel=False
            )[0].astype(np.int64)
            for lv in range(h + 1)
        ]
        for c, h in zip(qis, heights, strict=True)
    ]
    sens_codes = None
    t_emd = None
    if sensitive is not None:
        sens_codes = np.asarray(
            pd.factorize(df[sensitive].to_numpy(), use_na_sentinel=False)[0], np.int64
        )
        if t is not None:
            t_emd = _emd_per_class(df[sensitive], t)

    nodes = sorted(
        itertools.product(*(range(h + 1) for h in heights)), key=lambda v: (sum(v), v)
    )
    monotone = max_suppression == 0.0
    kept: list[tuple[int, ...]] = []
    best = None  # (metric value, sum levels, node, mask, k)
    n_eval = n_pruned = 0
    best_k_nosupp = 0
    least_supp = (np.inf, None)
    for node in nodes:
        if monotone and any(
            all(a >= b for a, b in zip(node, kn, strict=True)) for kn in kept
        ):
            n_pruned += 1
            continue
        n_eval += 1
        node_codes = [lab_codes[q][lv] for q, lv in enumerate(node)]
        codes = _combine(node_codes)
        sizes = np.bincount(codes)
        best_k_nosupp = max(best_k_nosupp, int(sizes.min()))
        if suppression == "cells":
            cells, mask = _suppress_cells(node_codes, k, sens_codes, l, t_emd)
            share = cells.mean()
            codes = _combine(
                [np.where(cells[:, q], -1, c) for q, c in enumerate(node_codes)]
            )
            sizes = np.bincount(codes)
            bad = np.zeros(len(sizes), dtype=bool)
            bad[np.unique(codes[mask])] = True
        else:
            cells = None
            bad = _fail_classes(codes, len(sizes), sizes, k, sens_codes, l, t_emd)
            mask = bad[codes]
            share = mask.mean()
        if share < least_supp[0]:
            least_supp = (share, node)
        if share > max_suppression + 1e-12 or mask.all():
            continue
        rel_sizes = sizes[~bad]
        if t is not None:  # suppression shifts the released distribution: re-check
            sub = pd.DataFrame({"c": codes, "s": df[sensitive].reset_index(drop=True)})
            if t_closeness(sub, "c", "s", suppressed=mask) > t + 1e-12:
                continue
        kept.append(node)
        if metric == "loss":
            frac = np.array([lv / h for lv, h in zip(node, heights, strict=True)])
            if cells is None:
                value = float(
                    (frac.sum() * (n - mask.sum()) + len(qis) * mask.sum())
                    / (n * len(qis))
                )
            else:
                value = float(np.where(cells, 1.0, frac[None, :]).mean())
        else:
            value = float((rel_sizes.astype(np.int64) ** 2).sum() + int(mask.sum()) * n)
        cand = (value, sum(node), node)
        if best is None or cand < best[0]:
            best = (cand, mask, cells)
    if best is None:
        sn = least_supp[1]
        raise SearchError(
            f"no lattice node satisfies k={k}"
            + (f", l={l}" if l else "")
            + (f", t={t}" if t is not None else "")
            + f" within max_suppression={max_suppression:g}: the best k reached "
            f"without suppression is {best_k_nosupp}; the least suppression needed "
            f"is {least_supp[0]:.1%} of records (levels "
            f"{dict(zip(qis, sn, strict=True)) if sn else None})"
        )

    (value, _, node), mask, cells = best
    levels = dict(zip(qis, (int(v) for v in node), strict=True))
    out = df.copy()
    for c in qis:
        out[c] = hierarchies[c].generalise(df[c], levels[c])
    out = _suppress(out, qis, mask)
    if cells is not None:
        for q, c in enumerate(qis):
            col = out[c].astype(object)
            col[cells[:, q]] = SUPPRESSED
            out[c] = col
    metrics = {
        "k": k_anonymity(out, qis, suppressed=mask),
        "metric": metric,
        "information_loss": value,
        "discernibility": discernibility(out, qis, suppressed=mask),
        "suppressed_share": float(mask.mean()),
        "suppressed_cells": 0 if cells is None else int(cells[~mask].sum()),
        "suppressed_cell_share": 0.0 if cells is None else float(cells.mean()),
        "nodes": len(nodes),
        "nodes_evaluated": n_eval,
        "nodes_pruned": n_pruned,
    }
    if sensitive is not None:
        rel = out.reset_index(drop=True)
        metrics["l"] = l_diversity(rel, qis, sensitive, suppressed=mask)
        metrics["t"] = t_closeness(rel, qis, sensitive, suppressed=mask)
    out.attrs[MARKER] = {"levels": levels, "config": config, "metrics": metrics}
    return AnonymisationResult(
        out, levels, mask, metrics, _changes(df, out, qis, levels, mask), hierarchies
    )


# ------------------------------------------------------------------ Mondrian
def _ordinal(df: pd.DataFrame, c: str) -> np.ndarray:
    s = df[c]
    if isinstance(s.dtype, pd.CategoricalDtype):
        if not s.cat.ordered:
            raise SearchError(
                f"mondrian: quasi-identifier {c!r} is an unordered "
                f"categorical; Mondrian needs numbers or ordered "
                f"categories"
            )
        if s.isna().any():
            raise SearchError(f"mondrian: quasi-identifier {c!r} has missing values")
        return s.cat.codes.to_numpy(dtype=np.float64)
    if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        raise SearchError(
            f"mondrian: quasi-identifier {c!r} has dtype {s.dtype}; "
            f"Mondrian needs numbers or ordered categories"
        )
    v = s.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(v).any():
        raise SearchError(f"mondrian: quasi-identifier {c!r} has missing values")
    return v


def mondrian(
    df: pd.DataFrame,
    qis: Sequence[str],
    k: int,
    *,
    l: int | None = None,  # noqa: E741
    sensitive: str | None = None,
) -> AnonymisationResult:
    """Strict multidimensional Mondrian partitioning (LeFevre et al., ICDE 2006).

    A partition is cut at the median of the QI with the widest range (normalised
    by the table's range), records <= median left; a cut is allowed if both sides
    have >= k records (and >= l distinct ``sensitive`` values). Each final class's
    QIs are replaced by '[lo, hi]' or '{a, b}'. ``metrics['partitions']`` lists the
    row positions of each class.
    """
    qis = _check_qis(df, qis)
    n = len(df)
    k = _check_k(k, n)
    sensitive = _check_sensitive(df, qis, l, sensitive, None)
    config = {
        "method": "mondrian",
        "k": k,
        "l": l,
        "sensitive": sensitive,
        "quasi_identifiers": qis,
    }
    mark = _marker(df)
    if mark is not None and mark.get("config") == config:
        return _unchanged(df, qis, None)
    if mark is not None:
        raise SearchError(
            f"table is already anonymised ({mark.get('config')}); "
            f"partition the original values instead"
        )
    x = np.column_stack([_ordinal(df, c) for c in qis])
    span = x.max(axis=0) - x.min(axis=0)
    span[span == 0] = 1.0
    sens = None
    if sensitive is not None:
        sens = pd.factorize(df[sensitive].to_numpy(), use_na_sentinel=False)[0]
        if l is not None and len(np.unique(sens)) < l:
            raise SearchError(
                f"mondrian: l={l} is impossible: {sensitive!r} has "
                f"only {len(np.unique(sens))} distinct values"
            )

    def ok(rows: np.ndarray) -> bool:
        if len(rows) < k:
            return False
        return l is None or len(np.unique(sens[rows])) >= l

    leaves: list[np.ndarray] = []
    stack = [np.arange(n)]
    while stack:
        rows = stack.pop()
        sub = x[rows]
        widths = (sub.max(axis=0) - sub.min(axis=0)) / span
        split = None
        for d in np.argsort(-widths, kind="stable"):
            if widths[d] == 0:
                break
            v = sub[:, d]
            med = np.median(v)
            for left in (v <= med, v < med):
                if left.any() and (~left).any() and ok(rows[left]) and ok(rows[~left]):
                    split = (rows[left], rows[~left])
                    break
            if split:
                break
        if split is None:
            leaves.append(rows)
        else:
            stack.extend([split[1], split[0]])

    out = df.copy()
    labels = {c: np.empty(n, dtype=object) for c in qis}
    for rows in leaves:
        for j, c in enumerate(qis):
            s = df[c]
            if isinstance(s.dtype, pd.CategoricalDtype):
                cats = s.cat.categories
                present = np.unique(x[rows, j]).astype(int)
                lab = "{" + ", ".join(str(cats[i]) for i in present) + "}"
            else:
                lo, hi = x[rows, j].min(), x[rows, j].max()
                lab = f"[{lo:g}, {hi:g}]"
            labels[c][rows] = lab
    for c in qis:
        out[c] = pd.Series(labels[c], index=df.index, dtype=object)
    mask = np.zeros(n, dtype=bool)
    sizes = np.array([len(r) for r in leaves])
    ncp = float(
        sum(
            ((x[r].max(axis=0) - x[r].min(axis=0)) / span).mean() * len(r)
            for r in leaves
        )
        / n
    )
    metrics = {
        "k": k_anonymity(out, qis),
        "n_classes": len(leaves),
        "discernibility": int((sizes.astype(np.int64) ** 2).sum()),
        "normalised_certainty_penalty": ncp,
        "suppressed_share": 0.0,
        "partitions": [r.tolist() for r in leaves],
    }
    if sensitive is not None:
        metrics["l"] = l_diversity(out.reset_index(drop=True), qis, sensitive)
    out.attrs[MARKER] = {
        "levels": None,
        "config": config,
        "metrics": {kk: v for kk, v in metrics.items() if kk != "partitions"},
    }
    return AnonymisationResult(
        out, None, mask, metrics, _changes(df, out, qis, None, mask)
    )
