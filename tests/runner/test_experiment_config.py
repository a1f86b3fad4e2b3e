"""The experiment runner's structured config (configs/side_by_side.yaml): it
composes, and typos, wrong types and a missing OMOP folder fail before training."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from phems_clinical.resources import configs_dir
from phems_clinical.runner.experiment import run_experiment


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        return compose(config_name="side_by_side", overrides=list(overrides))


def test_default_experiment_composes_three_sources():
    cfg = _compose()
    assert list(cfg.sources) == ["real", "anonymised", "synthetic"]
    assert cfg.sources.anonymised.options.k == 5
    assert cfg.data.n_sites == 5 and cfg.model.name


@pytest.mark.parametrize("override", ["data.n_sitez=3", "data.n_sites=five",
                                      "evaluation.n_attacks=many",
                                      "sources.real.kindd=real"])
def test_typos_and_types_fail_at_compose_time(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose([override])


def test_missing_omop_folder_and_use_case_fail_before_training(tmp_path):
    cfg = _compose([f"data.omop={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="data.omop"):
        run_experiment(cfg, tmp_path)
    cfg = _compose(["use_case=oncology"])
    with pytest.raises(ValueError, match="use_case"):
        run_experiment(cfg, tmp_path)


def test_small_run_writes_results(tmp_path):
    import xarray as xr

    cfg = _compose(["data.n_sites=3", "data.n_per_site=24",
                    "~source@sources.synthetic", "sources.anonymised.options.k=4",
                    "evaluation.n_attacks=20"])
    res = run_experiment(cfg, tmp_path)
    ds = xr.open_dataset(tmp_path / "results.nc", engine="h5netcdf")
    assert list(ds.source.values) == ["real", "anonymised"]
    assert ds.attrs["holdout_site"] == "hospital_3" == res["holdout_site"]
    for f in ("forecast.png", "result.json", "scorecards/anonymised/hospital_1/"
              "scorecard.html"):
        assert (tmp_path / f).exists(), f
