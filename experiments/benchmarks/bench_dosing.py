#!/usr/bin/env python
"""Dosing benchmark: how fast is one patient's forecast, a batch of 10,000, and NUTS?

Prints one markdown table (operation x product, cold and warm) and writes it, with
the device, the command and the targets, to ``experiments/benchmarks/dosing_<dev>.md``
(``<dev>`` = ``cpu`` or ``gpu``; ``--out`` to change). Run from the repository root:

    python experiments/benchmarks/bench_dosing.py              # full (~5 min CPU)
    python experiments/benchmarks/bench_dosing.py --quick      # smoke test (~1 min)
    python experiments/benchmarks/bench_dosing.py --products advate --batch 1000

Operations, per product (default advate, eloctate, alprolix: 2-compartment,
2-compartment with IOV, 3-compartment):

* ``fit_map``: the posterior mode and Laplace covariance of one patient
  (``phems_clinical.pk.forecast.fit_map``), 3 levels, padded as ``phems dose`` pads
  (2 doses, 4 levels);
* ``fit_map + draws + recommend``: the same, then 4000 Laplace draws
  (``laplace_draws``) and ``pk.dosing.recommend`` with the tool's defaults (times to
  1/2/5 IU/dL, regimens for 3 targets x the product's intervals, level curve);
* ``run_dose (MAP)``: the whole ``phems dose`` call on a request dict (parsing,
  covariates, prior-predictive unit check, the above, the PNG figure and the HTML
  report);
* ``run_dose (NUTS)``: the same with ``method="nuts"``;
* ``fit_map_batch``: ``--batch`` patients (default 10,000) in one vmapped call;
* ``fit_nuts_individual``: the full posterior of one patient with its defaults
  (4 chains vectorised, 300 warm-up + 500 draws each).

Cold start (per product, ``--cold-reps`` runs each, each a new Python process,
timed from outside, the way a clinic calls the tool):

* (a) ``python -c "import jax"``: Python's start-up and the JAX import alone;
* (b) ``phems dose REQUEST --out DIR`` with an empty cache folder
  (``PHEMS_CACHE_DIR`` new each run): imports, tracing, exporting and compiling;
* (c) the same with a warm cache folder (after one warming run): the exported
  programs are loaded (:mod:`phems_clinical.pk.export_cache`) and compiled code is
  read from JAX's persistent compilation cache; no tracing.

(a) and (c) alternate run by run, so that the machine's load touches both alike;
the table gives their medians and (c) - (a), whose goal is < 2 s.
``--cold-start-only`` runs only these rows.

Timing: cold = the first call in the process for that function, model object and
array shapes (tracing and XLA compilation included; each operation gets its own
model object so that no cold call profits from another's compilation, except
``run_dose``, which loads its own; the in-process rows run with
``PHEMS_CACHE_DIR=off``, so no program comes from an earlier run); warm = the
median of repeated identical calls after it (``--reps``), with the 10th-90th
percentile. Every call blocks until its results are ready. The JAX compile time
inside each cold call is in the notes.

JAX runs on its default device: a GPU where one is visible (``jax[cuda12]``
installed), else the CPU; the report names it. ``JAX_PLATFORMS=cpu`` forces the CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench  # noqa: E402  (experiments/benchmarks/_bench.py)

_bench.choose_device()
# in-process rows: no exported program or compiled code from an earlier run (the
# cold-start rows run subprocesses with their own cache folders)
os.environ["PHEMS_CACHE_DIR"] = "off"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from _bench import Timed, log  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.dont_write_bytecode = True

from phems_clinical.app.dose import run_dose  # noqa: E402
from phems_clinical.data.cohort import Cohort, stack_subjects  # noqa: E402
from phems_clinical.pk.dosing import recommend  # noqa: E402
from phems_clinical.pk.forecast import (  # noqa: E402
    fit_map,
    fit_map_batch,
    fit_nuts_individual,
    laplace_draws,
)
from phems_clinical.pk.library import load_product  # noqa: E402
from phems_clinical.pk.model import initial_params  # noqa: E402
from phems_clinical.pk.simulate import HospitalSpec, simulate_cohort  # noqa: E402
from phems_clinical.provenance import (  # noqa: E402
    code_state,
    device_info,
    load_average,
    versions,
)

TARGET_MAP_S = 0.050
TARGET_COLD_EXTRA_S = 2.0  # (c) - (a): phems dose over Python + JAX start-up
TARGET_NUTS_S = 3.0
N_DRAWS = 4000  # the tool's default (DosingOptions.n_draws)


# ---------------------------------------------------------------------------
# Device


# ---------------------------------------------------------------------------
# Patients


def simulate(name: str, n: int, seed: int):
    """``n`` patients from the product's model: one 50 IU/kg infusion and the
    simulator's 3-sample ISTH design (LLOQ 1 IU/dL); ages in the validated range."""
    from phems_clinical.pk.dosing import validated_range

    m = load_product(name)
    lo, hi = validated_range(m)["AGE"]
    ages = (float(lo or 1.0), float(hi or 65.0))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), n)
    events, _ = simulate_cohort(
        key, m, HospitalSpec(name, n, age_range=ages, design="sparse")
    )
    return m, events


def subjects_from_events(m, events, *, n_dose=None, n_obs=None) -> Cohort:
    """Cohort rows straight from the simulator's events (one infusion, occasion 0;
    BLQ levels with their LLOQ), padded to ``n_dose`` / ``n_obs``."""
    rows = []
    for _, g in events.groupby("ID", sort=True):
        d, o = g[g["EVID"] == 1], g[g["EVID"] == 0]
        rows.append(
            dict(
                dose_time=d["TIME"].to_numpy(float),
                dose_amt=d["AMT"].to_numpy(float),
                dose_dur=d["DUR"].to_numpy(float),
                dose_occ=np.zeros(len(d), int),
                obs_time=o["TIME"].to_numpy(float),
                obs_dv=np.nan_to_num(o["DV"].to_numpy(float)),
                obs_blq=o["BLQ"].to_numpy(int) == 1,
                obs_lloq=o["LLOQ"].to_numpy(float),
                obs_occ=np.zeros(len(o), int),
                covariates=[float(g[c].iloc[0]) for c in m.covariate_names],
            )
        )
    return stack_subjects(rows, n_dose=n_dose, n_obs=n_obs)


def request_for(name: str, events) -> dict:
    """A ``phems dose`` request for the first simulated patient."""
    g = events[events["ID"] == events["ID"].min()]
    d, o = g[g["EVID"] == 1].iloc[0], g[g["EVID"] == 0]
    req = {
        "product": name,
        "acknowledge_unverified": True,  # timing, not advice
        "weight_kg": round(float(d["WT"]), 1),
        "age_y": round(float(d["AGE"]), 1),
        "height_cm": round(float(d["HT"]), 1),
        "vwf_IU_dL": round(float(d["VWF"]), 1),
        "hematocrit_pct": round(float(d["HCT"]), 1),
        "infusions": [
            {"time_h": 0.0, "dose_IU": float(d["AMT"]), "duration_h": float(d["DUR"])}
        ],
        "levels": [],
    }
    for _, r in o.iterrows():
        if r["BLQ"]:
            req["levels"].append(
                {
                    "time_h": float(r["TIME"]),
                    "blq": True,
                    "lloq": float(r["LLOQ"]),
                    "unit": "IU/dL",
                }
            )
        else:
            req["levels"].append(
                {"time_h": float(r["TIME"]), "value": float(r["DV"]), "unit": "IU/dL"}
            )
    return req


# ---------------------------------------------------------------------------
# Measurements


def nuts_defaults() -> str:
    import inspect

    sig = inspect.signature(fit_nuts_individual).parameters
    return (
        f"{sig['num_chains'].default} x ({sig['num_warmup'].default}"
        f"+{sig['num_samples'].default})"
    )


def measure(rows, product, op, n_pat, fn, reps, target=None, note=""):
    log(f"{product}: {op} cold")
    cold = Timed(fn)
    warm, recompiles = [], 0
    for _ in range(reps):
        t = Timed(fn)
        warm.append(t.seconds)
        recompiles += t.n_compiles
    med = statistics.median(warm) if warm else float("nan")
    p10, p90 = np.percentile(warm, [10, 90]) if warm else (np.nan, np.nan)
    log(
        f"{product}: {op}: cold {cold.seconds:.3f} s, warm median {med * 1e3:.1f} ms "
        f"({reps} calls)"
    )
    notes = [f"cold compile {cold.compile_s:.1f} s ({cold.n_compiles} XLA)"]
    if recompiles:
        notes.append(f"warm call RECOMPILES ({recompiles} XLA)")
    if note:
        notes.append(note)
    rows.append(
        dict(
            product=product,
            op=op,
            n=n_pat,
            cold=cold.seconds,
            warm=med,
            p10=p10,
            p90=p90,
            reps=reps,
            target=target,
            notes=notes,
        )
    )
    return cold.value


def bench_product(name: str, args, rows: list) -> None:
    m_ev, events = simulate(name, args.batch, args.seed)
    req = request_for(name, events)
    log(
        f"{name}: request {req['weight_kg']} kg, {req['age_y']} y, levels "
        + ", ".join(
            f"{lv['time_h']:.1f} h: {lv.get('value', 'BLQ')}" for lv in req["levels"]
        )
    )
    # one model object per operation: each cold call compiles its own code
    m_map, m_rec, m_batch, m_nuts = (load_product(name) for _ in range(4))
    params = initial_params(m_map)
    first = events[events["ID"] == events["ID"].min()]
    one = jax.tree.map(
        lambda x: x[0], subjects_from_events(m_map, first, n_dose=2, n_obs=4)
    )
    key = jax.random.PRNGKey(args.seed)
    k_draw, k_rec, k_nuts = jax.random.split(key, 3)
    wt = float(req["weight_kg"])
    vials = tuple(m_rec.metadata.get("vial_sizes_IU", (250, 500, 1000)))

    measure(
        rows,
        name,
        "fit_map",
        1,
        lambda: fit_map(m_map, params, one),
        args.reps_map,
        TARGET_MAP_S,
    )

    def chain():
        mode = fit_map(m_rec, params, one)
        draws = laplace_draws(k_draw, mode, N_DRAWS)
        rec = recommend(
            k_rec, m_rec, params, one, draws, n_occ=1, weight_kg=wt, vial_sizes=vials
        )
        return rec.parameters["clearance"]

    measure(
        rows, name, f"fit_map + {N_DRAWS} draws + recommend", 1, chain, args.reps_chain
    )
    measure(
        rows,
        name,
        "run_dose (MAP, end to end)",
        1,
        lambda: len(run_dose(req, method="map", seed=args.seed).curve_png),
        args.reps_dose,
        note="request dict -> result, PNG, HTML",
    )

    coh = subjects_from_events(m_batch, events)
    res = measure(
        rows,
        name,
        "fit_map_batch",
        int(coh.n_subjects),
        lambda: fit_map_batch(m_batch, params, coh),
        args.reps_batch,
    )
    gn = np.asarray(res.grad_norm)
    rows[-1]["notes"].append(
        f"largest max-abs gradient at the mode {np.nanmax(gn):.1e}"
        f", {int(np.sum(~(gn < 1e-5)))} patients at or above 1e-5"
    )
    measure(
        rows,
        name,
        "run_dose (NUTS, end to end)",
        1,
        lambda: len(run_dose(req, method="nuts", seed=args.seed).curve_png),
        args.reps_dose_nuts,
        note="request dict -> result, PNG, HTML; cold "
        "reuses the run_dose (MAP) row's compiled code (same model object), "
        "so it compiles mainly the sampler",
    )
    post = measure(
        rows,
        name,
        f"fit_nuts_individual ({nuts_defaults()})",
        1,
        lambda: fit_nuts_individual(k_nuts, m_nuts, params, one),
        args.reps_nuts,
        TARGET_NUTS_S,
    )
    rows[-1]["notes"].append(
        f"R-hat max {np.nanmax(post.r_hat):.3f}, ESS min "
        f"{np.min(post.ess):.0f}, {post.n_divergent} divergent"
    )


# ---------------------------------------------------------------------------
# Cold start: phems dose as a new process


def _wall(cmd: list[str], env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    return seconds


def _process_row(rows, product, op, times, note, target=None):
    med = statistics.median(times)
    p10, p90 = np.percentile(times, [10, 90])
    rows.append(
        dict(
            product=product,
            op=op,
            n=1,
            cold=None,
            warm=med,
            p10=p10,
            p90=p90,
            reps=len(times),
            target=target,
            notes=[note],
            unit="runs",
        )
    )
    return med


def bench_cold_start(name: str, args, rows: list) -> None:
    """Rows (a), (b), (c) and (c) - (a) for ``phems dose`` on ``name``."""
    _, events = simulate(name, 3, args.seed)
    req = request_for(name, events)
    env = {k: v for k, v in os.environ.items() if k != "PHEMS_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="phems_cold_") as tmp:
        tmp = Path(tmp)
        (tmp / "request.json").write_text(json.dumps(req))
        runs = iter(range(10**6))

        def dose(cache: Path) -> float:
            out = tmp / f"out{next(runs)}"
            return _wall(
                [
                    sys.executable,
                    "-m",
                    "phems_clinical",
                    "dose",
                    str(tmp / "request.json"),
                    "--out",
                    str(out),
                ],
                {**env, "PHEMS_CACHE_DIR": str(cache)},
                ROOT,
            )

        def import_jax() -> float:
            return _wall([sys.executable, "-c", "import jax"], env, ROOT)

        log(f"{name}: phems dose, empty cache ({args.cold_reps} runs)")
        empty = [dose(tmp / f"cache_empty{i}") for i in range(args.cold_reps)]
        warm_dir = tmp / "cache_warm"
        dose(warm_dir)  # warming run
        log(
            f"{name}: python -c 'import jax' and phems dose, warm cache, alternating "
            f"({args.cold_reps} runs each)"
        )
        a, c = [], []
        for _ in range(args.cold_reps):
            a.append(import_jax())
            c.append(dose(warm_dir))
        n_programs = len(list((warm_dir / "programs").glob("*.jaxexp")))
    med_a = _process_row(
        rows,
        name,
        "(a) python -c 'import jax' (new process)",
        a,
        "Python start-up + JAX import; alternated with (c)",
    )
    _process_row(
        rows,
        name,
        "(b) phems dose, empty cache (new process)",
        empty,
        "new empty PHEMS_CACHE_DIR each run: imports, tracing, export, "
        "XLA compilation, the calculation, PNG and HTML",
    )
    med_c = _process_row(
        rows,
        name,
        "(c) phems dose, warm cache (new process)",
        c,
        f"{n_programs} exported programs loaded, compiled code from "
        "the persistent cache; alternated with (a)",
    )
    diff = med_c - med_a
    rows.append(
        dict(
            product=name,
            op="(c) - (a): phems dose over Python + JAX",
            n=1,
            cold=None,
            warm=diff,
            p10=np.nan,
            p90=np.nan,
            reps=args.cold_reps,
            target=TARGET_COLD_EXTRA_S,
            notes=[f"(c) / (a) = {med_c / med_a:.2f}"],
            unit="runs",
        )
    )
    log(
        f"{name}: (a) {med_a:.2f} s, (c) {med_c:.2f} s, (c) - (a) {diff:.2f} s, "
        f"(c) / (a) {med_c / med_a:.2f}"
    )


# ---------------------------------------------------------------------------
# Report


def _fmt_t(s: float) -> str:
    if s is None or not np.isfinite(s):
        return "—"
    return f"{s * 1e3:.1f} ms" if s < 1.0 else f"{s:.2f} s"


def table(rows: list) -> str:
    head = (
        "| product | operation | patients | cold | warm (median) | warm p10–p90 | "
        "warm per patient | target | notes |"
    )
    out = [head, "|" + "---|" * 9]
    for r in rows:
        per = r["warm"] / r["n"]
        if r["target"] is not None:
            ok = r["warm"] < r["target"]
            tgt = f"< {_fmt_t(r['target'])}: {'met' if ok else '**NOT met**'}"
        else:
            tgt = ""
        out.append(
            "| "
            + " | ".join(
                [
                    r["product"],
                    r["op"],
                    f"{r['n']:,}",
                    _fmt_t(r["cold"]),
                    _fmt_t(r["warm"]) + f" ({r['reps']} {r.get('unit', 'calls')})",
                    f"{_fmt_t(r['p10'])}–{_fmt_t(r['p90'])}",
                    (f"{per * 1e6:.0f} µs" if per < 1e-3 else _fmt_t(per))
                    if r["n"] > 1
                    else "",
                    tgt,
                    "; ".join(r["notes"]),
                ]
            )
            + " |"
        )
    return "\n".join(out)


def write_report(
    path: Path, info: dict, args, rows, started, load0, partial: bool
) -> str:
    cmd = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
    )
    plat_env = os.environ.get("JAX_PLATFORMS", "(unset)")
    lines = [
        f"# Dosing benchmark — {info['device']}"
        + (" (PARTIAL, still running)" if partial else ""),
        "",
        f"- date: {started:%Y-%m-%d %H:%M} (local), total wall time "
        f"{(time.time() - started.timestamp()) / 60:.1f} min",
        f"- command: `{cmd}` (from the repository root; JAX_PLATFORMS={plat_env})",
        f"- device: {info['device']} (jax.devices()[0]: platform {info['platform']}, "
        f"device_kind {info['device_kind']}; {info['n_devices']} device(s)); CPU: "
        f"{info['cpu']}, {info['cores']} cores",
        *([f"- device note: {args.device_note}"] if args.device_note else []),
        f"- load average (1/5/15 min) at start: {load0}; at end: {load_average()}",
        f"- {info['versions']}; float64 (jax_enable_x64)",
        f"- code: {info['code']}",
        f"- settings: seed {args.seed}; batch {args.batch} patients; warm repetitions "
        f"fit_map {args.reps_map}, chain {args.reps_chain}, run_dose {args.reps_dose} "
        f"(NUTS {args.reps_dose_nuts}), "
        f"batch {args.reps_batch}, NUTS {args.reps_nuts}; {N_DRAWS} Laplace draws; "
        f"cold-start runs {args.cold_reps} each",
        "- patients: simulated from each product's library model (one 50 IU/kg "
        "10-min infusion, 3 levels in the ISTH windows, LLOQ 1 IU/dL); the "
        "single-patient rows use the first one, padded like `phems dose` (2 doses, 4 "
        "levels)",
        "",
        "## Targets",
        "",
        f"- warm `fit_map` for one patient < {TARGET_MAP_S * 1e3:.0f} ms (median): "
        + ", ".join(
            f"{r['product']} {_fmt_t(r['warm'])}"
            f" {'met' if r['warm'] < TARGET_MAP_S else 'NOT met'}"
            for r in rows
            if r["op"] == "fit_map"
        ),
        f"- warm `fit_nuts_individual` (defaults) < {TARGET_NUTS_S:.0f} s: "
        + ", ".join(
            f"{r['product']} {_fmt_t(r['warm'])}"
            f" {'met' if r['warm'] < TARGET_NUTS_S else 'NOT met'}"
            for r in rows
            if r["op"].startswith("fit_nuts")
        ),
        f"- `phems dose` from a cold start with a warm cache, (c) - (a), < "
        f'{TARGET_COLD_EXTRA_S:.0f} s over `python -c "import jax"`: '
        + ", ".join(
            f"{r['product']} {_fmt_t(r['warm'])} ({r['notes'][0]})"
            f" {'met' if r['warm'] < TARGET_COLD_EXTRA_S else 'NOT met'}"
            for r in rows
            if r["op"].startswith("(c) - (a)")
        ),
        "",
        "## Results",
        "",
        table(rows),
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--products", nargs="+", default=["advate", "eloctate", "alprolix"])
    ap.add_argument(
        "--batch",
        type=int,
        default=10_000,
        help="patients in the fit_map_batch call (default 10000)",
    )
    ap.add_argument("--reps-map", type=int, default=100)
    ap.add_argument("--reps-chain", type=int, default=20)
    ap.add_argument("--reps-dose", type=int, default=10)
    ap.add_argument("--reps-dose-nuts", type=int, default=3)
    ap.add_argument("--reps-batch", type=int, default=3)
    ap.add_argument("--reps-nuts", type=int, default=5)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument(
        "--cold-reps",
        type=int,
        default=3,
        help="runs of each cold-start row (new processes)",
    )
    ap.add_argument(
        "--cold-start-only",
        action="store_true",
        help="only the cold-start rows (phems dose as a new process)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: advate only, batch 1000, few repetitions",
    )
    ap.add_argument(
        "--device-note",
        default="",
        help="free text about the machine, written under the device line",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output (default experiments/benchmarks/"
        "dosing_<cpu|gpu>[_quick].md)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.products, args.batch = args.products[:1], min(args.batch, 1000)
        args.reps_map, args.reps_chain, args.reps_dose = 50, 5, 3
        args.reps_dose_nuts = 2
        args.reps_batch, args.reps_nuts = 2, 2
    started = _dt.datetime.now()
    load0 = load_average()
    info = device_info()
    info["versions"] = ", ".join(
        f"{k} {v}" for k, v in versions(("jax", "jaxlib", "numpyro", "numpy")).items()
    )
    info["code"] = code_state()
    dev = "gpu" if info["platform"] in ("gpu", "cuda", "rocm") else info["platform"]
    suffix = "_quick" if args.quick else "_cold" if args.cold_start_only else ""
    out = args.out or HERE / f"dosing_{dev}{suffix}.md"
    log(
        f"JAX default device: {jax.devices()[0]} (platform {info['platform']}, "
        f"{info['device_kind']}); CPU {info['cpu']}; {info['cores']}; writing {out}"
    )
    rows: list = []
    for name in args.products:
        bench_cold_start(name, args, rows)
        write_report(out, info, args, rows, started, load0, partial=True)
        if not args.cold_start_only:
            bench_product(name, args, rows)
            write_report(out, info, args, rows, started, load0, partial=True)
    text = write_report(out, info, args, rows, started, load0, partial=False)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
