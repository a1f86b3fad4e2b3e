"""``phems anonymise`` / ``phems synthesize``: a site's OMOP database or CSV extract
in, the derived dataset and its scorecard out; bad input exits 2 naming the field."""

import json

import jax
import pandas as pd
import pytest
import xarray as xr

from phems_clinical.app.cli import main
from phems_clinical.pk.library import load_product
from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort


@pytest.fixture(scope="module")
def cardiac_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("omop_cardiac")
    assert (
        main(
            [
                "omop",
                "simulate",
                "--use-case",
                "cardiac",
                "--n",
                "150",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def picu_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("omop_picu")
    assert (
        main(
            ["omop", "simulate", "--use-case", "picu", "--n", "120", "--out", str(out)]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def pk_csv(tmp_path_factory):
    ev, _ = simulate_cohort(
        jax.random.key(2), load_product("advate"), HospitalSpec("h", 40)
    )
    path = tmp_path_factory.mktemp("pk") / "site_x.csv"
    ev.to_csv(path, index=False)
    return path


def _strict_json(path):
    def bad(c):
        raise ValueError(f"non-JSON constant {c}")

    return json.loads(path.read_text(), parse_constant=bad)


def test_anonymise_cardiac_site(cardiac_dir, tmp_path, capsys):
    out = tmp_path / "anon"
    assert (
        main(
            [
                "anonymise",
                "--use-case",
                "cardiac",
                "--omop",
                str(cardiac_dir),
                "--site",
                "hospital_a",
                "--k",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    site = out / "hospital_a"
    data = pd.read_csv(site / "cardiac_anonymised.csv")
    bands = ["age_days_band", "sex_band", "weight_kg_band"]
    assert data.groupby("person_id")[bands].first().value_counts().min() >= 5
    ds = xr.open_dataset(site / "scorecard.nc", engine="h5netcdf")
    assert list(ds.source.values) == ["real", "anonymised"]
    assert float(ds["value"].sel(source="anonymised", metric="k_anonymity")) >= 5
    html = (site / "scorecard.html").read_text()
    assert "k-anonymity" in html.lower() and "anonymised" in html
    rep = _strict_json(site / "report.json")
    assert rep["sources"]["anonymised"]["report"]["k"] >= 5
    assert rep["patients_train"] + rep["patients_holdout"] == rep["load"]["episodes"]
    assert "cardiac_anonymised.csv" in capsys.readouterr().out


def test_synthesize_picu_sequences_and_mst(picu_dir, tmp_path):
    out = tmp_path / "syn"
    assert (
        main(
            [
                "synthesize",
                "--use-case",
                "picu",
                "--omop",
                str(picu_dir),
                "--site",
                "tertiary",
                "--out",
                str(out),
                "--attacks",
                "50",
            ]
        )
        == 0
    )
    syn = pd.read_csv(out / "tertiary" / "picu_synthetic.csv")
    assert (
        syn.groupby("stay_id")["hour"].agg(lambda h: (h.diff().dropna() == 1).all())
    ).all()
    mst = [
        "synthesize",
        "--use-case",
        "picu",
        "--omop",
        str(picu_dir),
        "--site",
        "tertiary",
        "--generator",
        "mst",
        "--epsilon",
        "2",
        "--out",
        str(out),
        "--attacks",
        "50",
        "--no-utility",
    ]
    before = (out / "tertiary" / "report.json").read_bytes()
    assert main(mst) == 2  # an earlier result is never replaced silently
    assert (out / "tertiary" / "report.json").read_bytes() == before
    assert main([*mst, "--overwrite"]) == 0
    # replaced as a whole: nothing of the first run survives beside the new files
    assert not (out / "tertiary" / "picu_synthetic.csv").exists()
    ds = xr.open_dataset(out / "tertiary" / "scorecard.nc", engine="h5netcdf")
    assert float(ds["epsilon"].sel(source="synthetic-mst")) == 2.0
    assert "2" in (out / "tertiary" / "scorecard.html").read_text()


def test_synthesize_pk_virtual_from_csv(pk_csv, tmp_path):
    out = tmp_path / "pk"
    assert (
        main(
            [
                "synthesize",
                "--use-case",
                "haemophilia",
                "--csv",
                str(pk_csv),
                "--out",
                str(out),
                "--no-utility",
                "--attacks",
                "20",
            ]
        )
        == 0
    )
    syn = pd.read_csv(out / "site_x" / "haemophilia_synthetic.csv")
    assert set(syn["ID"]).isdisjoint(set(pd.read_csv(pk_csv)["ID"].astype(str)))
    assert {"TIME", "DV", "AMT", "WT", "AGE"} <= set(syn.columns)


@pytest.mark.parametrize(
    "args, message",
    [
        (["anonymise", "--k", "500"], "k=500 is impossible"),
        (["synthesize", "--generator", "mst", "--epsilon", "0"], "--epsilon"),
        (["synthesize", "--generator", "sequence"], "does not apply to cardiac"),
    ],
)
def test_bad_options_exit_2(cardiac_dir, tmp_path, capsys, args, message):
    cmd = [
        args[0],
        "--use-case",
        "cardiac",
        "--omop",
        str(cardiac_dir),
        "--site",
        "hospital_a",
        "--out",
        str(tmp_path / "o"),
        *args[1:],
    ]
    assert main(cmd) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no staging left


def test_non_empty_out_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "earlier.csv").write_text("x\n1\n")
    assert (
        main(
            [
                "anonymise",
                "--use-case",
                "cardiac",
                "--omop",
                str(tmp_path / "missing"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--out" in err and "--overwrite" in err and "missing" not in err


def test_bad_input_files_exit_2(pk_csv, tmp_path, capsys):
    ev = pd.read_csv(pk_csv)
    out = tmp_path / "o"
    no_wt = tmp_path / "no_wt.csv"
    ev.drop(columns="WT").to_csv(no_wt, index=False)
    assert (
        main(
            [
                "anonymise",
                "--use-case",
                "haemophilia",
                "--csv",
                str(no_wt),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "WT" in capsys.readouterr().err
    neg = tmp_path / "neg_age.csv"
    ev.assign(AGE=ev["AGE"].where(ev["ID"] != ev["ID"].iloc[0], -2.0)).to_csv(
        neg, index=False
    )
    assert (
        main(
            [
                "anonymise",
                "--use-case",
                "haemophilia",
                "--csv",
                str(neg),
                "--out",
                str(out),
                "--no-utility",
            ]
        )
        == 2
    )
    assert "AGE" in capsys.readouterr().err
    tiny = tmp_path / "tiny.csv"
    ev[ev["ID"].isin(ev["ID"].unique()[:3])].to_csv(tiny, index=False)
    assert (
        main(
            [
                "synthesize",
                "--use-case",
                "haemophilia",
                "--csv",
                str(tiny),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "3 patients" in capsys.readouterr().err
    assert (
        main(
            [
                "anonymise",
                "--use-case",
                "cardiac",
                "--omop",
                str(tmp_path / "missing"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert not out.exists()
