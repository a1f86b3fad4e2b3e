"""Survival metrics against lifelines and hand-worked cases: Harrell's C, Kaplan-
Meier, Aalen-Johansen (competing risks and multi-state), IPCW Brier score (Graf et
al. 1999) and decile calibration."""

import numpy as np
import pandas as pd
import pytest
from lifelines import AalenJohansenFitter, KaplanMeierFitter
from lifelines.utils import concordance_index

from phems_clinical.evaluation import survival as sv


def _data(seed, n=300):
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    t_ev = rng.exponential(np.exp(-risk))
    t_c = rng.exponential(1.5, n)
    time = np.minimum(t_ev, t_c)
    event = (t_ev <= t_c).astype(int)
    return time, event, risk


def test_harrell_c_matches_lifelines():
    time, event, risk = _data(0)
    assert sv.harrell_c(time, risk, event) == pytest.approx(
        concordance_index(time, -risk, event), abs=1e-12
    )
    # ties in time and in risk
    time = np.round(time, 1)
    risk = np.round(risk, 0)
    assert sv.harrell_c(time, risk, event) == pytest.approx(
        concordance_index(time, -risk, event), abs=1e-12
    )
    assert sv.harrell_c([1, 2, 3], [3, 2, 1], [1, 1, 1]) == 1.0
    assert sv.harrell_c([1, 2, 3], [1, 2, 3], [1, 1, 1]) == 0.0


def test_kaplan_meier_matches_lifelines():
    time, event, _ = _data(1)
    ut, s = sv.kaplan_meier(time, event)
    km = KaplanMeierFitter().fit(time, event)
    ref = km.survival_function_at_times(ut).to_numpy()
    np.testing.assert_allclose(s, ref, atol=1e-12)


def test_aalen_johansen_cif_matches_lifelines():
    rng = np.random.default_rng(2)
    n = 400
    t1, t2, c = rng.exponential(3, n), rng.exponential(5, n), rng.exponential(6, n)
    time = np.minimum.reduce([t1, t2, c])
    event = np.select([time == t1, time == t2], [1, 2], 0)
    for cause in (1, 2):
        ut, cif = sv.aalen_johansen_cif(time, event, cause)
        aj = AalenJohansenFitter(calculate_variance=False).fit(
            time, event, event_of_interest=cause
        )
        ref = aj.cumulative_density_.iloc[:, 0]
        grid = np.linspace(0.1, 10, 50)
        np.testing.assert_allclose(
            sv.step_eval(ut, cif, grid, initial=0.0),
            ref.reindex(ref.index.union(grid)).ffill().loc[grid].to_numpy(),
            atol=1e-12,
        )


def test_multistate_aj_reduces_to_competing_risks():
    """The general product integral on a two-exit, one-state table = lifelines AJ."""
    rng = np.random.default_rng(3)
    n = 300
    t1, t2, c = rng.exponential(3, n), rng.exponential(5, n), rng.exponential(6, n)
    time = np.minimum.reduce([t1, t2, c])
    nxt = np.select([time == t1, time == t2], ["B", "C"], "CENSORED")
    soj = pd.DataFrame({"state": "A", "entry": 0.0, "exit": time, "next_state": nxt})
    grid = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    P = sv.aalen_johansen_multistate(soj, ["A", "B", "C"], grid)
    event = np.select([nxt == "B", nxt == "C"], [1, 2], 0)
    for cause, col in ((1, 1), (2, 2)):
        aj = AalenJohansenFitter(calculate_variance=False).fit(
            time, event, event_of_interest=cause
        )
        ref = aj.cumulative_density_.iloc[:, 0]
        ref = ref.reindex(ref.index.union(grid)).ffill().loc[grid].to_numpy()
        np.testing.assert_allclose(P[:, col], ref, atol=1e-12)
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-12)


def test_brier_hand_worked():
    """Four patients, horizon 2. Censoring KM: the censoring at t = 1.5 (1 of 3 at
    risk) gives G = 2/3 after 1.5, G(1-) = 1.
      A: event at 1   -> (1 - 0.8)^2 / G(1-)  = 0.04
      B: censored 1.5 -> 0
      C: event at 3 (> 2, so event-free at 2) -> 0.3^2 / G(2) = 0.09 * 1.5 = 0.135
      D: censored at 4 -> 0.1^2 / G(2) = 0.015
    BS = (0.04 + 0 + 0.135 + 0.015) / 4 = 0.0475."""
    time = [1.0, 1.5, 3.0, 4.0]
    event = [1, 0, 1, 0]
    risk = [0.8, 0.5, 0.3, 0.1]
    assert sv.brier_score(time, event, risk, 2.0) == pytest.approx(0.0475, abs=1e-12)
    # a competing event before h counts as 'no event of interest'
    assert sv.brier_score(time, [2, 0, 1, 0], risk, 2.0) == pytest.approx(
        (0.64 + 0.135 + 0.015) / 4, abs=1e-12
    )
    with pytest.raises(ValueError, match="G"):
        sv.brier_score([1.0, 2.0], [1, 0], [0.5, 0.5], 2.0)


def test_brier_matches_km_weighted_direct_computation():
    time, event, risk = _data(4, 500)
    h = 0.7
    f = 1 / (1 + np.exp(-risk))
    kmc = KaplanMeierFitter().fit(time, 1 - event)
    sf = kmc.survival_function_
    g_h = kmc.survival_function_at_times(h).iloc[0]
    total = 0.0
    for ti, ei, fi in zip(time, event, f, strict=True):
        if ti <= h and ei == 1:
            g_minus = sf[sf.index < ti].iloc[-1, 0]
            total += (1 - fi) ** 2 / g_minus
        elif ti > h:
            total += fi**2 / g_h
    assert sv.brier_score(time, event, f, h) == pytest.approx(
        total / len(time), rel=1e-12
    )


def test_calibration_table_detects_miscalibration():
    rng = np.random.default_rng(5)
    n = 4000
    rate = np.exp(rng.normal(-1, 0.8, n))
    t_ev = rng.exponential(1 / rate)
    c = rng.uniform(0, 4, n)
    time, event = np.minimum(t_ev, c), (t_ev <= c).astype(int)
    h = 1.0
    true_risk = 1 - np.exp(-rate * h)
    good = sv.calibration_summary(sv.calibration_table(time, event, true_risk, h))
    bad = sv.calibration_summary(
        sv.calibration_table(time, event, np.minimum(2 * true_risk, 1), h)
    )
    # ~400 per decile: binomial SE of the observed risk <= 0.025
    assert good["ece"] < 0.03 and abs(good["citl"]) < 0.015
    assert bad["citl"] > 0.15
