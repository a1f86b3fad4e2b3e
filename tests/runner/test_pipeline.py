"""The experiment pipeline (runner.pipeline): every source derived at every
training site, scored side by side, fitted federatedly and scored on held-out real
patients and the held-out hospital; the same seed gives the same results.nc; an
interrupted run resumes to identical results."""

import jax
import numpy as np
import pytest
import xarray as xr

from phems_clinical import usecases
from phems_clinical.evaluation.scorecard import Score, pooled_risk
from phems_clinical.evaluation.sources import SourceSpec
from phems_clinical.pk.library import load_product
from phems_clinical.pk.simulate import HospitalSpec, simulate_hospitals
from phems_clinical.runner.pipeline import run_pipeline
from phems_clinical.runner.results import to_dataset
from phems_clinical.runner.training import DPTarget, FederationSettings

SOURCES = [
    SourceSpec("real", "real"),
    SourceSpec("anonymised", "anonymised", "lattice", {"k": 4, "max_suppression": 0.1}),
]
TASK = usecases.get("haemophilia").task


@pytest.fixture(scope="module")
def setup():
    model = load_product("advate")
    ev, _ = simulate_hospitals(
        jax.random.key(1), model, [HospitalSpec(f"H{i}", 24) for i in (1, 2, 3)]
    )
    sites = {
        s: d.drop(columns="SITE").reset_index(drop=True) for s, d in ev.groupby("SITE")
    }
    return model, sites


def _run(setup, key=7, sources=SOURCES, **kw):
    model, sites = setup
    kw = {"holdout_site": "H3", "progress": None, "n_attacks": 20, **kw}
    run = run_pipeline(jax.random.key(key), TASK, sites, model, sources, **kw)
    return run, to_dataset(run, TASK, sources, seed=key)


@pytest.fixture(scope="module")
def result(setup):
    return _run(setup)


def test_results_dataset_has_sources_sites_metrics(result):
    run, ds = result
    ds = ds.isel(seed=0)
    assert list(ds.source.values) == ["real", "anonymised"]
    assert list(ds.site.values) == ["H1", "H2", "H3"]
    assert list(ds.site_role.values) == ["held-out patients"] * 2 + [
        "held-out hospital"
    ]
    assert ds.utility.sel(utility_metric="mdape").notnull().all()
    assert "THETA(CL)" in ds.parameter.values
    assert bool(ds.converged.sel(source="real"))
    # the default federated FOCEI server (exact Newton) gives R-based SEs
    se = ds.estimate_se.sel(source="real")
    assert bool(np.isfinite(se).all()) and bool((se > 0).all())
    assert np.isnan(ds.train_epsilon).all()  # not DP
    # one scorecard per site with both sources; the real row is the verbatim
    # release, the anonymised one is k-anonymous
    assert set(run.scorecards) == {"H1", "H2"}
    assert list(run.scorecards["H1"].source.values) == ["real", "anonymised"]
    assert (
        float(ds.scorecard.sel(source="real", metric="singling_out_risk").max()) > 0.5
    )
    assert (ds.scorecard.sel(source="anonymised", metric="k_anonymity") >= 4).all()
    # CL near the simulating model's value (2-site federated fit on 24 patients)
    cl = float(ds.estimate.sel(source="real", parameter="THETA(CL)"))
    assert 0.5 < cl / 1.93 < 2.0


def test_same_seed_same_results(setup, result):
    xr.testing.assert_identical(_run(setup)[1], result[1])


def test_pooled_engine_equals_federated_focei(setup, result):
    """Federated FOCEI sums the sites' exact objective terms, so it reaches the
    pooled FOCEI estimate: the pooled engine (every patient at one site) agrees."""
    _, pooled = _run(
        setup, sources=SOURCES[:1], federation=FederationSettings(engine="pooled")
    )
    fed = result[1].estimate.sel(source="real")
    np.testing.assert_allclose(
        pooled.estimate.sel(source="real").values, fed.values, rtol=2e-3
    )


def test_bad_input_fails_before_training(setup):
    with pytest.raises(ValueError, match="k=50 is impossible"):
        _run(setup, sources=[SourceSpec("a", "anonymised", "lattice", {"k": 50})])
    with pytest.raises(ValueError, match="holdout_site"):
        _run(setup, holdout_site="H9")
    with pytest.raises(ValueError, match="federation.dp.*fed_focei"):
        _run(setup, federation=FederationSettings(dp=DPTarget(epsilon=1.0)))
    with pytest.raises(ValueError, match="federation.engine"):
        _run(setup, federation=FederationSettings(engine="grpc"))
    with pytest.raises(ValueError, match="profile row per patient"):
        _run(setup, sources=[SourceSpec("m", "synthetic", "mst", {"epsilon": 1})])


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_results(setup, result, tmp_path):
    def stop_mid_second_source(ev):
        if (ev.task, ev.done) == ("rounds", 10) and ev.label.startswith(
            "anonymised (inprocess, fed_focei)"
        ):
            raise _Stop  # as if the machine went down mid-fit

    with pytest.raises(_Stop):
        _run(setup, progress=stop_mid_second_source, checkpoint_dir=tmp_path)
    assert (tmp_path / "real" / "done.json").exists()
    assert not (tmp_path / "anonymised" / "done.json").exists()
    assert any((tmp_path / "anonymised" / "federated").iterdir())  # mid-fit state
    events = []
    run, ds = _run(setup, progress=events.append, checkpoint_dir=tmp_path)
    again = [ev.label for ev in events if ev.kind == "note"]
    assert any(m.startswith("real: finished in an earlier run") for m in again)
    # a finished source is not derived again (its scorecards are saved)
    assert not any(m.startswith("derived real") for m in again)
    assert any(m.startswith("derived anonymised") for m in again)
    xr.testing.assert_identical(ds, result[1])


def test_a_damaged_step_checkpoint_is_an_error_naming_it(setup, tmp_path):
    """A half-written marker or scorecard (as after a kill on a file system
    without atomic rename) is refused by name, never resumed from or rerun
    silently."""
    from phems_clinical.federation.engine import CheckpointError

    real = SOURCES[:1]
    _run(setup, sources=real, checkpoint_dir=tmp_path)
    card = tmp_path / "scorecards" / "H1.nc"
    assert card.exists() and not list(tmp_path.rglob("*.partial-*"))
    good = card.read_bytes()
    card.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="H1.nc"):
        _run(setup, sources=real, checkpoint_dir=tmp_path)
    card.write_bytes(good)
    done = tmp_path / "real" / "done.json"
    done.write_text(done.read_text()[:40])
    with pytest.raises(CheckpointError, match="done.json"):
        _run(setup, sources=real, checkpoint_dir=tmp_path)


def test_report_scorecard_takes_the_worst_site_and_the_held_out_hospital(result):
    """report.html's scorecard: attack risks pooled over the training sites (the
    anonymeter risk of the summed counts), other privacy checks at the worst site
    (smallest k), fidelity averaged, utility at the held-out hospital, all read back
    from the per-site scorecards and results.nc."""
    from phems_clinical.runner.report import combined_scorecard

    run, ds = result
    card = combined_scorecard(ds, run.scorecards, "haemophilia", 7)
    per_site = [c["value"].sel(source="anonymised") for c in run.scorecards.values()]

    def at(name):
        return float(card["value"].sel(source="anonymised", metric=name))

    risk = [float(v.sel(metric="singling_out_risk")) for v in per_site]
    k = [float(v.sel(metric="k_anonymity")) for v in per_site]
    shapes = [float(v.sel(metric="column_shapes")) for v in per_site]
    pooled = pooled_risk(
        [
            Score(
                0.0,
                n=float(v.n),
                successes=float(v.successes),
                control_successes=float(v.control_successes),
            )
            for v in (
                c.sel(source="anonymised", metric="singling_out_risk")
                for c in run.scorecards.values()
            )
        ]
    )
    assert at("singling_out_risk") == pytest.approx(pooled.value)
    assert min(risk) - 0.2 <= pooled.value <= max(risk) + 0.2
    assert at("k_anonymity") == pytest.approx(min(k))
    assert at("column_shapes") == pytest.approx(np.mean(shapes))
    # utility: mean over every evaluation hospital, in % as in results.nc, with
    # a t-interval across the hospitals
    mdape = ds.utility.isel(seed=0).sel(source="anonymised", utility_metric="mdape")
    assert at("forecast_mdape") == pytest.approx(float(mdape.mean()))
    lo = float(card["ci_low"].sel(source="anonymised", metric="forecast_mdape"))
    assert lo < at("forecast_mdape")
    # the pooled interval rests on every site's attacks
    c = card.sel(source="anonymised", metric="singling_out_risk")
    assert float(c.ci_high) == pytest.approx(pooled.ci_high)
    assert float(c.n) == sum(
        float(v.sel(metric="singling_out_risk").n)
        for v in (s.sel(source="anonymised") for s in run.scorecards.values())
    )
