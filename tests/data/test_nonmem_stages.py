"""The stages of the NONMEM reader, each on a few hand-written rows.

Expected values are worked by hand from the NONMEM conventions (Users Guide V:
EVID/MDV derivation, RATE -2 with DUR, IGNORE=#/@/C) and the reader's documented
rules (IU/mL x100, BLQ when DV < LLOQ, per-kg doses).
"""

import numpy as np
import pandas as pd
import pytest

from phems_clinical.data import nonmem as nm

PARSE = (
    nm._mark_comments,
    nm._subject_ids,
    nm._file_unit,
    nm._parse_items,
    nm._parse_covariates,
)
EVENTS = (*PARSE, nm._event_types)


def _records(
    header: str, *rows: str, stages=EVENTS, dv_unit="IU/dL", required=()
) -> nm._Records:
    """A working record set from comma-separated rows, run through ``stages``."""
    cols = header.split(",")
    raw = pd.DataFrame([r.split(",") for r in rows], columns=cols, dtype=object)
    rec = nm._Records(raw, np.arange(1, len(rows) + 1), dv_unit, tuple(required))
    for stage in stages:
        stage(rec)
    return rec


def _messages(rec, column=None):
    return [i.message for i in rec.log.issues if column in (None, i.column)]


def test_required_columns_named_when_missing():
    with pytest.raises(nm.DataValidationError, match=r"column DV: required column"):
        nm._check_required_columns(["ID", "TIME", "AMT"], "x")
    nm._check_required_columns(["ID", "TIME", "DV"], "x")


def test_comment_marks_and_canonical_ids():
    rec = _records(
        "ID,TIME,DV", "#1,0,5", "@1,0,5", "C,0,5", "1.0,0,5", ",0,5", stages=PARSE[:2]
    )
    assert rec.commented.tolist() == [True, True, True, False, False]
    assert rec.ids[3] == "1" and rec.ids[4] is None
    assert rec.has_id.tolist() == [True, True, True, True, False]
    # only the active record without an ID is an issue
    assert [(i.row, i.column) for i in rec.log.issues] == [(5, "ID")]


def test_file_unit_from_dvunit_column_else_argument():
    rec = _records("ID,TIME,DV,DVUNIT", "1,0,5,iu/ml", "1,1,5,IU/mL", stages=PARSE[:3])
    assert (rec.unit, rec.unit_source) == ("IU/mL", "DVUNIT column")
    rec = _records("ID,TIME,DV", "1,0,5", stages=PARSE[:3], dv_unit=None)
    assert (rec.unit, rec.unit_source) == (None, "dv_unit argument")


def test_items_and_covariates_parsed_text_columns_kept():
    rec = _records(
        "ID,TIME,DV,WT,COMMENT,ASSAY",
        "1,0,abc,x,ok,OSA",
        "1,1,5,70,fine,CSA",
        "1,2,6,70,3,?",
        stages=PARSE,
    )
    assert np.isnan(rec.num["DV"][0]) and (0, "DV") in rec.bad_cells
    assert rec.covariates == ["WT", "ASSAY"] and rec.text_cols == ["COMMENT"]
    assert rec.num["ASSAY"][:2].tolist() == [1.0, 0.0]
    assert {i.column for i in rec.log.issues} == {"DV", "WT", "ASSAY"}
    assert "expected a number in kg" in _messages(rec, "WT")[0]


def test_required_covariate_column_missing_or_text():
    # CMT is a NONMEM data item, never a covariate
    rec = _records(
        "ID,TIME,DV,CMT", "1,0,5,1", "1,1,5,1", stages=PARSE, required=("WT", "CMT")
    )
    nm._check_required_covariate_columns(rec)
    assert [(i.row, i.column) for i in rec.log.issues] == [(0, "WT"), (0, "CMT")]
    assert "not a numeric column" in rec.log.issues[1].message
    # a required column is parsed strictly: text values are issues, not a text column
    rec = _records(
        "ID,TIME,DV,FOO", "1,0,5,a", "1,1,5,b", stages=PARSE, required=("FOO",)
    )
    assert rec.text_cols == [] and [i.row for i in rec.log.issues] == [1, 2]


def test_event_types_derived_as_nonmem():
    # no EVID: AMT > 0 is a dose, MDV 1 without a dose is EVID 2, no DV -> MDV 1
    rec = _records(
        "ID,TIME,AMT,DV,MDV", "1,0,1000,.,.", "1,1,0,.,1", "1,2,0,40,.", "1,3,0,.,."
    )
    assert rec.evid.tolist() == [1, 2, 0, 0]
    assert rec.mdv.tolist() == [1, 1, 0, 1]
    assert rec.dose.tolist() == [True, False, False, False]
    assert rec.obs.tolist() == [False, False, True, False]


def test_missing_evid_noted():
    rec = _records("ID,TIME,AMT,DV,EVID", "1,0,1000,.,.", "1,1,0,40,0")
    assert rec.notes[0] == ["EVID missing; derived 1"] and rec.notes[1] == []


def test_event_record_rules():
    rec = _records(
        "ID,TIME,AMT,DV,EVID,MDV,ADDL,SS",
        "1,0,0,.,1,1,0,0",
        "1,1,0,.,3,1,0,0",
        "1,2,500,40,0,0,0,0",
        "1,3,500,.,1,0,2,1",
    )
    nm._check_event_records(rec)
    got = sorted((i.row, i.column) for i in rec.log.issues)
    assert got == [
        (1, "AMT"),
        (2, "EVID"),
        (3, "AMT"),
        (4, "ADDL"),
        (4, "MDV"),
        (4, "SS"),
    ]


def test_level_to_fit_without_value():
    rec = _records(
        "ID,TIME,AMT,DV,MDV,BLQ", "1,0,1000,.,1,0", "1,1,0,.,0,0", "1,2,0,.,0,1"
    )
    nm._check_missing_levels(rec)
    assert [(i.row, i.column) for i in rec.log.issues] == [(2, "DV")]


def test_mixed_dvunit_named_on_the_later_row():
    rec = _records("ID,TIME,DV,DVUNIT", "1,0,5,IU/dL", "1,1,0.05,IU/mL")
    nm._check_dvunit_mix(rec)
    assert [(i.row, i.column) for i in rec.log.issues] == [(2, "DVUNIT")]


def test_levels_that_look_like_iu_ml():
    # three quantified levels below 1.5 IU/dL: reported on the largest (row 3)
    rec = _records(
        "ID,TIME,AMT,DV", "1,0,1000,.", "1,1,0,0.9", "1,2,0,1.2", "1,3,0,0.3"
    )
    assert nm._level_unit_suspicion(rec)
    assert [(i.row, i.column) for i in rec.log.issues] == [(3, "DV")]
    assert "levels look like IU/mL" in rec.log.issues[0].message


def test_levels_negative_zero_and_implausible():
    rec = _records(
        "ID,TIME,AMT,DV", "1,0,1000,.", "1,1,0,-2", "1,2,0,0", "1,3,0,600", "1,4,0,350"
    )
    nm._check_levels(rec)
    assert sorted(i.row for i in rec.log.issues) == [2, 3, 4]
    assert [(w.row, w.column) for w in rec.warned] == [(5, "DV")]  # 350: warn


def test_lloq_range_in_iu_dl():
    # 0.5 IU/mL = 50 IU/dL is no factor assay's LLOQ; 0.01 IU/mL = 1 IU/dL is
    rec = _records(
        "ID,TIME,AMT,DV,LLOQ",
        "1,0,1000,.,.",
        "1,1,0,0.6,0.5",
        "1,2,0,0.3,0.01",
        dv_unit="IU/mL",
    )
    nm._check_lloq(rec)
    assert [(i.row, i.column) for i in rec.log.issues] == [(2, "LLOQ")]
    assert "= 50 IU/dL" in rec.log.issues[0].message


def test_iu_ml_converted_to_iu_dl():
    rec = _records(
        "ID,TIME,AMT,DV,LLOQ", "1,0,1000,.,.", "1,1,0,0.62,0.01", dv_unit="IU/mL"
    )
    nm._convert_to_iu_dl(rec)
    assert rec.dv[1] == pytest.approx(62.0) and rec.lloq[1] == pytest.approx(1.0)
    assert rec.notes[1] == ["DV/LLOQ converted from IU/mL to IU/dL (x100)"]
    assert rec.notes[0] == []  # the dose is no observation record


def test_blq_derived_and_dv_taken_as_lloq():
    rec = _records(
        "ID,TIME,AMT,DV,LLOQ,BLQ",
        "1,0,1000,.,.,0",
        "1,1,0,0.5,1,0",
        "1,2,0,1,.,1",
        "1,3,0,.,.,1",
    )
    nm._derive_blq(rec)
    assert rec.blq.tolist() == [False, True, True, True]
    assert rec.lloq[2] == 1.0  # DV used as the LLOQ
    assert [(w.row, w.column) for w in rec.warned] == [(2, "BLQ"), (3, "LLOQ")]
    assert [(i.row, i.column) for i in rec.log.issues] == [(4, "LLOQ")]


def test_infusion_durations():
    # RATE -2 with DUR 0.5 h; 1000 IU at 2000 IU/h = 0.5 h; DUR only; a bolus;
    # RATE 1000 IU/h (1 h) against DUR 2 h disagree
    rec = _records(
        "ID,TIME,AMT,RATE,DUR,DV",
        "1,0,1000,-2,0.5,.",
        "1,1,1000,2000,.,.",
        "1,2,1000,.,0.25,.",
        "1,3,1000,.,.,.",
        "1,4,1000,1000,2,.",
    )
    nm._infusion_durations(rec)
    assert rec.dur.tolist() == [0.5, 0.5, 0.25, 0.0, 1.0]
    assert [(i.row, i.column) for i in rec.log.issues] == [(5, "DUR")]
    assert rec.notes[2] == ["infusion over DUR 0.25 h"]


def test_dose_per_kg_uses_the_subjects_first_weight():
    # 20000 IU for 20 kg = 1000 IU/kg (above the limit); the second dose row has
    # no WT, the subject's first weight is used
    rec = _records("ID,TIME,AMT,DV,WT", "1,0,500,.,20", "1,1,0,40,20", "1,2,20000,.,.")
    nm._check_amounts(rec)
    assert [(i.row, i.column) for i in rec.log.issues] == [(3, "AMT")]
    assert "for WT 20 kg" in rec.log.issues[0].message


def test_occasions_default_to_one_and_missing_named():
    rec = _records("ID,TIME,AMT,DV,OCC", "1,0,1000,.,1", "1,1,0,40,.")
    nm._occasions(rec)
    assert rec.occ.tolist() == [1.0, 1.0]
    assert [(i.row, i.column) for i in rec.log.issues] == [(2, "OCC")]
    rec = _records("ID,TIME,AMT,DV", "1,0,1000,.")
    nm._occasions(rec)
    assert rec.occ.tolist() == [1.0]


def test_time_order_and_duplicates():
    rec = _records(
        "ID,TIME,AMT,DV", "1,0,1000,.", "1,5,0,40", "1,2,0,30", "2,0,1000,.", "1,5,0,40"
    )
    nm._check_time_order(rec)
    nm._check_duplicates(rec)
    got = [(i.row, i.message[:20]) for i in rec.log.issues]
    assert got == [(3, "TIME 2 h is earlier "), (5, "exact duplicate of r")]


def test_order_and_dose_precedence():
    # subject 10 sampled before any dose (row 1); subject 2 sampled at 5 h and a
    # bolus at 5 h listed after the sample (a pre-dose sample, row 4)
    rec = _records(
        "ID,TIME,AMT,DV",
        "10,0,0,5",
        "10,1,1000,.",
        "2,0,1000,.",
        "2,5,0,3",
        "2,5,1000,.",
        "10,2,0,20",
    )
    nm._infusion_durations(rec)
    order = nm._file_order(rec)
    assert order.tolist() == [2, 3, 4, 0, 1, 5]  # numeric IDs: 2 before 10
    nm._check_dose_precedence(rec, order)
    got = [(i.row, i.message[:30]) for i in rec.log.issues]
    assert got == [
        (4, "observation at TIME 5 h is lis"),
        (1, "observation at TIME 0 h comes "),
    ]


def test_exclusions_with_reasons():
    rec = _records(
        "ID,TIME,AMT,DV,MDV,EVID",
        "#1,0,1000,.,1,1",
        "1,0,1000,.,1,1",
        "1,1,0,40,1,0",
        "1,2,0,.,1,2",
        "1,3,0,30,0,0",
        "2,0,1000,.,1,1",
    )
    exclusions, keep = nm._exclusions(rec)
    assert [(e.row, e.reason[:25]) for e in exclusions] == [
        (1, "commented-out record (fir"),
        (4, "EVID 2 (other-type event)"),
        (3, "observation record with M"),
        (6, "subject has doses but no "),
    ]
    assert keep.tolist() == [False, True, False, False, True, False]


def test_required_covariate_without_value_and_varying_covariate():
    rec = _records(
        "ID,TIME,AMT,DV,WT,AGE", "1,0,1000,.,.,5", "1,1,0,40,.,6", required=("WT",)
    )
    order = nm._file_order(rec)
    _, keep = nm._exclusions(rec)
    nm._check_subject_covariates(rec, order, keep)
    assert [(i.row, i.column) for i in rec.log.issues] == [(1, "WT")]
    assert "(rows 1, 2)" in rec.log.issues[0].message
    assert rec.notes[0] == ["AGE varies within subject (5 to 6); first value used"]


def test_schema_record_and_missing_time():
    rec = _records("ID,TIME,AMT,DV,DVUNIT", "1,0,.,.,IU/dL", "1,.,0,40,iu/dl")
    assert nm._schema_record(rec, 0) == {
        "ID": 1,
        "TIME": 0.0,
        "AMT": 0.0,
        "DVUNIT": "IU/dL",
    }
    nm._check_schema(rec)
    assert [(i.row, i.column, i.message) for i in rec.log.issues] == [
        (2, "TIME", "missing time; expected a number in h (>= 0)")
    ]


def test_events_table_and_covariate_gap_warning():
    rec = _records(
        "ID,TIME,AMT,DV,LLOQ,WT", "1,0,1000,.,.,70", "1,1,0,40,1,.", required=("WT",)
    )
    for stage in (nm._derive_blq, nm._infusion_durations, nm._occasions):
        stage(rec)
    sel = np.array([0, 1])
    events = nm._events_table(rec, sel)
    assert events["DV"].isna().tolist() == [True, False]
    assert events["LLOQ"].tolist()[1] == 1.0 and events["OCC"].tolist() == [1, 1]
    assert events["DVUNIT"].tolist() == ["IU/dL", "IU/dL"]
    nm._warn_covariate_gaps(rec, sel)
    assert [(w.row, w.column) for w in rec.warned] == [(0, "WT")]
    assert "rows 2" in rec.warned[0].message
