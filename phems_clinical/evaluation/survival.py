"""Survival / multi-state evaluation: Harrell's C-index, IPCW time-dependent Brier
score (Graf et al., Stat Med 1999;18:2529; competing risks: Schoop et al., Stat Med
2011), calibration by risk decile at a horizon, Kaplan-Meier and Aalen-Johansen
estimators (competing risks and general multi-state product integral).

Event coding: ``event`` 0 = censored, 1 = event of interest, 2 = competing event.
Risks are predicted probabilities of the event of interest by the horizon (higher
= worse).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def harrell_c(time, risk, event) -> float:
    """Harrell's concordance index (Harrell et al., JAMA 1982): among pairs where
    the shorter time is an observed event (and strictly shorter, or the other is
    censored at the same time), the share where the shorter one has the higher
    risk; tied risks count 1/2. Matches ``lifelines.utils.concordance_index(time,
    -risk, event)``."""
    t = np.asarray(time, float)
    r = np.asarray(risk, float)
    e = np.asarray(event).astype(bool)
    num = 0.0
    den = 0.0
    idx = np.flatnonzero(e)
    for chunk in np.array_split(idx, max(1, len(idx) // 512)):
        ti, ri = t[chunk, None], r[chunk, None]
        comparable = (t[None, :] > ti) | ((t[None, :] == ti) & ~e[None, :])
        num += np.sum(comparable * ((ri > r[None, :]) + 0.5 * (ri == r[None, :])))
        den += np.sum(comparable)
    if den == 0:
        raise ValueError("harrell_c: no comparable pairs (no events?)")
    return float(num / den)


def kaplan_meier(time, event) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier survival: (distinct event times, S(t) just after each)."""
    t = np.asarray(time, float)
    e = np.asarray(event).astype(bool)
    ut, d = np.unique(t[e], return_counts=True)
    at_risk = len(t) - np.searchsorted(np.sort(t), ut, side="left")
    return ut, np.cumprod(1.0 - d / at_risk)


def step_eval(times, values, at, *, left: bool = False, initial: float = 1.0):
    """Right-continuous step function (``times``, ``values``) at ``at``; with
    ``left=True`` its left limit (value just before ``at``)."""
    side = "left" if left else "right"
    i = np.searchsorted(np.asarray(times), np.asarray(at, float), side=side) - 1
    v = np.concatenate([[initial], np.asarray(values, float)])
    return v[i + 1]


def censoring_survival(time, event):
    """KM estimate of the censoring distribution G (censoring = 'event')."""
    return kaplan_meier(time, np.asarray(event) == 0)


def brier_score(time, event, risk, horizon: float) -> float:
    """IPCW Brier score at ``horizon`` (Graf et al. 1999) for the predicted risk
    F(horizon | x) of event 1:

        BS = mean_i [ (1 - F_i)^2 1{T_i <= h, event_i = 1} / G(T_i-)
                    + F_i^2 1{T_i <= h, event_i = 2} / G(T_i-)
                    + F_i^2 1{T_i > h} / G(h) ],

    G = Kaplan-Meier of the censoring times; competing events before h count as
    'no event of interest' (Schoop et al. 2011). Censored before h: weight 0.
    """
    t = np.asarray(time, float)
    e = np.asarray(event).astype(int)
    f = np.asarray(risk, float)
    gt, gs = censoring_survival(t, e)
    g_minus = step_eval(gt, gs, t, left=True)
    g_h = step_eval(gt, gs, horizon)
    if not g_h > 0:
        raise ValueError(
            f"brier_score: censoring survival G({horizon}) = 0 (everyone "
            "still event-free is censored by then); use an earlier "
            "horizon"
        )
    early = t <= horizon
    contrib = np.where(early & (e == 1), (1 - f) ** 2 / g_minus, 0.0)
    contrib += np.where(early & (e == 2), f**2 / g_minus, 0.0)
    contrib += np.where(~early, f**2 / g_h, 0.0)
    return float(contrib.mean())


def aalen_johansen_cif(time, event, cause: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Competing-risks Aalen-Johansen cumulative incidence of ``cause``: (distinct
    event times (any cause), CIF just after each)."""
    t = np.asarray(time, float)
    e = np.asarray(event).astype(int)
    ut, d_all = np.unique(t[e > 0], return_counts=True)
    n_risk = len(t) - np.searchsorted(np.sort(t), ut, side="left")
    d_c = np.bincount(np.searchsorted(ut, t[e == cause]), minlength=len(ut))
    s = np.cumprod(1 - d_all / n_risk)
    s_before = np.concatenate([[1.0], s[:-1]])
    return ut, np.cumsum(s_before * d_c / n_risk)


def calibration_table(
    time, event, risk, horizon: float, *, groups: int = 10
) -> pd.DataFrame:
    """Predicted vs observed risk by ``groups`` quantile groups of predicted risk at
    ``horizon``: observed = 1 - KM (no competing events) or the Aalen-Johansen CIF
    of event 1 (with competing events), within each group."""
    t = np.asarray(time, float)
    e = np.asarray(event).astype(int)
    f = np.asarray(risk, float)
    q = pd.qcut(pd.Series(f).rank(method="first"), groups, labels=False).to_numpy()
    rows = []
    for g in range(groups):
        m = q == g
        if (e[m] == 2).any():
            ut, cif = aalen_johansen_cif(t[m], e[m], 1)
            obs = step_eval(ut, cif, horizon, initial=0.0)
        else:
            ut, s = kaplan_meier(t[m], e[m] == 1)
            obs = 1 - step_eval(ut, s, horizon)
        rows.append((g + 1, int(m.sum()), float(f[m].mean()), float(obs)))
    return pd.DataFrame(rows, columns=["group", "n", "predicted", "observed"])


def calibration_summary(table: pd.DataFrame) -> dict:
    """Weighted mean |predicted - observed| (ECE-like) and the calibration-in-the-
    large difference (mean predicted - mean observed)."""
    w = table.n / table.n.sum()
    return {
        "ece": float(np.sum(w * np.abs(table.predicted - table.observed))),
        "citl": float(np.sum(w * (table.predicted - table.observed))),
    }


def aalen_johansen_multistate(
    sojourns: pd.DataFrame, states: list[str], times, *, start: str | None = None
) -> np.ndarray:
    """Empirical state-occupation probabilities (T, S) at ``times`` from the
    Aalen-Johansen product integral ``prod (I + dA(t))`` with Nelson-Aalen
    increments ``dA_hj = dN_hj / Y_h`` (Aalen & Johansen 1978), from a sojourn table
    (state, entry, exit, next_state; 'CENSORED' = no transition) where every
    episode starts in ``start`` (default ``states[0]``) at time 0."""
    idx = {s: i for i, s in enumerate(states)}
    S = len(states)
    st = sojourns.state.map(idx).to_numpy()
    a = sojourns.entry.to_numpy(float)
    b = sojourns.exit.to_numpy(float)
    nx = sojourns.next_state.map(idx).fillna(-1).astype(int).to_numpy()
    ev = nx >= 0
    ut = np.unique(b[ev])
    p0 = np.zeros(S)
    p0[idx[start or states[0]]] = 1.0
    order = np.argsort(b[ev])
    eb, es, en = b[ev][order], st[ev][order], nx[ev][order]
    # at-risk counts Y_h(t) = #{entry < t <= exit} per state, by sweeping
    out = np.zeros((len(np.atleast_1d(times)), S))
    P = p0.copy()
    grp = np.split(np.arange(len(eb)), np.flatnonzero(np.diff(eb)) + 1)
    Y_at = {}
    for s in range(S):
        m = st == s
        ea, xb = np.sort(a[m]), np.sort(b[m])
        Y_at[s] = np.searchsorted(ea, ut, side="left") - np.searchsorted(
            xb, ut, side="left"
        )
    tq = np.atleast_1d(np.asarray(times, float))
    k = 0
    for gi, g in enumerate(grp):
        u = eb[g[0]]
        while k < len(tq) and tq[k] < u:
            out[k] = P
            k += 1
        dA = np.zeros((S, S))
        for h, j in zip(es[g], en[g], strict=True):
            dA[h, j] += 1.0 / Y_at[h][gi]
        dA -= np.diag(dA.sum(1))
        P = P @ (np.eye(S) + dA)
    while k < len(tq):
        out[k] = P
        k += 1
    return out


__all__ = [
    "aalen_johansen_cif",
    "aalen_johansen_multistate",
    "brier_score",
    "calibration_summary",
    "calibration_table",
    "censoring_survival",
    "harrell_c",
    "kaplan_meier",
    "step_eval",
]
