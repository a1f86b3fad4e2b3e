"""MDAV microaggregation of patient profiles and trajectories.

Microaggregation (Defays & Nanopoulos 1993; Domingo-Ferrer & Mateo-Sanz, IEEE
TKDE 2002;14(1):189-201) partitions the records into groups of at least ``k``
similar records and releases, for every record, the mean of its group. The
released values are then k-anonymous on the aggregated columns: no value of these
columns is shared by fewer than ``k`` records.

MDAV ("maximum distance to average vector", the fixed-group-size heuristic of
Domingo-Ferrer & Mateo-Sanz 2002, as written out by Domingo-Ferrer & Torra, Data
Min Knowl Disc 2005;11:195-212, and as sdcMicro's ``microaggregation(method =
"mdav")``), on the Euclidean distance between standardised records:

1. While at least ``3k`` records remain: take the centroid ``c`` of the remaining
   records, the record ``r`` farthest from ``c`` and the record ``s`` farthest
   from ``r``; ``r`` and its ``k - 1`` nearest remaining records form a group,
   then ``s`` and its ``k - 1`` nearest remaining records another.
2. If between ``2k`` and ``3k - 1`` records remain: ``r`` (farthest from their
   centroid) and its ``k - 1`` nearest form a group, the rest another.
3. Fewer than ``2k`` remaining records form the last group.

Every group therefore has between ``k`` and ``2k - 1`` records, and replacing
each value by its group mean keeps every column's mean exactly. Ties (equal
distances) go to the record that comes first in the input, so the grouping is
deterministic.

A *trajectory* is aggregated the same way: each patient is one row whose columns
are the patient's values at common times (a wide table); the group mean is then
the mean trajectory of the group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from jaxtyping import Float, Int

__all__ = ["MicroaggregationError", "MicroaggregationResult", "mdav", "microaggregate"]


class MicroaggregationError(ValueError):
    """Microaggregation cannot run on this input (names the column or option)."""


class MicroaggregationResult(NamedTuple):
    """Microaggregated table (``data``: the aggregated columns replaced by their
    group means, other columns unchanged), the group of each row (``groups``,
    0-based, aligned with the rows) and the group sizes."""

    data: pd.DataFrame
    groups: np.ndarray
    sizes: np.ndarray


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise MicroaggregationError(f"k: expected an integer >= 1, got {k!r}")
    if n < k:
        raise MicroaggregationError(
            f"k={k} is impossible: there are only {n} records to aggregate"
        )


def mdav(x: Float[np.ndarray, "n p"], k: int) -> Int[np.ndarray, " n"]:
    """MDAV groups of the rows of ``x`` (already on a common scale).

    Parameters
    ----------
    x : (n, p) array of finite floats
        One row per record (patient profile or trajectory).
    k : int
        Minimum group size (1 <= k <= n).

    Returns
    -------
    (n,) int array
        The 0-based group of each row, numbered in the order groups are formed.

    References
    ----------
    Domingo-Ferrer J, Mateo-Sanz JM. Practical data-oriented microaggregation for
    statistical disclosure control. IEEE TKDE 2002;14(1):189-201.
    Domingo-Ferrer J, Torra V. Ordinal, continuous and heterogeneous k-anonymity
    through microaggregation. Data Min Knowl Disc 2005;11:195-212 (MDAV listing).
    """
    x = np.asarray(x, dtype=float)
    if x.ndim != 2:
        raise MicroaggregationError(f"x: expected a 2-d array, got shape {x.shape}")
    n = x.shape[0]
    _check_k(k, n)
    if not np.isfinite(x).all():
        bad = sorted(set(np.nonzero(~np.isfinite(x))[1].tolist()))
        raise MicroaggregationError(
            f"x: columns {bad} hold missing or infinite "
            f"values; impute or drop them first"
        )
    groups = np.full(n, -1, dtype=np.int64)
    remaining = np.arange(n)
    g = 0

    def farthest(point: np.ndarray, idx: np.ndarray) -> int:
        d = np.sum((x[idx] - point) ** 2, axis=1)
        return int(idx[int(np.argmax(d))])  # argmax: first of ties

    def take(center: int, idx: np.ndarray) -> np.ndarray:
        d = np.sum((x[idx] - x[center]) ** 2, axis=1)
        order = np.argsort(d, kind="stable")  # stable: ties by input order
        # the centre itself is at distance 0; put it first even among duplicates
        members = [center] + [int(i) for i in idx[order] if i != center][: k - 1]
        return np.asarray(members)

    def assign(members: np.ndarray) -> np.ndarray:
        nonlocal g
        groups[members] = g
        g += 1
        return np.setdiff1d(remaining, members, assume_unique=True)

    while remaining.size >= 3 * k:
        c = x[remaining].mean(axis=0)
        r = farthest(c, remaining)
        s = farthest(x[r], remaining)
        remaining = assign(take(r, remaining))
        if groups[s] >= 0:  # only with many tied distances
            s = farthest(x[r], remaining)
        remaining = assign(take(s, remaining))
    if remaining.size >= 2 * k:
        c = x[remaining].mean(axis=0)
        r = farthest(c, remaining)
        remaining = assign(take(r, remaining))
    if remaining.size:
        remaining = assign(remaining)
    return groups


def microaggregate(
    frame: pd.DataFrame, columns: Sequence[str], k: int, *, standardise: bool = True
) -> MicroaggregationResult:
    """Replace ``columns`` of ``frame`` by their MDAV group means.

    Parameters
    ----------
    frame : DataFrame
        One row per record (a patient profile, or a patient's trajectory at
        common times in wide form).
    columns : sequence of str
        Numeric columns, aggregated jointly (one grouping for all of them).
    k : int
        Minimum group size.
    standardise : bool
        Group on z-scores (column mean 0, population SD 1; a constant column is
        left centred), so that no column dominates the distance by its unit. The
        released means are always on the original scale.

    Raises
    ------
    MicroaggregationError
        A column is missing, not numeric or holds missing values; k < 1 or larger
        than the number of rows.
    """
    if not isinstance(frame, pd.DataFrame):
        raise MicroaggregationError(
            f"frame: expected a pandas DataFrame, got {type(frame).__name__}"
        )
    cols = list(columns)
    if not cols:
        raise MicroaggregationError("columns: expected at least one column")
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise MicroaggregationError(
            f"columns {missing} are not in the table (columns: {list(frame.columns)})"
        )
    for c in cols:
        s = frame[c]
        if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            raise MicroaggregationError(
                f"column {c!r}: expected numeric values, got dtype {s.dtype}"
            )
        n_na = int(s.isna().sum())
        if n_na:
            raise MicroaggregationError(
                f"column {c!r}: {n_na} missing values; "
                f"impute or drop them before aggregating"
            )
    _check_k(k, len(frame))
    x = frame[cols].to_numpy(dtype=float)
    z = x
    if standardise:
        sd = x.std(axis=0)
        z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    groups = mdav(z, int(k))
    n_groups = int(groups.max()) + 1
    sizes = np.bincount(groups, minlength=n_groups)
    sums = np.zeros((n_groups, x.shape[1]))
    np.add.at(sums, groups, x)
    means = sums / sizes[:, None]
    out = frame.copy()
    out[cols] = means[groups]
    return MicroaggregationResult(out, groups, sizes)
