"""PICU simulator and OMOP -> hourly table: reproducibility, layout, charting
(no carry-forward), age-banded vitals (Fleming et al., Lancet 2011), sepsis onset
recovered by the Phoenix criteria, per-site prevalence, event-time consistency, and
the round trip through an OMOP DuckDB file."""

import hashlib
import json

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.data.picu import (
    HOURLY_COLUMNS,
    HourlyTableError,
    hourly_table,
    simulate_picu,
    simulate_sites,
)
from phems_clinical.data.picu.hourly import MEASUREMENT
from phems_clinical.models import scores
from phems_clinical.resources import schemas_dir

BANDS = [0, 1, 12, 24, 60, 144, 217]


@pytest.fixture(scope="module")
def cohort():
    return simulate_picu(jax.random.key(7), n_stays=600, site="A", prevalence=0.25)


@pytest.fixture(scope="module")
def hourly(cohort):
    return hourly_table(cohort.tables, site="A")


def test_same_key_same_tables_other_key_other_tables():
    a = simulate_picu(jax.random.key(1), n_stays=60)
    b = simulate_picu(jax.random.key(1), n_stays=60)
    c = simulate_picu(jax.random.key(2), n_stays=60)
    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name])
    pd.testing.assert_frame_equal(a.truth, b.truth)
    assert not a.tables["measurement"].equals(c.tables["measurement"])
    assert not a.truth["los_hours"].equals(c.truth["los_hours"])


def _digest(cohort) -> str:
    """SHA-256 of every table and the truth, floats written to 10 significant digits."""
    h = hashlib.sha256()
    for name, table in [*sorted(cohort.tables.items()), ("truth", cohort.truth)]:
        h.update(name.encode())
        h.update(table.to_csv(index=False, float_format="%.10g").encode())
    return h.hexdigest()


def test_small_cohort_digest_is_pinned():
    # Pinned before the simulator was split into stages: the same key must give
    # the same tables, draw for draw (numpy Generator from the JAX key's words).
    c = simulate_picu(jax.random.key(11), n_stays=20, prevalence=0.5, site="D")
    assert {k: len(v) for k, v in c.tables.items()} == {
        "person": 20,
        "visit_occurrence": 20,
        "visit_detail": 20,
        "measurement": 16885,
        "observation": 428,
        "drug_exposure": 43,
        "procedure_occurrence": 70,
        "condition_occurrence": 10,
        "death": 1,
    }
    assert _digest(c) == (
        "fa6bd62c7ab22c168317c4880c4fe461419282b1eb3638b2e0524e92763f5182"
    )


def test_hourly_layout_and_dtypes(cohort, hourly):
    assert tuple(hourly.columns) == HOURLY_COLUMNS
    assert len(hourly) == cohort.truth["los_hours"].sum()
    for c in (
        "person_id",
        "stay_id",
        "hour",
        "imv",
        "other_respiratory_support",
        "vasoactives",
        "antimicrobial",
        "culture",
        "died",
    ):
        assert hourly[c].dtype == np.int64, c
    for c in HOURLY_COLUMNS[4:-6]:
        if c != "sex":
            assert hourly[c].dtype == np.float64, c
    assert set(hourly["sex"]) == {"F", "M"} and set(hourly["site"]) == {"A"}
    key = hourly[["stay_id", "hour"]].to_numpy()
    assert (np.diff(key[:, 0]) >= 0).all()
    same = np.diff(key[:, 0]) == 0
    assert (np.diff(key[:, 1])[same] == 1).all()  # every hour present, in order
    for c in ("imv", "other_respiratory_support", "antimicrobial", "culture", "died"):
        assert set(hourly[c]) <= {0, 1}
    assert hourly["vasoactives"].between(0, 6).all()
    # died is constant within a stay and equals the truth
    d = hourly.groupby("stay_id")["died"].agg(["min", "max"])
    assert (d["min"] == d["max"]).all()
    truth = cohort.truth.set_index("stay_id")
    assert (d["max"].astype(bool) == truth.loc[d.index, "died"]).all()


def test_rows_validate_against_json_schema(hourly):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((schemas_dir() / "sepsis_hourly.schema.json").read_text())
    assert schema["x-column-order"] == list(HOURLY_COLUMNS)
    rows = hourly.sample(300, random_state=0).astype(object)
    rows = rows.where(hourly.sample(300, random_state=0).notna(), None)
    v = jsonschema.Draft202012Validator(schema)
    for rec in rows.to_dict("records"):
        rec = {
            k: (
                int(x)
                if isinstance(x, np.integer)
                else float(x)
                if isinstance(x, np.floating)
                else x
            )
            for k, x in rec.items()
        }
        v.validate(rec)


def test_labs_not_carried_forward(cohort, hourly):
    m = cohort.tables["measurement"]
    for lab in ("platelets", "creatinine", "lactate", "inr"):
        frac = hourly[lab].notna().mean()
        assert 0.02 < frac < 0.35, (lab, frac)  # drawn every ~4-12 h, never filled
        # non-NaN hours = distinct (stay, hour) with an OMOP record of that lab
        mm = m[m["measurement_concept_id"] == MEASUREMENT[lab][0]]
        start = cohort.tables["visit_detail"].set_index("visit_detail_id")[
            "visit_detail_start_datetime"
        ]
        h = (
            mm["measurement_datetime"] - start.loc[mm["visit_detail_id"]].to_numpy()
        ) // pd.Timedelta(hours=1)
        assert hourly[lab].notna().sum() == len(
            set(zip(mm["visit_detail_id"], h, strict=True))
        )
    assert hourly["hr"].notna().mean() > 0.85  # vitals hourly with gaps
    assert hourly["hr"].notna().mean() < 0.99


def test_last_value_in_the_hour_wins(cohort, hourly):
    m = cohort.tables["measurement"]
    hr = m[m["measurement_concept_id"] == MEASUREMENT["hr"][0]].copy()
    start = cohort.tables["visit_detail"].set_index("visit_detail_id")[
        "visit_detail_start_datetime"
    ]
    hr["hour"] = (
        hr["measurement_datetime"] - start.loc[hr["visit_detail_id"]].to_numpy()
    ) // pd.Timedelta(hours=1)
    dup = hr[hr.duplicated(["visit_detail_id", "hour"], keep=False)]
    assert len(dup) > 10
    last = (
        dup.sort_values("measurement_datetime")
        .groupby(["visit_detail_id", "hour"])["value_as_number"]
        .last()
    )
    got = hourly.set_index(["stay_id", "hour"]).loc[last.index, "hr"]
    np.testing.assert_array_equal(got.to_numpy(), last.to_numpy())


def test_vitals_banded_by_age(hourly):
    band = pd.cut(hourly["age_months"], BANDS, right=False)
    med = hourly.groupby(band, observed=True)[["hr", "resp_rate", "map"]].median()
    assert len(med) == 6
    # Fleming et al. 2011: HR peaks at ~1 month then falls; RR falls from birth
    assert (np.diff(med["hr"].to_numpy()[1:]) < 0).all()
    assert (np.diff(med["resp_rate"].to_numpy()) < 0).all()
    assert (np.diff(med["map"].to_numpy()) > 0).all()
    assert 120 < med["hr"].iloc[1] < 165 and 60 < med["hr"].iloc[5] < 95


def test_septic_stays_meet_phoenix_after_true_onset(cohort, hourly):
    sc = scores.phoenix(hourly)
    onset = scores.sepsis_onset(hourly, scores=sc)
    truth = cohort.truth.set_index("stay_id")
    sep = truth[truth["septic"]]
    assert len(sep) > 100
    tot = hourly.assign(total=sc["total"].to_numpy())
    tot = tot.join(truth["onset_hour"], on="stay_id")
    after = tot[tot["hour"] >= tot["onset_hour"]].groupby("stay_id")["total"].max()
    assert (after.loc[sep.index] >= 2).mean() > 0.9
    lag = onset.loc[sep.index] - sep["onset_hour"]
    assert lag.notna().mean() > 0.85
    assert 0 <= lag.median() <= 6
    assert (lag >= 0).mean() > 0.8
    # Phoenix sepsis is rarer in stays without true sepsis
    non = truth.index[~truth["septic"]]
    assert onset.loc[non].notna().mean() < 0.5 * onset.loc[sep.index].notna().mean()
    # deaths are more frequent among septic stays (both directions of the data)
    assert (
        truth.loc[truth["septic"], "died"].mean()
        > truth.loc[~truth["septic"], "died"].mean()
    )


def test_sites_differ_in_prevalence_and_case_mix():
    sites = simulate_sites(
        jax.random.key(3),
        {
            "low": {"n_stays": 400, "prevalence": 0.05},
            "high": {
                "n_stays": 400,
                "prevalence": 0.30,
                "case_mix": {"age_band_weights": (0, 0, 0, 0.2, 0.4, 0.4)},
            },
        },
    )
    lo, hi = sites["low"].truth, sites["high"].truth
    # binomial 4-sigma bands around the configured prevalence
    for t, p in ((lo, 0.05), (hi, 0.30)):
        sd = np.sqrt(p * (1 - p) / len(t))
        assert abs(t["septic"].mean() - p) < 4 * sd
    assert hi["age_months"].min() >= 24 and lo["age_months"].min() < 12
    ids = [set(s.tables["person"]["person_id"]) for s in sites.values()]
    assert not ids[0] & ids[1]
    with pytest.raises(ValueError, match="age_band_weights"):
        simulate_picu(jax.random.key(0), n_stays=5, case_mix={"age_band_weights": (1,)})


def test_event_times_within_stays_and_before_death(cohort):
    t = cohort.tables
    vd = t["visit_detail"].set_index("visit_detail_id")
    assert (vd["visit_detail_end_datetime"] > vd["visit_detail_start_datetime"]).all()
    vo = t["visit_occurrence"].set_index("visit_occurrence_id")
    assert (
        vo.loc[vd["visit_occurrence_id"], "visit_start_datetime"].to_numpy()
        <= vd["visit_detail_start_datetime"].to_numpy()
    ).all()
    assert (
        vo.loc[vd["visit_occurrence_id"], "visit_end_datetime"].to_numpy()
        >= vd["visit_detail_end_datetime"].to_numpy()
    ).all()
    death = t["death"].set_index("person_id")["death_datetime"]
    for name, s_col, e_col in (
        ("measurement", "measurement_datetime", None),
        ("observation", "observation_datetime", None),
        ("drug_exposure", "drug_exposure_start_datetime", "drug_exposure_end_datetime"),
        ("procedure_occurrence", "procedure_datetime", "procedure_end_datetime"),
        ("condition_occurrence", "condition_start_datetime", None),
    ):
        df = t[name]
        end = df[e_col] if e_col else df[s_col]
        assert (end >= df[s_col]).all(), name
        stay = vd.loc[df["visit_detail_id"]]
        assert (
            df[s_col].to_numpy() >= stay["visit_detail_start_datetime"].to_numpy()
        ).all(), name
        assert (end.to_numpy() <= stay["visit_detail_end_datetime"].to_numpy()).all()
        d = death.reindex(df["person_id"]).to_numpy()
        has = ~pd.isna(d)
        assert (end.to_numpy()[has] <= d[has]).all(), name
    # date columns are the dates of the datetimes
    m = t["measurement"]
    assert (m["measurement_date"] == m["measurement_datetime"].dt.normalize()).all()


def test_hourly_by_person_and_time_when_visit_detail_id_missing(cohort, hourly):
    tabs = dict(cohort.tables)
    m = tabs["measurement"].copy()
    m["visit_detail_id"] = pd.array(
        np.where(np.arange(len(m)) % 2 == 0, m["visit_detail_id"], -1), "Int64"
    )
    m.loc[m["visit_detail_id"] == -1, "visit_detail_id"] = pd.NA
    tabs["measurement"] = m
    tabs["drug_exposure"] = tabs["drug_exposure"].drop(columns="visit_detail_id")
    pd.testing.assert_frame_equal(hourly_table(tabs, site="A"), hourly)


def test_hourly_rejects_stay_ending_before_start(cohort):
    tabs = dict(cohort.tables)
    vd = tabs["visit_detail"].copy()
    vd.loc[3, "visit_detail_end_datetime"] = vd.loc[
        3, "visit_detail_start_datetime"
    ] - pd.Timedelta(hours=1)
    tabs["visit_detail"] = vd
    with pytest.raises(HourlyTableError, match="visit_detail_id=4"):
        hourly_table(tabs)
    with pytest.raises(HourlyTableError, match="person"):
        hourly_table({"visit_detail": cohort.tables["visit_detail"]})


def test_round_trip_through_omop_duckdb(tmp_path):
    omop = pytest.importorskip("phems_clinical.data.omop")
    c = simulate_picu(jax.random.key(11), n_stays=60, site="B")
    with omop.connect(tmp_path / "site_b.duckdb") as store:
        omop.create_cdm(store)
        omop.write_tables(store, c.tables)
        back, report = omop.read_tables(store, list(c.tables))
    assert report.to_frame().empty if hasattr(report, "to_frame") else True
    for name, df in c.tables.items():
        assert len(back[name]) == len(df), name
    pd.testing.assert_frame_equal(
        hourly_table(back, site="B"), hourly_table(c.tables, site="B")
    )


def test_simulated_stays_pass_the_omop_checks_even_for_newborns():
    """Every simulated record is valid OMOP: no exclusion by the loaders' checks,
    including newborns admitted within hours of birth (whose hospital visit must
    not start before birth; this failed before the visit start was bounded)."""
    from phems_clinical.data.omop import validate_tables
    from phems_clinical.data.omop.concepts import bundled_concepts

    c = simulate_picu(
        jax.random.key(1),
        n_stays=400,
        site="N",
        case_mix={"age_band_weights": (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)},
    )
    ids = set(bundled_concepts()["concept_id"].astype(int))
    _, report = validate_tables(c.tables, concepts=ids)
    assert report.exclusions.empty, report.summary()
