"""Privacy checks, re-identification risk and utility loss of a (generalised) table.

All functions are pure and vectorised (``groupby`` / ``bincount``). An *equivalence
class* (EC) is a set of released records with identical quasi-identifier (QI)
values; a missing QI value is a value of its own (``NaN`` matches ``NaN``). Rows
flagged in the optional boolean ``suppressed`` mask are not released: they belong to
no class and are left out of k, l, t and risk (they count only in discernibility and
the suppressed share).

Definitions and references:

* k-anonymity: k = min |EC| (Sweeney, IJUFKS 2002;10(5):557-570).
* l-diversity (Machanavajjhala et al., ACM TKDD 2007;1(1):3): distinct l = min over
  ECs of the number of distinct sensitive values; entropy l = min over ECs of
  exp(H), H = -sum p log p (natural log).
* t-closeness (Li, Li & Venkatasubramanian, ICDE 2007:106-115): t = max over ECs of
  the Earth Mover's Distance between the EC's and the released table's sensitive
  distribution. Ordered attributes: EMD = 1/(m-1) sum_i |sum_{j<=i} (q_j - p_j)|
  over the m distinct values present, sorted (rank distance); categorical: equal
  distance, EMD = 1/2 sum_i |q_i - p_i|.
* Re-identification risk (El Emam, Guide to the De-identification of Personal Health
  Information, CRC 2013; ARX definitions, Prasser et al. 2014): prosecutor risk
  per record 1/f_j (f_j = sample EC size); journalist risk per record 1/F_j (F_j =
  population EC size); marketer risk (1/n) sum_j f_j/F_j. Because F_j >= f_j and a
  mean never exceeds a maximum: prosecutor >= journalist >= marketer. The mean
  journalist risk equals the marketer risk; with no population (sample =
  population) marketer risk = #ECs / n = mean prosecutor risk.
* Records at risk: share of records whose risk is strictly above a threshold,
  default 0.09 (EMA Policy 0070 external guidance, EMA/90915/2016, 2018; El Emam
  2013), i.e. ECs of size <= 11.
* Discernibility C_DM = sum |EC|^2 + n_suppressed * n (Bayardo & Agrawal, ICDE
  2005:217-228); normalised average class size C_avg = (n / #ECs) / k (LeFevre,
  DeWitt & Ramakrishnan, ICDE 2006:25); generalisation loss = mean over records and
  QIs of level/height = 1 - Prec (Sweeney, IJUFKS 2002;10(5):571-588).

Checked against pycanon 1.3.6 (k, l, entropy l, t) and hand-worked tables in
``tests/privacy/test_anonymity.py``. pycanon floors entropy l to an integer; here it
is the exact float.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd

__all__ = [
    "DEFAULT_RISK_THRESHOLD",
    "AnonymityInputError",
    "anonymity_report",
    "average_class_size",
    "discernibility",
    "equivalence_classes",
    "generalisation_loss",
    "journalist_risk",
    "k_anonymity",
    "l_diversity",
    "marketer_risk",
    "prosecutor_risk",
    "suppressed_share",
    "t_closeness",
]

#: Records-at-risk threshold (EMA Policy 0070 external guidance, EMA/90915/2016).
DEFAULT_RISK_THRESHOLD = 0.09
_CHUNK_CELLS = 4_000_000  # dense (classes x values) block size for t-closeness


class AnonymityInputError(ValueError):
    """The table or an option cannot be checked (names the column or option)."""


# ---------------------------------------------------------------- validation
def _as_list(cols: str | Sequence[str], role: str) -> list[str]:
    out = [cols] if isinstance(cols, str) else list(cols)
    if not out:
        raise AnonymityInputError(f"{role}: at least one column is needed, got none")
    return out


def _check_table(df: pd.DataFrame, cols: list[str], role: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise AnonymityInputError(
            f"table: expected a pandas DataFrame, got {type(df).__name__}"
        )
    if len(df) == 0:
        raise AnonymityInputError("table: it is empty; at least one record is needed")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise AnonymityInputError(
            f"{role} column(s) {missing} missing from the table "
            f"(columns: {list(df.columns)})"
        )


def _mask(df: pd.DataFrame, suppressed) -> np.ndarray:
    if suppressed is None:
        return np.zeros(len(df), dtype=bool)
    m = np.asarray(suppressed)
    if m.shape != (len(df),) or m.dtype != bool:
        raise AnonymityInputError(
            f"suppressed: expected a boolean mask of length "
            f"{len(df)}, got dtype {m.dtype} shape {m.shape}"
        )
    if m.all():
        raise AnonymityInputError(
            "suppressed: every record is suppressed; nothing is released to check"
        )
    return m


def _threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise AnonymityInputError(
            f"threshold: expected a risk in (0, 1], got {threshold}"
        )
    return float(threshold)


def _codes(df, quasi_identifiers, suppressed):
    """(class code per row, -1 if suppressed; class sizes; mask; qi list)."""
    qis = _as_list(quasi_identifiers, "quasi_identifiers")
    _check_table(df, qis, "quasi-identifier")
    mask = _mask(df, suppressed)
    codes = np.full(len(df), -1, dtype=np.int64)
    kept = df.loc[~mask, qis] if mask.any() else df[qis]
    codes[~mask] = kept.groupby(qis, dropna=False, sort=True).ngroup().to_numpy()
    sizes = np.bincount(codes[~mask])
    return codes, sizes, mask, qis


# ---------------------------------------------------------------- classes and k
def equivalence_classes(
    df: pd.DataFrame, quasi_identifiers: str | Sequence[str], suppressed=None
) -> pd.Series:
    """Equivalence-class id per row (0.. in sorted QI order; ``<NA>`` if suppressed).

    Missing QI values form a value of their own.
    """
    codes, _, mask, _ = _codes(df, quasi_identifiers, suppressed)
    out = pd.Series(codes, index=df.index, name="equivalence_class").astype("Int64")
    out[mask] = pd.NA
    return out


def k_anonymity(
    df: pd.DataFrame, quasi_identifiers: str | Sequence[str], suppressed=None
) -> int:
    """k = smallest equivalence-class size (Sweeney 2002)."""
    return int(_codes(df, quasi_identifiers, suppressed)[1].min())


# ---------------------------------------------------------------- l and t
def _sens_cols(df, sensitive, qis):
    sens = _as_list(sensitive, "sensitive")
    _check_table(df, sens, "sensitive")
    clash = [s for s in sens if s in qis]
    if clash:
        raise AnonymityInputError(
            f"sensitive column(s) {clash} are also "
            f"quasi-identifiers; a column has one role"
        )
    return sens


def l_diversity(
    df: pd.DataFrame,
    quasi_identifiers: str | Sequence[str],
    sensitive: str | Sequence[str],
    kind: Literal["distinct", "entropy"] = "distinct",
    suppressed=None,
) -> float:
    """Distinct or entropy l (Machanavajjhala et al. 2007); min over sensitive columns.

    Distinct l = min over ECs of #distinct values (an int); entropy l = min over ECs
    of exp(-sum p ln p) (a float >= 1). A missing sensitive value is a value.
    """
    if kind not in ("distinct", "entropy"):
        raise AnonymityInputError(
            f"kind: expected 'distinct' or 'entropy', got {kind!r}"
        )
    codes, _, mask, qis = _codes(df, quasi_identifiers, suppressed)
    sens = _sens_cols(df, sensitive, qis)
    cls = codes[~mask]
    best = np.inf
    for s in sens:
        v = pd.factorize(df[s].to_numpy()[~mask], use_na_sentinel=False)[0]
        cnt = pd.DataFrame({"c": cls, "v": v}).value_counts()
        by_class = cnt.groupby(level="c")
        if kind == "distinct":
            val = float(by_class.size().min())
        else:
            p = cnt / by_class.transform("sum")
            h = (-(p * np.log(p))).groupby(level="c").sum()
            val = float(np.exp(h).min())
        best = min(best, val)
    return int(best) if kind == "distinct" else best


def _emd_max(
    cls: np.ndarray, v: np.ndarray, n_cls: int, m: int, ordered: bool
) -> float:
    """Max over classes of the EMD of q_class to p (dense blocks of classes)."""
    if m == 1:
        return 0.0
    p = np.bincount(v, minlength=m) / len(v)
    order = np.argsort(cls, kind="stable")
    cls_s, v_s = cls[order], v[order]
    starts = np.searchsorted(cls_s, np.arange(n_cls + 1))
    step = max(1, _CHUNK_CELLS // m)
    worst = 0.0
    for a in range(0, n_cls, step):
        b = min(n_cls, a + step)
        lo, hi = starts[a], starts[b]
        counts = np.bincount(
            (cls_s[lo:hi] - a) * m + v_s[lo:hi], minlength=(b - a) * m
        ).reshape(b - a, m)
        r = counts / counts.sum(axis=1, keepdims=True) - p
        if ordered:
            emd = np.abs(np.cumsum(r, axis=1)).sum(axis=1) / (m - 1)
        else:
            emd = 0.5 * np.abs(r).sum(axis=1)
        worst = max(worst, float(emd.max()))
    return worst


def t_closeness(
    df: pd.DataFrame,
    quasi_identifiers: str | Sequence[str],
    sensitive: str | Sequence[str],
    ordered: bool | None = None,
    suppressed=None,
) -> float:
    """t = max over ECs of EMD(EC, released table) (Li, Li & Venkatasubramanian 2007).

    ``ordered=None``: numeric and ordered-categorical columns use the ordered
    (rank) distance over the distinct values present, others the equal distance.
    Several sensitive columns: the max. Missing values are not allowed for an
    ordered attribute; for a categorical one they are a value.
    """
    codes, sizes, mask, qis = _codes(df, quasi_identifiers, suppressed)
    sens = _sens_cols(df, sensitive, qis)
    cls = codes[~mask]
    worst = 0.0
    for s in sens:
        col = df[s][~mask] if mask.any() else df[s]
        is_cat = isinstance(col.dtype, pd.CategoricalDtype)
        ord_s = ordered
        if ord_s is None:
            ord_s = (is_cat and col.cat.ordered) or (
                not is_cat
                and pd.api.types.is_numeric_dtype(col)
                and not pd.api.types.is_bool_dtype(col)
            )
        if ord_s:
            if col.isna().any():
                raise AnonymityInputError(
                    f"sensitive column {s!r}: missing values "
                    f"cannot be placed on an ordered scale"
                )
            v = pd.factorize(col, sort=True)[0]  # sort = category order if ordered
        else:
            v = pd.factorize(col.to_numpy(), use_na_sentinel=False)[0]
        v = np.asarray(v, dtype=np.int64)
        worst = max(worst, _emd_max(cls, v, len(sizes), int(v.max()) + 1, bool(ord_s)))
    return worst


# ---------------------------------------------------------------- risk
def prosecutor_risk(
    df: pd.DataFrame,
    quasi_identifiers: str | Sequence[str],
    threshold: float = DEFAULT_RISK_THRESHOLD,
    suppressed=None,
) -> dict[str, float]:
    """Prosecutor risk 1/f_j (El Emam 2013): max, mean, records_at_risk (> threshold).

    max = 1/k; mean = #ECs / n (mean over records of 1/|EC|).
    """
    thr = _threshold(threshold)
    _, sizes, _, _ = _codes(df, quasi_identifiers, suppressed)
    n = sizes.sum()
    return {
        "max": float(1.0 / sizes.min()),
        "mean": float(len(sizes) / n),
        "records_at_risk": float(sizes[1.0 / sizes > thr].sum() / n),
    }


def _population_sizes(population, qis: list[str]) -> pd.DataFrame:
    """Population EC sizes as a frame with the QI columns and ``__F__``."""
    if isinstance(population, pd.DataFrame):
        _check_table(population, qis, "population quasi-identifier")
        return (
            population.groupby(qis, dropna=False).size().rename("__F__").reset_index()
        )
    if isinstance(population, pd.Series):
        if population.index.nlevels != len(qis):
            raise AnonymityInputError(
                f"population: a Series of class sizes must be keyed by the "
                f"{len(qis)} quasi-identifiers {qis}, got {population.index.nlevels} "
                f"index level(s)"
            )
        vals = pd.to_numeric(population, errors="coerce").to_numpy(dtype=float)
        if not (np.isfinite(vals) & (vals >= 1)).all():
            raise AnonymityInputError("population: class sizes must be numbers >= 1")
        out = population.rename("__F__").copy()
        out.index = out.index.set_names(qis)
        return out.reset_index()
    raise AnonymityInputError(
        f"population: expected a DataFrame of the population "
        f"or a Series of class sizes, got "
        f"{type(population).__name__}"
    )


def _f_and_F(df, quasi_identifiers, population, suppressed):
    """Per sample class: f_j (sample size) and F_j (population size)."""
    codes, sizes, mask, qis = _codes(df, quasi_identifiers, suppressed)
    kept = df.loc[~mask, qis] if mask.any() else df[qis]
    reps = kept.groupby(qis, dropna=False, sort=True).size().rename("__f__")
    reps = reps.reset_index()
    pop = _population_sizes(population, qis)
    if pop.duplicated(qis).any():
        raise AnonymityInputError("population: class-size Series has duplicate keys")
    merged = reps.merge(pop, on=qis, how="left", validate="one_to_one")
    absent = merged["__F__"].isna().to_numpy()
    if absent.any():
        key = tuple(merged.loc[absent, qis].iloc[0])
        raise AnonymityInputError(
            f"population: {int(absent.sum())} sample "
            f"class(es) absent from the population, e.g. "
            f"{dict(zip(qis, key, strict=True))}"
        )
    f = merged["__f__"].to_numpy(dtype=float)
    big_f = merged["__F__"].to_numpy(dtype=float)
    if (big_f < f).any():
        raise AnonymityInputError(
            "population: a population class is smaller than "
            "the sample class; the sample must be drawn from "
            "the population"
        )
    return f, big_f


def journalist_risk(
    df: pd.DataFrame,
    quasi_identifiers: str | Sequence[str],
    population,
    threshold: float = DEFAULT_RISK_THRESHOLD,
    suppressed=None,
) -> dict[str, float]:
    """Journalist risk 1/F_j per record (El Emam 2013): max, mean, records_at_risk.

    ``population``: the population table, or a Series of population class sizes
    indexed by the QI values (MultiIndex in QI order). mean = marketer risk.
    """
    thr = _threshold(threshold)
    f, big_f = _f_and_F(df, quasi_identifiers, population, suppressed)
    n = f.sum()
    return {
        "max": float(1.0 / big_f.min()),
        "mean": float((f / big_f).sum() / n),
        "records_at_risk": float(f[1.0 / big_f > thr].sum() / n),
    }


def marketer_risk(
    df: pd.DataFrame,
    quasi_identifiers: str | Sequence[str],
    population=None,
    suppressed=None,
) -> float:
    """Marketer risk (1/n) sum_j f_j/F_j; #ECs/n without a population (El Emam 2013)."""
    if population is None:
        _, sizes, _, _ = _codes(df, quasi_identifiers, suppressed)
        return float(len(sizes) / sizes.sum())
    f, big_f = _f_and_F(df, quasi_identifiers, population, suppressed)
    return float((f / big_f).sum() / f.sum())


# ---------------------------------------------------------------- utility loss
def discernibility(
    df: pd.DataFrame, quasi_identifiers: str | Sequence[str], suppressed=None
) -> int:
    """C_DM = sum |EC|^2 + n_suppressed * n (Bayardo & Agrawal 2005)."""
    _, sizes, mask, _ = _codes(df, quasi_identifiers, suppressed)
    return int((sizes.astype(np.int64) ** 2).sum() + int(mask.sum()) * len(df))


def average_class_size(
    df: pd.DataFrame,
    quasi_identifiers: str | Sequence[str],
    k: int | None = None,
    suppressed=None,
) -> float:
    """C_avg = (n_released / #ECs) / k (LeFevre et al. 2006); k defaults to achieved k.

    Raises if k is not an integer in [1, n_released] (k impossible for the size).
    """
    _, sizes, _, _ = _codes(df, quasi_identifiers, suppressed)
    n = int(sizes.sum())
    if k is None:
        k = int(sizes.min())
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise AnonymityInputError(
            f"k: expected an integer in [1, {n}] (released records), got {k!r}"
        )
    return float(n / len(sizes) / k)


def suppressed_share(df: pd.DataFrame, suppressed=None) -> float:
    """Share of records suppressed (not released)."""
    _check_table(df, [], "table")
    return float(_mask(df, suppressed).mean()) if suppressed is not None else 0.0


def generalisation_loss(
    levels: pd.DataFrame | Mapping[str, int], heights: Mapping[str, int] | pd.Series
) -> float:
    """Mean over records and QIs of level/height = 1 - Prec (Sweeney 2002).

    ``levels``: per-record generalisation level per QI (a DataFrame, one column per
    QI) or one level per QI (full-domain). ``heights``: hierarchy height per QI; a
    QI with height 0 (no hierarchy) must be at level 0 and counts as no loss.
    """
    h = pd.Series(heights, dtype=float)
    lv = (
        pd.DataFrame([dict(levels)])
        if isinstance(levels, Mapping)
        else pd.DataFrame(levels)
    )
    if lv.empty or lv.shape[1] == 0:
        raise AnonymityInputError("levels: expected at least one record and one QI")
    missing = [c for c in lv.columns if c not in h.index]
    if missing:
        raise AnonymityInputError(
            f"heights: no hierarchy height for QI column(s) {missing}"
        )
    if (h < 0).any() or h.isna().any():
        raise AnonymityInputError("heights: expected heights >= 0")
    arr = lv.to_numpy(dtype=float)
    hh = h.loc[lv.columns].to_numpy()
    bad = np.isnan(arr) | (arr < 0) | (arr > hh)
    if bad.any():
        col = lv.columns[np.nonzero(bad.any(axis=0))[0][0]]
        raise AnonymityInputError(
            f"levels: column {col!r} has a level outside [0, height={h[col]:g}]"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(hh > 0, arr / np.where(hh > 0, hh, 1.0), 0.0)
    return float(frac.mean())


# ---------------------------------------------------------------- report
def anonymity_report(
    df: pd.DataFrame,
    quasi_identifiers: str | Sequence[str],
    sensitive: str | Sequence[str] | None = None,
    population=None,
    suppressed=None,
    threshold: float = DEFAULT_RISK_THRESHOLD,
    levels=None,
    heights=None,
) -> dict:
    """All checks in one dict (``journalist`` only with a population; ``l``/``t``
    per sensitive column; ``generalisation_loss`` only with levels and heights)."""
    codes, sizes, mask, qis = _codes(df, quasi_identifiers, suppressed)
    out: dict = {
        "n_records": len(df),
        "n_released": int(sizes.sum()),
        "n_suppressed": int(mask.sum()),
        "n_classes": len(sizes),
        "quasi_identifiers": qis,
        "k": int(sizes.min()),
        "prosecutor": prosecutor_risk(df, qis, threshold, suppressed),
        "marketer": marketer_risk(df, qis, population, suppressed),
        "discernibility": discernibility(df, qis, suppressed),
        "average_class_size": average_class_size(df, qis, None, suppressed),
        "suppressed_share": suppressed_share(df, suppressed),
    }
    if population is not None:
        out["journalist"] = journalist_risk(df, qis, population, threshold, suppressed)
    if sensitive is not None:
        out["sensitive"] = {
            s: {
                "l_distinct": l_diversity(df, qis, s, "distinct", suppressed),
                "l_entropy": l_diversity(df, qis, s, "entropy", suppressed),
                "t": t_closeness(df, qis, s, None, suppressed),
            }
            for s in _as_list(sensitive, "sensitive")
        }
    if levels is not None and heights is not None:
        out["generalisation_loss"] = generalisation_loss(levels, heights)
    return out
