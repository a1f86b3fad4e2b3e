"""Anonymised sources with longitudinal perturbation (evaluation.sources.derive):
options checked with errors naming the option; no perturbation option gives the
QI-only release unchanged; micro_k / noise / time_grid reach the released table;
a stated risk target is met on the site's own data, or refused when no setting
meets it."""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical import usecases
from phems_clinical.data.cardiac import simulate_cardiac
from phems_clinical.data.cardiac.pathways import episodes
from phems_clinical.evaluation.sources import (
    SourceError,
    SourceSpec,
    derive,
    score_sources,
    split_patients,
)
from phems_clinical.pk.library import load_product
from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort
from phems_clinical.privacy.release import anonymise

KEY = jax.random.key(5)
CARDIAC = usecases.get("cardiac")
HAEMOPHILIA = usecases.get("haemophilia")


@pytest.fixture(scope="module")
def cardiac():
    s = episodes(simulate_cardiac(KEY, n_episodes=240).tables)[0]
    return split_patients(KEY, s, CARDIAC, 0.5)


@pytest.fixture(scope="module")
def haemophilia():
    ev, _ = simulate_cohort(KEY, load_product("advate"), HospitalSpec("h", 30))
    return ev


def _anon(options):
    return SourceSpec("anon", "anonymised", "lattice", options)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"k": 5, "mikro_k": 3}, r"\['mikro_k'\] are not options"),
        ({"micro_k": 1}, "'micro_k': expected an integer >= 2, got 1"),
        ({"micro_k": 2.5}, "'micro_k': expected an integer"),
        ({"micro_k": True}, "'micro_k': expected an integer"),
        ({"noise": -0.1}, "'noise': expected a finite number >= 0"),
        ({"noise": float("nan")}, "'noise': expected a finite number"),
        ({"noise": "0.1"}, "'noise': expected a finite number"),
        ({"time_grid": 0}, "'time_grid': expected a finite number > 0, got 0"),
        ({"target": 0.2}, "'target': expected a mapping of risk name"),
        ({"target": {}}, "'target': expected a mapping of risk name"),
        (
            {"target": {"reidentification": 0.2}},
            r"\['reidentification'\] are not risks",
        ),
        ({"target": {"singling_out_risk": 1.5}}, r"bounds of \['singling_out_risk'\]"),
        ({"target": {"singling_out_risk": -1}}, "'target.singling_out_risk': expected"),
        (
            {"target": {"singling_out_risk": 0.2}, "time_grid": 7},
            r"'target' chooses micro_k, noise and time_grid itself; drop \['time_grid'\]",
        ),
    ],
)
def test_bad_options_named(cardiac, options, match):
    train, _ = cardiac
    with pytest.raises(SourceError, match=match):
        derive(KEY, CARDIAC, train, _anon(options))


def test_perturbation_needs_declared_columns(cardiac):
    train, _ = cardiac
    bare = CARDIAC._replace(
        roles=CARDIAC.roles.__class__(
            **{**CARDIAC.roles.__dict__, "longitudinal": None}
        )
    )
    with pytest.raises(SourceError, match=r"\['time_grid'\] need the longitudinal"):
        derive(KEY, bare, train, _anon({"time_grid": 7}))


def test_no_perturbation_option_is_the_qi_release(cardiac):
    # unset options (None, noise 0) leave today's QI-only release; only the date
    # shifts differ, as they are fresh secret draws in every release
    train, _ = cardiac
    d = derive(
        KEY,
        CARDIAC,
        train,
        _anon({"k": 5, "micro_k": None, "noise": 0.0, "time_grid": None}),
    )
    ref = anonymise(KEY, train, CARDIAC.roles, k=5)
    dates = list(CARDIAC.roles.date_columns)
    pd.testing.assert_frame_equal(
        d.data.drop(columns=dates), ref.data.drop(columns=dates)
    )
    assert "longitudinal" not in d.report["config"]


def test_time_grid_reaches_the_release(cardiac):
    train, _ = cardiac
    d = derive(KEY, CARDIAC, train, _anon({"k": 5, "time_grid": 7}))
    for c in ("entry", "exit"):
        x = d.data[c].to_numpy(float)
        assert np.allclose(x, 7 * np.round(x / 7))  # every time on the 7-day grid
    assert d.report["config"]["longitudinal"] == {
        "micro_k": None,
        "noise": 0.0,
        "time_grid": 7.0,
    }
    loss = d.report["information_loss"]["il1s"]
    assert loss["entry"] > 0 and loss["exit"] > 0


def test_noise_and_micro_k_reach_the_release(haemophilia):
    d = derive(
        KEY, HAEMOPHILIA, haemophilia, _anon({"k": 5, "noise": 0.1, "micro_k": 3})
    )
    # nobody suppressed at this size: the release keeps every row, in order
    assert d.report["suppressed_share"] == 0 and len(d.data) == len(haemophilia)
    kept = haemophilia.reset_index(drop=True)
    obs = (kept.EVID == 0).to_numpy() & kept.DV.notna().to_numpy()
    ratio = d.data.DV.to_numpy(float)[obs] / kept.DV.to_numpy(float)[obs]
    assert np.all(ratio > 0) and np.std(np.log(ratio)) > 0.05  # levels moved
    assert d.report["longitudinal"]["micro_groups"]["min"] >= 3
    # one noise draw per patient for the per-patient covariate VWF
    per = d.data.VWF / kept.VWF.to_numpy(float)
    assert per.groupby(d.data.ID).nunique().max() == 1


def test_target_met_on_own_data_and_scored(cardiac):
    train, hold = cardiac
    d = derive(
        KEY, CARDIAC, train, _anon({"k": 5, "target": {"singling_out_risk": 0.4}})
    )
    tr = d.report["target_risk"]
    # k=5 alone singles out nearly every inner patient; the search goes on to the
    # first (least-loss) time grid, whose upper bound is under the target
    first, chosen = tr["steps"][0], next(s for s in tr["steps"] if s["meets"])
    assert first["setting"]["time_grid"] is None and first["meets"] is False
    assert first["risks"]["singling_out_risk"][2] > 0.4
    assert chosen["risks"]["singling_out_risk"][2] <= 0.4
    assert chosen["setting"] == tr["setting"]
    assert tr["patients_searched"] == round(train.person_id.nunique() / 2)
    grid = tr["setting"]["time_grid"]
    assert grid is not None and d.report["config"]["longitudinal"]["time_grid"] == grid
    real = derive(KEY, CARDIAC, train, SourceSpec("real", "real"))
    ds = score_sources(
        KEY, CARDIAC, train, hold, [real, d], n_attacks=100, utility=False
    )
    v = ds["value"].to_pandas()
    assert v.loc["anon", "singling_out_risk"] < v.loc["real", "singling_out_risk"]
    assert v.loc["anon", "k_anonymity"] >= 5


def test_unreachable_target_refused(cardiac):
    train, _ = cardiac
    # membership AUC cannot be bounded near 0 (0.5 is chance): nothing released
    with pytest.raises(
        SourceError,
        match=r"option 'target': cardiac: none of the 4 "
        r"settings meets mia_auc <= 0.01",
    ):
        derive(KEY, CARDIAC, train, _anon({"target": {"mia_auc": 0.01}}))


def test_target_needs_patients(cardiac):
    train, _ = cardiac
    few = train[train.person_id.isin(train.person_id.unique()[:12])]
    with pytest.raises(SourceError, match="'target' needs enough patients"):
        derive(KEY, CARDIAC, few, _anon({"target": {"singling_out_risk": 0.2}}))


def _run_config(overrides):
    from hydra import compose, initialize_config_dir

    from phems_clinical.resources import configs_dir

    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_run_preflight_knows_the_options():
    from phems_clinical.runner.validate import ConfigError, check_config

    # the committed source config documents them (unset)
    check_config(
        _run_config(
            [
                "+sources.anonymised.options.micro_k=3",
                "+sources.anonymised.options.noise=0.1",
                "+sources.anonymised.options.time_grid=6",
            ]
        )
    )
    check_config(
        _run_config(["+sources.anonymised.options.target={singling_out_risk: 0.2}"])
    )
    for bad, name in (
        ("micro_k=1", "options.micro_k"),
        ("noise=-1", "options.noise"),
        ("time_grid=0", "options.time_grid"),
        ("target=0.2", "options.target"),
    ):
        with pytest.raises(ConfigError, match=name):
            check_config(_run_config([f"+sources.anonymised.options.{bad}"]))


@pytest.fixture(scope="module")
def pk_csv(haemophilia, tmp_path_factory):
    path = tmp_path_factory.mktemp("pk") / "site_x.csv"
    haemophilia.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--micro-k", "1"], "--micro-k: expected an integer >= 2, got 1"),
        (["--noise", "-0.1"], "--noise: expected a finite number >= 0"),
        (["--noise", "nan"], "--noise: expected a finite number >= 0"),
        (["--time-grid", "0"], "--time-grid: expected a finite number > 0"),
        (["--target", "singling_out=0.2"], "--target: expected RISK=BOUND"),
        (["--target", "singling_out_risk"], "--target: expected RISK=BOUND"),
        (["--target", "mia_auc=high"], "--target mia_auc: expected a bound in [0, 1]"),
        (["--target", "mia_auc=1.5"], "--target mia_auc: expected a bound in [0, 1]"),
        (
            ["--target", "mia_auc=0.6", "--target", "mia_auc=0.7"],
            "mia_auc is given twice",
        ),
        (
            ["--target", "mia_auc=0.6", "--noise", "0.1"],
            "--target: the search chooses --micro-k, --noise and --time-grid itself",
        ),
    ],
)
def test_anonymise_bad_flags_exit_2(pk_csv, tmp_path, capsys, flags, message):
    from phems_clinical.app.cli import main

    assert (
        main(
            [
                "anonymise",
                "--use-case",
                "haemophilia",
                "--csv",
                str(pk_csv),
                "--out",
                str(tmp_path / "o"),
                *flags,
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_anonymise_with_perturbation_flags(pk_csv, tmp_path):
    import json

    from phems_clinical.app.cli import main

    out = tmp_path / "o"
    assert (
        main(
            [
                "anonymise",
                "--use-case",
                "haemophilia",
                "--csv",
                str(pk_csv),
                "--out",
                str(out),
                "--no-utility",
                "--attacks",
                "20",
                "--noise",
                "0.1",
                "--time-grid",
                "6",
            ]
        )
        == 0
    )
    rel = pd.read_csv(out / "site_x" / "haemophilia_anonymised.csv")
    assert np.allclose(rel.TIME, 6 * np.round(rel.TIME / 6))
    rep = json.loads((out / "site_x" / "report.json").read_text())
    src = rep["sources"]["anonymised"]
    assert src["spec"]["options"]["time_grid"] == 6.0
    assert src["report"]["config"]["longitudinal"] == {
        "micro_k": None,
        "noise": 0.1,
        "time_grid": 6.0,
    }
    assert src["report"]["information_loss"]["il1s"]["TIME"] > 0
