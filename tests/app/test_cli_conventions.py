"""CLI conventions: ``phems --version``, ``phems run --help`` in plain words, help
text on every option of every subcommand."""

import argparse
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml

from phems_clinical.app.cli import build_parser, config_description, main, run_help_text
from phems_clinical.resources import configs_dir


def _walk(parser: argparse.ArgumentParser, path: str):
    """``(command path, action)`` of every action of ``parser`` and its
    subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_has_help_text():
    parser = build_parser()  # every subcommand's full parser
    actions = list(_walk(parser, "phems"))
    commands = {p for p, _ in actions}
    # the walk reaches the lazily added and the nested subcommands
    assert {
        "phems fit",
        "phems sepsis",
        "phems omop simulate",
        "phems audit verify",
        "phems patients export",
    } <= commands
    missing = [
        f"{p}: {'/'.join(a.option_strings) or a.dest}"
        for p, a in actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert not missing, "options without help text:\n" + "\n".join(missing)


def test_every_subcommand_has_help_text():
    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in action._choices_actions}
                for name, sub in action.choices.items():
                    yield f"{path} {name}", helps.get(name)
                    yield from walk(sub, f"{path} {name}")

    missing = [p for p, h in walk(build_parser(), "phems") if not (h or "").strip()]
    assert not missing, missing


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"phems_clinical {version('phems_clinical')} (jax {version('jax')})")


def test_version_console_script():
    r = subprocess.run(
        [sys.executable, "-m", "phems_clinical.app.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.startswith("phems_clinical ")


def test_run_help_lists_every_group_option_and_experiment(capsys):
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    root = configs_dir()
    for group in (
        "use_case",
        "model",
        "inference",
        "federation",
        "source",
        "cohort",
        "experiment",
    ):
        assert f"\n  {group}: " in text
        for f in root.glob(f"{group}/*.yaml"):
            assert f"  {f.stem}  " in text or f"* {f.stem} " in text, f
    # the defaults of configs/config.yaml are starred
    assert "* haemophilia_fviii " in text and "* advate " in text
    assert "* inprocess " in text and "* real " in text
    assert "experiment=picu_sepsis" in text and "--hydra-help" in text
    assert main(["run", "-h"]) == 0
    assert capsys.readouterr().out == text


def test_config_description_hand_written(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text(
        "# @package _global_\n# Study: a first line\n# and its end.\n"
        "# More detail.\n#   phems run experiment=x\nseed: 1\n"
    )
    assert config_description(f) == "Study: a first line and its end."
    f.write_text("# One line, no full stop\n# phems run x=1\na: 1\n")
    assert config_description(f) == "One line, no full stop"
    f.write_text("a: 1\n")
    assert config_description(f) == ""


def test_run_help_on_a_hand_made_config_tree(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m1.yaml").write_text("# Model one.\nname: m1\n")
    (tmp_path / "model" / "m2.yaml").write_text("# Model two.\nname: m2\n")
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"defaults": ["_self_", {"model": "m2"}, {"experiment": None}]})
    )
    text = run_help_text(tmp_path)
    assert "     m1  Model one.\n   * m2  Model two.\n" in text
    assert "  use_case:" not in text  # a group without options is left out


def test_hydra_own_options_still_work():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "phems_clinical.app.cli",
            "run",
            "--cfg",
            "job",
            "seed=7",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "seed: 7" in r.stdout and "use_case:" in r.stdout


# ------------------------------------------------------------ NetCDF units
def _numeric_without_units(path) -> list[str]:
    import numpy as np
    import xarray as xr

    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return [
            n
            for n, v in ds.data_vars.items()
            if np.issubdtype(v.dtype, np.number) or v.dtype == bool
            if not v.attrs.get("units") or not v.attrs.get("long_name")
        ]


def test_scorecard_nc_has_units(tmp_path):
    from phems_clinical.evaluation.scorecard import build_scorecard
    from phems_clinical.evaluation.scorecard_report import write_scorecard

    ds = build_scorecard(
        {"real": {"k_anonymity": 1.0}, "anon": {"k_anonymity": 5.0}},
        sources_meta={"real": {"kind": "real"}, "anon": {"kind": "anonymised"}},
        use_case="haemophilia",
        seed=0,
    )
    nc, _ = write_scorecard(ds, tmp_path)
    assert _numeric_without_units(nc) == []
    import xarray as xr

    with xr.open_dataset(nc, engine="h5netcdf") as back:
        assert back["n"].attrs["units"] == "1"


def test_results_nc_has_units_and_pk_units(tmp_path):
    from types import SimpleNamespace

    from phems_clinical.evaluation.scorecard import build_scorecard
    from phems_clinical.evaluation.sources import SourceSpec
    from phems_clinical.pk.library import load_product
    from phems_clinical.pk.spec import parameter_units
    from phems_clinical.runner.results import to_dataset
    from phems_clinical.usecases.haemophilia import TASK

    card = build_scorecard(
        {"real": {"k_anonymity": 1.0}},
        sources_meta={"real": {"kind": "real"}},
        use_case="haemophilia",
        seed=0,
    )
    names = ["THETA(CL)", "THETA(V1)", "THETA(CL_WT_pow)", "OMEGA(CL,CL)"]
    src = SimpleNamespace(
        utility={
            "A": {"mdape": 20.0, "mpe": -3.0, "within20": 0.5},
            "B": {"mdape": 25.0, "mpe": 1.0, "within20": 0.4},
        },
        estimates=dict.fromkeys(names, 1.0),
        se=dict.fromkeys(names, 0.1),
        rounds=3,
        converged=True,
        privacy={},
        stopped_by="converged",
    )
    run = SimpleNamespace(
        sources={"real": src},
        train_sites=["A"],
        holdout_site="B",
        scorecards={"A": card},
    )
    units = parameter_units(load_product("advate"), names)
    assert units == {"THETA(CL)": "dL/h", "THETA(V1)": "dL"}  # configs/model/advate
    ds = to_dataset(
        run, TASK, [SourceSpec("real", "real")], seed=0, parameter_units=units
    )
    ds.to_netcdf(tmp_path / "results.nc", engine="h5netcdf")
    assert _numeric_without_units(tmp_path / "results.nc") == []
    import xarray as xr

    with xr.open_dataset(tmp_path / "results.nc", engine="h5netcdf") as back:
        assert back["parameter_unit"].values.tolist() == ["dL/h", "dL", "", ""]
        assert back["utility_unit"].values.tolist() == ["%", "%", "1"]
        assert back["estimate_se"].attrs["units"] == "see parameter_unit"
