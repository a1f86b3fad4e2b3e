"""``phems anonymise`` and ``phems synthesize``: a data controller's commands.

Each runs inside one hospital on its OMOP database (a ``<site>.duckdb`` file, a
folder of them, or a PostgreSQL URL) or on a CSV extract in the use case's
analysis form (NONMEM-style PK events, the PICU hourly table, cardiac sojourns).
Per site it

1. splits the patients into a training part (the source of the derived data) and
   a holdout (``--holdout``, default 50 %: the control set of the privacy attacks
   and the real test data of the utility metrics);
2. derives the requested dataset from the training part
   (:func:`phems_clinical.evaluation.sources.derive`);
3. scores it next to the real training data with one scorecard
   (:func:`phems_clinical.evaluation.sources.score_sources`).

Outputs in ``--out/<site>/``: ``<use_case>_<source>.csv`` (the dataset to review
for release), ``scorecard.nc`` (xarray), ``scorecard.html`` (plain-language
report), ``report.json`` (what was changed or fitted, records excluded when
loading, sizes, seconds). Nothing leaves the site; the CSV is what the controller
may release after review. Every site is written into a temporary folder beside
``--out`` that becomes ``--out`` only when all sites succeeded
(:func:`phems_clinical.outputs.staged_dir`); a non-empty ``--out`` is refused
before any work unless ``--overwrite`` (then replaced as a whole).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd

from phems_clinical import usecases
from phems_clinical.evaluation import scorecard_report as rep
from phems_clinical.evaluation.sources import (
    TARGET_RISKS,
    SourceError,
    SourceSpec,
    derive,
    score_sources,
    split_patients,
)
from phems_clinical.outputs import check_out, staged_dir, strict_json
from phems_clinical.privacy.release import check_table

USE_CASES = usecases.names()
_DATE_NAME = re.compile(r"(date|datetime|DATE|DAT)$")


def load_use_case(
    use_case: str, *, omop: str | None = None, csv: str | None = None, model=None
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Each site's analysis table and load report, from OMOP or one CSV extract
    (``model``: the use case's model where its loader needs it, e.g. the factor
    of a population PK model)."""
    if (omop is None) == (csv is None):
        raise SourceError(
            "give exactly one of --omop (OMOP database) or --csv "
            "(analysis-form extract)"
        )
    if use_case not in USE_CASES:
        raise SourceError(f"--use-case: {use_case!r} is not one of {USE_CASES}")
    if csv is not None:
        path = Path(csv)
        if not path.is_file():
            raise FileNotFoundError(f"--csv: {csv} does not exist")
        df = pd.read_csv(path)
        for c in df.columns:
            if _DATE_NAME.search(str(c)) and df[c].dtype == object:
                df[c] = pd.to_datetime(df[c], errors="raise")
        return {path.stem: df}, {path.stem: {"source": str(path), "rows": len(df)}}
    return usecases.get(use_case).load(omop, model)


def run_derive(
    use_case: str,
    sources: list[SourceSpec],
    out: str | Path,
    *,
    omop: str | None = None,
    csv: str | None = None,
    seed: int = 0,
    holdout: float = 0.5,
    model: str | None = None,
    n_attacks: int = 200,
    utility: bool = True,
    site: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Derive and score ``sources`` at each site; write the outputs; return a
    summary per site (also in each ``report.json``). ``out`` must be missing or
    empty unless ``overwrite``; it appears only when every site succeeded."""
    out = check_out(out, overwrite=overwrite)
    if use_case not in USE_CASES:
        raise SourceError(f"--use-case: {use_case!r} is not one of {USE_CASES}")
    uc = usecases.get(use_case)
    pk_model = None
    if uc.default_model is not None:
        from phems_clinical.app.fit import resolve_model

        pk_model = resolve_model(model or uc.default_model)
    sites, loads = load_use_case(use_case, omop=omop, csv=csv, model=pk_model)
    if site is not None:
        if site not in sites:
            raise SourceError(f"--site: {site!r} is not one of {sorted(sites)}")
        sites = {site: sites[site]}
    with staged_dir(out, overwrite=overwrite) as staging:
        return _derive_sites(
            uc,
            sources,
            sites,
            loads,
            staging,
            seed=seed,
            holdout=holdout,
            pk_model=pk_model,
            n_attacks=n_attacks,
            utility=utility,
        )


def _derive_sites(
    uc, sources, sites, loads, out: Path, *, seed, holdout, pk_model, n_attacks, utility
) -> dict[str, Any]:
    key = jax.random.key(seed)
    use_case = uc.name
    summary = {}
    for i, (name, data) in enumerate(sorted(sites.items())):
        k_split, k_derive, k_score = jax.random.split(jax.random.fold_in(key, i), 3)
        check_table(data, uc.roles)  # every row, before any split or derivation
        train, hold = split_patients(k_split, data, uc, holdout)
        derived = [
            derive(jax.random.fold_in(k_derive, j), uc, train, spec, pk_model=pk_model)
            for j, spec in enumerate([SourceSpec("real", "real"), *sources])
        ]
        ds = score_sources(
            k_score,
            uc,
            train,
            hold,
            derived,
            n_attacks=n_attacks,
            utility=utility,
            pk_model=pk_model,
            seed=seed,
        )
        site_out = out / name
        site_out.mkdir()
        files = []
        for d in derived[1:]:
            table = d.data if d.data is not None else d.profile
            f = site_out / f"{use_case}_{d.spec.name}.csv"
            table.to_csv(f, index=False)
            files.append(f.name)
        title = (
            f"{use_case} at {name}: "
            + ", ".join(d.spec.name for d in derived[1:])
            + " next to the real data"
        )
        n_train = int(train[uc.patient_id].nunique())
        n_hold = int(hold[uc.patient_id].nunique())
        aux, secret = uc.attack_columns
        notes = (
            f"Scored on one row per {uc.unit} (patient profile): "
            + ", ".join(derived[0].profile.columns)
            + ".",
            f"{n_train} patients made the derived data; "
            f"{n_hold} held-out patients are the attacks' "
            "control set and the real test data of the utility metrics.",
            f"Attacks assume the attacker knows {', '.join(aux)}; the inference "
            f"attack tries to learn {secret}.",
        )
        rep.write_scorecard(ds, site_out, title=title, notes=notes)
        report = {
            "use_case": use_case,
            "site": name,
            "seed": seed,
            "holdout": holdout,
            "patients_train": n_train,
            "patients_holdout": n_hold,
            "load": loads.get(name, {}),
            "sources": {
                d.spec.name: {
                    "spec": {
                        "kind": d.spec.kind,
                        "method": d.spec.method,
                        "options": dict(d.spec.options),
                    },
                    "meta": d.meta,
                    "report": d.report,
                }
                for d in derived[1:]
            },
            "files": [*files, "scorecard.nc", "scorecard.html"],
        }
        (site_out / "report.json").write_text(
            json.dumps(strict_json(report), indent=2, allow_nan=False)
        )
        summary[name] = report
    return summary


# ------------------------------------------------------------------ CLI
def _common(p) -> None:
    p.add_argument(
        "--use-case",
        required=True,
        choices=USE_CASES,
        help="the use case whose data the input holds",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--omop",
        help="a site's OMOP database (<site>.duckdb, a folder "
        "of them, or a postgresql:// URL)",
    )
    src.add_argument("--csv", help="a CSV extract in the use case's analysis form")
    p.add_argument("--site", default=None, help="only this site of an OMOP folder")
    p.add_argument(
        "--out", required=True, help="output folder (one sub-folder per site)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the run key (default 0): the held-out split, "
        "generators and attacks",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.5,
        help="share of patients kept out of the derivation to score it",
    )
    p.add_argument(
        "--model",
        default=None,
        help="haemophilia: population model (library product or YAML; default advate)",
    )
    p.add_argument(
        "--attacks",
        type=int,
        default=200,
        help="attacks per privacy evaluation (anonymeter method)",
    )
    p.add_argument(
        "--no-utility",
        action="store_true",
        help="skip the utility metrics (model fits on each source)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out as a whole (refused otherwise)",
    )


def add_derive_parsers(subparsers) -> None:
    """Register ``phems anonymise`` and ``phems synthesize``."""
    a = subparsers.add_parser(
        "anonymise", help="anonymised version of a site's data, with its scorecard"
    )
    _common(a)
    a.add_argument("--k", type=int, default=5, help="k-anonymity (patients per class)")
    a.add_argument(
        "--l",
        type=int,
        default=None,
        help="distinct l-diversity of the sensitive attribute",
    )
    a.add_argument("--t", type=float, default=None, help="t-closeness (EMD)")
    a.add_argument(
        "--max-suppression",
        type=float,
        default=0.05,
        help="largest share of patients that may be suppressed",
    )
    a.add_argument(
        "--method",
        default="lattice",
        choices=("lattice", "mondrian"),
        help="lattice: optimal full-domain generalisation (default); "
        "mondrian: multidimensional partitioning (LeFevre 2006)",
    )
    a.add_argument(
        "--suppression",
        default="records",
        choices=("records", "cells"),
        help="records: suppress whole patients of failing classes; "
        "cells: single QI values (local suppression); "
        "--max-suppression is then the share of QI cells",
    )
    lon = a.add_argument_group(
        "longitudinal perturbation",
        "measured values and event times, which QI "
        "generalisation leaves as they are (default: off)",
    )
    lon.add_argument(
        "--micro-k",
        type=int,
        default=None,
        help="MDAV group size (>= 2) of each course's level",
    )
    lon.add_argument(
        "--noise",
        type=float,
        default=None,
        help="CV of the log-normal noise of concentrations and labs; "
        "SD, as a fraction of the column SD, of vital signs",
    )
    lon.add_argument(
        "--time-grid",
        type=float,
        default=None,
        help="event times rounded up to this grid (h, or d for cardiac)",
    )
    lon.add_argument(
        "--target",
        action="append",
        default=None,
        metavar="RISK=BOUND",
        help="residual risk accepted (upper end of its 95 %% "
        "interval), e.g. singling_out_risk=0.2; repeatable; the "
        "least-loss setting meeting every bound is searched on "
        "the site's training data (instead of --micro-k, "
        "--noise, --time-grid). Risks: " + ", ".join(TARGET_RISKS),
    )
    a.set_defaults(func=_anonymise_cmd)

    s = subparsers.add_parser(
        "synthesize", help="synthetic version of a site's data, with its scorecard"
    )
    _common(s)
    s.add_argument(
        "--generator",
        default=None,
        choices=(
            *dict.fromkeys(usecases.get(n).generator for n in USE_CASES),
            "copula",
            "mst",
        ),
        help="default: the use case's longitudinal generator (virtual PK "
        "patients, PICU sequences, cardiac pathways); copula: "
        "patient profiles by a Gaussian copula; mst: DP patient "
        "profiles",
    )
    s.add_argument("--epsilon", type=float, default=1.0, help="MST privacy budget")
    s.add_argument("--delta", type=float, default=1e-6, help="MST delta")
    s.add_argument(
        "--n",
        type=int,
        default=None,
        help="patients to generate (default: as many as the source)",
    )
    s.set_defaults(func=_synthesize_cmd)


def _run(args, spec: SourceSpec) -> int:
    summary = run_derive(
        args.use_case,
        [spec],
        args.out,
        omop=args.omop,
        csv=args.csv,
        seed=args.seed,
        holdout=args.holdout,
        model=args.model,
        n_attacks=args.attacks,
        utility=not args.no_utility,
        site=args.site,
        overwrite=args.overwrite,
    )
    for site, r in summary.items():
        print(f"{site}: wrote {args.out}/{site}/" + ", ".join(r["files"]))
    return 0


def _longitudinal_flags(args) -> dict:
    """The perturbation options of ``phems anonymise``, checked before any data
    are read (errors name the flag)."""
    opts: dict = {}
    if args.micro_k is not None:
        if args.micro_k < 2:
            raise SourceError(
                f"--micro-k: expected an integer >= 2, got {args.micro_k}"
            )
        opts["micro_k"] = args.micro_k
    if args.noise is not None:
        if not (np.isfinite(args.noise) and args.noise >= 0):
            raise SourceError(
                f"--noise: expected a finite number >= 0, got {args.noise}"
            )
        opts["noise"] = args.noise
    if args.time_grid is not None:
        if not (np.isfinite(args.time_grid) and args.time_grid > 0):
            raise SourceError(
                f"--time-grid: expected a finite number > 0, got {args.time_grid}"
            )
        opts["time_grid"] = args.time_grid
    if args.target:
        if opts:
            raise SourceError(
                f"--target: the search chooses --micro-k, --noise and "
                f"--time-grid itself; drop {sorted(opts)} or --target"
            )
        target: dict[str, float] = {}
        for item in args.target:
            risk, sep, bound = item.partition("=")
            if not sep or risk not in TARGET_RISKS:
                raise SourceError(
                    f"--target: expected RISK=BOUND with RISK one of "
                    f"{', '.join(TARGET_RISKS)}, got {item!r}"
                )
            try:
                b = float(bound)
            except ValueError:
                b = float("nan")
            if not 0 <= b <= 1:
                raise SourceError(
                    f"--target {risk}: expected a bound in [0, 1], got {bound!r}"
                )
            if risk in target:
                raise SourceError(f"--target: {risk} is given twice")
            target[risk] = b
        opts["target"] = target
    return opts


def _anonymise_cmd(args) -> int:
    opts = {
        "k": args.k,
        "l": args.l,
        "t": args.t,
        "max_suppression": args.max_suppression,
    }
    if args.suppression != "records":
        opts["suppression"] = args.suppression
    opts.update(_longitudinal_flags(args))
    return _run(args, SourceSpec("anonymised", "anonymised", args.method, opts))


def _synthesize_cmd(args) -> int:
    own = usecases.get(args.use_case).generator
    gen = args.generator or own
    if gen not in ("mst", "copula", own):
        raise SourceError(
            f"--generator: {gen!r} does not apply to {args.use_case}; "
            f"use {own!r}, 'copula' or 'mst'"
        )
    opts: dict = {} if args.n is None else {"n": args.n}
    if gen == "mst":
        if not args.epsilon > 0 or not np.isfinite(args.epsilon):
            raise SourceError(
                f"--epsilon: must be a positive finite number, got {args.epsilon}"
            )
        opts.update(epsilon=args.epsilon, delta=args.delta)
    name = f"synthetic-{gen}" if gen in ("mst", "copula") else "synthetic"
    return _run(args, SourceSpec(name, "synthetic", gen, opts))


__all__ = ["add_derive_parsers", "load_use_case", "run_derive"]
