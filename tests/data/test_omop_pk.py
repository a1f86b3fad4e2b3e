"""Haemophilia PK cohorts through OMOP (DuckDB file) and back: same events, same OFV."""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.data import omop, read_nonmem, to_cohort
from phems_clinical.data.omop import concepts as C
from phems_clinical.pk.focei import focei_objective
from phems_clinical.pk.library import load_product
from phems_clinical.pk.model import initial_params
from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort

COVS = ["AGE", "SEX", "WT", "HT", "BMI", "LBW", "FFM", "BGO", "VWF", "HCT", "ASSAY"]


@pytest.fixture(scope="module")
def model():
    return load_product("advate")


@pytest.fixture(scope="module")
def cohort(model):
    """6 patients, 2 occasions, half without washout, LLOQ high enough for BLQs."""
    spec = HospitalSpec(
        "hosp-a", 6, design="sparse", washout_fraction=0.5, occasions=2, lloq_IU_dL=4.0
    )
    events, _ = simulate_cohort(jax.random.key(21), model, spec)
    return events


def _through_duckdb(events, path, **kw):
    tables = omop.pk_to_omop(
        events, product="Advate", site="hosp-a", start="2024-02-29 07:30:00", **kw
    )
    with omop.connect(path) as s:
        omop.create_cdm(s)
        omop.write_tables(s, tables)
    with omop.connect(path, read_only=True) as s:
        back, report = omop.read_tables(s)
    assert len(report.exclusions) == 0, report.summary()
    return tables, back


def _rounded(events):
    """Levels and covariates to 3 decimals, as DuckDB NUMERIC (DECIMAL(18,3)) keeps."""
    ev = events.copy()
    for c in ["DV", "LLOQ", "WT", "HT", "BMI", "LBW", "FFM", "VWF", "HCT"]:
        ev[c] = ev[c].round(3)
    return ev


def _compare(a, b, *, atol_level=0.0):
    a = a.drop(columns=["NOTE"]).reset_index(drop=True)
    b = b.drop(columns=["NOTE"]).reset_index(drop=True)
    assert sorted(a.columns) == sorted(b.columns)
    assert list(a["ID"]) == list(b["ID"])
    assert (a["ROW"] == b["ROW"]).all()
    for c in ["EVID", "MDV", "BLQ", "OCC", "SEX", "BGO", "ASSAY", "SITE", "DVUNIT"]:
        assert list(a[c]) == list(b[c]), c
    # times to well below 1 s (stored with microseconds)
    np.testing.assert_allclose(a["TIME"], b["TIME"], rtol=0, atol=1e-6 / 3600 * 2)
    np.testing.assert_allclose(a["DUR"], b["DUR"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(a["AMT"], b["AMT"], rtol=0, atol=0)
    np.testing.assert_allclose(a["AGE"], b["AGE"], rtol=1e-12)
    for c in ["DV", "LLOQ", "WT", "HT", "BMI", "LBW", "FFM", "VWF", "HCT"]:
        np.testing.assert_allclose(
            a[c], b[c], rtol=0, atol=atol_level + 1e-12, equal_nan=True, err_msg=c
        )


def test_pk_round_trip_is_exact_at_stored_precision(cohort, tmp_path):
    ev = _rounded(cohort)
    assert ev["BLQ"].sum() > 0, "the fixture must contain BLQ samples"
    tables, back = _through_duckdb(ev, tmp_path / "pk.duckdb")
    pk = omop.omop_to_pk(back)
    _compare(read_nonmem(ev).events, read_nonmem(pk).events)


def test_pk_round_trip_unrounded_levels_within_storage_precision(cohort, tmp_path):
    _, back = _through_duckdb(cohort, tmp_path / "pk.duckdb")
    _compare(
        read_nonmem(cohort).events,
        read_nonmem(omop.omop_to_pk(back)).events,
        atol_level=5e-4,
    )


def test_pk_tables_follow_omop_conventions(cohort):
    t = omop.pk_to_omop(
        cohort, product="Advate", site="hosp-a", start=pd.Timestamp("2024-01-01")
    )
    obs = cohort[cohort["EVID"] == 0]
    lv = t["measurement"][
        t["measurement"]["measurement_concept_id"] == C.MEASUREMENT["fviii_activity"]
    ]
    assert len(lv) == len(obs)
    blq = lv["operator_concept_id"] == C.OPERATOR["<"]
    assert blq.sum() == obs["BLQ"].sum() > 0
    # censored result "<LLOQ": value = LLOQ with operator "<"
    assert (lv.loc[blq, "value_as_number"] == 4.0).all()
    assert (lv.loc[blq, "value_source_value"] == "<4.0").all()
    assert (lv.loc[~blq, "operator_concept_id"] == C.OPERATOR["="]).all()
    assert (lv["unit_source_value"] == "[IU]/dL").all()
    de = t["drug_exposure"]
    doses = cohort[cohort["EVID"] == 1]
    assert len(de) == len(doses)
    assert (de["drug_concept_id"] == C.DRUG["fviii"]).all()
    dur = de["drug_exposure_end_datetime"] - de["drug_exposure_start_datetime"]
    assert (dur == pd.Timedelta(minutes=10)).all()
    assert (de["quantity"].to_numpy() == doses["AMT"].to_numpy()).all()
    first = doses.groupby("ID")["TIME"].min()
    assert (first == 0).all()
    p = t["person"].set_index("person_id")
    age = (pd.Timestamp("2024-01-01") - p["birth_datetime"]) / pd.Timedelta(days=365.25)
    np.testing.assert_allclose(age, cohort.groupby("ID")["AGE"].first(), rtol=1e-12)
    assert (t["visit_occurrence"].groupby("person_id").size() == 2).all()


def test_focei_objective_is_unchanged_by_the_round_trip(model, cohort, tmp_path):
    ev = _rounded(cohort)
    _, back = _through_duckdb(ev, tmp_path / "pk.duckdb")
    params = initial_params(model)
    ofv = []
    for data in (read_nonmem(ev), read_nonmem(omop.omop_to_pk(back))):
        c, _ = to_cohort(data, model.covariate_names)
        ofv.append(float(focei_objective(model, c, params)[0]))
    assert np.isfinite(ofv[0])
    np.testing.assert_allclose(ofv[1], ofv[0], rtol=1e-9)


def test_pk_to_omop_rejects_unusable_rows(cohort):
    bad = cohort.copy()
    bad.loc[3, ["EVID", "MDV"]] = [2, 1]
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        omop.pk_to_omop(bad, product="x", site="s")
    with pytest.raises(ValueError, match="AGE"):
        omop.pk_to_omop(cohort.drop(columns="AGE"), product="x", site="s")
