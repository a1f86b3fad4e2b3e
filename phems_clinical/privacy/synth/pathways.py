"""Synthetic post-operative cardiac pathways.

Input and output are the sojourn table of
:func:`phems_clinical.data.cardiac.pathways.episodes` (one row per stay in a state:
``state``, ``entry``/``exit`` in days since surgery, ``next_state`` or
``'CENSORED'``, ``reintervention`` and the episode covariates). The generator has
three parts.

1. **Episode covariates** (surgery date-time, age, sex, weight-for-age z, STAT
   category, pre-operative ventilation) from the Gaussian copula of
   :mod:`phems_clinical.privacy.synth.copula`. The deterministic relations of the
   source are recomputed, not sampled: ``age_group`` from ``age_days`` by the rule
   of :func:`~phems_clinical.data.cardiac.pathways.episodes` (neonate <= 30 d,
   infant <= 365 d, else child), ``weight_kg = round(median(age) * exp(0.15 z), 2)``
   with the APLS median of
   :func:`~phems_clinical.data.cardiac.simulate.expected_weight_kg`, and then
   ``weight_z = log(weight_kg / median(age)) / 0.15`` from the rounded weight
   (:data:`~phems_clinical.data.cardiac.pathways.WEIGHT_LOG_SD`). STAT category and
   ventilation enter the copula as integer (ordinal) columns: with the
   frequency-interval categorical encoding the STAT-age association was lost
   (STAT 5 neonates 77% in the source, 40% synthetic; 54% as an integer column,
   4,000 simulated episodes), and a category absent from the source can then be
   interpolated (it gets the unstratified intensities).
2. **Transitions**: a Markov jump process in time since surgery with
   piecewise-constant intensities ``lambda[c, k, j]`` per stratum ``c`` (default
   STAT category x pre-operative ventilation), transition ``k`` and time
   piece ``j`` of ``grid`` (by default separately for first and repeat visits to a
   state, so that the post-operative CICU stay and a later return to CICU have
   their own intensities). The estimate is occurrence/exposure (events / days at
   risk; Aalen, Borgan & Gjessing, *Survival and Event History Analysis*, 2008,
   sec. 5.1) shrunk by a gamma-Poisson empirical-Bayes prior (Clayton & Kaldor,
   Biometrics 1987;43:671)::

       lambda[c,k,j] = (D[c,k,j] + a[k,j] mu[c,k,j]) / (E[c,k,j] + a[k,j])
       mu[c,k,j]     = r[k,j] * RR[c,k]            (prior mean)
       RR[c,k]       = (O[c,k] + m) / (X[c,k] + m) (stratum rate ratio, shrunk to 1)

   ``r = sum_c D / sum_c E`` is the unstratified rate, ``O`` and ``X = sum_j E r``
   the stratum's observed and expected (under ``r``) number of ``k`` transitions,
   ``m = prior_events`` (default 1 pseudo-event) and ``a[k,j] = prior_episodes *
   (sum_c E[c,k,j]) / n_episodes`` the exposure of ``prior_episodes`` (default 5)
   average episodes. A sparse cell therefore falls back to the unstratified
   baseline scaled by its stratum's proportional-hazards ratio, and a cell without
   exposure gets exactly the prior mean. Censoring before ``followup_days`` (e.g. an
   early data extract) has its own pooled piecewise-constant intensity; everyone
   still at risk is censored at ``followup_days``. ``reintervention`` is Bernoulli
   with the source's share per entering transition (first sojourn separately).
3. **Paths**: each synthetic episode starts at ``t = 0`` in a state drawn from the
   source's first-state shares and moves by competing exponential clocks within each
   piece (exact for piecewise-constant intensities) until an absorbing state (DEAD)
   or its censoring time. Sojourns are contiguous (entry = previous exit), ordered,
   never follow death and never reach past ``followup_days``.

Identifiers are new: ``person_id`` and ``episode_id`` start above ``id_start``, the
smallest power of ten above every source id (so no real id can occur; only the
order of magnitude of the source ids is kept).

Privacy: the model stores aggregate counts (events and exposure per stratum,
transition and piece), shares and the copula's marginal quantiles; it is **not**
differentially private (the copula has no DP variant yet,
so DP noise on the counts alone would not make the output DP).

Examples
--------
>>> import jax
>>> from phems_clinical.data.cardiac.pathways import episodes
>>> from phems_clinical.data.cardiac.simulate import simulate_cardiac
>>> src = episodes(simulate_cardiac(jax.random.key(0), n_episodes=60).tables)[0]
>>> model = fit_pathways(src)
>>> syn = sample_pathways(jax.random.key(1), model, 5)
>>> list(syn.columns) == list(src.columns), syn.episode_id.nunique()
(True, 5)
>>> bool((syn.groupby("episode_id").entry.min() == 0).all())
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd

from phems_clinical.data.cardiac.pathways import COLUMNS, WEIGHT_LOG_SD
from phems_clinical.data.cardiac.simulate import (
    AGE_GROUPS,
    STATES,
    TRANSITIONS,
    expected_weight_kg,
)
from phems_clinical.privacy.synth.copula import CopulaModel, fit_copula, sample_copula
from phems_clinical.rng import numpy_generator

#: Default time grid (days since surgery; the last piece is open-ended), the same
#: cuts as ``phems_clinical.models.multistate.DEFAULT_CUTS`` (not imported: privacy
#: depends only on data; pass ``grid=`` or ``spec=`` to use another).
DEFAULT_GRID = (
    0.0,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    7.0,
    10.0,
    14.0,
    21.0,
    30.0,
    60.0,
    120.0,
    200.0,
)
DEFAULT_STRATA = ("stat", "ventilation")
#: Episode columns synthesised by the copula (the rest are derived).
COPULA_COLUMNS = (
    "surgery_datetime",
    "age_days",
    "sex",
    "weight_z",
    "stat",
    "ventilation",
)
CENSORED = "CENSORED"
#: Most levels allowed in one stratification column (guards against continuous).
MAX_LEVELS = 20
WEIGHT_DECIMALS = 2
_ADMIN_TOL = 1e-6  # days: an exit this close to followup_days is administrative


class PathwayInputError(ValueError):
    """The pathway generator cannot be fitted or sampled (the message names the
    column, option or value at fault and what was expected)."""


class PathwayModel(NamedTuple):
    """Fitted pathway generator (see the module docstring).

    ``states`` names (absorbing = never a source of a transition);
    ``transitions`` (K) (from, to) state indices; ``grid`` (J) piece starts (days);
    ``strata`` column names and ``levels`` their values (the strata are the
    product, C cells, row-major); ``rates`` (C + 1, R K, J) intensities per day
    (R = 2 with ``repeat_visits``: index ``k + K`` = transition k out of a repeat
    visit; the last row, the unstratified rate, serves unseen strata);
    ``pooled_rates`` (R K, J); ``events``/``exposure`` (C, R K, J) the counts and
    days at risk behind them;
    ``censor_rates`` (J) early-censoring intensity; ``init_probs`` (S) first-state
    shares; ``reintervention`` (K + 1) probability per entering transition (last:
    the first sojourn); ``covariates`` the episode copula; ``dtypes`` the output
    dtypes; ``site``, ``id_start``, ``n_episodes`` (source), ``followup_days``.
    """

    states: tuple
    transitions: tuple
    grid: np.ndarray
    followup_days: float
    strata: tuple
    levels: tuple
    rates: np.ndarray
    pooled_rates: np.ndarray
    events: np.ndarray
    exposure: np.ndarray
    censor_rates: np.ndarray
    init_probs: np.ndarray
    reintervention: np.ndarray
    covariates: CopulaModel
    dtypes: tuple
    site: str
    id_start: int
    n_episodes: int
    repeat_visits: bool


def age_group_of(age_days) -> np.ndarray:
    """Age group names from age at surgery (days): neonate <= 30, infant <= 365,
    else child (the rule of :func:`phems_clinical.data.cardiac.pathways.episodes`)."""
    a = np.asarray(age_days, float)
    return np.asarray(AGE_GROUPS, dtype=object)[
        np.where(a <= 30, 0, np.where(a <= 365, 1, 2))
    ]


def weight_z_of(weight_kg, age_days) -> np.ndarray:
    """Weight-for-age z = log(weight / APLS median for age) / 0.15 (as in
    :func:`phems_clinical.data.cardiac.pathways.episodes`)."""
    return (
        np.log(np.asarray(weight_kg, float) / expected_weight_kg(age_days))
        / WEIGHT_LOG_SD
    )


def _spec_parts(states, transitions, grid, spec):
    if spec is not None:
        states = spec.states if states is None else states
        transitions = spec.transitions if transitions is None else transitions
        grid = spec.cuts if grid is None else grid
    states = tuple(STATES if states is None else states)
    if len(set(states)) != len(states) or CENSORED in states:
        raise PathwayInputError(
            f"states: expected distinct names other than {CENSORED!r}, got {states}"
        )
    grid = np.asarray(DEFAULT_GRID if grid is None else grid, float)
    if grid.ndim != 1 or grid.size == 0 or grid[0] != 0.0 or np.any(np.diff(grid) <= 0):
        raise PathwayInputError(
            f"grid: expected increasing piece starts beginning "
            f"at 0 (days), got {grid.tolist()}"
        )
    return states, transitions, grid


def _validate(sojourns, states, strata, min_episodes, followup):
    if not isinstance(sojourns, pd.DataFrame):
        raise PathwayInputError(
            f"sojourns: expected a pandas DataFrame, got {type(sojourns).__name__}"
        )
    missing = [c for c in COLUMNS if c not in sojourns.columns]
    if missing:
        raise PathwayInputError(f"sojourns: missing required column(s) {missing}")
    bad_strata = [c for c in strata if c not in sojourns.columns]
    if bad_strata:
        raise PathwayInputError(f"strata: unknown column(s) {bad_strata}")
    for c in strata:
        if sojourns[c].isna().any():
            raise PathwayInputError(
                f"strata: column {c!r} has missing values; "
                "expected a complete categorical column"
            )
        if sojourns[c].nunique() > MAX_LEVELS:
            raise PathwayInputError(
                f"strata: column {c!r} has {sojourns[c].nunique()} levels; expected "
                f"a categorical column with at most {MAX_LEVELS}"
            )
    n_ep = sojourns.episode_id.nunique()
    if n_ep < min_episodes:
        raise PathwayInputError(
            f"cannot fit a pathway generator on {n_ep} episodes; at least "
            f"min_episodes={min_episodes} episodes are needed"
        )
    if not followup > 0:
        raise PathwayInputError(f"followup_days: expected > 0, got {followup}")
    unknown = sorted(set(sojourns.state) - set(states))
    if unknown:
        raise PathwayInputError(
            f"sojourns.state: unknown state(s) {unknown}; "
            f"expected one of {list(states)}"
        )
    unknown = sorted(set(sojourns.next_state) - set(states) - {CENSORED})
    if unknown:
        raise PathwayInputError(
            f"sojourns.next_state: unknown state(s) {unknown}; "
            f"expected one of {[*states, CENSORED]}"
        )
    entry = sojourns.entry.to_numpy(float)
    exit_ = sojourns.exit.to_numpy(float)
    if not (
        np.all(np.isfinite(entry))
        and np.all(np.isfinite(exit_))
        and np.all(entry >= 0)
        and np.all(exit_ >= entry)
    ):
        raise PathwayInputError(
            "sojourns.entry/exit: expected finite times with "
            "0 <= entry <= exit (days since surgery)"
        )
    if exit_.max() > followup + _ADMIN_TOL:
        raise PathwayInputError(
            f"sojourns.exit: {exit_.max():.6g} days is beyond followup_days={followup}"
        )


def _exposure_by_piece(entry, exit_, grid):
    """(rows, J) days spent in each piece [grid_j, grid_j+1) (last open)."""
    edges = np.append(grid, np.inf)
    lo = np.maximum(entry[:, None], edges[None, :-1])
    hi = np.minimum(exit_[:, None], edges[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def fit_pathways(
    sojourns: pd.DataFrame,
    *,
    states: Sequence[str] | None = None,
    transitions: Sequence[tuple[int, int]] | None = None,
    grid: Sequence[float] | None = None,
    spec=None,
    strata: Sequence[str] = DEFAULT_STRATA,
    followup_days: float = 365.0,
    min_episodes: int = 10,
    prior_episodes: float = 5.0,
    prior_events: float = 1.0,
    repeat_visits: bool = True,
    n_quantiles: int = 1000,
) -> PathwayModel:
    """Fit the pathway generator to one site's sojourn table.

    Parameters
    ----------
    sojourns : DataFrame
        Output of :func:`phems_clinical.data.cardiac.pathways.episodes` (columns
        :data:`~phems_clinical.data.cardiac.pathways.COLUMNS`; one episode per
        person).
    states, transitions, grid : optional
        State names, allowed (from, to) index pairs and piece starts (days). Default
        :data:`~phems_clinical.data.cardiac.simulate.STATES`, ``TRANSITIONS`` (or,
        for other ``states``, the pairs seen in the data) and :data:`DEFAULT_GRID`.
    spec : optional
        Any object with ``states``, ``transitions`` and ``cuts`` (e.g.
        ``phems_clinical.models.multistate.DEFAULT_SPEC``), used where the three
        arguments above are None.
    strata : sequence of str
        Episode-level columns whose level combinations get their own intensities
        (``()``: one unstratified process).
    followup_days : float
        Administrative end of follow-up (days), as in ``episodes``.
    min_episodes : int
        Fewer episodes raise :class:`PathwayInputError`.
    prior_episodes, prior_events : float
        Prior strengths of the gamma-Poisson shrinkage (module docstring).
    repeat_visits : bool
        Separate intensities for the first and for later sojourns in the same state
        (e.g. the post-operative CICU stay vs a return to CICU); the process is then
        Markov in (state, visited before).
    n_quantiles : int
        Passed to :func:`~phems_clinical.privacy.synth.copula.fit_copula`.

    Returns
    -------
    PathwayModel
    """
    states, transitions, grid = _spec_parts(states, transitions, grid, spec)
    strata = tuple(strata)
    followup = float(followup_days)
    _validate(sojourns, states, strata, min_episodes, followup)
    if prior_episodes < 0 or prior_events <= 0:
        raise PathwayInputError(
            "prior_episodes/prior_events: expected >= 0 / > 0, "
            f"got {prior_episodes} / {prior_events}"
        )
    idx = {s: i for i, s in enumerate(states)}
    src = sojourns.sort_values(["episode_id", "entry", "exit"], kind="stable")
    s_from = src.state.map(idx).to_numpy(np.int64)
    nxt = src.next_state.to_numpy()
    s_to = np.array([idx.get(v, -1) for v in nxt], np.int64)
    if transitions is None:
        transitions = (
            TRANSITIONS
            if states == STATES
            else tuple(
                sorted(
                    {
                        (int(a), int(b))
                        for a, b in zip(s_from, s_to, strict=True)
                        if b >= 0
                    }
                )
            )
        )
    transitions = tuple((int(a), int(b)) for a, b in transitions)
    k_of = {t: k for k, t in enumerate(transitions)}
    row_k = np.array(
        [
            k_of.get((int(a), int(b)), -1) if b >= 0 else -1
            for a, b in zip(s_from, s_to, strict=True)
        ],
        np.int64,
    )
    bad = (s_to >= 0) & (row_k < 0)
    if bad.any():
        pairs = sorted(
            {
                (states[a], states[b])
                for a, b in zip(s_from[bad], s_to[bad], strict=True)
            }
        )
        raise PathwayInputError(
            f"sojourns.next_state: transitions {pairs} are not "
            f"in the model's transitions"
        )
    absorbing = set(range(len(states))) - {a for a, _ in transitions}
    if np.isin(s_from, list(absorbing)).any():
        raise PathwayInputError(
            "sojourns.state: a sojourn in an absorbing state "
            f"({[states[a] for a in sorted(absorbing)]})"
        )
    ep = src.episode_id.to_numpy()
    new_ep = np.r_[True, ep[1:] != ep[:-1]]
    row_ep = np.cumsum(new_ep) - 1
    first = src[new_ep]
    n_ep = len(first)
    K, J = len(transitions), len(grid)
    # ---- strata
    levels, codes = [], []
    for c in strata:
        lv = np.sort(first[c].dropna().unique())
        levels.append(tuple(lv.tolist()))
        codes.append(pd.Index(lv).get_indexer(first[c]))
    shape = tuple(len(lv) for lv in levels)
    n_cells = int(np.prod(shape)) if strata else 1
    if strata:
        cell_ep = np.ravel_multi_index(tuple(codes), shape) if n_ep else np.zeros(0)
        cell_ep = np.where(np.min(np.stack(codes), axis=0) < 0, -1, cell_ep)
    else:
        cell_ep = np.zeros(n_ep, np.int64)
    cell = cell_ep[row_ep]
    # ---- occurrence / exposure
    expo = _exposure_by_piece(src.entry.to_numpy(float), src.exit.to_numpy(float), grid)
    exit_ = src.exit.to_numpy(float)
    j_exit = np.clip(np.searchsorted(grid, exit_, side="right") - 1, 0, J - 1)
    S = len(states)
    R = 2 if repeat_visits else 1
    rep = (
        src.groupby(["episode_id", "state"], sort=False).cumcount().to_numpy() > 0
        if repeat_visits
        else np.zeros(len(src), bool)
    ).astype(np.int64)
    s_int = s_from + S * rep
    ok = cell >= 0
    E_state = np.zeros((n_cells, R * S, J))
    np.add.at(E_state, (cell[ok], s_int[ok]), expo[ok])
    frm = np.array([a + S * r for r in range(R) for a, _ in transitions], np.int64)
    E = E_state[:, frm, :]
    D = np.zeros((n_cells, R * K, J))
    ev = ok & (row_k >= 0)
    np.add.at(D, (cell[ev], (row_k + K * rep)[ev], j_exit[ev]), 1.0)
    D0, E0 = D.sum(0), E.sum(0)
    r0 = np.divide(D0, E0, out=np.zeros_like(D0), where=E0 > 0)
    X = (E * r0[None]).sum(-1)
    rr = (D.sum(-1) + prior_events) / (X + prior_events)
    mu = r0[None] * rr[:, :, None]
    a = prior_episodes * E0 / n_ep
    den = E + a[None]
    lam = np.divide(D + a[None] * mu, den, out=mu.copy(), where=den > 0)
    rates = np.concatenate([lam, r0[None]], axis=0)
    # ---- censoring before the administrative end
    last = np.r_[new_ep[1:], True]
    early = last & (s_to < 0) & (exit_ < followup - _ADMIN_TOL)
    c_D = np.bincount(j_exit[early], minlength=J).astype(float)
    c_E = expo.sum(0)
    censor_rates = np.divide(c_D, c_E, out=np.zeros(J), where=c_E > 0)
    # ---- first state and reintervention shares
    init = np.bincount(s_from[new_ep], minlength=S).astype(float)
    init_probs = init / init.sum()
    prev_k = np.full(len(src), K, np.int64)
    prev_k[~new_ep] = row_k[np.flatnonzero(~new_ep) - 1]
    reint = src.reintervention.to_numpy(float)
    n_in = np.bincount(prev_k, minlength=K + 1).astype(float)
    r_in = np.bincount(prev_k, weights=reint, minlength=K + 1)
    reint_p = np.divide(r_in, n_in, out=np.zeros(K + 1), where=n_in > 0)
    # ---- covariates
    cov = first[list(COPULA_COLUMNS)].reset_index(drop=True)
    copula = fit_copula(
        cov,
        categorical=("sex",),
        bounds={"age_days": (0.0, None)},
        min_rows=min_episodes,
        n_quantiles=n_quantiles,
    )
    ids = np.concatenate(
        [src.person_id.to_numpy(np.int64), src.episode_id.to_numpy(np.int64)]
    )
    id_start = int(10 ** int(np.ceil(np.log10(max(int(ids.max()), 0) + 1.0))))
    sites = src.site.unique()
    return PathwayModel(
        states=states,
        transitions=transitions,
        grid=grid,
        followup_days=followup,
        strata=strata,
        levels=tuple(levels),
        rates=rates,
        pooled_rates=r0,
        events=D,
        exposure=E,
        censor_rates=censor_rates,
        init_probs=init_probs,
        reintervention=reint_p,
        covariates=copula,
        dtypes=tuple((c, sojourns[c].dtype) for c in COLUMNS),
        site=str(sites[0]) if len(sites) == 1 else "pooled",
        id_start=id_start,
        n_episodes=n_ep,
        repeat_visits=bool(repeat_visits),
    )


def _covariates(key, model: PathwayModel, n: int) -> pd.DataFrame:
    cov = sample_copula(key, model.covariates, n)
    age = cov.age_days.to_numpy(float)
    med = expected_weight_kg(age)
    w = np.round(
        med * np.exp(WEIGHT_LOG_SD * cov.weight_z.to_numpy(float)), WEIGHT_DECIMALS
    )
    w = np.maximum(w, 10.0**-WEIGHT_DECIMALS)
    cov["weight_kg"] = w
    cov["weight_z"] = weight_z_of(w, age)
    cov["age_group"] = age_group_of(age)
    return cov


def _censor_times(rng, model: PathwayModel, n: int) -> np.ndarray:
    """Censoring times: piecewise-exponential early censoring, else followup."""
    f = model.followup_days
    knots = np.append(model.grid[model.grid < f], f)
    widths = np.diff(knots)
    H = np.r_[0.0, np.cumsum(model.censor_rates[: len(widths)] * widths)]
    e = rng.exponential(size=n)
    t = np.full(n, f)
    hit = e < H[-1]
    if hit.any():
        t[hit] = np.interp(e[hit], H, knots)
    return t


def _paths(rng, model: PathwayModel, cell: np.ndarray, censor: np.ndarray):
    """Competing exponential clocks within pieces; returns rows (episode, state,
    entry, exit, next (-1 = censored)) in time order per episode."""
    n = cell.size
    S, K = len(model.states), len(model.transitions)
    R = 2 if model.repeat_visits else 1
    Q = np.zeros((model.rates.shape[0], R * S, S, len(model.grid)))
    for r in range(R):
        for k, (a, b) in enumerate(model.transitions):
            Q[:, a + S * r, b, :] = model.rates[:, k + K * r, :]
    edges = np.append(model.grid, np.inf)
    state = rng.choice(S, size=n, p=model.init_probs)
    visited = np.zeros((n, S), bool)
    visited[np.arange(n), state] = True
    rep = np.zeros(n, np.int64)
    t = np.zeros(n)
    entry = np.zeros(n)
    active = np.ones(n, bool)
    sources = np.array(sorted({a for a, _ in model.transitions}))
    out = []
    while active.any():
        i = np.flatnonzero(active)
        j = np.clip(
            np.searchsorted(model.grid, t[i], side="right") - 1, 0, len(model.grid) - 1
        )
        q = Q[cell[i], state[i] + S * rep[i] * (R - 1), :, j]
        total = q.sum(1)
        end = np.minimum(edges[j + 1], censor[i])
        dt = np.divide(
            rng.exponential(size=i.size),
            total,
            out=np.full(i.size, np.inf),
            where=total > 0,
        )
        u = rng.random(i.size)
        jump = t[i] + dt < end
        ij = i[jump]
        if ij.size:
            cum = np.cumsum(q[jump], axis=1) / total[jump, None]
            to = np.minimum((u[jump, None] > cum).sum(1), S - 1)
            tj = t[ij] + dt[jump]
            out.append((ij, state[ij], entry[ij], tj, to))
            state[ij], t[ij], entry[ij] = to, tj, tj
            rep[ij] = visited[ij, to]
            visited[ij, to] = True
        stay = i[~jump]
        t[stay] = end[~jump]
        cens = stay[t[stay] >= censor[stay]]
        if cens.size:
            out.append(
                (cens, state[cens], entry[cens], censor[cens], np.full(cens.size, -1))
            )
        active[cens] = False
        active[ij[~np.isin(state[ij], sources)]] = False
    cols = [np.concatenate(c) for c in zip(*out, strict=True)]
    order = np.lexsort((cols[2], cols[0]))
    return [c[order] for c in cols]


def sample_pathways(
    key: jax.Array, model: PathwayModel, n_episodes: int, *, site: str | None = None
) -> pd.DataFrame:
    """Draw ``n_episodes`` synthetic episodes as a sojourn table.

    Parameters
    ----------
    key : JAX PRNG key
        Same key and model -> identical table.
    model : PathwayModel
        From :func:`fit_pathways`.
    n_episodes : int
        Number of synthetic episodes (one per synthetic person).
    site : str, optional
        Written to ``site`` (default: the source's site).

    Returns
    -------
    DataFrame
        Columns and dtypes of the source
        (:data:`~phems_clinical.data.cardiac.pathways.COLUMNS`), sorted by person
        and entry; ids above ``model.id_start``.
    """
    if (
        isinstance(n_episodes, bool)
        or not isinstance(n_episodes, int | np.integer)
        or n_episodes <= 0
    ):
        raise PathwayInputError(
            f"n_episodes: expected a positive integer, got {n_episodes!r}"
        )
    n = int(n_episodes)
    k_cov, k_path = jax.random.split(key)
    cov = _covariates(k_cov, model, n)
    rng = numpy_generator(k_path)
    if model.strata:
        codes = [
            pd.Index(list(lv)).get_indexer(cov[c])
            for c, lv in zip(model.strata, model.levels, strict=True)
        ]
        shape = tuple(len(lv) for lv in model.levels)
        cell = np.ravel_multi_index(tuple(np.maximum(c, 0) for c in codes), shape)
        cell = np.where(
            np.min(np.stack(codes), axis=0) < 0, model.rates.shape[0] - 1, cell
        )
    else:
        cell = np.zeros(n, np.int64)
    censor = _censor_times(rng, model, n)
    ep, st, a, b, to = _paths(rng, model, cell, censor)
    K = len(model.transitions)
    k_of = {t: k for k, t in enumerate(model.transitions)}
    new_ep = np.r_[True, ep[1:] != ep[:-1]]
    prev_k = np.full(ep.size, K, np.int64)
    prev = np.flatnonzero(~new_ep)
    prev_k[prev] = [
        k_of[(int(x), int(y))] for x, y in zip(st[prev - 1], st[prev], strict=True)
    ]
    reint = (rng.random(ep.size) < model.reintervention[prev_k]).astype(np.int64)
    names = np.asarray(model.states, dtype=object)
    person = model.id_start + 1 + np.arange(n, dtype=np.int64)
    episode = 2 * model.id_start + 1 + np.arange(n, dtype=np.int64)
    df = pd.DataFrame(
        {
            "site": model.site if site is None else site,
            "person_id": person[ep],
            "episode_id": episode[ep],
            "state": names[st],
            "entry": a,
            "exit": b,
            "next_state": np.where(to >= 0, names[np.maximum(to, 0)], CENSORED),
            "reintervention": reint,
        }
    )
    for c in (
        "surgery_datetime",
        "age_days",
        "age_group",
        "sex",
        "weight_kg",
        "weight_z",
        "stat",
        "ventilation",
    ):
        df[c] = cov[c].to_numpy()[ep]
    return df[list(COLUMNS)].astype(dict(model.dtypes))


__all__ = [
    "COPULA_COLUMNS",
    "DEFAULT_GRID",
    "DEFAULT_STRATA",
    "PathwayInputError",
    "PathwayModel",
    "age_group_of",
    "fit_pathways",
    "sample_pathways",
    "weight_z_of",
]
