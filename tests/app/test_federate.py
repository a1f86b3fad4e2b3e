"""``phems federate``: a federated fit over the hospitals of a CSV, its result.json,
and clear refusals of bad input."""

import json

import pandas as pd
import pytest

from phems_clinical.app.cli import main


@pytest.fixture(scope="module")
def hospitals_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("fed") / "cohort.csv"
    assert (
        main(
            [
                "simulate",
                "--model",
                "advate",
                "--n",
                "24",
                "--design",
                "hospitals",
                "--seed",
                "7",
                "--out",
                str(path),
            ]
        )
        == 0
    )
    return path


def test_federate_writes_result_with_secagg(hospitals_csv, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "federate",
            "--data",
            str(hospitals_csv),
            "--model",
            "advate",
            "--out",
            str(out),
            "--rounds",
            "3",
            "--secagg",
        ]
    )
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["algorithm"] == "fed_focei" and res["rounds"] == 3
    assert [s["n_patients"] for s in res["sites"]] == [8, 8, 8]
    assert res["messages"]["fields"] == ["grad", "hess", "ofv"]
    assert res["secure_aggregation"]["threshold"] == 2
    assert res["secure_aggregation"]["max_error_bound"] < 1e-7
    assert len(res["history"]) == 3 and res["history"][0]["participants"] == [0, 1, 2]
    assert "THETA(CL)" in res["estimates"]
    assert "round 3: sites 3/3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--algorithm", "fedsgd"], "invalid choice: 'fedsgd'"),
        (["--options", "[1]"], "--options: expected a JSON object"),
        (
            ["--algorithm", "fedadam", "--options", '{"lr": 1}'],
            "options for fedadam: unknown lr",
        ),
        (["--min-sites", "4"], "min_sites: expected 1..3"),
    ],
)
def test_bad_options_exit_2_naming_the_option(
    hospitals_csv, tmp_path, capsys, args, message
):
    argv = [
        "federate",
        "--data",
        str(hospitals_csv),
        "--model",
        "advate",
        "--out",
        str(tmp_path / "x"),
        "--rounds",
        "1",
        *args,
    ]
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse refuses unknown choices itself
        rc = exit_.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "result.json").exists()


def test_missing_site_column_is_named(hospitals_csv, tmp_path, capsys):
    bad = tmp_path / "nosite.csv"
    pd.read_csv(hospitals_csv).drop(columns=["SITE"]).to_csv(bad, index=False)
    rc = main(
        [
            "federate",
            "--data",
            str(bad),
            "--model",
            "advate",
            "--out",
            str(tmp_path / "y"),
        ]
    )
    assert rc == 2
    assert "column 'SITE': expected a site identifier column" in capsys.readouterr().err


def _write_policy(path, site, min_cohort, public_key):
    path.write_text(
        f"site: {site}\nmin_cohort_size: {min_cohort}\n"
        "allowed_fields: [ofv, grad, hess]\nmax_rounds: 10\n"
        "data_users:\n  - id: pk-consortium\n    epsilon_budget: 1.0\n"
        "    require_dp: false\n    experiments: ['haemophilia_*']\n"
        f"    public_key: {public_key}\n"
    )


def test_site_policies_refuse_or_log_every_message(hospitals_csv, tmp_path, capsys):
    pol, keys = tmp_path / "policies", tmp_path / "site_keys"
    pol.mkdir()
    assert main(["governance", "keygen", "--out", str(tmp_path / "user.key")]) == 0
    public = capsys.readouterr().out.split("public_key: ")[1].strip()
    sites = ["paediatric", "adolescent", "adult"]
    for s in sites:
        _write_policy(pol / f"{s}.yaml", s, 10 if s == "adult" else 5, public)

    def request(name):  # the data user signs a new request per run
        assert (
            main(
                [
                    "governance",
                    "sign-request",
                    "--key",
                    str(tmp_path / "user.key"),
                    "--requester",
                    "pk-consortium",
                    "--experiment",
                    "haemophilia_fviii",
                    "--algorithm",
                    "fed_focei",
                    "--rounds",
                    "2",
                    "--out",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
        return str(tmp_path / name)

    base = [
        "federate",
        "--data",
        str(hospitals_csv),
        "--model",
        "advate",
        "--rounds",
        "2",
        "--site-policy-dir",
        str(pol),
        "--site-key-dir",
        str(keys),
    ]
    assert main([*base, "--request", request("r1"), "--out", str(tmp_path / "no")]) == 2
    assert "min_cohort_size" in capsys.readouterr().err
    assert not any(
        e["event"] == "message"
        for p in pol.glob("*.audit.jsonl")
        for e in json.loads("[" + ",".join(p.read_text().split()) + "]")
    )
    # a requester string that is not the signed one is refused
    assert (
        main(
            [
                *base,
                "--request",
                request("r2"),
                "--requester",
                "someone",
                "--out",
                str(tmp_path / "no"),
            ]
        )
        == 2
    )
    assert "requester: the run config says 'someone'" in capsys.readouterr().err
    _write_policy(pol / "adult.yaml", "adult", 5, public)
    assert (
        main([*base, "--request", request("r3"), "--out", str(tmp_path / "yes")]) == 0
    )
    res = json.loads((tmp_path / "yes" / "result.json").read_text())
    for s, gov in zip(sites, res["site_governance"], strict=True):
        assert (
            main(
                [
                    "audit",
                    "verify",
                    str(pol / f"{s}.audit.jsonl"),
                    "--key",
                    str(keys / f"{s}.key"),
                    "--anchor",
                    gov["audit_head"],
                ]
            )
            == 0
        )
        assert "OK: " in capsys.readouterr().out


def _old(folder):
    folder.mkdir()
    (folder / "result.json").write_text('{"earlier": true}\n')
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_non_empty_out_is_refused_before_any_work(
    hospitals_csv, tmp_path, capsys, monkeypatch
):
    from phems_clinical.app import federate

    out = tmp_path / "run"
    before = _old(out)
    monkeypatch.setattr(federate, "resolve_model", lambda *a: pytest.fail("work"))
    assert (
        main(
            [
                "federate",
                "--data",
                str(hospitals_csv),
                "--model",
                "advate",
                "--out",
                str(out),
                "--rounds",
                "1",
            ]
        )
        == 2
    )
    assert "--out" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_checkpoint_inside_out_is_refused(hospitals_csv, tmp_path):
    from phems_clinical.app.federate import run_federate

    with pytest.raises(ValueError, match="--checkpoint: .* inside --out"):
        run_federate(
            hospitals_csv,
            "advate",
            "fed_focei",
            tmp_path / "run",
            checkpoint=tmp_path / "run" / "ckpt",
        )


def test_non_finite_estimates_write_nothing(hospitals_csv, tmp_path, monkeypatch):
    """A federated fit whose estimates end non-finite is an error; the earlier
    folder stays byte-identical even with overwrite."""
    from phems_clinical.app import federate
    from phems_clinical.app.fit import FitFailedError

    real = federate.estimates_table

    def diverged(model, result):
        table = real(model, result)
        table["THETA(CL)"]["estimate"] = float("nan")
        return table

    monkeypatch.setattr(federate, "estimates_table", diverged)
    out = tmp_path / "run"
    before = _old(out)
    with pytest.raises(FitFailedError, match="non-finite estimates of THETA"):
        federate.run_federate(
            hospitals_csv,
            "advate",
            "fed_focei",
            out,
            options={"rounds": 1},
            overwrite=True,
            progress=False,
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
