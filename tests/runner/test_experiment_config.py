"""The experiment runner's structured config (configs/config.yaml, the default
``phems run``): it composes, every committed study composes, and typos, wrong
types, an unknown experiment, a missing OMOP folder and impossible settings fail
before training; a small run writes every output, and the same seed writes the
same results.nc."""

import subprocess
import sys

import pytest
import xarray as xr
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from phems_clinical.resources import configs_dir
from phems_clinical.runner.collect import collect
from phems_clinical.runner.experiment import run_experiment

STUDIES = sorted(p.stem for p in (configs_dir() / "experiment").glob("*.yaml"))


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_experiment_composes_three_sources():
    cfg = _compose()
    assert list(cfg.sources) == ["real", "anonymised", "synthetic"]
    assert cfg.sources.anonymised.options.k == 5
    assert cfg.data.n_sites == 5 and cfg.model.name == "advate"
    assert cfg.federation.engine == "inprocess" and cfg.federation.dp.epsilon is None


def test_every_study_composes():
    assert {
        "fviii",
        "fix",
        "picu_sepsis",
        "cardiac",
        "federated_vs_pooled",
        "dp_epsilon_sweep",
        "site_scaling",
    } <= set(STUDIES)
    for name in STUDIES:
        cfg = _compose([f"experiment={name}"])
        assert cfg.experiment_name == name and cfg.sources


@pytest.mark.parametrize(
    "override",
    [
        "data.n_sitez=3",
        "data.n_sites=five",
        "evaluation.n_attacks=many",
        "sources.real.kindd=real",
        "federation.dp.epsilon=abc",
        "federation.secagg=maybe",
    ],
)
def test_typos_and_types_fail_at_compose_time(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose([override])


def test_unknown_experiment_and_use_case_are_named():
    with pytest.raises(MissingConfigException, match="experiment/fviiii"):
        _compose(["experiment=fviiii"])
    with pytest.raises(MissingConfigException, match="use_case/oncology"):
        _compose(["use_case=oncology"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["federation.engine=grpc"], "federation.engine"),
        (["federation.dp.epsilon=1"], "federation.dp"),  # fed_focei has no DP
        (["inference.strategy=newton"], "inference.strategy"),
        (["federation=flower", "model.parameters.CL.value=2.5"], "flower"),
        (["data.n_sites=1"], "data.n_sites"),
        (
            [
                "sources.anonymised.options.k=500",
                "data.n_sites=2",
                "data.n_per_site=24",
            ],
            "k=500",
        ),
    ],
)
def test_impossible_settings_fail_before_training(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run_experiment(_compose(overrides), tmp_path)
    assert not (tmp_path / "checkpoints" / "real").exists()  # nothing trained


def test_missing_omop_folder_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.omop"):
        run_experiment(_compose([f"data.omop={tmp_path / 'nowhere'}"]), tmp_path)


def test_cli_names_the_unknown_experiment(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "phems_clinical",
            "run",
            "experiment=fviiii",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "experiment/fviiii" in proc.stderr and "fviii" in proc.stderr


SMALL = [
    "data.n_sites=3",
    "data.n_per_site=24",
    "~source@sources.synthetic",
    "sources.anonymised.options.k=4",
    "evaluation.n_attacks=20",
    # the BFGS server compiles in a third of the Newton server's time; the
    # pipeline, not the estimator, is under test here
    "+inference.options.hessian=bfgs",
]


def test_small_run_writes_results_and_reproduces(tmp_path):
    res = run_experiment(_compose(SMALL), tmp_path / "a")
    ds = xr.open_dataset(tmp_path / "a" / "results.nc", engine="h5netcdf").load()
    assert list(ds.source.values) == ["real", "anonymised"]
    assert ds.sizes["seed"] == 1 and ds.attrs["holdout_site"] == "hospital_3"
    assert res["holdout_site"] == "hospital_3"
    for f in (
        "utility.png",
        "report.html",
        "result.json",
        "scorecards/hospital_1/scorecard.html",
    ):
        assert (tmp_path / "a" / f).exists(), f
    html = (tmp_path / "a" / "report.html").read_text()
    for text in (
        "Utility of each source",
        "Privacy",
        "Fidelity",
        "not DP",
        "held-out hospital",
        "anonymised",
    ):
        assert text in html, text
    # the same seed, a fresh directory: the same results.nc
    run_experiment(_compose(SMALL), tmp_path / "b")
    again = xr.open_dataset(tmp_path / "b" / "results.nc", engine="h5netcdf").load()
    xr.testing.assert_identical(again, ds)
    # a sweep's runs merge along the swept setting
    for job, seed in (("a", 0), ("b", 0)):
        (tmp_path / job / ".hydra").mkdir(exist_ok=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(
            f"- seed={seed}\n- data.test_fraction={0.5 if job == 'a' else 0.4}\n"
        )
    merged = collect(tmp_path)
    assert merged.sizes["data_test_fraction"] == 2
    assert (tmp_path / "summary.csv").exists()
