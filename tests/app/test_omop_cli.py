"""``phems omop simulate|check`` and the PK commands reading OMOP databases: the
simulated hospitals land in one DuckDB file each, the loaders report what they
exclude, and a federated fit from OMOP equals the fit from the same cohort's CSV."""

import json
import shutil

import duckdb
import pytest

from phems_clinical.app.cli import main


@pytest.fixture(scope="module")
def picu_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("omop_picu")
    assert (
        main(
            [
                "omop",
                "simulate",
                "--use-case",
                "picu",
                "--n",
                "6",
                "--seed",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_simulate_writes_one_database_per_site(picu_dir):
    dbs = sorted(p.stem for p in picu_dir.glob("*.duckdb"))
    assert dbs == ["district", "surgical", "tertiary"]
    with duckdb.connect(str(picu_dir / "tertiary.duckdb"), read_only=True) as con:
        assert con.execute("select count(*) from visit_detail").fetchone()[0] == 6
        assert con.execute("select count(*) from measurement").fetchone()[0] > 500
    assert (picu_dir / "tertiary.truth.csv").exists()


def test_check_reports_each_excluded_record(picu_dir, tmp_path, capsys):
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes((picu_dir / "surgical.duckdb").read_bytes())
    with duckdb.connect(str(bad)) as con:
        hr = con.execute(
            "select measurement_id from measurement where "
            "measurement_concept_id = 3027018 limit 2"
        ).fetchall()
        con.execute(
            "update measurement set value_as_number = 0 where "
            f"measurement_id = {hr[0][0]}"
        )
        con.execute(
            "update measurement set measurement_concept_id = 999 where "
            f"measurement_id = {hr[1][0]}"
        )
    assert main(["omop", "check", str(bad), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "measurement:" in out and "excluded 2" in out
    rows = (tmp_path / "rep" / "bad.exclusions.csv").read_text().splitlines()
    assert len(rows) == 3  # header + the two records
    assert {str(hr[0][0]), str(hr[1][0])} <= {r.split(",")[1] for r in rows[1:]}


def test_missing_column_and_missing_database_exit_2(picu_dir, tmp_path, capsys):
    bad = tmp_path / "nocol.duckdb"
    bad.write_bytes((picu_dir / "district.duckdb").read_bytes())
    with duckdb.connect(str(bad)) as con:
        con.execute("alter table measurement drop column measurement_datetime")
    assert main(["omop", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "measurement" in err and "measurement_datetime" in err
    assert main(["omop", "check", str(tmp_path / "none.duckdb")]) == 2
    assert "no such OMOP database" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(
            [
                "fit",
                "--data",
                str(empty),
                "--model",
                "advate",
                "--method",
                "focei",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    # the option is named, not only the folder
    assert (
        "error: --data: no <site>.duckdb files in this folder"
        in capsys.readouterr().err
    )


def test_federate_from_omop_equals_federate_from_csv(tmp_path):
    """The same 24 Advate patients (``phems simulate --n 24 --seed 7``) as a CSV and
    as three OMOP databases give the same federated FOCEI rounds; DuckDB keeps
    levels to 3 decimals (NUMERIC = DECIMAL(18,3)), hence rtol 1e-4."""
    csv = tmp_path / "cohort.csv"
    assert (
        main(
            [
                "simulate",
                "--model",
                "advate",
                "--n",
                "24",
                "--design",
                "hospitals",
                "--seed",
                "7",
                "--out",
                str(csv),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "omop",
                "simulate",
                "--use-case",
                "haemophilia",
                "--n",
                "8",
                "--seed",
                "7",
                "--out",
                str(tmp_path / "omop"),
            ]
        )
        == 0
    )
    res = {}
    for name, data in (("csv", csv), ("omop", tmp_path / "omop")):
        assert (
            main(
                [
                    "federate",
                    "--data",
                    str(data),
                    "--model",
                    "advate",
                    "--out",
                    str(tmp_path / f"fed_{name}"),
                    "--rounds",
                    "3",
                    # the BFGS server: its first rounds are short steps, so the
                    # data's 3-decimal rounding stays below rtol; a Newton step
                    # lands near the optimum, where it is amplified (~1e-3)
                    "--options",
                    '{"hessian": "bfgs"}',
                ]
            )
            == 0
        )
        res[name] = json.loads((tmp_path / f"fed_{name}" / "result.json").read_text())
    assert {s["name"] for s in res["omop"]["sites"]} == {
        s["name"] for s in res["csv"]["sites"]
    }
    assert res["omop"]["omop_load"]["adult"]["excluded"] == []
    for k, v in res["csv"]["estimates"].items():
        assert res["omop"]["estimates"][k]["estimate"] == pytest.approx(
            v["estimate"], rel=1e-4
        ), k


def test_simulate_never_replaces_existing_databases(picu_dir, tmp_path, capsys):
    """A non-empty --out is refused before anything is simulated; --overwrite
    replaces the folder as a whole (no stale file of the earlier run)."""
    before = {p.name: p.read_bytes() for p in picu_dir.iterdir()}
    assert (
        main(
            [
                "omop",
                "simulate",
                "--use-case",
                "picu",
                "--n",
                "6",
                "--seed",
                "4",
                "--out",
                str(picu_dir),
            ]
        )
        == 2
    )
    assert "--out" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in picu_dir.iterdir()} == before
    out = tmp_path / "sites"
    shutil.copytree(picu_dir, out)
    (out / "stale.duckdb").write_bytes(b"x")
    assert (
        main(
            [
                "omop",
                "simulate",
                "--use-case",
                "picu",
                "--n",
                "3",
                "--seed",
                "4",
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("*.duckdb")) == [
        "district.duckdb",
        "surgical.duckdb",
        "tertiary.duckdb",
    ]
    assert (out / "tertiary.duckdb").read_bytes() != before["tertiary.duckdb"]


@pytest.mark.parametrize("damage", ["empty", "truncated", "view"])
def test_check_refuses_bad_database_files_by_name(picu_dir, tmp_path, capsys, damage):
    bad = tmp_path / "bad.duckdb"
    data = (picu_dir / "district.duckdb").read_bytes()
    bad.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "view": data}[damage]
    )
    if damage == "view":
        (tmp_path / "x.csv").write_text("a\n1\n")
        with duckdb.connect(str(bad)) as con:
            con.execute("drop table death")
            con.execute(
                f"create view death as select * from read_csv('{tmp_path / 'x.csv'}')"
            )
    assert main(["omop", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("death" in err and "view" in err) if damage == "view" else str(bad) in err


def test_check_reports_missing_values_and_implausible_birth_years(
    picu_dir, tmp_path, capsys
):
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes((picu_dir / "tertiary.duckdb").read_bytes())
    with duckdb.connect(str(bad)) as con:
        mid = con.execute(
            "select min(measurement_id) from measurement where "
            "measurement_concept_id = 3027018 and person_id > "
            "(select min(person_id) from person)"
        ).fetchone()[0]
        con.execute(
            f"update measurement set value_as_number = NULL where "
            f"measurement_id = {mid}"
        )
        con.execute(
            "update person set year_of_birth = 2999 where person_id = "
            "(select min(person_id) from person)"
        )
    assert main(["omop", "check", str(bad)]) == 0
    out = capsys.readouterr().out
    assert "missing_value: 1 (DQD measureValueCompleteness; value_as_number 1)" in out
    assert "implausible_value: 1 (DQD plausibleValueLow/High; year_of_birth 1)" in out
    assert "NULL value_as_number: 1 of" in out and "2999" not in out
