"""Paediatric organ-dysfunction scores on the hourly PICU table: Phoenix, Phoenix-8,
pSOFA and PELOD-2, plus the worst-window rule and the Phoenix sepsis onset.

Input is a DataFrame with the columns of :func:`phems_clinical.data.picu.hourly_table`
(units in ``data_schemas/sepsis_hourly.schema.json``); absent columns count as not
measured. All functions are vectorised numpy over rows and return frames aligned with
the input index.

Operational rules (Sanchez-Pinto et al., JAMA 2024;331(8):675-686; Schlapbach et al.,
JAMA 2024;331(8):665-674; the ``phoenix-sepsis`` reference implementation):

* a missing component scores 0 (nothing is imputed);
* SpO2:FiO2 is used only when SpO2 <= 97 %;
* MAP falls back on DBP + (SBP - DBP) / 3, computed as (2 DBP + SBP) / 3, when MAP
  was not measured in the hour;
* PaO2:FiO2 = pao2 / fio2 (FiO2 as a fraction 0.21-1);
* each hour is scored on the values of that hour (``lookback_h=0``); ``lookback_h=k``
  uses the latest value of the last ``k`` hours of the same stay instead;
* the "worst 24 h" score is the worst TOTAL in the window (:func:`worst_in_window`),
  not the sum of the worst components;
* sepsis = suspected infection and Phoenix >= 2; septic shock = sepsis and >= 1
  cardiovascular point.

Differences from ``phoenix-sepsis`` 1.1.3 (documented, tested): a missing age scores 0
for the age-banded renal item (the reference then uses the <1 month cut-off); the
reference's ``phoenix_sepsis`` flag is Phoenix >= 2 without an infection check, here
``suspected_infection=True`` gives the same flag.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "ScoreInputError",
    "pelod2",
    "phoenix",
    "phoenix8",
    "psofa",
    "rolling_worst",
    "sepsis_onset",
    "suspected_infection",
    "worst_in_window",
]

#: Age band lower edges (months) shared by Phoenix, pSOFA and PELOD-2.
AGE_EDGES = np.array([0.0, 1.0, 12.0, 24.0, 60.0, 144.0])

# Phoenix (Sanchez-Pinto et al. 2024, Table; phoenix-sepsis software form): MAP (mmHg)
# below the first value scores 1, below the second 2, per age band.
_PHX_MAP = np.array([[31, 17], [39, 25], [44, 31], [45, 32], [49, 36], [52, 38.0]])
# Phoenix-8 renal: creatinine (mg/dL) at or above scores 1, per age band.
_PHX_CREAT = np.array([0.8, 0.3, 0.4, 0.6, 0.7, 1.0])

# pSOFA (Matics TJ, Sanchez-Pinto LN. Adaptation and validation of a pediatric
# Sequential Organ Failure Assessment score. JAMA Pediatr 2017;171(10):e172352,
# Table 1): age bands <1, 1-11, 12-23, 24-59, 60-143, 144-216, >216 months.
_PSOFA_MAP = np.array([46, 55, 60, 62, 65, 67, 70.0])  # MAP below scores 1
_PSOFA_CREAT = np.array(
    [  # creatinine (mg/dL) at or above scores 1, 2, 3, 4
        [0.8, 1.0, 1.2, 1.6],
        [0.3, 0.5, 0.8, 1.2],
        [0.4, 0.6, 1.1, 1.5],
        [0.6, 0.9, 1.6, 2.3],
        [0.7, 1.1, 1.8, 2.6],
        [1.0, 1.7, 2.9, 4.2],
        [1.2, 2.0, 3.5, 5.0],
    ]
)
_PSOFA_AGE_EDGES = np.array([0.0, 1.0, 12.0, 24.0, 60.0, 144.0, 216.0])

# PELOD-2 (Leteurtre S, et al. Crit Care Med 2013;41:1761-1773, Table 3 †): MAP below
# c0 scores 2, below c1 3, below c2 6; creatinine (umol/L) at or above scores 2.
_PELOD_MAP = np.array(
    [
        [46, 31, 17],
        [55, 39, 25],
        [60, 44, 31],
        [62, 46, 32],
        [65, 49, 36],
        [67, 52, 38.0],
    ]
)
_PELOD_CREAT_UMOL = np.array([70, 23, 35, 51, 59, 93.0])
_CREAT_MG_TO_UMOL = 88.4

_PHOENIX_COLS = ("respiratory", "cardiovascular", "coagulation", "neurologic")
_P8_COLS = ("endocrine", "immunologic", "renal", "hepatic")


class ScoreInputError(ValueError):
    """The hourly frame cannot be scored (names the column and what was expected)."""


# ---------------------------------------------------------------- helpers
def _stay_keys(df: pd.DataFrame) -> np.ndarray:
    if "stay_id" not in df.columns or "hour" not in df.columns:
        raise ScoreInputError(
            "hourly frame: columns 'stay_id' and 'hour' are needed for per-stay windows"
        )
    if "site" in df.columns:
        code = pd.MultiIndex.from_arrays([df["site"], df["stay_id"]]).factorize()[0]
    else:
        code = pd.factorize(df["stay_id"])[0]
    return code.astype(np.int64)


def _sorted_key(df: pd.DataFrame):
    """(key, order): key = stay code * 2^32 + hour, order sorts rows by key."""
    code = _stay_keys(df)
    hour = df["hour"].to_numpy(np.int64)
    if (hour < 0).any() or (hour >= 2**31).any():
        raise ScoreInputError("hourly frame: column 'hour' must be in [0, 2^31)")
    key = code * 2**32 + hour
    order = np.argsort(key, kind="stable")
    return key, order


def _values(
    df: pd.DataFrame, name: str, lookback_h: int = 0, ctx: tuple | None = None
) -> np.ndarray:
    """Column as float (NaN when absent), optionally the latest within lookback_h h."""
    if name not in df.columns:
        return np.full(len(df), np.nan)
    x = pd.to_numeric(df[name]).to_numpy(np.float64)
    if lookback_h <= 0:
        return x
    key, order = ctx
    xs, ks = x[order], key[order]
    pos = np.arange(len(xs))
    last = np.maximum.accumulate(np.where(~np.isnan(xs), pos, -1))
    lastc = np.maximum(last, 0)
    ok = (last >= 0) & (ks[lastc] >> 32 == ks >> 32) & (ks - ks[lastc] <= lookback_h)
    out = np.empty_like(x)
    out[order] = np.where(ok, xs[lastc], np.nan)
    return out


class _Inputs:
    def __init__(self, df, lookback_h):
        self.df = df
        self.lookback_h = int(lookback_h)
        self.ctx = _sorted_key(df) if self.lookback_h > 0 else None
        self.cache = {}

    def __call__(self, name):
        if name not in self.cache:
            self.cache[name] = _values(self.df, name, self.lookback_h, self.ctx)
        return self.cache[name]

    def flag(self, name):
        """0/1 intervention columns: never looked back (they are hourly states)."""
        return np.nan_to_num(_values(self.df, name), nan=0.0)

    def ratios(self):
        fio2 = self("fio2")
        if np.nanmax(np.where(np.isnan(fio2), -np.inf, fio2), initial=-np.inf) > 1:
            raise ScoreInputError(
                "column 'fio2': expected a fraction 0.21-1, found values > 1 (percent?)"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            pf = self("pao2") / fio2
            spo2 = self("spo2")
            sf = np.where(spo2 <= 97, spo2 / fio2, np.nan)
        return pf, sf

    def map(self):
        m = self("map")
        fallback = (2 * self("dbp") + self("sbp")) / 3
        return np.where(np.isnan(m), fallback, m)

    def age(self):
        return (
            self("age_months")
            if "age_months" in self.df.columns
            else np.full(len(self.df), np.nan)
        )


def _band(age: np.ndarray, edges: np.ndarray, upper: float | None) -> np.ndarray:
    """Band index of each age (-1 when NaN, negative or above ``upper``)."""
    b = np.searchsorted(edges, np.nan_to_num(age, nan=-1.0), side="right") - 1
    bad = np.isnan(age) | (age < 0)
    if upper is not None:
        bad |= age > upper
    return np.where(bad, -1, b)


def _by_band(table: np.ndarray, band: np.ndarray, fill: float) -> np.ndarray:
    out = np.full((len(band),) + table.shape[1:], fill)
    ok = band >= 0
    out[ok] = table[band[ok]]
    return out


def _frame(df, cols: dict) -> pd.DataFrame:
    return pd.DataFrame(
        {k: np.asarray(v).astype(np.int64) for k, v in cols.items()}, index=df.index
    )


# ---------------------------------------------------------------- Phoenix
def _phoenix_parts(x: _Inputs) -> dict[str, np.ndarray]:
    pf, sf = x.ratios()
    imv = x.flag("imv")
    ors = ((imv == 1) | (x.flag("other_respiratory_support") == 1)).astype(int)
    resp = (imv == 1) * (
        ((pf < 100) | (sf < 148)).astype(int) + ((pf < 200) | (sf < 220)).astype(int)
    ) + ors * ((pf < 400) | (sf < 292)).astype(int)

    vaso = np.nan_to_num(x("vasoactives"), nan=0.0)
    lact = x("lactate")
    mapv = x.map()
    cut = _by_band(_PHX_MAP, _band(x.age(), AGE_EDGES, 216.0), -np.inf)
    card = (
        (vaso > 1).astype(int)
        + (vaso > 0)
        + (lact >= 11)
        + (lact >= 5)
        + (mapv < cut[:, 0])
        + (mapv < cut[:, 1])
    )

    coag = np.minimum(
        2,
        (x("platelets") < 100).astype(int)
        + (x("inr") > 1.3)
        + (x("d_dimer") > 2)
        + (x("fibrinogen") < 100),
    )
    pupils = np.nan_to_num(x("fixed_pupils"), nan=0.0)
    neuro = np.minimum(2, 2 * (pupils == 1).astype(int) + (x("gcs") <= 10))
    return {
        "respiratory": resp,
        "cardiovascular": card,
        "coagulation": coag,
        "neurologic": neuro,
    }


def _infection(df, suspected_infection, window_h):
    if suspected_infection is None:
        return suspected_infection_flags(df, window_h=window_h)
    if isinstance(suspected_infection, bool):
        return np.full(len(df), suspected_infection)
    si = np.asarray(suspected_infection, bool)
    if si.shape != (len(df),):
        raise ScoreInputError(
            f"suspected_infection: expected a bool per row "
            f"({len(df)}), got shape {si.shape}"
        )
    return si


def phoenix(
    df: pd.DataFrame,
    *,
    lookback_h: int = 0,
    suspected_infection=None,
    window_h: int = 24,
) -> pd.DataFrame:
    """Phoenix Sepsis Score per row (Sanchez-Pinto et al., JAMA 2024).

    Args:
      df: hourly table (see module doc for the rules).
      lookback_h: use the latest value within this many hours of the same stay.
      suspected_infection: ``None`` = from ``antimicrobial`` and ``culture`` within
        ``window_h`` hours (:func:`suspected_infection`); ``True``/``False`` for all
        rows; or a bool per row.
      window_h: window (h) pairing antimicrobials and cultures.

    Returns:
      DataFrame (int64): respiratory (0-3), cardiovascular (0-6), coagulation (0-2),
      neurologic (0-2), total (0-13), sepsis (0/1), septic_shock (0/1).
    """
    parts = _phoenix_parts(_Inputs(df, lookback_h))
    total = sum(parts.values())
    si = _infection(df, suspected_infection, window_h)
    sepsis = (total >= 2) & si
    return _frame(
        df,
        {
            **parts,
            "total": total,
            "sepsis": sepsis,
            "septic_shock": sepsis & (parts["cardiovascular"] > 0),
        },
    )


def phoenix8(
    df: pd.DataFrame,
    *,
    lookback_h: int = 0,
    suspected_infection=None,
    window_h: int = 24,
) -> pd.DataFrame:
    """Phoenix-8: :func:`phoenix` plus endocrine, immunologic, renal, hepatic points.

    Endocrine: glucose < 50 or > 150 mg/dL; immunologic: ANC < 0.5 or ALC < 1.0
    10^3/uL; renal: creatinine >= 0.8 / 0.3 / 0.4 / 0.6 / 0.7 / 1.0 mg/dL by age band;
    hepatic: bilirubin >= 4 mg/dL or ALT > 102 IU/L (Sanchez-Pinto et al. 2024).
    Columns: those of :func:`phoenix` plus endocrine, immunologic, renal, hepatic,
    total8 (0-17).
    """
    x = _Inputs(df, lookback_h)
    parts = _phoenix_parts(x)
    total = sum(parts.values())
    glc = x("glucose")
    endo = (glc < 50) | (glc > 150)
    immu = (x("anc") < 0.5) | (x("alc") < 1.0)
    cut = _by_band(_PHX_CREAT, _band(x.age(), AGE_EDGES, 216.0), np.inf)
    renal = x("creatinine") >= cut
    hep = (x("bilirubin") >= 4) | (x("alt") > 102)
    si = _infection(df, suspected_infection, window_h)
    sepsis = (total >= 2) & si
    extra = {"endocrine": endo, "immunologic": immu, "renal": renal, "hepatic": hep}
    total8 = total + sum(v.astype(int) for v in extra.values())
    return _frame(
        df,
        {
            **parts,
            "total": total,
            "sepsis": sepsis,
            "septic_shock": sepsis & (parts["cardiovascular"] > 0),
            **extra,
            "total8": total8,
        },
    )


# ---------------------------------------------------------------- pSOFA
def psofa(df: pd.DataFrame, *, lookback_h: int = 0) -> pd.DataFrame:
    """Paediatric SOFA (Matics & Sanchez-Pinto, JAMA Pediatr 2017;171(10):e172352).

    Table 1 cut-offs: respiratory PaO2:FiO2 <400 / <300 / <200 and <100 with
    respiratory support (1-4), or, when PaO2:FiO2 is unavailable, SpO2:FiO2 (SpO2
    <= 97 %) <292 / <264 / <221 and <148 with support; coagulation platelets <150 /
    <100 / <50 / <20 10^3/uL; hepatic bilirubin >=1.2 / >=2.0 / >=6.0 / >=12.0 mg/dL;
    cardiovascular MAP below the age cut-off (46, 55, 60, 62, 65, 67, 70 mmHg for
    <1, 1-11, 12-23, 24-59, 60-143, 144-216, >216 months) 1, dopamine <=5 or any
    dobutamine 2, dopamine >5 or epinephrine/norepinephrine <=0.1 3, dopamine >15 or
    epinephrine/norepinephrine >0.1 ug/kg/min 4; neurological GCS 13-14 / 10-12 /
    6-9 / <6; renal creatinine by age band (module table).

    Respiratory support = ``imv`` or ``other_respiratory_support``. Doses are read
    from optional columns ``dopamine_dose``, ``dobutamine_dose``,
    ``epinephrine_dose``, ``norepinephrine_dose`` (ug/kg/min). Without any dose
    column (the hourly table has the vasoactive *count* only) the operational proxy
    is 1 agent -> 3 points, >= 2 agents -> 4 points (first-line paediatric agents are
    epinephrine/norepinephrine, scored >= 3 at any dose).

    Returns DataFrame (int64): respiratory, coagulation, hepatic, cardiovascular,
    neurologic, renal (0-4 each), total (0-24).
    """
    x = _Inputs(df, lookback_h)
    pf, sf = x.ratios()
    support = (x.flag("imv") == 1) | (x.flag("other_respiratory_support") == 1)
    resp_pf = (
        (pf < 400).astype(int)
        + (pf < 300)
        + ((pf < 200) & support)
        + ((pf < 100) & support)
    )
    resp_sf = (
        (sf < 292).astype(int)
        + (sf < 264)
        + ((sf < 221) & support)
        + ((sf < 148) & support)
    )
    # graded cut-offs: 3 and 4 need support; without support the ratio caps at 2
    resp = np.where(np.isnan(pf), resp_sf, resp_pf)

    plt = x("platelets")
    coag = (plt < 150).astype(int) + (plt < 100) + (plt < 50) + (plt < 20)
    bil = x("bilirubin")
    hep = (bil >= 1.2).astype(int) + (bil >= 2.0) + (bil >= 6.0) + (bil >= 12.0)

    band = _band(x.age(), _PSOFA_AGE_EDGES, None)
    mapv = x.map()
    map_pt = (mapv < _by_band(_PSOFA_MAP, band, -np.inf)).astype(int)
    dose_cols = (
        "dopamine_dose",
        "dobutamine_dose",
        "epinephrine_dose",
        "norepinephrine_dose",
    )
    if any(c in df.columns for c in dose_cols):
        dop, dob, epi, nor = (np.nan_to_num(x(c), nan=0.0) for c in dose_cols)
        catechol = np.maximum(epi, nor)
        drug_pt = np.select(
            [
                (dop > 15) | (catechol > 0.1),
                (dop > 5) | (catechol > 0),
                (dop > 0) | (dob > 0),
            ],
            [4, 3, 2],
            0,
        )
    else:
        vaso = np.nan_to_num(x("vasoactives"), nan=0.0)
        drug_pt = np.select([vaso >= 2, vaso >= 1], [4, 3], 0)
    card = np.maximum(map_pt, drug_pt)

    gcs = x("gcs")
    neuro = (gcs < 15).astype(int) + (gcs < 13) + (gcs < 10) + (gcs < 6)
    cut = _by_band(_PSOFA_CREAT, band, np.inf)
    cr = x("creatinine")[:, None]
    renal = (cr >= cut).sum(axis=1)
    parts = {
        "respiratory": resp,
        "coagulation": coag,
        "hepatic": hep,
        "cardiovascular": card,
        "neurologic": neuro,
        "renal": renal,
    }
    return _frame(df, {**parts, "total": sum(parts.values())})


# ---------------------------------------------------------------- PELOD-2
def pelod2(df: pd.DataFrame, *, lookback_h: int = 0) -> pd.DataFrame:
    """PELOD-2 (Leteurtre et al., Crit Care Med 2013;41:1761-1773 †), 0-33 points.

    Neurological: GCS 5-10 -> 1, 3-4 -> 4; both pupils fixed -> 5. Cardiovascular:
    lactate 5-10.9 -> 1, >= 11 -> 4 mmol/L; MAP by age band (module table) -> 2/3/6.
    Renal: creatinine (umol/L = mg/dL x 88.4) >= 70 / 23 / 35 / 51 / 59 / 93 -> 2.
    Respiratory: PaO2:FiO2 <= 60 -> 2; PaCO2 59-94 -> 1, >= 95 -> 3 mmHg; invasive
    ventilation -> 3. Haematological: WBC <= 2 10^9/L -> 2; platelets 77-141 -> 1,
    <= 76 -> 2 10^9/L.

    Returns DataFrame (int64): neurologic, cardiovascular, renal, respiratory,
    hematologic, total.
    """
    x = _Inputs(df, lookback_h)
    gcs = x("gcs")
    pupils = np.nan_to_num(x("fixed_pupils"), nan=0.0)
    neuro = np.select([gcs <= 4, gcs <= 10], [4, 1], 0) + 5 * (pupils == 1)
    lact = x("lactate")
    band = _band(x.age(), AGE_EDGES, None)
    cut = _by_band(_PELOD_MAP, band, -np.inf)
    mapv = x.map()
    map_pt = np.select(
        [mapv < cut[:, 2], mapv < cut[:, 1], mapv < cut[:, 0]], [6, 3, 2], 0
    )
    card = np.select([lact >= 11, lact >= 5], [4, 1], 0) + map_pt
    creat = x("creatinine") * _CREAT_MG_TO_UMOL
    renal = 2 * (creat >= _by_band(_PELOD_CREAT_UMOL, band, np.inf))
    pf, _ = x.ratios()
    paco2 = x("paco2")
    resp = (
        2 * (pf <= 60)
        + np.select([paco2 >= 95, paco2 >= 59], [3, 1], 0)
        + 3 * (x.flag("imv") == 1)
    )
    plt = x("platelets")
    haem = 2 * (x("wbc") <= 2) + np.select([plt <= 76, plt <= 141], [2, 1], 0)
    parts = {
        "neurologic": neuro,
        "cardiovascular": card,
        "renal": renal,
        "respiratory": resp,
        "hematologic": haem,
    }
    return _frame(df, {**parts, "total": sum(parts.values())})


# ---------------------------------------------------------------- windows
def suspected_infection_flags(df: pd.DataFrame, *, window_h: int = 24) -> np.ndarray:
    """Bool per row: a culture AND antimicrobials within ``window_h`` h of the hour.

    Row ``(stay, h)`` is flagged when the stay has a blood culture drawn in some hour
    of ``[h - window_h, h + window_h]`` and antimicrobials running in some hour of
    the same interval (Phoenix derivation: systemic antimicrobials and microbiological
    testing; Sanchez-Pinto et al. 2024). Missing columns count as never.
    """
    for c in ("culture", "antimicrobial"):
        if c not in df.columns:
            raise ScoreInputError(
                f"hourly frame: column '{c}' is needed for suspected infection (or "
                f"pass suspected_infection=True/False or a bool per row)"
            )
    key, order = _sorted_key(df)
    ks = key[order]
    lo = np.searchsorted(ks, ks - window_h, side="left")
    hi = np.searchsorted(ks, ks + window_h, side="right")
    res = np.ones(len(df), bool)
    for c in ("culture", "antimicrobial"):
        v = np.nan_to_num(pd.to_numeric(df[c]).to_numpy(np.float64)[order]) > 0
        cs = np.concatenate([[0], np.cumsum(v)])
        res &= (cs[hi] - cs[lo]) > 0
    out = np.empty(len(df), bool)
    out[order] = res
    return out


suspected_infection = suspected_infection_flags


def _stay_index(df: pd.DataFrame) -> pd.Index:
    ids = df["stay_id"]
    if "site" in df.columns:
        pairs = df[["site", "stay_id"]].drop_duplicates()
        if pairs["stay_id"].duplicated().any():
            raise ScoreInputError(
                "hourly frame: the same stay_id occurs at several "
                "sites; results are indexed by stay_id"
            )
    return pd.Index(pd.unique(ids), name="stay_id")


def worst_in_window(
    df: pd.DataFrame,
    score_col: str = "total",
    hours: int = 24,
    *,
    scores: pd.DataFrame | None = None,
) -> pd.Series:
    """Worst (highest) value of ``score_col`` in hours ``[0, hours)`` of each stay.

    This is the Phoenix "worst total score in the first 24 h", not the sum of each
    component's maximum. ``scores`` (aligned with ``df``) holds ``score_col`` when
    ``df`` does not. Returns a Series indexed by stay_id (NaN: no row in the window).
    """
    col = _score_column(df, score_col, scores)
    idx = _stay_index(df)
    inwin = df["hour"].to_numpy(np.int64) < hours
    s = pd.Series(col[inwin], index=df["stay_id"].to_numpy()[inwin])
    return s.groupby(level=0).max().reindex(idx).rename(f"worst_{score_col}")


def rolling_worst(
    df: pd.DataFrame,
    score_col: str = "total",
    hours: int = 24,
    *,
    scores: pd.DataFrame | None = None,
) -> pd.Series:
    """Per row, the worst ``score_col`` over hours ``[h - hours + 1, h]`` of the stay.

    Vectorised range-maximum (sparse table) over rows sorted by stay and hour; gaps
    in the hours are respected. Returns a Series aligned with ``df.index``.
    """
    col = _score_column(df, score_col, scores).astype(np.float64)
    key, order = _sorted_key(df)
    ks, vs = key[order], np.where(np.isnan(col[order]), -np.inf, col[order])
    lo = np.searchsorted(ks, ks - (hours - 1), side="left")
    hi = np.arange(len(ks))
    length = hi - lo + 1
    levels = [vs]
    k = 1
    while (1 << k) <= max(int(length.max(initial=1)), 1):
        prev = levels[-1]
        half = 1 << (k - 1)
        nxt = prev.copy()
        nxt[:-half] = np.maximum(prev[:-half], prev[half:])
        levels.append(nxt)
        k += 1
    lvl = np.floor(np.log2(np.maximum(length, 1))).astype(int)
    table = np.stack(levels)
    res = np.maximum(table[lvl, lo], table[lvl, hi - (1 << lvl) + 1])
    out = np.empty(len(df))
    out[order] = np.where(np.isinf(res), np.nan, res)
    return pd.Series(out, index=df.index, name=f"worst{hours}h_{score_col}")


def _score_column(df, score_col, scores):
    src = scores if scores is not None else df
    if score_col not in src.columns:
        raise ScoreInputError(
            f"column '{score_col}' not found (pass scores=... "
            f"aligned with the hourly frame)"
        )
    if scores is not None and len(scores) != len(df):
        raise ScoreInputError("scores: expected one row per row of the hourly frame")
    return pd.to_numeric(src[score_col]).to_numpy(np.float64)


def sepsis_onset(
    df: pd.DataFrame,
    *,
    window_h: int = 24,
    lookback_h: int = 0,
    scores: pd.DataFrame | None = None,
) -> pd.Series:
    """First hour of each stay with suspected infection and Phoenix total >= 2.

    Suspected infection as in :func:`suspected_infection` (culture and antimicrobials
    within ``window_h`` h). ``scores`` may hold a precomputed :func:`phoenix` frame
    (its ``total`` is used). Returns a float Series indexed by stay_id, named
    ``onset_hour``, NaN for stays that never meet the criteria.
    """
    total = (
        scores["total"].to_numpy()
        if scores is not None
        else phoenix(df, lookback_h=lookback_h, suspected_infection=False)[
            "total"
        ].to_numpy()
    )
    flag = (total >= 2) & suspected_infection_flags(df, window_h=window_h)
    idx = _stay_index(df)
    h = df["hour"].to_numpy(np.float64)
    s = pd.Series(np.where(flag, h, np.nan), index=df["stay_id"].to_numpy())
    return s.groupby(level=0).min().reindex(idx).rename("onset_hour")
