"""Property-based tests of the NONMEM reader: whatever the file, the
result is a data set whose levels are all numbers (NaN only on BLQ rows) and whose
rows are all kept or reported as excluded, or a DataValidationError naming rows and
columns; never another exception."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import example, given
from hypothesis import strategies as st

from phems_clinical.data import plausibility
from phems_clinical.data.nonmem import (
    PLAUSIBILITY,
    DataValidationError,
    load_schema,
    read_nonmem,
    to_cohort,
)

HEADER = [
    "ID",
    "TIME",
    "AMT",
    "RATE",
    "DUR",
    "DV",
    "MDV",
    "EVID",
    "BLQ",
    "LLOQ",
    "WT",
    "AGE",
]
#: A valid data set: infusion (RATE -2 + DUR) and bolus, quantified and BLQ
#: levels, an MDV 1 observation (excluded).
BASE = [
    ["1", "0", "2500", "-2", "0.25", ".", "1", "1", "0", ".", "56", "22"],
    ["1", "0.5", "0", ".", ".", "60", "0", "0", "0", "1", "56", "22"],
    ["1", "24", "0", ".", ".", "12", "0", "0", "0", "1", "56", "22"],
    ["1", "48", "0", ".", ".", ".", "0", "0", "1", "1", "56", "22"],
    ["2", "0", "1000", "0", ".", ".", "1", "1", "0", ".", "20", "6"],
    ["2", "4", "0", ".", ".", "40", "0", "0", "0", "1", "20", "6"],
    ["2", "30", "0", ".", ".", ".", "1", "0", "0", "1", "20", "6"],
]
#: Columns whose cells are perturbed (the value columns more often).
TARGETS = st.sampled_from(
    [
        "DV",
        "DV",
        "DV",
        "AMT",
        "AMT",
        "TIME",
        "DUR",
        "ID",
        "MDV",
        "RATE",
        "LLOQ",
        "BLQ",
        "EVID",
        "WT",
        "AGE",
    ]
)
CELLS = st.sampled_from(
    [
        "",
        ".",
        "abc",
        "NaN",
        "nan",
        "inf",
        "-inf",
        "1e999",
        "1e308",
        "-1e308",
        "-5",
        "0",
        "-2",
        "1",
        "2",
        "0.001",
        "600",
        "9" * 30,
        "1e-300",
        "#",
        "C",
        " 3 ",
    ]
)


@st.composite
def csv_texts(draw) -> str:
    """BASE with perturbed cells, and maybe dropped, duplicated, comment, blank or
    short lines."""
    header = list(HEADER)
    rows = [list(r) for r in BASE]
    for _ in range(draw(st.integers(1, 3))):
        r = draw(st.integers(0, len(rows) - 1))
        c = header.index(draw(TARGETS))
        rows[r][c] = draw(CELLS)
    for change in draw(
        st.lists(st.sampled_from(["drop", "duplicate", "lower"]), max_size=2)
    ):
        c = draw(st.integers(0, len(header) - 1))
        if change == "drop":
            del header[c]
            for r in rows:
                del r[c]
        elif change == "duplicate":
            header.append(header[c])
            for r in rows:
                r.append(r[c])
        else:
            header[c] = header[c].lower()
    for change in draw(
        st.lists(st.sampled_from(["comment", "blank", "short"]), max_size=2)
    ):
        c = draw(st.integers(0, len(header) - 1))
        at = draw(st.integers(0, len(rows)))
        line = {
            "comment": ["# note", *rows[0][1:]],
            "blank": [],
            "short": rows[0][: c + 1],
        }[change]
        rows.insert(at, line)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        if r:
            w.writerow(r)
        else:
            buf.write("\n")
    return buf.getvalue()


def _data_rows(text: str) -> list[int]:
    """1-based data rows (header excluded) of the non-blank lines."""
    lines = text.splitlines()
    return [i for i in range(1, len(lines)) if lines[i].strip()]


def _check_refusal(err: DataValidationError) -> None:
    assert err.issues, "an error with nothing named"
    for issue in err.issues:
        assert issue.row > 0 or issue.column, issue
        assert issue.message and issue.message != "None", issue
    assert "problem(s) in PK dataset" in str(err)


def _check_result(data, rows: list[int]) -> None:
    ev = data.events
    # records in = records kept + records excluded, each once
    kept, excluded = list(ev["ROW"]), [e.row for e in data.exclusions]
    assert sorted(kept + excluded) == rows
    obs = ev[ev["EVID"] == 0]
    assert np.isfinite(ev["TIME"]).all() and np.isfinite(ev["AMT"]).all()
    assert np.isfinite(ev["DUR"]).all()
    quant = obs[obs["BLQ"] == 0]["DV"].to_numpy(float)
    assert np.isfinite(quant).all(), "a missing level became a result"
    lo, hi = plausibility.limit("factor_level").error
    assert ((quant >= lo) & (quant <= hi)).all()
    assert (ev["AMT"] <= plausibility.limit("dose_IU").error[1]).all()
    try:
        cohort, _ = to_cohort(data, [c for c in ("WT", "AGE") if c in data.covariates])
    except DataValidationError as err:
        _check_refusal(err)
        return
    for name, arr in cohort._asdict().items():
        a = np.asarray(arr)
        if a.dtype.kind == "f":
            assert np.isfinite(a).all(), name


@given(csv_texts())
@example("ID,TIME,AMT,DV,MDV\n1,0,1000,.,1\n1,4,0,,0\n").via(
    "regression: a missing level was fitted as 0"
)
@example("ID,TIME,AMT,DV\n1,0,1000,.\n,4,0,50\n1,6,0,40\n").via(
    "regression: an empty ID gave 'error: None'"
)
@example("ID,TIME,AMT,MDV\n1,0,1000,1\n1,4,0,0\n").via(
    "regression: no DV column was fitted as levels of 0"
)
def test_any_perturbed_csv_gives_a_clean_result_or_a_named_error(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.csv"
        path.write_text(text)
        try:
            data = read_nonmem(path)
        except DataValidationError as err:
            _check_refusal(err)
            return
    _check_result(data, _data_rows(text))


NUMBERS = st.one_of(
    st.sampled_from([np.nan, None, np.inf, -np.inf, 0.0, 1e308, -2.0, 50.0, pd.NA]),
    st.floats(allow_nan=True, allow_infinity=True),
)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["DV", "DV", "DV", "AMT", "TIME", "DUR", "WT", "ID"]),
            st.integers(0, len(BASE) - 1),
            NUMBERS,
        ),
        min_size=1,
        max_size=3,
    )
)
@example([("DV", 1, None)]).via("regression: a missing level was fitted as 0")
@example([("ID", 2, np.nan)]).via("regression: an empty ID gave 'error: None'")
def test_any_perturbed_dataframe_gives_a_clean_result_or_a_named_error(changes):
    """Frames (the OMOP path) with NaN, None, inf and float extremes in cells."""
    df = pd.DataFrame(
        [[np.nan if v == "." else float(v) for v in r] for r in BASE],
        columns=HEADER,
        dtype=object,
    )
    for col, r, v in changes:
        df.at[r, col] = v
    try:
        data = read_nonmem(df)
    except DataValidationError as err:
        _check_refusal(err)
        return
    _check_result(data, list(range(1, len(df) + 1)))


def test_schema_bounds_equal_the_plausibility_limits():
    """pk_dataset.schema.json and plausibility.json hold the same error range for
    each column checked against a limit in its own unit."""
    props = load_schema()["properties"]
    for col, name in PLAUSIBILITY.items():
        lo, hi = plausibility.limits()[name].error
        assert (props[col].get("minimum"), props[col].get("maximum")) == (lo, hi), col
