"""``phems cardiac``: from simulated OMOP databases to a federated multi-state
model evaluated per site and on a held-out hospital; the federated fit equals the
pooled Newton fit on the same training episodes."""

import json

import pytest

from phems_clinical.app.cli import main


@pytest.fixture(scope="module")
def cardiac_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("omop_cardiac")
    assert (
        main(
            [
                "omop",
                "simulate",
                "--use-case",
                "cardiac",
                "--n",
                "120",
                "--seed",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_cardiac_federated_equals_pooled_and_reports(cardiac_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "cardiac",
                "--omop",
                str(cardiac_dir),
                "--out",
                str(out),
                "--compare-pooled",
                "--holdout",
                "hospital_b",
            ]
        )
        == 0
    )
    res = json.loads((out / "result.json").read_text())
    assert res["holdout"] == "hospital_b" and res["strategy"] == "fedadam"
    # FedAdam reaches the pooled penalised-likelihood optimum
    assert abs(res["pooled"]["objective_gap"]) < 1e-6
    assert res["pooled"]["max_abs_log_hr_difference"] < 1e-3
    splits = {(m["site"], m["split"]) for m in res["metrics"]}
    assert splits == {
        ("hospital_a", "test"),
        ("hospital_c", "test"),
        ("hospital_b", "held-out hospital"),
    }
    for m in res["metrics"]:
        assert 0.0 <= m["c_death"] <= 1.0 and 0.0 <= m["brier_death_30d"] < 0.25
    assert res["sites"]["hospital_b"]["training_episodes"] == 0
    assert res["sites"]["hospital_a"]["training_episodes"] == 90
    # only aggregate fields ever left a site
    assert res["messages"]["fields"] == ["delta", "weight"]
    for f in ("metrics.csv", "hazard_ratios.csv", "occupation.png"):
        assert (out / f).stat().st_size > 0
    assert "held-out hospital" in capsys.readouterr().out
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert main(["cardiac", "--omop", str(cardiac_dir), "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_cardiac_bad_holdout_and_missing_folder(cardiac_dir, tmp_path, capsys):
    assert (
        main(
            [
                "cardiac",
                "--omop",
                str(cardiac_dir),
                "--out",
                str(tmp_path / "o"),
                "--holdout",
                "nowhere",
            ]
        )
        == 2
    )
    assert "--holdout: 'nowhere' is not one of the sites" in capsys.readouterr().err
    assert (
        main(
            ["cardiac", "--omop", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "no such OMOP database" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no staging left
