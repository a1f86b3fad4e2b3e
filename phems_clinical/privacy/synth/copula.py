"""Gaussian copula synthesiser for one table.

Every column gets a latent standard-normal *value* dimension, and every column with
missing values a second latent *missing-indicator* dimension, so missingness is
modelled jointly with the values (it can depend on other columns). The joint
dependence is one correlation matrix of the normal scores.

Marginals (Sklar 1959; Nelsen 2006 "An Introduction to Copulas", ch. 2):

- continuous / integer / datetime (as int64 ns) columns: the empirical quantile
  function (at most ``n_quantiles`` points, linear interpolation between them), so a
  sample lies inside the observed (or given, tighter) bounds and, for continuous
  columns, almost never repeats a training value exactly; integer and datetime
  columns are rounded. Forward scores are van der Waerden normal scores,
  ``Phi^-1(midrank / (m + 1))``.
- categorical columns (object, string, category, bool, or named in
  ``categorical``): "frequency intervals": categories sorted by decreasing frequency
  each get a sub-interval of (0, 1) as wide as their frequency; a category's score
  is ``Phi^-1`` of its interval midpoint, and a sampled uniform falls back into a
  category by its interval. This is the one-hot-free encoding of the SDV
  ``copulas``/``rdt`` FrequencyEncoder (Patki, Wedge & Veeramachaneni 2016, "The
  Synthetic Data Vault", IEEE DSAA), reimplemented here (SDV is BUSL-1.1).
- missing indicator: the same interval idea with two levels (observed, missing),
  so the sampled missing rate equals the training one in expectation.

Correlation: Pearson on the normal scores over pairwise-complete rows (the
normal-scores rank correlation; constant or nearly empty pairs get 0), made
positive definite by an eigenvalue floor and rescaled to unit diagonal (Higham
2002 discusses the nearest-correlation problem; the floor is the simple variant).

Privacy note: the model holds per-column quantiles (at most ``n_quantiles``) and
category lists, i.e. it discloses marginals (as SDV's detected metadata stores
exact column ranges and category lists); it is not differentially private.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd
from pandas.api import types as ptypes
from scipy import special

KINDS = ("continuous", "integer", "datetime", "categorical")
_EIG_FLOOR = 1e-6
_MIN_PAIR = 3  # fewer pairwise-complete rows than this: correlation set to 0


class CopulaInputError(ValueError):
    """The copula cannot be fitted or sampled (names the column or value at fault)."""


class ColumnMarginal(NamedTuple):
    """Marginal of one column.

    ``quantiles``: sorted quantile values (numeric kinds; empty for categorical).
    ``categories``: object array of categories by decreasing frequency and
    ``cum_probs`` their upper interval edges (categorical only). ``lower``/``upper``
    the bounds enforced on samples (numeric kinds). ``missing_rate`` the share of
    missing values; ``tz`` the time zone of a tz-aware datetime column.
    """

    name: str
    kind: str
    dtype: object
    quantiles: np.ndarray
    categories: np.ndarray
    cum_probs: np.ndarray
    lower: float
    upper: float
    missing_rate: float
    tz: object


class CopulaModel(NamedTuple):
    """Fitted Gaussian copula.

    ``value_dim[j]`` / ``missing_dim[j]``: latent dimension of column j's value and
    missing indicator (-1: none). ``correlation``: positive-definite correlation of
    the latent normal scores; ``n_rows``: rows of the training table.
    """

    columns: tuple
    marginals: tuple[ColumnMarginal, ...]
    value_dim: np.ndarray
    missing_dim: np.ndarray
    correlation: np.ndarray
    n_rows: int


def _kind(s: pd.Series, categorical: set) -> str:
    dt = s.dtype
    if s.name in categorical:
        return "categorical"
    if ptypes.is_bool_dtype(dt) or isinstance(dt, pd.CategoricalDtype):
        return "categorical"
    if ptypes.is_object_dtype(dt) or ptypes.is_string_dtype(dt):
        return "categorical"
    if ptypes.is_datetime64_any_dtype(dt):
        return "datetime"
    if ptypes.is_integer_dtype(dt):
        return "integer"
    if ptypes.is_float_dtype(dt):
        return "continuous"
    raise CopulaInputError(
        f"column {s.name!r} has unsupported dtype {dt}; supported: float, integer, "
        "datetime, bool, category, string/object (or name it in categorical=)"
    )


def _numeric_values(s: pd.Series, kind: str) -> np.ndarray:
    """Float values of a numeric/datetime column (NaN where missing)."""
    miss = s.isna().to_numpy()
    if kind == "datetime":
        if getattr(s.dt, "tz", None) is not None:
            s = s.dt.tz_convert("UTC").dt.tz_localize(None)
        ns = s.astype("datetime64[ns]").to_numpy().view("int64")
        out = ns.astype(np.float64)
    else:
        # a copy: pandas 3 (copy-on-write) hands out read-only views
        out = s.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    out[miss] = np.nan
    return out


def _normal_scores(x: np.ndarray) -> np.ndarray:
    """van der Waerden scores Phi^-1(midrank/(m+1)) of the non-NaN entries."""
    z = np.full(x.shape, np.nan)
    ok = ~np.isnan(x)
    m = int(ok.sum())
    if m:
        from scipy.stats import rankdata

        z[ok] = special.ndtri(rankdata(x[ok]) / (m + 1))
    return z


def _interval_scores(codes: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Score of interval midpoints (frequency-interval encoding); codes < 0 -> NaN."""
    upper = np.cumsum(probs)
    mid = upper - probs / 2
    z = np.full(codes.shape, np.nan)
    ok = codes >= 0
    z[ok] = special.ndtri(mid[codes[ok]])
    return z


def _pairwise_corr(z: np.ndarray) -> np.ndarray:
    """Pearson correlation over pairwise-complete rows; degenerate pairs -> 0."""
    d = z.shape[1]
    r = np.eye(d)
    ok = ~np.isnan(z)
    for i in range(d):
        for j in range(i + 1, d):
            both = ok[:, i] & ok[:, j]
            if both.sum() < _MIN_PAIR:
                continue
            a, b = z[both, i], z[both, j]
            a, b = a - a.mean(), b - b.mean()
            den = np.sqrt((a @ a) * (b @ b))
            if den > 1e-12:
                r[i, j] = r[j, i] = float(np.clip((a @ b) / den, -1.0, 1.0))
    return r


def nearest_pd_correlation(r: np.ndarray, floor: float = _EIG_FLOOR) -> np.ndarray:
    """Symmetrise, floor the eigenvalues at ``floor`` and rescale to unit diagonal."""
    r = (r + r.T) / 2
    w, v = np.linalg.eigh(r)
    r = (v * np.maximum(w, floor)) @ v.T
    s = np.sqrt(np.diag(r))
    r = r / np.outer(s, s)
    np.fill_diagonal(r, 1.0)
    return r


def fit_copula(
    df: pd.DataFrame,
    *,
    categorical: Sequence[str] | None = None,
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    min_rows: int = 10,
    n_quantiles: int = 1000,
) -> CopulaModel:
    """Fit a Gaussian copula to ``df`` (see the module docstring).

    ``categorical``: extra columns to treat as categorical (e.g. coded integers).
    ``bounds``: ``{column: (lower, upper)}`` for numeric/datetime columns (None: the
    data min/max; datetimes as Timestamps); quantiles and samples are clipped to
    them. Raises :class:`CopulaInputError` for fewer than ``min_rows`` rows, an
    unsupported dtype, or bounds on an unknown/categorical column.
    """
    if not isinstance(df, pd.DataFrame):
        raise CopulaInputError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if df.shape[1] == 0:
        raise CopulaInputError("the table has no columns")
    if len(df) < min_rows:
        raise CopulaInputError(
            f"cannot fit a copula on {len(df)} rows; at least min_rows={min_rows} "
            "rows are needed"
        )
    if df.columns.has_duplicates:
        raise CopulaInputError(
            "duplicate column names: " + repr(list(df.columns[df.columns.duplicated()]))
        )
    categorical = set(categorical or ())
    unknown = [c for c in [*categorical, *(bounds or {})] if c not in df.columns]
    if unknown:
        raise CopulaInputError(f"columns not in the table: {unknown!r}")
    bounds = dict(bounds or {})

    marginals, scores, value_dim, missing_dim = [], [], [], []
    for name in df.columns:
        s = df[name]
        kind = _kind(s, categorical)
        miss = s.isna().to_numpy()
        rate = float(miss.mean())
        quantiles = np.empty(0)
        cats = np.empty(0, dtype=object)
        cum = np.empty(0)
        lo = hi = np.nan
        tz = None
        if kind == "categorical":
            if name in bounds:
                raise CopulaInputError(f"bounds given for categorical column {name!r}")
            codes, uniques = pd.factorize(s, use_na_sentinel=True)
            counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
            order = np.argsort(-counts, kind="stable")
            rank_of = np.empty(len(order), dtype=np.int64)
            rank_of[order] = np.arange(len(order))
            probs = counts[order] / max(counts.sum(), 1)
            cats = np.asarray(uniques, dtype=object)[order]
            cum = np.cumsum(probs)
            ranked = np.where(codes >= 0, rank_of[np.maximum(codes, 0)], -1)
            z = _interval_scores(ranked, probs)
        else:
            if kind == "datetime":
                tz = getattr(s.dt, "tz", None)
            x = _numeric_values(s, kind)
            obs = np.sort(x[~np.isnan(x)])
            if obs.size:
                lo, hi = float(obs[0]), float(obs[-1])
                grid = np.linspace(0.0, 1.0, min(obs.size, n_quantiles))
                quantiles = np.quantile(obs, grid) if obs.size > 1 else obs.copy()
            else:
                quantiles = np.array([np.nan])
            if name in bounds:
                blo, bhi = bounds[name]
                if kind == "datetime":
                    blo, bhi = (
                        None
                        if b is None
                        else float(
                            _numeric_values(pd.Series(pd.to_datetime([b])), "datetime")[
                                0
                            ]
                        )
                        for b in (blo, bhi)
                    )
                lo = lo if blo is None else float(blo)
                hi = hi if bhi is None else float(bhi)
                if lo > hi:
                    raise CopulaInputError(
                        f"column {name!r}: lower bound {lo} above upper bound {hi}"
                    )
                quantiles = np.clip(quantiles, lo, hi)
            z = _normal_scores(x)
        marginals.append(
            ColumnMarginal(
                str(name) if not isinstance(name, str) else name,
                kind,
                s.dtype,
                quantiles,
                cats,
                cum,
                lo,
                hi,
                rate,
                tz,
            )
        )
        value_dim.append(len(scores))
        scores.append(z)
        if 0.0 < rate:
            missing_dim.append(len(scores))
            scores.append(
                _interval_scores(miss.astype(np.int64), np.array([1.0 - rate, rate]))
            )
        else:
            missing_dim.append(-1)
    zmat = np.column_stack(scores)
    corr = nearest_pd_correlation(_pairwise_corr(zmat))
    return CopulaModel(
        tuple(df.columns),
        tuple(marginals),
        np.asarray(value_dim),
        np.asarray(missing_dim),
        corr,
        len(df),
    )


def _column_from_uniform(
    m: ColumnMarginal, u: np.ndarray, missing: np.ndarray
) -> pd.Series:
    """Invert one marginal; ``missing`` rows become the dtype's missing value."""
    n = u.shape[0]
    if m.kind == "categorical":
        if m.categories.size == 0:
            vals = np.full(n, np.nan, dtype=object)
        else:
            idx = np.minimum(
                np.searchsorted(m.cum_probs, u, side="right"), m.categories.size - 1
            )
            vals = m.categories[idx].copy()
        vals[missing] = np.nan
        s = pd.Series(vals, dtype=object)
        if missing.any() and ptypes.is_bool_dtype(m.dtype):
            return s  # plain bool cannot hold NaN; keep object
        return s.astype(m.dtype)
    q = m.quantiles
    x = (
        np.interp(u, np.linspace(0.0, 1.0, q.size), q)
        if q.size > 1
        else np.full(n, q[0])
    )
    x = np.where(missing, 0.0, x)
    if np.isfinite(m.lower):
        x = np.clip(x, m.lower, m.upper)
    if m.kind == "continuous":
        x[missing] = np.nan
        return pd.Series(x).astype(m.dtype)
    xi = np.rint(x).astype(np.int64)
    if m.kind == "integer":
        if missing.any():
            s = pd.Series(pd.array(xi, dtype="Int64"))
            s[missing] = pd.NA
            if ptypes.is_extension_array_dtype(m.dtype):
                return s.astype(m.dtype)
            return s.astype(np.float64)  # numpy ints cannot hold NaN
        return pd.Series(xi).astype(m.dtype)
    s = pd.Series(xi.view("datetime64[ns]"))
    s[missing] = pd.NaT
    if m.tz is not None:
        s = s.dt.tz_localize("UTC").dt.tz_convert(m.tz)
    return s.astype(m.dtype)


def sample_copula(key: jax.Array, model: CopulaModel, n: int) -> pd.DataFrame:
    """Draw ``n`` synthetic rows (same columns and dtypes as the training table).

    ``key``: a JAX PRNG key (same key, same frame). Integer columns with missing
    values come back as nullable ``Int64`` if they were, else as float64.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise CopulaInputError(f"n must be a positive integer, got {n!r}")
    d = model.correlation.shape[0]
    chol = np.linalg.cholesky(model.correlation)
    eps = np.asarray(jax.random.normal(key, (int(n), d)), dtype=np.float64)
    u = special.ndtr(eps @ chol.T)
    out = {}
    for j, (name, m) in enumerate(zip(model.columns, model.marginals, strict=True)):
        md = int(model.missing_dim[j])
        missing = (
            (u[:, md] >= 1.0 - m.missing_rate)
            if md >= 0
            else np.zeros(int(n), dtype=bool)
        )
        out[name] = _column_from_uniform(m, u[:, int(model.value_dim[j])], missing)
    return pd.DataFrame(out, columns=pd.Index(model.columns))
