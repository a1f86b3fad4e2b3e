"""One error contract for every ``phems`` command: a user-caused
failure exits 2 with ``phems <cmd>: error: <message naming the option, file or
field>``; an internal error exits 1 with a short message (``PHEMS_DEBUG=1``: the
traceback); outputs are refused, not replaced, without ``--overwrite``."""

import argparse

import pytest

from phems_clinical.app import cli
from phems_clinical.app.cli import main


def _refused(capsys, argv, *names):
    """Run ``phems ARGV``; assert exit 2 (argparse or the handler) and that the
    message names each of ``names``; return the message."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refuses before the command runs
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "error: None" not in err
    for n in names:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize(
    "argv, name",
    [
        (
            ["simulate", "--model", "jivi", "--seed", str(10**30), "--out", "x.csv"],
            "--seed",
        ),
        (["simulate", "--model", "jivi", "--seed", "-1", "--out", "x.csv"], "--seed"),
        (["simulate", "--model", "jivi", "--n", "0", "--out", "x.csv"], "--n"),
        (["simulate", "--model", "jivi", "--n", "1e9", "--out", "x.csv"], "--n"),
        (
            ["simulate", "--model", "jivi", "--min-age", "nan", "--out", "x.csv"],
            "--min-age",
        ),
        (
            ["simulate", "--model", "jivi", "--max-age", "200", "--out", "x.csv"],
            "--max-age",
        ),
        (
            [
                "fit",
                "--data",
                "d.csv",
                "--model",
                "jivi",
                "--method",
                "nuts",
                "--out",
                "o",
                "--chains",
                "0",
            ],
            "--chains",
        ),
        (
            [
                "fit",
                "--data",
                "d.csv",
                "--model",
                "jivi",
                "--method",
                "nuts",
                "--out",
                "o",
                "--samples",
                "-5",
            ],
            "--samples",
        ),
        (
            [
                "federate",
                "--data",
                "d.csv",
                "--model",
                "jivi",
                "--out",
                "o",
                "--rounds",
                "0",
            ],
            "--rounds",
        ),
        (["dose", "p.json", "--out", "o", "--seed", "1e3"], "--seed"),
        (["serve", "--port", "70000"], "--port"),
        (
            [
                "governance",
                "sign-request",
                "--key",
                "k",
                "--requester",
                "r",
                "--experiment",
                "e",
                "--algorithm",
                "fedavg",
                "--rounds",
                "0",
            ],
            "--rounds",
        ),
        (
            [
                "governance",
                "sign-request",
                "--key",
                "k",
                "--requester",
                "r",
                "--experiment",
                "e",
                "--algorithm",
                "fedavg",
                "--rounds",
                "3",
                "--valid-hours",
                "nan",
            ],
            "--valid-hours",
        ),
        (
            [
                "governance",
                "sign-request",
                "--key",
                "k",
                "--requester",
                "r",
                "--experiment",
                "e",
                "--algorithm",
                "fedavg",
                "--rounds",
                "3",
                "--valid-hours",
                "1e300",
            ],
            "--valid-hours",
        ),
    ],
)
def test_options_are_checked_by_the_parser(capsys, argv, name):
    _refused(capsys, argv, name)


def test_min_age_not_below_max_age(capsys, tmp_path):
    _refused(
        capsys,
        [
            "simulate",
            "--model",
            "jivi",
            "--design",
            "rich",
            "--min-age",
            "30",
            "--max-age",
            "10",
            "--out",
            str(tmp_path / "x.csv"),
        ],
        "--min-age/--max-age",
    )
    assert not (tmp_path / "x.csv").exists()


def test_missing_file_names_it_and_its_argument(capsys, tmp_path):
    missing = tmp_path / "nobody.json"
    err = _refused(
        capsys,
        ["dose", str(missing), "--out", str(tmp_path / "o")],
        "patient",
        str(missing),
        "No such file",
    )
    assert err.startswith("phems dose: error: ")
    folder = tmp_path / "adir"
    folder.mkdir()
    _refused(
        capsys,
        ["dose", str(folder), "--out", str(tmp_path / "o")],
        "patient",
        str(folder),
    )


@pytest.mark.parametrize(
    "raised, expected",
    [
        (KeyError(None), "missing or empty"),
        (KeyError(""), "missing or empty"),
        (KeyError("column 'DV': expected a number"), "column 'DV'"),
        (OverflowError("int too large to convert to float"), "too large"),
        (ValueError("--model: unknown product"), "--model: unknown product"),
    ],
)
def test_user_errors_exit_2_with_a_message(capsys, monkeypatch, raised, expected):
    def boom(args):
        raise raised

    monkeypatch.setattr(cli, "_products", boom)
    err = _refused(capsys, ["products"], expected)
    assert err.startswith("phems products: error: ")


def test_duckdb_error_exits_2(capsys, monkeypatch, tmp_path):
    import duckdb

    bad = tmp_path / "site.duckdb"
    bad.write_bytes(b"not a database" * 100)

    def boom(args):
        duckdb.connect(str(bad), read_only=True)

    monkeypatch.setattr(cli, "_products", boom)
    _refused(capsys, ["products"], "DuckDB")


def test_psycopg2_error_exits_2_without_the_password(capsys, monkeypatch):
    psycopg2 = pytest.importorskip("psycopg2")

    def boom(args):
        raise psycopg2.OperationalError(
            'connection to server at "db" failed: FATAL: password authentication '
            'failed for "postgresql://site:hunter2@db/omop" (password=hunter2)'
        )

    monkeypatch.setattr(cli, "_products", boom)
    err = _refused(capsys, ["products"], "PostgreSQL", "password authentication")
    assert "hunter2" not in err


def test_internal_error_exits_1_briefly_and_debug_shows_it(capsys, monkeypatch):
    def boom(args):
        return 1 / 0

    monkeypatch.setattr(cli, "_products", boom)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(["products"]) == 1
    err = capsys.readouterr().err
    assert "internal error (ZeroDivisionError at phems_clinical/app" in err
    assert "PHEMS_DEBUG=1" in err and "Traceback" not in err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ZeroDivisionError):
        main(["products"])


def test_simulate_refuses_to_replace_without_overwrite(capsys, tmp_path):
    out = tmp_path / "cohort.csv"
    out.write_text("earlier results\n")
    _refused(
        capsys,
        [
            "simulate",
            "--model",
            "jivi",
            "--n",
            "3",
            "--design",
            "rich",
            "--out",
            str(out),
        ],
        "--out",
        "--overwrite",
    )
    assert out.read_text() == "earlier results\n"
    _refused(
        capsys,
        [
            "simulate",
            "--model",
            "jivi",
            "--n",
            "3",
            "--design",
            "rich",
            "--out",
            str(tmp_path),
        ],
        "--out",
        "folder",
    )
    assert (
        main(
            [
                "simulate",
                "--model",
                "jivi",
                "--n",
                "3",
                "--design",
                "rich",
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert out.read_text().startswith("ID,")
    assert [p.name for p in tmp_path.iterdir()] == ["cohort.csv"]  # no temp file


@pytest.mark.parametrize(
    "command",
    [
        ["fit", "--data", "missing.csv", "--model", "jivi", "--method", "focei"],
        ["federate", "--data", "missing.csv", "--model", "jivi"],
        ["dose", "missing.json"],
    ],
)
def test_nonempty_out_folder_is_refused_before_any_work(capsys, tmp_path, command):
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "result.json").write_text("{}")
    err = _refused(capsys, [*command, "--out", str(out)], "--out", "--overwrite")
    assert "missing" not in err  # refused before the input was even opened
    assert [p.name for p in out.iterdir()] == ["result.json"]


@pytest.mark.parametrize(
    "options, name",
    [
        ("{rounds: 3}", "not valid JSON"),
        ('{"rounds": 3, "rounds": 4}', "duplicate key(s) rounds"),
        ('{"learning_rate": NaN}', "NaN"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_federate_options_json_is_checked(capsys, tmp_path, options, name):
    _refused(
        capsys,
        [
            "federate",
            "--data",
            "missing.csv",
            "--model",
            "jivi",
            "--out",
            str(tmp_path / "o"),
            "--options",
            options,
        ],
        "--options",
        name,
    )


def test_serve_passes_allowed_hosts(monkeypatch, capsys):
    import phems_clinical.app.web as web

    seen = {}
    monkeypatch.setattr(web, "serve", lambda **kw: seen.update(kw))
    assert (
        main(
            [
                "serve",
                "--host",
                "0.0.0.0",
                "--allowed-host",
                "ward.example",
                "--allowed-host",
                "10.0.0.5",
            ]
        )
        == 0
    )
    assert seen == {
        "host": "0.0.0.0",
        "port": 8000,
        "allowed_hosts": ["ward.example", "10.0.0.5"],
        "db": None,
    }
    main(["serve"])
    assert seen["allowed_hosts"] is None  # the app's loopback default


def test_sign_request_never_replaces_silently(capsys, tmp_path):
    key, token = tmp_path / "me.key", tmp_path / "request.txt"
    assert main(["governance", "keygen", "--out", str(key)]) == 0
    sign = [
        "governance",
        "sign-request",
        "--key",
        str(key),
        "--requester",
        "r",
        "--experiment",
        "e",
        "--algorithm",
        "fedavg",
        "--rounds",
        "3",
        "--out",
        str(token),
    ]
    token.write_text("an earlier request\n")
    _refused(capsys, sign, "--out", "--overwrite")
    assert token.read_text() == "an earlier request\n"
    capsys.readouterr()
    assert main([*sign, "--overwrite"]) == 0
    assert token.read_text().count(".") >= 1 and "earlier" not in token.read_text()


def test_audit_show_names_the_log(capsys, tmp_path):
    log = tmp_path / "site.log"
    log.write_bytes(b'{"seq": 1}\n\xff\xfe not json\n')
    _refused(capsys, ["audit", "show", str(log)], str(log), "line 2")


def test_option_for_maps_values_to_options():
    args = argparse.Namespace(
        data="d.csv", site_policy_dir="pol", patient="p.json", extra=["a", "b"]
    )
    assert cli._option_for(args, "d.csv") == "--data"
    assert cli._option_for(args, "pol") == "--site-policy-dir"
    assert cli._option_for(args, "p.json") == "patient"
    assert cli._option_for(args, "b") == "--extra"
    assert cli._option_for(args, "zzz") is None
    assert cli.redact("password=x") == "password=***"
