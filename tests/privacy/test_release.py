"""Use-case anonymisation (privacy.release), OMOP date shifting and the lifespan age
hierarchy. Independent checks: class sizes by a plain pandas groupby, rows per kept
patient, the simulator's own hourly table before/after shifting."""

from collections import Counter

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical import usecases
from phems_clinical.data.cardiac import simulate_cardiac
from phems_clinical.data.cardiac.pathways import episodes
from phems_clinical.data.picu import hourly_table, simulate_picu
from phems_clinical.pk.library import load_product
from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort
from phems_clinical.privacy.dates import shift_tables
from phems_clinical.privacy.hierarchies import (
    HierarchyError,
    check_nested,
    lifespan_age,
)
from phems_clinical.privacy.release import (
    BAND_SUFFIX,
    AnonymiseError,
    anonymise,
    patient_table,
)
from phems_clinical.privacy.search import SearchError

KEY = jax.random.key(3)


@pytest.fixture(scope="module")
def sources():
    pk, _ = simulate_cohort(KEY, load_product("advate"), HospitalSpec("h", 60))
    picu = simulate_picu(KEY, n_stays=60)
    card = simulate_cardiac(KEY, n_episodes=150)
    return {
        "haemophilia": pk,
        "picu": hourly_table(picu.tables),
        "cardiac": episodes(card.tables)[0],
        "_picu_tables": picu.tables,
    }


USE_CASES = ("haemophilia", "picu", "cardiac")
ROLES = {n: usecases.get(n).roles for n in USE_CASES}


@pytest.mark.parametrize("uc", USE_CASES)
def test_release_is_k_anonymous_by_patient(sources, uc):
    data = sources[uc]
    roles = ROLES[uc]
    rel = anonymise(KEY, data, ROLES[uc], k=5, max_suppression=0.1)
    bands = [c + BAND_SUFFIX for c in rel.report["config"]["quasi_identifiers"]]
    per_patient = rel.data.groupby(roles.patient_id)[bands].nunique()
    assert (per_patient == 1).all().all()  # one label per patient and QI
    sizes = rel.data.groupby(roles.patient_id)[bands].first().value_counts()
    assert sizes.min() >= 5 and rel.report["k"] == sizes.min()
    # whole patients kept or removed; row counts add up
    n_rows = data.groupby(roles.patient_id).size()
    out_rows = rel.data.groupby(roles.patient_id).size()
    left = Counter(n_rows.tolist())
    left.subtract(Counter(out_rows.tolist()))
    assert min(left.values()) >= 0  # every released patient has all its rows
    assert rel.report["rows_in"] - rel.report["rows_removed"] == len(rel.data)
    assert rel.report["patients_out"] == rel.data[roles.patient_id].nunique()
    assert rel.report["patients_in"] == data[roles.patient_id].nunique()
    assert rel.report["suppressed_share"] <= 0.1


@pytest.mark.parametrize("uc", USE_CASES)
def test_released_value_lies_in_its_band(sources, uc):
    rel = anonymise(KEY, sources[uc], ROLES[uc], k=5, max_suppression=0.1)
    hier = ROLES[uc].qis(sources[uc])
    for c, info in rel.report["quasi_identifiers"].items():
        lvl = info["level"]
        first = rel.data.groupby(ROLES[uc].patient_id)[[c, c + BAND_SUFFIX]].first()
        if 0 < lvl < hier[c].height and pd.api.types.is_numeric_dtype(first[c]):
            again = hier[c].generalise(first[c], lvl).astype(str)
            assert (again.to_numpy() == first[c + BAND_SUFFIX].to_numpy()).all(), c


def test_longitudinal_values_untouched_for_kept_patients(sources):
    data = sources["picu"]
    rel = anonymise(KEY, data, ROLES["picu"], k=5)
    assert rel.report["patients_suppressed"] == 0
    for col in ("hr", "lactate", "imv"):
        a = np.sort(data[col].dropna().to_numpy())
        b = np.sort(rel.data[col].dropna().to_numpy())
        np.testing.assert_array_equal(a, b)
    # hours stay contiguous within each stay
    d = rel.data.groupby("stay_id")["hour"].agg(["min", "max", "size"])
    assert (d["min"] == 0).all() and (d["max"] + 1 == d["size"]).all()


def test_cardiac_dates_shifted_per_patient_and_derived_recomputed(sources):
    data = sources["cardiac"]
    rel = anonymise(KEY, data, ROLES["cardiac"], k=5, max_suppression=0.1)
    assert rel.report["dates_shifted"]["columns"] == ["surgery_datetime"]
    assert set(rel.report["recomputed_columns"]) == {"age_group", "weight_z"}
    # intervals: every sojourn of a patient shares one surgery time (shift constant)
    assert (rel.data.groupby("person_id")["surgery_datetime"].nunique() == 1).all()
    orig = sorted(data.groupby("person_id")["surgery_datetime"].first())
    new = sorted(rel.data.groupby("person_id")["surgery_datetime"].first())
    assert orig[:3] != new[:3]
    a = rel.data["age_days"].to_numpy()
    expect = np.where(a <= 30, "neonate", np.where(a <= 365, "infant", "child"))
    assert (rel.data["age_group"].to_numpy() == expect).all()
    # pseudonyms: new ids 1..n, not the originals' pairing
    assert set(rel.data["person_id"]) <= set(range(1, data["person_id"].nunique() + 1))


def test_pk_derived_columns_follow_released_size(sources):
    rel = anonymise(
        KEY, sources["haemophilia"], ROLES["haemophilia"], k=3, max_suppression=0.1
    )
    d = rel.data
    np.testing.assert_allclose(d["BMI"], d["WT"] / (d["HT"] / 100) ** 2)
    assert "LBW" in rel.report["recomputed_columns"]


@pytest.mark.parametrize("uc", USE_CASES)
def test_idempotent_in_memory_and_after_csv(sources, uc, tmp_path):
    rel = anonymise(KEY, sources[uc], ROLES[uc], k=5, max_suppression=0.1)
    again = anonymise(KEY, rel.data, ROLES[uc], k=5, max_suppression=0.1)
    assert again.report["already_anonymised"]
    pd.testing.assert_frame_equal(again.data, rel.data)
    path = tmp_path / "rel.csv"
    rel.data.to_csv(path, index=False)
    back = pd.read_csv(path)
    assert anonymise(KEY, back, ROLES[uc], k=5, max_suppression=0.1).report[
        "already_anonymised"
    ]
    with pytest.raises(AnonymiseError, match="already anonymised"):
        anonymise(KEY, rel.data, ROLES[uc], k=6, max_suppression=0.1)


def test_reproducible_and_key_dependent(sources):
    a = anonymise(KEY, sources["cardiac"], ROLES["cardiac"], k=5, max_suppression=0.1)
    b = anonymise(KEY, sources["cardiac"], ROLES["cardiac"], k=5, max_suppression=0.1)
    c = anonymise(
        jax.random.key(99),
        sources["cardiac"],
        ROLES["cardiac"],
        k=5,
        max_suppression=0.1,
    )
    # the key fixes everything but the date shifts, which are a secret drawn from
    # the OS CSPRNG: a recipient who knows the key (the seed) cannot undo them
    dates = [
        col
        for col in a.data.columns
        if pd.api.types.is_datetime64_any_dtype(a.data[col])
    ]
    assert "surgery_datetime" in dates
    pd.testing.assert_frame_equal(
        a.data.drop(columns=dates), b.data.drop(columns=dates)
    )
    assert not a.data["surgery_datetime"].equals(b.data["surgery_datetime"])
    assert not a.data["surgery_datetime"].equals(c.data["surgery_datetime"])


def test_mondrian_release(sources):
    rel = anonymise(KEY, sources["cardiac"], ROLES["cardiac"], k=5, method="mondrian")
    bands = [c + BAND_SUFFIX for c in ("age_days", "sex", "weight_kg")]
    sizes = rel.data.groupby("person_id")[bands].first().value_counts()
    assert sizes.min() >= 5 and rel.report["patients_suppressed"] == 0


def test_l_diversity_on_patient_outcome(sources):
    rel = anonymise(
        KEY, sources["cardiac"], ROLES["cardiac"], k=3, l=2, max_suppression=0.3
    )
    pt = rel.patients
    assert pt.groupby(list(pt.columns[:-1]))["died"].nunique().min() >= 2
    assert rel.report["privacy"]["sensitive"]["died"]["l_distinct"] >= 2


def test_patient_table_sensitive_rule(sources):
    s = sources["cardiac"]
    pt = patient_table(s, ROLES["cardiac"])
    died = s.groupby("person_id")["next_state"].apply(lambda x: (x == "DEAD").any())
    assert (pt["died"].astype(bool) == died.reindex(pt.index)).all()


# ---------------------------------------------------------------- bad input
def test_missing_quasi_identifier_named(sources):
    with pytest.raises(AnonymiseError, match="weight_kg"):
        anonymise(KEY, sources["cardiac"].drop(columns="weight_kg"), ROLES["cardiac"])


def test_impossible_k_named(sources):
    with pytest.raises(AnonymiseError, match="k=500 is impossible.*150 patients"):
        anonymise(KEY, sources["cardiac"], ROLES["cardiac"], k=500)


def test_unreachable_model_reports_best_k(sources):
    with pytest.raises(SearchError, match="best k reached"):
        anonymise(KEY, sources["picu"], ROLES["picu"], k=5, l=3, max_suppression=0.0)


def test_uncovered_hierarchy_value_named(sources):
    bad = sources["cardiac"].copy()
    bad.loc[bad.index[:2], "age_days"] = -4.0
    with pytest.raises(HierarchyError, match="age_days"):
        anonymise(KEY, bad, ROLES["cardiac"], k=5, max_suppression=0.1)


def test_unknown_use_case():
    # the library takes roles, never a name: a name is refused naming the way
    with pytest.raises(AnonymiseError, match=r"usecases\.get\('picu'\)\.roles"):
        anonymise(KEY, pd.DataFrame({"a": [1]}), "picu")
    with pytest.raises(usecases.UseCaseError, match="not one of haemophilia, picu"):
        usecases.get("oncology")


# ---------------------------------------------------------------- OMOP dates
def test_shift_tables_keeps_every_interval(sources):
    tables = sources["_picu_tables"]
    shifted, shifts = shift_tables(KEY, tables, max_days=30)
    assert (shifts.abs() <= 30).all() and (shifts != 0).all()
    before = hourly_table(tables)
    after = hourly_table(shifted)
    pd.testing.assert_frame_equal(before, after)
    p0, p1 = tables["person"], shifted["person"]
    assert (p1["year_of_birth"] == p1["birth_datetime"].dt.year).all()
    moved = (p1["birth_datetime"] - p0["birth_datetime"]).dt.days
    assert (moved.to_numpy() == shifts.reindex(p0["person_id"]).to_numpy()).all()
    m0, m1 = tables["measurement"], shifted["measurement"]
    assert not m0["measurement_datetime"].equals(m1["measurement_datetime"])


def test_lifespan_age_bands():
    h = lifespan_age("years", "AGE")
    v = pd.Series([0.05, 0.5, 3.0, 12.0, 17.9, 18.0, 45.0, 85.0])
    check_nested(h, v)
    assert list(h.generalise(v, 1)) == [
        "0-27 d",
        "1-11 m",
        "1-4 y",
        "10-14 y",
        "15-17 y",
        "18-29 y",
        "40-49 y",
        "80+ y",
    ]
    assert list(h.generalise(v, 2))[-3:] == ["18-39 y", "40-59 y", "60+ y"]
    with pytest.raises(HierarchyError):
        h.generalise(pd.Series([-1.0]), 1)


def test_any_calendar_column_is_shifted(sources):
    ev = sources["haemophilia"].copy()
    ev["DATETIME"] = pd.Timestamp("2025-03-01 08:00") + pd.to_timedelta(
        ev["TIME"], unit="h"
    )
    rel = anonymise(KEY, ev, ROLES["haemophilia"], k=3, max_suppression=0.1)
    assert rel.report["dates_shifted"]["columns"] == ["DATETIME"]
    d = rel.data
    # each patient's times keep their spacing; the calendar moved
    gap = d["DATETIME"] - pd.to_timedelta(d["TIME"], unit="h")
    assert (gap.groupby(d["ID"]).nunique() == 1).all()
    assert not (gap == pd.Timestamp("2025-03-01 08:00")).all()
