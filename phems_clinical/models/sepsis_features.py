"""Labels and hourly features for sepsis prediction from the hourly PICU table.

Input: the hourly PICU analysis table (one row per stay-hour, columns
``site, person_id, stay_id, hour, age_months, sex``, the vitals/labs, the
interventions; labs NOT carried forward) and the Phoenix sepsis onset hour per stay
(``phems_clinical.models.scores.sepsis_onset``; Schlapbach et al., JAMA 2024;331:665).

**Target** (:func:`make_labels`): at stay-hour ``t`` before onset, ``y_t = 1`` when
onset falls in ``(t, t + H]`` (default ``H = 6`` h, as the PhysioNet/CinC 2019 label
starts 6 h before onset; Reyna et al., Crit Care Med 2020;48:210). Hours at or
after onset are EXCLUDED from training and from AUROC/AUPRC/calibration (the patient
is already septic); stays without onset contribute all their hours with ``y = 0``.

**Features** look back only (no row uses a later hour), on a dense (stay, hour) grid:

* windowed (logistic model, :data:`LOGISTIC`): per variable the last value observed
  within ``lookback_h`` (default 24 h), min/max/mean over the last 6 h and 24 h,
  hours since the last measurement (capped at ``lookback_h``, divided by it), and a
  missingness indicator (nothing within ``lookback_h``); per intervention its value
  this hour and its maximum over 24 h; age-band one-hots (Phoenix months bands <1,
  1-11, 12-23, 24-59, 60-143, >=144; Sanchez-Pinto et al., JAMA 2024;331:675) and
  sex;
* sequence (temporal convolution, :data:`TCN`): per variable the last value within
  ``lookback_h``, measured-this-hour mask and hours since the last measurement;
  interventions this hour; age band and sex.

Right-skewed labs and the SpO2:FiO2 / PaO2:FiO2 ratios (:data:`LOG_SCALE`) enter on
the log scale. Standardisation uses only sums (count, sum, sum of squares per feature
over real hours), which sites can add up (:class:`FeatureStats`). For the logistic
model only the value summaries (last/min/max/mean) are standardised (indicators,
counts, one-hots and the hours-since in [0, 1] stay as they are: standardising rare
indicators gives values of 30 SD that slowed and destabilised training); the TCN's
inputs are all standardised (it trained markedly better so: held-out AUROC 0.75
vs 0.66 on the default simulated sites). After standardising, a feature
that is NaN (nothing observed) becomes 0, the mean, with its missingness indicator
carrying the information.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from phems_clinical.data.picu.hourly import VALUE_COLUMNS

__all__ = [
    "AGE_BANDS_MONTHS",
    "FeatureStats",
    "INTERVENTIONS",
    "LOGISTIC",
    "LOG_SCALE",
    "SepsisInputError",
    "SiteTensors",
    "TCN",
    "VARIABLES",
    "build_site",
    "feature_names",
    "feature_stats",
    "make_labels",
    "onset_per_row",
    "scaled_features",
    "standardise",
]

LOGISTIC = "logistic"
TCN = "tcn"

#: Vitals and labs of the hourly contract (units as in the OMOP measurement list).
MEASURED = VALUE_COLUMNS
#: Ratios formed when both parts are measured in the same hour (the Phoenix
#: respiratory inputs SpO2:FiO2 and PaO2:FiO2; FiO2 as a fraction).
DERIVED = ("sf_ratio", "pf_ratio")
VARIABLES = MEASURED + DERIVED
#: Right-skewed positive labs (and the ratios) enter on the log scale, so that a
#: few extreme values do not dominate the standardised features.
LOG_SCALE = (
    "lactate",
    "inr",
    "d_dimer",
    "anc",
    "alc",
    "wbc",
    "creatinine",
    "bilirubin",
    "alt",
    "sf_ratio",
    "pf_ratio",
)
INTERVENTIONS = (
    "imv",
    "other_respiratory_support",
    "vasoactives",
    "antimicrobial",
    "culture",
)
#: Upper edges (months, exclusive) of the Phoenix age bands; the last is open.
AGE_BANDS_MONTHS = (1.0, 12.0, 24.0, 60.0, 144.0)
REQUIRED = ("stay_id", "hour", "age_months", "sex") + MEASURED + INTERVENTIONS


class SepsisInputError(ValueError):
    """The hourly table or the onsets are not as the contract says (names the
    table, column and what was expected)."""


def _check_hourly(hourly: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED if c not in hourly.columns]
    if missing:
        raise SepsisInputError(f"hourly table: missing column(s) {missing}")
    hour = hourly["hour"].to_numpy()
    if hour.size and (not np.issubdtype(hour.dtype, np.integer) or hour.min() < 0):
        raise SepsisInputError("hourly table, column 'hour': expected integers >= 0")
    if hourly[["stay_id", "hour"]].duplicated().any():
        raise SepsisInputError("hourly table: duplicate (stay_id, hour) rows")


def onset_per_row(hourly: pd.DataFrame, onset) -> np.ndarray:
    """The stay's onset hour on each row (NaN: no onset).

    onset : Series indexed by stay_id (NaN or absent = no onset) or a mapping.
    """
    if isinstance(onset, Mapping):
        onset = pd.Series(onset, dtype=np.float64)
    if not isinstance(onset, pd.Series):
        raise SepsisInputError("onset: expected a Series indexed by stay_id")
    if onset.index.duplicated().any():
        raise SepsisInputError("onset: duplicate stay_id in the index")
    o = pd.to_numeric(onset, errors="coerce").astype(np.float64)
    return hourly["stay_id"].map(o).to_numpy(dtype=np.float64, na_value=np.nan)


def make_labels(hourly: pd.DataFrame, onset, horizon_h: int = 6) -> pd.DataFrame:
    """Per row: ``y`` (1 when onset is in ``(hour, hour + horizon_h]``), ``include``
    (the hour is before onset, or the stay has none) and ``sepsis_label`` (the
    CinC 2019 label: 1 from ``onset - 6`` h onward). Index = ``hourly.index``."""
    if horizon_h < 1:
        raise SepsisInputError(f"horizon_h: expected >= 1 hour, got {horizon_h}")
    o = onset_per_row(hourly, onset)
    hour = hourly["hour"].to_numpy(dtype=np.float64)
    none = np.isnan(o)
    with np.errstate(invalid="ignore"):
        include = none | (hour < o)
        y = ~none & include & (o - hour <= horizon_h)
        cinc = ~none & (hour >= o - 6.0)
    return pd.DataFrame(
        {
            "y": y.astype(np.int8),
            "include": include,
            "sepsis_label": cinc.astype(np.int8),
        },
        index=hourly.index,
    )


# --- windowed reductions along the hour axis (axis 1), NaN-aware --------------------


def _shift(a: np.ndarray, k: int, fill) -> np.ndarray:
    """``out[:, t] = a[:, t - k]`` (``fill`` for ``t < k``)."""
    out = np.full_like(a, fill)
    if k < a.shape[1]:
        out[:, k:] = a[:, : a.shape[1] - k]
    return out


def _rolling_extreme(a: np.ndarray, w: int, fn) -> np.ndarray:
    """``fn``-reduce (np.fmax / np.fmin) over the trailing window ``[t-w+1, t]`` by
    doubling (O(log w) passes); all-NaN windows give NaN."""
    m, size = a, 1
    while 2 * size <= w:
        m = fn(m, _shift(m, size, np.nan))
        size *= 2
    return fn(m, _shift(m, w - size, np.nan)) if w > size else m


def _rolling_sum(a: np.ndarray, w: int) -> np.ndarray:
    c = np.cumsum(a, axis=1)
    return c - _shift(c, w, 0.0)


class SiteTensors(NamedTuple):
    """One site's stays on a dense (stay, hour) grid (before standardisation).

    x : (n, T, F) float32, NaN where a feature is undefined.
    y, w, sepsis_label : (n, T) float32 -- horizon label, 1 for hours used in loss
        and metrics (present and before onset), CinC 2019 label.
    present : (n, T) bool -- the stay has a row for that hour.
    stay_id : (n,) int64.
    names : feature names (F,).
    model : which model the features are for (``"logistic"`` or ``"tcn"``).
    """

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    sepsis_label: np.ndarray
    present: np.ndarray
    stay_id: np.ndarray
    names: tuple[str, ...]
    model: str = LOGISTIC


def feature_names(
    model: str = LOGISTIC, *, windows: Sequence[int] = (6, 24)
) -> tuple[str, ...]:
    """Names of the feature columns, in order."""
    bands = [f"age_band_{i}" for i in range(len(AGE_BANDS_MONTHS) + 1)]
    if model == LOGISTIC:
        per = ["last"] + [f"{s}{w}h" for w in windows for s in ("min", "max", "mean")]
        per += ["hours_since", "missing"]
        names = [f"{v}_{s}" for v in VARIABLES for s in per]
        names += [f"{v}_{s}" for v in INTERVENTIONS for s in ("now", "max24h")]
    elif model == TCN:
        names = [
            f"{v}_{s}" for v in VARIABLES for s in ("last", "measured", "hours_since")
        ]
        names += [f"{v}_now" for v in INTERVENTIONS]
    else:
        raise SepsisInputError(
            f"model: expected {LOGISTIC!r} or {TCN!r}, got {model!r}"
        )
    return tuple(names + bands + ["male"])


def build_site(
    hourly: pd.DataFrame,
    onset,
    *,
    model: str = LOGISTIC,
    horizon_h: int = 6,
    max_hours: int = 168,
    lookback_h: int = 24,
    windows: Sequence[int] = (6, 24),
) -> SiteTensors:
    """Labels and unstandardised features of one site's stays (see the module doc).

    Hours ``>= max_hours`` are dropped (T = min(max_hours, longest stay)). Memory:
    ``n * T * F * 4`` bytes (F = 251 logistic, 90 TCN features).
    """
    _check_hourly(hourly)
    if max_hours < 1 or lookback_h < 1 or any(w < 1 for w in windows):
        raise SepsisInputError("max_hours, lookback_h, windows: expected >= 1 hour")
    names = feature_names(model, windows=windows)
    df = hourly[hourly["hour"].to_numpy() < max_hours]
    lab = make_labels(df, onset, horizon_h)
    stay_id, code = np.unique(df["stay_id"].to_numpy(np.int64), return_inverse=True)
    code = code.ravel()
    hour = df["hour"].to_numpy(np.int64)
    n = stay_id.size
    T = int(hour.max()) + 1 if n else 1

    def grid(values, fill=np.nan, dtype=np.float64):
        g = np.full((n, T) + values.shape[1:], fill, dtype=dtype)
        g[code, hour] = values
        return g

    present = grid(np.ones(len(df), bool), False, bool)
    meas = df[list(MEASURED)].to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        fio2 = meas[:, MEASURED.index("fio2")]
        ratios = np.column_stack(
            [
                meas[:, MEASURED.index("spo2")] / fio2,
                meas[:, MEASURED.index("pao2")] / fio2,
            ]
        )
    ratios[~np.isfinite(ratios)] = np.nan
    allv = np.column_stack([meas, ratios])
    logc = [VARIABLES.index(c) for c in LOG_SCALE]
    with np.errstate(divide="ignore", invalid="ignore"):
        allv[:, logc] = np.log(np.maximum(allv[:, logc], 1e-3))
    v = grid(allv)  # (n, T, V)
    iv = grid(
        np.nan_to_num(
            df[list(INTERVENTIONS)].to_numpy(dtype=np.float64, na_value=np.nan)
        ),
        0.0,
    )  # (n, T, I)
    age = df["age_months"].to_numpy(dtype=np.float64, na_value=np.nan)
    band = np.searchsorted(np.asarray(AGE_BANDS_MONTHS), age, side="right")
    static = np.zeros((len(df), len(AGE_BANDS_MONTHS) + 2))
    static[np.arange(len(df)), band] = 1.0
    static[np.isnan(age), :-1] = np.nan
    static[:, -1] = (df["sex"].to_numpy() == "M").astype(np.float64)
    static = grid(static)

    obs = ~np.isnan(v)
    t = np.arange(T, dtype=np.float64)[None, :, None]
    last_t = np.maximum.accumulate(np.where(obs, t, -np.inf), axis=1)
    since = t - last_t  # inf: never
    idx = np.where(np.isfinite(last_t), last_t, 0).astype(np.int64)
    last = np.take_along_axis(v, idx, axis=1)
    recent = since < lookback_h
    last[~recent] = np.nan
    since_scaled = np.minimum(since, lookback_h) / lookback_h

    out = np.empty((n, T, len(names)), dtype=np.float32)
    V = len(VARIABLES)
    if model == LOGISTIC:
        k = 1 + 3 * len(windows) + 2
        block = out[:, :, : V * k].reshape(n, T, V, k)
        block[..., 0] = last
        v0 = np.where(obs, v, 0.0)
        for j, w in enumerate(windows):
            cnt = _rolling_sum(obs.astype(np.float64), w)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = _rolling_sum(v0, w) / cnt
            block[..., 1 + 3 * j] = _rolling_extreme(v, w, np.fmin)
            block[..., 2 + 3 * j] = _rolling_extreme(v, w, np.fmax)
            block[..., 3 + 3 * j] = np.where(cnt > 0, mean, np.nan)
        block[..., k - 2] = since_scaled
        block[..., k - 1] = ~recent
        off = V * k
        ivb = out[:, :, off : off + 2 * len(INTERVENTIONS)].reshape(
            n, T, len(INTERVENTIONS), 2
        )
        ivb[..., 0] = iv
        ivb[..., 1] = _rolling_extreme(iv, 24, np.fmax)
        off += 2 * len(INTERVENTIONS)
    else:
        block = out[:, :, : 3 * V].reshape(n, T, V, 3)
        block[..., 0] = last
        block[..., 1] = obs
        block[..., 2] = since_scaled
        off = 3 * V
        out[:, :, off : off + len(INTERVENTIONS)] = iv
        off += len(INTERVENTIONS)
    out[:, :, off:] = static

    y = grid(lab["y"].to_numpy(np.float64), 0.0, np.float32)
    w = grid(lab["include"].to_numpy(np.float64), 0.0, np.float32)
    cinc = grid(lab["sepsis_label"].to_numpy(np.float64), 0.0, np.float32)
    return SiteTensors(out, y, w, cinc, present, stay_id, names, model)


_VALUE_STATS = ("last", "min", "max", "mean")


def scaled_features(names: Sequence[str]) -> np.ndarray:
    """Which features are standardised: the value summaries (last, min, max, mean);
    indicators, counts, hours-since (already in [0, 1]) and one-hots stay as
    they are."""
    return np.array(
        [
            any(
                n.startswith(v + "_") and n[len(v) + 1 :].startswith(_VALUE_STATS)
                for v in VARIABLES
            )
            for n in names
        ]
    )


class FeatureStats(NamedTuple):
    """Per-feature count, sum and sum of squares over real hours (non-NaN values);
    sites' stats add (``+``), so the pooled mean/SD need only a secure sum."""

    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray

    def __add__(self, other):  # type: ignore[override]
        return FeatureStats(*(a + b for a, b in zip(self, other, strict=True)))

    def mean_sd(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and SD (population); SD 1 where a feature is constant or unseen."""
        cnt = np.maximum(self.count, 1.0)
        mean = self.total / cnt
        var = np.maximum(self.total_sq / cnt - mean**2, 0.0)
        sd = np.sqrt(var)
        return mean, np.where(sd > 1e-8 * np.maximum(1.0, np.abs(mean)), sd, 1.0)


def feature_stats(site: SiteTensors) -> FeatureStats:
    """The site's sums over its present hours (float64)."""
    x = site.x[site.present].astype(np.float64)  # (rows, F)
    ok = ~np.isnan(x)
    x0 = np.where(ok, x, 0.0)
    return FeatureStats(ok.sum(0).astype(np.float64), x0.sum(0), (x0**2).sum(0))


def standardise(
    x: np.ndarray, stats: FeatureStats, names: Sequence[str] | None = None
) -> np.ndarray:
    """``(x - mean) / sd`` with NaN -> 0 (float32); with ``names``, only the
    :func:`scaled_features` are standardised (the others keep their values)."""
    mean, sd = stats.mean_sd()
    if names is not None:
        keep = ~scaled_features(names)
        mean, sd = np.where(keep, 0.0, mean), np.where(keep, 1.0, sd)
    z = (x - mean.astype(np.float32)) / sd.astype(np.float32)
    return np.nan_to_num(z, nan=0.0).astype(np.float32, copy=False)
