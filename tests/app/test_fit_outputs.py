"""``phems fit`` outputs: a failed fit writes nothing, an earlier folder is never
half-replaced, ``model.yaml`` records convergence."""

import hashlib
import json

import jax
import pytest

from phems_clinical.app import fit as fit_app
from phems_clinical.app.cli import main
from phems_clinical.app.fit import FitFailedError, run_fit
from phems_clinical.outputs import OutputExistsError
from phems_clinical.pk.library import load_product
from phems_clinical.pk.simulate import HospitalSpec, simulate_hospitals
from phems_clinical.pk.spec import load_model
from phems_clinical.resources import configs_dir

FAST = {"covariance": False}
PHENO = "tests/reference/nonmem_pheno/pheno.dta"


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    events, _ = simulate_hospitals(
        jax.random.key(1),
        load_product("advate"),
        [HospitalSpec("H1", 4, design="rich")],
    )
    path = tmp_path_factory.mktemp("fitout") / "advate.csv"
    events.to_csv(path, index=False)
    return path


def _extreme_dv(monkeypatch):
    """The reader passes a DV of 1e308 (as if its plausibility limit were absent)."""
    real = fit_app.read_nonmem

    def read(*a, **kw):
        data = real(*a, **kw)
        ev = data.events.copy()
        i = ev.index[(ev["EVID"] == 0) & (ev["ID"] == ev["ID"].iloc[-1])][0]
        ev.loc[i, "DV"] = 1e308
        return data._replace(events=ev)

    monkeypatch.setattr(fit_app, "read_nonmem", read)


def _snapshot(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _old_results(folder):
    folder.mkdir()
    (folder / "model.yaml").write_text("# an earlier fit\n")
    (folder / "estimates.json").write_text('{"earlier": true}\n')
    return _snapshot(folder)


def test_success_records_convergence_and_replaces_the_folder_whole(tmp_path):
    """Phenobarbital (one compartment, 12 BFGS iterations): the quickest real fit."""
    from pathlib import Path

    out = tmp_path / "fit"
    _old_results(out)
    (out / "stale.png").write_bytes(b"x")
    res = run_fit(
        Path(__file__).parents[2] / PHENO,
        str(configs_dir() / "model" / "pheno.yaml"),
        "focei",
        out,
        options={**FAST, "dv_unit": None},
        n_vpc=20,
        overwrite=True,
    )
    assert res["run"]["converged"] is True
    fitted = load_model(out / "model.yaml").metadata["fitted"]
    assert fitted["converged"] is True and fitted["method"] == "focei"
    assert fitted["ofv"] == pytest.approx(586.276, abs=0.01)  # NONMEM's, see test_focei
    assert sorted(p.name for p in out.iterdir()) == [
        "estimates.json",
        "estimates.nc",
        "gof.png",
        "model.yaml",
        "vpc.png",
    ]
    json.loads(
        (out / "estimates.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"{c} in estimates.json"),
    )
    assert [p.name for p in tmp_path.iterdir()] == ["fit"]  # no staging left


def test_failed_fit_leaves_the_old_folder_byte_identical(csv, tmp_path, monkeypatch):
    _extreme_dv(monkeypatch)
    out = tmp_path / "fit"
    before = _old_results(out)
    with pytest.raises(FitFailedError) as err:
        run_fit(csv, "advate", "focei", out, options=FAST, n_vpc=20, overwrite=True)
    msg = str(err.value)
    assert "not finite at the start values" in msg
    assert "column DV" in msg and "row " in msg and "Nothing was written" in msg
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["fit"]


def test_failed_fit_cli_exits_2_and_writes_nothing(csv, tmp_path, monkeypatch, capsys):
    _extreme_dv(monkeypatch)
    out = tmp_path / "new"
    assert (
        main(
            [
                "fit",
                "--data",
                str(csv),
                "--model",
                "advate",
                "--method",
                "focei",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "phems fit: error: --data: the FOCEI fit failed" in err
    assert "column DV" in err
    assert not out.exists()


def test_non_empty_out_is_refused_before_any_work(csv, tmp_path, monkeypatch):
    out = tmp_path / "fit"
    before = _old_results(out)

    def no_work(*a, **kw):
        raise AssertionError("the data were read before --out was checked")

    monkeypatch.setattr(fit_app, "read_nonmem", no_work)
    with pytest.raises(OutputExistsError, match="--out"):
        run_fit(csv, "advate", "focei", out)
    assert _snapshot(out) == before


def test_failed_svi_start_is_a_fit_failure(csv, tmp_path, monkeypatch):
    _extreme_dv(monkeypatch)
    with pytest.raises(FitFailedError, match="SVI fit failed.*column DV"):
        run_fit(
            csv,
            "advate",
            "svi",
            tmp_path / "svi",
            options={"num_steps": 5, "warm_start": False},
        )
    assert not (tmp_path / "svi").exists()


def test_start_values_that_overflow_name_the_model(csv, tmp_path):
    """Plausible data, a model whose CL start (1e300 dL/h) overflows the
    objective: the fit stops at once and the message points at --model."""
    import yaml

    from phems_clinical.pk.spec import to_spec

    spec = to_spec(load_product("advate"))
    spec["parameters"]["CL"]["value"] = 1e300
    spec["parameters"]["CL"].pop("upper", None)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(
        FitFailedError,
        match=r"^--model: .*not finite at the start "
        r"values .*initial estimates",
    ):
        run_fit(csv, str(tmp_path / "m.yaml"), "focei", tmp_path / "fit", options=FAST)
    assert not (tmp_path / "fit").exists()


def test_a_failed_fit_names_the_unusual_values_the_reader_accepted(
    csv, tmp_path, monkeypatch
):
    """Warnings the reader gave (here an unusual 350 IU/dL level) travel with the
    failure message: a failed fit names its suspects even when every value is
    within the error limits."""
    from phems_clinical.data.nonmem import Issue

    real = fit_app.read_nonmem

    def read(*a, **kw):
        return real(*a, **kw)._replace(
            warnings=(Issue(7, "1", "DV", "350 IU/dL is unusual"),)
        )

    monkeypatch.setattr(fit_app, "read_nonmem", read)
    real_fit = fit_app.fit_focei

    def fails(*a, **kw):
        res = real_fit(*a, **kw)
        return res._replace(converged=False, ofv=float("nan"), message="stopped")

    monkeypatch.setattr(fit_app, "fit_focei", fails)
    with pytest.raises(
        FitFailedError,
        match=r"1 data warning\(s\): row 7, column "
        r"DV: 350 IU/dL is unusual",
    ):
        run_fit(csv, "advate", "focei", tmp_path / "o", options=FAST, n_vpc=20)
    assert not (tmp_path / "o").exists()


def test_a_sampler_that_did_not_mix_names_the_sampler_options(csv):
    """A NUTS fit refused for R-hat or divergences points at the sampler's
    options, not at the data (whose values are plausible)."""
    data = fit_app.read_nonmem(csv)
    ids = sorted(data.events["ID"].unique())
    msg = fit_app._failure(
        "nuts",
        "split R-hat >= 1.1 for THETA(V1) (largest "
        "1.3); run more warm-up/samples or chains",
        data,
        ids,
        (),
    )
    assert msg.startswith("--warmup/--samples/--chains: the NUTS fit failed")
    msg = fit_app._failure(
        "focei", "objective not finite at the start values", data, ids, ()
    )
    assert msg.startswith("--model: the FOCEI fit failed")
