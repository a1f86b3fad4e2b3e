"""The ``phems`` command line.

Subcommands::

    phems run [HYDRA OVERRIDES]   the main job (Hydra): simulate hospitals, fit, report
    phems fit --data D.csv --model M.yaml|PRODUCT --method focei|nuts|svi --out DIR
    phems simulate --model PRODUCT --n N --design hospitals|rich|sparse|sparse2 --out F
    phems products                list the product library with typical half-lives
    phems dose PATIENT.json --out DIR [--method map|nuts]
                                  one patient's PK curve and regimens
    phems serve [--host H --port P] [--db F]   the clinician web app
    phems patients list|history|show|export --db F
                                  the clinic's patient history (local file)
    phems federate --data D.csv --model PRODUCT --algorithm fed_focei|... --out DIR
                                  a federated popPK fit over the data's hospitals
    phems audit verify LOG --key KEY [--anchor SEQ:MAC] | show LOG
                                  check or list a site's MAC'd audit log
    phems governance keygen|sign-request|site-key
                                  a data user's key and signed requests; a
                                  site's audit MAC key
    phems omop simulate --use-case picu|cardiac|haemophilia --out DIR
                                  simulated hospitals as OMOP DuckDB files
    phems omop check DB           what the loaders exclude from a site's OMOP data
    phems sepsis --omop DIR --out OUT [--model logistic|tcn]
                                  PICU sepsis risk: federated, per site + held out
    phems cardiac --omop DIR --out OUT
                                  cardiac pathways: federated multi-state model

Exit statuses (every command, ``phems run`` included):

* 0: done;
* 2: the input cannot be used (a data row, model field, option, Hydra override,
  file or database): one message ``phems <cmd>: error: <what, naming the row,
  field or option>`` on standard error, nothing written;
* 1: the run stopped for another reason (e.g. a federated round below its
  threshold of sites), or an internal error, i.e. a bug: a short message naming
  the exception type and where; set ``PHEMS_DEBUG=1`` for the full traceback.
  ``phems audit verify`` also exits 1 for a log that fails verification.

Outputs are never replaced silently: ``--out`` must be new or empty unless
``--overwrite`` is given, and results are written whole or not at all.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import textwrap
import traceback
from pathlib import Path

#: Environment variable that makes an internal error print its full traceback.
DEBUG_ENV = "PHEMS_DEBUG"
#: Most patients ``phems simulate --n`` writes in one CSV.
MAX_SIMULATED = 100_000


def _x64() -> None:
    from phems_clinical.runtime import configure_jax

    configure_jax()


# ------------------------------------------------------------ --version, run --help
def version_text() -> str:
    """``phems --version``: the installed versions of phems_clinical and JAX (read
    from the package metadata, so JAX is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"phems_clinical {of('phems_clinical')} (jax {of('jax')})"


#: ``phems run`` configuration groups in the order ``phems run --help`` lists
#: them, with what choosing one does.
RUN_GROUPS = {
    "experiment": "a committed study: sets the groups below and its own settings",
    "use_case": "the clinical question",
    "model": "the model trained (PK product, sepsis or cardiac model)",
    "inference": "the federated strategy",
    "federation": "where training runs",
    "source": "how a data source is derived from each hospital's real patients "
    "(used as sources.<name>)",
    "cohort": "the simulated cohort of the PK demo (--config-name pk_demo)",
}


def config_description(path: Path) -> str:
    """A config file's leading comment up to the first line that ends a sentence
    (its ``@package`` line and example commands left out); ``""`` when it has
    none."""
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        if not text or text.startswith("phems "):
            break
        lines.append(text)
        if text.endswith((".", "?")):
            break
    return " ".join(lines)


def _default_choices(config: Path) -> dict[str, str]:
    """``{group: option}`` of the defaults list of the main job's config."""
    import yaml

    chosen: dict[str, str] = {}
    for entry in yaml.safe_load(config.read_text(encoding="utf-8"))["defaults"]:
        if isinstance(entry, dict):
            for key, value in entry.items():
                group = key.split("@")[0]
                if group in RUN_GROUPS and value is not None:
                    chosen.setdefault(group, str(value))
    return chosen


def run_help_text(configs: Path | None = None) -> str:
    """``phems run --help``: the configuration groups with their options and
    descriptions (read from ``configs/<group>/*.yaml``), the committed
    experiments and example overrides."""
    from phems_clinical.resources import configs_dir

    root = Path(configs) if configs is not None else configs_dir()
    defaults = _default_choices(root / "config.yaml")
    out = [
        "usage: phems run [OVERRIDE ...]      (Hydra: group=option key=value)",
        "",
        "The main job: real, anonymised and synthetic data side by side. Simulated",
        "hospitals (or your OMOP databases, data.omop=DIR) each derive every data",
        "source; the model is trained federatedly on each source and scored on",
        "held-out real patients and a held-out hospital; each source gets a",
        "privacy and fidelity scorecard. Results: outputs/<experiment>/<time>/.",
        "",
        "Configuration groups (choose one option with group=option; * = default):",
    ]
    for group, what in RUN_GROUPS.items():
        files = sorted((root / group).glob("*.yaml"))
        if not files:
            continue
        out += ["", f"  {group}: {what}"]
        width = max(len(f.stem) for f in files)
        for f in files:
            mark = "*" if defaults.get(group) == f.stem else " "
            out += textwrap.wrap(
                config_description(f),
                79,
                initial_indent=f"   {mark} {f.stem:<{width}}  ",
                subsequent_indent=" " * (width + 7),
            )
    out += [
        "",
        "Examples:",
        "  phems run                                   the default experiment",
        "  phems run experiment=picu_sepsis            a committed study",
        "  phems run -m seed=0,1,2                     a sweep (multirun)",
        "  phems run data.n_per_site=60 federation.secagg=true inference=fedadam",
        "  phems run federation=flower                 real Flower processes",
        "  phems run data.omop=DIR                     your sites' OMOP databases",
        "  phems run --config-name pk_demo model=kovaltry cohort=rich",
        "",
        "Hydra's own options still work: --cfg job (print the composed settings),",
        "--hydra-help (Hydra's flags), -m/--multirun, --config-name NAME.",
        "Exit statuses: 0 done, 2 a bad override or setting (nothing runs), 1 other.",
    ]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------ option types
def seed_arg(text: str) -> int:
    """argparse type of ``--seed``: an integer within the ``seed`` plausibility
    limit (``data_schemas/plausibility.json``: the signed 64-bit range)."""
    from phems_clinical.data.plausibility import check

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    finding = check("seed", value)
    if finding is not None:
        raise argparse.ArgumentTypeError(finding.message)
    return value


def count_arg(least: int = 1, most: int | None = None):
    """argparse type of a count (``--n``, ``--chains``, rounds...): an integer
    ``>= least`` (and ``<= most`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number >= {least}, got {text!r}"
            ) from None
        if value < least or (most is not None and value > most):
            bound = f">= {least}" if most is None else f"from {least} to {most}"
            raise argparse.ArgumentTypeError(
                f"expected a whole number {bound}, got {value}"
            )
        return value

    parse.__name__ = "count"
    return parse


def limit_arg(name: str):
    """argparse type of a number checked against plausibility limit ``name``
    (e.g. ``age_y`` for ``--min-age``); NaN and infinities are refused."""
    from phems_clinical.data.plausibility import check

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number, got {text!r}"
            ) from None
        finding = check(name, value)
        if finding is not None and finding.level == "error":
            raise argparse.ArgumentTypeError(finding.message)
        return value

    parse.__name__ = "number"
    return parse


def _port(text: str) -> int:
    return count_arg(1, 65535)(text)


_port.__name__ = "port"


# ------------------------------------------------------------ error contract
def _option_for(args: argparse.Namespace | None, filename: str) -> str | None:
    """The option (``--data``) or positional (``patient``) whose value is
    ``filename``, for messages that name it."""
    if args is None or not filename:
        return None
    for dest, value in vars(args).items():
        values = value if isinstance(value, list | tuple) else [value]
        if any(
            isinstance(v, str | os.PathLike) and os.fspath(v) == filename
            for v in values
        ):
            return (
                dest
                if dest in ("patient", "log", "path", "db")
                else "--" + dest.replace("_", "-")
            )
    return None


_SECRET = re.compile(
    r"(password\s*=\s*)(\S+)|(://[^:/@\s]+:)([^@\s]+)(@)", re.IGNORECASE
)


def redact(text: str) -> str:
    """``text`` with any password of a connection string (``password=...``,
    ``scheme://user:PASSWORD@host``) replaced by ``***``.

    >>> redact("postgresql://site:s3cret@db/omop; password=abc dbname=x")
    'postgresql://site:***@db/omop; password=*** dbname=x'
    """
    return _SECRET.sub(lambda m: f"{m[1]}***" if m[1] else f"{m[3]}***{m[5]}", text)


def _module_of(err: BaseException) -> str:
    return type(err).__module__.split(".")[0]


def user_error_message(
    err: BaseException, args: argparse.Namespace | None = None
) -> str | None:
    """The one-line (or, for several input errors, one-per-line) message of a
    user-caused error, naming the option, file, row or field; ``None`` when
    ``err`` is not user-caused (an internal error).

    User-caused: ``ValueError`` (with ``OutputExistsError``,
    ``DataValidationError``, ``ModelSpecError``, ``RequestError``, JSON and
    Unicode errors), ``KeyError``, ``OSError`` (the file and, when known, its
    option are named), ``OverflowError``, DuckDB and psycopg2 errors (any
    connection password redacted), YAML errors, and Hydra's and OmegaConf's
    configuration errors.

    >>> user_error_message(KeyError(None))
    'a required value is missing or empty (check for empty cells and fields)'
    >>> user_error_message(FileNotFoundError(2, "No such file or directory", "x.csv"),
    ...                    argparse.Namespace(data="x.csv"))
    '--data: No such file or directory: x.csv'
    >>> user_error_message(ZeroDivisionError("division by zero")) is None
    True
    """
    errors = getattr(err, "errors", None)
    if (
        isinstance(err, ValueError)
        and isinstance(errors, list | tuple)
        and errors
        and all(hasattr(e, "message") for e in errors)
    ):  # RequestError
        lines = [f"{getattr(e, 'field', '') or '(input)'}: {e.message}" for e in errors]
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} errors in the input:\n  " + "\n  ".join(lines)
    module = _module_of(err)
    if module in ("hydra", "omegaconf"):  # before OSError: a missing config is one
        return _config_error_message(err)
    if isinstance(err, OSError):
        name = err.filename
        if name is None:
            return str(err) or type(err).__name__
        option = _option_for(args, os.fspath(name))
        what = err.strerror or type(err).__name__
        text = f"{what}: {os.fspath(name)}"
        if err.filename2 is not None:
            text += f" -> {os.fspath(err.filename2)}"
        return f"{option}: {text}" if option else text
    if isinstance(err, KeyError):
        key = err.args[0] if err.args else None
        if key is None or (isinstance(key, str) and not key.strip()):
            return (
                "a required value is missing or empty (check for empty cells "
                "and fields)"
            )
        return key if isinstance(key, str) else f"no entry for {key!r}"
    if isinstance(err, UnicodeDecodeError):
        return (
            f"the input is not {err.encoding} text (byte {err.start}: "
            f"{err.reason}); expected a UTF-8 text file"
        )
    if isinstance(err, OverflowError):
        return f"a number is too large ({err})"
    if module in ("duckdb", "_duckdb"):
        return f"DuckDB: {redact(str(err)).strip()}"
    if module == "psycopg2":
        first = redact(str(err)).strip().splitlines()
        return "PostgreSQL: " + (
            " ".join(line.strip() for line in first) if first else type(err).__name__
        )
    if module == "yaml":
        return f"YAML: {str(err).strip()}"
    if isinstance(err, ValueError):
        return str(err) or type(err).__name__
    return None


def _config_error_message(err: BaseException) -> str:
    """Hydra's or OmegaConf's message, with its cause (the override's type
    error) and without the config search path."""
    text = str(err).split("\nConfig search path:")[0].strip()
    cause = err.__cause__
    if cause is not None:
        head = str(cause).strip().splitlines()
        key = next(
            (line.strip() for line in head if line.strip().startswith("full_key:")), ""
        )
        text += f": {head[0] if head else type(cause).__name__}"
        if key and key.split(":", 1)[1].strip():
            text += f" ({key})"
    return text


def internal_error_message(err: BaseException) -> str:
    """A short message for an internal error: its type and where (the last
    frame in phems_clinical), never its text, which may hold data values."""
    where = ""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        path = frame.filename.replace(os.sep, "/")
        if "/phems_clinical/" in path:
            where = (
                f" at phems_clinical/{path.split('/phems_clinical/')[-1]}:"
                f"{frame.lineno}"
            )
            break
    return (
        f"internal error ({type(err).__name__}{where}); this is a bug, not "
        f"your input. Set {DEBUG_ENV}=1 for the full traceback"
    )


def debug() -> bool:
    """Whether ``PHEMS_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def _parse_json_option(text: str, option: str) -> object:
    """JSON of an option, refusing duplicate keys and NaN/Infinity by name."""

    def pairs(items):
        keys = [k for k, _ in items]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"{option}: duplicate key(s) {', '.join(dup)}")
        return dict(items)

    def constant(name):
        raise ValueError(f"{option}: {name} is not a number JSON allows")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{option}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None


def _refuse_existing_file(path: str | None, option: str, overwrite: bool) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option}: {path} is a folder; expected a file name")
    if p.exists() and not overwrite:
        from phems_clinical.outputs import OutputExistsError

        raise OutputExistsError(
            f"{option}: {path} exists; choose a new file or "
            f"pass --overwrite to replace it"
        )


# ------------------------------------------------------------ commands
def _fit(args: argparse.Namespace) -> int:
    from phems_clinical.app.fit import run_fit
    from phems_clinical.outputs import check_out

    check_out(args.out, overwrite=args.overwrite)
    options = {}
    if args.method == "nuts":
        options = {
            "num_warmup": args.warmup,
            "num_samples": args.samples,
            "num_chains": args.chains,
        }
    elif args.method == "svi":
        options = {"num_steps": args.steps}
    if args.priors == "library":
        if args.method == "focei":
            raise ValueError("--priors: FOCEI takes no priors (use nuts or svi)")
        options["priors"] = "library"
    if args.dv_unit:
        options["dv_unit"] = None if args.dv_unit == "none" else args.dv_unit
    res = run_fit(
        args.data,
        args.model,
        args.method,
        args.out,
        seed=args.seed,
        options=options,
        overwrite=args.overwrite,
    )
    head = {
        k: res[k] for k in ("method", "model", "n_subjects", "n_observations", "n_blq")
    }
    head["excluded_records"] = len(res["exclusions"])
    for e in res["exclusions"]:
        print(
            f"excluded: row {e['row']} (ID {e['id'] or '-'}): {e['reason']}",
            file=sys.stderr,
        )
    for w in res["data_warnings"]:
        where = f"row {w['row']}" if w["row"] else "data set"
        col = f", {w['column']}" if w.get("column") else ""
        print(f"warning: {where}{col}: {w['message']}", file=sys.stderr)
    if res["objective"]:
        head["ofv"] = round(res["objective"]["ofv"], 4)
    head["theta"] = {k: round(v["estimate"], 5) for k, v in res["theta"].items()}
    head["run"] = res["run"]
    print(json.dumps(head, indent=2))
    print(
        f"wrote {args.out}/estimates.json, estimates.nc, model.yaml, gof.png, vpc.png"
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import jax

    from phems_clinical.app.fit import resolve_model
    from phems_clinical.outputs import write_atomic
    from phems_clinical.pk.simulate import (
        HospitalSpec,
        default_hospitals,
        simulate_hospitals,
    )

    _refuse_existing_file(args.out, "--out", args.overwrite)
    _refuse_existing_file(args.truth, "--truth", args.overwrite)
    if args.truth is not None and os.path.abspath(args.truth) == os.path.abspath(
        args.out
    ):
        raise ValueError("--truth: must differ from --out")
    if args.design == "hospitals" and args.n < 3:
        raise ValueError(
            f"--n: the 'hospitals' design spreads patients over three "
            f"hospitals; expected at least 3, got {args.n}"
        )
    if not args.min_age < args.max_age:
        raise ValueError(
            f"--min-age/--max-age: expected min < max, got "
            f"{args.min_age:g} and {args.max_age:g}"
        )
    model = resolve_model(args.model)
    if args.design == "hospitals":
        hospitals = default_hospitals(args.n)
    else:
        hospitals = [
            HospitalSpec(
                "H1", args.n, design=args.design, age_range=(args.min_age, args.max_age)
            )
        ]
    events, truth = simulate_hospitals(jax.random.key(args.seed), model, hospitals)
    if args.truth:
        write_atomic(args.truth, truth.to_csv(index=False))
    write_atomic(args.out, events.to_csv(index=False))
    print(
        f"wrote {len(truth)} patients, {int((events.EVID == 0).sum())} samples "
        f"({int(events.BLQ.sum())} BLQ) to {args.out}"
    )
    return 0


def _products(args: argparse.Namespace) -> int:
    """The product library as a clinician chooses from it: brand, INN and model,
    ages, assay, typical half-lives, what is unverified and when to choose it."""
    from phems_clinical.dosing.workflow import requires_acknowledgement
    from phems_clinical.pk.library import products_table

    rows = products_table()
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    for r in rows:
        head = f"{r['display']}  [id: {r['id']}{', default' if r['default'] else ''}]"
        print(head)
        print(
            f"    {r['factor']}, {r['half_life_class']} half-life; ages "
            f"{r['ages'] or 'not recorded'}; assay {r['assay'] or 'not recorded'}; "
            f"typical half-life {r['effective_half_life_h']:g} h effective, "
            f"{r['terminal_half_life_h']:g} h terminal"
        )
        needs = requires_acknowledgement(r["unverified"])
        status = (
            "all model values verified against the publication"
            if not needs
            else "UNVERIFIED: " + ", ".join(needs) + " (use needs --accept-unverified)"
        )
        if informational := [u for u in r["unverified"] if u not in needs]:
            status += f"; not verified, informational only: {', '.join(informational)}"
        print(f"    {status}")
        if r["choose_when"]:
            print(f"    choose when: {r['choose_when']}")
    return 0


def _evaluate_arg(text: str) -> dict:
    """argparse type of ``phems dose --evaluate``: ``SCHEDULE:DOSE IU`` or
    ``SCHEDULE:DOSE IU/kg`` (``"Mon/Wed/Fri:1000IU"``, ``"every 48 h:40IU/kg"``)."""
    m = re.fullmatch(
        r"\s*(.+?)\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*(IU/kg|IU)\s*", text, flags=re.I
    )
    if m is None:
        raise argparse.ArgumentTypeError(
            f"expected SCHEDULE:DOSE IU or SCHEDULE:DOSE IU/kg (e.g. "
            f"'Mon/Wed/Fri:1000IU', 'every 48 h:40IU/kg'), got {text!r:.60}"
        )
    key = "dose_IU_kg" if m.group(3).lower() == "iu/kg" else "dose_IU"
    value = float(m.group(2))
    if not 0 < value <= (200 if key == "dose_IU_kg" else 100_000):
        raise argparse.ArgumentTypeError(
            f"expected a dose > 0 and <= {200 if key == 'dose_IU_kg' else 100_000} "
            f"{m.group(3)}, got {m.group(2)}"
        )
    return {"schedule": m.group(1), key: value}


def _open_arg(lo: float, hi: float, what: str, *, hi_open: bool = False):
    """argparse type of a number ``> lo`` and ``<= hi`` (``< hi`` if ``hi_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > lo and (value < hi if hi_open else value <= hi)):
            raise argparse.ArgumentTypeError(
                f"expected {what}: a number > {lo:g} and {'<' if hi_open else '<='} "
                f"{hi:g}, got {text!r:.40}"
            )
        return value

    return parse


def _dose_request(args: argparse.Namespace, source: bytes) -> bytes:
    """The request with the command line's overrides (``--accept-unverified``,
    ``--assay``, ``--target``, ``--schedule``, ``--probability``,
    ``--max-dose-iu-kg``, ``--evaluate``) applied; unchanged bytes without any."""
    top = {
        "acknowledge_unverified": True if args.accept_unverified else None,
        "assay": args.assay,
    }
    opts = {
        "targets_IU_dL": args.target,
        "schedules": args.schedule,
        "trough_probability": args.probability,
        "max_dose_IU_kg": args.max_dose_iu_kg,
        "evaluate": args.evaluate,
    }
    top = {k: v for k, v in top.items() if v is not None}
    opts = {k: v for k, v in opts.items() if v is not None}
    if not top and not opts:
        return source
    from phems_clinical.data.dosing_request import load_json

    obj = load_json(source)
    if not isinstance(obj, dict):
        return source  # refused by the parser, naming what was expected
    obj.update(top)
    if opts:
        given = obj.get("options")
        obj["options"] = {**(given if isinstance(given, dict) else {}), **opts}
    return json.dumps(obj).encode("utf-8")


def _dose(args: argparse.Namespace) -> int:
    from pathlib import Path

    from phems_clinical.app.dose import run_dose, write_dose_outputs
    from phems_clinical.outputs import check_out

    check_out(args.out, overwrite=args.overwrite)
    source = (
        sys.stdin.buffer.read()
        if args.patient == "-"
        else Path(args.patient).read_bytes()
    )
    source = _dose_request(args, source)
    clinic = _dose_history(args, source)
    out = run_dose(
        source,
        method=args.method,
        seed=args.seed,
        **previous_kw(run_dose, clinic and clinic[1]),
    )
    paths = write_dose_outputs(out, args.out, overwrite=args.overwrite)
    if clinic is not None:
        from phems_clinical.data.dosing_request import load_json
        from phems_clinical.dosing.history import save_assessment

        store, _, when = clinic
        with store:
            aid = save_assessment(store, load_json(source), out.result, when=when)
        print(
            f"saved assessment {aid} of patient {out.result['patient_id']} "
            f"in {args.db}",
            file=sys.stderr,
        )
    from phems_clinical.dosing.wording import as_text

    # the same text as the report and the page (result["display"]); the
    # warnings also on stderr, where scripts look for them
    disp = out.result["display"]
    for w in disp["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(as_text(disp))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _federate(args: argparse.Namespace) -> int:
    from phems_clinical.app.federate import run_federate
    from phems_clinical.outputs import check_out

    check_out(args.out, overwrite=args.overwrite)
    options = _parse_json_option(args.options, "--options") if args.options else {}
    if not isinstance(options, dict):
        raise ValueError("--options: expected a JSON object, e.g. '{\"rounds\": 20}'")
    if args.rounds is not None:
        options["rounds"] = args.rounds
    res = run_federate(
        args.data,
        args.model,
        args.algorithm,
        args.out,
        seed=args.seed,
        options=options,
        secagg=args.secagg,
        min_sites=args.min_sites,
        checkpoint=args.checkpoint,
        compare_pooled=args.compare_pooled,
        policy_dir=args.site_policy_dir,
        requester=args.requester,
        experiment=args.experiment,
        request=(Path(args.request).read_text().strip() if args.request else ""),
        site_key_dir=args.site_key_dir,
        overwrite=args.overwrite,
    )
    head = {k: res[k] for k in ("algorithm", "model", "rounds", "converged", "seconds")}
    head["sites"] = {s["name"]: s["n_patients"] for s in res["sites"]}
    if "pooled" in res:
        head["max_relative_difference_to_pooled"] = res["pooled"][
            "max_relative_difference"
        ]
    print(json.dumps(head, indent=2))
    print(f"wrote {args.out}/result.json")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from phems_clinical.app.web import serve

    print(f"phems serve: open http://{args.host}:{args.port}/ (Ctrl-C to stop)")
    serve(host=args.host, port=args.port, allowed_hosts=args.allowed_host, db=args.db)
    return 0


# ------------------------------------------------------------ patient history
def _open_db(path: str, *, create: bool):
    """The clinic's history file of ``--db`` (created when ``create``)."""
    from phems_clinical.dosing.history import StoreError, open_store

    if not create and not Path(path).is_file():
        raise ValueError(
            f"--db: {path} does not exist (expected the clinic's "
            "patient-history file written by 'phems dose --db' or "
            "'phems serve --db')"
        )
    try:
        return open_store(path)
    except StoreError as err:
        raise StoreError(f"--db: {err}") from None


def previous_kw(run, previous) -> dict:
    """``previous=`` for the dosing run when it takes one: the earlier
    assessment's result, with its date as ``assessed_at``."""
    import inspect

    if previous is None or "previous" not in inspect.signature(run).parameters:
        return {}
    return {
        "previous": {**previous.result, "assessed_at": previous.summary.assessed_at}
    }


def _dose_history(args: argparse.Namespace, source: bytes):
    """``phems dose --db``: (store, previous assessment, date of this one), or
    None without ``--db``. A request without a patient id is refused first."""
    if not args.db:
        return None
    from phems_clinical.data.dosing_request import (
        FieldError,
        RequestError,
        parse_request,
    )
    from phems_clinical.dosing import history

    req = parse_request(source)
    if not (req.patient_id or "").strip():
        raise RequestError(
            [
                FieldError(
                    "patient_id",
                    (
                        "a patient id is required with --db (the assessment is saved under "
                        "it in the patient history)"
                    ),
                )
            ]
        )
    store = _open_db(args.db, create=True)
    when = history.assessment_time(req.time_origin, [lv.time_h for lv in req.levels])
    previous = history.previous_assessment(store, req.patient_id.strip(), before=when)
    return store, previous, when


def _print_table(columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows, strict=True)]
    for row in (columns, ["-" * w for w in widths], *rows):
        print(
            "  ".join(
                str(x).ljust(w) for x, w in zip(row, widths, strict=True)
            ).rstrip()
        )


def _patients(args: argparse.Namespace) -> int:
    from phems_clinical.dosing import history

    cmd = args.patients_command
    if cmd in ("show", "export"):
        if cmd == "show":
            from phems_clinical.outputs import check_out

            check_out(args.out, overwrite=args.overwrite)
        else:
            _refuse_existing_file(args.out, "--out", args.overwrite)
    with _open_db(args.db, create=False) as store:
        if cmd == "list":
            rows = [
                [
                    p.patient_id,
                    str(p.n_assessments),
                    p.first_assessed.replace("T", " "),
                    p.last_assessed.replace("T", " "),
                ]
                for p in history.list_patients(store)
            ]
            _print_table(["Patient", "Assessments", "First", "Latest"], rows)
        elif cmd == "history":
            table = history.history_table(store, args.patient_id)
            _print_table(
                ["Id", *table["columns"]],
                [
                    [str(i), *r]
                    for i, r in zip(table["assessment_ids"], table["rows"], strict=True)
                ],
            )
        elif cmd == "show":
            from phems_clinical.app.dose import redraw_dose, write_dose_outputs

            s = history.assessment_summary(store, args.assessment_id)
            _, result = history.load_assessment(store, s.assessment_id)
            prev = history.previous_assessment(
                store, s.patient_id, before=s.assessed_at, exclude_id=s.assessment_id
            )
            out = redraw_dose(result, previous_kw(redraw_dose, prev).get("previous"))
            paths = write_dose_outputs(out, args.out, overwrite=args.overwrite)
            print(
                f"assessment {s.assessment_id} of patient {s.patient_id} "
                f"({s.assessed_at.replace('T', ' ')}): wrote "
                + ", ".join(str(p) for p in paths)
            )
        else:
            from phems_clinical.outputs import write_atomic

            text = history.export(store, args.patient_id, args.format)
            write_atomic(args.out, text)
            print(f"wrote {args.out}")
    return 0


def _add_patients_parser(sub) -> None:
    p = sub.add_parser(
        "patients", help="the clinic's patient history (a local database file, --db)"
    )
    psub = p.add_subparsers(dest="patients_command", required=True)

    def db(q):
        q.add_argument(
            "--db",
            required=True,
            help="the clinic's patient-history "
            "file (SQLite; holds patient data: keep it in the clinic)",
        )
        q.set_defaults(func=_patients)

    db(psub.add_parser("list", help="patients with saved assessments"))
    q = psub.add_parser("history", help="one patient's assessments over time")
    q.add_argument("patient_id", metavar="PATIENT", help="patient id")
    db(q)
    q = psub.add_parser(
        "show",
        help="reopen a saved assessment: write its "
        "result.json, curve.png and report.html",
    )
    q.add_argument(
        "assessment_id",
        metavar="ASSESSMENT_ID",
        type=count_arg(1),
        help="the assessment's id (first column of 'patients history')",
    )
    q.add_argument("--out", required=True, help="output directory, new or empty")
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder as a whole",
    )
    db(q)
    q = psub.add_parser("export", help="one patient's history as a JSON or CSV file")
    q.add_argument("patient_id", metavar="PATIENT", help="patient id")
    q.add_argument(
        "--format",
        default="json",
        choices=("json", "csv"),
        help="json: every request and result as saved; csv: one row per assessment",
    )
    q.add_argument("--out", required=True, help="file to write (new)")
    q.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file"
    )
    db(q)


#: Subcommands whose modules import JAX, pandas or jsonschema at import time:
#: (module, parser function, {command: help}). :func:`build_parser` imports a
#: module only when one of its commands is run (``phems --help`` and the other
#: commands start without them); tests/app/test_cli_imports.py checks the help
#: texts against the modules'.
_LAZY_PARSERS = (
    (
        "phems_clinical.app.audit",
        "add_audit_parser",
        {"audit": "check or list a site's audit log of outgoing messages"},
    ),
    (
        "phems_clinical.app.governance",
        "add_governance_parser",
        {"governance": "data users' keys and signed requests; sites' audit MAC keys"},
    ),
    (
        "phems_clinical.app.omop",
        "add_omop_parser",
        {"omop": "hospitals as OMOP CDM 5.4 databases: simulate, check"},
    ),
    (
        "phems_clinical.app.sepsis",
        "add_sepsis_parser",
        {
            "sepsis": "PICU sepsis risk: federated model from each site's OMOP database, "
            "evaluated per site and on a held-out hospital"
        },
    ),
    (
        "phems_clinical.app.cardiac",
        "add_cardiac_parser",
        {
            "cardiac": "cardiac pathways: federated multi-state model from each site's "
            "OMOP database, evaluated per site and on a held-out hospital"
        },
    ),
    (
        "phems_clinical.app.derive",
        "add_derive_parsers",
        {
            "anonymise": "anonymised version of a site's data, with its scorecard",
            "synthesize": "synthetic version of a site's data, with its scorecard",
        },
    ),
)


def _command_of(argv: list[str] | None) -> str | None:
    """The subcommand ``argv`` names (its first word that is not an option)."""
    return next((a for a in argv or () if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``phems`` parser; with ``argv``, the subcommands of
    :data:`_LAZY_PARSERS` other than the one ``argv`` runs are help-only stubs."""
    parser = argparse.ArgumentParser(prog="phems", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--version",
        action="version",
        version=version_text(),
        help="print the versions of phems_clinical and JAX and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "run",
        help="the main job (Hydra app); pass Hydra overrides "
        "('phems run --help' lists them)",
        add_help=False,
    )

    f = sub.add_parser("fit", help="fit a population PK model")
    f.add_argument("--data", required=True, help="NONMEM-style CSV data set")
    f.add_argument("--model", required=True, help="model YAML or library product")
    f.add_argument(
        "--method",
        required=True,
        choices=("focei", "nuts", "svi"),
        help="focei: maximum likelihood (NONMEM's FOCE-I); nuts: "
        "full posterior (NumPyro NUTS); svi: variational posterior",
    )
    f.add_argument("--out", required=True, help="output directory (new or empty)")
    f.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder as a whole",
    )
    f.add_argument("--seed", type=seed_arg, default=0, help="PRNG seed (NUTS/SVI/VPC)")
    f.add_argument(
        "--chains", type=count_arg(1), default=2, help="NUTS chains (default 2)"
    )
    f.add_argument(
        "--warmup",
        type=count_arg(0),
        default=500,
        help="NUTS warm-up draws per chain (default 500)",
    )
    f.add_argument(
        "--samples",
        type=count_arg(1),
        default=500,
        help="NUTS draws kept per chain (default 500)",
    )
    f.add_argument("--steps", type=count_arg(1), default=6000, help="SVI steps")
    f.add_argument(
        "--priors",
        default="weak",
        choices=("weak", "library"),
        help="NUTS/SVI priors: weakly informative, or centred on the "
        "model's published values (product library)",
    )
    f.add_argument(
        "--dv-unit",
        default=None,
        choices=("IU/dL", "IU/mL", "none"),
        help="unit of DV when the file has no DVUNIT column "
        "('none': no conversion or unit checks)",
    )
    f.set_defaults(func=_fit)

    s = sub.add_parser("simulate", help="simulate a virtual cohort (NONMEM-style CSV)")
    s.add_argument("--model", required=True, help="library product or model YAML")
    s.add_argument(
        "--n", type=count_arg(1, MAX_SIMULATED), default=100, help="number of patients"
    )
    s.add_argument(
        "--design",
        default="hospitals",
        choices=("hospitals", "rich", "sparse", "sparse2"),
        help="sampling design: hospitals (three case-mixes, default), "
        "rich (10 samples over 48 h), sparse (3 samples, ISTH), "
        "sparse2 (the first and last sparse samples)",
    )
    s.add_argument(
        "--min-age",
        type=limit_arg("age_y"),
        default=1.0,
        help="youngest age (years; 'rich'/'sparse' designs)",
    )
    s.add_argument(
        "--max-age", type=limit_arg("age_y"), default=65.0, help="oldest age (years)"
    )
    s.add_argument("--seed", type=seed_arg, default=0, help="PRNG seed (default 0)")
    s.add_argument("--out", required=True, help="CSV file to write (new)")
    s.add_argument("--truth", default=None, help="CSV of true individual parameters")
    s.add_argument(
        "--overwrite", action="store_true", help="replace existing --out/--truth files"
    )
    s.set_defaults(func=_simulate)

    p = sub.add_parser("products", help="list the FVIII/FIX product library")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the table as JSON (one object per product)",
    )
    p.set_defaults(func=_products)

    d = sub.add_parser(
        "dose",
        help="one patient's PK curve and prophylaxis regimens from measured levels",
    )
    d.add_argument(
        "patient",
        help="patient request JSON file ('-' reads stdin); see "
        "data_schemas/dosing_request.schema.json",
    )
    d.add_argument(
        "--out",
        required=True,
        help="output directory, new or empty (result.json, curve.png, report.html)",
    )
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder as a whole",
    )
    d.add_argument(
        "--method",
        default="map",
        choices=("map", "nuts"),
        help="map: posterior mode + Laplace draws (fast, default); "
        "nuts: the full individual posterior",
    )
    d.add_argument(
        "--seed",
        type=seed_arg,
        default=None,
        help="PRNG seed (default: the request's options.seed, else 0)",
    )
    d.add_argument(
        "--db",
        default=None,
        metavar="FILE",
        help="the clinic's patient-history file (SQLite, created if "
        "absent): the assessment is saved under the request's "
        "patient_id and the report shows the previous one",
    )
    d.add_argument(
        "--accept-unverified",
        action="store_true",
        help="use a product whose model has sections not verified "
        "against the primary paper (recorded in the result and "
        "shown as a warning); without it such a model is refused",
    )
    d.add_argument(
        "--assay",
        choices=("one-stage", "chromogenic"),
        default=None,
        help="assay of the measured levels (overrides the request's "
        "assay); converted to the model's assay where the label "
        "publishes a factor",
    )
    d.add_argument(
        "--target",
        type=_open_arg(0, 100, "a trough target in IU/dL"),
        action="append",
        default=None,
        metavar="IU_DL",
        help="trough target in IU/dL (repeatable; overrides options.targets_IU_dL)",
    )
    d.add_argument(
        "--schedule",
        action="append",
        default=None,
        metavar="TEXT",
        help="dosing schedule for the regimen designer (repeatable; "
        "e.g. 'every 48 h', 'Mon/Wed/Fri', '3x/week', 'every 7 "
        "days'; overrides options.schedules)",
    )
    d.add_argument(
        "--probability",
        type=_open_arg(0.5, 1, "the required P(trough >= target)", hi_open=True),
        default=None,
        help="required probability that the trough stays at or above "
        "the target (> 0.5 and < 1; overrides "
        "options.trough_probability)",
    )
    d.add_argument(
        "--max-dose-iu-kg",
        type=_open_arg(0, 200, "the cap on a designed dose in IU/kg"),
        default=None,
        metavar="IU_KG",
        help="the cap on a designed dose per infusion, IU/kg (default "
        "100; overrides options.max_dose_IU_kg)",
    )
    d.add_argument(
        "--evaluate",
        type=_evaluate_arg,
        action="append",
        default=None,
        metavar="SCHEDULE:DOSE",
        help="a regimen to evaluate as given: 'Mon/Wed/Fri:1000IU' or "
        "'every 48 h:40IU/kg' (repeatable; overrides "
        "options.evaluate)",
    )
    d.set_defaults(func=_dose)

    w = sub.add_parser("serve", help="start the clinician web app (local)")
    w.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    w.add_argument(
        "--port", type=_port, default=8000, help="TCP port to listen on (default 8000)"
    )
    w.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="HOST",
        help="a Host header the app answers (repeatable; default: the "
        "loopback names); needed when --host is not loopback",
    )
    w.add_argument(
        "--db",
        default=None,
        metavar="FILE",
        help="the clinic's patient-history file (SQLite, created if "
        "absent): enables saving and reopening assessments",
    )
    w.set_defaults(func=_serve)

    g = sub.add_parser(
        "federate",
        help="federated population-PK fit over the "
        "hospitals of a data set (in process)",
    )
    g.add_argument(
        "--data",
        required=True,
        help="NONMEM-style CSV with a SITE column (one hospital per value)",
    )
    g.add_argument("--model", required=True, help="library product or model YAML")
    g.add_argument(
        "--algorithm",
        default="fed_focei",
        choices=(
            "fed_focei",
            "fedavg",
            "fedprox",
            "fedadam",
            "fedyogi",
            "ep",
            "consensus_mc",
        ),
        help="federated algorithm (default fed_focei: the pooled FOCEI "
        "estimate from exact sums)",
    )
    g.add_argument(
        "--out", required=True, help="output directory, new or empty (result.json)"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder as a whole",
    )
    g.add_argument("--seed", type=seed_arg, default=0, help="PRNG seed (default 0)")
    g.add_argument("--rounds", type=count_arg(1), default=None, help="maximum rounds")
    g.add_argument(
        "--options",
        default=None,
        help='algorithm options as JSON, e.g. \'{"local_steps": 3, '
        '"dp": {"clip": 50, "noise_multiplier": 1.0}}\'',
    )
    g.add_argument(
        "--secagg",
        action="store_true",
        help="sum the sites' messages with secure aggregation",
    )
    g.add_argument(
        "--min-sites",
        type=count_arg(1),
        default=None,
        help="fewest sites a round may complete with (default: all)",
    )
    g.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint folder: saved every round, resumed if present",
    )
    g.add_argument(
        "--compare-pooled",
        action="store_true",
        help="also fit all patients pooled and report the difference",
    )
    g.add_argument(
        "--site-policy-dir",
        default=None,
        help="folder with each site's policy <SITE>.yaml; audit logs and "
        "privacy ledgers are written next to them",
    )
    g.add_argument(
        "--requester",
        default="",
        help="data user id, optional: must match the signed --request",
    )
    g.add_argument(
        "--experiment",
        default="",
        help="experiment name, optional: must match the signed --request",
    )
    g.add_argument(
        "--request",
        default=None,
        metavar="FILE",
        help="the data user's signed request (from 'phems governance "
        "sign-request'); required with --site-policy-dir",
    )
    g.add_argument(
        "--site-key-dir",
        default=None,
        help="folder (outside --site-policy-dir) of each site's audit "
        "MAC key <SITE>.key, created on first use",
    )
    g.set_defaults(func=_federate)

    chosen = _command_of(argv)
    for module, adder, helps in _LAZY_PARSERS:
        if argv is None or chosen in helps:
            getattr(importlib.import_module(module), adder)(sub)
        else:  # listed by name and help only: their modules load JAX and pandas
            for name, text in helps.items():
                sub.add_parser(name, help=text, add_help=False)
    _add_patients_parser(sub)
    return parser


def _run(argv: list[str]) -> int:
    """``phems run``: check every job's settings (Hydra composition and
    :func:`phems_clinical.runner.validate.check_config`), then start Hydra.
    Returns the exit status (2: a bad override or setting, before anything
    runs)."""
    if any(a in ("-h", "--help") for a in argv):
        print(run_help_text(), end="")
        return 0
    from phems_clinical import runner
    from phems_clinical.runner.validate import preflight

    try:
        preflight(argv)
    except Exception as err:  # noqa: BLE001 - sorted into the contract below
        return _report(err, "run", None)
    sys.argv = ["phems run", *argv]
    try:
        runner.main()
    except SystemExit as done:  # Hydra's own exit, or the job's (runner.main)
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _report(err: BaseException, command: str, args: argparse.Namespace | None) -> int:
    """Print ``err`` by the error contract; return the exit status (2 or 1)."""
    message = user_error_message(err, args)
    if debug():
        traceback.print_exception(err)
    if message is not None:
        print(f"phems {command}: error: {message}", file=sys.stderr)
        return 2
    if isinstance(err, RuntimeError) and type(err) is RuntimeError:
        # e.g. a federated round aborted below its threshold of sites
        print(f"phems {command}: stopped: {err}", file=sys.stderr)
        return 1
    if debug():
        raise err
    print(f"phems {command}: {internal_error_message(err)}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run one ``phems`` command; returns its exit status (see the module doc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if argv and argv[0] == "run":
        return _run(argv[1:])
    args = build_parser(argv).parse_args(argv)
    _x64()
    command = args.command
    for sub in (
        "audit_command",
        "governance_command",
        "omop_command",
        "patients_command",
    ):
        if getattr(args, sub, None):
            command += f" {getattr(args, sub)}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"phems {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted into the contract in _report
        return _report(err, command, args)


if __name__ == "__main__":
    sys.exit(main())
