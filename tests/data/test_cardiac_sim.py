"""Cardiac pathway simulator: calibration to the published STAT benchmarks,
reproducibility, OMOP chain integrity, OMOP -> sojourn table against the simulator's
ground truth, and bad input reported and counted (never silently dropped)."""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.data.cardiac import (
    TARGET_LOS,
    TARGET_MORTALITY,
    simulate_cardiac,
)
from phems_clinical.data.cardiac.pathways import PathwayError, episodes
from phems_clinical.data.cardiac.simulate import CONCEPTS


@pytest.fixture(scope="module")
def cohort():
    # extract date inside follow-up: recent operations are censored administratively
    return simulate_cardiac(
        jax.random.key(11), n_episodes=1200, accrual_days=600, extract_date="2022-09-01"
    )


def _operative_outcomes(truth):
    first = truth.groupby("person_id").first()
    home = truth[truth.next_state == "HOME"].groupby("person_id").exit.min()
    dead = truth[truth.next_state == "DEAD"].groupby("person_id").exit.min()
    d, h = dead.reindex(first.index), home.reindex(first.index)
    operative = d.notna() & ((d <= 30) | h.isna() | (d < h))
    return first.stat, operative, h


def test_mortality_and_los_match_published_benchmarks():
    """Operative mortality by STAT category (STS CHSD FY2016: 0.4/1.6/2.6/6.8/15.6%)
    and mean post-op LOS (Jacobs JTCVS 2013 endpoints 6.3 and 34.0 d, interpolated)
    within 4 binomial / sampling SEs (two-sided failure rate ~1e-4 per check)."""
    c = simulate_cardiac(jax.random.key(2024), n_episodes=12_000, accrual_days=300)
    stat, op, los = _operative_outcomes(c.truth)
    for k in range(1, 6):
        m = op[stat == k]
        p = TARGET_MORTALITY[k - 1]
        se = np.sqrt(p * (1 - p) / len(m))
        assert abs(m.mean() - p) < 4 * se, (k, m.mean(), p, se)
        lk = los[stat == k].dropna()
        assert abs(lk.mean() - TARGET_LOS[k - 1]) < 4 * lk.std() / np.sqrt(len(lk)), (
            k,
            lk.mean(),
            TARGET_LOS[k - 1],
        )
    # mortality must rise with category (the check can fail on a mis-calibration)
    rates = [op[stat == k].mean() for k in range(1, 6)]
    assert rates == sorted(rates)


def test_reproducible_and_key_dependent():
    a = simulate_cardiac(jax.random.key(5), n_episodes=60)
    b = simulate_cardiac(jax.random.key(5), n_episodes=60)
    c = simulate_cardiac(jax.random.key(6), n_episodes=60)
    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name])
    assert not a.tables["visit_detail"].visit_detail_start_datetime.equals(
        c.tables["visit_detail"].visit_detail_start_datetime
    )


def test_visit_detail_chains_and_no_events_after_death(cohort):
    t = cohort.tables
    vd = t["visit_detail"].set_index("visit_detail_id")
    prev = vd.preceding_visit_detail_id.dropna().astype(int)
    assert prev.isin(vd.index).all()
    # a detail and its predecessor: same visit, contiguous, no overlap
    p = vd.loc[prev.to_numpy()]
    assert (
        p.visit_occurrence_id.to_numpy()
        == vd.loc[prev.index].visit_occurrence_id.to_numpy()
    ).all()
    assert (
        p.visit_detail_end_datetime.to_numpy()
        <= vd.loc[prev.index].visit_detail_start_datetime.to_numpy()
    ).all()
    assert (vd.visit_detail_end_datetime >= vd.visit_detail_start_datetime).all()
    # one chain start per inpatient visit, details inside their visit
    vo = t["visit_occurrence"].set_index("visit_occurrence_id")
    heads = (
        vd[vd.preceding_visit_detail_id.isna()].groupby("visit_occurrence_id").size()
    )
    ip = vo[vo.visit_concept_id == CONCEPTS["inpatient_visit"]]
    assert (heads.reindex(ip.index) == 1).all()
    v = vo.loc[vd.visit_occurrence_id]
    assert (
        vd.visit_detail_start_datetime.to_numpy() >= v.visit_start_datetime.to_numpy()
    ).all()
    assert (
        vd.visit_detail_end_datetime.to_numpy() <= v.visit_end_datetime.to_numpy()
    ).all()
    # nothing after death
    death = t["death"].set_index("person_id").death_datetime
    assert len(death) > 10
    for name, col in [
        ("visit_occurrence", "visit_end_datetime"),
        ("visit_detail", "visit_detail_end_datetime"),
        ("procedure_occurrence", "procedure_datetime"),
        ("drug_exposure", "drug_exposure_start_datetime"),
    ]:
        df = t[name]
        d = death.reindex(df.person_id).to_numpy()
        ok = pd.isna(d) | (df[col].to_numpy() <= d)
        assert ok.all(), name
    # every index operation carries a STAT-category concept
    proc = t["procedure_occurrence"]
    idx = proc[proc.procedure_source_value.str.endswith(":index")]
    assert idx.procedure_concept_id.between(2_000_000_401, 2_000_000_405).all()
    assert idx.person_id.nunique() == len(t["person"])


def test_pathways_reproduce_ground_truth(cohort):
    """OMOP -> sojourns gives the simulator's own paths (states, times in days since
    surgery to float precision, next state / CENSORED) and covariates."""
    df, rep = episodes(cohort.tables)
    assert rep.exclusions.empty and rep.n_episodes == 1200
    truth = cohort.truth
    assert len(df) == len(truth)
    assert (df.state.to_numpy() == truth.state.to_numpy()).all()
    assert (df.next_state.to_numpy() == truth.next_state.to_numpy()).all()
    np.testing.assert_allclose(df.entry, truth.entry, atol=1e-8)
    np.testing.assert_allclose(df.exit, truth.exit, atol=1e-8)
    assert (df.next_state == "CENSORED").sum() > 100  # the extract date bites
    np.testing.assert_array_equal(df.stat, truth.stat)
    np.testing.assert_array_equal(df.ventilation, truth.ventilation)
    np.testing.assert_allclose(df.weight_z, truth.weight_z_true, atol=0.05)


def _corrupt(tables):
    t = {k: v.copy() for k, v in tables.items()}
    vd = t["visit_detail"]
    pids = t["person"].person_id.to_numpy()
    # 1: end before start
    i = vd.index[vd.person_id == pids[0]][2]
    vd.loc[i, "visit_detail_end_datetime"] = vd.loc[
        i, "visit_detail_start_datetime"
    ] - pd.Timedelta(hours=1)
    # 2: preceding id that does not exist
    i = vd.index[(vd.person_id == pids[1]) & vd.preceding_visit_detail_id.notna()][0]
    vd.loc[i, "preceding_visit_detail_id"] = 999_999_999
    # 3: unknown state concept
    i = vd.index[vd.person_id == pids[2]][3]
    vd.loc[i, "visit_detail_concept_id"] = 123
    # 4: a readmission after death
    dead = t["death"].person_id.iloc[0]
    dt = t["death"].death_datetime.iloc[0]
    extra = pd.DataFrame(
        {
            "visit_occurrence_id": [888_888_888],
            "person_id": [dead],
            "visit_concept_id": [CONCEPTS["inpatient_visit"]],
            "visit_start_datetime": [dt + pd.Timedelta(days=3)],
            "visit_end_datetime": [dt + pd.Timedelta(days=5)],
        }
    )
    t["visit_occurrence"] = pd.concat([t["visit_occurrence"], extra], ignore_index=True)
    return t, {int(pids[0]), int(pids[1]), int(pids[2]), int(dead)}


def test_bad_input_is_excluded_reported_and_counted(cohort):
    t, bad = _corrupt(cohort.tables)
    df, rep = episodes(t)
    counts = rep.counts()
    assert counts["end_before_start"] == 1
    assert counts.filter(like="missing_preceding").sum() == 1
    assert counts.filter(like="unknown_concept").sum() == 1
    assert counts["event_after_death"] == 1
    assert rep.excluded_persons == bad
    assert not df.person_id.isin(bad).any()
    assert df.person_id.nunique() == 1200 - 4 == rep.n_episodes
    assert "end_before_start" in rep.summary()
    # the other episodes are untouched
    good, _ = episodes(cohort.tables)
    pd.testing.assert_frame_equal(
        df, good[~good.person_id.isin(bad)].reset_index(drop=True)
    )
    # a missing required column is an error naming table and column
    t2 = dict(cohort.tables)
    t2["visit_detail"] = t2["visit_detail"].drop(columns="preceding_visit_detail_id")
    with pytest.raises(PathwayError, match="visit_detail.*preceding_visit_detail_id"):
        episodes(t2)


def test_duckdb_round_trip(tmp_path):
    """Simulated tables -> OMOP DuckDB file -> read back -> same sojourns."""
    omop = pytest.importorskip("phems_clinical.data.omop")
    c = simulate_cardiac(jax.random.key(3), n_episodes=80)
    tables = {k: v for k, v in c.tables.items() if k in omop.USE_CASE_TABLES}
    with omop.connect(tmp_path / "site.duckdb") as store:
        omop.create_cdm(store)
        omop.write_tables(store, tables)
        back, report = omop.read_tables(store, list(tables))
    df, rep = episodes(back)
    direct, _ = episodes(tables)
    assert rep.exclusions.empty
    assert len(df) == len(direct) == len(c.truth)
    np.testing.assert_allclose(df.exit, direct.exit, atol=1e-6)
    assert (df.next_state.to_numpy() == direct.next_state.to_numpy()).all()
    del report
