"""``phems run`` checks every setting before any hospital is simulated or loaded,
and exits 2 naming the setting; every committed config passes."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from phems_clinical.resources import configs_dir
from phems_clinical.runner.validate import ConfigError, check_config, preflight

STUDIES = sorted(p.stem for p in (configs_dir() / "experiment").glob("*.yaml"))


def _compose(overrides=(), name="config"):
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        *([f"experiment={s}"] for s in STUDIES),
        ["inference=ep"],
        ["inference=fedadam", "federation.dp.epsilon=2"],
        ["federation=pooled"],
        ["federation=flower"],
        ["federation.secagg=true"],
        # every use case runs on Flower, with SecAgg
        # and DP as in process
        ["experiment=picu_sepsis", "federation=flower"],
        ["experiment=cardiac", "federation=flower", "federation.secagg=true"],
        ["inference=fedadam", "federation=flower", "federation.dp.epsilon=2"],
    ],
)
def test_committed_configs_pass(overrides):
    check_config(_compose(overrides))


def test_demo_config_passes():
    check_config(_compose([], "pk_demo"))
    check_config(_compose(["method=svi", "+method_options.num_steps=10"], "pk_demo"))


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["sources.synthetic.kind=fake"], ["sources.synthetic.kind", "'fake'"]),
        (["sources.anonymised.method=kmeans"], ["sources.anonymised.method"]),
        (["+sources.anonymised.options.kk=3"], ["sources.anonymised.options", "kk"]),
        (["sources.anonymised.options.k=0"], ["sources.anonymised.options.k"]),
        (
            ["sources.anonymised.options.k=500", "data.n_per_site=24"],
            ["sources.anonymised.options.k", "k=500"],
        ),
        (
            ["sources.synthetic.method=mst", "+sources.synthetic.options.epsilon=-1"],
            ["sources.synthetic.options.epsilon"],
        ),
        (["+inference.options.rounds=0"], ["inference.options.rounds"]),
        (
            ["inference=fedadam", "+inference.options.local_step=3"],
            ["inference.options", "local_step"],
        ),
        (["evaluation.n_attacks=0"], ["evaluation.n_attacks"]),
        (["data.n_per_site=-5"], ["data.n_per_site"]),
        (["data.test_fraction=1.5"], ["data.test_fraction"]),
        (["data.test_fraction=0.05"], ["data.test_fraction"]),
        (["data.holdout_site=nowhere"], ["data.holdout_site", "hospital_5"]),
        (["federation.sites=[nowhere]"], ["federation.sites", "nowhere"]),
        (["federation.sites=[hospital_5]"], ["federation.sites", "at least one"]),
        (["federation.min_sites=0"], ["federation.min_sites"]),
        (["federation.min_sites=9"], ["federation.min_sites", "4 training sites"]),
        (["inference=fedadam", "federation.dp.epsilon=0"], ["federation.dp.epsilon"]),
        (
            ["inference=fedadam", "federation.dp.epsilon=1", "federation.dp.delta=2"],
            ["federation.dp.delta"],
        ),
        (
            [
                "inference=fedadam",
                "federation.dp.epsilon=1",
                "federation.dp.accountant=gauss",
            ],
            ["federation.dp.accountant"],
        ),
        (
            [
                "inference=fedadam",
                "federation.dp.epsilon=1",
                "federation.dp.sampling_rate=0",
            ],
            ["federation.dp.sampling_rate"],
        ),
        (["federation=pooled", "federation.secagg=true"], ["federation.secagg"]),
        (["seed=-1"], ["seed"]),
        (["model.structure.compartments=7"], ["model"]),
        # the Flower apps load a PK model by product name: an edited one is refused
        (
            ["federation=flower", "model.parameters.CL.value=2.5"],
            ["model", "federation.engine flower", "'advate'", "library product"],
        ),
    ],
)
def test_bad_settings_are_named(overrides, names):
    with pytest.raises(ConfigError) as err:
        check_config(_compose(overrides))
    for n in names:
        assert n in str(err.value)


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["method=saem"], ["method", "focei"]),
        (["cohort.n_patients=0"], ["cohort.n_patients"]),
        (["cohort.design=weekly"], ["cohort.design"]),
        (["method=svi", "+method_options.num_step=10"], ["method_options", "num_step"]),
        (
            ["method=nuts", "+method_options.num_chains=0"],
            ["method_options.num_chains"],
        ),
        (["seed=1000000000000000000000000000000"], ["seed"]),
    ],
)
def test_bad_demo_settings_are_named(overrides, names):
    with pytest.raises(ConfigError) as err:
        check_config(_compose(overrides, "pk_demo"))
    for n in names:
        assert n in str(err.value)


def test_omop_folder_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.omop: .* does not exist"):
        check_config(_compose([f"data.omop={tmp_path / 'nowhere'}"]))
    (tmp_path / "a.duckdb").write_bytes(b"")
    with pytest.raises(ConfigError, match="data.omop: .* holds 1"):
        check_config(_compose([f"data.omop={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.omop: .* is not a folder"):
        check_config(_compose([f"data.omop={tmp_path / 'a.duckdb'}"]))
    (tmp_path / "b.duckdb").write_bytes(b"")
    with pytest.raises(ConfigError, match="data.holdout_site: 'c'.*a, b"):
        check_config(_compose([f"data.omop={tmp_path}", "data.holdout_site=c"]))


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        check_config(
            _compose(
                ["data.n_sites=1", "evaluation.n_attacks=0", "federation.engine=grpc"]
            )
        )
    text = str(err.value)
    assert text.startswith("3 settings cannot run:")
    for n in ("data.n_sites", "evaluation.n_attacks", "federation.engine"):
        assert n in text


def test_preflight_checks_every_job_of_a_sweep():
    assert preflight(["-m", "experiment=dp_epsilon_sweep"]) == 6
    assert preflight(["--help"]) is None
    with pytest.raises(
        ConfigError, match="job seed=1 data.n_per_site=5: data.n_per_site"
    ):
        preflight(["-m", "seed=1,2", "data.n_per_site=40,5"])


def _phems_run(*args, tmp_path):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "phems_clinical",
            "run",
            *args,
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_exits_2_before_simulating(tmp_path):
    proc = _phems_run(
        "data.n_sites=1", "sources.synthetic.kind=fake", tmp_path=tmp_path / "run"
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("phems run: error: 2 settings cannot run")
    assert "data.n_sites" in proc.stderr and "sources.synthetic.kind" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # no hospital simulated, no run dir
    proc = _phems_run("seed=abc", tmp_path=tmp_path / "run")
    assert proc.returncode == 2 and "seed" in proc.stderr
    assert "could not be converted to Integer" in proc.stderr


def test_cli_error_during_the_run_exits_2(tmp_path):
    """A setting that passes the checks but whose data cannot be read (two
    corrupt OMOP files): exit 2 with a message, no traceback."""
    omop = tmp_path / "omop"
    omop.mkdir()
    for site in ("a", "b"):
        (omop / f"{site}.duckdb").write_bytes(b"garbage" * 1000)
    proc = _phems_run(f"data.omop={omop}", tmp_path=tmp_path / "run")
    assert proc.returncode == 2, proc.stderr
    assert "phems run: error: " in proc.stderr and "Traceback" not in proc.stderr
