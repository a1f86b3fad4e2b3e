#!/usr/bin/env python
"""Federation benchmark: in-process speed, secure-aggregation overhead, federated
against pooled, and Flower on loopback. Prints one markdown table, device named.

Run from the repository root (writes ``experiments/benchmarks/federation_<dev>.md``):

    python experiments/benchmarks/bench_federation.py            # full (~25 min CPU)
    python experiments/benchmarks/bench_federation.py --quick    # smoke (~5 min)
    python experiments/benchmarks/bench_federation.py --no-flower

Rows (Advate population model, Björkman 2012; simulated hospitals cycling the
simulator's paediatric / adolescent / adult case-mixes, ``--per-site`` patients
each, default 8):

* **in-process FOCEI, K sites**: federated FOCEI to convergence for K = 3, 10,
  100; cold = first run (tracing + XLA compilation), warm = an identical second
  run; rounds per second = rounds / warm seconds. Every round is one compiled call
  (sites vmapped).
* **SecAgg overhead**: ``--secagg-rounds`` rounds with secure aggregation against
  an active server (Ed25519-signed X25519 keys, HKDF + ChaCha20 masks, Shamir
  shares, consistency round; threshold max(K-1, K/2+1), 48-bit quantisation)
  against the same rounds summed in the clear, measured in the same run: ratio of
  seconds per round.
* **federated vs pooled** (K = 5 hospitals): federated FOCEI against scipy-BFGS
  FOCEI on the pooled cohort (max relative difference over theta, omega, sigma);
  FedAdam on the per-patient FOCEI terms (same comparison, a fixed number of
  rounds); EP and one-shot consensus Monte Carlo against pooled NUTS on the same
  Gaussian prior (max |mean difference| / pooled SD and the range of SD ratios over
  the unconstrained population parameters).
* **Flower loopback**: a SuperLink and K = 3 SuperNodes as separate processes on
  127.0.0.1 running federated FOCEI; median seconds per round and start-up.
* **warm ClientApp host** (``--rows flower-warm``): the same loopback, K = 3,
  stock SuperNodes (a process per message) against one warm host per SuperNode
  with Flower's fixed waits capped (``flower.host``), median s/round of each in
  the same run; and the wall time of a full federated FOCEI fit of 5 hospitals
  over Flower with SecAgg on.
* **SecAgg over Flower**: the same loopback federation and rounds with secure
  aggregation (Bonawitz et al. 2017, signed keys and consistency check: one Flower
  message exchange per protocol stage) against the plain Flower round, measured
  in the same run: median seconds per round and their ratio.

* **FOCEI servers** (``--rows newton``, K = 3, 5, 10, 100): rounds, warm seconds
  and seconds per round of ``fed_focei`` with the exact-Hessian trust-region
  Newton, the BHHH curvature and BFGS, in the same run; max relative difference
  to the pooled fit for K <= 10.

``--rows`` picks rows (e.g. ``--rows flower-secagg`` reruns only the last one).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _bench  # noqa: E402  (experiments/benchmarks/_bench.py)

_bench.choose_device()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from _bench import log  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

from phems_clinical.federation.bayes import compare, pooled_reference  # noqa: E402
from phems_clinical.federation.engine import run_federated  # noqa: E402
from phems_clinical.federation.focei import fed_focei  # noqa: E402
from phems_clinical.federation.pk_sites import (  # noqa: E402
    cohorts_by_site,
    n_occasions_all,
    pad_sites,
    pooled,
)
from phems_clinical.federation.registry import build_algorithm  # noqa: E402
from phems_clinical.federation.secure import (  # noqa: E402
    default_secagg_config,
    secagg_aggregator,
)
from phems_clinical.pk.focei import fit_focei  # noqa: E402
from phems_clinical.pk.library import load_product  # noqa: E402
from phems_clinical.pk.simulate import (  # noqa: E402
    HospitalSpec,
    default_hospitals,
    simulate_hospitals,
)
from phems_clinical.provenance import (  # noqa: E402
    code_state,
    device_info,
    load_average,
    versions,
)


def hospitals(k: int, per_site: int) -> list[HospitalSpec]:
    """K hospitals cycling the simulator's three case-mixes."""
    kinds = default_hospitals(3 * per_site)
    return [
        kinds[i % 3]._replace(name=f"H{i:03d}", n_patients=per_site) for i in range(k)
    ]


def federation(model, k: int, per_site: int, seed: int = 0):
    events, _ = simulate_hospitals(jax.random.key(seed), model, hospitals(k, per_site))
    _, cohorts = cohorts_by_site(events, model)
    return cohorts, pad_sites(cohorts), n_occasions_all(cohorts)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(jax.tree.leaves(out.server))
    return out, time.perf_counter() - t0


def row(what, k, patients, rounds, seconds, per_round, accuracy, note=""):
    def f(v, p):
        return "–" if v is None else f"{v:.{p}g}"

    return (
        f"| {what} | {k} | {patients} | {rounds if rounds is not None else '–'} "
        f"| {f(seconds, 3)} | {f(per_round, 3)} | {accuracy} | {note} |"
    )


def bench_in_process(model, ks, per_site, rows):
    for k in ks:
        cohorts, sites, n_occ = federation(model, k, per_site)
        alg = fed_focei(model, n_occ)
        log(f"in-process FOCEI K={k}: cold")
        cold, t_cold = timed(run_federated, jax.random.key(0), alg, sites)
        log(f"in-process FOCEI K={k}: warm ({cold.rounds} rounds)")
        warm, t_warm = timed(run_federated, jax.random.key(0), alg, sites)
        rows.append(
            row(
                f"in-process federated FOCEI to convergence (cold {t_cold:.1f} s)",
                k,
                k * per_site,
                warm.rounds,
                t_warm,
                t_warm / warm.rounds,
                f"{warm.rounds / t_warm:.2f} rounds/s",
                "converged" if warm.converged else "NOT converged",
            )
        )


def _ignore(*args) -> None:
    """An ``on_message`` hook that only forces the engine's split round."""


def bench_secagg(model, ks, per_site, n_rounds, rows):
    for k in ks:
        _, sites, n_occ = federation(model, k, per_site)
        alg = fed_focei(model, n_occ, max_rounds=n_rounds)
        cfg = default_secagg_config(k)
        # the same split round (vmapped sites, then the sum on the host) both
        # times; compiled first
        run_federated(
            jax.random.key(0),
            alg,
            sites,
            max_rounds=1,
            aggregator=secagg_aggregator(cfg, n_sites=k),
        )
        log(f"SecAgg K={k}: {n_rounds} rounds plain and secure")
        p, t_plain = timed(
            run_federated, jax.random.key(0), alg, sites, on_message=_ignore
        )
        stats: list = []
        s, t_sec = timed(
            run_federated,
            jax.random.key(0),
            alg,
            sites,
            aggregator=secagg_aggregator(cfg, stats, n_sites=k),
        )
        err = float(
            np.max(
                np.abs(
                    np.asarray(s.server.solver.y_eval)
                    - np.asarray(p.server.solver.y_eval)
                )
            )
        )
        kb = np.mean([b for r in stats for b in r.bytes_per_site.values()]) / 1e3
        rows.append(
            row(
                "SecAgg vs plain sum (same rounds; ratio of s/round)",
                k,
                k * per_site,
                n_rounds,
                t_sec,
                t_sec / n_rounds,
                f"{t_sec / t_plain:.2f}x plain",
                f"{kb:.1f} kB/site/round; max |Δparam| {err:.1e}",
            )
        )


def bench_vs_pooled(model, k, per_site, nuts_samples, rows):
    cohorts, sites, n_occ = federation(model, k, per_site, seed=1)
    pc = pooled(cohorts)
    n = k * per_site
    log("pooled FOCEI")
    t0 = time.perf_counter()
    ref = fit_focei(model, pc, covariance=False)
    t_ref = time.perf_counter() - t0
    rows.append(
        row(
            "pooled FOCEI (scipy BFGS), the reference",
            1,
            n,
            ref.n_iterations,
            t_ref,
            None,
            "–",
            "iterations, not rounds",
        )
    )
    log("federated FOCEI")
    run, t = timed(run_federated, jax.random.key(0), fed_focei(model, n_occ), sites)
    rel = np.max(np.abs(np.asarray(run.result["estimates"]) / ref.estimates - 1))
    rows.append(
        row(
            "federated FOCEI vs pooled FOCEI",
            k,
            n,
            run.rounds,
            t,
            t / run.rounds,
            f"max rel. diff {rel:.1e}",
            "target < 1e-4",
        )
    )
    log("FedAdam on FOCEI terms")
    alg = build_algorithm(
        "fedadam",
        model,
        n_sites=k,
        n_occ=n_occ,
        options={"rounds": 100, "local_steps": 2},
    )
    run, t = timed(run_federated, jax.random.key(0), alg, sites)
    from phems_clinical.pk.packing import build_packer

    packer = build_packer(model)
    est = np.asarray(packer.to_natural(packer.unpack(run.server.x)))
    rel = np.max(np.abs(est / ref.estimates - 1))
    rows.append(
        row(
            "FedAdam on per-patient FOCEI terms vs pooled FOCEI",
            k,
            n,
            run.rounds,
            t,
            t / run.rounds,
            f"max rel. diff {rel:.2g}",
            "local SGD 2 steps, lr 1e-3; server Adam 0.02",
        )
    )
    log("pooled NUTS")
    t0 = time.perf_counter()
    nuts = pooled_reference(jax.random.key(1), model, pc, n_occ=n_occ)
    t_nuts = time.perf_counter() - t0
    rows.append(
        row(
            "pooled NUTS (4 x 2000 draws), the Bayesian reference",
            1,
            n,
            None,
            t_nuts,
            None,
            "–",
            "",
        )
    )
    for name in ("ep", "consensus_mc"):
        log(name)
        alg = build_algorithm(
            name, model, n_sites=k, n_occ=n_occ, options={"num_samples": nuts_samples}
        )
        run, t = timed(run_federated, jax.random.key(2), alg, sites)
        table = compare(run.result["summary"], nuts)
        x = table[table.index.str.startswith("x:")]
        acc = (
            f"max abs Δmean/SD {x.dmean_over_sd.max():.2f}; SD ratio "
            f"{x.sd_ratio.min():.2f}–{x.sd_ratio.max():.2f}"
        )
        rows.append(
            row(
                f"{'EP' if name == 'ep' else 'consensus MC'} vs pooled NUTS",
                k,
                n,
                run.rounds,
                t,
                t / max(run.rounds, 1),
                acc,
                "target < 0.1 and 0.8–1.25" if name == "ep" else "one-shot baseline",
            )
        )


def bench_flower(rows, rounds: int):
    """K = 3 SuperNodes on loopback, federated FOCEI for ``rounds`` rounds, and the
    in-process engine on the same site files and seed (equal parameters?)."""
    try:
        from phems_clinical.federation.flower.config import RunSettings
        from phems_clinical.federation.flower.launch import (
            run_loopback,
            simulate_sites,
        )
    except ImportError as err:
        rows.append(
            row("Flower loopback", 3, None, None, None, None, "–", f"not run: {err}")
        )
        return
    model = load_product("advate")
    with tempfile.TemporaryDirectory() as tmp:
        sites = simulate_sites(jax.random.key(4), Path(tmp) / "sites", 24)
        log("Flower loopback")
        res = run_loopback(
            sites, Path(tmp) / "out", settings=RunSettings(seed=0, rounds=rounds)
        )
        per = [h["seconds"] for h in res["history"]]
        events = pd.concat(
            [pd.read_csv(d / "cohort.csv").assign(SITE=d.name) for d in sites]
        )
        _, cohorts = cohorts_by_site(events, model)
        ref = run_federated(
            jax.random.key(0),
            fed_focei(model, n_occasions_all(cohorts)),
            pad_sites(cohorts),
            max_rounds=rounds,
        )
        fl = np.asarray(list(res["estimates"].values()), dtype=float)
        ours = np.asarray(ref.result["estimates"])
        gap = float(np.max(np.abs(fl / ours - 1)))
        start = res["launch"].get("to_first_round_s", float("nan"))
        rows.append(
            row(
                "Flower: SuperLink + 3 SuperNodes on loopback (FOCEI)",
                3,
                24,
                len(per),
                sum(per),
                statistics.median(per),
                f"max rel. diff to in-process {gap:.1e}",
                f"launch to round 1: {start:.0f} s; a new process per message",
            )
        )


def bench_flower_secagg(rows, rounds: int):
    """K = 3 SuperNodes on loopback, federated FOCEI for ``rounds`` rounds, plain
    and with SecAgg over Flower, on the same site files and seed."""
    try:
        from phems_clinical.federation.flower.config import RunSettings
        from phems_clinical.federation.flower.launch import (
            run_loopback,
            simulate_sites,
        )
    except ImportError as err:
        rows.append(
            row("SecAgg over Flower", 3, None, None, None, None, "–", f"not run: {err}")
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        sites = simulate_sites(jax.random.key(4), Path(tmp) / "sites", 24)
        per, res = {}, {}
        for secure in (False, True):
            log(f"Flower loopback, secagg={secure}")
            res[secure] = run_loopback(
                sites,
                Path(tmp) / f"out_{secure}",
                settings=RunSettings(seed=0, rounds=rounds, secagg=secure),
            )
            per[secure] = statistics.median(
                h["seconds"] for h in res[secure]["history"]
            )
        a = np.asarray(list(res[False]["estimates"].values()), dtype=float)
        b = np.asarray(list(res[True]["estimates"].values()), dtype=float)
        gap = float(np.max(np.abs(b / a - 1)))
        rows.append(
            row(
                "Flower round, plain (same run as the next row)",
                3,
                24,
                rounds,
                sum(h["seconds"] for h in res[False]["history"]),
                per[False],
                "–",
                "TLS + SuperNode auth",
            )
        )
        rows.append(
            row(
                "SecAgg over Flower vs plain Flower round (ratio of median s/round)",
                3,
                24,
                rounds,
                sum(h["seconds"] for h in res[True]["history"]),
                per[True],
                f"{per[True] / per[False]:.2f}x plain",
                f"5 stage exchanges/round; max rel. diff to plain {gap:.1e}",
            )
        )


def bench_newton(model, ks, per_site, rows, pooled_up_to: int = 10):
    """Federated FOCEI servers compared in the same run: trust-region Newton on
    the summed exact site Hessians, the same with the BHHH curvature, and BFGS
    (``fed_focei(hessian=...)``); cold = first run, warm = an identical second
    run; max relative difference to pooled scipy-BFGS ``fit_focei`` for K up to
    ``pooled_up_to``."""
    for k in ks:
        cohorts, sites, n_occ = federation(model, k, per_site)
        ref = (
            fit_focei(model, pooled(cohorts), covariance=False)
            if k <= pooled_up_to
            else None
        )
        for hessian in ("exact", "bhhh", "bfgs"):
            alg = fed_focei(model, n_occ, hessian=hessian)
            log(f"fed_focei hessian={hessian} K={k}: cold")
            cold, t_cold = timed(run_federated, jax.random.key(0), alg, sites)
            log(f"fed_focei hessian={hessian} K={k}: warm ({cold.rounds} rounds)")
            warm, t_warm = timed(run_federated, jax.random.key(0), alg, sites)
            acc = "–"
            if ref is not None:
                est = np.asarray(warm.result["estimates"])
                rel = np.max(np.abs(est / ref.estimates - 1))
                acc = f"max rel. diff to pooled {rel:.1e}"
            rows.append(
                row(
                    f"fed_focei hessian={hessian} to convergence (cold {t_cold:.1f} s)",
                    k,
                    k * per_site,
                    warm.rounds,
                    t_warm,
                    t_warm / warm.rounds,
                    acc,
                    warm.result["stopped_by"]
                    + ("" if warm.converged else "; NOT converged"),
                )
            )
            log(rows[-1])


def _site_dirs(model, root: Path, k: int, per_site: int, seed: int = 4):
    """K simulated hospitals (:func:`hospitals`) written as site folders, as
    ``launch.simulate_sites`` writes three (17 significant digits)."""
    events, _ = simulate_hospitals(jax.random.key(seed), model, hospitals(k, per_site))
    dirs = []
    for i, name in enumerate(dict.fromkeys(events["SITE"])):
        d = root / f"site_{i}"
        d.mkdir(parents=True, exist_ok=True)
        events[events["SITE"] == name].drop(columns=["SITE"]).to_csv(
            d / "cohort.csv", index=False, float_format="%.17g"
        )
        dirs.append(d)
    return dirs


def bench_flower_warm(model, rows, rounds: int, per_site: int):
    """Flower on loopback (TLS + SuperNode auth), K = 3: the stock SuperNode (a new
    ``flwr-clientapp`` process per message) against the warm ClientApp host per
    SuperNode with capped waits (``flower.host``), the same rounds, site files and
    seed in the same run; then a full federated FOCEI fit of 5 hospitals with
    SecAgg over the warm hosts, twice: from empty compilation caches (a first-ever
    fit) and with the caches it left (any later fit of the same model)."""
    from phems_clinical.federation.flower.config import RunSettings
    from phems_clinical.federation.flower.launch import run_loopback

    with tempfile.TemporaryDirectory() as tmp:
        sites = _site_dirs(model, Path(tmp) / "sites3", 3, per_site)
        per, res = {}, {}
        for warm in (False, True):
            log(f"Flower loopback, warm_host={warm}")
            res[warm] = run_loopback(
                sites,
                Path(tmp) / f"out_{warm}",
                settings=RunSettings(seed=0, rounds=rounds),
                warm_host=warm,
            )
            per[warm] = statistics.median(h["seconds"] for h in res[warm]["history"])
        a = np.asarray(list(res[False]["estimates"].values()), dtype=float)
        b = np.asarray(list(res[True]["estimates"].values()), dtype=float)
        same = (
            "bit-identical"
            if a.tobytes() == b.tobytes()
            else f"max rel. diff {float(np.max(np.abs(b / a - 1))):.1e}"
        )
        for warm in (False, True):
            h = res[warm]["history"]
            rows.append(
                row(
                    "Flower round, "
                    + (
                        "warm ClientApp host, waits capped"
                        if warm
                        else "stock (process per message)"
                    ),
                    3,
                    3 * per_site,
                    len(h),
                    sum(x["seconds"] for x in h),
                    per[warm],
                    f"{per[False] / per[True]:.1f}x faster; estimates {same}"
                    if warm
                    else "–",
                    f"launch to round 1: {res[warm]['launch']['to_first_round_s']:.0f}"
                    " s; TLS + SuperNode auth",
                )
            )
            log(rows[-1])
        sites5 = _site_dirs(model, Path(tmp) / "sites5", 5, per_site)
        # a first-ever fit (empty compilation caches: every program is traced and
        # compiled) and a later one (the caches that first fit left)
        cache = Path(tmp) / "cache5"
        cache.mkdir()
        before = os.environ.get("PHEMS_CACHE_DIR")
        os.environ["PHEMS_CACHE_DIR"] = str(cache)
        try:
            for when in ("first fit, empty caches", "later fit, caches kept"):
                log(
                    f"full federated FOCEI fit, 5 hospitals, SecAgg, warm hosts, {when}"
                )
                out = Path(tmp) / f"out_full_{len(rows)}"
                t0 = time.perf_counter()
                full = run_loopback(
                    sites5,
                    out,
                    settings=RunSettings(seed=0, rounds=0, secagg=True),
                    warm_host=True,
                    timeout=1800,
                )
                wall = time.perf_counter() - t0
                h = full["history"]
                rows.append(
                    row(
                        "full federated FOCEI fit over Flower on loopback, SecAgg on, "
                        f"warm hosts, {when} (wall time, launch to result)",
                        5,
                        5 * per_site,
                        len(h),
                        wall,
                        statistics.median(x["seconds"] for x in h),
                        "converged" if full.get("converged") else "NOT converged",
                        f"target < 120 s; launch to round 1 "
                        f"{full['launch']['to_first_round_s']:.0f} s; round 1 "
                        f"{h[0]['seconds']:.0f} s; 5 stage exchanges/round",
                    )
                )
                log(rows[-1])
        finally:
            if before is None:
                os.environ.pop("PHEMS_CACHE_DIR", None)
            else:
                os.environ["PHEMS_CACHE_DIR"] = before


ROWS = (
    "in-process",
    "secagg",
    "pooled",
    "flower",
    "flower-secagg",
    "newton",
    "flower-warm",
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--per-site", type=int, default=8)
    ap.add_argument("--secagg-rounds", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--newton-k",
        type=int,
        nargs="+",
        default=[3, 5, 10, 100],
        help="site counts of the newton rows (default 3 5 10 100)",
    )
    ap.add_argument(
        "--pooled-up-to",
        type=int,
        default=10,
        help="largest K of the newton rows given a pooled fit_focei "
        "reference (default 10; K = 100 adds about 2 min)",
    )
    ap.add_argument(
        "--rows",
        nargs="+",
        choices=ROWS,
        default=list(ROWS),
        help="rows to run (default: all)",
    )
    args = ap.parse_args(argv)
    if args.no_flower:
        args.rows = [r for r in args.rows if not r.startswith("flower")]
    ks = (3, 10) if args.quick else (3, 10, 100)
    load0 = load_average()
    info = device_info()
    model = load_product("advate")
    rows: list[str] = []
    t0 = time.perf_counter()
    if "in-process" in args.rows:
        bench_in_process(model, ks, args.per_site, rows)
    if "secagg" in args.rows:
        bench_secagg(
            model, ks, args.per_site, 3 if args.quick else args.secagg_rounds, rows
        )
    if "pooled" in args.rows:
        bench_vs_pooled(model, 5, args.per_site, 300 if args.quick else 1000, rows)
    if "flower" in args.rows:
        bench_flower(rows, 2 if args.quick else 3)
    if "flower-secagg" in args.rows:
        bench_flower_secagg(rows, 2 if args.quick else 3)
    if "flower-warm" in args.rows:
        bench_flower_warm(model, rows, 2 if args.quick else 3, args.per_site)
    if "newton" in args.rows:
        bench_newton(
            model,
            (3, 10) if args.quick else args.newton_k,
            args.per_site,
            rows,
            pooled_up_to=args.pooled_up_to,
        )
    head = (
        "| comparison | sites K | patients | rounds | seconds | s/round | "
        "accuracy / ratio | note |\n|---|---|---|---|---|---|---|---|"
    )
    table = "\n".join([head, *rows])
    print(table)
    dev = "gpu" if info.get("platform") == "gpu" else "cpu"
    part = "" if list(args.rows) == list(ROWS) else "_" + "_".join(args.rows)
    out = Path(args.out) if args.out else HERE / f"federation_{dev}{part}.md"
    cmd = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    out.write_text(
        f"# Federation benchmark ({dev.upper()})\n\n"
        f"- date: {_dt.date.today().isoformat()}; command: `{cmd}`\n"
        f"- device: {info}\n- versions: {versions()}\n"
        f"- code: {code_state('phems_clinical/federation')}\n"
        f"- load average (1/5/15 min) at start: {load0}; at end: {load_average()}\n"
        f"- total wall time: {time.perf_counter() - t0:.0f} s\n\n{table}\n"
    )
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
