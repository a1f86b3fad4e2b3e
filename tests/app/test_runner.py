"""``phems run`` (the Hydra main job): smoke run into tmp_path; config errors."""

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from phems_clinical.resources import configs_dir
from phems_clinical.runner import run_demo


def _compose(overrides):
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        return compose(config_name="pk_demo", overrides=overrides)


def test_every_model_in_group_composes():
    for path in sorted((configs_dir() / "model").glob("*.yaml")):
        cfg = _compose([f"model={path.stem}"])
        if path.stem in ("sepsis_logistic", "multistate"):  # the runner's models
            continue
        assert cfg.model.name


def test_demo_run_writes_result(tmp_path):
    cfg = _compose(
        ["model=jivi", "cohort.n_patients=12", "cohort.design=rich", "seed=5"]
    )
    res = run_demo(cfg, tmp_path)
    for f in (
        "model.yaml",
        "cohort.csv",
        "truth.csv",
        "fit/estimates.json",
        "fit/estimates.nc",
        "fit/gof.png",
        "fit/vpc.png",
        "fit/model.yaml",
        "recovery.csv",
        "result.json",
    ):
        assert (tmp_path / f).exists(), f
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["n_patients"] == 12 and saved["method"] == "focei"
    assert saved["ofv"] == pytest.approx(res["ofv"])
    assert {r["parameter"] for r in saved["recovery"]} >= {"THETA(CL)", "THETA(V1)"}


def test_typo_in_config_key_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["cohort.n_patiens=10"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["seed=abc"])


def test_cli_run_reports_bad_design(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "phems_clinical",
            "run",
            "--config-name",
            "pk_demo",
            "cohort.design=weekly",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "cohort.design" in proc.stderr + proc.stdout
