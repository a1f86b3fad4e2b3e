"""MST: differentially private synthetic data from noisy marginals.

MST (McKenna, Miklau & Sheldon, "Winning the NIST Contest: A scalable and general
approach to differentially private synthetic data", J Priv Confid 2021;11(3),
doi:10.29012/jpc.778) on top of the Private-PGM engine ``mbi`` 2.0 (Apache-2.0).
The mechanism itself (published only as a script in the mbi repository's
``mechanisms/``) is reimplemented here against the mbi 2.0 API:

1. every column is discretised over a **public** domain (:class:`Categorical` /
   :class:`Numeric` specs from the caller, never from the data), missing values
   being a cell of their own;
2. all 1-way marginals are measured with Gaussian noise;
3. cells whose noisy count is below 3 sigma are merged into one cell per column
   (post-processing of step 2, the "compress_domain" step of the reference code);
4. a maximum spanning tree over the columns is selected with ``d - 1`` rounds of the
   exponential mechanism, the weight of a pair being the L1 distance between its
   true 2-way marginal and the one implied by the 1-way estimate (independence);
5. the ``d - 1`` 2-way marginals of the tree are measured with Gaussian noise;
6. mbi mirror descent fits a graphical model (a tree) to all noisy measurements;
   its node and edge marginals are the released model, sampled here exactly
   (ancestral sampling along the tree) with an explicit JAX key.

Secret randomness: the Gaussian noise of steps 2 and 5 and the exponential
mechanism of step 4 draw from the OS CSPRNG held by the data controller
(:mod:`phems_clinical.privacy.secret_rng`), never from the JAX key or a seed: noise
that a seed regenerates can be subtracted, and the counts come back exactly. Two
fits with the same key therefore differ, by design. Only sampling (step 6, no
privacy cost) follows the key.

Privacy accounting (zero-concentrated DP, Bun & Steinke, TCC 2016): the unit of
privacy is **one row** (add/remove neighbours; the caller must ensure one row per
patient). ``rho = cdp_rho(epsilon, delta)`` is the largest rho whose rho-zCDP
guarantee implies (epsilon, delta)-DP by the conversion of Canonne, Kamath &
Steinke (NeurIPS 2020, arXiv:2004.00010, Prop. 12 / their ``cdp_delta``):
``delta = min_{a>1} exp((a-1)(a rho - eps)) / (a-1) * (1 - 1/a)^a``. It is split
into thirds: with ``sigma = sqrt(3 / (2 rho))``,

* 1-way: each of the ``d`` marginals (L2 sensitivity 1) gets N(0, d sigma^2) noise
  per cell: ``d * 1/(2 d sigma^2) = rho/3``;
* selection: ``d - 1`` exponential mechanisms, each ``eps_em = sqrt(8 (rho/3) /
  (d-1))``-DP with score sensitivity 1, hence ``eps_em^2/8``-zCDP (Cesar & Rogers,
  ALT 2021): ``rho/3`` in total;
* 2-way: each of the ``d - 1`` tree marginals gets N(0, (d-1) sigma^2): ``rho/3``.

The released :class:`MSTModel` (noisy counts, tree, fitted marginals, noisy total)
is post-processing of these measurements. Not covered: the refusal for fewer than
``min_rows`` rows, the column names/dtypes (schema, public) and the numbers of rows
you ask :func:`sample_mst` for (use ``model.n_estimate``, not ``len(df)``).
:func:`mst_input_report` and :func:`domain_from_frame` read the data directly and
are **not** DP (curator-only tools).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd
from pandas.api import types as ptypes
from scipy import optimize, special

from phems_clinical.privacy.secret_rng import secret_generator
from phems_clinical.rng import numpy_generator

__all__ = [
    "Categorical",
    "MSTBudget",
    "MSTInputError",
    "MSTModel",
    "Numeric",
    "cdp_delta",
    "cdp_rho",
    "domain_from_frame",
    "fit_mst",
    "mst_budget",
    "mst_input_report",
    "sample_mst",
]


NOISE_SOURCE = (
    "OS CSPRNG of the data controller (secrets): not reproducible "
    "from the seed, by design"
)
_MAX_INT_CELLS = 1_000_000  # wider integer ranges: round a uniform value instead


class MSTInputError(ValueError):
    """MST cannot be fitted or sampled (names the column or option at fault)."""


class Categorical(NamedTuple):
    """Public domain of a categorical column: the allowed ``categories`` (any
    hashable values, e.g. strings, bools, coded ints). ``missing``: whether a
    missing-value cell exists (if False, a missing value in the data is an error)."""

    categories: tuple
    missing: bool = True


class Numeric(NamedTuple):
    """Public domain of a numeric column: ``n_bins`` equal-width bins over
    ``[lower, upper]`` (same unit as the column). Bounds must come from public
    knowledge (protocol, physiology), not from the data. Values outside are
    clipped into the end bins (see :func:`fit_mst` ``clip``)."""

    lower: float
    upper: float
    n_bins: int
    missing: bool = True


class MSTBudget(NamedTuple):
    """zCDP split of MST for ``n_columns`` columns (see the module docstring).

    ``rho``: total zCDP budget; ``sigma_one_way`` / ``sigma_two_way``: Gaussian
    noise standard deviation per cell (counts) of the 1-way / tree 2-way
    measurements; ``epsilon_select``: epsilon of each of the ``n_columns - 1``
    exponential mechanisms.
    """

    epsilon: float
    delta: float
    rho: float
    n_columns: int
    sigma_one_way: float
    sigma_two_way: float
    epsilon_select: float


class MSTModel(NamedTuple):
    """Fitted MST model; every field is public schema or DP post-processing.

    ``columns``/``specs``/``dtypes``: the table schema and public domain.
    ``one_way``: noisy 1-way counts per column over the full declared cells
    (categories or bins, then the missing cell). ``supports``: boolean mask of the
    cells kept by compression (the others share one merged cell). ``tree``: the
    selected edges (column-name pairs). ``nodes``: fitted probabilities of each
    column over its compressed cells; ``edges``: fitted joint probability tables of
    the tree edges (rows: first column). ``n_estimate``: the noisy number of rows.
    ``noise_source``: where the private randomness came from (not reproducible
    from any seed, by design).
    """

    columns: tuple
    specs: tuple
    dtypes: tuple
    budget: MSTBudget
    one_way: tuple
    supports: tuple
    tree: tuple
    nodes: tuple
    edges: tuple
    n_estimate: float
    noise_source: str = ""


# --------------------------------------------------------------------- accounting
def _check_eps_delta(epsilon: float, delta: float) -> tuple[float, float]:
    try:
        epsilon, delta = float(epsilon), float(delta)
    except (TypeError, ValueError) as err:
        raise MSTInputError(
            f"epsilon and delta must be numbers, got {epsilon!r}, {delta!r}"
        ) from err
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise MSTInputError(f"epsilon must be finite and > 0, got {epsilon!r}")
    if not 0.0 < delta < 1.0:
        raise MSTInputError(f"delta must lie in (0, 1), got {delta!r}")
    return epsilon, delta


def cdp_delta(rho: float, epsilon: float) -> float:
    """Smallest delta such that rho-zCDP implies (epsilon, delta)-DP.

    Canonne, Kamath & Steinke 2020 (arXiv:2004.00010, Prop. 12): minimise over
    the Renyi order a > 1 of ``exp((a-1)(a rho - eps) + a log(1-1/a)) / (a-1)``;
    the objective is convex in a, its derivative ``(2a-1) rho - eps +
    log(1-1/a)`` is found by Brent's method.
    """
    if rho <= 0:
        return 0.0

    def dlog(a):
        return (2 * a - 1) * rho - epsilon + math.log1p(-1.0 / a)

    lo, hi = 1.0 + 1e-9, (epsilon + 1.0) / (2.0 * rho) + 2.0
    a = (
        lo
        if dlog(lo) >= 0
        else optimize.brentq(dlog, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=500)
    )
    log_delta = (
        (a - 1) * (a * rho - epsilon) + a * math.log1p(-1.0 / a) - math.log(a - 1)
    )
    return float(min(1.0, math.exp(min(log_delta, 0.0))))


def cdp_rho(epsilon: float, delta: float) -> float:
    """Largest rho such that rho-zCDP implies (epsilon, delta)-DP (by bisection of
    :func:`cdp_delta`, which increases with rho)."""
    epsilon, delta = _check_eps_delta(epsilon, delta)

    def gap(rho):
        return math.log(max(cdp_delta(rho, epsilon), 1e-300)) - math.log(delta)

    hi = epsilon + 1.0  # rho-zCDP cannot give (eps, delta < 1) beyond this
    return float(
        optimize.brentq(gap, 1e-12 * epsilon, hi, xtol=1e-15, rtol=1e-13, maxiter=500)
    )


def mst_budget(epsilon: float, delta: float, n_columns: int) -> MSTBudget:
    """MST's thirds split of ``rho = cdp_rho(epsilon, delta)`` for ``n_columns``."""
    epsilon, delta = _check_eps_delta(epsilon, delta)
    if n_columns < 2:
        raise MSTInputError(f"MST needs at least 2 columns, got {n_columns}")
    rho = cdp_rho(epsilon, delta)
    sigma = math.sqrt(3.0 / (2.0 * rho))
    return MSTBudget(
        epsilon,
        delta,
        rho,
        int(n_columns),
        sigma * math.sqrt(n_columns),
        sigma * math.sqrt(n_columns - 1),
        math.sqrt(8.0 * rho / 3.0 / (n_columns - 1)),
    )


# ---------------------------------------------------------------------- encoding
def _mbi():
    """Import mbi without its import-time float32 / compilation-cache warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="JAX is running in float32", category=UserWarning
        )
        warnings.filterwarnings(
            "ignore", message="JAX persistent compilation cache", category=UserWarning
        )
        import mbi
    return mbi


def _n_cells(spec) -> int:
    n = len(spec.categories) if isinstance(spec, Categorical) else int(spec.n_bins)
    return n + int(spec.missing)


def _check_spec(name, spec) -> None:
    if isinstance(spec, Categorical):
        cats = tuple(spec.categories)
        if len(cats) == 0:
            raise MSTInputError(f"column {name!r}: Categorical needs >= 1 category")
        if len(set(cats)) != len(cats) or any(pd.isna(c) for c in cats):
            raise MSTInputError(
                f"column {name!r}: categories must be distinct and non-missing "
                "(missing values have their own cell)"
            )
    elif isinstance(spec, Numeric):
        lo, hi, nb = spec.lower, spec.upper, spec.n_bins
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise MSTInputError(
                f"column {name!r}: Numeric bounds must be finite with lower < upper, "
                f"got ({lo!r}, {hi!r})"
            )
        if isinstance(nb, bool) or not isinstance(nb, int | np.integer) or nb < 1:
            raise MSTInputError(
                f"column {name!r}: n_bins must be an int >= 1, got {nb!r}"
            )
    else:
        raise MSTInputError(
            f"column {name!r}: domain entry must be Categorical or Numeric, got "
            f"{type(spec).__name__}"
        )


def _check_columns(df: pd.DataFrame, domain: Mapping) -> None:
    if not isinstance(df, pd.DataFrame):
        raise MSTInputError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if df.columns.has_duplicates:
        raise MSTInputError(
            "duplicate column names: " + repr(list(df.columns[df.columns.duplicated()]))
        )
    no_spec = [c for c in df.columns if c not in domain]
    no_col = [c for c in domain if c not in df.columns]
    if no_spec or no_col:
        raise MSTInputError(
            f"table and domain differ: columns without a domain entry {no_spec!r}, "
            f"domain entries without a column {no_col!r}"
        )
    for c in df.columns:
        _check_spec(c, domain[c])
        if isinstance(domain[c], Numeric) and not (
            ptypes.is_numeric_dtype(df[c]) and not ptypes.is_bool_dtype(df[c])
        ):
            raise MSTInputError(
                f"column {c!r} has dtype {df[c].dtype} but a Numeric domain; use "
                "Categorical for bool/string/object columns (datetimes: convert "
                "to a number, e.g. days since a public origin, first)"
            )


def _encode_column(s: pd.Series, spec) -> tuple[np.ndarray, dict]:
    """Cell index per row and counts of (missing, low, high, unknown) values."""
    miss = s.isna().to_numpy()
    stats = {
        "missing": int(miss.sum()),
        "below_lower": 0,
        "above_upper": 0,
        "unknown": 0,
        "unknown_values": [],
    }
    if isinstance(spec, Categorical):
        codes = pd.Categorical(s, categories=list(spec.categories)).codes.astype(
            np.int64
        )
        unknown = (codes < 0) & ~miss
        stats["unknown"] = int(unknown.sum())
        if unknown.any():
            stats["unknown_values"] = list(pd.unique(s[unknown]))[:5]
        codes = np.where(miss, len(spec.categories), codes)
    else:
        x = s.to_numpy(dtype=np.float64, na_value=np.nan)
        stats["below_lower"] = int(np.sum(x < spec.lower))
        stats["above_upper"] = int(np.sum(x > spec.upper))
        codes = np.where(miss, spec.n_bins, _bin(x, spec))
    return codes, stats


def _bin(x: np.ndarray, spec: Numeric) -> np.ndarray:
    """Equal-width bin of each value after clipping to the bounds (NaN -> 0)."""
    width = (spec.upper - spec.lower) / spec.n_bins
    b = np.floor((np.clip(x, spec.lower, spec.upper) - spec.lower) / width)
    return np.clip(np.nan_to_num(b), 0, spec.n_bins - 1).astype(np.int64)


def mst_input_report(df: pd.DataFrame, domain: Mapping) -> pd.DataFrame:
    """Per column: rows missing, below/above the Numeric bounds (clipped by
    :func:`fit_mst`) and with categories outside the declared ones.

    .. warning:: exact counts of the data, **not** differentially private: for the
       data curator only, never release them with the model.
    """
    _check_columns(df, domain)
    rows = []
    for c in df.columns:
        _, st = _encode_column(df[c], domain[c])
        rows.append(dict(column=c, kind=type(domain[c]).__name__.lower(), **st))
    return pd.DataFrame(rows)


def domain_from_frame(
    df: pd.DataFrame, *, n_bins: int = 20, max_categories: int = 50
) -> dict:
    """Propose a domain from the data: observed categories, observed min/max.

    .. warning:: **not** differentially private: category lists and min/max are
       read from the data (the SDV metadata leak). Use it only on public or
       non-sensitive data, or as a template to replace by published bounds.

    Numeric (non-bool) columns with more than ``max_categories`` distinct values
    get ``Numeric(min, max, n_bins)``; all others ``Categorical``.
    """
    out = {}
    for c in df.columns:
        s = df[c]
        vals = pd.unique(s.dropna())
        numeric = ptypes.is_numeric_dtype(s) and not ptypes.is_bool_dtype(s)
        if numeric and len(vals) > max_categories:
            lo, hi = float(np.min(vals)), float(np.max(vals))
            out[c] = Numeric(lo, hi if hi > lo else lo + 1.0, int(n_bins))
        else:
            try:
                vals = sorted(vals)
            except TypeError:
                vals = list(vals)
            out[c] = Categorical(tuple(vals) if len(vals) else ("<none>",))
    return out


# --------------------------------------------------------------------- mechanism
def _counts(codes: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    flat = np.ravel_multi_index(codes, sizes)
    return np.bincount(flat, minlength=math.prod(sizes)).astype(np.float64)


def _exponential_mechanism(rng, scores: np.ndarray, epsilon: float) -> int:
    """Index drawn with probability ~ exp(eps * q / 2) (score sensitivity 1)."""
    logits = 0.5 * epsilon * (scores - scores.max())
    p = np.exp(logits - special.logsumexp(logits))
    return int(rng.choice(scores.size, p=p / p.sum()))


def _min_variance_total(ys: list[np.ndarray], sigmas: list[float]) -> float:
    """Inverse-variance weighted mean of the noisy totals sum(y) (DP)."""
    est = np.array([y.sum() for y in ys])
    var = np.array([s**2 * y.size for y, s in zip(ys, sigmas, strict=True)])
    return max(1.0, float(np.sum(est / var) / np.sum(1.0 / var)))


def fit_mst(
    key: jax.Array,
    df: pd.DataFrame,
    domain: Mapping,
    *,
    epsilon: float,
    delta: float = 1e-9,
    clip: bool = True,
    min_rows: int = 10,
    iters: int = 5000,
    noise: np.random.Generator | None = None,
) -> MSTModel:
    """Fit MST with an (``epsilon``, ``delta``)-DP guarantee per row.

    Parameters
    ----------
    key : a typed JAX PRNG key. Not used for the private steps (noise and tree
        selection draw from ``noise``); accepted so that callers hand every
        derivation step a key. Same key, *different* model, by design.
    df : the table, one row per patient (the unit of privacy is one row).
    domain : ``{column: Categorical | Numeric}`` covering exactly ``df.columns``;
        public knowledge only (see :func:`domain_from_frame` for why not the data).
    epsilon, delta : the DP guarantee, turned into ``rho = cdp_rho(epsilon, delta)``
        zCDP and split into thirds (module docstring; :func:`mst_budget`).
    clip : Numeric values outside ``[lower, upper]`` go into the end bins (True) or
        raise (False). Count them with :func:`mst_input_report` (not DP).
    min_rows : refuse tables with fewer rows (a release from a handful of patients
        is pointless even under DP: the noise swamps it).
    iters : mirror-descent iterations of the final mbi estimate (5,000 as in the
        reference code; for ~10 columns the cost is JIT compilation, ~10 CPU-s,
        not the iterations).
    noise : numpy Generator, optional
        The private randomness (measurement noise, exponential mechanism). Default:
        a fresh generator keyed from the OS CSPRNG that nobody keeps
        (:func:`~phems_clinical.privacy.secret_rng.secret_generator`). Pass
        ``secret_generator(s)`` with a secret ``s`` you keep at the site only to
        replay a fit exactly; never derive it from a seed or a config.

    Raises
    ------
    MSTInputError
        Categorical values outside the declared categories (naming the column,
        the count and examples): a domain that does not cover the data is a
        schema error, and mapping such values to missing would silently bias
        the synthetic table. Recode them first.

    References
    ----------
    McKenna, Miklau & Sheldon, J Priv Confid 2021, doi:10.29012/jpc.778; McKenna,
    Sheldon & Miklau, ICML 2019 (Private-PGM, arXiv:1901.09136).
    """
    epsilon, delta = _check_eps_delta(epsilon, delta)
    _check_columns(df, domain)
    if len(df) < min_rows:
        raise MSTInputError(
            f"cannot fit MST on {len(df)} rows; at least "
            f"min_rows={min_rows} rows are needed"
        )
    cols = list(df.columns)
    d = len(cols)
    if d < 2:
        raise MSTInputError(f"MST needs at least 2 columns, got {d}: {cols!r}")
    budget = mst_budget(epsilon, delta, d)
    specs = [domain[c] for c in cols]

    codes = []
    for c, spec in zip(cols, specs, strict=True):
        code, st = _encode_column(df[c], spec)
        if st["unknown"]:
            raise MSTInputError(
                f"column {c!r}: {st['unknown']} value(s) not in the declared "
                f"categories, e.g. {st['unknown_values']!r}"
            )
        if st["missing"] and not spec.missing:
            raise MSTInputError(
                f"column {c!r}: {st['missing']} missing value(s) but "
                "the domain has missing=False"
            )
        if not clip and (st["below_lower"] or st["above_upper"]):
            raise MSTInputError(
                f"column {c!r}: {st['below_lower']} value(s) below {spec.lower} and "
                f"{st['above_upper']} above {spec.upper} (clip=False)"
            )
        codes.append(code)
    sizes = [_n_cells(s) for s in specs]

    del key  # the private steps never draw from a public key
    rng = secret_generator() if noise is None else noise
    if not isinstance(rng, np.random.Generator):
        raise MSTInputError(
            f"noise: expected a numpy Generator (from "
            f"secret_generator), got {type(rng).__name__}"
        )
    s1, s2 = budget.sigma_one_way, budget.sigma_two_way
    one_way = [
        _counts([x], [n]) + rng.normal(0.0, s1, n)
        for x, n in zip(codes, sizes, strict=True)
    ]
    n_est = _min_variance_total(one_way, [s1] * d)

    # Compression (post-processing): cells below 3 sigma merge into one cell.
    supports, mappings, csizes = [], {}, []
    for c, y in zip(cols, one_way, strict=True):
        sup = y >= 3.0 * s1
        k = int(sup.sum())
        m = np.full(sup.size, k, dtype=np.int64)
        m[sup] = np.arange(k)
        supports.append(sup)
        mappings[c] = m
        csizes.append(k + int(k < sup.size))
    ccodes = [mappings[c][x] for c, x in zip(cols, codes, strict=True)]

    mbi = _mbi()
    full = mbi.Domain(cols, sizes)
    cdom = mbi.Domain(cols, csizes)
    meas1 = [
        mbi.LinearMeasurement(y, (c,), s1).compress({c: mappings[c]}, full)
        for c, y in zip(cols, one_way, strict=True)
    ]
    est1 = mbi.estimation.MirrorDescent().estimate(
        cdom, meas1, known_total=n_est, iters=200
    )
    p1 = [np.asarray(est1.project((c,)).datavector(), dtype=np.float64) for c in cols]

    # Exponential-mechanism maximum spanning tree (Kruskal order, disjoint sets).
    pairs = list(itertools.combinations(range(d), 2))
    weight = {}
    for i, j in pairs:
        x = _counts([ccodes[i], ccodes[j]], [csizes[i], csizes[j]])
        xhat = np.outer(p1[i], p1[j]).ravel() / max(p1[i].sum(), 1e-300)
        weight[i, j] = float(np.abs(x - xhat).sum())
    parent = list(range(d))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    tree = []
    for _ in range(d - 1):
        cand = [e for e in pairs if find(e[0]) != find(e[1])]
        e = cand[
            _exponential_mechanism(
                rng, np.array([weight[c] for c in cand]), budget.epsilon_select
            )
        ]
        parent[find(e[0])] = find(e[1])
        tree.append(e)

    meas2 = []
    for i, j in tree:
        x = _counts([ccodes[i], ccodes[j]], [csizes[i], csizes[j]])
        meas2.append(
            mbi.LinearMeasurement(
                x + rng.normal(0.0, s2, x.size), (cols[i], cols[j]), s2
            )
        )
    est = mbi.estimation.MirrorDescent().estimate(
        cdom, meas1 + meas2, known_total=n_est, iters=iters, warm_start=est1
    )
    nodes = tuple(
        _normalise(np.asarray(est.project((c,)).datavector(), np.float64)) for c in cols
    )
    edges = tuple(
        _normalise(
            np.asarray(
                est.project((cols[i], cols[j])).datavector(flatten=False), np.float64
            )
        )
        for i, j in tree
    )
    return MSTModel(
        tuple(cols),
        tuple(specs),
        tuple(df[c].dtype for c in cols),
        budget,
        tuple(one_way),
        tuple(supports),
        tuple((cols[i], cols[j]) for i, j in tree),
        nodes,
        edges,
        n_est,
        NOISE_SOURCE if noise is None else "caller's kept generator",
    )


def _normalise(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 0.0, None)
    s = p.sum()
    return p / s if s > 0 else np.full(p.shape, 1.0 / p.size)


# ---------------------------------------------------------------------- sampling
def _draw(rng, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs`` (inverse CDF)."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(axis=1), probs.shape[1] - 1)


def _decode(rng, spec, dtype, sup: np.ndarray, ccode: np.ndarray) -> pd.Series:
    """Compressed cell -> declared cell (merged cell: uniform over its members) ->
    value (Numeric: uniform within the bin; integer dtypes: uniform over the
    integers in the bin)."""
    kept, merged = np.flatnonzero(sup), np.flatnonzero(~sup)
    cell = np.empty(ccode.size, dtype=np.int64)
    in_kept = ccode < kept.size
    cell[in_kept] = kept[ccode[in_kept]]
    if merged.size:
        cell[~in_kept] = rng.choice(merged, int((~in_kept).sum()))
    if isinstance(spec, Categorical):
        n = len(spec.categories)
        missing = cell >= n
        cats = np.empty(n, dtype=object)
        cats[:] = list(spec.categories)
        vals = cats[np.minimum(cell, n - 1)]
        vals[missing] = np.nan
        s = pd.Series(vals, dtype=object)
        if missing.any() and isinstance(dtype, np.dtype):
            if dtype.kind in "iu":
                return s.astype(np.float64)  # numpy ints cannot hold NaN
            if dtype.kind == "b":
                return s  # nor can numpy bool: object
        return s.astype(dtype)
    missing = cell >= spec.n_bins
    width = (spec.upper - spec.lower) / spec.n_bins
    x = spec.lower + (np.minimum(cell, spec.n_bins - 1) + rng.random(cell.size)) * width
    if ptypes.is_integer_dtype(dtype):
        lo, hi = math.ceil(spec.lower), math.floor(spec.upper)
        x = np.clip(np.rint(x), lo, max(lo, hi))
        if hi - lo < _MAX_INT_CELLS:
            # uniform over the integers of the bin: rounding a uniform value would
            # move mass into the neighbouring bins
            ints = np.arange(lo, hi + 1)
            n_in = np.bincount(
                _bin(ints.astype(np.float64), spec), minlength=spec.n_bins
            )
            start = np.concatenate([[0], np.cumsum(n_in)[:-1]])
            b = np.minimum(cell, spec.n_bins - 1)
            ok = n_in[b] > 0
            pick = start[b] + np.floor(rng.random(cell.size) * n_in[b]).astype(int)
            x = np.where(ok, ints[np.minimum(pick, ints.size - 1)], x)
        if missing.any():
            if ptypes.is_extension_array_dtype(dtype):
                s = pd.Series(pd.array(x.astype(np.int64), dtype=dtype))
                s[missing] = pd.NA
                return s
            x[missing] = np.nan
            return pd.Series(x)  # numpy ints cannot hold NaN: float64
        return pd.Series(x.astype(np.int64)).astype(dtype)
    x[missing] = np.nan
    return pd.Series(x).astype(dtype)


def sample_mst(key: jax.Array, model: MSTModel, n: int) -> pd.DataFrame:
    """Draw ``n`` i.i.d. synthetic rows from a fitted :class:`MSTModel`.

    Ancestral sampling along the tree from its first column (exact for a
    tree-structured model); same ``key``, same frame. Columns and dtypes are
    those of the training table (integer columns with missing values become
    float64, or stay nullable ``Int64``; bool with missing become object).
    Sampling is post-processing and spends no privacy budget; prefer
    ``n = round(model.n_estimate)`` over the exact training size.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise MSTInputError(f"n must be a positive integer, got {n!r}")
    n = int(n)
    rng = numpy_generator(key)
    cols = list(model.columns)
    idx = {c: i for i, c in enumerate(cols)}
    adj: dict[int, list] = {i: [] for i in range(len(cols))}
    for k, (a, b) in enumerate(model.tree):
        adj[idx[a]].append((idx[b], k, False))
        adj[idx[b]].append((idx[a], k, True))
    ccode: dict[int, np.ndarray] = {}
    for root in range(len(cols)):
        if root in ccode:
            continue
        ccode[root] = _draw(
            rng, np.broadcast_to(model.nodes[root], (n, model.nodes[root].size))
        )
        stack = [root]
        while stack:
            u = stack.pop()
            for v, k, transposed in adj[u]:
                if v in ccode:
                    continue
                joint = model.edges[k].T if transposed else model.edges[k]
                rows = joint.sum(axis=1, keepdims=True)
                # a parent cell the model gives no mass: fall back to the marginal
                cond = np.where(
                    rows > 0,
                    joint / np.where(rows > 0, rows, 1.0),
                    model.nodes[v][None, :],
                )
                ccode[v] = _draw(rng, cond[ccode[u]])
                stack.append(v)
    out = {
        c: _decode(rng, model.specs[i], model.dtypes[i], model.supports[i], ccode[i])
        for i, c in enumerate(cols)
    }
    return pd.DataFrame(out, columns=pd.Index(model.columns))
