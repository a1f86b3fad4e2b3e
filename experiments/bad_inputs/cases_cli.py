"""Bad options, paths and outputs across the ``phems`` commands: seeds, counts and
ages; missing, unreadable and folder paths; outputs that would be replaced; JSON
options; governance and audit.

Each case's ``names`` is the option, argument or file the message must name.
"""

from pathlib import Path

from harness import Case


def _file(tmp: Path, name: str, text: str | bytes) -> str:
    p = tmp / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def _nonempty(tmp: Path) -> str:
    out = tmp / "earlier"
    out.mkdir()
    (out / "result.json").write_text("{}")
    return str(out)


def _site_key(tmp: Path) -> str:
    from phems_clinical.federation.governance import create_site_key

    create_site_key(tmp / "site.key")
    return str(tmp / "site.key")


def _key(tmp: Path) -> str:
    from phems_clinical.app.cli import main

    main(["governance", "keygen", "--out", str(tmp / "me.key")])
    return str(tmp / "me.key")


SIGN = [
    "governance",
    "sign-request",
    "--requester",
    "r",
    "--experiment",
    "e",
    "--algorithm",
    "fedavg",
]
SIM = ["simulate", "--model", "jivi", "--design", "rich"]

CASES = [
    # ---- phems simulate
    Case(
        "phems simulate",
        "seed 10^30",
        r"--seed",
        lambda t: [*SIM, "--seed", str(10**30), "--out", "c.csv"],
    ),
    Case(
        "phems simulate",
        "negative seed",
        r"--seed",
        lambda t: [*SIM, "--seed", "-1", "--out", "c.csv"],
    ),
    Case(
        "phems simulate",
        "seed not an integer",
        r"--seed",
        lambda t: [*SIM, "--seed", "1.5", "--out", "c.csv"],
    ),
    Case(
        "phems simulate",
        "--n 0",
        r"--n",
        lambda t: [*SIM, "--n", "0", "--out", "c.csv"],
    ),
    Case(
        "phems simulate",
        "--n 10^9",
        r"--n",
        lambda t: [*SIM, "--n", str(10**9), "--out", "c.csv"],
    ),
    Case(
        "phems simulate",
        "hospitals design with 2 patients",
        r"--n",
        lambda t: ["simulate", "--model", "jivi", "--n", "2", "--out", "c.csv"],
    ),
    Case(
        "phems simulate",
        "--min-age NaN",
        r"--min-age",
        lambda t: [*SIM, "--min-age", "nan", "--out", "c.csv"],
    ),
    Case(
        "phems simulate",
        "--max-age 500",
        r"--max-age",
        lambda t: [*SIM, "--max-age", "500", "--out", "c.csv"],
    ),
    Case(
        "phems simulate",
        "--min-age above --max-age",
        r"--min-age",
        lambda t: [*SIM, "--min-age", "40", "--max-age", "10", "--out", "c.csv"],
    ),
    Case(
        "phems simulate",
        "--out exists",
        r"--out.*--overwrite",
        lambda t: [*SIM, "--n", "3", "--out", _file(t, "c.csv", "old\n")],
    ),
    Case(
        "phems simulate",
        "--out is a folder",
        r"--out",
        lambda t: [*SIM, "--n", "3", "--out", str(t)],
    ),
    Case(
        "phems simulate",
        "--truth same as --out",
        r"--truth",
        lambda t: [*SIM, "--n", "3", "--out", "c.csv", "--truth", "c.csv"],
    ),
    Case(
        "phems simulate",
        "unknown model",
        r"nosuchproduct",
        lambda t: ["simulate", "--model", "nosuchproduct", "--out", "c.csv"],
    ),
    # ---- phems fit: options and paths (data rows are cases_fit's)
    Case(
        "phems fit",
        "seed 10^30",
        r"--seed",
        lambda t: [
            "fit",
            "--data",
            "d.csv",
            "--model",
            "jivi",
            "--method",
            "focei",
            "--out",
            "o",
            "--seed",
            str(10**30),
        ],
    ),
    Case(
        "phems fit",
        "--chains 0",
        r"--chains",
        lambda t: [
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
    ),
    Case(
        "phems fit",
        "--steps -1",
        r"--steps",
        lambda t: [
            "fit",
            "--data",
            "d.csv",
            "--model",
            "jivi",
            "--method",
            "svi",
            "--out",
            "o",
            "--steps",
            "-1",
        ],
    ),
    Case(
        "phems fit",
        "--data missing",
        r"--data.*missing\.csv",
        lambda t: [
            "fit",
            "--data",
            "missing.csv",
            "--model",
            "jivi",
            "--method",
            "focei",
            "--out",
            "o",
        ],
    ),
    Case(
        "phems fit",
        "--data is a folder",
        r"--data|no <site>\.duckdb",
        lambda t: [
            "fit",
            "--data",
            str(t),
            "--model",
            "jivi",
            "--method",
            "focei",
            "--out",
            "o",
        ],
    ),
    Case(
        "phems fit",
        "--out holds earlier results",
        r"--out.*--overwrite",
        lambda t: [
            "fit",
            "--data",
            "missing.csv",
            "--model",
            "jivi",
            "--method",
            "focei",
            "--out",
            _nonempty(t),
        ],
    ),
    Case(
        "phems fit",
        "--out is a file",
        r"--out",
        lambda t: [
            "fit",
            "--data",
            "missing.csv",
            "--model",
            "jivi",
            "--method",
            "focei",
            "--out",
            _file(t, "o.txt", "x"),
        ],
    ),
    # ---- phems dose: options and paths (request fields are cases_dose's)
    Case(
        "phems dose",
        "patient file missing",
        r"patient.*nobody\.json",
        lambda t: ["dose", "nobody.json", "--out", "o"],
    ),
    Case(
        "phems dose",
        "patient file is a folder",
        r"patient",
        lambda t: ["dose", str(t), "--out", "o"],
    ),
    Case(
        "phems dose",
        "patient file not UTF-8",
        r"(?i)utf-8|patient|encod",
        lambda t: ["dose", _file(t, "p.json", b"\xff\xfe{\x00}"), "--out", "o"],
    ),
    Case(
        "phems dose",
        "seed 10^30",
        r"--seed",
        lambda t: ["dose", "p.json", "--out", "o", "--seed", str(10**30)],
    ),
    Case(
        "phems dose",
        "--out holds the previous patient's report",
        r"--out.*--overwrite",
        lambda t: ["dose", "p.json", "--out", _nonempty(t)],
    ),
    # ---- phems federate
    Case(
        "phems federate",
        "--rounds 0",
        r"--rounds",
        lambda t: [
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
    ),
    Case(
        "phems federate",
        "--min-sites 0",
        r"--min-sites",
        lambda t: [
            "federate",
            "--data",
            "d.csv",
            "--model",
            "jivi",
            "--out",
            "o",
            "--min-sites",
            "0",
        ],
    ),
    Case(
        "phems federate",
        "seed 10^30",
        r"--seed",
        lambda t: [
            "federate",
            "--data",
            "d.csv",
            "--model",
            "jivi",
            "--out",
            "o",
            "--seed",
            str(10**30),
        ],
    ),
    Case(
        "phems federate",
        "--options not JSON",
        r"--options",
        lambda t: [
            "federate",
            "--data",
            "d.csv",
            "--model",
            "jivi",
            "--out",
            "o",
            "--options",
            "{rounds: 3}",
        ],
    ),
    Case(
        "phems federate",
        "--options duplicate key",
        r"--options.*rounds",
        lambda t: [
            "federate",
            "--data",
            "d.csv",
            "--model",
            "jivi",
            "--out",
            "o",
            "--options",
            '{"rounds": 3, "rounds": 30}',
        ],
    ),
    Case(
        "phems federate",
        "--options NaN",
        r"--options.*NaN",
        lambda t: [
            "federate",
            "--data",
            "d.csv",
            "--model",
            "jivi",
            "--out",
            "o",
            "--options",
            '{"learning_rate": NaN}',
        ],
    ),
    Case(
        "phems federate",
        "--options a list",
        r"--options",
        lambda t: [
            "federate",
            "--data",
            "d.csv",
            "--model",
            "jivi",
            "--out",
            "o",
            "--options",
            "[3]",
        ],
    ),
    Case(
        "phems federate",
        "--out holds earlier results",
        r"--out.*--overwrite",
        lambda t: [
            "federate",
            "--data",
            "d.csv",
            "--model",
            "jivi",
            "--out",
            _nonempty(t),
        ],
    ),
    Case(
        "phems federate",
        "--data missing",
        r"--data.*missing\.csv",
        lambda t: [
            "federate",
            "--data",
            "missing.csv",
            "--model",
            "jivi",
            "--out",
            "o",
        ],
    ),
    # ---- phems serve
    Case(
        "phems serve", "--port 70000", r"--port", lambda t: ["serve", "--port", "70000"]
    ),
    Case(
        "phems serve",
        "--port not a number",
        r"--port",
        lambda t: ["serve", "--port", "http"],
    ),
    # ---- phems governance / audit
    Case(
        "phems governance",
        "sign-request --rounds 0",
        r"--rounds",
        lambda t: [*SIGN, "--key", "k", "--rounds", "0"],
    ),
    Case(
        "phems governance",
        "sign-request --valid-hours NaN",
        r"--valid-hours",
        lambda t: [*SIGN, "--key", "k", "--rounds", "3", "--valid-hours", "nan"],
    ),
    Case(
        "phems governance",
        "sign-request --valid-hours 1e300",
        r"--valid-hours",
        lambda t: [*SIGN, "--key", "k", "--rounds", "3", "--valid-hours", "1e300"],
    ),
    Case(
        "phems governance",
        "sign-request --key missing",
        r"--key",
        lambda t: [*SIGN, "--key", "nokey", "--rounds", "3"],
    ),
    Case(
        "phems governance",
        "sign-request --key not hex",
        r"--key",
        lambda t: [*SIGN, "--key", _file(t, "k", "zz\n"), "--rounds", "3"],
    ),
    Case(
        "phems governance",
        "sign-request --out exists",
        r"--out.*--overwrite",
        lambda t: [
            *SIGN,
            "--key",
            _key(t),
            "--rounds",
            "3",
            "--out",
            _file(t, "req.txt", "an earlier request\n"),
        ],
    ),
    Case(
        "phems governance",
        "keygen --out exists",
        r"--out",
        lambda t: ["governance", "keygen", "--out", _file(t, "me.key", "x")],
    ),
    Case(
        "phems audit",
        "verify: log missing",
        r"no such audit log",
        lambda t: ["audit", "verify", "nolog", "--key", _site_key(t)],
    ),
    Case(
        "phems audit",
        "show: log not JSON lines",
        r"site\.log.*line 2",
        lambda t: [
            "audit",
            "show",
            _file(t, "site.log", b'{"seq": 1}\n\xff not json\n'),
        ],
    ),
    Case(
        "phems audit",
        "verify: bad --anchor",
        r"--anchor",
        lambda t: ["audit", "verify", "site.log", "--key", "k", "--anchor", "12"],
    ),
    Case(
        "phems audit",
        "show: log is a folder",
        r"cannot read",
        lambda t: ["audit", "show", str(t)],
    ),
]
