"""The haemophilia experiment pipeline (runner.pipeline): every source derived at
every training site, fitted federatedly, forecast-scored on held-out real patients
and on the held-out hospital; the same seed gives the same results.nc."""

import jax
import pytest
import xarray as xr

from phems_clinical.evaluation.sources import SourceSpec
from phems_clinical.pk.library import load_product
from phems_clinical.pk.simulate import HospitalSpec, simulate_hospitals
from phems_clinical.runner.pipeline import run_haemophilia, to_dataset

SOURCES = [SourceSpec("real", "real"),
           SourceSpec("anonymised", "anonymised", "lattice",
                      {"k": 4, "max_suppression": 0.1})]


@pytest.fixture(scope="module")
def setup():
    model = load_product("advate")
    ev, _ = simulate_hospitals(jax.random.key(1), model,
                               [HospitalSpec(f"H{i}", 24) for i in (1, 2, 3)])
    sites = {s: d.drop(columns="SITE").reset_index(drop=True)
             for s, d in ev.groupby("SITE")}
    return model, sites


@pytest.fixture(scope="module")
def result(setup):
    model, sites = setup
    runs = run_haemophilia(jax.random.key(7), sites, model, SOURCES,
                           holdout_site="H3", progress=None, n_attacks=20)
    return runs, to_dataset(runs, seed=7)


def test_results_dataset_has_sources_sites_metrics(result):
    runs, ds = result
    assert list(ds.source.values) == ["real", "anonymised"]
    assert list(ds.site.values) == ["H1", "H2", "H3"]
    assert ds.forecast.sel(forecast_metric="mdape").notnull().all()
    assert "THETA(CL)" in ds.parameter.values
    assert bool(ds.converged.sel(source="real"))
    # the real source's scorecard row is the verbatim-release reference
    assert float(ds.scorecard.sel(source="real", metric="singling_out_risk")
                 .max()) > 0.5
    k = ds.scorecard.sel(source="anonymised", metric="k_anonymity")
    assert (k >= 4).all()
    # CL near the simulating model's value (2-site federated fit on 24 patients)
    cl = float(ds.estimate.sel(source="real", parameter="THETA(CL)"))
    assert 0.5 < cl / 1.93 < 2.0


def test_same_seed_same_results(setup, result):
    model, sites = setup
    again = run_haemophilia(jax.random.key(7), sites, model, SOURCES,
                            holdout_site="H3", progress=None, n_attacks=20)
    xr.testing.assert_identical(to_dataset(again, seed=7), result[1])


def test_bad_source_fails_before_training(setup):
    model, sites = setup
    with pytest.raises(ValueError, match="k=50 is impossible"):
        run_haemophilia(jax.random.key(0), sites, model,
                        [SourceSpec("a", "anonymised", "lattice", {"k": 50})],
                        holdout_site="H3", progress=None)
    with pytest.raises(ValueError, match="holdout_site"):
        run_haemophilia(jax.random.key(0), sites, model, SOURCES,
                        holdout_site="H9", progress=None)


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_results(setup, result, tmp_path):
    model, sites = setup
    seen = []

    def stop_mid_second_source(msg):
        seen.append(msg)
        if msg.startswith("anonymised: round 10"):
            raise _Stop  # as if the machine went down mid-fit

    with pytest.raises(_Stop):
        run_haemophilia(jax.random.key(7), sites, model, SOURCES, holdout_site="H3",
                        progress=stop_mid_second_source, n_attacks=20,
                        checkpoint_dir=tmp_path)
    assert (tmp_path / "real" / "done.json").exists()
    assert not (tmp_path / "anonymised" / "done.json").exists()
    assert any((tmp_path / "anonymised" / "federated").iterdir())  # mid-fit state
    again = []
    runs = run_haemophilia(jax.random.key(7), sites, model, SOURCES,
                           holdout_site="H3", progress=again.append, n_attacks=20,
                           checkpoint_dir=tmp_path)
    assert any(m.startswith("real: finished in an earlier run") for m in again)
    xr.testing.assert_identical(to_dataset(runs, seed=7), result[1])
