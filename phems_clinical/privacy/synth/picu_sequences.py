"""Synthetic hourly PICU sequences.

Input and output are the hourly table of :func:`phems_clinical.data.picu.hourly_table`
(one row per ICU stay-hour, ``data_schemas/sepsis_hourly.schema.json``): same columns,
same dtypes, hours ``0 .. L-1`` contiguous, values not carried forward (NaN = not
measured), so the scores and sepsis models run on the synthetic table unchanged.

Generative model (fitted by moments and least squares; no gradient training):

1. **Stay level.** One row per stay: age at admission, sex, length of stay ``L`` (h),
   ``died``; per variable the stay mean of its normal score and its measurement rate
   on and off organ support (support = IMV, other respiratory support or a
   vasoactive in the hour); the share of hours on IMV, on other respiratory support
   and on >= 2, 3 vasoactives, the share of the IMV hours and of the other hours
   with a vasoactive (shares of IMV, other support and vasoactives only where
   positive); the culture hour (as a fraction of ``L``), the antimicrobial start
   (hours after the culture, or fraction of ``L`` without a culture) and duration.
   These ~80 columns are
   modelled jointly by the Gaussian copula of
   :mod:`phems_clinical.privacy.synth.copula` (reused, not duplicated).
2. **Within stay.** Each of the 24 charted variables is put on a normal-score scale
   ``z`` (van der Waerden scores of the pooled hourly values, so skewed labs need no
   log); respiratory support (0 none, 1 other, 2 IMV) and the vasoactive count get a
   latent too. ``z = m_stay + a(h) + c(h - h_culture) + d(L - 1 - h) + s * r`` with
   ``m_stay`` from step 1, mean curves ``a`` (hours since admission), ``c`` (hours
   from the blood culture: the sepsis work-up, around which organ dysfunction rises)
   and ``d`` (hours before death, died stays only), each a per-bin average over the
   training stays, bins with fewer than ``min_bin_stays`` stays set to 0. The
   residual ``r`` has unit variance and a factor structure: ``r = Lambda f + u`` with
   ``k`` latent AR(1) factors ``f`` shared by all variables (so organ systems
   co-deteriorate) and one AR(1) ``u`` per variable (a dynamic factor model, Geweke
   1977; Stock & Watson 2011, Oxford Handbook of Economic Forecasting, ch. 2).
   ``Lambda`` are the top-``k`` eigenvectors of the lag-0 residual correlation
   (pairwise complete hours); the AR coefficients are a least-squares fit of
   ``rho_v(j) = h_v phi_f^j + (1 - h_v) phi_v^j`` (``h_v`` the communality) to the
   within-stay residual autocorrelations at lags ``j = 1..12`` h, then one step of
   bias correction by simulation on the training layout (indirect inference,
   Gourieroux, Monfort & Renault 1993, J Appl Econometrics 8:S85), because the stay
   means are estimated from the same short series.
3. **Interventions.** In each stay the hours with the highest respiratory latent get
   IMV (share from step 1), the next ones other respiratory support; vasoactives
   run in the top hours (among the IMV hours and among the others, by the two
   shares) of ``rho r_resp + sqrt(1 - rho^2) r_vaso`` with ``rho`` the
   tetrachoric correlation of IMV and vasoactives within the training stays that
   have both; a second and third agent in the top ones of those hours. So support
   follows the physiology hour by hour. Antimicrobials are one block; the culture
   is one hour (the first culture of a training stay; later ones are not kept).
4. **Charting.** A variable is measured in an hour with the stay's rate for the
   hour's support state (hour 0: the pooled admission rate), through a Gaussian
   threshold whose hour-level correlation across variables is the tetrachoric
   correlation of the training indicators (cosine approximation, Bonett & Price
   2005, J Educ Behav Stat 30:213), so blood gases, blood counts etc. come together.
   Never carried forward.
5. **Values.** The synthetic ``z`` of the measured cells of each variable are mapped
   through the training empirical quantile function by their rank (so the marginal
   matches the training one and lies inside its observed range, hence inside the
   loader bounds) and rounded to the training resolution (e.g. HR to 1 /min, FiO2
   to 0.01).
6. **Death and age.** ``died`` is a stay-level flag repeated on every row of the
   stay, as :func:`hourly_table` codes it (death between ICU admission and 1 h after
   discharge, i.e. the stay ends with the death): the last row of a died stay is the
   death hour and no row follows it. ``age_months = age_0 + hour / 730.5`` (30.4375-
   day months), as in the source.

Privacy: the model discloses per-column marginals of the stay table (at most
``n_quantiles`` quantiles, category frequencies), the pooled hourly quantiles of
every variable (their extremes are real patients' values, as in the copula), the
mean curves (averages over >= ``min_bin_stays`` stays per bin), correlations and AR
coefficients. It is **not** differentially private; score it
with :mod:`phems_clinical.privacy.attacks` before release. Identifiers are new
(``id_base + 1 .. id_base + n``, with ``id_base`` the power of ten above the largest
training id), one person per stay.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
import pandas as pd
from scipy import special
from scipy.signal import lfilter
from scipy.stats import rankdata

from phems_clinical.data.picu.hourly import HOURLY_COLUMNS
from phems_clinical.privacy.synth.copula import (
    CopulaInputError,
    CopulaModel,
    fit_copula,
    nearest_pd_correlation,
    sample_copula,
)
from phems_clinical.rng import numpy_generator

__all__ = [
    "VALUE_COLUMNS",
    "PicuSequenceError",
    "PicuSequenceModel",
    "fit_picu_sequences",
    "sample_picu_sequences",
]

_FLAGS = (
    "imv",
    "other_respiratory_support",
    "vasoactives",
    "antimicrobial",
    "culture",
    "died",
)
#: Charted variables (NaN = not measured), in hourly-table order.
VALUE_COLUMNS = tuple(c for c in HOURLY_COLUMNS[6:] if c not in _FLAGS)
_LATENTS = VALUE_COLUMNS + ("_resp", "_vaso")
_HOURS_PER_MONTH = 30.4375 * 24.0  # 730.5 h, as hourly_table
_MAX_LAG = 12
_BIAS_STEPS = 1  # simulation bias-correction steps for the AR coefficients
_MIN_BIAS_PAIRS = 200
_ADM_BINS = 48  # hours since admission: bins 0..47, then flat
_CULT_BINS = (-24, 72)  # hours relative to the culture hour (clamped)
_DEATH_BINS = 48  # hours before the last hour of a died stay


class PicuSequenceError(ValueError):
    """The hourly table cannot be fitted / sampled (names the column or option)."""


class PicuSequenceModel(NamedTuple):
    """Fitted generator (see the module docstring for each part).

    ``stays``: copula of the stay table; ``quantiles[v]`` / ``decimals[v]``: pooled
    hourly quantiles and rounding of variable v; ``adm_curve`` (48, p),
    ``cult_curve`` (97, p), ``death_curve`` (48, p): mean curves of the p = 26
    latents; ``resid_sd`` (p,); ``loadings`` (p, k); ``phi_factor`` (); ``phi_own``
    (p,); ``mask_corr`` (24, 24); ``first_rate`` (24,) measurement rate at hour 0;
    ``state_rate`` (2, 24) pooled rates off / on support; ``rv_corr`` latent
    correlation of the vasoactive with the respiratory latent (within stays);
    ``site``; ``id_base``;
    ``n_stays`` training stays.
    """

    stays: CopulaModel
    quantiles: tuple
    decimals: np.ndarray
    adm_curve: np.ndarray
    cult_curve: np.ndarray
    death_curve: np.ndarray
    resid_sd: np.ndarray
    loadings: np.ndarray
    phi_factor: float
    phi_own: np.ndarray
    mask_corr: np.ndarray
    first_rate: np.ndarray
    state_rate: np.ndarray
    rv_corr: float
    site: str
    id_base: int
    n_stays: int


# ------------------------------------------------------------------ helpers


def _decimals(x: np.ndarray) -> int:
    """Smallest number of decimals (0-3) that represents every value."""
    for d in range(4):
        if np.all(np.abs(x * 10**d - np.round(x * 10**d)) < 1e-6):
            return d
    return 3


def _seg_mean(x: np.ndarray, ok: np.ndarray, sidx: np.ndarray, n: int) -> np.ndarray:
    """Per-stay mean of x over ok cells (n, p); NaN where a stay has none."""
    xs = np.where(ok, x, 0.0)
    num = np.column_stack(
        [np.bincount(sidx, xs[:, c], minlength=n) for c in range(x.shape[1])]
    )
    cnt = np.column_stack(
        [np.bincount(sidx, ok[:, c], minlength=n) for c in range(x.shape[1])]
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / cnt


def _bin_mean(
    e: np.ndarray,
    ok: np.ndarray,
    b: np.ndarray,
    sidx: np.ndarray,
    nbins: int,
    min_stays: int,
) -> np.ndarray:
    """Mean of e per bin b (rows with b < 0 ignored); bins of < min_stays stays: 0."""
    use = b >= 0
    bu, eu, oku = b[use], np.where(ok[use], e[use], 0.0), ok[use]
    num = np.column_stack(
        [np.bincount(bu, eu[:, c], minlength=nbins) for c in range(e.shape[1])]
    )
    cnt = np.column_stack(
        [np.bincount(bu, oku[:, c], minlength=nbins) for c in range(e.shape[1])]
    )
    m = int(sidx.max()) + 1
    pairs = np.unique(bu * m + sidx[use])
    stays = np.bincount(pairs // m, minlength=nbins)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(cnt > 0, num / np.maximum(cnt, 1), 0.0)
    out[stays < min_stays] = 0.0
    return out


def _curve_bins(hour, length, cult_h, died):
    """Bin index of each row for the admission, culture and death curves (-1: none)."""
    adm = np.minimum(hour, _ADM_BINS - 1)
    lo, hi = _CULT_BINS
    rel = hour - cult_h
    cult = np.where(
        np.isnan(cult_h), -1, np.clip(np.nan_to_num(rel), lo, hi) - lo
    ).astype(np.int64)
    to_end = length - 1 - hour
    death = np.where(died & (to_end < _DEATH_BINS), to_end, -1).astype(np.int64)
    return adm.astype(np.int64), cult, death


def _lagged_corr(e: np.ndarray, ok: np.ndarray, first: np.ndarray, lags: int):
    """Within-stay autocorrelation of each column at lags 1..lags and pair counts."""
    n, p = e.shape
    # ``lags`` empty rows before every stay: no pair crosses a stay boundary
    starts = np.flatnonzero(first)
    pos = np.arange(n) + lags * (np.searchsorted(starts, np.arange(n), "right"))
    m = n + lags * len(starts)
    ef = np.zeros((m, p), np.float32)
    of = np.zeros((m, p), np.float32)
    ef[pos] = np.where(ok, e, 0.0)
    of[pos] = ok
    e2 = ef * ef
    rho = np.full((lags, p), np.nan)
    cnt = np.zeros((lags, p))
    for j in range(1, lags + 1):
        num = np.einsum("ij,ij->j", ef[j:], ef[:-j], dtype=np.float64)
        aa = np.einsum("ij,ij->j", e2[j:], of[:-j], dtype=np.float64)
        bb = np.einsum("ij,ij->j", e2[:-j], of[j:], dtype=np.float64)
        c = np.einsum("ij,ij->j", of[j:], of[:-j], dtype=np.float64)
        den = np.sqrt(aa * bb)
        with np.errstate(invalid="ignore", divide="ignore"):
            rho[j - 1] = np.where((c >= 20) & (den > 0), num / den, np.nan)
        cnt[j - 1] = c
    return rho, cnt


def _fit_phi(rho, cnt, comm):
    """Least-squares grid fit of rho_v(j) = h_v phi_f^j + (1 - h_v) phi_v^j."""
    grid = np.linspace(0.0, 0.99, 100)
    j = np.arange(1, rho.shape[0] + 1)[:, None]
    w = np.where(np.isnan(rho), 0.0, np.sqrt(cnt))
    r = np.nan_to_num(rho)
    gp = grid[None, :] ** j  # (lags, G)
    best = (np.inf, 0.0, None)
    for f in range(len(grid)):
        pred = (
            comm[None, None, :] * gp[:, f, None, None]
            + (1 - comm)[None, None, :] * gp[:, :, None]
        )  # (lags, G, p)
        sse = (w[:, None, :] * (pred - r[:, None, :]) ** 2).sum(0)  # (G, p)
        k = sse.argmin(0)
        tot = sse[k, np.arange(len(k))].sum()
        if tot < best[0]:
            best = (tot, grid[f], grid[k])
    return float(best[1]), np.asarray(best[2])


def _ar1_columns(rng, first, phis):
    """Unit-variance AR(1) columns restarted at every stay (exact)."""
    n = len(first)
    starts = np.flatnonzero(first)
    lengths = np.diff(np.append(starts, n))
    k = np.arange(n) - np.repeat(starts, lengths)
    out = np.empty((n, len(phis)))
    for c, phi in enumerate(phis):
        e = rng.standard_normal(n) * np.sqrt(1 - phi**2)
        e[starts] = rng.standard_normal(len(starts))
        x = lfilter([1.0], [1.0, -phi], e)
        prev = np.zeros(len(starts))
        prev[1:] = x[starts[1:] - 1]
        out[:, c] = x - np.repeat(prev, lengths) * phi ** (k + 1)
    return out


def _residuals(rng, first, loadings, phi_f, phi_own):
    """r = Lambda f + sqrt(1 - h) u, unit variance per column."""
    k = loadings.shape[1]
    f = _ar1_columns(rng, first, np.full(k, phi_f))
    u = _ar1_columns(rng, first, phi_own)
    comm = (loadings**2).sum(1)
    return f @ loadings.T + u * np.sqrt(np.maximum(1 - comm, 0.0))


def _tetrachoric(ind: np.ndarray) -> np.ndarray:
    """Cosine approximation of the tetrachoric correlation of 0/1 columns."""
    x = ind.astype(np.float64)
    n = len(x)
    a = x.T @ x
    b = x.T @ (1 - x)
    c = (1 - x).T @ x
    d = n - a - b - c
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = (a * d) / (b * c)
        r = np.cos(np.pi / (1 + np.sqrt(odds)))
    r = np.where(np.isfinite(r), r, 0.0)
    np.fill_diagonal(r, 1.0)
    r = np.clip(r, -0.95, 0.95)
    np.fill_diagonal(r, 1.0)
    return nearest_pd_correlation(r)


# ------------------------------------------------------------------- layout
def _check_table(hourly: pd.DataFrame, min_stays: int) -> pd.DataFrame:
    if not isinstance(hourly, pd.DataFrame):
        raise PicuSequenceError(
            f"hourly: expected a pandas DataFrame, got {type(hourly).__name__}"
        )
    missing = [c for c in HOURLY_COLUMNS if c not in hourly.columns]
    if missing:
        raise PicuSequenceError(
            f"hourly table lacks required column(s) {missing} (expected the columns "
            f"of phems_clinical.data.picu.HOURLY_COLUMNS)"
        )
    df = hourly.sort_values(["site", "stay_id", "hour"], kind="stable")
    df = df.reset_index(drop=True)
    n = df.groupby(["site", "stay_id"], sort=False).ngroups
    if n < min_stays:
        raise PicuSequenceError(
            f"cannot fit the PICU sequence generator on {n} stays; at least "
            f"min_stays={min_stays} stays are needed"
        )
    code = pd.MultiIndex.from_frame(df[["site", "stay_id"]]).factorize()[0]
    hour = df["hour"].to_numpy(np.int64)
    first = np.r_[True, code[1:] != code[:-1]]
    expect = np.arange(len(df)) - np.maximum.accumulate(
        np.where(first, np.arange(len(df)), 0)
    )
    if (hour != expect).any():
        i = int(np.flatnonzero(hour != expect)[0])
        raise PicuSequenceError(
            f"column 'hour': expected contiguous hours 0..L-1 within each stay; "
            f"stay_id={df['stay_id'].iloc[i]} has hour {hour[i]} at position "
            f"{expect[i]}"
        )
    died = df["died"].to_numpy(np.int64)
    if (np.bincount(code, died) % np.bincount(code) != 0).any():
        raise PicuSequenceError("column 'died': expected one value (0 or 1) per stay")
    return df


def _latent_inputs(df: pd.DataFrame):
    """Raw latent columns (values, respiratory support, vasoactives) and their mask."""
    vals = df[list(VALUE_COLUMNS)].to_numpy(np.float64)
    imv = df["imv"].to_numpy(np.float64)
    ors = df["other_respiratory_support"].to_numpy(np.float64)
    vaso = df["vasoactives"].to_numpy(np.float64)
    resp = np.where(imv > 0, 2.0, np.where(ors > 0, 1.0, 0.0))
    return vals, resp, vaso


# ----------------------------------------------------------------------- fit
def fit_picu_sequences(
    hourly: pd.DataFrame,
    *,
    min_stays: int = 10,
    n_factors: int = 3,
    min_bin_stays: int = 5,
    n_quantiles: int = 1000,
) -> PicuSequenceModel:
    """Fit the generator to one site's hourly table (see the module docstring).

    Parameters
    ----------
    hourly : DataFrame with :data:`phems_clinical.data.picu.HOURLY_COLUMNS`.
    min_stays : fewer stays raise :class:`PicuSequenceError`.
    n_factors : number ``k`` of shared latent AR(1) factors (1-10).
    min_bin_stays : a mean-curve bin averaged over fewer stays is set to 0 (so no
        curve point describes one or a few children).
    n_quantiles : at most this many quantiles per marginal are kept.

    Returns
    -------
    PicuSequenceModel

    Notes
    -----
    The AR bias correction simulates with a fixed internal seed, so the fit is a
    deterministic function of the table and takes no key.
    """
    if not 1 <= int(n_factors) <= 10:
        raise PicuSequenceError(f"n_factors: expected 1-10, got {n_factors}")
    if int(min_stays) < 2:
        raise PicuSequenceError(f"min_stays: expected >= 2, got {min_stays}")
    df = _check_table(hourly, int(min_stays))
    code = pd.MultiIndex.from_frame(df[["site", "stay_id"]]).factorize()[0]
    n = int(code.max()) + 1
    first = np.r_[True, code[1:] != code[:-1]]
    hour = df["hour"].to_numpy(np.int64)
    length = np.bincount(code)
    vals, resp, vaso = _latent_inputs(df)
    p_v = len(VALUE_COLUMNS)

    # normal scores and marginals of each charted variable
    obs = ~np.isnan(vals)
    z = np.full((len(df), len(_LATENTS)), np.nan)
    quantiles, decimals = [], []
    for v in range(p_v):
        x = vals[obs[:, v], v]
        if x.size:
            z[obs[:, v], v] = special.ndtri(rankdata(x) / (x.size + 1))
            q = np.quantile(x, np.linspace(0, 1, min(x.size, n_quantiles)))
            quantiles.append(q)
            decimals.append(_decimals(x))
        else:
            quantiles.append(np.empty(0))
            decimals.append(0)
    z[:, p_v] = resp
    z[:, p_v + 1] = vaso
    ok = ~np.isnan(z)

    # stay table
    imv = df["imv"].to_numpy(np.float64)
    ors = df["other_respiratory_support"].to_numpy(np.float64)
    support = (imv > 0) | (ors > 0) | (vaso > 0)
    cult = df["culture"].to_numpy(np.int64) > 0
    abx = df["antimicrobial"].to_numpy(np.int64) > 0
    big = np.iinfo(np.int64).max
    cult_h = np.full(n, big)
    np.minimum.at(cult_h, code[cult], hour[cult])
    abx_h = np.full(n, big)
    np.minimum.at(abx_h, code[abx], hour[abx])
    has_c, has_a = cult_h < big, abx_h < big
    n_abx = np.bincount(code, abx, minlength=n)
    stay0 = df.loc[first]
    means = _seg_mean(z[:, :p_v], ok[:, :p_v], code, n)
    # hour 0 has its own (pooled) rate: admission bloods are drawn in nearly all
    on = np.repeat((support & ~first)[:, None], p_v, 1)
    off = np.repeat((~support & ~first)[:, None], p_v, 1)
    r_on = _seg_mean(obs.astype(float), on, code, n)
    r_off = _seg_mean(obs.astype(float), off, code, n)

    def frac(a):
        return np.bincount(code, a, minlength=n) / length

    def pos(x):
        return np.where(x > 0, x, np.nan)

    table = {
        "age0": stay0["age_months"].to_numpy(np.float64),
        "sex": stay0["sex"].to_numpy(object),
        "los": length.astype(np.int64),
        "died": stay0["died"].to_numpy(np.int64),
        # hurdle coding: which supports the stay ever had (one categorical, so
        # their co-occurrence is kept exactly), then the positive shares
        "f_v1": pos(frac(vaso >= 1)),
        "f_imv": pos(frac(imv > 0)),
        "f_ors": pos(frac((ors > 0) & ~(imv > 0))),
        # vasoactive hours split by IMV: share of the IMV hours and of the other
        # hours (keeps how far vasoactives run on ventilated children)
        "q_in": pos(
            np.bincount(code, (vaso > 0) & (imv > 0), minlength=n)
            / np.maximum(np.bincount(code, imv > 0, minlength=n), 1)
        ),
        "q_out": pos(
            np.bincount(code, (vaso > 0) & ~(imv > 0), minlength=n)
            / np.maximum(np.bincount(code, ~(imv > 0), minlength=n), 1)
        ),
        "f_v2": frac(vaso >= 2),
        "f_v3": frac(vaso >= 3),
        "cult_rel": np.where(has_c, (cult_h + 0.5) / length, np.nan),
        "abx_delay": np.where(has_c & has_a, abx_h - cult_h.astype(float), np.nan),
        "abx_rel": np.where(has_a, (abx_h + 0.5) / length, np.nan),
        "abx_len": np.where(has_a, n_abx, np.nan),
    }
    for v, name in enumerate(VALUE_COLUMNS):
        table[f"m_{name}"] = means[:, v]
        table[f"on_{name}"] = r_on[:, v]
        table[f"off_{name}"] = r_off[:, v]
    stay_df = pd.DataFrame(table)
    try:
        stays = fit_copula(
            stay_df,
            categorical=["sex", "died"],
            bounds={"age0": (0.0, None), "los": (1, None)},
            min_rows=int(min_stays),
            n_quantiles=n_quantiles,
        )
    except CopulaInputError as err:  # pragma: no cover - guarded above
        raise PicuSequenceError(f"stay table: {err}") from err

    # mean curves (backfitting once: admission, culture, death)
    m_all = _seg_mean(z, ok, code, n)
    e = np.where(ok, z - m_all[code], 0.0)
    cult_row = np.where(has_c, cult_h, np.nan)[code].astype(np.float64)
    died_row = table["died"][code] > 0
    b_adm, b_cult, b_death = _curve_bins(hour, length[code], cult_row, died_row)
    mbs = int(min_bin_stays)
    adm_curve = _bin_mean(e, ok, b_adm, code, _ADM_BINS, mbs)
    e = e - adm_curve[b_adm]
    ncb = _CULT_BINS[1] - _CULT_BINS[0] + 1
    cult_curve = _bin_mean(e, ok, b_cult, code, ncb, mbs)
    e = e - np.where(b_cult[:, None] >= 0, cult_curve[np.maximum(b_cult, 0)], 0.0)
    death_curve = _bin_mean(e, ok, b_death, code, _DEATH_BINS, mbs)
    e = e - np.where(b_death[:, None] >= 0, death_curve[np.maximum(b_death, 0)], 0.0)
    e = np.where(ok, e, 0.0)
    sd = np.sqrt((e**2).sum(0) / np.maximum(ok.sum(0) - n, 1))
    sd = np.where(sd > 1e-9, sd, 1.0)
    es = e / sd

    # factor loadings from the lag-0 residual correlation (pairwise complete)
    okf = ok.astype(float)
    num = es.T @ es
    den = np.sqrt((es**2).T @ okf * (okf.T @ es**2))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where((okf.T @ okf >= 20) & (den > 0), num / den, 0.0)
    np.fill_diagonal(corr, 1.0)
    corr = nearest_pd_correlation(corr)
    w, vecs = np.linalg.eigh(corr)
    k = int(n_factors)
    loadings = vecs[:, -k:] * np.sqrt(np.maximum(w[-k:], 0.0))
    comm = (loadings**2).sum(1)
    scale = np.where(comm > 0.95, np.sqrt(0.95 / np.maximum(comm, 1e-12)), 1.0)
    loadings = loadings * scale[:, None]
    comm = (loadings**2).sum(1)

    # AR coefficients, then one bias-correction step by simulation on this layout
    rho, cnt = _lagged_corr(es, ok, first, _MAX_LAG)
    phi_f, phi_own = _fit_phi(rho, cnt, comm)
    target = rho
    for it in range(_BIAS_STEPS):
        rng = np.random.default_rng(it)  # deterministic: the fit takes no key
        sim = _residuals(rng, first, loadings, phi_f, phi_own)
        sim = np.where(ok, sim - _seg_mean(sim, ok, code, n)[code], 0.0)
        rho_sim, _ = _lagged_corr(sim, ok, first, _MAX_LAG)
        # only where the autocorrelation is well estimated (sparse labs: noise)
        good = ~np.isnan(rho_sim) & (cnt >= _MIN_BIAS_PAIRS)
        target = np.where(good, np.clip(target + rho - rho_sim, -0.99, 0.999), target)
        phi_f, phi_own = _fit_phi(target, cnt, comm)

    # charting: hour-0 rates, pooled state rates, tetrachoric correlation
    first_rate = obs[first].mean(0)
    state_rate = np.stack(
        [
            obs[~support].mean(0) if (~support).any() else obs.mean(0),
            obs[support].mean(0) if support.any() else obs.mean(0),
        ]
    )
    mask_corr = _tetrachoric(obs[~first])

    # within-stay timing of vasoactives vs IMV: tetrachoric correlation of the two
    # indicators over the stays that have both (the factor model alone understates
    # it, its latents being demeaned 0/1/2 codes)
    both = (np.bincount(code, imv > 0, minlength=n) > 0) & (
        np.bincount(code, vaso > 0, minlength=n) > 0
    )
    rows = both[code]
    if rows.sum() >= 20:
        tc = _tetrachoric(np.column_stack([imv[rows] > 0, vaso[rows] > 0]))
        rv_corr = float(np.clip(tc[0, 1], 0.0, 0.95))
    else:
        rv_corr = 0.0

    sites = df["site"].astype(str)
    site = str(sites.mode().iloc[0])
    ids = np.concatenate(
        [df["person_id"].to_numpy(np.int64), df["stay_id"].to_numpy(np.int64)]
    )
    id_base = int(10 ** int(np.ceil(np.log10(max(int(ids.max()), 0) + 2))))
    return PicuSequenceModel(
        stays,
        tuple(quantiles),
        np.asarray(decimals),
        adm_curve,
        cult_curve,
        death_curve,
        sd,
        loadings,
        phi_f,
        phi_own,
        mask_corr,
        first_rate,
        state_rate,
        rv_corr,
        site,
        id_base,
        n,
    )


# -------------------------------------------------------------------- sample
def _top_n(latent, sidx, start, n_top):
    """Bool per row: the row is among the ``n_top[stay]`` highest of its stay."""
    order = np.lexsort((-latent, sidx))
    rank = np.empty(len(latent), np.int64)
    rank[order] = np.arange(len(latent)) - start[sidx[order]]
    return rank < np.asarray(n_top, np.int64)[sidx]


def sample_picu_sequences(
    key, model: PicuSequenceModel, n_stays: int, *, site: str | None = None
) -> pd.DataFrame:
    """Draw ``n_stays`` synthetic stays as an hourly table (same columns and dtypes).

    Parameters
    ----------
    key : JAX PRNG key (same key and model -> identical table).
    model : from :func:`fit_picu_sequences`.
    n_stays : number of synthetic stays (one new person each).
    site : value of the ``site`` column (default: the training site).

    Returns
    -------
    DataFrame sorted by (stay_id, hour) with ``HOURLY_COLUMNS``.
    """
    if (
        isinstance(n_stays, bool)
        or not isinstance(n_stays, int | np.integer)
        or n_stays <= 0
    ):
        raise PicuSequenceError(
            f"n_stays: expected a positive integer, got {n_stays!r}"
        )
    if not isinstance(model, PicuSequenceModel):
        raise PicuSequenceError(
            "model: expected a PicuSequenceModel from fit_picu_sequences"
        )
    k_stay, k_np = jax.random.split(key)
    n = int(n_stays)
    st = sample_copula(k_stay, model.stays, n)
    rng = numpy_generator(k_np)
    length = np.maximum(st["los"].to_numpy(np.int64), 1)
    start = np.concatenate([[0], np.cumsum(length)[:-1]])
    R = int(length.sum())
    sidx = np.repeat(np.arange(n), length)
    hour = np.arange(R) - start[sidx]
    first = hour == 0
    died = st["died"].to_numpy(np.int64)

    # events: culture hour and antimicrobial block
    cult_rel = st["cult_rel"].to_numpy(np.float64)
    has_c = ~np.isnan(cult_rel)
    cult_h = np.where(
        has_c,
        np.minimum(np.floor(np.nan_to_num(cult_rel) * length), length - 1),
        np.nan,
    )
    abx_len = st["abx_len"].to_numpy(np.float64)
    has_a = ~np.isnan(abx_len)
    delay = st["abx_delay"].to_numpy(np.float64)
    abx_rel = st["abx_rel"].to_numpy(np.float64)
    a0 = np.where(
        has_c & ~np.isnan(delay),
        cult_h + np.nan_to_num(delay),
        np.floor(np.nan_to_num(abx_rel) * length),
    )
    a0 = np.clip(np.nan_to_num(a0), 0, length - 1)
    a1 = np.minimum(a0 + np.maximum(np.rint(np.nan_to_num(abx_len)), 1), length)

    # latent trajectories
    p_v = len(VALUE_COLUMNS)
    means = np.zeros((n, len(_LATENTS)))
    for v, name in enumerate(VALUE_COLUMNS):
        means[:, v] = np.nan_to_num(st[f"m_{name}"].to_numpy(np.float64))
    b_adm, b_cult, b_death = _curve_bins(
        hour, length[sidx], cult_h[sidx], died[sidx] > 0
    )
    z = (
        means[sidx]
        + model.adm_curve[b_adm]
        + np.where(b_cult[:, None] >= 0, model.cult_curve[np.maximum(b_cult, 0)], 0)
        + np.where(b_death[:, None] >= 0, model.death_curve[np.maximum(b_death, 0)], 0)
        + model.resid_sd
        * _residuals(rng, first, model.loadings, model.phi_factor, model.phi_own)
    )

    # interventions from the respiratory and vasoactive latents
    # presence of each support = its positive share was drawn (copula missingness)
    pattern = (
        1 * st["f_ors"].notna().to_numpy()
        + 2 * st["f_imv"].notna().to_numpy()
        + 4 * st["f_v1"].notna().to_numpy()
    )
    med = {
        m.name: float(np.median(m.quantiles))
        for m in model.stays.marginals
        if m.name in ("f_imv", "f_ors")
    }
    f = {}
    for c, bit in (("f_imv", 2), ("f_ors", 1)):
        x = st[c].to_numpy(np.float64)
        x = np.where(np.isnan(x), med[c] if np.isfinite(med[c]) else 0.0, x)
        # present -> at least one hour; absent -> none
        f[c] = np.clip(np.where(pattern & bit, np.maximum(x, 1.0 / length), 0.0), 0, 1)
    rl = z[:, p_v]
    imv = _top_n(rl, sidx, start, np.rint(f["f_imv"] * length))
    n_sup = np.rint(np.minimum(f["f_imv"] + f["f_ors"], 1.0) * length)
    ors = _top_n(rl, sidx, start, n_sup) & ~imv
    # within-stay standardisation: only the order of hours inside a stay matters
    zs = z[:, p_v:] - _seg_mean(z[:, p_v:], np.ones((R, 2), bool), sidx, n)[sidx]
    zs = zs / np.maximum(zs.std(0), 1e-12)
    rho = model.rv_corr
    lv = rho * zs[:, 0] + np.sqrt(1 - rho**2) * zs[:, 1]
    has_v = (pattern & 4) > 0
    n_imv = np.bincount(sidx, imv, minlength=n)
    med_in = float(
        np.median(model.stays.marginals[model.stays.columns.index("q_in")].quantiles)
    )
    q_in = st["q_in"].to_numpy(np.float64)
    q_in = np.clip(np.where(np.isnan(q_in), np.nan_to_num(med_in), q_in), 0, 1)
    q_out = np.clip(np.nan_to_num(st["q_out"].to_numpy(np.float64)), 0, 1)
    k_in = np.where(has_v, np.rint(q_in * n_imv), 0)
    k_out = np.where(has_v, np.rint(q_out * (length - n_imv)), 0)
    f_v1 = np.nan_to_num(st["f_v1"].to_numpy(np.float64))
    k_out = np.where(
        has_v & (k_in + k_out == 0),  # no split drawn: the v1 share
        np.maximum(np.rint(f_v1 * (length - n_imv)), 1),
        k_out,
    )
    v1 = _top_n(np.where(imv, lv, -np.inf), sidx, start, k_in) | _top_n(
        np.where(imv, -np.inf, lv), sidx, start, k_out
    )
    n_v1 = np.bincount(sidx, v1, minlength=n)
    lv1 = np.where(v1, lv, -np.inf)  # >= 2 and >= 3 agents only where >= 1
    k2 = np.minimum(
        np.rint(np.clip(st["f_v2"].to_numpy(np.float64), 0, 1) * length), n_v1
    )
    k3 = np.minimum(
        np.rint(np.clip(st["f_v3"].to_numpy(np.float64), 0, 1) * length), k2
    )
    vaso = (
        v1.astype(np.int64)
        + _top_n(lv1, sidx, start, k2)
        + _top_n(lv1, sidx, start, k3)
    )
    support = imv | ors | (vaso > 0)

    # charting masks
    rates = np.empty((R, p_v))
    for v, name in enumerate(VALUE_COLUMNS):
        on = st[f"on_{name}"].to_numpy(np.float64)
        off = st[f"off_{name}"].to_numpy(np.float64)
        on = np.where(np.isnan(on), model.state_rate[1, v], on)[sidx]
        off = np.where(np.isnan(off), model.state_rate[0, v], off)[sidx]
        rates[:, v] = np.where(support, on, off)
    rates[first] = model.first_rate
    chol = np.linalg.cholesky(model.mask_corr)
    g = rng.standard_normal((R, p_v)) @ chol.T
    measured = special.ndtr(g) < np.clip(rates, 0, 1)

    out = pd.DataFrame(
        {
            "site": np.full(R, model.site if site is None else str(site), dtype=object),
            "person_id": (model.id_base + 1 + sidx).astype(np.int64),
            "stay_id": (model.id_base + 1 + sidx).astype(np.int64),
            "hour": hour.astype(np.int64),
            "age_months": st["age0"].to_numpy(np.float64)[sidx]
            + hour / _HOURS_PER_MONTH,
            "sex": pd.Series(st["sex"].to_numpy(object)[sidx], dtype=object),
        }
    )
    vals = np.full((R, p_v), np.nan)
    for v in range(p_v):
        q = model.quantiles[v]
        m = measured[:, v]
        if q.size == 0 or not m.any():
            continue
        u = rankdata(z[m, v]) / (m.sum() + 1)
        x = (
            np.interp(u, np.linspace(0, 1, q.size), q)
            if q.size > 1
            else np.full(int(m.sum()), q[0])
        )
        vals[m, v] = np.clip(np.round(x, int(model.decimals[v])), q[0], q[-1])
    out = pd.concat([out, pd.DataFrame(vals, columns=list(VALUE_COLUMNS))], axis=1)
    out["imv"] = imv.astype(np.int64)
    out["other_respiratory_support"] = ors.astype(np.int64)
    out["vasoactives"] = vaso.astype(np.int64)
    out["antimicrobial"] = (
        has_a[sidx] & (hour >= a0[sidx]) & (hour < a1[sidx])
    ).astype(np.int64)
    out["culture"] = (
        has_c[sidx] & (hour == np.nan_to_num(cult_h, nan=-1)[sidx])
    ).astype(np.int64)
    out["died"] = died[sidx].astype(np.int64)
    return out[list(HOURLY_COLUMNS)]
