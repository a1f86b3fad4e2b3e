"""Property-based tests of the OMOP loaders: a small DuckDB site with
NULLs and out-of-range values in the fields the PK path reads gives either NONMEM
events whose levels are all numbers (NaN only on BLQ rows) with every record kept
or reported, or an error naming the table/field or row; never another exception."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from test_omop_hardening import EVENTS  # tests/data is on sys.path (rootdir)

from phems_clinical.app.omop import PK_TABLES, load_site
from phems_clinical.data.nonmem import DataValidationError, read_nonmem
from phems_clinical.data.omop import (
    REASONS,
    connect,
    create_cdm,
    omop_to_pk,
    pk_to_omop,
    write_tables,
)
from phems_clinical.data.omop import concepts as C

LEVEL = C.MEASUREMENT["fviii_activity"]
#: (table, column, SQL value) perturbations of the fields the PK path reads.
CHANGES = {
    "measurement": [
        ("value_as_number", v) for v in ("NULL", "-1", "0", "350", "600", "1e9")
    ]
    + [
        ("measurement_datetime", v)
        for v in ("NULL", "TIMESTAMP '1850-01-01'", "TIMESTAMP '2999-01-01'")
    ]
    + [("operator_concept_id", v) for v in ("NULL", str(C.OPERATOR["<"]))],
    "drug_exposure": [("quantity", v) for v in ("NULL", "0", "-5", "20000", "1e7")]
    + [
        ("drug_exposure_end_datetime", v)
        for v in (
            "NULL",
            "drug_exposure_start_datetime - INTERVAL 1 HOUR",
            "drug_exposure_start_datetime + INTERVAL 60 DAY",
        )
    ]
    + [("drug_exposure_start_datetime", "NULL")],
    "person": [("year_of_birth", v) for v in ("1800", "2999", "2030")]
    + [("birth_datetime", v) for v in ("NULL", "TIMESTAMP '2999-01-01'")],
}
PERTURBATION = st.sampled_from(sorted(CHANGES)).flatmap(
    lambda t: st.tuples(st.just(t), st.sampled_from(CHANGES[t]), st.integers(1, 8))
)


@pytest.fixture(scope="module")
def base_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("omop_props") / "site.duckdb"
    with connect(path) as s:
        create_cdm(s)
        write_tables(s, pk_to_omop(EVENTS, product="Advate", site="a"))
    return path


def _perturb(path: Path, changes) -> None:
    keys = {
        "measurement": "measurement_id",
        "drug_exposure": "drug_exposure_id",
        "person": "person_id",
    }
    with duckdb.connect(str(path)) as con:
        for table, (column, value), k in changes:
            key = keys[table]
            ids = [
                r[0]
                for r in con.execute(
                    f"SELECT {key} FROM {table} ORDER BY {key}"
                ).fetchall()
            ]
            try:
                con.execute(
                    f"UPDATE {table} SET {column} = {value} WHERE {key} = "
                    f"{ids[(k - 1) % len(ids)]}"
                )
            except duckdb.ConstraintException:
                pass  # a NOT NULL column: the database itself refuses the NULL


def _check_named(err: Exception) -> None:
    if isinstance(err, DataValidationError):
        assert err.issues and all(i.row > 0 or i.column for i in err.issues)
    else:
        text = str(err)
        assert any(t in text for t in PK_TABLES), text


@given(st.lists(PERTURBATION, min_size=1, max_size=3))
@example([("measurement", ("value_as_number", "NULL"), 2)]).via(
    "regression: a NULL level was fitted as 0"
)
@example([("person", ("year_of_birth", "2999"), 1)]).via(
    "regression: omop check missed birth year 2999"
)
@example([("drug_exposure", ("quantity", "9999999"), 1)]).via(
    "regression: omop check missed a 9,999,999 IU dose"
)
def test_perturbed_site_gives_events_or_a_named_error(base_db, changes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "site.duckdb"
        shutil.copy(base_db, path)
        _perturb(path, changes)
        try:
            tables, report = load_site(str(path), PK_TABLES)
        except ValueError as err:  # e.g. a date pandas cannot hold, by table
            _check_named(err)
            return
    # records in = records kept + records excluded, table by table
    ex = report.exclusions
    assert set(ex["reason"]) <= set(REASONS)
    for t, n in report.n_input.items():
        assert n == report.n_kept[t] + int((ex["table"] == t).sum()), t
    try:
        events = omop_to_pk(tables)
        untimed = events.attrs.pop("exclusions")
        data = read_nonmem(events, required_covariates=["WT"])
    except (DataValidationError, ValueError) as err:
        _check_named(err)
        return
    # every kept level is an event row or reported (untimed, or read_nonmem's)
    me = tables["measurement"]
    n_levels = int((me["measurement_concept_id"] == LEVEL).sum())
    n_obs = int((events["EVID"] == 0).sum())
    assert n_obs + len(untimed) == n_levels
    assert len(data.events) + len(data.exclusions) == len(events)
    obs = data.events[data.events["EVID"] == 0]
    dv = obs.loc[obs["BLQ"] == 0, "DV"].to_numpy(float)
    assert np.isfinite(dv).all(), "a missing level became a result"
    assert np.isfinite(data.events["TIME"]).all()
    assert (data.events.loc[data.events["EVID"] == 1, "AMT"] > 0).all()
