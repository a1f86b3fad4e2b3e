"""The ``phems`` command line.

Subcommands::

    phems run [HYDRA OVERRIDES]   the main job (Hydra): simulate hospitals, fit, report
    phems fit --data D.csv --model M.yaml|PRODUCT --method focei|nuts|svi --out DIR
    phems simulate --model PRODUCT --n N --design hospitals|rich|sparse|sparse2 --out F
    phems products                list the product library with typical half-lives
    phems dose PATIENT.json --out DIR [--method map|nuts]
                                  one patient's PK curve and regimens
    phems serve [--host H --port P]   the clinician web app
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

Errors in the input (data rows, model fields, options) are printed as one clear
message and the command exits with status 2; nothing is written half-way silently.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _x64() -> None:
    from phems_clinical.runtime import configure_jax

    configure_jax()


def _fit(args: argparse.Namespace) -> int:
    from phems_clinical.app.fit import run_fit

    options = {}
    if args.method == "nuts":
        options = {"num_warmup": args.warmup, "num_samples": args.samples,
                   "num_chains": args.chains}
    elif args.method == "svi":
        options = {"num_steps": args.steps}
    if args.priors == "library":
        if args.method == "focei":
            raise ValueError("--priors: FOCEI takes no priors (use nuts or svi)")
        options["priors"] = "library"
    if args.dv_unit:
        options["dv_unit"] = None if args.dv_unit == "none" else args.dv_unit
    res = run_fit(args.data, args.model, args.method, args.out, seed=args.seed,
                  options=options)
    head = {k: res[k] for k in ("method", "model", "n_subjects", "n_observations",
                                "n_blq")}
    head["excluded_records"] = len(res["exclusions"])
    if res["objective"]:
        head["ofv"] = round(res["objective"]["ofv"], 4)
    head["theta"] = {k: round(v["estimate"], 5) for k, v in res["theta"].items()}
    head["run"] = res["run"]
    print(json.dumps(head, indent=2))
    print(f"wrote {args.out}/estimates.json, estimates.nc, model.yaml, gof.png, "
          "vpc.png")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import jax

    from phems_clinical.app.fit import resolve_model
    from phems_clinical.pk.simulate import (
        HospitalSpec,
        default_hospitals,
        simulate_hospitals,
    )

    model = resolve_model(args.model)
    if args.design == "hospitals":
        hospitals = default_hospitals(args.n)
    else:
        hospitals = [HospitalSpec("H1", args.n, design=args.design,
                                  age_range=(args.min_age, args.max_age))]
    events, truth = simulate_hospitals(jax.random.key(args.seed), model, hospitals)
    events.to_csv(args.out, index=False)
    if args.truth:
        truth.to_csv(args.truth, index=False)
    print(f"wrote {len(truth)} patients, {int((events.EVID == 0).sum())} samples "
          f"({int(events.BLQ.sum())} BLQ) to {args.out}")
    return 0


def _products(args: argparse.Namespace) -> int:
    from phems_clinical.pk.derived import effective_half_life, terminal_half_life
    from phems_clinical.pk.library import list_products, load_product
    from phems_clinical.pk.model import covariate_vector, typical_parameters

    print(f"{'product':<20} {'factor':<6} {'cmt':>3} {'t1/2 term (h)':>14} "
          f"{'t1/2 eff (h)':>13}  citation")
    for name in list_products():
        m = load_product(name)
        p = typical_parameters(m, m.theta_values,
                               covariate_vector(m, m.reference_covariates))
        print(f"{name:<20} {m.metadata.get('factor', ''):<6} {m.n_cmt:>3} "
              f"{float(terminal_half_life(p, m.n_cmt)):>14.1f} "
              f"{float(effective_half_life(p, m.n_cmt)):>13.1f}  "
              f"{m.metadata.get('citation', '')}")
    return 0


def _dose(args: argparse.Namespace) -> int:
    from pathlib import Path

    from phems_clinical.app.dose import run_dose, write_dose_outputs

    source = sys.stdin.buffer.read() if args.patient == "-" else \
        Path(args.patient).read_bytes()
    out = run_dose(source, method=args.method, seed=args.seed)
    paths = write_dose_outputs(out, args.out)
    r = out.result
    for w in r["warnings"]:
        print(f"warning: {w['field']}: {w['message']}", file=sys.stderr)

    def show(e, unit):
        return (f"{e['median']:.3g} {unit} "
                f"(90% interval {e['lo90']:.3g}-{e['hi90']:.3g})")

    print(f"{r['model']['name']}: terminal half-life {show(r['half_life_h'], 'h')}; "
          f"effective half-life {show(r['effective_half_life_h'], 'h')}; "
          f"clearance {show(r['clearance_mL_h_kg'], 'mL/h/kg')}")
    for t, e in r["time_to_threshold_h"].items():
        if isinstance(e["median"], float):
            print(f"  time to {t} IU/dL after the last infusion: {show(e, 'h')}")
    print(f"regimens (P(trough >= target) >= {r['trough_probability']:g}):")
    for g in r["regimens"]:
        dose = (f"{g['dose_IU']:.0f} IU ({g['dose_IU_kg']:.0f} IU/kg), "
                f"P = {g['trough_prob']:.2f}" if g["dose_IU"] is not None
                else "not reachable")
        print(f"  every {g['interval_h']:g} h, trough >= {g['target_IU_dL']:g} "
              f"IU/dL: {dose}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _federate(args: argparse.Namespace) -> int:
    from phems_clinical.app.federate import run_federate

    options = json.loads(args.options) if args.options else {}
    if not isinstance(options, dict):
        raise ValueError("--options: expected a JSON object, e.g. '{\"rounds\": 20}'")
    if args.rounds is not None:
        options["rounds"] = args.rounds
    res = run_federate(args.data, args.model, args.algorithm, args.out,
                       seed=args.seed, options=options, secagg=args.secagg,
                       min_sites=args.min_sites, checkpoint=args.checkpoint,
                       compare_pooled=args.compare_pooled,
                       policy_dir=args.site_policy_dir, requester=args.requester,
                       experiment=args.experiment,
                       request=(Path(args.request).read_text().strip()
                                if args.request else ""),
                       site_key_dir=args.site_key_dir)
    head = {k: res[k] for k in ("algorithm", "model", "rounds", "converged",
                                "seconds")}
    head["sites"] = {s["name"]: s["n_patients"] for s in res["sites"]}
    if "pooled" in res:
        head["max_relative_difference_to_pooled"] = res["pooled"][
            "max_relative_difference"]
    print(json.dumps(head, indent=2))
    print(f"wrote {args.out}/result.json")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from phems_clinical.app.web import serve

    print(f"phems serve: open http://{args.host}:{args.port}/ (Ctrl-C to stop)")
    serve(host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phems", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="the main job (Hydra app); pass Hydra overrides",
                   add_help=False)

    f = sub.add_parser("fit", help="fit a population PK model")
    f.add_argument("--data", required=True, help="NONMEM-style CSV data set")
    f.add_argument("--model", required=True, help="model YAML or library product")
    f.add_argument("--method", required=True, choices=("focei", "nuts", "svi"))
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--seed", type=int, default=0, help="PRNG seed (NUTS/SVI/VPC)")
    f.add_argument("--chains", type=int, default=2)
    f.add_argument("--warmup", type=int, default=500)
    f.add_argument("--samples", type=int, default=500)
    f.add_argument("--steps", type=int, default=6000, help="SVI steps")
    f.add_argument("--priors", default="weak", choices=("weak", "library"),
                   help="NUTS/SVI priors: weakly informative, or centred on the "
                        "model's published values (product library)")
    f.add_argument("--dv-unit", default=None, choices=("IU/dL", "IU/mL", "none"),
                   help="unit of DV when the file has no DVUNIT column "
                        "('none': no conversion or unit checks)")
    f.set_defaults(func=_fit)

    s = sub.add_parser("simulate", help="simulate a virtual cohort (NONMEM-style CSV)")
    s.add_argument("--model", required=True, help="library product or model YAML")
    s.add_argument("--n", type=int, default=100, help="number of patients")
    s.add_argument("--design", default="hospitals",
                   choices=("hospitals", "rich", "sparse", "sparse2"))
    s.add_argument("--min-age", type=float, default=1.0)
    s.add_argument("--max-age", type=float, default=65.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="CSV file to write")
    s.add_argument("--truth", default=None, help="CSV of true individual parameters")
    s.set_defaults(func=_simulate)

    p = sub.add_parser("products", help="list the FVIII/FIX product library")
    p.set_defaults(func=_products)

    d = sub.add_parser("dose", help="one patient's PK curve and prophylaxis regimens "
                                    "from measured levels")
    d.add_argument("patient", help="patient request JSON file ('-' reads stdin); see "
                                   "data_schemas/dosing_request.schema.json")
    d.add_argument("--out", required=True, help="output directory (result.json, "
                                                "curve.png, report.html)")
    d.add_argument("--method", default="map", choices=("map", "nuts"),
                   help="map: posterior mode + Laplace draws (fast, default); "
                        "nuts: the full individual posterior")
    d.add_argument("--seed", type=int, default=None,
                   help="PRNG seed (default: the request's options.seed, else 0)")
    d.set_defaults(func=_dose)

    w = sub.add_parser("serve", help="start the clinician web app (local)")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, default=8000)
    w.set_defaults(func=_serve)

    g = sub.add_parser("federate", help="federated population-PK fit over the "
                                        "hospitals of a data set (in process)")
    g.add_argument("--data", required=True,
                   help="NONMEM-style CSV with a SITE column (one hospital per value)")
    g.add_argument("--model", required=True, help="library product or model YAML")
    g.add_argument("--algorithm", default="fed_focei",
                   choices=("fed_focei", "fedavg", "fedprox", "fedadam", "fedyogi",
                            "ep", "consensus_mc"))
    g.add_argument("--out", required=True, help="output directory (result.json)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--rounds", type=int, default=None, help="maximum rounds")
    g.add_argument("--options", default=None,
                   help="algorithm options as JSON, e.g. '{\"local_steps\": 3, "
                        "\"dp\": {\"clip\": 50, \"noise_multiplier\": 1.0}}'")
    g.add_argument("--secagg", action="store_true",
                   help="sum the sites' messages with secure aggregation")
    g.add_argument("--min-sites", type=int, default=None,
                   help="fewest sites a round may complete with (default: all)")
    g.add_argument("--checkpoint", default=None,
                   help="checkpoint folder: saved every round, resumed if present")
    g.add_argument("--compare-pooled", action="store_true",
                   help="also fit all patients pooled and report the difference")
    g.add_argument("--site-policy-dir", default=None,
                   help="folder with each site's policy <SITE>.yaml; audit logs and "
                        "privacy ledgers are written next to them")
    g.add_argument("--requester", default="",
                   help="data user id, optional: must match the signed --request")
    g.add_argument("--experiment", default="",
                   help="experiment name, optional: must match the signed --request")
    g.add_argument("--request", default=None, metavar="FILE",
                   help="the data user's signed request (from 'phems governance "
                        "sign-request'); required with --site-policy-dir")
    g.add_argument("--site-key-dir", default=None,
                   help="folder (outside --site-policy-dir) of each site's audit "
                        "MAC key <SITE>.key, created on first use")
    g.set_defaults(func=_federate)

    from phems_clinical.app.audit import add_audit_parser
    from phems_clinical.app.cardiac import add_cardiac_parser
    from phems_clinical.app.derive import add_derive_parsers
    from phems_clinical.app.governance import add_governance_parser
    from phems_clinical.app.omop import add_omop_parser
    from phems_clinical.app.sepsis import add_sepsis_parser

    add_audit_parser(sub)
    add_governance_parser(sub)
    add_omop_parser(sub)
    add_sepsis_parser(sub)
    add_cardiac_parser(sub)
    add_derive_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if argv and argv[0] == "run":
        from phems_clinical import runner

        sys.argv = ["phems run", *argv[1:]]
        runner.main()
        return 0
    args = build_parser().parse_args(argv)
    _x64()
    from phems_clinical.data.dosing_request import RequestError
    from phems_clinical.data.nonmem import DataValidationError
    from phems_clinical.pk.spec import ModelSpecError

    try:
        return args.func(args)
    except RequestError as err:
        print(f"phems {args.command}: {len(err.errors)} error(s) in the input:",
              file=sys.stderr)
        for e in err.errors:
            print(f"  {e.field or '(input)'}: {e.message}", file=sys.stderr)
        return 2
    except (DataValidationError, ModelSpecError, ValueError, KeyError,
            FileNotFoundError) as err:
        print(f"phems {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # e.g. a federated round aborted below threshold
        print(f"phems {args.command}: stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
