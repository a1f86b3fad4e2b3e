"""Fidelity of a synthetic (or anonymised) table to the real one: the fidelity part
of the scorecard (:mod:`phems_clinical.evaluation.scorecard`).

* :func:`column_fidelity` - per column, the two-sample Kolmogorov-Smirnov statistic
  (numeric; :func:`scipy.stats.ks_2samp` on the non-missing values) or the total
  variation distance TV = 1/2 sum_v |p_v - q_v| over the union of categories
  (categorical), plus the missing-rate difference. ``score = 1 - statistic`` is
  SDMetrics' KSComplement / TVComplement.
* :func:`pairwise_fidelity` - per column pair, |r_real - r_syn| of Pearson
  correlations (numeric-numeric, pairwise-complete rows) or of Cramer's V
  (categorical-categorical, and mixed pairs after binning the numeric column into
  ``bins`` quantile bins whose edges come from the real data; missing values are a
  level of their own). Summary means are in ``DataFrame.attrs`` and
  :func:`pairwise_summary`.
* :func:`detection_auc` - an L2-regularised logistic regression on one-hot +
  standardised features with squares and pairwise products of the numeric
  columns (so a broken correlation is detectable) tells real from synthetic
  rows; the score is the mean held-out AUC over stratified folds (0.5 =
  indistinguishable, 1 = fully separable).
* :func:`pmse` / :func:`pmse_ratio` - propensity mean squared error
  pMSE = 1/N sum_i (p_i - c)^2 with c = n_syn / N (Snoke, Raab, Nowok, Dibben &
  Slavkovic, JRSS-A 2018;181(3):663-688; Woo et al., J Priv Confid 2009). The
  ratio divides by the null expectation E[pMSE] = (k-1)(1-c)^2 c / N, k = the
  number of parameters of the propensity model (here the rank of the design
  matrix, intercept included). That expectation holds for an (essentially)
  unpenalised logistic model that is correctly specified under the null, i.e.
  when real and synthetic rows come from the same distribution; for other models
  use the permutation null (``n_permutations > 0``), which refits on shuffled
  labels. Ratio >> 1: distinguishable. Caveat: for two independent samples of
  one distribution the published null is too small by the factor (1-c): the
  delta method gives E[pMSE] = (k-1) c (1-c) / N (with k - 1 = 1 binary feature:
  the group propensities are hypergeometric proportions with exactly this
  variance), and simulation agrees, so the published-null ratio centres at
  1/(1-c) (2 for equal sizes) and the permutation-null ratio at 1. The published
  null is kept as the default for comparability with synthpop / synthgauge
  figures.

Features are encoded on the pooled real + synthetic table (medians, scaling and
category levels do not use labels; the folds only hold out labels). Randomness
(fold assignment, permutations) comes from an explicit JAX key only.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "FidelityInputError",
    "column_fidelity",
    "cramers_v",
    "detection_auc",
    "fidelity_summary",
    "pairwise_fidelity",
    "pairwise_summary",
    "pmse",
    "pmse_ratio",
    "total_variation",
    "pmse_parts",
]

MISSING = "<missing>"


class FidelityInputError(ValueError):
    """Raised for tables that cannot be compared (empty, differing columns)."""


# ----------------------------------------------------------------------------- input
def _is_numeric(s: pd.Series) -> bool:
    return (
        pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
    ) or pd.api.types.is_datetime64_any_dtype(s)


def _as_float(s: pd.Series) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(s):
        if getattr(s.dt, "tz", None) is not None:
            s = s.dt.tz_convert(None)
        return (s - pd.Timestamp(0)).dt.total_seconds().to_numpy(float, na_value=np.nan)
    return pd.to_numeric(s).to_numpy(float, na_value=np.nan)


def _check(real: pd.DataFrame, syn: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    for name, df in (("real", real), ("syn", syn)):
        if not isinstance(df, pd.DataFrame):
            raise FidelityInputError(f"{name} must be a pandas DataFrame")
        if df.shape[0] == 0 or df.shape[1] == 0:
            raise FidelityInputError(f"{name} table is empty (shape {df.shape})")
    missing = [c for c in real.columns if c not in syn.columns]
    extra = [c for c in syn.columns if c not in real.columns]
    if missing or extra:
        raise FidelityInputError(
            "real and syn columns differ: missing from syn "
            f"{[str(c) for c in missing]}, only in syn {[str(c) for c in extra]}"
        )
    syn = syn[list(real.columns)]
    mixed = [
        str(c) for c in real.columns if _is_numeric(real[c]) != _is_numeric(syn[c])
    ]
    if mixed:
        raise FidelityInputError(
            f"columns numeric in one table and categorical in the other: {mixed}"
        )
    return real, syn


def _kinds(real: pd.DataFrame) -> dict:
    return {
        c: ("numeric" if _is_numeric(real[c]) else "categorical") for c in real.columns
    }


# --------------------------------------------------------------------------- columns
def total_variation(a: pd.Series, b: pd.Series) -> float:
    """TV = 1/2 sum_v |p_v - q_v| over the union of the non-missing categories."""
    p = a.dropna().value_counts(normalize=True)
    q = b.dropna().value_counts(normalize=True)
    if p.empty or q.empty:
        return float("nan")
    idx = p.index.union(q.index)
    return 0.5 * float(
        np.abs(p.reindex(idx, fill_value=0.0) - q.reindex(idx, fill_value=0.0)).sum()
    )


def column_fidelity(real: pd.DataFrame, syn: pd.DataFrame) -> pd.DataFrame:
    """Per column: KS (numeric) or TV (categorical) statistic and missing rates.

    Columns: ``column, kind, metric, statistic, score (=1-statistic),
    missing_real, missing_syn, missing_diff (=|missing_real - missing_syn|)``. The
    statistic is NaN when one side has no non-missing value.
    """
    real, syn = _check(real, syn)
    rows = []
    for c, kind in _kinds(real).items():
        if kind == "numeric":
            a, b = _as_float(real[c]), _as_float(syn[c])
            a, b = a[~np.isnan(a)], b[~np.isnan(b)]
            # the statistic only: the asymptotic p-value avoids scipy's exact-method
            # fallback warning, and the p-value is not used
            stat = (
                float(stats.ks_2samp(a, b, method="asymp").statistic)
                if a.size and b.size
                else float("nan")
            )
            metric = "ks"
        else:
            stat, metric = total_variation(real[c], syn[c]), "tv"
        mr, ms = float(real[c].isna().mean()), float(syn[c].isna().mean())
        rows.append(
            dict(
                column=c,
                kind=kind,
                metric=metric,
                statistic=stat,
                score=1.0 - stat,
                missing_real=mr,
                missing_syn=ms,
                missing_diff=abs(mr - ms),
            )
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- pairs
def cramers_v(a, b) -> float:
    """Cramer's V = sqrt(chi2 / (n (min(r, c) - 1))), no continuity correction.

    0 when either variable has a single level (no association measurable).
    """
    table = pd.crosstab(
        pd.Series(np.asarray(a, dtype=object)), pd.Series(np.asarray(b, dtype=object))
    ).to_numpy(float)
    r, k = table.shape
    if min(r, k) < 2:
        return 0.0
    n = table.sum()
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
    chi2 = float(((table - expected) ** 2 / expected).sum())
    return float(np.sqrt(chi2 / (n * (min(r, k) - 1))))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if x.size < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


def _levels(s: pd.Series, kind: str, edges: np.ndarray | None) -> np.ndarray:
    if kind == "numeric":
        v = _as_float(s)
        out = np.full(v.shape, MISSING, dtype=object)
        ok = ~np.isnan(v)
        out[ok] = np.searchsorted(edges, v[ok], side="right").astype(str)
        return out
    return s.astype(object).where(s.notna(), MISSING).to_numpy(dtype=object)


def pairwise_fidelity(
    real: pd.DataFrame, syn: pd.DataFrame, *, bins: int = 5
) -> pd.DataFrame:
    """Per column pair: |Pearson r_real - r_syn| or |V_real - V_syn|.

    Numeric-numeric pairs use Pearson correlation (pairwise-complete rows; 0 for a
    constant column). Categorical-categorical and mixed pairs use Cramer's V; in
    mixed pairs the numeric column is binned into ``bins`` quantile bins with edges
    from the real data (applied to both tables). Missing values are a level of
    their own for Cramer's V. Columns: ``col_a, col_b, kind, metric, real, syn,
    abs_diff``; ``attrs`` holds ``mean_abs_diff`` overall and per metric.
    """
    real, syn = _check(real, syn)
    kinds = _kinds(real)
    edges = {}
    for c, kd in kinds.items():
        if kd == "numeric":
            v = _as_float(real[c])
            v = v[~np.isnan(v)]
            edges[c] = (
                np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
                if v.size
                else np.array([])
            )
    rows = []
    for a, b in itertools.combinations(real.columns, 2):
        ka, kb = kinds[a], kinds[b]
        if ka == kb == "numeric":
            r = _pearson(_as_float(real[a]), _as_float(real[b]))
            s = _pearson(_as_float(syn[a]), _as_float(syn[b]))
            kind, metric = "numeric", "pearson"
        else:
            r = cramers_v(
                _levels(real[a], ka, edges.get(a)), _levels(real[b], kb, edges.get(b))
            )
            s = cramers_v(
                _levels(syn[a], ka, edges.get(a)), _levels(syn[b], kb, edges.get(b))
            )
            kind = "categorical" if ka == kb else "mixed"
            metric = "cramers_v"
        rows.append(
            dict(
                col_a=a,
                col_b=b,
                kind=kind,
                metric=metric,
                real=r,
                syn=s,
                abs_diff=abs(r - s),
            )
        )
    out = pd.DataFrame(
        rows, columns=["col_a", "col_b", "kind", "metric", "real", "syn", "abs_diff"]
    )
    out.attrs.update(pairwise_summary(out))
    return out


def pairwise_summary(pairs: pd.DataFrame) -> dict:
    """Mean absolute differences: overall, Pearson pairs, Cramer's V pairs."""

    def _mean(x: pd.Series) -> float:
        x = x.dropna()
        return float(x.mean()) if len(x) else float("nan")

    return {
        "mean_abs_diff": _mean(pairs["abs_diff"]),
        "mean_abs_diff_pearson": _mean(
            pairs.loc[pairs.metric == "pearson", "abs_diff"]
        ),
        "mean_abs_diff_cramers_v": _mean(
            pairs.loc[pairs.metric == "cramers_v", "abs_diff"]
        ),
    }


# -------------------------------------------------------------------------- features
def _design(
    real: pd.DataFrame,
    syn: pd.DataFrame,
    *,
    quadratic: bool = True,
    max_levels: int = 30,
    max_products: int = 45,
) -> np.ndarray:
    """Encoded feature matrix (no intercept) for the pooled rows real then syn.

    Numeric: median-filled, standardised, plus a missing indicator where any value
    is missing; with ``quadratic`` the squares and (up to ``max_products``) pairwise
    products of the standardised numeric columns. Categorical: one-hot with
    missing as a level, the most frequent level dropped as reference, levels
    beyond the ``max_levels - 1`` most frequent pooled into one. Constant
    features are dropped and every feature is standardised.
    """
    both = pd.concat([real, syn], ignore_index=True)
    feats, nums = [], []
    for c, kind in _kinds(real).items():
        s = both[c]
        if kind == "numeric":
            v = _as_float(s)
            miss = np.isnan(v)
            if miss.all():
                continue
            if miss.any():
                feats.append(miss.astype(float))
                v = np.where(miss, np.median(v[~miss]), v)
            sd = v.std()
            if sd > 0:
                nums.append((v - v.mean()) / sd)
        else:
            lev = s.astype(object).where(s.notna(), MISSING).astype(str)
            counts = lev.value_counts()
            keep = list(counts.index[: max_levels - 1])
            lev = lev.where(lev.isin(keep), "<other>")
            order = lev.value_counts().index
            for level in order[1:]:
                feats.append((lev == level).to_numpy(float))
    feats = nums + feats
    if quadratic:
        feats += [v * v for v in nums]
        pairs = list(itertools.combinations(range(len(nums)), 2))[:max_products]
        feats += [nums[i] * nums[j] for i, j in pairs]
    X = np.column_stack(feats) if feats else np.empty((len(both), 0))
    sd = X.std(0)
    X = X[:, sd > 1e-12]
    return (X - X.mean(0)) / X.std(0)


@jax.jit
def _fit_predict(X, Y, W, lam):
    """Ridge logistic regressions by damped Newton, batched over rows of Y / W.

    X (n, p) includes the intercept column 0 (not penalised); Y, W (b, n) are
    labels and 0/1 training weights. Returns the fitted probabilities (b, n) for
    all rows.
    """
    p = X.shape[1]
    pen = lam * jnp.ones(p).at[0].set(0.0) + 1e-9

    def one(y, w):
        def step(_, beta):
            mu = jax.nn.sigmoid(X @ beta)
            g = X.T @ (w * (mu - y)) + pen * beta
            H = (X.T * (w * mu * (1 - mu))) @ X + jnp.diag(pen)
            d = jnp.linalg.solve(H, g)
            d = d * jnp.minimum(1.0, 10.0 / (jnp.linalg.norm(d) + 1e-300))
            return beta - d

        beta = jax.lax.fori_loop(0, 50, step, jnp.zeros(p, X.dtype))
        return jax.nn.sigmoid(X @ beta)

    return jax.vmap(one)(Y, W)


def _prepare(real, syn, quadratic):
    real, syn = _check(real, syn)
    X = _design(real, syn, quadratic=quadratic)
    X = np.column_stack([np.ones(len(X)), X])
    y = np.r_[np.zeros(len(real)), np.ones(len(syn))]
    return X, y


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    r = stats.rankdata(score)
    n1, n0 = y.sum(), (1 - y).sum()
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def detection_auc(
    key,
    real: pd.DataFrame,
    syn: pd.DataFrame,
    *,
    folds: int = 5,
    l2: float = 1.0,
    quadratic: bool = True,
) -> float:
    """Mean held-out AUC of a ridge logistic real-vs-synthetic classifier.

    Rows are split into ``folds`` stratified folds by a permutation drawn from
    ``key``; each fold is scored by a model fitted on the others (penalty
    ``l2/2 * ||beta||^2`` on the standardised features, intercept free). 0.5 =
    indistinguishable; values below 0.5 are noise around 0.5.
    """
    X, y = _prepare(real, syn, quadratic)
    if folds < 2:
        raise FidelityInputError(f"folds must be >= 2, got {folds}")
    if min(len(real), len(syn)) < folds:
        raise FidelityInputError(
            f"each table needs at least folds={folds} rows "
            f"(real {len(real)}, syn {len(syn)})"
        )
    fold = np.empty(len(y), dtype=int)
    for label, k in zip((0, 1), jax.random.split(key), strict=True):
        idx = np.flatnonzero(y == label)
        perm = np.asarray(jax.random.permutation(k, idx.size))
        fold[idx[perm]] = np.arange(idx.size) % folds
    W = np.stack([(fold != f).astype(float) for f in range(folds)])
    P = np.asarray(
        _fit_predict(
            jnp.asarray(X), jnp.asarray(np.tile(y, (folds, 1))), jnp.asarray(W), l2
        )
    )
    return float(np.mean([_auc(P[f, fold == f], y[fold == f]) for f in range(folds)]))


def pmse_parts(key, real, syn, quadratic, n_permutations, l2):
    """pMSE pieces ``(pmse, permuted pmses, k, c, N)`` shared by :func:`pmse`,
    :func:`pmse_ratio` and the scorecard (``k``: design rank; ``c``: synthetic
    share; ``N``: rows)."""
    X, y = _prepare(real, syn, quadratic)
    N, c = len(y), float(y.mean())
    Y = [y]
    for k in jax.random.split(key, n_permutations) if n_permutations else []:
        Y.append(y[np.asarray(jax.random.permutation(k, N))])
    Y = np.stack(Y)
    P = np.asarray(
        _fit_predict(jnp.asarray(X), jnp.asarray(Y), jnp.ones_like(jnp.asarray(Y)), l2)
    )
    pm = ((P - c) ** 2).mean(1)
    k = int(np.linalg.matrix_rank(X))
    return float(pm[0]), pm[1:], k, c, N


def pmse(
    key,
    real: pd.DataFrame,
    syn: pd.DataFrame,
    *,
    quadratic: bool = True,
    l2: float = 1e-6,
) -> float:
    """Propensity MSE 1/N sum (p_i - c)^2 of a logistic model, c = n_syn / N.

    The fit is deterministic; ``key`` is accepted for a uniform API (it drives the
    permutations of :func:`pmse_ratio`). ``l2`` is a tiny stabilising ridge.
    """
    return pmse_parts(key, real, syn, quadratic, 0, l2)[0]


def pmse_ratio(
    key,
    real: pd.DataFrame,
    syn: pd.DataFrame,
    *,
    quadratic: bool = True,
    n_permutations: int = 0,
    l2: float = 1e-6,
) -> float:
    """pMSE divided by a null expectation.

    With ``n_permutations == 0``: the published null (k-1)(1-c)^2 c / N (Snoke et
    al. 2018; as in synthpop and synthgauge), k = rank of the logistic design
    (intercept included), for a correctly specified, essentially unpenalised
    logistic model. For two *independent* samples of one distribution this ratio
    centres at 1/(1-c) (2 for equal sizes), not 1: the delta method gives
    E[pMSE] = (k-1) c (1-c) / N (checked by simulation in the tests). With
    ``n_permutations > 0`` the null is the mean pMSE over that many label
    permutations drawn from ``key`` (centres at 1 for
    indistinguishable tables and holds for any model).
    """
    pm, perm, k, c, N = pmse_parts(key, real, syn, quadratic, n_permutations, l2)
    null = float(perm.mean()) if n_permutations else (k - 1) * (1 - c) ** 2 * c / N
    return pm / null if null > 0 else float("nan")


# --------------------------------------------------------------------------- summary
def fidelity_summary(
    key,
    real: pd.DataFrame,
    syn: pd.DataFrame,
    *,
    folds: int = 5,
    n_permutations: int = 20,
) -> dict:
    """Headline fidelity numbers of ``syn`` against ``real`` (floats).

    ``column_shapes`` = mean KS/TV complement (SDMetrics' Column Shapes),
    ``max_column_statistic``, ``mean_missing_diff``, the pairwise means of
    :func:`pairwise_summary`, ``pair_trends`` = 1 - mean |diff| (on [0, 1] for
    Cramer's V; Pearson differences are halved as in CorrelationSimilarity),
    ``detection_auc``, ``pmse``, ``pmse_ratio`` (published Snoke null) and
    ``pmse_ratio_perm`` (permutation null, NaN when ``n_permutations == 0``).
    """
    cols = column_fidelity(real, syn)
    pairs = pairwise_fidelity(real, syn)
    k_auc, k_pmse = jax.random.split(key)
    sims = np.where(
        pairs.metric == "pearson", 1 - pairs.abs_diff / 2, 1 - pairs.abs_diff
    )
    pm, perm, k, c, N = pmse_parts(k_pmse, real, syn, True, n_permutations, 1e-6)
    out = {
        "column_shapes": float(cols.score.mean()),
        "max_column_statistic": float(cols.statistic.max()),
        "mean_missing_diff": float(cols.missing_diff.mean()),
        **pairwise_summary(pairs),
        "pair_trends": (
            float(np.mean(sims[~np.isnan(sims)]))
            if np.any(~np.isnan(sims))
            else float("nan")
        ),
        "detection_auc": detection_auc(k_auc, real, syn, folds=folds),
        "pmse": pm,
        "pmse_ratio": pm / ((k - 1) * (1 - c) ** 2 * c / N) if k > 1 else float("nan"),
        "pmse_ratio_perm": (
            pm / float(perm.mean()) if n_permutations else float("nan")
        ),
    }
    return out


def logistic_transfer(
    train: pd.DataFrame, y_train, test: pd.DataFrame, *, l2: float = 1.0
) -> np.ndarray:
    """Ridge logistic model fitted on ``train`` (features) and ``y_train`` (0/1),
    predicted on ``test``: the probabilities for ``test``'s rows.

    Same encoding and fit as the detection classifier (:func:`detection_auc`), with
    a linear design; used for train-on-source, test-on-real utility of tabular
    sources (Rankin et al., JMIR Med Inform 2020;8:e18910).
    """
    train, test = _check(train, test)
    X = _design(train, test, quadratic=False)
    X = np.column_stack([np.ones(len(X)), X])
    n = len(train)
    y = np.r_[np.asarray(y_train, float), np.zeros(len(test))]
    w = np.r_[np.ones(n), np.zeros(len(test))]
    P = np.asarray(
        _fit_predict(jnp.asarray(X), jnp.asarray(y[None]), jnp.asarray(w[None]), l2)
    )
    return P[0, n:]
