"""``phems sepsis``: from simulated OMOP databases to a federated sepsis model
evaluated on each site's held-out stays and on a held-out hospital; only aggregate
fields leave a site; bad options are refused before training."""

import json

import pytest

from phems_clinical.app.cli import main


@pytest.fixture(scope="module")
def picu_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("omop_sepsis")
    assert (
        main(
            [
                "omop",
                "simulate",
                "--use-case",
                "picu",
                "--n",
                "40",
                "--seed",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_sepsis_trains_federated_and_evaluates(picu_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "sepsis",
                "--omop",
                str(picu_dir),
                "--out",
                str(out),
                "--rounds",
                "5",
                "--holdout",
                "district",
                "--model",
                "logistic",
            ]
        )
        == 0
    )
    res = json.loads((out / "result.json").read_text())
    assert res["holdout"] == "district" and res["rounds"] == 5
    assert res["target"] == "Phoenix sepsis onset within the next 6 h"
    splits = {(m["site"], m["split"]) for m in res["metrics"]}
    assert {
        ("surgical", "test"),
        ("tertiary", "test"),
        ("district", "held-out hospital"),
    } <= splits
    test_rows = [m for m in res["metrics"] if m["split"] == "test"]
    assert sum(m["n_stays"] for m in test_rows) == 20  # 25 % of 2 x 40 stays
    for m in res["metrics"]:  # AUROC is undefined (null) without a positive hour
        assert (
            m["auroc"] is None
            and m["prevalence"] in (0.0, 1.0)
            or 0.0 <= m["auroc"] <= 1.0
        )
        assert 0.0 <= m["brier"] <= 1.0
    # Phoenix labels per site, counted; load reports present
    assert all(s["stays"] == 40 for s in res["sites"].values())
    assert sum(s["phoenix_sepsis_stays"] for s in res["sites"].values()) > 0
    assert res["messages"]["fields"] == ["delta", "weight"]
    assert (out / "calibration.png").stat().st_size > 0
    assert "held-out hospital" in capsys.readouterr().out
    json.loads(
        (out / "result.json").read_text(),  # strict JSON: no NaN
        parse_constant=lambda c: pytest.fail(f"{c} in result.json"),
    )
    before = (out / "result.json").read_bytes()
    assert main(["sepsis", "--omop", str(picu_dir), "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err
    assert (out / "result.json").read_bytes() == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--holdout", "nowhere"], "--holdout: 'nowhere' is not one of the sites"),
        (["--horizon", "0"], "--horizon: 0 h; expected at least 1 hour"),
        (["--test-fraction", "1.5"], "--test-fraction: 1.5 is not in (0, 1)"),
        (["--model", "gbm"], "invalid choice: 'gbm'"),
    ],
)
def test_sepsis_bad_options(picu_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if "invalid choice" in message else _null():
        rc = main(
            ["sepsis", "--omop", str(picu_dir), "--out", str(tmp_path / "o"), *args]
        )
        assert rc == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no staging left


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
