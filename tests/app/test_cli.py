"""The ``phems`` command line: simulate -> fit (each method) -> outputs; bad input."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import xarray as xr

from phems_clinical.app.cli import main


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "jivi.csv"
    truth = path.with_name("truth.csv")
    # seed 1: a cohort whose FOCEI fit converges cleanly. Since jivi's validated
    # range starts at 12 y (the licence), seed 3's 24 patients put OMEGA(V1) on
    # its boundary (BFGS "precision loss", refused as not converged)
    rc = main(
        [
            "simulate",
            "--model",
            "jivi",
            "--n",
            "24",
            "--design",
            "rich",
            "--seed",
            "1",
            "--out",
            str(path),
            "--truth",
            str(truth),
        ]
    )
    assert rc == 0
    return path


def test_simulate_writes_nonmem_csv(cohort_csv):
    df = pd.read_csv(cohort_csv)
    assert {
        "ID",
        "TIME",
        "AMT",
        "DV",
        "EVID",
        "MDV",
        "BLQ",
        "LLOQ",
        "WT",
        "LBW",
        "VWF",
    } <= set(df.columns)
    assert df.ID.nunique() == 24
    assert (df.TIME >= 0).all()
    truth = pd.read_csv(cohort_csv.with_name("truth.csv"))
    assert {"CL", "V1", "ETA_CL", "ETA_V1"} <= set(truth.columns)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("focei", []),
        ("svi", ["--steps", "300"]),
        # a NUTS fit must mix (split R-hat < 1.1) to be written: 60 + 60 draws of one
        # chain did not (R-hat 1.15); 300 + 200 give 1.06
        pytest.param(
            "nuts",
            [
                "--chains",
                "1",
                "--warmup",
                "300",
                "--samples",
                "200",
                "--priors",
                "library",
            ],
            marks=pytest.mark.slow,
        ),
    ],
)
def test_fit_each_method_writes_outputs(cohort_csv, tmp_path, method, extra):
    out = tmp_path / method
    rc = main(
        [
            "fit",
            "--data",
            str(cohort_csv),
            "--model",
            "jivi",
            "--method",
            method,
            "--out",
            str(out),
            "--seed",
            "1",
            *extra,
        ]
    )
    assert rc == 0
    est = json.loads((out / "estimates.json").read_text())
    assert est["method"] == method and est["n_subjects"] == 24
    assert {"CL", "V1"} <= set(est["theta"])
    assert "CL,CL" in est["omega"]
    assert len(est["etas"]) == 24 and "ETA_CL" in est["etas"][0]
    if method == "focei":
        assert est["objective"]["ofv"] == pytest.approx(est["objective"]["ofv"])
        assert est["theta"]["CL"]["se"] > 0
        _check_fitted_model(out, est, seed=1)
    else:
        from phems_clinical.pk.spec import load_model

        assert load_model(out / "model.yaml").metadata["fitted"]["method"] == method
        assert "sd" in est["theta"]["CL"]
    ds = xr.open_dataset(out / "estimates.nc", engine="h5netcdf")
    assert "THETA(CL)" in ds.parameter.values
    ds.close()
    for png in ("gof.png", "vpc.png"):
        assert (out / png).stat().st_size > 10_000


def test_fit_names_each_excluded_record(cohort_csv, tmp_path, capsys):
    """A patient with doses only is excluded, and the command says who and why
    (not only a count)."""
    df = pd.read_csv(cohort_csv)
    dose = df[df.EVID == 1].iloc[[0]].assign(ID=999)
    data = tmp_path / "with_dose_only.csv"
    pd.concat([df, dose]).to_csv(data, index=False)
    rc = main(
        [
            "fit",
            "--data",
            str(data),
            "--model",
            "jivi",
            "--method",
            "focei",
            "--out",
            str(tmp_path / "o"),
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.split("\nwrote")[0])["excluded_records"] == 1
    line = next(x for x in captured.err.splitlines() if x.startswith("excluded:"))
    assert "ID 999" in line and f"row {len(df) + 1}" in line


def test_fit_missing_covariate_is_a_clear_error(cohort_csv, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    pd.read_csv(cohort_csv).drop(columns=["VWF"]).to_csv(bad, index=False)
    rc = main(
        [
            "fit",
            "--data",
            str(bad),
            "--model",
            "jivi",
            "--method",
            "focei",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "VWF" in err and "column" in err
    assert not (tmp_path / "o" / "estimates.json").exists()


def test_fit_bad_row_names_row_and_column(cohort_csv, tmp_path, capsys):
    df = pd.read_csv(cohort_csv)
    df["DV"] = df["DV"].astype(object)
    i = df.index[df.EVID == 0][2]
    df.loc[i, "DV"] = "abc"
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    rc = main(
        [
            "fit",
            "--data",
            str(bad),
            "--model",
            "jivi",
            "--method",
            "focei",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert f"row {i + 1}" in err and "DV" in err


def test_unknown_model_and_method(cohort_csv, tmp_path, capsys):
    rc = main(
        [
            "fit",
            "--data",
            str(cohort_csv),
            "--model",
            "nosuchproduct",
            "--method",
            "focei",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2
    assert "nosuchproduct" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                "--data",
                str(cohort_csv),
                "--model",
                "jivi",
                "--method",
                "saem",
                "--out",
                str(tmp_path),
            ]
        )
    assert exc.value.code == 2


def test_products_lists_library(capsys):
    assert main(["products"]) == 0
    out = capsys.readouterr().out
    for name in ("advate", "kovaltry", "eloctate", "jivi", "alprolix"):
        assert f"[id: {name}" in out
    # brand, INN and model; the default; what needs the acknowledgement
    assert "Kovaltry (octocog alfa) \u2014 Garmann 2017  [id: kovaltry, default]" in out
    advate = out.split("[id: advate]")[1].split("[id:")[0]
    assert "UNVERIFIED: fixed_effects, covariates, iiv, iov, residual" in advate
    kovaltry = out.split("[id: kovaltry, default]")[1].split("[id:")[0]
    assert "all model values verified" in kovaltry and "UNVERIFIED" not in kovaltry


def test_products_json_matches_the_library(capsys):
    from phems_clinical.pk.library import list_products

    assert main(["products", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == list(list_products())
    assert sum(r["default"] for r in rows) == 1


def test_console_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "phems_clinical", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "fit" in proc.stdout


def _check_fitted_model(out, est, seed):
    """``model.yaml`` holds the FOCEI estimates and loads back as a prior model."""
    from phems_clinical.pk.library import load_product
    from phems_clinical.pk.spec import load_model

    prior, fitted = load_product("jivi"), load_model(out / "model.yaml")
    assert fitted.name == prior.name and fitted.theta_names == prior.theta_names
    theta = dict(zip(fitted.theta_names, fitted.theta_values.tolist(), strict=True))
    assert est["theta"]  # the free thetas; fixed ones keep the prior's value
    for name, entry in est["theta"].items():
        assert theta[name] == pytest.approx(entry["estimate"], rel=1e-12, abs=0)
    for t, t0 in zip(fitted.thetas, prior.thetas, strict=True):
        if t.fixed:
            assert t.value == t0.value
    ix = {p: k for k, p in enumerate(fitted.iiv_parameters)}
    assert est["omega"]
    for label, entry in est["omega"].items():
        i, j = (ix[p] for p in label.split(","))
        assert fitted.omega[i, j] == pytest.approx(entry["estimate"], rel=1e-12)
        assert fitted.omega[j, i] == fitted.omega[i, j]
    sd = {
        "additive": fitted.residual.additive,
        "proportional": fitted.residual.proportional,
    }
    for label, entry in est["sigma"].items():
        assert sd[label] ** 2 == pytest.approx(entry["estimate"], rel=1e-12)
    assert fitted.omega_structure == prior.omega_structure
    assert fitted.metadata["citation"] == prior.metadata["citation"]
    assert fitted.metadata["vial_sizes_IU"] == prior.metadata["vial_sizes_IU"]
    info = fitted.metadata["fitted"]
    assert info["method"] == "focei" and info["data"].endswith("jivi.csv")
    assert info["n_subjects"] == 24 and info["seed"] == seed
    assert info["n_observations"] == est["n_observations"]
    assert info["ofv"] == pytest.approx(est["objective"]["ofv"], rel=1e-12)
    assert isinstance(info["date"], str) and info["date"][:2] == "20"
