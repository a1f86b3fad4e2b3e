"""Stages of the PK -> OMOP conversion on a few hand-written events."""

import numpy as np
import pandas as pd
import pytest

from phems_clinical.data.omop import pk
from phems_clinical.data.omop.concepts import OPERATOR

EVENTS = pd.DataFrame(
    {
        "id": [3, 3, 3, 7, 7],
        "time": [0.0, 0.5, 24.0, 0.0, 2.0],
        "amt": [1000.0, 0, 0, 500.0, 0],
        "rate": [2000.0, np.nan, np.nan, 0.0, np.nan],
        "dv": [np.nan, 40.0, np.nan, np.nan, 20.0],
        "blq": [0, 0, 1, 0, 0],
        "lloq": [np.nan, 1.0, 1.0, np.nan, 1.0],
        "evid": [1, 0, 0, 1, 0],
        "mdv": [1, 0, 0, 1, 0],
        "age": [10.0, 10.0, 10.0, np.nan, 3.0],
    }
)


def test_checked_events_masks_and_refusals():
    ev, is_dose, is_obs = pk._checked_events(EVENTS)
    assert "ID" in ev.columns
    assert is_dose.tolist() == [True, False, False, True, False]
    assert is_obs.tolist() == [False, True, True, False, True]
    bad = EVENTS.assign(dv=[np.nan, np.nan, np.nan, np.nan, 20.0])
    with pytest.raises(ValueError, match=r"column DV .* rows \[1\] \(IDs \[3\]\)"):
        pk._checked_events(bad)
    with pytest.raises(ValueError, match=r"rows \[2\] are neither"):
        pk._checked_events(EVENTS.assign(evid=[1, 0, 2, 1, 0]))


def test_persons_time_zero_and_birth():
    ev, _, _ = pk._checked_events(EVENTS)
    t0 = pk._assign_persons(ev, {3: "2024-01-01", 7: "2024-02-01"})
    assert ev["_pid"].tolist() == [3, 3, 3, 7, 7]  # positive integer IDs kept
    assert ev["_t"].iloc[1] == pd.Timestamp("2024-01-01 00:30")
    person, t0_s = pk._person_table(ev, t0, care_site_id=1)
    # AGE 3 y (first non-missing of subject 7) = 3 * 365.25 d before time 0
    assert person["birth_datetime"].iloc[1] == (
        pd.Timestamp("2024-02-01") - pd.Timedelta(days=3 * 365.25)
    )
    assert t0_s.loc[7] == pd.Timestamp("2024-02-01")


def test_dose_durations_from_rate_and_visits():
    ev, is_dose, _ = pk._checked_events(EVENTS)
    pk._assign_persons(ev, "2024-01-01")
    dur = pk._dose_durations(ev[is_dose])
    assert dur.tolist() == [0.5, 0.0]  # 1000 IU / 2000 IU/h; bolus
    with pytest.raises(ValueError, match="DUR .* or RATE"):
        pk._dose_durations(ev[is_dose].drop(columns=["RATE"]))
    visit, vid = pk._visit_table(ev, is_dose, dur, 10, 1)
    assert visit["visit_occurrence_id"].tolist() == [10, 11]
    assert vid.tolist() == [10, 10, 10, 11, 11]
    assert visit["visit_end_datetime"].iloc[0] == pd.Timestamp("2024-01-02")


def test_level_table_blq_as_lloq_with_operator():
    ev, _, is_obs = pk._checked_events(EVENTS)
    pk._assign_persons(ev, "2024-01-01")
    levels = pk._level_table(ev[is_obs], np.array([1, 1, 2]), 99, "FVIII")
    assert levels["value_as_number"].tolist() == [40.0, 1.0, 20.0]
    assert levels["operator_concept_id"].tolist() == [
        OPERATOR["="],
        OPERATOR["<"],
        OPERATOR["="],
    ]
    assert levels["value_source_value"].tolist() == ["40.0", "<1.0", "20.0"]
    assert levels["measurement_source_value"].iloc[0] == "FVIII:C|LLOQ=1.0"
