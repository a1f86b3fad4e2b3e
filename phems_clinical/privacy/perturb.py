"""Perturbation of longitudinal values and times: noise addition, coarsening, and
microaggregation of each course's level.

Generalising the quasi-identifiers (:mod:`.search`) leaves a patient's measured
course as it was: a factor level of 91.1806 IU/dL at 3.4342 h, an hourly heart
rate series, a sojourn of 3.901588 days. Such values are unique to one patient and
single them out (anonymeter's singling-out attack finds them in the released
table and in nowhere else). This module perturbs them, following the masking
methods of sdcMicro (Templ, Kowarik & Meindl, J Stat Softw 2015;67(4)):

- **Noise addition** (:func:`multiplicative_noise`, :func:`additive_noise`):
  log-normal noise of a stated coefficient of variation for concentrations (the
  shape of an assay's proportional error), normal noise with SD a stated fraction
  of the column SD for vital signs (sdcMicro ``addNoise(method="additive")``,
  whose ``noise`` is that fraction in per cent; Brand 2002, in *Inference Control
  in Statistical Databases*, LNCS 2316:97-115).
- **Coarsening** (:func:`coarsen`): times and values rounded to a grid (global
  recoding of a continuous variable; sdcMicro ``globalRecode``). Times are
  rounded *up* (an event is reported at the end of the grid interval in which it
  happened), which keeps their order and never moves a sample before its dose.
- **Microaggregation of levels** (:func:`perturb_longitudinal` with ``micro_k``):
  each course (patient, stay, episode) is summarised by its level per value
  column (mean, or mean log for multiplicative columns); the summaries are grouped
  by MDAV (:mod:`.microaggregation`) into groups of at least ``micro_k`` courses,
  and every course's series is shifted (or scaled) so that its level equals its
  group's mean level. The within-course shape is kept; the level is shared by
  ``micro_k`` courses or more.

.. warning::
   The noise of a reproducible release is drawn from the run key (an explicit JAX
   key): anyone holding the key can regenerate it and undo it. This is
   anonymisation (statistical disclosure control), not differential privacy; its
   protection is measured afterwards by the attacks of :mod:`.attacks`, not
   guaranteed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import jax
import numpy as np
import pandas as pd

from phems_clinical.privacy.microaggregation import mdav

__all__ = [
    "LongitudinalRoles",
    "Perturbation",
    "PerturbError",
    "ValueColumn",
    "additive_noise",
    "coarsen",
    "il1s",
    "multiplicative_noise",
    "perturb_longitudinal",
]


class PerturbError(ValueError):
    """A perturbation cannot be applied (names the column or option)."""


@dataclass(frozen=True)
class ValueColumn:
    """How one measured column is perturbed.

    ``noise``: ``"multiplicative"`` (log-normal, for positive concentrations) or
    ``"additive"`` (normal, SD a fraction of the column SD); ``per``: ``"row"``
    (every measurement gets its own draw) or ``"course"`` (a value constant over
    a course, e.g. a baseline covariate, gets one draw per course); ``lower`` /
    ``upper``: the clinical range the noisy values are clipped to; ``resolution``:
    the recorded resolution the noisy values are rounded to (0: none).
    """

    noise: Literal["multiplicative", "additive"]
    per: Literal["row", "course"] = "row"
    lower: float = -np.inf
    upper: float = np.inf
    resolution: float = 0.0


@dataclass(frozen=True)
class LongitudinalRoles:
    """The longitudinal columns of a use case's analysis table.

    ``course``: the column naming one course (patient, ICU stay, surgical
    episode), the unit whose level is microaggregated; ``values``: measured
    columns; ``times``: event-time columns (hours or days from the course's
    start), coarsened together.
    """

    course: str
    values: Mapping[str, ValueColumn] = field(default_factory=dict)
    times: tuple[str, ...] = ()
    time_unit: str = "h"


class Perturbation(NamedTuple):
    """The perturbed table and a report of what was done (options, columns,
    information loss IL1s per column)."""

    data: pd.DataFrame
    report: dict


def _check_scale(name: str, x: float) -> float:
    if (
        isinstance(x, bool)
        or not isinstance(x, int | float | np.floating)
        or not np.isfinite(x)
        or x < 0
    ):
        raise PerturbError(f"{name}: expected a finite number >= 0, got {x!r}")
    return float(x)


def multiplicative_noise(key, x: np.ndarray, cv: float) -> np.ndarray:
    """``x`` times log-normal noise of mean 1 and coefficient of variation ``cv``.

    The factor is ``exp(s z - s^2 / 2)`` with ``z ~ N(0, 1)`` and ``s^2 =
    log(1 + cv^2)``, so E[factor] = 1 and its CV is exactly ``cv`` (the
    proportional error of an assay). Missing values stay missing.
    """
    cv = _check_scale("cv", cv)
    x = np.asarray(x, dtype=float)
    s = np.sqrt(np.log1p(cv * cv))
    z = np.asarray(jax.random.normal(key, x.shape), dtype=float)
    return x * np.exp(s * z - 0.5 * s * s)


def additive_noise(
    key, x: np.ndarray, fraction: float, *, sd: float | None = None
) -> np.ndarray:
    """``x`` plus normal noise of SD ``fraction * sd`` (default: the SD of the
    non-missing ``x``, ddof 1), as sdcMicro ``addNoise(method="additive",
    noise=100 * fraction)``. Missing values stay missing."""
    fraction = _check_scale("fraction", fraction)
    x = np.asarray(x, dtype=float)
    if sd is None:
        ok = x[np.isfinite(x)]
        sd = float(np.std(ok, ddof=1)) if ok.size > 1 else 0.0
    sd = _check_scale("sd", sd)
    z = np.asarray(jax.random.normal(key, x.shape), dtype=float)
    return x + fraction * sd * z


def coarsen(
    x: np.ndarray, grid: float, *, mode: Literal["nearest", "up", "down"] = "nearest"
) -> np.ndarray:
    """Round ``x`` to multiples of ``grid`` (half-way values go up in
    ``"nearest"``); missing values stay missing.

    >>> coarsen(np.array([0.0, 3.4342, 23.1125, 47.65]), 6.0, mode="up").tolist()
    [0.0, 6.0, 24.0, 48.0]
    """
    if (
        isinstance(grid, bool)
        or not isinstance(grid, int | float | np.floating)
        or not np.isfinite(grid)
        or grid <= 0
    ):
        raise PerturbError(f"grid: expected a finite number > 0, got {grid!r}")
    q = np.asarray(x, dtype=float) / grid
    # a value within rounding of a grid point is on it (48.000000001 / 6 -> 8)
    near = np.round(q)
    q = np.where(np.abs(q - near) < 1e-9, near, q)
    if mode == "nearest":
        r = np.floor(q + 0.5)
    elif mode == "up":
        r = np.ceil(q)
    elif mode == "down":
        r = np.floor(q)
    else:
        raise PerturbError(f"mode: expected 'nearest', 'up' or 'down', got {mode!r}")
    return r * grid


def il1s(original: pd.DataFrame, masked: pd.DataFrame, columns) -> dict[str, float]:
    """Information loss IL1s per column: mean ``|x - x'| / (sqrt(2) S)`` over the
    cells where both are present, ``S`` the original column SD (ddof 1); the rows
    of the two frames correspond (Mateo-Sanz, Sebé & Domingo-Ferrer, PSD 2004,
    LNCS 3050:292-302; sdcMicro ``dUtility(method="IL1")``)."""
    out = {}
    for c in columns:
        a = original[c].to_numpy(dtype=float, na_value=np.nan)
        b = masked[c].to_numpy(dtype=float, na_value=np.nan)
        ok = np.isfinite(a) & np.isfinite(b)
        s = float(np.std(a[ok], ddof=1)) if ok.sum() > 1 else 0.0
        out[c] = (
            float(np.mean(np.abs(a[ok] - b[ok])) / (np.sqrt(2) * s)) if s > 0 else 0.0
        )
    return out


def _levels(
    df: pd.DataFrame, course: str, values: Mapping[str, ValueColumn]
) -> pd.DataFrame:
    """Per course, the level of each value column (mean; mean log if
    multiplicative, over the positive values)."""
    cols = {}
    for c, v in values.items():
        x = df[c].astype(float)
        if v.noise == "multiplicative":
            x = np.log(x.where(x > 0))
        cols[c] = x.groupby(df[course], sort=False).mean()
    return pd.DataFrame(cols)


def _microaggregate_levels(df, course, values, k):
    lev = _levels(df, course, values)
    if len(lev) < k:
        raise PerturbError(
            f"micro_k={k} is impossible: the table has {len(lev)} courses ({course!r})"
        )
    z = lev.to_numpy(dtype=float)
    mu, sd = np.nanmean(z, axis=0), np.nanstd(z, axis=0)
    z = (z - mu) / np.where(sd > 0, sd, 1.0)
    z = np.where(np.isfinite(z), z, 0.0)  # a course without a value: at the mean
    groups = mdav(z, k)
    target = lev.groupby(groups).transform("mean")  # NaN-skipping group means
    shift = (target - lev).fillna(0.0)  # courses without values stay as they are
    out = df.copy()
    for c, v in values.items():
        d = df[course].map(shift[c]).to_numpy(float)
        x = out[c].to_numpy(dtype=float, na_value=np.nan)
        out[c] = x * np.exp(d) if v.noise == "multiplicative" else x + d
    return out, groups


def perturb_longitudinal(
    key,
    data: pd.DataFrame,
    roles: LongitudinalRoles,
    *,
    micro_k: int | None = None,
    noise: float = 0.0,
    time_grid: float | None = None,
) -> Perturbation:
    """Perturb the value and time columns of a longitudinal table.

    Steps, each skipped when its option is off: (1) microaggregate each course's
    level per value column into MDAV groups of ``micro_k`` courses or more; (2)
    add noise: multiplicative columns get log-normal noise of CV ``noise``,
    additive columns normal noise of SD ``noise`` times the column SD, per row or
    once per course (:class:`ValueColumn`), then clipping to the clinical range
    and rounding to the recorded resolution; (3) round every time column up to
    ``time_grid`` (in ``roles.time_unit``). Times are not capped: a cap at the
    largest time would release that one exact value; an end of follow-up that is
    not on the grid moves up to the next grid point (365 d -> 371 d on a 7-day
    grid).

    Parameters
    ----------
    key : jax PRNG key
        The run key: the noise is reproducible from it (anonymisation, not
        differential privacy; see the module warning).
    data : DataFrame
        The analysis table, with ``roles.course`` and the declared columns (value
        columns that are absent are skipped and listed in the report).
    micro_k, noise, time_grid : the settings (None / 0 / None: off).

    Returns
    -------
    Perturbation
        The table (same rows, same order) and a report: the options, columns
        perturbed, the group sizes, and IL1s per column against ``data``.
    """
    if not isinstance(data, pd.DataFrame):
        raise PerturbError(
            f"data: expected a pandas DataFrame, got {type(data).__name__}"
        )
    if roles.course not in data.columns:
        raise PerturbError(f"course column {roles.course!r} is not in the table")
    noise = _check_scale("noise", noise)
    values = {c: v for c, v in roles.values.items() if c in data.columns}
    times = [c for c in roles.times if c in data.columns]
    for c in [*values, *times]:
        if not pd.api.types.is_numeric_dtype(data[c]):
            raise PerturbError(
                f"column {c!r}: expected numeric values, got dtype {data[c].dtype}"
            )
    out = data.copy()
    report: dict = {
        "micro_k": micro_k,
        "noise": noise,
        "time_grid": time_grid,
        "time_unit": roles.time_unit,
        "course": roles.course,
        "values": list(values),
        "times": times,
        "absent": [c for c in [*roles.values, *roles.times] if c not in data.columns],
    }
    if micro_k is not None:
        if (
            isinstance(micro_k, bool)
            or not isinstance(micro_k, int | np.integer)
            or micro_k < 1
        ):
            raise PerturbError(f"micro_k: expected an integer >= 1, got {micro_k!r}")
        if not values:
            raise PerturbError(
                "micro_k: the table has no value columns to "
                f"microaggregate (declared: {list(roles.values)})"
            )
        out, groups = _microaggregate_levels(out, roles.course, values, int(micro_k))
        sizes = np.bincount(groups)
        report["micro_groups"] = {
            "n": int(sizes.size),
            "min": int(sizes.min()),
            "max": int(sizes.max()),
        }
    if noise > 0 and values:
        keys = jax.random.split(key, len(values))
        for kk, (c, v) in zip(keys, values.items(), strict=True):
            x = out[c].to_numpy(dtype=float, na_value=np.nan)
            if v.per == "course":
                codes, uniq = pd.factorize(out[roles.course], sort=False)
                base = (
                    np.ones(len(uniq))
                    if v.noise == "multiplicative"
                    else np.zeros(len(uniq))
                )
                sd = float(np.nanstd(out.groupby(codes)[c].first(), ddof=1))
                draw = (
                    multiplicative_noise(kk, base, noise)
                    if v.noise == "multiplicative"
                    else additive_noise(kk, base, noise, sd=sd)
                )
                x = x * draw[codes] if v.noise == "multiplicative" else x + draw[codes]
            elif v.noise == "multiplicative":
                x = multiplicative_noise(kk, x, noise)
            else:
                x = additive_noise(
                    kk, x, noise, sd=float(np.nanstd(data[c].astype(float), ddof=1))
                )
            x = np.clip(x, v.lower, v.upper)
            if v.resolution > 0:
                x = np.clip(coarsen(x, v.resolution), v.lower, v.upper)
            out[c] = x
    if time_grid is not None:
        for c in times:
            x = out[c].to_numpy(dtype=float, na_value=np.nan)
            out[c] = coarsen(x, time_grid, mode="up")
    report["il1s"] = il1s(data, out, [*values, *times])
    return Perturbation(out, report)
