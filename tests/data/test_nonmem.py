"""Tests for the NONMEM dataset reader.

Every bad input is reported with row and column; good inputs survive
read -> Cohort -> rows; the public pheno dataset reads cleanly.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest

from phems_clinical.data.cohort import Cohort
from phems_clinical.data.nonmem import (
    DataValidationError,
    Exclusion,
    Issue,
    PKData,
    from_cohort,
    load_schema,
    read_nonmem,
    to_cohort,
)

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
PHENO = HERE.parent / "reference" / "nonmem_pheno" / "pheno.dta"


def _write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _fails(tmp_path, text, *, row, column, contains=(), **kw) -> DataValidationError:
    """Read ``text``; assert it fails naming ``row`` and ``column`` (and more text)."""
    with pytest.raises(DataValidationError) as info:
        read_nonmem(_write(tmp_path, text), **kw)
    err = info.value
    msg = str(err)
    assert f"row {row}" in msg and f"column {column}" in msg, msg
    assert any(i.row == row and i.column == column for i in err.issues), err.issues
    for c in contains:
        assert c in msg, msg
    return err


# --------------------------------------------------------------------------- schema


def test_schema_is_valid_draft_2020_12_and_describes_units():
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    props = schema["properties"]
    for col, unit in [
        ("TIME", "h"),
        ("AMT", "IU"),
        ("RATE", "IU/h"),
        ("DUR", "h"),
        ("DV", "IU/dL"),
        ("LLOQ", "IU/dL"),
        ("WT", "kg"),
        ("HT", "cm"),
        ("VWF", "IU/dL"),
        ("HCT", "%"),
    ]:
        assert unit in props[col]["description"], col


@pytest.mark.parametrize(
    "record, ok",
    [
        ({"ID": 1, "TIME": 0, "AMT": 2500}, True),
        ({"ID": "P-01", "TIME": 2.5, "DV": 43.1, "MDV": 0, "EVID": 0}, True),
        ({"ID": 1, "TIME": 2.5, "DV": None, "EXTRA_COV": 3}, True),  # other covariates
        ({"ID": 1, "TIME": 0, "AMT": 2500, "RATE": -2, "DUR": 0.1}, True),
        ({"ID": 1, "TIME": 0, "AMT": 2500, "ASSAY": "CSA", "SEX": 0, "BGO": 1}, True),
        ({"TIME": 0, "AMT": 1}, False),  # ID required
        ({"ID": 1, "AMT": 1}, False),  # TIME required
        ({"ID": 1, "TIME": 0}, False),  # AMT or DV
        ({"ID": 1, "TIME": -1, "AMT": 1}, False),
        ({"ID": 1, "TIME": 0, "AMT": 1, "RATE": -1}, False),  # modelled rate
        ({"ID": 1, "TIME": 0, "AMT": 1, "RATE": -2}, False),  # DUR missing
        ({"ID": 1, "TIME": 0, "AMT": 0, "EVID": 1}, False),  # dose without AMT
        ({"ID": 1, "TIME": 0, "DV": 1, "EVID": 5}, False),
        ({"ID": 1, "TIME": 0, "DV": 1, "DVUNIT": "mg/L"}, False),
        ({"ID": 1, "TIME": 0, "DV": 1, "WT": 900}, False),
        ({"ID": 1, "TIME": 0, "DV": 1, "ASSAY": "ELISA"}, False),
        ({"ID": 1, "TIME": 0, "DV": 1, "OCC": 0}, False),
    ],
)
def test_schema_accepts_and_rejects_records(record, ok):
    valid = jsonschema.Draft202012Validator(load_schema()).is_valid(record)
    assert valid is ok


# ------------------------------------------------------------------------ bad input


def test_issue_message_format():
    issue = Issue(12, "3", "DV", "non-numeric value 'abc'; expected a number in IU/dL")
    assert str(issue) == (
        "row 12 (ID 3), column DV: non-numeric value 'abc'; expected a number in IU/dL"
    )
    err = DataValidationError([issue, Issue(0, None, "WT", "missing")])
    assert isinstance(err, ValueError)
    assert "dataset, column WT: missing" in str(err)


def test_non_numeric_dv(tmp_path):
    err = _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,2,0,abc
        """,
        row=2,
        column="DV",
    )
    assert (
        "row 2 (ID 1), column DV: non-numeric value 'abc'; expected a number in IU/dL"
    ) in str(err)


def test_non_numeric_time_and_amt(tmp_path):
    err = _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000x,.
        1,08:30,0,20
        """,
        row=1,
        column="AMT",
        contains=["expected a number in IU"],
    )
    assert "row 2 (ID 1), column TIME: non-numeric value '08:30'" in str(err)


def test_negative_time(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,-1,0,20
        """,
        row=2,
        column="TIME",
        contains=["outside the plausible range", "(0 to 1.05192e+06 h)"],
    )


def test_times_decreasing_within_subject(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,24,0,20
        1,4,0,50
        """,
        row=3,
        column="TIME",
        contains=["earlier than TIME 24 h on row 2"],
    )


def test_observation_before_any_dose(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,0,3
        1,0,1000,.
        1,4,0,50
        2,1,0,30
        """,
        row=1,
        column="TIME",
        contains=["before any dose", "row 4 (ID 2)"],
    )


def test_predose_sample_listed_before_same_time_bolus(tmp_path):
    # The engine adds a bolus given at the sampling time, so a trough written at the
    # redosing time would be predicted as a peak.
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,4,0,50
        1,24,0,8
        1,24,1000,.
        """,
        row=3,
        column="TIME",
        contains=["listed before a bolus"],
    )


def test_exact_duplicate_record(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,4,0,50
        1,4,0,50
        """,
        row=3,
        column="TIME",
        contains=["duplicate of row 2"],
    )


def test_mixed_dvunit_in_one_file(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,DVUNIT
        1,0,1000,.,IU/dL
        1,4,0,50,IU/dL
        1,24,0,0.08,IU/mL
        """,
        row=3,
        column="DVUNIT",
        contains=["one unit for the whole file"],
    )


def test_iu_ml_declared_but_levels_look_like_iu_dl(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,DVUNIT
        1,0,1000,.,IU/mL
        1,4,0,50,IU/mL
        1,24,0,8,IU/mL
        """,
        row=2,
        column="DV",
        contains=["look like IU/dL", "DVUNIT column"],
    )


def test_iu_ml_argument_but_levels_look_like_iu_dl(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,4,0,50
        1,24,0,8
        """,
        row=2,
        column="DV",
        contains=["look like IU/dL", "dv_unit argument"],
        dv_unit="IU/mL",
    )


def test_iu_dl_declared_but_levels_look_like_iu_ml(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,0.5,0,0.71
        1,24,0,0.12
        1,48,0,0.03
        """,
        row=2,
        column="DV",
        contains=["look like IU/mL"],
    )


def test_lloq_in_other_unit_than_dv(tmp_path):
    # DV in IU/mL, LLOQ written in IU/dL: after conversion LLOQ would be 100 IU/dL.
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,LLOQ,DVUNIT
        1,0,1000,.,.,IU/mL
        1,0.5,0,0.71,1,IU/mL
        1,24,0,0.12,1,IU/mL
        """,
        row=2,
        column="LLOQ",
        contains=["LLOQ seems to be in IU/dL"],
    )


def test_all_levels_below_lloq_means_units_differ(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,LLOQ
        1,0,1000,.,.
        1,0.5,0,71,100
        1,24,0,12,100
        1,48,0,3,100
        """,
        row=2,
        column="LLOQ",
        contains=["different units"],
    )


def test_rate_and_dur_disagree(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,RATE,DUR,DV
        1,0,1000,10000,0.5,.
        1,4,0,.,.,50
        """,
        row=1,
        column="DUR",
        contains=["AMT/RATE = 0.1 h"],
    )


def test_rate_minus_two_without_dur(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,RATE,DUR,DV
        1,0,1000,-2,.,.
        1,4,0,.,.,50
        """,
        row=1,
        column="DUR",
    )


def test_modelled_rate_rejected(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,RATE,DV
        1,0,1000,-1,.
        1,4,0,.,50
        """,
        row=1,
        column="RATE",
    )


def test_required_covariate_column_missing(tmp_path):
    err = _fails_dataset(
        tmp_path,
        """
        ID,TIME,AMT,DV,AGE
        1,0,1000,.,30
        1,4,0,50,30
        """,
        required_covariates=["wt"],
    )
    assert "column WT: required covariate column is missing" in str(err)


def _fails_dataset(tmp_path, text, **kw):
    with pytest.raises(DataValidationError) as info:
        read_nonmem(_write(tmp_path, text), **kw)
    return info.value


def test_required_covariate_values_missing(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,WT
        1,0,1000,.,70
        1,4,0,50,70
        2,0,1000,.,.
        2,4,0,40,.
        """,
        row=3,
        column="WT",
        contains=["rows 3, 4"],
        required_covariates=["WT"],
    )


def test_non_numeric_covariate(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,WT
        1,0,1000,.,70kg
        1,4,0,50,70
        """,
        row=1,
        column="WT",
        contains=["expected a number in kg"],
    )


def test_evid_reset_unsupported(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,EVID,MDV
        1,0,1000,.,1,1
        1,4,0,50,0,0
        1,30,0,.,3,1
        1,30,1000,.,1,1
        1,34,0,45,0,0
        """,
        row=3,
        column="EVID",
        contains=["not supported"],
    )


def test_evid_out_of_range(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,EVID
        1,0,1000,.,1
        1,4,0,50,7
        """,
        row=2,
        column="EVID",
        contains=["not one of"],
    )


@pytest.mark.parametrize(
    "column, value",
    [("MDV", "2"), ("BLQ", "5"), ("SEX", "2"), ("OCC", "0"), ("VWF", "-3")],
)
def test_schema_violations_mapped_to_row_and_column(tmp_path, column, value):
    _fails(
        tmp_path,
        f"""
        ID,TIME,AMT,DV,{column}
        1,0,1000,.,1
        1,4,0,50,{value}
        """,
        row=2,
        column=column,
    )


def test_addl_and_ss_unsupported(tmp_path):
    err = _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,ADDL,II,SS
        1,0,1000,.,3,24,0
        1,4,0,50,0,0,0
        1,100,1000,.,0,0,1
        """,
        row=1,
        column="ADDL",
    )
    assert "row 3 (ID 1), column SS" in str(err)


def test_unknown_assay(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,ASSAY
        1,0,1000,.,OSA
        1,4,0,50,ELISA
        """,
        row=2,
        column="ASSAY",
        contains=["'OSA'"],
    )


def test_blq_without_lloq_or_positive_dv(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,BLQ
        1,0,1000,.,0
        1,4,0,50,0
        1,72,0,.,1
        """,
        row=3,
        column="LLOQ",
        contains=["without a LLOQ"],
    )


def test_observation_with_amount(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,EVID
        1,0,1000,.,1
        1,4,500,50,0
        """,
        row=2,
        column="AMT",
        contains=["EVID 0"],
    )


def test_all_issues_are_collected(tmp_path):
    err = _fails_dataset(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,4,0,abc
        1,-2,0,30
        2,5,0,20
        """,
    )
    found = {(i.row, i.column) for i in err.issues}
    assert found == {(2, "DV"), (3, "TIME"), (4, "TIME")}
    # Row 3 is both negative and earlier than row 2; row 4 has no earlier dose.
    assert len(err.issues) == 4 and str(err).startswith("4 problem(s)")


def test_dose_without_amount(tmp_path):
    err = _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,EVID
        1,0,0,.,1
        1,4,0,50,0
        """,
        row=1,
        column="AMT",
        contains=["dose record (EVID 1) without an amount"],
    )
    # The clearer message replaces the generic schema one for the same cell.
    assert sum(i.row == 1 and i.column == "AMT" for i in err.issues) == 1


def test_missing_id_and_time_columns(tmp_path):
    err = _fails_dataset(
        tmp_path,
        """
        SUBJ,T,AMT,DV
        1,0,1000,.
        """,
    )
    assert "column ID: required column is missing" in str(err)
    assert "column TIME: required column is missing" in str(err)


def test_ragged_row(tmp_path):
    err = _fails_dataset(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,4,0,50,99
        """,
    )
    assert "row 2: 5 fields but the header has 4 columns" in str(err)


def test_bad_dv_unit_argument():
    with pytest.raises(ValueError, match="dv_unit"):
        read_nonmem(FIXTURES / "fviii_small.csv", dv_unit="mg/L")


# ----------------------------------------------------------------------- good input


@pytest.fixture
def small() -> PKData:
    return read_nonmem(FIXTURES / "fviii_small.csv", required_covariates=["WT", "age"])


def test_small_fixture_reads_with_case_insensitive_headers(small):
    ev = small.events
    assert {
        "ID",
        "TIME",
        "AMT",
        "DV",
        "EVID",
        "MDV",
        "BLQ",
        "LLOQ",
        "OCC",
        "DUR",
    } <= set(ev.columns)
    assert small.covariates == ("WT", "AGE", "BGO", "VWF", "ASSAY")
    assert list(ev["ID"].unique()) == ["1", "2"]
    assert (ev["DVUNIT"] == "IU/dL").all()


def test_exclusions_are_reported_not_silent(small):
    reasons = {e.row: e.reason for e in small.exclusions}
    assert set(reasons) == {8, 10, 11}
    assert "EVID 2" in reasons[8]
    assert "MDV 1" in reasons[10]
    assert "no usable observation" in reasons[11]
    assert all(isinstance(e, Exclusion) for e in small.exclusions)
    assert small.exclusions[2].id == "3"
    # Every one of the 11 data rows is either an event or an exclusion.
    assert len(small.events) + len(small.exclusions) == 11
    assert sorted([*small.events["ROW"], *reasons]) == list(range(1, 12))


def test_rate_and_dur_give_infusion_durations(small):
    doses = small.events[small.events["EVID"] == 1].set_index("ROW")
    assert doses.loc[1, "DUR"] == pytest.approx(2500 / 25000)  # AMT/RATE
    assert doses.loc[5, "DUR"] == pytest.approx(0.25)  # RATE=-2, DUR
    assert doses.loc[7, "DUR"] == 0.0  # RATE=0: bolus


def test_dur_alone_and_consistent_rate_dur(tmp_path):
    data = read_nonmem(
        _write(
            tmp_path,
            """
        ID,TIME,AMT,RATE,DUR,DV
        1,0,1000,.,0.5,.
        1,24,1000,6000,0.1667,.
        1,48,1000,.,.,.
        1,50,0,.,.,40
        """,
        )
    )
    assert data.events["DUR"].tolist()[:3] == pytest.approx([0.5, 1000 / 6000, 0.0])


def test_blq_from_lloq_is_flagged_and_noted(small):
    row4 = small.events.set_index("ROW").loc[4]
    assert row4["BLQ"] == 1 and row4["LLOQ"] == 1.0
    assert "BLQ derived" in row4["NOTE"]
    assert small.events.set_index("ROW").loc[3, "BLQ"] == 0


def test_blq_flag_without_lloq_uses_dv_as_lloq(tmp_path):
    data = read_nonmem(
        _write(
            tmp_path,
            """
        ID,TIME,AMT,DV,BLQ
        1,0,1000,.,0
        1,4,0,50,0
        1,72,0,1,1
        """,
        )
    )
    row = data.events.set_index("ROW").loc[3]
    assert row["BLQ"] == 1 and row["LLOQ"] == 1.0 and "DV used as LLOQ" in row["NOTE"]
    cohort, _ = to_cohort(data, [])
    assert bool(cohort.obs_blq[0, 1]) and float(cohort.obs_lloq[0, 1]) == 1.0


def test_iu_ml_converted_to_iu_dl():
    data = read_nonmem(FIXTURES / "fviii_iu_ml.tsv", required_covariates=["WT"])
    obs = data.events[data.events["EVID"] == 0]
    assert obs["DV"].tolist() == pytest.approx([62.0, 11.0, 0.4])
    assert obs["LLOQ"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert obs["BLQ"].tolist() == [0, 0, 1]
    assert (data.events["DVUNIT"] == "IU/dL").all()
    assert all("IU/mL to IU/dL" in n for n in obs["NOTE"])


def test_iu_ml_from_argument(tmp_path):
    data = read_nonmem(
        _write(
            tmp_path,
            """
        id,time,amt,dv
        1,0,1000,.
        1,0.5,0,0.71
        """,
        ),
        dv_unit="iu/ml",
    )
    assert data.events["DV"].dropna().tolist() == pytest.approx([71.0])


def test_evid_and_mdv_derived(tmp_path):
    data = read_nonmem(
        _write(
            tmp_path,
            """
        ID TIME AMT DV MDV
        1  0    1000 .  .
        1  2    0    .  1
        1  4    0    50 .
        1  8    0    .  .
        """,
            name="data.txt",
        )
    )
    ev = data.events
    assert ev["EVID"].tolist() == [1, 0] and ev["MDV"].tolist() == [1, 0]
    reasons = {e.row: e.reason for e in data.exclusions}
    assert "MDV 1 record without a dose" in reasons[2]
    assert "without DV" in reasons[4]


def test_sorting_non_contiguous_ids_is_not_an_error(tmp_path):
    data = read_nonmem(
        _write(
            tmp_path,
            """
        ID,TIME,AMT,DV
        10,0,1000,.
        2,0,500,.
        10,4,0,50
        2,4,0,30
        """,
        )
    )
    assert data.events["ID"].tolist() == ["2", "2", "10", "10"]
    assert data.events["ROW"].tolist() == [2, 4, 1, 3]
    _, ids = to_cohort(data, [])
    assert ids == ["2", "10"]


def test_commented_records_are_excluded(tmp_path):
    data = read_nonmem(
        _write(
            tmp_path,
            """
        #ID,TIME,AMT,DV
        1,0,1000,.
        #1,2,0,abc
        1,4,0,50
        """,
        )
    )
    assert [e.row for e in data.exclusions] == [2]
    assert "commented-out" in data.exclusions[0].reason
    assert data.events["ROW"].tolist() == [1, 3]


def test_commented_whitespace_header(tmp_path):
    data = read_nonmem(
        _write(
            tmp_path,
            """
        # ID TIME AMT DV
        1 0 1000 .
        1 4 0 50
        """,
            name="data.dat",
        )
    )
    assert data.events["DV"].dropna().tolist() == [50.0]


def test_dataframe_input_and_occasions():
    df = pd.DataFrame(
        {
            "id": [1, 1, 1, 1],
            "time": [0.0, 4.0, 100.0, 104.0],
            "amt": [1000.0, 0.0, 1000.0, 0.0],
            "dv": [np.nan, 50.0, np.nan, 45.0],
            "occ": [1, 1, 2, 2],
            "wt": [70.0] * 4,
        }
    )
    data = read_nonmem(df)
    cohort, ids = to_cohort(data, ["WT"])
    assert ids == ["1"]
    np.testing.assert_array_equal(np.asarray(cohort.dose_occ), [[0, 1]])
    np.testing.assert_array_equal(np.asarray(cohort.obs_occ), [[0, 1]])


def test_to_cohort_times_relative_to_first_record(tmp_path):
    data = read_nonmem(
        _write(
            tmp_path,
            """
        ID,TIME,AMT,DV
        1,100,1000,.
        1,104,0,50
        """,
        )
    )
    cohort, _ = to_cohort(data, [])
    assert np.asarray(cohort.dose_time).tolist() == [[0.0]]
    assert np.asarray(cohort.obs_time).tolist() == [[4.0]]


def test_to_cohort_unknown_covariate(small):
    with pytest.raises(DataValidationError, match="column HT: covariate column is not"):
        to_cohort(small, ["WT", "HT"])


def test_round_trip_read_to_cohort_from_cohort(small, tmp_path):
    covs = ["WT", "AGE", "BGO", "VWF", "ASSAY"]
    cohort, ids = to_cohort(small, covs)
    assert isinstance(cohort, Cohort) and cohort.n_subjects == 2
    assert ids == ["1", "2"]
    # Subject 1: ASSAY OSA -> 1; subject 2: CSA -> 0.
    np.testing.assert_allclose(
        np.asarray(cohort.covariates), [[56, 22, 1, 80, 1], [20, 6, 0, 110, 0]]
    )

    rows = from_cohort(cohort, ids, covs)
    ev = small.events
    cols = ["ID", "TIME", "EVID", "AMT", "DUR", "BLQ", "OCC"]
    pd.testing.assert_frame_equal(
        rows[cols].reset_index(drop=True),
        ev[cols].reset_index(drop=True),
        check_dtype=False,
    )
    obs = ev["EVID"] == 0
    np.testing.assert_allclose(rows.loc[obs.to_numpy(), "DV"], ev.loc[obs, "DV"])

    # ... and the rows are a valid dataset that gives back the same cohort,
    # also after a trip through a CSV file.
    path = tmp_path / "round.csv"
    rows.to_csv(path, index=False, na_rep=".")
    for again in (read_nonmem(rows), read_nonmem(path)):
        cohort2, ids2 = to_cohort(again, covs)
        assert ids2 == ids
        for a, b, name in zip(cohort, cohort2, Cohort._fields, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=name)


def test_pheno_file_holds_dose_rows_with_dv_zero():
    # Checks the premise of reading pheno without MDV: DV == 0 only on dose rows.
    raw = pd.read_csv(PHENO, sep=r"\s+")
    assert ((raw["AMT"] > 0) == (raw["DV"] == 0)).all()


def test_pheno_reads_cleanly():
    data = read_nonmem(PHENO, dv_unit=None, required_covariates=["WGT", "APGR"])
    ev = data.events
    assert ev["ID"].nunique() == 59
    assert int((ev["EVID"] == 0).sum()) == 155
    assert int((ev["EVID"] == 1).sum()) == 589
    assert data.exclusions == []
    assert data.covariates == ("WGT", "APGR", "FA1", "FA2")
    assert ev["DVUNIT"].isna().all()
    cohort, ids = to_cohort(data, ["WGT", "APGR"])
    assert cohort.n_subjects == 59 and ids[0] == "1" and ids[-1] == "59"
    assert int(np.asarray(cohort.obs_mask).sum()) == 155
    assert int((np.asarray(cohort.dose_amt) > 0).sum()) == 589
    # Subject 1: 25 mg loading dose at t=0, first level 17.3 mg/L at 2 h, 1.4 kg.
    assert float(cohort.dose_amt[0, 0]) == 25.0
    assert float(cohort.obs_dv[0, 0]) == pytest.approx(17.3)
    assert float(cohort.covariates[0, 0]) == pytest.approx(1.4)
    back = from_cohort(cohort, ids, ["WGT", "APGR"], dv_unit=None)
    assert "DVUNIT" not in back.columns and len(back) == 155 + 589


# ------------------------------------------------- missing and implausible values


def test_observation_without_dv_is_an_error_unless_blq(tmp_path):
    """A missing level to fit (MDV 0) is refused by row and DV, never fitted as 0;
    a BLQ row (M3) may lack DV."""
    err = _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,MDV,BLQ,LLOQ
        1,0,1000,.,1,0,.
        1,4,0,50,0,0,1
        1,24,0,.,0,0,1
        1,48,0,.,0,1,1
        """,
        row=3,
        column="DV",
        contains=["without a value"],
    )
    assert [(i.row, i.column) for i in err.issues] == [(3, "DV")]
    # Without MDV, such a record is MDV 1 (NONMEM's default): a reported exclusion.
    data = read_nonmem(
        _write(
            tmp_path,
            """
        ID,TIME,AMT,DV,EVID
        1,0,1000,.,1
        1,4,0,50,0
        1,24,0,.,0
        """,
        )
    )
    assert data.events["ROW"].tolist() == [1, 2]
    assert [(e.row, "without DV" in e.reason) for e in data.exclusions] == [(3, True)]


def test_missing_dv_column_is_an_error_naming_dv(tmp_path):
    err = _fails_dataset(
        tmp_path,
        """
        ID,TIME,AMT,MDV
        1,0,1000,1
        1,4,0,0
        """,
    )
    assert "column DV: required column is missing" in str(err)


def test_empty_id_cell_names_row_and_id(tmp_path):
    err = _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,4,0,50
        ,6,0,40
        """,
        row=3,
        column="ID",
        contains=["missing subject ID"],
    )
    assert len(err.issues) == 1


@pytest.mark.parametrize(
    "header, row, column, contains",
    [
        ("ID,TIME,AMT,DV\n1,0,1000,.\n1,4,0,1e308", "2", "DV", "0 to 500 IU/dL"),
        (
            "ID,TIME,AMT,DV,DVUNIT\n1,0,1000,.,IU/mL\n1,4,0,0.5,IU/mL\n1,5,0,0.4,IU/mL\n"
            "1,6,0,6,IU/mL",
            "4",
            "DV",
            "(from DV 6 IU/mL)",
        ),
        ("ID,TIME,AMT,DV\n1,0,1e308,.\n1,4,0,50", "1", "AMT", "0 to 100000 IU"),
        ("ID,TIME,AMT,DV,WT\n1,0,1e7,.,25\n1,4,0,50,25", "1", "AMT", "0 to 500 IU/kg"),
        (
            "ID,TIME,AMT,DV,WT\n1,0,25000,.,25\n1,4,0,50,.",
            "1",
            "AMT",
            "(from AMT 25000 IU for WT 25 kg)",
        ),
        (
            "ID,TIME,AMT,RATE,DUR,DV\n1,0,1000,-2,1e6,.\n1,4,0,.,.,50",
            "1",
            "DUR",
            "0 to 720 h",
        ),
        (
            "ID,TIME,AMT,RATE,DV\n1,0,1000,0.001,.\n1,4,0,.,50",
            "1",
            "RATE",
            "AMT/RATE = 1000 IU / 0.001 IU/h",
        ),
        ("ID,TIME,AMT,DV\n1,0,1000,.\n1,1e300,0,50", "2", "TIME", "0 to 1.05192e+06 h"),
        ("ID,TIME,AMT,DV,AGE\n1,0,1000,.,115\n1,4,0,50,130", "2", "AGE", "0 to 120 y"),
        ("ID,TIME,AMT,DV,WT\n1,0,1000,.,0.1\n1,4,0,50,0.1", "1", "WT", "0.2 to 250 kg"),
        ("ID,TIME,AMT,DV,HT\n1,0,1000,.,300\n1,4,0,50,300", "1", "HT", "30 to 230 cm"),
        (
            "ID,TIME,AMT,DV,LLOQ\n1,0,1000,.,.\n1,4,0,50,0",
            "2",
            "LLOQ",
            "0.05 to 20 IU/dL",
        ),
    ],
)
def test_implausible_values_are_refused_naming_row_column_and_range(
    tmp_path, header, row, column, contains
):
    err = _fails(tmp_path, header, row=int(row), column=column, contains=[contains])
    # one message per cell: the plausibility message replaces the schema's
    cells = [(i.row, i.column) for i in err.issues]
    assert len(cells) == len(set(cells)), err.issues


def test_age_up_to_120_years_is_accepted(tmp_path):
    data = read_nonmem(
        _write(tmp_path, "ID,TIME,AMT,DV,AGE\n1,0,1000,.,115\n1,4,0,50,115")
    )
    assert data.events["AGE"].tolist() == [115, 115]


def test_unusual_values_are_accepted_with_warnings(tmp_path):
    data = read_nonmem(
        _write(
            tmp_path,
            """
        ID,TIME,AMT,RATE,DUR,DV,WT
        1,0,6000,-2,400,.,25
        1,401,0,.,.,350,25
        """,
        )
    )
    assert len(data.events) == 2
    got = {(w.row, w.column): w.message for w in data.warnings}
    assert set(got) == {(1, "AMT"), (1, "DUR"), (2, "DV")}, got
    assert "240 IU/kg is unusual" in got[(1, "AMT")]
    assert "at most 300 IU/dL" in got[(2, "DV")]


def test_level_zero_without_blq_or_lloq_asks_for_blq(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,1000,.
        1,4,0,50
        1,96,0,0
        """,
        row=3,
        column="DV",
        contains=["BLQ 1 with the assay's LLOQ"],
    )


def test_blq_contradictions_and_gaps_are_said_not_silent(tmp_path):
    """Accepted as NONMEM users write them, but each said by row and column: a
    level below the LLOQ marked BLQ 0 (fitted as BLQ), a BLQ record whose DV holds
    the LLOQ, and a required covariate missing on one record."""
    data = read_nonmem(
        _write(
            tmp_path,
            """
        ID,TIME,AMT,DV,BLQ,LLOQ,WT
        1,0,1000,.,.,.,25
        1,4,0,0,0,1,25
        1,24,0,0.8,1,.,
        1,30,0,40,0,1,25
        """,
        ),
        required_covariates=["WT"],
    )
    got = {(w.row, w.column): w.message for w in data.warnings}
    assert "below LLOQ 1 but BLQ is 0" in got[(2, "BLQ")]
    assert "DV 0.8 taken as the LLOQ" in got[(3, "LLOQ")]
    assert "missing on 1 record(s) (rows 3)" in got[(0, "WT")]
    assert data.events["BLQ"].tolist() == [0, 1, 1, 0]


def test_blq_without_lloq_and_a_dv_no_assay_has_is_refused(tmp_path):
    _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV,BLQ
        1,0,1000,.,.
        1,4,0,167,1
        1,24,0,20,0
        """,
        row=2,
        column="LLOQ",
        contains=["no assay's LLOQ"],
    )


def test_non_finite_number_is_named_as_such(tmp_path):
    err = _fails(
        tmp_path,
        """
        ID,TIME,AMT,DV
        1,0,inf,.
        1,4,0,1e999
        """,
        row=2,
        column="DV",
        contains=["non-finite value '1e999'"],
    )
    assert "row 1 (ID 1), column AMT: non-finite value 'inf'" in str(err)


def test_to_cohort_refuses_a_missing_level_that_is_not_blq(small):
    ev = small.events.copy()
    ev.loc[(ev["EVID"] == 0) & (ev["ROW"] == 2), "DV"] = np.nan
    with pytest.raises(DataValidationError, match="row 2 .*column DV"):
        to_cohort(small._replace(events=ev), ["WT"])
