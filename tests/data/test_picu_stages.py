"""The stages of the PICU simulator, each on a few stays.

Deterministic stages are checked against hand-worked stays; stages that draw are
checked against the rules the module docstring states (age bands, MAP from SBP and
DBP, culture 0-8 h after onset, ...).
"""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.data.picu import simulate as sim
from phems_clinical.data.picu.hourly import CONDITION, DRUG
from phems_clinical.rng import numpy_generator

UNIFORM = (np.full(6, 1 / 6), np.full(3, 1 / 3))


def _stays(n=40, prevalence=0.3, seed=0, weights=UNIFORM, max_los_h=336):
    rng = numpy_generator(jax.random.key(seed))
    return rng, sim._draw_stays(rng, n, *weights, prevalence, 1.0, 1.0, max_los_h)


def _hand_stays(los, *, septic=(), onset=(), adm=None, age0=None, died=None):
    """Stays with the given whole-hour lengths; everything else neutral."""
    n = len(los)
    sep = np.zeros(n, bool)
    sep[list(septic)] = True
    on = np.full(n, np.nan)
    on[list(septic)] = onset
    return sim._Stays(
        age0=np.full(n, 24.0) if age0 is None else np.asarray(age0, float),
        male=np.ones(n, bool),
        adm=np.zeros(n, int) if adm is None else np.asarray(adm),
        septic=sep,
        early=np.zeros(n, bool),
        onset=on,
        amp=np.ones(n),
        sep_amp=np.ones((n, 6)),
        died=np.zeros(n, bool) if died is None else np.asarray(died),
        los_h=np.asarray(los, np.int64),
    )


def test_hour_grid_of_two_stays():
    hg = sim._hour_grid(_hand_stays([2, 3]))
    assert hg.offset.tolist() == [0, 2, 5] and hg.n_rows == 5
    assert hg.s.tolist() == [0, 0, 1, 1, 1]
    assert hg.h.tolist() == [0, 1, 0, 1, 2]
    assert hg.first.tolist() == [True, False, True, False, False]
    assert hg.last.tolist() == [False, True, False, False, True]
    # 24 months at admission; one hour is 1 / (30.4375 * 24) month
    assert hg.age[1] == pytest.approx(24 + 1 / (30.4375 * 24))


@pytest.mark.parametrize("prevalence", [0.0, 1.0])
def test_stays_follow_prevalence_and_caps(prevalence):
    # the risk is relative by admission type (medical 1.4, surgery 0.3, trauma 0.8
    # over their mean 0.83 here): at prevalence 1 every medical stay is septic
    _, st = _stays(prevalence=prevalence, max_los_h=48)
    assert st.septic[st.is_med].all() if prevalence else not st.septic.any()
    assert (np.isnan(st.onset) == ~st.septic).all()
    assert ((st.los_h >= 4) & (st.los_h <= 48)).all()
    assert (st.onset[st.septic] <= st.los_h[st.septic] - 12).all()


def test_stays_drawn_in_the_age_bands_weighted():
    _, st = _stays(weights=(np.array([0, 0, 0, 0, 0, 1.0]), UNIFORM[1]))
    assert ((st.age0 >= 144) & (st.age0 <= 215.9)).all()
    _, st = _stays(weights=(UNIFORM[0], np.array([0, 1.0, 0])))
    assert st.is_surg.all() and not (st.is_med | st.is_trauma).any()


def test_severities_bounded_and_no_sepsis_term_before_onset():
    rng, st = _stays(prevalence=1.0)
    hg = sim._hour_grid(st)
    course = sim._severities(rng, st, hg)
    for sev in course.sev.values():
        assert sev.shape == (hg.n_rows,) and ((sev >= 0) & (sev <= 3)).all()
    before = course.u < 0
    assert before.any()
    # before onset the inflammation is the decaying admission illness only
    assert (course.infl[before] <= 0.1 * course.base[hg.s[before], 0] + 1e-12).all()
    _, st0 = _stays(prevalence=0.0, seed=1)
    assert np.isneginf(sim._severities(rng, st0, sim._hour_grid(st0)).u).all()


def _course(seed=2, prevalence=0.5):
    rng, st = _stays(prevalence=prevalence, seed=seed)
    hg = sim._hour_grid(st)
    course = sim._severities(rng, st, hg)
    care = sim._respiratory_and_vasoactive_support(rng, st, hg, course)
    return rng, st, hg, course, care


def test_support_ventilation_and_vasoactives():
    _, st, hg, course, care = _course()
    assert not (care.imv & care.ors).any()
    assert (care.support == (care.imv | care.ors)).all()
    assert set(np.unique(care.n_vaso)) <= {0, 1, 2, 3}
    # respiratory failure beyond any threshold drawn (1 +- 0.12 x 5 sd) ventilates
    assert care.imv[course.sev["resp"] > 1.6].all()


def test_vitals_map_is_mean_of_sbp_and_dbp_and_fio2_titrated():
    rng, st, hg, course, care = _course()
    v = sim._vitals(rng, st, hg, course, care)
    np.testing.assert_allclose((2 * v["dbp"] + v["sbp"]) / 3, v["map"])
    assert (v["fio2"][~care.support] == 0.21).all()
    assert ((v["fio2"] >= 0.21) & (v["fio2"] <= 1.0)).all()
    assert ((v["spo2"] >= 50) & (v["spo2"] <= 100)).all()


def test_labs_gcs_and_pupils():
    rng, st, hg, course, care = _course()
    lab = sim._labs_and_gcs(rng, st, hg, course, care)
    assert ((lab["gcs"] >= 3) & (lab["gcs"] <= 15)).all()
    assert (lab["gcs"] == np.round(lab["gcs"])).all()
    assert (lab["pupils"] == (course.sev["neuro"] > 2.2)).all()
    assert (lab["anc"] > 0).all() and (lab["platelets"] > 0).all()


def test_charting_masks():
    rng, st, hg, course, care = _course()
    masks = sim._charting(rng, hg, course, care)
    assert list(masks)[:3] == ["hr", "resp_rate", "spo2"]
    assert set(masks) == set(sim._ROUNDING)
    assert masks["temp"][hg.first].all() and masks["gcs"][hg.first].all()
    assert (masks["sbp"] == masks["dbp"]).all()
    art_line = care.imv | (care.n_vaso > 0)
    assert not masks["pao2"][~art_line].any()
    assert not masks["fio2"][~care.support].any()


def test_admission_times_within_a_year_on_whole_minutes():
    rng, st = _stays()
    hg = sim._hour_grid(st)
    t = sim._admission_times(rng, st, hg, "2023-01-01")
    start = pd.Timestamp("2023-01-01").value
    assert ((t.t0 >= start) & (t.t0 < start + 365 * sim._DAY_NS)).all()
    assert (t.t0 % sim._MIN_NS == 0).all()
    assert (t.t_row - t.t0[hg.s] == hg.h.astype(np.int64) * sim._HOUR_NS).all()
    assert ((t.vit_off >= 0) & (t.vit_off < sim._HOUR_NS)).all()


def test_vasoactive_episodes_by_hand():
    # stay 0 (2 y, medical): 0,1,2,1,0 agents -> first agent hours 1-3, second
    # hour 2; stay 1 (surgical): 1,1 -> first agent hours 0-1 (milrinone)
    st = _hand_stays([5, 2], adm=[0, 1])
    hg = sim._hour_grid(st)
    care = sim._Support(
        np.zeros(7, bool), np.zeros(7, bool), np.array([0, 1, 2, 1, 0, 1, 1])
    )
    start, end, drug = sim._vasoactive_episodes(st, hg, care)
    assert start.tolist() == [1, 5, 2] and end.tolist() == [3, 6, 2]
    assert drug.tolist() == [
        DRUG["norepinephrine"],
        DRUG["milrinone"],
        DRUG["epinephrine"],
    ]


def test_infant_gets_epinephrine_first():
    st = _hand_stays([2], age0=[6.0])
    hg = sim._hour_grid(st)
    care = sim._Support(np.zeros(2, bool), np.zeros(2, bool), np.array([1, 0]))
    assert sim._vasoactive_episodes(st, hg, care)[2].tolist() == [DRUG["epinephrine"]]


def test_cultures_and_antimicrobials():
    rng, st = _stays(n=200, prevalence=0.5, seed=3)
    abx = sim._cultures_and_antimicrobials(rng, st)
    sep = st.septic
    assert abx.has_cult[sep].all()
    lag = abx.cult_h[sep] - st.onset[sep]
    capped = abx.cult_h[sep] == st.los_h[sep] - 1
    assert (((lag >= 0) & (lag <= 8)) | capped).all()
    assert ((abx.h0 >= 0) & (abx.h1 >= abx.h0) & (abx.h1 < st.los_h[abx.stay])).all()
    proph = ~abx.has_cult[abx.stay]
    assert st.is_surg[abx.stay[proph]].all() and (abx.h0[proph] == 0).all()
    assert (abx.h1[proph] <= 23).all()


def test_shock_needs_vasoactives_at_or_after_onset():
    # stay 0 septic (onset 2 h), vasoactive at 3 h: shock; stay 1 septic (onset
    # 2 h), vasoactive at 0 h only: no shock; stay 2 not septic, vasoactive: no
    st = _hand_stays([4, 4, 4], septic=(0, 1), onset=(2.0, 2.0))
    hg = sim._hour_grid(st)
    u = hg.h - np.where(st.septic, st.onset, np.inf)[hg.s]
    course = sim._Course(u, {}, np.zeros(12), np.zeros((3, 6)))
    n_vaso = np.zeros(12, int)
    n_vaso[[3, 4, 8]] = 1
    care = sim._Support(np.zeros(12, bool), np.zeros(12, bool), n_vaso)
    assert sim._shock(st, hg, course, care).tolist() == [True, False, False]


def test_condition_truth_and_stay_tables_by_hand():
    st = _hand_stays([30, 10], septic=(0,), onset=(5.0,), died=[True, False])
    abx = sim._Antimicrobials(np.array([7.0, np.nan]), *(np.zeros(0, int),) * 4)
    times = sim._Times(np.array([0, sim._DAY_NS]), None, None, None)
    ids = np.array([11, 12])
    shock = np.array([True, False])
    cond = sim._condition_table(st, abx, shock, times, ids)
    assert cond["person_id"].tolist() == [11]
    assert cond["condition_concept_id"].tolist() == [CONDITION["septic_shock"]]
    assert cond["condition_start_datetime"].iloc[0] == pd.Timestamp(7 * sim._HOUR_NS)
    truth = sim._truth_table(st, abx, shock, "A", ids)
    assert truth["death_hour"].tolist()[0] == 30.0 and np.isnan(truth["death_hour"][1])
    assert np.isnan(truth["culture_hour"][1])
    rng = numpy_generator(jax.random.key(0))
    person, visit, detail, death = sim._stay_tables(rng, st, times, ids)
    assert death["person_id"].tolist() == [11]
    assert death["death_datetime"].iloc[0] == pd.Timestamp(30 * sim._HOUR_NS)
    icu = detail.set_index("visit_occurrence_id")
    hosp = visit.set_index("visit_occurrence_id").loc[icu.index]
    assert (hosp["visit_start_datetime"] <= icu["visit_detail_start_datetime"]).all()
    assert (hosp["visit_end_datetime"] >= icu["visit_detail_end_datetime"]).all()
    assert person["person_id"].tolist() == [11, 12]
